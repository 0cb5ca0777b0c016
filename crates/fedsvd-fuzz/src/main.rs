//! `fedsvd-fuzz`: runs the fuzz targets (see the crate's README).
//!
//! The supervisor starts one worker process per target; a worker fuzzes
//! until its deadline and prints its statistics as one JSON line. A worker
//! that dies (an abort from a refused allocation, a stack overflow, a hang
//! its watchdog ended) leaves the input it was running in
//! `<findings>/<target>/.current`; the supervisor saves that input as a
//! finding and starts a new worker after it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use fedsvd_fuzz::harness::{
    self, Finding, HANG_EXIT, Kind, Limits, RunSettings, SavedFinding, Stats, read_current,
    save_finding,
};
use fedsvd_fuzz::{Target, Verdict, alloc, default_corpus_dir, mutator_for, seeds, targets};

/// Single allocations above the cap are refused while an input runs.
#[global_allocator]
static ALLOCATOR: alloc::CapAlloc = alloc::CapAlloc::new();

const USAGE: &str = "\
fedsvd-fuzz: coverage-less mutational fuzzing of fedsvd's parsers

usage:
  fedsvd-fuzz [run] [--seconds N] [--seed S] [--target NAME]... [options]
      fuzz every target (or those named) for N seconds each (default 10)
  fedsvd-fuzz exec --target NAME FILE...     run files through a target
  fedsvd-fuzz minimize --target NAME FILE [--out FILE]
      shrink an input while it still breaks the same property
  fedsvd-fuzz gen-corpus [--corpus DIR]      (re)write the generated seeds
  fedsvd-fuzz list                           the targets

options:
  --alloc-cap-mib M     refuse single allocations above M MiB (default 256)
  --exec-timeout-ms T   an input running longer is a hang (default 10000)
  --max-inputs N        stop each target after N inputs
  --findings DIR        where findings go (default target/fuzz-findings)
  --corpus DIR          seed corpus root (default crates/fedsvd-fuzz/corpus)
";

#[derive(Debug, Clone)]
struct Options {
    command: String,
    seconds: f64,
    seed: u64,
    targets: Vec<String>,
    alloc_cap: usize,
    exec_timeout: Duration,
    max_inputs: Option<u64>,
    findings: PathBuf,
    corpus: PathBuf,
    start: u64,
    files: Vec<PathBuf>,
    out: Option<PathBuf>,
}

fn default_findings_dir() -> PathBuf {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target_dir.join("fuzz-findings")
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        command: "run".into(),
        seconds: 10.0,
        seed: 0x5eed,
        targets: Vec::new(),
        alloc_cap: alloc::DEFAULT_CAP,
        exec_timeout: Duration::from_secs(10),
        max_inputs: None,
        findings: default_findings_dir(),
        corpus: default_corpus_dir(),
        start: 0,
        files: Vec::new(),
        out: None,
    };
    let mut it = args.iter();
    let mut first = true;
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let number = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name} {v:?}: not a whole number"))
        };
        match arg.as_str() {
            "run" | "worker" | "exec" | "minimize" | "gen-corpus" | "list" | "help" if first => {
                o.command = arg.clone();
            }
            "--seconds" => {
                let v = value(arg)?;
                o.seconds = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .ok_or_else(|| format!("--seconds {v:?}: not a number of seconds"))?;
            }
            "--seed" => o.seed = number(arg, value(arg)?)?,
            "--target" => o.targets.push(value(arg)?),
            "--alloc-cap-mib" => o.alloc_cap = (number(arg, value(arg)?)? as usize) << 20,
            "--exec-timeout-ms" => {
                o.exec_timeout = Duration::from_millis(number(arg, value(arg)?)?)
            }
            "--max-inputs" => o.max_inputs = Some(number(arg, value(arg)?)?),
            "--findings" => o.findings = PathBuf::from(value(arg)?),
            "--corpus" => o.corpus = PathBuf::from(value(arg)?),
            "--start" => o.start = number(arg, value(arg)?)?,
            "--out" => o.out = Some(PathBuf::from(value(arg)?)),
            "-h" | "--help" => o.command = "help".into(),
            other if other.starts_with("--") => return Err(format!("unknown option {other}")),
            other => o.files.push(PathBuf::from(other)),
        }
        first = false;
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fedsvd-fuzz: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match options.command.as_str() {
        "run" => supervise(&options),
        "worker" => worker(&options),
        "exec" => exec(&options),
        "minimize" => minimize(&options),
        "gen-corpus" => gen_corpus(&options),
        "list" => {
            for t in targets::all() {
                println!("{:14} {}", t.name, t.about);
            }
            Ok(true)
        }
        _ => {
            print!("{USAGE}");
            Ok(true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("fedsvd-fuzz: {e}");
            ExitCode::from(2)
        }
    }
}

fn chosen_targets(options: &Options) -> Result<Vec<Target>, String> {
    if options.targets.is_empty() {
        return Ok(targets::all());
    }
    options
        .targets
        .iter()
        .map(|n| {
            targets::by_name(n).ok_or_else(|| {
                let known: Vec<&str> = targets::all().iter().map(|t| t.name).collect();
                format!("unknown target `{n}`; known: {}", known.join(", "))
            })
        })
        .collect()
}

fn one_target(options: &Options) -> Result<Target, String> {
    match chosen_targets(options)?.as_slice() {
        [t] if !options.targets.is_empty() => Ok(*t),
        _ => Err("name exactly one --target".into()),
    }
}

fn corpus_of(options: &Options, target: &Target) -> Result<Vec<Vec<u8>>, String> {
    let entries = seeds::read_corpus(&options.corpus, target.name)
        .map_err(|e| format!("reading the corpus of {}: {e}", target.name))?;
    Ok(entries.into_iter().map(|(_, b)| b).collect())
}

fn kind_name(kind: Kind) -> &'static str {
    kind.as_str()
}

fn stats_json(target: &str, stats: &Stats) -> String {
    let findings: Vec<serde_json::Value> = stats
        .findings
        .iter()
        .map(|f| {
            serde_json::json!({
                "kind": kind_name(f.kind),
                "message": f.message,
                "index": f.index,
                "file": f.file,
            })
        })
        .collect();
    serde_json::json!({
        "target": target,
        "execs": stats.execs,
        "accepted": stats.accepted,
        "rejected": stats.rejected,
        "finding_inputs": stats.finding_inputs,
        "findings": findings,
    })
    .to_string()
}

fn parse_stats(line: &str) -> Option<Stats> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let findings = v
        .get("findings")?
        .as_array()?
        .iter()
        .filter_map(|f| {
            Some(SavedFinding {
                kind: Kind::from_name(f.get("kind")?.as_str()?)?,
                message: f.get("message")?.as_str()?.to_owned(),
                index: f.get("index")?.as_u64()?,
                file: PathBuf::from(f.get("file")?.as_str()?),
            })
        })
        .collect();
    Some(Stats {
        execs: n("execs"),
        accepted: n("accepted"),
        rejected: n("rejected"),
        finding_inputs: n("finding_inputs"),
        findings,
    })
}

/// The worker: fuzzes one target in this process until the deadline.
fn worker(options: &Options) -> Result<bool, String> {
    let target = one_target(options)?;
    let mutator = mutator_for(&target, corpus_of(options, &target)?);
    let settings = RunSettings {
        seed: options.seed,
        start: options.start,
        deadline: Instant::now() + Duration::from_secs_f64(options.seconds),
        max_inputs: options.max_inputs,
        limits: Limits {
            alloc_cap: options.alloc_cap,
        },
        exec_timeout: options.exec_timeout,
        findings_dir: options.findings.join(target.name),
        max_len: fedsvd_fuzz::MAX_INPUT_LEN,
    };
    let stats = harness::fuzz(&target, &mutator, &settings).map_err(|e| e.to_string())?;
    println!("{}", stats_json(target.name, &stats));
    Ok(stats.findings.is_empty())
}

/// Totals of one target over its workers.
#[derive(Default)]
struct Totals {
    stats: Stats,
    seconds: f64,
    workers: usize,
}

/// The line of a dead worker's error output that says why (an allocation
/// failure, a stack overflow, a panic), else its last lines.
fn why_it_died(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .find(|l| {
            l.contains("memory allocation of")
                || l.contains("overflow")
                || l.contains("panicked")
                || l.contains("longer than")
        })
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|| tail(stderr, 3))
}

fn tail(text: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(text);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// Runs one target's workers until its time is spent.
fn supervise_target(options: &Options, target: &Target) -> Result<Totals, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    let findings_dir = options.findings.join(target.name);
    let started = Instant::now();
    let budget = Duration::from_secs_f64(options.seconds);
    let mut totals = Totals::default();
    let mut signatures: Vec<String> = Vec::new();
    let mut start = 0u64;
    loop {
        let left = budget.saturating_sub(started.elapsed());
        if totals.workers > 0 && left.is_zero() {
            break;
        }
        let done = totals.stats.execs;
        if options.max_inputs.is_some_and(|m| done >= m) {
            break;
        }
        let mut cmd = Command::new(&exe);
        cmd.env("RUST_BACKTRACE", "0")
            .arg("worker")
            .args(["--target", target.name])
            .args(["--seed", &options.seed.to_string()])
            .args(["--start", &start.to_string()])
            .args(["--seconds", &format!("{:.3}", left.as_secs_f64())])
            .args(["--alloc-cap-mib", &(options.alloc_cap >> 20).to_string()])
            .args([
                "--exec-timeout-ms",
                &options.exec_timeout.as_millis().to_string(),
            ])
            .arg("--findings")
            .arg(&options.findings)
            .arg("--corpus")
            .arg(&options.corpus);
        if let Some(m) = options.max_inputs {
            cmd.args(["--max-inputs", &(m - done).to_string()]);
        }
        totals.workers += 1;
        let output = cmd
            .output()
            .map_err(|e| format!("starting a worker for {}: {e}", target.name))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if let Some(stats) = stdout.lines().rev().find_map(parse_stats) {
            totals.stats.execs += stats.execs;
            totals.stats.accepted += stats.accepted;
            totals.stats.rejected += stats.rejected;
            totals.stats.finding_inputs += stats.finding_inputs;
            for f in stats.findings {
                let sig = Finding {
                    kind: f.kind,
                    message: f.message.clone(),
                }
                .signature();
                if !signatures.contains(&sig) {
                    signatures.push(sig);
                    totals.stats.findings.push(f);
                }
            }
            if output.status.success() || output.status.code() == Some(1) {
                break;
            }
        }
        // The worker died: save the input it was running, carry on after it.
        let Some((index, input)) = read_current(&findings_dir) else {
            return Err(format!(
                "the worker of {} failed before running an input ({}): {}",
                target.name,
                output.status,
                tail(&output.stderr, 5)
            ));
        };
        totals.stats.execs += index + 1 - start;
        totals.stats.finding_inputs += 1;
        let kind = if output.status.code() == Some(HANG_EXIT) {
            Kind::Hang
        } else {
            Kind::Crash
        };
        let message = match kind {
            Kind::Hang => format!("ran longer than {:?}", options.exec_timeout),
            _ => format!(
                "worker died ({}): {}",
                output.status,
                why_it_died(&output.stderr)
            ),
        };
        let finding = Finding { kind, message };
        let sig = finding.signature();
        if !signatures.contains(&sig) {
            signatures.push(sig);
            let file = save_finding(
                &findings_dir,
                target.name,
                options.seed,
                index,
                &finding,
                &input,
            )
            .map_err(|e| format!("saving a finding: {e}"))?;
            totals.stats.findings.push(SavedFinding {
                kind: finding.kind,
                message: finding.message,
                index,
                file,
            });
        }
        let _ = std::fs::remove_file(harness::current_file(&findings_dir));
        start = index + 1;
    }
    totals.seconds = started.elapsed().as_secs_f64();
    Ok(totals)
}

/// Fuzzes every chosen target; `Ok(false)` when anything was found.
fn supervise(options: &Options) -> Result<bool, String> {
    let chosen = chosen_targets(options)?;
    println!(
        "fedsvd-fuzz: {} target(s), {} s each, seed {}, allocation cap {} MiB",
        chosen.len(),
        options.seconds,
        options.seed,
        options.alloc_cap >> 20
    );
    println!(
        "{:14} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "target", "inputs", "inputs/s", "accepted", "rejected", "findings"
    );
    let mut clean = true;
    let mut all_findings = Vec::new();
    let started = Instant::now();
    for target in &chosen {
        let t = supervise_target(options, target)?;
        let s = &t.stats;
        println!(
            "{:14} {:>9} {:>9.0} {:>9} {:>9} {:>8}",
            target.name,
            s.execs,
            s.execs as f64 / t.seconds.max(1e-9),
            s.accepted,
            s.rejected,
            s.findings.len()
        );
        for f in &s.findings {
            all_findings.push((target.name, f.clone()));
        }
        clean &= s.findings.is_empty();
    }
    println!("total: {:.1} s", started.elapsed().as_secs_f64());
    for (target, f) in &all_findings {
        println!(
            "FINDING {target} [{}] input {}: {}\n  saved: {}",
            f.kind.as_str(),
            f.index,
            f.message,
            f.file.display()
        );
    }
    Ok(clean)
}

/// Runs files through one target and prints each verdict.
fn exec(options: &Options) -> Result<bool, String> {
    let target = one_target(options)?;
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    (target.setup)(scratch.path()).map_err(|e| format!("setting up {}: {e}", target.name))?;
    harness::install_quiet_panic_hook();
    let limits = Limits {
        alloc_cap: options.alloc_cap,
    };
    let mut clean = true;
    for file in &options.files {
        let input = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let verdict =
            harness::run_one(&target, scratch.path(), &input, limits).map_err(|e| e.to_string())?;
        match verdict {
            Verdict::Accepted => println!("{}: accepted", file.display()),
            Verdict::Rejected => {
                let why = (target.run)(scratch.path(), &input)
                    .err()
                    .unwrap_or_default();
                println!("{}: rejected: {why}", file.display());
            }
            Verdict::Finding(f) => {
                clean = false;
                println!(
                    "{}: FINDING {}: {}",
                    file.display(),
                    f.kind.as_str(),
                    f.message
                );
            }
        }
    }
    Ok(clean)
}

/// The finding kind of `input` on `target`, run in a child process so an
/// abort or a hang is seen too (`None`: no finding).
fn finding_kind(
    options: &Options,
    target: &Target,
    input: &[u8],
) -> Result<Option<String>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let tmp = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    std::fs::write(tmp.path(), input).map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["exec", "--target", target.name])
        .args(["--alloc-cap-mib", &(options.alloc_cap >> 20).to_string()])
        .arg(tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let mut out = String::new();
            if let Some(mut s) = child.stdout.take() {
                use std::io::Read;
                let _ = s.read_to_string(&mut out);
            }
            return Ok(match status.code() {
                Some(0) => None,
                Some(1) => out
                    .split("FINDING ")
                    .nth(1)
                    .and_then(|r| r.split(':').next())
                    .map(str::to_owned),
                _ => Some("crash".to_owned()),
            });
        }
        if started.elapsed() > options.exec_timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Some("hang".to_owned()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Shrinks an input by deleting ever smaller chunks while the same kind of
/// finding reproduces.
fn minimize(options: &Options) -> Result<bool, String> {
    let target = one_target(options)?;
    let [file] = options.files.as_slice() else {
        return Err("minimize takes one FILE".into());
    };
    let mut input = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let Some(want) = finding_kind(options, &target, &input)? else {
        return Err(format!(
            "{} is no finding on {}",
            file.display(),
            target.name
        ));
    };
    let mut chunk = (input.len() / 2).max(1);
    loop {
        let mut at = 0;
        while at < input.len() {
            let mut candidate = input.clone();
            candidate.drain(at..(at + chunk).min(input.len()));
            if finding_kind(options, &target, &candidate)?.as_deref() == Some(want.as_str()) {
                input = candidate;
            } else {
                at += chunk;
            }
        }
        if chunk == 1 {
            break;
        }
        chunk /= 2;
    }
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| file.with_extension("min"));
    std::fs::write(&out, &input).map_err(|e| format!("{}: {e}", out.display()))?;
    println!(
        "{want}: {} bytes -> {} bytes in {}",
        std::fs::metadata(file).map(|m| m.len()).unwrap_or(0),
        input.len(),
        out.display()
    );
    Ok(true)
}

fn gen_corpus(options: &Options) -> Result<bool, String> {
    let names: Vec<&str> = targets::all().iter().map(|t| t.name).collect();
    let n = seeds::write_corpus(&options.corpus, &names).map_err(|e| e.to_string())?;
    println!("wrote {n} seeds under {}", options.corpus.display());
    Ok(true)
}
