//! Runs one gate workload outside gungraun, for finding where two builds'
//! counts differ: the measured call is `one_workload_measured`, so callgrind
//! can count just that call and its per-function profile can be compared.
//!
//! ```sh
//! cargo build --example one_workload -p fedsvd-bench-gate
//! env -i MATMUL_NUM_THREADS=1 valgrind --tool=callgrind --cache-sim=no \
//!     --toggle-collect='*one_workload_measured*' \
//!     target/debug/examples/one_workload dp_prv_epsilon
//! callgrind_annotate --inclusive=no callgrind.out.<pid>
//! ```

use fedsvd_bench_gate::{DeterministicAlloc, Prepared, prepare_or_exit};

// The same allocator as the gate's benchmark binary, so the counts agree.
#[global_allocator]
static ALLOCATOR: DeterministicAlloc = DeterministicAlloc::new();

#[inline(never)]
fn one_workload_measured(job: &mut Prepared) -> fedsvd_bench_gate::Result<f64> {
    job.run().map(std::hint::black_box)
}

fn main() {
    // All arguments are read (later ones are ignored): like the benchmark
    // harness, which parses arguments holding the build folder's path, the
    // heap then depends on their length, which the counts must not.
    let args: Vec<String> = std::env::args().collect();
    let Some(name) = args.get(1) else {
        eprintln!(
            "usage: one_workload WORKLOAD [IGNORED...] (WORKLOAD: one of fedsvd_bench_gate::WORKLOADS)"
        );
        std::process::exit(2);
    };
    let mut job = prepare_or_exit(name);
    match one_workload_measured(&mut job) {
        Ok(v) => println!("{name}: {v}"),
        Err(e) => {
            eprintln!("{name} failed: {e}");
            std::process::exit(2);
        }
    }
}
