//! `cargo xtask bench-gate [--update]`: the instruction-count regression
//! gate. Installs the gungraun-runner matching the pinned gungraun library
//! into `.tools/gungraun/` (once), runs the benchmarks of
//! `crates/fedsvd-bench-gate` under callgrind, and compares each benchmark's
//! instruction count with `crates/fedsvd-bench-gate/baseline.json`.
//!
//! It fails when a benchmark needs more than [`TOLERANCE_PERCENT`] more
//! instructions than its baseline, when a benchmark has no baseline, or when
//! the baseline names a benchmark that no longer exists. `--update` rewrites
//! the baseline from the run instead (commit it with the reason).
//!
//! `--prove` shows that the counts depend on the code alone: it clones the
//! committed HEAD twice, into folders of different names and path lengths,
//! builds each in its own fresh target folder and requires identical counts
//! for every benchmark. It takes two cold builds (tens of minutes on two
//! cores), so it runs here, not in CI.

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// Allowed growth of a benchmark's instruction count over its baseline.
pub const TOLERANCE_PERCENT: f64 = 5.0;

const PACKAGE: &str = "fedsvd-bench-gate";
const BENCH: &str = "gate";
const BASELINE: &str = "crates/fedsvd-bench-gate/baseline.json";
const TOOLS: &str = ".tools/gungraun";

/// Entry point of `cargo xtask bench-gate`.
pub fn bench_gate(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let mut update = false;
    let mut prove = false;
    for a in args {
        match a.as_str() {
            "--update" => update = true,
            "--prove" => prove = true,
            other => bail!("bench-gate: unknown argument `{other}` (--update or --prove)"),
        }
    }
    let started = Instant::now();
    let version = pinned_gungraun(root)?;
    let bin = ensure_runner(root, &version)?;
    if prove {
        return prove_folder_independence(root, &bin);
    }
    let counts = run_benchmarks(root, &bin, false)?;
    let baseline_path = root.join(BASELINE);
    if update {
        write_baseline(&baseline_path, &version, &counts)?;
        println!(
            "bench-gate: wrote {} benchmarks to {BASELINE} in {:.1} s; commit it with the reason",
            counts.len(),
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let baseline = read_baseline(&baseline_path)?;
    let verdict = compare(&baseline.counts, &counts);
    print!("{}", verdict.table);
    for note in baseline.context_notes(&version) {
        println!("note: {note}");
    }
    println!(
        "bench-gate: {} benchmarks in {:.1} s",
        counts.len(),
        started.elapsed().as_secs_f64()
    );
    if !verdict.failures.is_empty() {
        for f in &verdict.failures {
            eprintln!("bench-gate: {f}");
        }
        bail!(
            "the instruction-count gate failed ({} problem(s), see the table above)",
            verdict.failures.len()
        );
    }
    Ok(())
}

/// The exact gungraun version in Cargo.lock: the runner must match the
/// library the benchmark is linked with, or it refuses to run.
fn pinned_gungraun(root: &Path) -> anyhow::Result<String> {
    let lock = fs::read_to_string(root.join("Cargo.lock")).context("cannot read Cargo.lock")?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "name = \"gungraun\""
            && let Some(v) = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("version = \""))
                .and_then(|l| l.strip_suffix('"'))
        {
            return Ok(v.to_string());
        }
    }
    bail!("Cargo.lock has no gungraun package; is fedsvd-bench-gate a workspace member?")
}

/// The runner's bin folder, after installing the runner if it is missing or
/// of another version.
fn ensure_runner(root: &Path, version: &str) -> anyhow::Result<PathBuf> {
    let tools = root.join(TOOLS);
    let bin = tools.join("bin");
    let runner = bin.join("gungraun-runner");
    let installed = Command::new(&runner)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(v) = &installed {
        if v.split_whitespace().last() == Some(version) {
            return Ok(bin);
        }
        println!("bench-gate: {} has `{v}`, need {version}", runner.display());
    }
    println!("==> installing gungraun-runner {version} into {TOOLS} (once; takes minutes)");
    let started = Instant::now();
    let status = Command::new("cargo")
        .args(["install", "gungraun-runner", "--locked", "--force"])
        .args(["--version", version])
        .arg("--root")
        .arg(&tools)
        // Build in cargo's temporary folder, not in the workspace's target:
        // the runner is a release build that nothing else shares.
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!("cargo install gungraun-runner {version} failed ({status})");
    }
    println!(
        "<== gungraun-runner installed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(bin)
}

/// Clones HEAD into two differently named folders, counts every benchmark in
/// each with its own fresh build, and fails unless the counts are equal.
fn prove_folder_independence(root: &Path, runner_bin: &Path) -> anyhow::Result<()> {
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(root)
        .output()
        .context("cannot run git status")?;
    if !dirty.stdout.is_empty() {
        println!(
            "bench-gate --prove: note: uncommitted changes are not part of the proof (it clones HEAD)"
        );
    }
    let base = env::temp_dir().join("fedsvd-gate-proof");
    let clones = [
        base.join("a"),
        base.join("a-second-folder-with-a-much-longer-name")
            .join("clone"),
    ];
    let mut runs = Vec::new();
    for dir in &clones {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        if let Some(parent) = dir.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let status = Command::new("git")
            .args(["clone", "--quiet"])
            .arg(root)
            .arg(dir)
            .status()
            .context("cannot run git clone")?;
        if !status.success() {
            bail!("git clone into {} failed ({status})", dir.display());
        }
        println!(
            "==> bench-gate --prove: fresh clone and build in {}",
            dir.display()
        );
        runs.push(run_benchmarks(dir, runner_bin, true)?);
    }
    let mut differ = Vec::new();
    println!(
        "| benchmark | {} | {} |",
        clones[0].display(),
        clones[1].display()
    );
    println!("|---|---:|---:|");
    for (id, a) in &runs[0] {
        let b = runs[1].get(id).copied();
        println!(
            "| {id} | {a} | {} |",
            b.map_or("missing".into(), |b| b.to_string())
        );
        if b != Some(*a) {
            differ.push(id.clone());
        }
    }
    if runs[0].len() != runs[1].len() {
        differ.push("(different benchmark lists)".into());
    }
    if !differ.is_empty() {
        bail!(
            "the counts depend on the build folder: {} differ between the two clones",
            differ.join(", ")
        );
    }
    println!(
        "bench-gate --prove: {} benchmarks, identical counts in both clones",
        runs[0].len()
    );
    Ok(())
}

/// Builds and runs the benchmarks in the workspace at `root`; returns
/// instructions per benchmark id. `isolated`: build in `root`'s own
/// `target/`, whatever CARGO_TARGET_DIR says.
fn run_benchmarks(
    root: &Path,
    runner_bin: &Path,
    isolated: bool,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let path = match env::var_os("PATH") {
        Some(p) => {
            let mut dirs = vec![runner_bin.to_path_buf()];
            dirs.extend(env::split_paths(&p));
            env::join_paths(dirs).context("PATH has an entry that cannot be joined")?
        }
        None => runner_bin.as_os_str().to_owned(),
    };
    // The dev profile (opt-level 3 here) is the one the tests and the asset
    // fetch already built, so CI compiles only this crate and gungraun again,
    // not the whole dependency tree in the release profile.
    let args = [
        "bench",
        "--profile",
        "dev",
        "--package",
        PACKAGE,
        "--bench",
        BENCH,
        "--",
        "--output-format=json",
    ];
    println!(
        "==> benchmarks under callgrind: cargo {} (one line per benchmark follows)",
        args.join(" ")
    );
    let started = Instant::now();
    let mut command = Command::new("cargo");
    command
        .args(args)
        .current_dir(root)
        .env("PATH", path)
        .stderr(Stdio::inherit());
    if isolated {
        command.env_remove("CARGO_TARGET_DIR");
    }
    let output = command.output().context("cannot run cargo bench")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        print!("{stdout}");
        bail!("the benchmarks failed ({})", output.status);
    }
    let mut counts = BTreeMap::new();
    for line in stdout.lines().filter(|l| l.trim_start().starts_with('{')) {
        let summary: Value = serde_json::from_str(line)
            .with_context(|| format!("gungraun printed a line that is not JSON: {line}"))?;
        let (id, instructions) = instructions(&summary)?;
        println!(
            "    {id}: {instructions} instructions ({:.1} s)",
            summary["duration_ns"].as_u64().unwrap_or(0) as f64 / 1e9
        );
        if counts.insert(id.clone(), instructions).is_some() {
            bail!("two benchmarks are called `{id}`");
        }
    }
    if counts.is_empty() {
        bail!("the benchmarks printed no results");
    }
    println!(
        "<== benchmarks: {} in {:.1} s",
        counts.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(counts)
}

/// The id and total instruction count (Ir) of one gungraun summary, checking
/// that the work ran in one thread of one process: the gate's counts are
/// only reproducible when nothing depends on scheduling.
fn instructions(summary: &Value) -> anyhow::Result<(String, u64)> {
    let id = summary["id"]
        .as_str()
        .or_else(|| summary["function_name"].as_str())
        .context("a gungraun summary without id")?
        .to_string();
    let profile = summary["profiles"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["tool"] == "Callgrind"))
        .with_context(|| format!("{id}: no Callgrind profile in the summary"))?;
    let ir = |metrics: &Value| -> Option<u64> { metric_value(&metrics["Ir"]) };
    let total = ir(&profile["data"]["total"]["metrics"])
        .with_context(|| format!("{id}: no instruction count (Ir) in the summary"))?;
    let busy = profile["data"]["parts"].as_array().map_or(0, |parts| {
        parts
            .iter()
            .filter(|p| ir(&p["metrics"]).is_some_and(|v| v > 0))
            .count()
    });
    if busy > 1 {
        bail!(
            "{id}: instructions were counted in {busy} threads or processes; a gate workload \
             must run on the measured thread only (see fedsvd_bench_gate::prepare)"
        );
    }
    Ok((id, total))
}

/// The value of this run of one metric as gungraun (summary format 7)
/// serializes it: `{"values": {"new": n}}`, with `"old"` beside `"new"`
/// when gungraun kept an earlier run to compare with.
fn metric_value(v: &Value) -> Option<u64> {
    let new = &v["values"]["new"];
    new.as_u64()
        .or_else(|| new.as_f64().filter(|f| *f >= 0.0).map(|f| f.round() as u64))
}

struct Baseline {
    counts: BTreeMap<String, u64>,
    gungraun: Option<String>,
    rustc: Option<String>,
    valgrind: Option<String>,
}

impl Baseline {
    /// Differences in the toolchain since the baseline was recorded: they
    /// move counts without any code change, so they are worth a line.
    fn context_notes(&self, gungraun: &str) -> Vec<String> {
        let mut notes = Vec::new();
        let now = [
            ("gungraun", Some(gungraun.to_string()), &self.gungraun),
            ("rustc", tool_version("rustc"), &self.rustc),
            ("valgrind", tool_version("valgrind"), &self.valgrind),
        ];
        for (what, now, then) in now {
            if let (Some(now), Some(then)) = (now, then)
                && &now != then
            {
                notes.push(format!(
                    "the baseline was recorded with {what} `{then}`, this run used `{now}`"
                ));
            }
        }
        notes
    }
}

fn tool_version(program: &str) -> Option<String> {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn read_baseline(path: &Path) -> anyhow::Result<Baseline> {
    let text = fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the baseline {}; record one with `cargo xtask bench-gate --update`",
            path.display()
        )
    })?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let mut counts = BTreeMap::new();
    for (name, n) in v["instructions"]
        .as_object()
        .with_context(|| format!("{} has no `instructions` object", path.display()))?
    {
        let n = n
            .as_u64()
            .with_context(|| format!("{}: `{name}` is not a count", path.display()))?;
        counts.insert(name.clone(), n);
    }
    let text_of = |key: &str| v["recorded_with"][key].as_str().map(str::to_string);
    Ok(Baseline {
        counts,
        gungraun: text_of("gungraun"),
        rustc: text_of("rustc"),
        valgrind: text_of("valgrind"),
    })
}

fn write_baseline(
    path: &Path,
    gungraun: &str,
    counts: &BTreeMap<String, u64>,
) -> anyhow::Result<()> {
    let doc = json!({
        "about": "Instructions (callgrind Ir) per benchmark of benches/gate.rs, dev profile, \
                  one thread. Written by `cargo xtask bench-gate --update`; \
                  the gate fails above +5 %.",
        "recorded_with": {
            "gungraun": gungraun,
            "rustc": tool_version("rustc"),
            "valgrind": tool_version("valgrind"),
        },
        "instructions": counts,
    });
    let text = serde_json::to_string_pretty(&doc)? + "\n";
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The table and the reasons to fail.
struct Verdict {
    table: String,
    failures: Vec<String>,
}

fn compare(baseline: &BTreeMap<String, u64>, now: &BTreeMap<String, u64>) -> Verdict {
    let mut rows: Vec<[String; 5]> = Vec::new();
    let mut failures = Vec::new();
    for (name, &n) in now {
        match baseline.get(name) {
            Some(&b) => {
                let change = if b == 0 {
                    if n == 0 { 0.0 } else { f64::INFINITY }
                } else {
                    (n as f64 - b as f64) / b as f64 * 100.0
                };
                let status = if change > TOLERANCE_PERCENT {
                    failures.push(format!(
                        "`{name}` got slower: {n} instructions vs {b} in the baseline \
                         ({change:+.2} %, limit +{TOLERANCE_PERCENT} %)"
                    ));
                    "SLOWER"
                } else if change < -TOLERANCE_PERCENT {
                    "faster (update?)"
                } else {
                    "ok"
                };
                rows.push([
                    name.clone(),
                    b.to_string(),
                    n.to_string(),
                    format!("{change:+.2} %"),
                    status.into(),
                ]);
            }
            None => {
                failures.push(format!(
                    "`{name}` has no baseline: record it with `cargo xtask bench-gate --update` \
                     and commit {BASELINE}"
                ));
                rows.push([
                    name.clone(),
                    "-".into(),
                    n.to_string(),
                    "-".into(),
                    "NO BASELINE".into(),
                ]);
            }
        }
    }
    for (name, &b) in baseline {
        if !now.contains_key(name) {
            failures.push(format!(
                "`{name}` is in the baseline but was not measured: if it was removed on \
                 purpose, drop it with `cargo xtask bench-gate --update`"
            ));
            rows.push([
                name.clone(),
                b.to_string(),
                "-".into(),
                "-".into(),
                "NOT RUN".into(),
            ]);
        }
    }
    let header = ["benchmark", "baseline", "now", "change", "status"];
    let mut width = header.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut table = String::new();
    let line = |cells: [&str; 5], table: &mut String| {
        let _ = writeln!(
            table,
            "| {:<w0$} | {:>w1$} | {:>w2$} | {:>w3$} | {:<w4$} |",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
            w4 = width[4],
        );
    };
    line(header, &mut table);
    let rule = width.map(|w| "-".repeat(w));
    line(
        [&rule[0], &rule[1], &rule[2], &rule[3], &rule[4]],
        &mut table,
    );
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4]], &mut table);
    }
    Verdict { table, failures }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, u64)]) -> BTreeMap<String, u64> {
        entries.iter().map(|&(k, v)| (k.to_string(), v)).collect()
    }

    #[test]
    fn passes_within_tolerance_and_fails_above() {
        let base = map(&[("a", 1000), ("b", 1000)]);
        assert!(
            compare(&base, &map(&[("a", 1050), ("b", 900)]))
                .failures
                .is_empty()
        );
        let v = compare(&base, &map(&[("a", 1051), ("b", 1000)]));
        assert_eq!(v.failures.len(), 1);
        assert!(v.failures[0].contains("`a`"));
        assert!(v.table.contains("SLOWER") && v.table.contains("+5.10 %"));
    }

    #[test]
    fn missing_and_stale_benchmarks_fail() {
        let v = compare(&map(&[("old", 5)]), &map(&[("new", 5)]));
        assert_eq!(v.failures.len(), 2);
        assert!(
            v.failures
                .iter()
                .any(|f| f.contains("--update") && f.contains("`new`"))
        );
        assert!(v.table.contains("NO BASELINE") && v.table.contains("NOT RUN"));
    }

    #[test]
    fn reads_gungraun_metric_shapes() {
        assert_eq!(metric_value(&json!({"values": {"new": 7}})), Some(7));
        assert_eq!(
            metric_value(&json!({"values": {"new": 9, "old": 8}, "diffs": {}})),
            Some(9)
        );
        assert_eq!(metric_value(&json!({"values": {"old": 9}})), None);
    }

    #[test]
    fn rejects_work_counted_on_two_threads() {
        let part = |n: u64| json!({"metrics": {"Ir": {"values": {"new": n}}}});
        let summary = |parts: Vec<Value>| {
            json!({"id": "x", "profiles": [{"tool": "Callgrind", "data": {
                "parts": parts,
                "total": {"metrics": {"Ir": {"values": {"new": 10}}}}
            }}]})
        };
        assert_eq!(
            instructions(&summary(vec![part(10), part(0)])).unwrap(),
            ("x".to_string(), 10)
        );
        assert!(instructions(&summary(vec![part(6), part(4)])).is_err());
    }
}
