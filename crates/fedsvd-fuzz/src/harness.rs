//! Running one input through a target and checking the properties, and
//! the fuzz loop of one target inside a worker process.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::alloc;
use crate::mutate::{Format, Mutator};

/// A parser under test. `run` gets the target's scratch folder (after
/// `setup` wrote the fixed companion files and the harness wrote the input
/// to `input_file`) and the input bytes, and returns the `Display` of the
/// parser's error when it rejects the input.
#[derive(Clone, Copy)]
pub struct Target {
    /// Name on the command line and folder name of its corpus and findings.
    pub name: &'static str,
    /// What it parses.
    pub about: &'static str,
    /// Structure-aware mutations to use.
    pub format: Format,
    /// File (in the scratch folder) the input is written to before each
    /// run; empty when the input is not a file.
    pub input_file: &'static str,
    /// Writes the fixed companion files (a model's `config.json` beside the
    /// fuzzed weights, ...) into the scratch folder, once per worker.
    pub setup: fn(&Path) -> std::io::Result<()>,
    /// Whether every rejection must name a file of the scratch folder (its
    /// path appears in the error's `Display`).
    pub names_file: bool,
    /// Rejections that are allowed not to name the file: documented,
    /// reported exceptions in code that fedsvd-fuzz may not change.
    pub unnamed_ok: fn(&str) -> bool,
    /// Tokens the mutator inserts (keys, punctuation, values).
    pub dictionary: &'static [&'static str],
    /// Parses the input.
    pub run: fn(&Path, &[u8]) -> Result<(), String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("name", &self.name).finish()
    }
}

/// No setup: the target needs no companion files.
pub fn no_setup(_: &Path) -> std::io::Result<()> {
    Ok(())
}

/// No exceptions: every rejection must name the file.
pub fn no_exception(_: &str) -> bool {
    false
}

/// The outcome of one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The parser accepted it.
    Accepted,
    /// The parser rejected it with a proper error.
    Rejected,
    /// A finding: a property was broken.
    Finding(Finding),
}

/// Which property an input broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A panic escaped the parser.
    Panic,
    /// The parser asked for one allocation above the cap.
    Oversized,
    /// The parser's live memory grew above the cap (many allocations).
    Memory,
    /// A rejection does not name the file.
    Unnamed,
    /// The input ran longer than the per-input time limit.
    Hang,
    /// The worker process died (abort, stack overflow, signal).
    Crash,
}

impl Kind {
    /// Short name, used in finding file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Panic => "panic",
            Kind::Oversized => "oversized-alloc",
            Kind::Memory => "memory",
            Kind::Unnamed => "unnamed-file",
            Kind::Hang => "hang",
            Kind::Crash => "crash",
        }
    }

    /// The kind named by [`Kind::as_str`].
    pub fn from_name(name: &str) -> Option<Kind> {
        [
            Kind::Panic,
            Kind::Oversized,
            Kind::Memory,
            Kind::Unnamed,
            Kind::Hang,
            Kind::Crash,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }
}

/// A broken property and what was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The property.
    pub kind: Kind,
    /// The panic message, the refused size, the error that names no file...
    pub message: String,
}

impl Finding {
    /// What identifies "the same bug" across inputs: the kind and the
    /// message without digits and quoted names (sizes, offsets, line
    /// numbers and tensor names vary); for a panic, where it happened.
    pub fn signature(&self) -> String {
        let message = match self.kind {
            Kind::Panic => self.message.split(": ").next().unwrap_or_default(),
            _ => &self.message,
        };
        let mut text = String::new();
        let mut quoted = false;
        for c in message.chars() {
            if c == '`' {
                quoted = !quoted;
            } else if !quoted && !c.is_ascii_digit() {
                text.push(c);
            }
        }
        let text: String = text.chars().take(160).collect();
        format!("{}: {text}", self.kind.as_str())
    }
}

/// Limits of one input.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest single allocation (and largest growth of live memory).
    pub alloc_cap: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            alloc_cap: alloc::DEFAULT_CAP,
        }
    }
}

thread_local! {
    /// Where the last panic of an input on this thread happened.
    static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Whether this thread is running an input (its panics are findings,
    /// reported by the harness, not printed).
    static RUNNING_INPUT: Cell<bool> = const { Cell::new(false) };
}

/// Installs (once) a panic hook that prints nothing while an input runs
/// and remembers where the panic happened (a caught panic is reported with
/// its location; the default message for every rejected input would drown
/// the output). Outside an input it defers to the previous hook, so the
/// harness's own failures and test assertions still print.
pub fn install_quiet_panic_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !RUNNING_INPUT.with(Cell::get) {
                previous(info);
                return;
            }
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            PANIC_LOCATION.with(|slot| *slot.borrow_mut() = Some(location));
        }));
    });
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Runs one input through `target` in `dir` and checks the properties:
/// no panic, no allocation above the cap, a rejection names the file.
/// `Err` only when the harness itself cannot write the input.
pub fn run_one(
    target: &Target,
    dir: &Path,
    input: &[u8],
    limits: Limits,
) -> std::io::Result<Verdict> {
    if !target.input_file.is_empty() {
        std::fs::write(dir.join(target.input_file), input)?;
    }
    PANIC_LOCATION.with(|slot| *slot.borrow_mut() = None);
    let live = alloc::live_bytes();
    RUNNING_INPUT.with(|r| r.set(true));
    alloc::arm(limits.alloc_cap);
    let result = catch_unwind(AssertUnwindSafe(|| (target.run)(dir, input)));
    let report = alloc::disarm(live);
    RUNNING_INPUT.with(|r| r.set(false));
    if report.largest_refused > 0 {
        return Ok(Verdict::Finding(Finding {
            kind: Kind::Oversized,
            message: format!(
                "one allocation of {} bytes (cap {}) was requested",
                report.largest_refused, limits.alloc_cap
            ),
        }));
    }
    let outcome = match result {
        Err(payload) => {
            let location = PANIC_LOCATION
                .with(|slot| slot.borrow().clone())
                .unwrap_or_default();
            return Ok(Verdict::Finding(Finding {
                kind: Kind::Panic,
                message: format!("panicked at {location}: {}", panic_message(&*payload)),
            }));
        }
        Ok(outcome) => outcome,
    };
    if report.peak_growth > limits.alloc_cap {
        return Ok(Verdict::Finding(Finding {
            kind: Kind::Memory,
            message: format!(
                "live memory grew by {} bytes (cap {})",
                report.peak_growth, limits.alloc_cap
            ),
        }));
    }
    match outcome {
        Ok(()) => Ok(Verdict::Accepted),
        Err(message) => {
            let dir_text = dir.display().to_string();
            if target.names_file && !message.contains(&dir_text) && !(target.unnamed_ok)(&message) {
                Ok(Verdict::Finding(Finding {
                    kind: Kind::Unnamed,
                    message: message.replace(&dir_text, "<dir>"),
                }))
            } else {
                Ok(Verdict::Rejected)
            }
        }
    }
}

/// Settings of one fuzz run of one target.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Seed of the run: the same seed, target and index give the same input.
    pub seed: u64,
    /// Index of the first input (a restarted worker continues after the
    /// input that killed its predecessor).
    pub start: u64,
    /// When to stop.
    pub deadline: Instant,
    /// Stop after this many inputs, whatever the time.
    pub max_inputs: Option<u64>,
    /// Per-input limits.
    pub limits: Limits,
    /// Longest run of one input before it counts as a hang.
    pub exec_timeout: Duration,
    /// `target/fuzz-findings/<target>`.
    pub findings_dir: PathBuf,
    /// Longest input the mutator builds.
    pub max_len: usize,
}

/// What a worker did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Inputs run.
    pub execs: u64,
    /// Inputs accepted by the parser.
    pub accepted: u64,
    /// Inputs rejected with a proper error.
    pub rejected: u64,
    /// Distinct findings (first input of each signature).
    pub findings: Vec<SavedFinding>,
    /// Inputs that were findings, counting repeats of a signature.
    pub finding_inputs: u64,
}

/// A finding and where its input was saved.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedFinding {
    /// Which property and what was seen.
    pub kind: Kind,
    /// The message.
    pub message: String,
    /// Index of the input in the run.
    pub index: u64,
    /// The saved input.
    pub file: PathBuf,
}

/// The file that holds the input being run: its index (8 bytes, little
/// endian) and bytes, so the supervisor can save it when the worker dies.
pub fn current_file(findings_dir: &Path) -> PathBuf {
    findings_dir.join(".current")
}

/// Reads [`current_file`]: `(index, input)`.
pub fn read_current(findings_dir: &Path) -> Option<(u64, Vec<u8>)> {
    let bytes = std::fs::read(current_file(findings_dir)).ok()?;
    let index = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    Some((index, bytes[8..].to_vec()))
}

/// Saves a finding's input as `<kind>-<index>.bin` with a `.txt` beside it
/// saying what broke and how to run it again.
pub fn save_finding(
    findings_dir: &Path,
    target: &str,
    seed: u64,
    index: u64,
    finding: &Finding,
    input: &[u8],
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(findings_dir)?;
    let file = findings_dir.join(format!("{}-{index}.bin", finding.kind.as_str()));
    std::fs::write(&file, input)?;
    std::fs::write(
        file.with_extension("txt"),
        format!(
            "target: {target}\nseed: {seed}\ninput index: {index}\nkind: {}\n{}\n\nrun again: cargo run -p fedsvd-fuzz -- exec --target {target} {}\n",
            finding.kind.as_str(),
            finding.message,
            file.display()
        ),
    )?;
    Ok(file)
}

static EXEC_STARTED_MS: AtomicU64 = AtomicU64::new(0);

/// Exit status of a worker whose watchdog saw an input run too long.
pub const HANG_EXIT: i32 = 86;

/// Starts the thread that ends the process (status [`HANG_EXIT`]) when an
/// input runs longer than `timeout`; the supervisor saves the input from
/// [`current_file`] and starts a fresh worker after it.
fn start_watchdog(timeout: Duration, epoch: Instant) {
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let started = EXEC_STARTED_MS.load(Ordering::Relaxed);
            if started == 0 {
                continue;
            }
            let now = epoch.elapsed().as_millis() as u64 + 1;
            if now.saturating_sub(started) > timeout.as_millis() as u64 {
                eprintln!("fedsvd-fuzz: an input ran longer than {timeout:?}");
                std::process::exit(HANG_EXIT);
            }
        }
    });
}

/// Fuzzes `target` until the deadline: builds each input from the corpus
/// with `mutator`, runs it, and saves the first input of every distinct
/// finding under `settings.findings_dir`.
pub fn fuzz(target: &Target, mutator: &Mutator, settings: &RunSettings) -> std::io::Result<Stats> {
    std::fs::create_dir_all(&settings.findings_dir)?;
    let scratch = tempfile::Builder::new()
        .prefix(&format!("fedsvd-fuzz-{}-", target.name))
        .tempdir()?;
    (target.setup)(scratch.path())?;
    install_quiet_panic_hook();
    let epoch = Instant::now();
    start_watchdog(settings.exec_timeout, epoch);
    let current = current_file(&settings.findings_dir);
    let mut stats = Stats::default();
    let mut seen = HashSet::new();
    let mut index = settings.start;
    let mut record = Vec::new();
    while Instant::now() < settings.deadline && settings.max_inputs.is_none_or(|m| stats.execs < m)
    {
        let input = mutator.input(settings.seed, target.name, index);
        record.clear();
        record.extend_from_slice(&index.to_le_bytes());
        record.extend_from_slice(&input);
        std::fs::write(&current, &record)?;
        EXEC_STARTED_MS.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
        let verdict = run_one(target, scratch.path(), &input, settings.limits)?;
        EXEC_STARTED_MS.store(0, Ordering::Relaxed);
        stats.execs += 1;
        match verdict {
            Verdict::Accepted => stats.accepted += 1,
            Verdict::Rejected => stats.rejected += 1,
            Verdict::Finding(finding) => {
                stats.finding_inputs += 1;
                if seen.insert(finding.signature()) {
                    let file = save_finding(
                        &settings.findings_dir,
                        target.name,
                        settings.seed,
                        index,
                        &finding,
                        &input,
                    )?;
                    stats.findings.push(SavedFinding {
                        kind: finding.kind,
                        message: finding.message,
                        index,
                        file,
                    });
                }
            }
        }
        index += 1;
    }
    let _ = std::fs::remove_file(&current);
    Ok(stats)
}
