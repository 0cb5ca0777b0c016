//! `fedsvd report RUN_DIR...`: results tables and accuracy plots from
//! finished run folders (also written by `fedsvd compare` after its grid).
//!
//! A run folder is finished when it holds `summary.json`; its per-round
//! `metrics.jsonl` gives the accuracy curves. Only the fields used here are
//! read, so the runner may add fields freely.

pub(crate) mod plot;
pub(crate) mod stats;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;

pub use stats::Summary;

/// Options of `fedsvd report`.
#[derive(Debug, Args)]
// The subcommand's doc comment in main.rs sets its about text; this text
// goes after the options so that it survives that.
#[command(
    after_help = "Write results.md, results.csv, accuracy.svg and accuracy.png from \
finished run folders.\n\nEach RUN_DIR is a run folder (it holds summary.json, metrics.jsonl or \
config.json) or a folder containing run folders, such as the output folder of `fedsvd compare` \
(its runs/* are found up to three levels down). Run folders without summary.json are unfinished: \
they are skipped with a warning and counted in results.md. Runs are grouped by ε (one table and \
one plot panel per ε, non-private ∞ last) and by method (one row and one line per method); final \
accuracy is the mean over seeds ± the half-width of the 95 % Student-t interval (n − 1 degrees \
of freedom)."
)]
pub struct ReportArgs {
    /// Run folders, or folders that contain run folders (searched up to
    /// three levels down, e.g. a `fedsvd compare` output with runs/*).
    #[arg(value_name = "RUN_DIR", required = true)]
    run_dirs: Vec<PathBuf>,
    /// Folder to write the results into (created if missing). Default: the
    /// deepest folder that contains every RUN_DIR given (a single folder of
    /// runs is its own output folder; a single run folder writes beside
    /// itself), or the current directory when they share only the
    /// filesystem root.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Paths of the files a report wrote, and what went into it.
#[derive(Debug, Clone)]
pub struct ReportFiles {
    /// Markdown tables, one per ε.
    pub results_md: PathBuf,
    /// One row per (ε, method).
    pub results_csv: PathBuf,
    /// Accuracy against round, one panel per ε (vector).
    pub accuracy_svg: PathBuf,
    /// The same plot as a bitmap.
    pub accuracy_png: PathBuf,
    /// Finished run folders that went into the report.
    pub runs: usize,
    /// Unfinished run folders (no summary.json) that were skipped.
    pub skipped: Vec<PathBuf>,
}

/// `fedsvd report`: expands the arguments, writes the report, prints the
/// file names.
pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let run_dirs = expand_run_dirs(&args.run_dirs)?;
    let out = match args.out {
        Some(out) => out,
        None => default_out_dir(&args.run_dirs)?,
    };
    let files = write_report(&run_dirs, &out)?;
    print_files(&files);
    Ok(())
}

/// Writes the report of a `fedsvd compare` output folder into that folder,
/// from every run folder below it, and prints the file names. This is what
/// `compare` calls once its grid is done.
pub fn write_compare_report(compare_dir: &Path) -> anyhow::Result<ReportFiles> {
    let run_dirs = expand_run_dirs(&[compare_dir.to_path_buf()])?;
    let files = write_report(&run_dirs, compare_dir)?;
    print_files(&files);
    Ok(files)
}

fn print_files(files: &ReportFiles) {
    println!(
        "report of {} finished run{} ({} unfinished skipped):",
        files.runs,
        if files.runs == 1 { "" } else { "s" },
        files.skipped.len()
    );
    for path in [
        &files.results_md,
        &files.results_csv,
        &files.accuracy_svg,
        &files.accuracy_png,
    ] {
        println!("  {}", path.display());
    }
}

/// How deep below a RUN_DIR argument run folders are looked for: a compare
/// output keeps them in `runs/NAME`, and one more level leaves room for a
/// folder of such outputs.
const SEARCH_DEPTH: usize = 3;

/// A folder is a run folder when it holds any file the runner writes first.
fn is_run_dir(dir: &Path) -> bool {
    ["summary.json", "metrics.jsonl", "config.json"]
        .iter()
        .any(|f| dir.join(f).is_file())
}

/// Replaces each argument that is not itself a run folder by the run
/// folders below it (sorted, so that reports do not depend on directory
/// order); duplicates are dropped.
pub fn expand_run_dirs(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for input in inputs {
        if !input.is_dir() {
            bail!("{}: not a folder", input.display());
        }
        let mut found = Vec::new();
        collect_run_dirs(input, SEARCH_DEPTH, &mut found)?;
        if found.is_empty() {
            bail!(
                "{}: no run folders in it (a run folder holds summary.json, metrics.jsonl or config.json)",
                input.display()
            );
        }
        for dir in found {
            let key = fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
            if seen.insert(key) {
                out.push(dir);
            }
        }
    }
    Ok(out)
}

fn collect_run_dirs(dir: &Path, depth: usize, found: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if is_run_dir(dir) {
        found.push(dir.to_path_buf());
        return Ok(());
    }
    if depth == 0 {
        return Ok(());
    }
    let mut children = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if entry.path().is_dir() {
            children.push(entry.path());
        }
    }
    children.sort();
    for child in children {
        collect_run_dirs(&child, depth - 1, found)?;
    }
    Ok(())
}

/// The default output folder (see `--out`).
fn default_out_dir(inputs: &[PathBuf]) -> anyhow::Result<PathBuf> {
    let mut common: Option<PathBuf> = None;
    for input in inputs {
        let abs = fs::canonicalize(input).with_context(|| format!("{}", input.display()))?;
        // A lone run folder writes beside itself, not into itself, so that
        // the report never mixes with a run's own files.
        let base = if is_run_dir(&abs) {
            abs.parent().map(Path::to_path_buf).unwrap_or(abs)
        } else {
            abs
        };
        common = Some(match common {
            None => base,
            Some(c) => common_ancestor(&c, &base),
        });
    }
    match common {
        Some(c) if c.parent().is_some() => Ok(c),
        _ => std::env::current_dir().context("the current directory"),
    }
}

fn common_ancestor(a: &Path, b: &Path) -> PathBuf {
    a.components()
        .zip(b.components())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect()
}

/// The fields of `summary.json` a report uses.
#[derive(Debug, Deserialize)]
struct SummaryFile {
    method: String,
    /// Present but `null` for a non-private run; a missing key is an error
    /// rather than silently "non-private".
    #[serde(deserialize_with = "Option::<f64>::deserialize")]
    epsilon: Option<f64>,
    #[serde(default)]
    delta: Option<f64>,
    seed: u64,
    final_accuracy: f64,
    #[serde(default)]
    majority_accuracy: Option<f64>,
    #[serde(default)]
    max_epsilon_spent: Option<f64>,
    #[serde(default)]
    mean_bytes_uploaded_per_round: Option<f64>,
    #[serde(default)]
    mean_server_seconds: Option<f64>,
    #[serde(default)]
    dataset: Option<String>,
    #[serde(default)]
    wall_seconds: Option<f64>,
}

/// The fields of one `metrics.jsonl` line a report uses.
#[derive(Debug, Deserialize)]
struct MetricsLine {
    round: u32,
    #[serde(default)]
    eval_accuracy: Option<f64>,
}

/// One finished run as the report sees it.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub(crate) dir: PathBuf,
    pub(crate) method: String,
    pub(crate) epsilon: Option<f64>,
    pub(crate) delta: Option<f64>,
    pub(crate) seed: u64,
    pub(crate) final_accuracy: f64,
    /// Mean accuracy over the last evaluated rounds (from the curve).
    pub(crate) endpoint: Option<fedsvd::Endpoint>,
    pub(crate) majority_accuracy: Option<f64>,
    pub(crate) max_epsilon_spent: Option<f64>,
    pub(crate) bytes_per_round: Option<f64>,
    pub(crate) server_seconds: Option<f64>,
    pub(crate) dataset: Option<String>,
    /// Sum of the rounds' wall times, seconds.
    pub(crate) wall_seconds: Option<f64>,
    /// (round, eval accuracy) for the rounds that were evaluated, by round.
    pub(crate) curve: Vec<(u32, f64)>,
}

/// Reads a finished run folder; `Ok(None)` when it is unfinished.
pub(crate) fn load_run(dir: &Path) -> anyhow::Result<Option<Run>> {
    let summary_path = dir.join("summary.json");
    if !summary_path.is_file() {
        return Ok(None);
    }
    let text = fs::read_to_string(&summary_path)
        .with_context(|| format!("reading {}", summary_path.display()))?;
    let s: SummaryFile = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}:{}: malformed summary: {e}",
            summary_path.display(),
            e.line()
        )
    })?;
    check_finite(&summary_path, "final_accuracy", Some(s.final_accuracy))?;
    check_finite(&summary_path, "epsilon", s.epsilon)?;
    check_finite(&summary_path, "majority_accuracy", s.majority_accuracy)?;
    let curve = load_curve(&dir.join("metrics.jsonl"))?;
    let endpoint = fedsvd::study::endpoint(
        curve.iter().map(|&(r, a)| (r as usize, a)),
        fedsvd::ENDPOINT_WINDOW,
    );
    Ok(Some(Run {
        dir: dir.to_path_buf(),
        method: s.method,
        epsilon: s.epsilon,
        delta: s.delta,
        seed: s.seed,
        final_accuracy: s.final_accuracy,
        endpoint,
        majority_accuracy: s.majority_accuracy,
        max_epsilon_spent: s.max_epsilon_spent,
        bytes_per_round: s.mean_bytes_uploaded_per_round,
        server_seconds: s.mean_server_seconds,
        dataset: s.dataset,
        wall_seconds: s.wall_seconds,
        curve,
    }))
}

fn check_finite(path: &Path, key: &str, value: Option<f64>) -> anyhow::Result<()> {
    match value {
        Some(v) if !v.is_finite() || v < 0.0 => bail!(
            "{}: `{key}` is {v}; a finite non-negative number is expected",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// Reads the evaluated rounds of `metrics.jsonl`. A round written twice (a
/// resumed run redoing it) keeps its last line.
fn load_curve(path: &Path) -> anyhow::Result<Vec<(u32, f64)>> {
    let file = fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut by_round = BTreeMap::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let line = line.with_context(|| format!("{}:{line_no}: reading", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let m: MetricsLine = serde_json::from_str(&line).map_err(|e| {
            anyhow::anyhow!("{}:{line_no}: malformed metrics line: {e}", path.display())
        })?;
        match m.eval_accuracy {
            Some(a) if !(0.0..=1.0).contains(&a) => bail!(
                "{}:{line_no}: eval_accuracy {a} is outside [0, 1]",
                path.display()
            ),
            Some(a) => {
                by_round.insert(m.round, Some(a));
            }
            None => {
                by_round.insert(m.round, None);
            }
        }
    }
    Ok(by_round
        .into_iter()
        .filter_map(|(r, a)| a.map(|a| (r, a)))
        .collect())
}

/// The methods in their fixed report order, with display names.
const METHODS: [(&str, &str); 5] = [
    ("fedsvd", "FedSVD"),
    ("ffa", "FFA-LoRA"),
    ("fedavg", "FedAvg-LoRA"),
    ("flora", "FLoRA"),
    ("fedex", "FedEx-LoRA"),
];

/// Display name of a method (unknown names are shown as written).
pub(crate) fn method_label(method: &str) -> &str {
    METHODS
        .iter()
        .find(|(key, _)| *key == method)
        .map_or(method, |(_, label)| label)
}

/// Sort key of a method: known methods in report order, then others by name.
fn method_rank(method: &str) -> (usize, String) {
    let rank = METHODS
        .iter()
        .position(|(key, _)| *key == method)
        .unwrap_or(METHODS.len());
    (rank, method.to_string())
}

/// ε as a sort key: finite values ascending, non-private (∞) last.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Epsilon(pub Option<f64>);

impl Epsilon {
    fn sort_key(self) -> f64 {
        self.0.unwrap_or(f64::INFINITY)
    }

    /// "6", "0.5" or "∞".
    pub(crate) fn label(self) -> String {
        match self.0 {
            Some(e) => format!("{e}"),
            None => "∞".to_string(),
        }
    }

    /// The CSV spelling: the number, or `inf`.
    fn csv(self) -> String {
        match self.0 {
            Some(e) => format!("{e}"),
            None => "inf".to_string(),
        }
    }
}

/// All runs of one (ε, method) cell.
#[derive(Debug)]
pub(crate) struct Cell {
    pub(crate) method: String,
    runs: Vec<Run>,
    final_accuracy: Summary,
    /// Over the runs that evaluated any round.
    endpoint: Option<Summary>,
}

impl Cell {
    fn new(method: String, mut runs: Vec<Run>) -> Self {
        runs.sort_by(|a, b| a.seed.cmp(&b.seed).then_with(|| a.dir.cmp(&b.dir)));
        let finals: Vec<f64> = runs.iter().map(|r| r.final_accuracy).collect();
        let final_accuracy = Summary::of(&finals).expect("a cell holds at least one run");
        let endpoints: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.endpoint.as_ref().map(|e| e.accuracy))
            .collect();
        Self {
            method,
            runs,
            final_accuracy,
            endpoint: Summary::of(&endpoints),
        }
    }

    fn seeds(&self) -> Vec<u64> {
        self.runs.iter().map(|r| r.seed).collect()
    }

    fn mean_of(&self, f: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
        let values: Vec<f64> = self.runs.iter().filter_map(f).collect();
        Summary::of(&values).map(|s| s.mean)
    }

    /// How many evaluated rounds the endpoints averaged: "5", or "2–5"
    /// when runs differ.
    fn endpoint_window(&self) -> String {
        let counts: BTreeSet<usize> = self
            .runs
            .iter()
            .filter_map(|r| r.endpoint.as_ref().map(|e| e.rounds.len()))
            .collect();
        match (counts.first(), counts.last()) {
            (Some(a), Some(b)) if a == b => a.to_string(),
            (Some(a), Some(b)) => format!("{a}–{b}"),
            _ => "0".to_string(),
        }
    }

    fn max_of(&self, f: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
        self.runs.iter().filter_map(f).reduce(f64::max)
    }

    /// Per evaluated round: the summary over the seeds that evaluated it.
    pub(crate) fn curve(&self) -> Vec<(u32, Summary)> {
        let mut by_round: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
        for run in &self.runs {
            for &(round, acc) in &run.curve {
                by_round.entry(round).or_default().push(acc);
            }
        }
        by_round
            .into_iter()
            .filter_map(|(r, v)| Summary::of(&v).map(|s| (r, s)))
            .collect()
    }
}

/// The runs of one ε, one cell per method in report order.
#[derive(Debug)]
pub(crate) struct Panel {
    pub(crate) epsilon: Epsilon,
    pub(crate) delta: Option<f64>,
    pub(crate) cells: Vec<Cell>,
}

impl Panel {
    /// Majority-class accuracy of the panel's runs (they share a test split).
    pub(crate) fn majority_accuracy(&self) -> Option<f64> {
        let values: Vec<f64> = self
            .cells
            .iter()
            .flat_map(|c| c.runs.iter().filter_map(|r| r.majority_accuracy))
            .collect();
        Summary::of(&values).map(|s| s.mean)
    }
}

/// Runs of one ε keyed by method sort key.
type MethodRuns = BTreeMap<(usize, String), Vec<Run>>;

/// Groups runs by ε (ascending, ∞ last) and method (report order).
pub(crate) fn group(runs: Vec<Run>) -> Vec<Panel> {
    let mut by_eps: Vec<(Epsilon, MethodRuns)> = Vec::new();
    for run in runs {
        let eps = Epsilon(run.epsilon);
        let slot = match by_eps.iter().position(|(e, _)| *e == eps) {
            Some(i) => i,
            None => {
                by_eps.push((eps, BTreeMap::new()));
                by_eps.len() - 1
            }
        };
        by_eps[slot]
            .1
            .entry(method_rank(&run.method))
            .or_default()
            .push(run);
    }
    by_eps.sort_by(|a, b| a.0.sort_key().total_cmp(&b.0.sort_key()));
    by_eps
        .into_iter()
        .map(|(epsilon, methods)| {
            let cells: Vec<Cell> = methods
                .into_iter()
                .map(|((_, method), runs)| Cell::new(method, runs))
                .collect();
            let deltas: BTreeSet<u64> = cells
                .iter()
                .flat_map(|c| c.runs.iter().filter_map(|r| r.delta.map(f64::to_bits)))
                .collect();
            // A δ is shown only when every run of the panel agrees on it.
            let delta = match deltas.len() {
                1 => deltas.first().map(|b| f64::from_bits(*b)),
                _ => None,
            };
            Panel {
                epsilon,
                delta,
                cells,
            }
        })
        .collect()
}

/// Reads `run_dirs` (each a run folder; unfinished ones are skipped with a
/// warning on stderr) and writes `results.md`, `results.csv`,
/// `accuracy.svg` and `accuracy.png` into `out_dir` (created if missing).
///
/// Fails, naming the file (and line), on a malformed `summary.json` or
/// `metrics.jsonl`, and when no run is finished.
pub fn write_report(run_dirs: &[PathBuf], out_dir: &Path) -> anyhow::Result<ReportFiles> {
    let mut runs = Vec::new();
    let mut skipped = Vec::new();
    for dir in run_dirs {
        match load_run(dir)? {
            Some(run) => runs.push(run),
            None => {
                eprintln!(
                    "warning: skipping unfinished run {} (no summary.json)",
                    dir.display()
                );
                skipped.push(dir.clone());
            }
        }
    }
    if runs.is_empty() {
        bail!(
            "no finished runs among {} run folder{} (a finished run holds summary.json)",
            run_dirs.len(),
            if run_dirs.len() == 1 { "" } else { "s" }
        );
    }
    let n_runs = runs.len();
    let datasets: BTreeSet<String> = runs.iter().filter_map(|r| r.dataset.clone()).collect();
    let panels = group(runs);
    warn_repeated_seeds(&panels);

    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let files = ReportFiles {
        results_md: out_dir.join("results.md"),
        results_csv: out_dir.join("results.csv"),
        accuracy_svg: out_dir.join("accuracy.svg"),
        accuracy_png: out_dir.join("accuracy.png"),
        runs: n_runs,
        skipped,
    };
    let md = markdown(&panels, n_runs, &files.skipped, &datasets);
    fs::write(&files.results_md, md)
        .with_context(|| format!("writing {}", files.results_md.display()))?;
    write_csv(&panels, &files.results_csv)?;
    plot::write_svg(&panels, &files.accuracy_svg)?;
    plot::write_png(&panels, &files.accuracy_png)?;
    Ok(files)
}

/// Two runs of one cell with the same seed are most likely one run copied
/// or resumed into a second folder; they still count, but the user hears.
fn warn_repeated_seeds(panels: &[Panel]) {
    for panel in panels {
        for cell in &panel.cells {
            let seeds = cell.seeds();
            for w in seeds.windows(2) {
                if w[0] == w[1] {
                    eprintln!(
                        "warning: {} at ε = {} has seed {} more than once; each folder counts as a run",
                        method_label(&cell.method),
                        panel.epsilon.label(),
                        w[0]
                    );
                }
            }
        }
    }
}

fn seeds_list(seeds: &[u64], sep: &str) -> String {
    seeds
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(sep)
}

/// Accuracy as a percentage with two decimals.
fn pct(x: f64) -> String {
    format!("{:.2}", 100.0 * x)
}

fn bytes_label(b: f64) -> String {
    if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

fn seconds_label(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

fn or_dash(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "–".to_string(), f)
}

/// `73.00 ± 8.96`, or `71.23 (n=1)` without an interval.
fn mean_ci(s: &Summary) -> String {
    match s.ci95_half_width {
        Some(h) => format!("{} ± {}", pct(s.mean), pct(h)),
        None => format!("{} (n=1)", pct(s.mean)),
    }
}

fn markdown(
    panels: &[Panel],
    n_runs: usize,
    skipped: &[PathBuf],
    datasets: &BTreeSet<String>,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Results\n");
    let data = if datasets.is_empty() {
        String::new()
    } else {
        format!(
            " on {}",
            datasets.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    };
    let _ = writeln!(
        md,
        "{n_runs} finished run{}{data}; {} unfinished run folder{} skipped.",
        if n_runs == 1 { "" } else { "s" },
        skipped.len(),
        if skipped.len() == 1 { "" } else { "s" },
    );
    for dir in skipped {
        let _ = writeln!(md, "- skipped (no summary.json): `{}`", dir.display());
    }
    let _ = writeln!(
        md,
        "\nFinal accuracy (%) is the last round's accuracy, the endpoint the mean accuracy \
over each run's last {} evaluated rounds (fewer when fewer were evaluated; the column \
says how many), which swings less with the clients one round samples. Both are the mean \
over seeds ± the half-width of its 95 % \
confidence interval (Student t, n − 1 degrees of freedom); with one seed the value \
is shown with n=1. Bytes uploaded and server refactorization time are means per round \
over the seeds; max ε spent is the largest ε any client spent in any of the runs.",
        fedsvd::ENDPOINT_WINDOW
    );
    for panel in panels {
        let title = match (panel.epsilon.0, panel.delta) {
            (None, _) => "ε = ∞ (non-private)".to_string(),
            (Some(_), Some(d)) => format!("ε = {}, δ = {d:e}", panel.epsilon.label()),
            (Some(_), None) => format!("ε = {}", panel.epsilon.label()),
        };
        let _ = writeln!(md, "\n## {title}\n");
        let _ = writeln!(
            md,
            "| method | runs (seeds) | final accuracy (%) | endpoint accuracy (%) (rounds averaged) | majority-class accuracy (%) | bytes uploaded / round | server time / round | max ε spent |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
        for cell in &panel.cells {
            let s = cell.final_accuracy;
            let acc = mean_ci(&s);
            let endpoint = cell.endpoint.as_ref().map_or_else(
                || "–".to_string(),
                |e| format!("{} ({})", mean_ci(e), cell.endpoint_window()),
            );
            let _ = writeln!(
                md,
                "| {} | {} ({}) | {acc} | {endpoint} | {} | {} | {} | {} |",
                method_label(&cell.method),
                s.n,
                seeds_list(&cell.seeds(), ", "),
                or_dash(cell.mean_of(|r| r.majority_accuracy), pct),
                or_dash(cell.mean_of(|r| r.bytes_per_round), bytes_label),
                or_dash(cell.mean_of(|r| r.server_seconds), seconds_label),
                or_dash(cell.max_of(|r| r.max_epsilon_spent), |e| format!("{e:.3}")),
            );
        }
    }
    md
}

/// The CSV columns, in order.
const CSV_HEADER: [&str; 18] = [
    "epsilon",
    "delta",
    "method",
    "n",
    "seeds",
    "final_accuracy_mean",
    "final_accuracy_std",
    "ci95_half_width",
    "ci95_low",
    "ci95_high",
    "majority_accuracy",
    "bytes_uploaded_per_round",
    "server_seconds_per_round",
    "max_epsilon_spent",
    "endpoint_accuracy_mean",
    "endpoint_ci95_half_width",
    "endpoint_n",
    "endpoint_rounds_averaged",
];

fn write_csv(panels: &[Panel], path: &Path) -> anyhow::Result<()> {
    fn num(v: Option<f64>) -> String {
        v.map_or_else(String::new, |x| format!("{x}"))
    }
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("writing {}", path.display()))?;
    w.write_record(CSV_HEADER)
        .with_context(|| format!("writing {}", path.display()))?;
    for panel in panels {
        for cell in &panel.cells {
            let s = cell.final_accuracy;
            w.write_record([
                panel.epsilon.csv(),
                num(panel.delta),
                cell.method.clone(),
                s.n.to_string(),
                seeds_list(&cell.seeds(), ";"),
                format!("{}", s.mean),
                num(s.std),
                num(s.ci95_half_width),
                num(s.ci95_low()),
                num(s.ci95_high()),
                num(cell.mean_of(|r| r.majority_accuracy)),
                num(cell.mean_of(|r| r.bytes_per_round)),
                num(cell.mean_of(|r| r.server_seconds)),
                num(cell.max_of(|r| r.max_epsilon_spent)),
                num(cell.endpoint.map(|e| e.mean)),
                num(cell.endpoint.and_then(|e| e.ci95_half_width)),
                cell.endpoint.map_or(0, |e| e.n).to_string(),
                cell.endpoint_window(),
            ])
            .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(method: &str, epsilon: Option<f64>, seed: u64, acc: f64) -> Run {
        Run {
            dir: PathBuf::from(format!("{method}-{epsilon:?}-{seed}")),
            method: method.to_string(),
            epsilon,
            delta: Some(1e-5),
            seed,
            final_accuracy: acc,
            endpoint: fedsvd::study::endpoint([(1, acc - 0.1), (2, acc)], 5),
            majority_accuracy: Some(0.5),
            max_epsilon_spent: epsilon.map(|e| e * 0.99),
            bytes_per_round: Some(1000.0 * seed as f64),
            server_seconds: Some(1e-3),
            dataset: Some("rt".into()),
            wall_seconds: Some(60.0),
            curve: vec![(1, acc - 0.1), (2, acc)],
        }
    }

    #[test]
    fn groups_by_epsilon_with_infinity_last_and_methods_in_report_order() {
        let runs = vec![
            run("ffa", None, 1, 0.8),
            run("custom", Some(6.0), 1, 0.6),
            run("fedsvd", Some(6.0), 2, 0.7),
            run("ffa", Some(3.0), 1, 0.6),
            run("fedsvd", Some(6.0), 1, 0.75),
            run("fedavg", Some(6.0), 1, 0.65),
        ];
        let panels = group(runs);
        let eps: Vec<_> = panels.iter().map(|p| p.epsilon.label()).collect();
        assert_eq!(eps, ["3", "6", "∞"]);
        let methods: Vec<_> = panels[1].cells.iter().map(|c| c.method.as_str()).collect();
        assert_eq!(methods, ["fedsvd", "fedavg", "custom"]);
        assert_eq!(panels[1].cells[0].seeds(), [1, 2]);
        assert!((panels[1].cells[0].final_accuracy.mean - 0.725).abs() < 1e-12);
        assert_eq!(panels[1].delta, Some(1e-5));
    }

    #[test]
    fn curve_averages_the_seeds_that_evaluated_each_round() {
        let mut a = run("fedsvd", Some(6.0), 1, 0.7);
        let mut b = run("fedsvd", Some(6.0), 2, 0.8);
        a.curve = vec![(1, 0.5), (3, 0.7)];
        b.curve = vec![(1, 0.6), (2, 0.65), (3, 0.8)];
        let cell = Cell::new("fedsvd".into(), vec![b, a]);
        let curve = cell.curve();
        let rounds: Vec<_> = curve.iter().map(|(r, s)| (*r, s.n)).collect();
        assert_eq!(rounds, [(1, 2), (2, 1), (3, 2)]);
        assert!((curve[0].1.mean - 0.55).abs() < 1e-12);
        assert_eq!(cell.seeds(), [1, 2]);
    }

    #[test]
    fn markdown_shows_n_equals_one_without_an_interval() {
        let panels = group(vec![run("fedsvd", None, 4, 0.71234)]);
        let md = markdown(&panels, 1, &[], &BTreeSet::new());
        assert!(md.contains("## ε = ∞ (non-private)"), "{md}");
        assert!(
            md.contains("| FedSVD | 1 (4) | 71.23 (n=1) | 66.23 (n=1) (2) |"),
            "{md}"
        );
        let row = md.lines().find(|l| l.starts_with("| FedSVD")).unwrap();
        assert!(!row.contains('±'), "{row}");
    }

    #[test]
    fn common_ancestor_of_paths() {
        assert_eq!(
            common_ancestor(Path::new("/a/b/c"), Path::new("/a/b/d/e")),
            PathBuf::from("/a/b")
        );
        assert_eq!(
            common_ancestor(Path::new("/a"), Path::new("/b")),
            PathBuf::from("/")
        );
    }

    #[test]
    fn metrics_keep_the_last_line_of_a_repeated_round() {
        let dir = std::env::temp_dir().join(format!("fedsvd-report-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        fs::write(
            &path,
            "{\"round\":1,\"eval_accuracy\":0.5}\n{\"round\":2,\"eval_accuracy\":null}\n\n{\"round\":1,\"eval_accuracy\":0.6}\n",
        )
        .unwrap();
        let curve = load_curve(&path).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(curve, [(1, 0.6)]);
    }
}
