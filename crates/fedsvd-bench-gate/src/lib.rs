#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod alloc;
mod workloads;

use std::cell::OnceCell;

pub use alloc::{DeterministicAlloc, GRANULE, fence_to_page};
pub use workloads::WORKLOADS;

/// Everything that can go wrong while preparing or running a workload.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A workload name that is not in [`WORKLOADS`].
    #[error("no workload named `{0}`; the registered ones are listed in WORKLOADS")]
    UnknownWorkload(String),
    /// The single-thread rayon pool could not be built on this thread.
    #[error("cannot build the single-thread rayon pool: {0}")]
    Pool(#[from] rayon::ThreadPoolBuildError),
    /// The kernel could not pin the thread to one CPU.
    #[error("cannot pin the benchmark thread to one CPU: {0}")]
    Affinity(std::io::Error),
    /// An error of the accountants.
    #[error(transparent)]
    Dp(#[from] fedsvd_dp::Error),
    /// An error of the factorizations.
    #[error(transparent)]
    Linalg(#[from] fedsvd_linalg::Error),
    /// An error of the CPU kernels.
    #[error(transparent)]
    Kernels(#[from] fedsvd_kernels::Error),
    /// An error of the model.
    #[error(transparent)]
    Model(#[from] fedsvd_model::Error),
    /// An error of the training path.
    #[error(transparent)]
    Training(#[from] fedsvd::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// The measured part of a workload: runs once per call and returns a value
/// derived from its output, so the optimizer cannot drop the work and a test
/// can compare two runs.
pub type Job = Box<dyn FnMut() -> Result<f64>>;

/// One named benchmark: `prepare` builds the inputs (not measured) and
/// returns the job that is measured.
pub struct Workload {
    /// The benchmark id, also its key in the committed baseline.
    pub name: &'static str,
    /// What the job does, for the docs and the gate's table.
    pub about: &'static str,
    /// Builds the inputs and returns the measured job.
    pub prepare: fn() -> Result<Job>,
}

/// A workload whose inputs are built and whose thread is set up for
/// deterministic instruction counts; [`Prepared::run`] is the measured call.
pub struct Prepared {
    name: &'static str,
    job: Job,
}

impl Prepared {
    /// The workload's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Runs the job once on the calling thread, on a stack whose address is
    /// page-aligned at the job's entry.
    ///
    /// The process's initial stack pointer depends on the size of argv and
    /// the environment, so on the benchmark binary's path: two clones in
    /// folders of different name lengths ran every stack frame at another
    /// offset within the page. Copies to and from stack buffers then took
    /// other paths through glibc's `memcpy` (506 instructions of
    /// `dp_prv_epsilon`, all in `prv::power_block`, between `/tmp/a` and a
    /// folder 50 characters longer). An over-aligned local makes the compiler
    /// realign this frame, so every frame below it sits at the same offset
    /// whatever the path. For the same reason the job's first allocation
    /// starts on a fresh page ([`fence_to_page`]).
    #[inline(never)]
    pub fn run(&mut self) -> Result<f64> {
        let anchor = PageAligned(0);
        std::hint::black_box(&anchor);
        fence_to_page();
        (self.job)()
    }
}

/// A page-aligned local: the frame holding one is realigned to a page.
#[repr(C, align(4096))]
struct PageAligned(u8);

/// Finds the workload `name`, makes the calling thread single-threaded for
/// every parallel layer the crates use, builds the workload's inputs and
/// runs it once, unmeasured.
///
/// Instruction counts are only comparable between runs when the work runs
/// on one thread in a fixed order, whatever the machine's core count:
/// - the thread is pinned to one CPU, so `available_parallelism` (which
///   fedsvd-dp's scoped-thread loops ask) answers 1;
/// - the calling thread becomes the only worker of a rayon pool, so every
///   `par_iter` of the model, linalg and kernels crates runs inline here, on
///   the thread callgrind measures, instead of on a pool thread it does not;
/// - `MATMUL_NUM_THREADS=1` (set by the benchmark's configuration, read once
///   by matrixmultiply) keeps the GEMMs on this thread too.
pub fn prepare(name: &str) -> Result<Prepared> {
    let workload = WORKLOADS
        .iter()
        .find(|w| w.name == name)
        .ok_or_else(|| Error::UnknownWorkload(name.to_string()))?;
    single_thread()?;
    // The inputs and the buffers the unmeasured run leaves behind (caches
    // the measured run reuses) start on a fresh page too, so their offsets
    // within a page do not depend on what the process allocated before
    // (see [`Prepared::run`]).
    fence_to_page();
    let mut job = (workload.prepare)()?;
    // One unmeasured run first: the measured one is then the steady state,
    // without first-use work whose cost depends on the process rather than
    // the code (FFT planners' hash-seeded caches, lazily read environment
    // variables whose values hold the build folder's path, thread-local
    // buffers).
    job()?;
    Ok(Prepared {
        name: workload.name,
        job,
    })
}

/// [`prepare`] for the benchmark harness, whose setup functions cannot
/// return errors: a workload that cannot be prepared is a broken benchmark,
/// so it stops the benchmark process with the reason.
pub fn prepare_or_exit(name: &str) -> Prepared {
    prepare(name).unwrap_or_else(|e| {
        eprintln!("fedsvd-bench-gate: cannot prepare `{name}`: {e}");
        std::process::exit(2)
    })
}

thread_local! {
    // rayon can make a thread a pool worker only once (the registry is
    // leaked), so the pool is built on first use and kept for the thread.
    static POOL: OnceCell<()> = const { OnceCell::new() };
}

fn single_thread() -> Result<()> {
    POOL.with(|cell| {
        if cell.get().is_some() {
            return Ok(());
        }
        pin_to_one_cpu()?;
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .use_current_thread()
            .build()?;
        let _ = cell.set(());
        Ok(())
    })
}

/// Restricts the calling thread (and threads it starts later) to the first
/// CPU it may run on.
fn pin_to_one_cpu() -> Result<()> {
    // SAFETY: cpu_set_t is plain data, zero is a valid (empty) set, and the
    // pointers passed to the kernel point at it with its exact size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        if libc::sched_getaffinity(0, size, &mut set) != 0 {
            return Err(Error::Affinity(std::io::Error::last_os_error()));
        }
        let first = (0..libc::CPU_SETSIZE as usize)
            .find(|&cpu| libc::CPU_ISSET(cpu, &set))
            .unwrap_or(0);
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(first, &mut set);
        if libc::sched_setaffinity(0, size, &set) != 0 {
            return Err(Error::Affinity(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_identifiers() {
        let mut names: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
        for n in &names {
            assert!(
                !n.is_empty()
                    && n.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "`{n}` must be a Rust identifier in snake case (it becomes a #[bench::NAME] id)"
            );
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), WORKLOADS.len(), "duplicate workload names");
    }

    #[test]
    fn unknown_workload_is_an_error() {
        assert!(matches!(
            prepare("no_such_workload"),
            Err(Error::UnknownWorkload(_))
        ));
    }

    #[test]
    fn thread_is_single_threaded_after_prepare() {
        prepare(WORKLOADS[0].name).unwrap();
        assert_eq!(rayon::current_num_threads(), 1);
        assert_eq!(
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            1
        );
    }

    /// The benchmark file must list every workload (and nothing else):
    /// gungraun needs one `#[bench::NAME(...)]` attribute per benchmark.
    #[test]
    fn benchmark_file_lists_every_workload() {
        let src = include_str!("../benches/gate.rs");
        let listed: Vec<&str> = src
            .lines()
            .filter_map(|l| l.trim().strip_prefix("#[bench::"))
            .filter_map(|l| l.split('(').next())
            .collect();
        let registered: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
        assert_eq!(listed, registered, "benches/gate.rs and WORKLOADS disagree");
        for name in registered {
            assert!(
                src.contains(&format!("#[bench::{name}(args = (\"{name}\")")),
                "the attribute of `{name}` must pass its own name"
            );
        }
    }
}
