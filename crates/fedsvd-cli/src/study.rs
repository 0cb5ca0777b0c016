//! `fedsvd study STUDY.json [--run]`: a committed, reproducible comparison.
//!
//! A study file names a grid (methods × ε × seeds over a preset, a config
//! file and `--set` overrides), where its small result files live, and
//! where its analysis goes. Without `--run` the command only reads the
//! committed results and rebuilds every table and the plot, in seconds.
//! With `--run` it first runs the grid's missing runs, seed by seed (so a
//! grid stopped half-way already holds complete pairs), each in a scratch
//! folder that survives interruptions (`--resume` semantics), and keeps
//! only the small files of a finished run: `config.json`, `data.json`,
//! `metrics.jsonl`, `summary.json` and `record.json` (the machine and
//! version that ran it), never checkpoints or models.
//!
//! Runs are paired by seed: seed s sets `federation.seed = s` (noise,
//! client sampling, initialization) and `data.seed = s` (split and
//! partition) for every method and ε, so the same seed gives every method
//! the same clients, and the analysis checks that it did. The answer is
//! the paired difference of the endpoint (mean accuracy over each run's
//! last 5 evaluated rounds) between the reference method and each other
//! method, per ε, with its 95 % Student-t interval.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use fedsvd::Runner;
use fedsvd::runner::files;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::compare::{GridSpec, check_same_config, run_name};
use crate::config::Preset;
use crate::report::stats::Summary;
use crate::report::{self, Epsilon, Run, method_label};

/// Arguments of `fedsvd study`.
#[derive(Debug, Args)]
pub struct StudyArgs {
    /// The study definition, e.g. studies/dp-methods.json.
    #[arg(value_name = "STUDY")]
    pub study: PathBuf,
    /// Run the grid's missing runs first (resumable: an interrupted run
    /// continues from its checkpoint in the scratch folder).
    #[arg(long)]
    pub run: bool,
    /// With --run: stop after this many runs have finished in this call
    /// (the analysis is still rebuilt), to spread a grid over days.
    #[arg(long, value_name = "N", requires = "run")]
    pub max_runs: Option<usize>,
    /// Scratch folder for runs in progress (their checkpoints live there
    /// until the run finishes). Default: runs/study-<name>.
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// The machine, as recorded with each run it finishes (default: the
    /// core count, architecture and CPU model read from the system).
    #[arg(long, value_name = "TEXT")]
    pub machine: Option<String>,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

/// A study file. Paths are relative to the file's folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyFile {
    /// Short name (letters, digits, `-`, `_`): names the scratch folder.
    pub name: String,
    /// The question the study answers (the title of its report).
    pub question: String,
    /// The starting preset: quick, default or paper.
    pub preset: String,
    /// A JSON config merged over the preset (`null`: none).
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// `key=value` overrides for every run, as `fedsvd run --set`.
    #[serde(default)]
    pub set: Vec<String>,
    /// Methods; the first is not special, `reference` is.
    pub methods: Vec<String>,
    /// Privacy levels: numbers, or "inf" for no DP.
    pub epsilons: Vec<Value>,
    /// Seeds; each draws its own split, partition, sampling and noise.
    pub seeds: Vec<u64>,
    /// The method every other one is compared with, seed by seed.
    pub reference: String,
    /// Folder of the per-run result folders.
    pub results: PathBuf,
    /// The analysis (markdown) written from the results.
    pub markdown: PathBuf,
    /// The accuracy-against-round plot (SVG).
    pub plot: PathBuf,
    /// The paired differences as CSV.
    pub table: PathBuf,
    /// Optional: a `fedsvd probe` result (JSON) reported with the study.
    #[serde(default)]
    pub probe: Option<PathBuf>,
    /// Optional: a `fedsvd probe --runs` result (JSON): the Gauss–Newton
    /// conditioning of every LoRA module at the end of real runs.
    #[serde(default)]
    pub gauss_newton: Option<PathBuf>,
    /// Optional notes appended to the report verbatim (markdown).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// One run of the study's grid.
#[derive(Debug, Clone)]
struct StudyCell {
    seed: u64,
    name: String,
    config: fedsvd::RunConfig,
}

/// A parsed, checked study with its paths resolved.
#[derive(Debug, Clone)]
pub struct Study {
    def: StudyFile,
    preset: Preset,
    epsilons: Vec<Option<f64>>,
    results: PathBuf,
    markdown: PathBuf,
    plot: PathBuf,
    table: PathBuf,
    probe: Option<PathBuf>,
    gauss_newton: Option<PathBuf>,
    /// The definition file as given (for the commands in the report).
    source: PathBuf,
    cells: Vec<StudyCell>,
}

/// `record.json`: who ran a finished run, where.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunRecord {
    machine: String,
    logical_cpus: usize,
    os: String,
    fedsvd_version: String,
    /// Seconds since the Unix epoch when the run's files were kept.
    kept_unix: u64,
}

impl Study {
    /// Reads and checks a study file, resolving every run's configuration
    /// (so a bad key fails now, not after hours).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let def: StudyFile = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{}:{}: not a study file: {e}", path.display(), e.line())
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        let at = |p: &Path| normalize(&base.join(p));
        if def.name.is_empty()
            || !def
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!(
                "{}: name {:?} must be letters, digits, - or _",
                path.display(),
                def.name
            );
        }
        let preset = Preset::from_str(&def.preset, true).map_err(|_| {
            anyhow::anyhow!(
                "{}: preset {:?}: expected quick, default or paper",
                path.display(),
                def.preset
            )
        })?;
        for m in &def.methods {
            fedsvd::Method::from_name(m)
                .map_err(|e| anyhow::anyhow!("{}: methods: {e}", path.display()))?;
        }
        let unique_methods: BTreeSet<&String> = def.methods.iter().collect();
        if def.methods.len() < 2 || unique_methods.len() != def.methods.len() {
            bail!(
                "{}: methods must name at least two different methods, each once",
                path.display()
            );
        }
        if !def.methods.contains(&def.reference) {
            bail!(
                "{}: reference {:?} is not among the methods {:?}",
                path.display(),
                def.reference,
                def.methods
            );
        }
        let unique_seeds: BTreeSet<u64> = def.seeds.iter().copied().collect();
        if def.seeds.is_empty() || unique_seeds.len() != def.seeds.len() {
            bail!("{}: seeds must be non-empty and distinct", path.display());
        }
        let epsilons = def
            .epsilons
            .iter()
            .map(|v| parse_epsilon(v).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let unique_eps: BTreeSet<Option<u64>> =
            epsilons.iter().map(|e| e.map(f64::to_bits)).collect();
        if epsilons.is_empty() || unique_eps.len() != epsilons.len() {
            bail!(
                "{}: epsilons must be non-empty and distinct",
                path.display()
            );
        }
        let config_file = def.config.as_ref().map(|p| at(p));
        let spec = GridSpec {
            preset,
            config: config_file.as_deref(),
            sets: &def.set,
            same_data: false,
        };
        // Seed-major: a grid stopped half-way holds whole seeds.
        let mut cells = Vec::new();
        for &seed in &def.seeds {
            for &epsilon in &epsilons {
                for method in &def.methods {
                    let cell = spec
                        .cell(method, epsilon, seed)
                        .with_context(|| format!("{}: run {method}", path.display()))?;
                    debug_assert_eq!(cell.name, run_name(method, epsilon, seed));
                    cells.push(StudyCell {
                        seed,
                        name: cell.name,
                        config: cell.config,
                    });
                }
            }
        }
        Ok(Self {
            results: at(&def.results),
            markdown: at(&def.markdown),
            plot: at(&def.plot),
            table: at(&def.table),
            probe: def.probe.as_ref().map(|p| at(p)),
            gauss_newton: def.gauss_newton.as_ref().map(|p| at(p)),
            preset,
            epsilons,
            source: path.to_path_buf(),
            cells,
            def,
        })
    }

    fn result_dir(&self, cell: &StudyCell) -> PathBuf {
        self.results.join(&cell.name)
    }

    /// Whether a cell's result is complete; a result of another
    /// configuration is an error naming the keys.
    fn is_done(&self, cell: &StudyCell) -> anyhow::Result<bool> {
        let dir = self.result_dir(cell);
        if !dir.join(files::SUMMARY).is_file() {
            return Ok(false);
        }
        check_same_config(&dir, &cell.config)?;
        Ok(true)
    }
}

fn parse_epsilon(v: &Value) -> anyhow::Result<Option<f64>> {
    match v {
        Value::String(s) if s.eq_ignore_ascii_case("inf") || s == "∞" => Ok(None),
        Value::Number(n) => match n.as_f64() {
            Some(e) if e.is_finite() && e > 0.0 => Ok(Some(e)),
            _ => bail!("epsilons: {n} is not a positive number"),
        },
        _ => bail!("epsilons: {v} is neither a positive number nor \"inf\""),
    }
}

/// Resolves `.` and `..` lexically (no file system access), so that paths
/// built from the study's folder compare and relate cleanly.
fn normalize(path: &Path) -> PathBuf {
    let mut out: Vec<Component<'_>> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.last() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(c),
            },
            _ => out.push(c),
        }
    }
    out.iter().collect()
}

/// `to` relative to the folder `from` (both normalized, and both absolute
/// or both relative to one folder), with `/` separators for markdown.
fn relative_link(from: &Path, to: &Path) -> String {
    let from: Vec<Component<'_>> = from.components().collect();
    let to_c: Vec<Component<'_>> = to.components().collect();
    let common = from.iter().zip(&to_c).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".to_string(); from.len() - common];
    parts.extend(
        to_c[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
}

/// Runs `fedsvd study`.
pub fn run(args: StudyArgs) -> anyhow::Result<()> {
    let study = Study::load(&args.study)?;
    if args.run {
        run_missing(&study, &args)?;
    }
    let analysis = analyze(&study)?;
    write_outputs(&study, &analysis)?;
    println!(
        "{} of {} runs finished; analysis written:",
        analysis.finished,
        study.cells.len()
    );
    for path in [&study.markdown, &study.table] {
        println!("  {}", path.display());
    }
    if analysis.finished > 0 {
        println!("  {}", study.plot.display());
    }
    Ok(())
}

/// Runs the missing cells (seed-major), keeping each finished run's small
/// files in the results folder.
fn run_missing(study: &Study, args: &StudyArgs) -> anyhow::Result<()> {
    let work = args
        .work
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("study-{}", study.def.name)));
    let mut missing = Vec::new();
    for cell in &study.cells {
        if study.is_done(cell)? {
            // A scratch folder left by an interruption after the result
            // was kept holds nothing the result lacks.
            let scratch = work.join(&cell.name);
            if scratch.join(files::CONFIG).is_file() {
                check_same_config(&scratch, &cell.config)?;
                fs::remove_dir_all(&scratch)
                    .with_context(|| format!("removing {}", scratch.display()))?;
            }
        } else {
            let scratch = work.join(&cell.name);
            if scratch.join(files::CONFIG).is_file() {
                check_same_config(&scratch, &cell.config)?;
            }
            missing.push(cell);
        }
    }
    let total = study.cells.len();
    let done = total - missing.len();
    if !args.quiet {
        eprintln!(
            "study {}: {done} of {total} runs finished, {} to run{}",
            study.def.name,
            missing.len(),
            args.max_runs
                .map(|n| format!(" (at most {n} now)"))
                .unwrap_or_default()
        );
    }
    if missing.is_empty() {
        return Ok(());
    }
    let assets = crate::assets::ensure_default()?;
    let machine = args.machine.clone().unwrap_or_else(detect_machine);
    let limit = args.max_runs.unwrap_or(usize::MAX);
    for (i, cell) in missing.into_iter().take(limit).enumerate() {
        let label = format!("[{}/{total}] {}", done + i + 1, cell.name);
        let scratch = work.join(&cell.name);
        let mut runner = if scratch.join(files::CONFIG).is_file() {
            if !args.quiet {
                eprintln!("{label}: resuming from {}", scratch.display());
            }
            Runner::resume(&scratch, &assets)
                .with_context(|| format!("resuming {}", scratch.display()))?
        } else {
            if !args.quiet {
                eprintln!("{label}: starting in {}", scratch.display());
            }
            Runner::create(cell.config.clone(), &scratch, &assets)
                .with_context(|| format!("starting {}", scratch.display()))?
        };
        let summary = crate::run::drive(&mut runner, args.quiet)?;
        keep_result(study, cell, &scratch, &machine)?;
        fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
        if !args.quiet {
            eprintln!("{label}: {}", crate::run::headline(&summary));
        }
    }
    Ok(())
}

/// The files of a finished run that a study keeps.
const KEPT: [&str; 4] = [files::CONFIG, files::DATA, files::METRICS, files::SUMMARY];

/// Copies a finished run's small files into the results folder: into a
/// temporary folder first, renamed into place, so an interruption never
/// leaves a half-kept result.
fn keep_result(
    study: &Study,
    cell: &StudyCell,
    scratch: &Path,
    machine: &str,
) -> anyhow::Result<()> {
    let dest = study.result_dir(cell);
    let tmp = study.results.join(format!(".{}.tmp", cell.name));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for name in KEPT {
        let from = scratch.join(name);
        fs::copy(&from, tmp.join(name))
            .with_context(|| format!("copying {} into {}", from.display(), tmp.display()))?;
    }
    let record = RunRecord {
        machine: machine.to_string(),
        logical_cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        fedsvd_version: env!("CARGO_PKG_VERSION").to_string(),
        kept_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    fedsvd::runner::write_json_atomic(&tmp.join("record.json"), &record)?;
    if dest.exists() {
        // An unfinished earlier copy (no summary.json): replaced.
        fs::remove_dir_all(&dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    fs::rename(&tmp, &dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    Ok(())
}

/// "2-core x86_64, Intel(R) Xeon(R) …" from the system.
pub(crate) fn detect_machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    format!("{cores}-core {}, {cpu}", std::env::consts::ARCH)
}

/// What one finished run contributes to pairing checks.
#[derive(Debug, Clone)]
struct PairingFacts {
    /// `data.json`'s partition report (examples per label per client).
    partition: Option<Value>,
    /// Clients sampled in each round, in round order.
    sampled: Vec<Vec<usize>>,
}

fn pairing_facts(dir: &Path) -> anyhow::Result<PairingFacts> {
    let data_path = dir.join(files::DATA);
    let partition = if data_path.is_file() {
        let data: Value = serde_json::from_str(
            &fs::read_to_string(&data_path)
                .with_context(|| format!("reading {}", data_path.display()))?,
        )
        .with_context(|| format!("{}: not JSON", data_path.display()))?;
        data.get("partition").cloned()
    } else {
        None
    };
    let metrics = fedsvd::runner::read_metrics(&dir.join(files::METRICS))?;
    let mut by_round = BTreeMap::new();
    for m in metrics {
        by_round.insert(m.round, m.sampled_clients);
    }
    Ok(PairingFacts {
        partition,
        sampled: by_round.into_values().collect(),
    })
}

/// One paired comparison: reference − other on the endpoint, per seed.
#[derive(Debug, Clone)]
struct Paired {
    epsilon: Option<f64>,
    other: String,
    seeds: Vec<u64>,
    /// reference − other, per seed (endpoint).
    endpoint: Vec<f64>,
    /// reference − other, per seed (last round).
    last_round: Vec<f64>,
}

impl Paired {
    fn endpoint_summary(&self) -> Option<Summary> {
        Summary::of(&self.endpoint)
    }
}

/// How a paired interval reads, in words.
fn verdict(reference: &str, other: &str, s: Option<&Summary>) -> String {
    let r = method_label(reference);
    let o = method_label(other);
    match s {
        None => "no paired seeds yet".to_string(),
        Some(s) => match (s.ci95_low(), s.ci95_high()) {
            (Some(lo), _) if lo > 0.0 => format!("{r} higher than {o}"),
            (_, Some(hi)) if hi < 0.0 => format!("{r} lower than {o}"),
            (Some(_), Some(_)) => "no difference detected (the interval includes 0)".to_string(),
            _ => "one paired seed: no interval".to_string(),
        },
    }
}

/// Everything the report says, computed from the results folder.
#[derive(Debug)]
struct Analysis {
    finished: usize,
    missing: Vec<String>,
    runs: Vec<Run>,
    paired: Vec<Paired>,
    /// Seeds whose runs do not share a partition or client sampling.
    unpaired: Vec<String>,
    machines: BTreeMap<String, usize>,
    wall_seconds: f64,
    runs_with_wall: usize,
}

fn analyze(study: &Study) -> anyhow::Result<Analysis> {
    let mut runs = Vec::new();
    let mut missing = Vec::new();
    let mut facts: BTreeMap<(u64, String), (String, PairingFacts)> = BTreeMap::new();
    let mut machines = BTreeMap::new();
    for cell in &study.cells {
        if !study.is_done(cell)? {
            missing.push(cell.name.clone());
            continue;
        }
        let dir = study.result_dir(cell);
        let Some(run) = report::load_run(&dir)? else {
            missing.push(cell.name.clone());
            continue;
        };
        facts.insert(
            (cell.seed, cell.name.clone()),
            (cell.name.clone(), pairing_facts(&dir)?),
        );
        let record_path = dir.join("record.json");
        let machine = if record_path.is_file() {
            fedsvd::runner::read_json::<RunRecord>(&record_path)?.machine
        } else {
            "not recorded".to_string()
        };
        *machines.entry(machine).or_insert(0) += 1;
        runs.push(run);
    }
    // Pairing: every finished run of a seed has the same partition and
    // sampled the same clients in every round it shares with the others.
    let mut unpaired = Vec::new();
    for &seed in &study.def.seeds {
        let of_seed: Vec<&(String, PairingFacts)> = facts
            .iter()
            .filter(|((s, _), _)| *s == seed)
            .map(|(_, v)| v)
            .collect();
        if let Some((first_name, first)) = of_seed.first() {
            for (name, f) in &of_seed[1..] {
                if f.partition != first.partition {
                    unpaired.push(format!(
                        "seed {seed}: {name} and {first_name} have different partitions"
                    ));
                }
                let shared = f.sampled.len().min(first.sampled.len());
                if f.sampled[..shared] != first.sampled[..shared] {
                    unpaired.push(format!(
                        "seed {seed}: {name} and {first_name} sampled different clients"
                    ));
                }
            }
        }
    }
    let find = |method: &str, eps: Option<f64>, seed: u64| {
        runs.iter()
            .find(|r| r.method == method && r.epsilon == eps && r.seed == seed)
    };
    let mut paired = Vec::new();
    for &eps in &study.epsilons {
        for other in study
            .def
            .methods
            .iter()
            .filter(|m| **m != study.def.reference)
        {
            let mut p = Paired {
                epsilon: eps,
                other: other.clone(),
                seeds: Vec::new(),
                endpoint: Vec::new(),
                last_round: Vec::new(),
            };
            for &seed in &study.def.seeds {
                let (Some(a), Some(b)) = (
                    find(&study.def.reference, eps, seed),
                    find(other, eps, seed),
                ) else {
                    continue;
                };
                let (Some(ea), Some(eb)) = (&a.endpoint, &b.endpoint) else {
                    continue;
                };
                p.seeds.push(seed);
                p.endpoint.push(ea.accuracy - eb.accuracy);
                p.last_round.push(a.final_accuracy - b.final_accuracy);
            }
            paired.push(p);
        }
    }
    let walls: Vec<f64> = runs.iter().filter_map(|r| r.wall_seconds).collect();
    Ok(Analysis {
        finished: runs.len(),
        missing,
        paired,
        unpaired,
        machines,
        wall_seconds: walls.iter().sum(),
        runs_with_wall: walls.len(),
        runs,
    })
}

/// Percentage points with two decimals and an explicit sign.
fn pp(x: f64) -> String {
    format!("{:+.2}", 100.0 * x)
}

fn pct(x: f64) -> String {
    format!("{:.2}", 100.0 * x)
}

fn mean_ci(s: &Summary) -> String {
    match s.ci95_half_width {
        Some(h) => format!("{} ± {}", pct(s.mean), pct(h)),
        None => format!("{} (n=1)", pct(s.mean)),
    }
}

fn hours(seconds: f64) -> String {
    if seconds >= 3600.0 {
        format!("{:.1} h", seconds / 3600.0)
    } else {
        format!("{:.0} min", seconds / 60.0)
    }
}

fn eps_title(eps: Option<f64>) -> String {
    match eps {
        Some(_) => format!("ε = {}", Epsilon(eps).label()),
        None => "ε = ∞ (non-private)".to_string(),
    }
}

fn write_outputs(study: &Study, a: &Analysis) -> anyhow::Result<()> {
    for path in [&study.markdown, &study.plot, &study.table] {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
    }
    if a.finished > 0 {
        let panels = report::group(a.runs.clone());
        report::plot::write_svg(&panels, &study.plot)?;
    } else if study.plot.is_file() {
        // A plot of results that are no longer there would be a lie.
        fs::remove_file(&study.plot)
            .with_context(|| format!("removing {}", study.plot.display()))?;
    }
    write_table(study, a)?;
    let md = markdown(study, a)?;
    fs::write(&study.markdown, md).with_context(|| format!("writing {}", study.markdown.display()))
}

fn write_table(study: &Study, a: &Analysis) -> anyhow::Result<()> {
    fn num(v: Option<f64>) -> String {
        v.map_or_else(String::new, |x| format!("{x}"))
    }
    let path = &study.table;
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("writing {}", path.display()))?;
    w.write_record([
        "epsilon",
        "reference",
        "other",
        "n",
        "seeds",
        "endpoint_difference_mean",
        "endpoint_difference_ci95_low",
        "endpoint_difference_ci95_high",
        "last_round_difference_mean",
        "last_round_difference_ci95_low",
        "last_round_difference_ci95_high",
    ])
    .with_context(|| format!("writing {}", path.display()))?;
    for p in &a.paired {
        let e = p.endpoint_summary();
        let l = Summary::of(&p.last_round);
        w.write_record([
            p.epsilon
                .map_or_else(|| "inf".to_string(), |e| format!("{e}")),
            study.def.reference.clone(),
            p.other.clone(),
            p.seeds.len().to_string(),
            p.seeds
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(";"),
            num(e.map(|s| s.mean)),
            num(e.and_then(|s| s.ci95_low())),
            num(e.and_then(|s| s.ci95_high())),
            num(l.map(|s| s.mean)),
            num(l.and_then(|s| s.ci95_low())),
            num(l.and_then(|s| s.ci95_high())),
        ])
        .with_context(|| format!("writing {}", path.display()))?;
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn markdown(study: &Study, a: &Analysis) -> anyhow::Result<String> {
    let def = &study.def;
    let total = study.cells.len();
    let md_dir = study.markdown.parent().unwrap_or(Path::new(""));
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# {}\n", def.question);
    let _ = writeln!(
        w,
        "<!-- Written by `fedsvd study {}` from the result files in `{}`; edit the study \
         file, not this page. -->\n",
        study.source.display(),
        study.results.display()
    );
    let methods: Vec<&str> = def.methods.iter().map(|m| method_label(m)).collect();
    let eps: Vec<String> = study.epsilons.iter().map(|e| Epsilon(*e).label()).collect();
    let sample = &study.cells[0].config;
    let fed = &sample.federation;
    let partition = match sample.data.partition {
        fedsvd::PartitionConfig::Iid => "IID".to_string(),
        fedsvd::PartitionConfig::Dirichlet { alpha } => format!("Dirichlet α = {alpha}"),
    };
    let evaluated = if fed.eval_every == 1 {
        "every round".to_string()
    } else {
        format!("every {} rounds", fed.eval_every)
    };
    let delta = format!("{:e}", fed.privacy.delta);
    let overrides = if def.set.is_empty() {
        "none".to_string()
    } else {
        def.set
            .iter()
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        w,
        "**The study.** {} on {} ({} training and {} held-out examples, {} clients, {} \
         partition, {} sampled per round, {} rounds of {} local steps, evaluated {}), ε ∈ {{{}}} at δ = {}, seeds {}: {} runs, paired by seed. Seed s sets the \
         split, the partition, the client sampling, the initialization and the noise \
         (`data.seed = federation.seed = s`), so for one seed every method trains on the \
         same clients in the same rounds. Preset `{}`; overrides: {}.\n",
        methods.join(", "),
        sample.data.dataset,
        sample
            .data
            .train_examples
            .map_or("all".to_string(), |n| n.to_string()),
        sample
            .data
            .test_examples
            .map_or("a fraction of the".to_string(), |n| n.to_string()),
        sample.data.clients,
        partition,
        fed.clients_per_round,
        fed.rounds,
        fed.training.local_steps,
        evaluated,
        eps.join(", "),
        delta,
        def.seeds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        total,
        study.preset.name(),
        overrides,
    );
    let _ = writeln!(
        w,
        "**The endpoint** is each run's mean held-out accuracy over its last {} evaluated \
         rounds (one round's accuracy swings with the clients it sampled); the last round's \
         accuracy is reported beside it. **The answer** is the paired difference {} − other \
         method on the endpoint, per seed, then its mean and 95 % interval (Student t, n − 1 \
         degrees of freedom).\n",
        fedsvd::ENDPOINT_WINDOW,
        method_label(&def.reference)
    );

    let _ = writeln!(w, "## Status\n");
    if a.missing.is_empty() {
        let _ = writeln!(w, "All {total} runs finished.\n");
    } else {
        let _ = writeln!(
            w,
            "**The grid is pending: {} of {total} runs have finished**{}. No number below is \
             an answer until every seed has run; nothing here is estimated or filled in.\n",
            a.finished,
            if a.finished == 0 {
                ", so this page has no results yet"
            } else {
                ""
            }
        );
        let _ = writeln!(
            w,
            "Run the missing ones (resumable: stop at any time, even with `kill -9`, and run the \
             same command again; `--max-runs N` stops after N runs):\n\n```sh\ncargo run \
             --release --bin fedsvd -- study {} --run\n```\n",
            study.source.display()
        );
        let _ = writeln!(w, "Missing: {}.\n", a.missing.join(", "));
    }
    if !a.unpaired.is_empty() {
        let _ = writeln!(
            w,
            "**Pairing check failed**: {}. The paired intervals below assume shared partitions \
             and client sampling; rerun those seeds.\n",
            a.unpaired.join("; ")
        );
    } else if a.finished > 1 {
        let _ = writeln!(
            w,
            "Pairing checked: within each seed, every finished run has the same partition \
             (`data.json`) and sampled the same clients in every round (`metrics.jsonl`).\n"
        );
    }

    if a.finished > 0 {
        let _ = writeln!(w, "## The answer: paired differences\n");
        let _ = writeln!(
            w,
            "| ε | comparison | paired seeds | endpoint difference (pp) | 95 % CI (pp) | \
             last-round difference (pp) | reading |"
        );
        let _ = writeln!(w, "|---|---|---|---:|---:|---:|---|");
        for p in &a.paired {
            let e = p.endpoint_summary();
            let l = Summary::of(&p.last_round);
            let ci = e
                .and_then(|s| Some(format!("{} to {}", pp(s.ci95_low()?), pp(s.ci95_high()?))))
                .unwrap_or_else(|| "–".to_string());
            let _ = writeln!(
                w,
                "| {} | {} − {} | {} ({}) | {} | {ci} | {} | {} |",
                Epsilon(p.epsilon).label(),
                method_label(&def.reference),
                method_label(&p.other),
                p.seeds.len(),
                p.seeds
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                e.map_or_else(|| "–".to_string(), |s| pp(s.mean)),
                l.map_or_else(|| "–".to_string(), |s| pp(s.mean)),
                verdict(&def.reference, &p.other, e.as_ref()),
            );
        }
        let _ = writeln!(
            w,
            "\npp: percentage points of held-out accuracy. The same numbers are in `{}`.\n",
            relative_link(md_dir, &study.table)
        );

        let _ = writeln!(w, "## Per method\n");
        let panels = report::group(a.runs.clone());
        for panel in &panels {
            let _ = writeln!(w, "### {}\n", eps_title(panel.epsilon.0));
            let _ = writeln!(
                w,
                "| method | runs (seeds) | endpoint accuracy (%) | last-round accuracy (%) | \
                 majority class (%) |"
            );
            let _ = writeln!(w, "|---|---|---:|---:|---:|");
            for cell in &panel.cells {
                let runs: Vec<&Run> = a
                    .runs
                    .iter()
                    .filter(|r| r.method == cell.method && r.epsilon == panel.epsilon.0)
                    .collect();
                let endpoints: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| r.endpoint.as_ref().map(|e| e.accuracy))
                    .collect();
                let finals: Vec<f64> = runs.iter().map(|r| r.final_accuracy).collect();
                let majority: Vec<f64> = runs.iter().filter_map(|r| r.majority_accuracy).collect();
                let mut seeds: Vec<u64> = runs.iter().map(|r| r.seed).collect();
                seeds.sort_unstable();
                let _ = writeln!(
                    w,
                    "| {} | {} ({}) | {} | {} | {} |",
                    method_label(&cell.method),
                    runs.len(),
                    seeds
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    Summary::of(&endpoints).map_or_else(|| "–".to_string(), |s| mean_ci(&s)),
                    Summary::of(&finals).map_or_else(|| "–".to_string(), |s| mean_ci(&s)),
                    Summary::of(&majority).map_or_else(|| "–".to_string(), |s| pct(s.mean)),
                );
            }
            let _ = writeln!(w);
        }
        let _ = writeln!(
            w,
            "![Held-out accuracy against round, mean over seeds with 95 % bands, one panel per \
             ε]({})\n",
            relative_link(md_dir, &study.plot)
        );
        let _ = writeln!(w, "## Compute and machine\n");
        let machines: Vec<String> = a
            .machines
            .iter()
            .map(|(m, n)| format!("{m} ({n} run{})", if *n == 1 { "" } else { "s" }))
            .collect();
        let _ = writeln!(
            w,
            "{} finished run{} took {} of training and evaluation (the sum of their rounds' \
             wall times{}), on: {}.\n",
            a.finished,
            if a.finished == 1 { "" } else { "s" },
            hours(a.wall_seconds),
            if a.runs_with_wall < a.finished {
                format!(
                    "; {} runs did not report theirs",
                    a.finished - a.runs_with_wall
                )
            } else {
                String::new()
            },
            machines.join("; ")
        );
        if !a.missing.is_empty() && a.runs_with_wall > 0 {
            let per_run = a.wall_seconds / a.runs_with_wall as f64;
            let _ = writeln!(
                w,
                "At the measured {} per run, the {} missing run{} need about {} more.\n",
                hours(per_run),
                a.missing.len(),
                if a.missing.len() == 1 { "" } else { "s" },
                hours(per_run * a.missing.len() as f64)
            );
        }
    }
    if let Some(probe) = &study.probe {
        probe_section(w, probe, md_dir)?;
    }
    if let Some(gn) = &study.gauss_newton {
        gauss_newton_section(w, gn)?;
    }
    for note in &def.notes {
        let _ = writeln!(w, "{note}\n");
    }
    let _ = writeln!(
        w,
        "## Reproducing this page\n\n```sh\n# rebuild every table and the plot from the \
         committed results (seconds)\ncargo run --release --bin fedsvd -- study {src}\n# run \
         the missing runs first (resumable across days)\ncargo run --release --bin fedsvd -- \
         study {src} --run\n```",
        src = study.source.display()
    );
    Ok(md)
}

/// Arguments of `fedsvd probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Rotten Tomatoes examples embedded (a seeded random sample).
    #[arg(long, default_value_t = 2000)]
    pub examples: usize,
    /// LoRA rank r of the probe's adapter.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Gradient-descent steps on B.
    #[arg(long, default_value_t = 200)]
    pub iterations: usize,
    /// Step size of gradient descent on B.
    #[arg(long, default_value_t = 400.0)]
    pub lr: f64,
    /// Independent draws of A (seeds 1..=N).
    #[arg(long, default_value_t = 5)]
    pub draws: u64,
    /// Truncate every text to this many tokens.
    #[arg(long, default_value_t = 64)]
    pub max_len: usize,
    /// Where the result goes (JSON), e.g. the study's `probe` file
    /// (default: `studies/results/probe-hessian.json`, or
    /// `studies/results/probe-gauss-newton.json` with --runs).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Instead of the logistic probe: the condition number of every LoRA
    /// module's Gauss–Newton matrix in B at the last checkpoint of these
    /// run folders (comma-separated), over its non-zero spectrum.
    #[arg(long, value_name = "DIR", value_delimiter = ',')]
    pub runs: Vec<PathBuf>,
    /// With --runs: training examples the matrix averages over (a seeded
    /// sample of all clients' examples, the same for every run).
    #[arg(long, default_value_t = 512)]
    pub gn_examples: usize,
    /// With --runs: eigenvalues below this fraction of the largest count
    /// as zero.
    #[arg(long, default_value_t = 1e-6)]
    pub cutoff: f64,
    /// The machine, as recorded with the result (default: from the system).
    #[arg(long, value_name = "TEXT")]
    pub machine: Option<String>,
}

/// The iterations at which κ is recorded.
const PROBE_RECORD: [usize; 9] = [0, 1, 2, 5, 10, 20, 50, 100, 200];

/// `probe-hessian.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProbeFile {
    features: String,
    examples: usize,
    positives: usize,
    dimension: usize,
    config: fedsvd::probe::ProbeConfig,
    /// One report per A draw (seeds 1..=draws).
    draws: Vec<fedsvd::probe::ProbeReport>,
    embed_seconds: f64,
    probe_seconds: f64,
    machine: String,
}

/// Runs `fedsvd probe`: embeds a sample of RT with the frozen MiniLM
/// (mean-pooled, L2-normalized) and records κ(H(B; A)) along training for
/// FFA-LoRA's A and FedSVD's refactorized A.
pub fn run_probe(args: ProbeArgs) -> anyhow::Result<()> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    if !args.runs.is_empty() {
        return crate::conditioning::run(&args);
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("studies/results/probe-hessian.json"));
    if args.examples < 2 || args.draws == 0 {
        bail!("--examples must be at least 2 and --draws at least 1");
    }
    let assets = crate::assets::ensure_default()?;
    let data = fedsvd_data::load(fedsvd_data::DatasetName::Rt, &assets, 0)?;
    let mut order: Vec<usize> = (0..data.examples.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha20Rng::seed_from_u64(0));
    order.truncate(args.examples);
    let dir = assets.join("models").join(fedsvd_model::MINILM_DIR);
    let weights =
        fedsvd_model::BertWeights::from_dir(&dir).context("loading the MiniLM weights")?;
    let tokenizer = fedsvd_model::Tokenizer::from_file(&dir.join("tokenizer.json"), args.max_len)?;
    let head = fedsvd_model::HeadConfig {
        num_labels: 1,
        pooling: fedsvd_model::Pooling::Mean,
    };
    let model = fedsvd_model::Model::new(weights, fedsvd_model::LoraConfig::default(), head)?;
    let dim = model.weights().config.hidden_size;
    let started = std::time::Instant::now();
    let mut x = ndarray::Array2::<f64>::zeros((order.len(), dim));
    let mut y = Vec::with_capacity(order.len());
    for (c, chunk) in order.chunks(64).enumerate() {
        let texts: Vec<&str> = chunk
            .iter()
            .map(|&i| data.examples[i].text.as_str())
            .collect();
        let batch = tokenizer.encode(&texts)?;
        let emb = model.embed(None, &batch)?;
        for (k, row) in emb.chunks_exact(dim).enumerate() {
            for (j, v) in row.iter().enumerate() {
                x[[c * 64 + k, j]] = f64::from(*v);
            }
        }
        y.extend(chunk.iter().map(|&i| data.examples[i].label as f64));
        eprint!("\rembedded {} of {}", (c * 64 + chunk.len()), order.len());
    }
    eprintln!();
    let embed_seconds = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let mut draws = Vec::new();
    for seed in 1..=args.draws {
        let config = fedsvd::probe::ProbeConfig {
            rank: args.rank,
            iterations: args.iterations,
            lr: args.lr,
            record: PROBE_RECORD
                .iter()
                .copied()
                .filter(|&t| t <= args.iterations)
                .collect(),
            seed,
        };
        draws.push(fedsvd::probe::hessian_probe(x.view(), &y, &config)?);
    }
    let file = ProbeFile {
        features: format!(
            "all-MiniLM-L6-v2, frozen, mean-pooled and L2-normalized, of Rotten Tomatoes \
             snippets (max {} tokens)",
            args.max_len
        ),
        examples: order.len(),
        positives: y.iter().filter(|&&v| v > 0.5).count(),
        dimension: dim,
        config: fedsvd::probe::ProbeConfig {
            rank: args.rank,
            iterations: args.iterations,
            lr: args.lr,
            record: PROBE_RECORD
                .iter()
                .copied()
                .filter(|&t| t <= args.iterations)
                .collect(),
            seed: 1,
        },
        draws,
        embed_seconds,
        probe_seconds: started.elapsed().as_secs_f64(),
        machine: args.machine.clone().unwrap_or_else(detect_machine),
    };
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fedsvd::runner::write_json_atomic(&out, &file)?;
    let mut text = String::new();
    probe_table(&mut text, &file);
    print!("{text}");
    println!("written: {}", out.display());
    Ok(())
}

/// min, mean and max of a column of the draws.
fn spread(values: &[f64]) -> String {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if values.len() > 1 {
        format!("{mean:.2} ({min:.2}–{max:.2})")
    } else {
        format!("{mean:.2}")
    }
}

fn probe_table(w: &mut String, p: &ProbeFile) {
    let _ = writeln!(
        w,
        "| iteration | FFA-LoRA κ(H) | FedSVD κ(H) | FFA-LoRA κ(A)² | FFA-LoRA loss | FedSVD loss |"
    );
    let _ = writeln!(w, "|---:|---:|---:|---:|---:|---:|");
    let Some(first) = p.draws.first() else {
        return;
    };
    for (i, point) in first.ffa.iter().enumerate() {
        let col = |f: &dyn Fn(&fedsvd::probe::ProbeReport) -> Option<f64>| -> Vec<f64> {
            p.draws.iter().filter_map(f).collect()
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} |",
            point.iteration,
            spread(&col(&|d| d.ffa.get(i).map(|q| q.kappa))),
            spread(&col(&|d| d.fedsvd.get(i).map(|q| q.kappa))),
            spread(&col(&|d| d.ffa.get(i).map(|q| q.kappa_a_squared))),
            spread(&col(&|d| d.ffa.get(i).map(|q| q.loss))),
            spread(&col(&|d| d.fedsvd.get(i).map(|q| q.loss))),
        );
    }
}

/// The mechanism section: the committed probe result, or a line saying it
/// has not been run.
fn probe_section(w: &mut String, probe: &Path, _md_dir: &Path) -> anyhow::Result<()> {
    let _ = writeln!(w, "## The mechanism: conditioning of the loss in B\n");
    if !probe.is_file() {
        let _ = writeln!(
            w,
            "Not measured yet (`{}` does not exist; `fedsvd probe --out {}` writes it).\n",
            probe.display(),
            probe.display()
        );
        return Ok(());
    }
    let p: ProbeFile = fedsvd::runner::read_json(probe)?;
    let _ = writeln!(
        w,
        "The paper's Table 9 probe, on our features: logistic regression with weight \
         w0 + B·A (w0 = 0, B = 0 at the start, one output, rank r = {}), trained by full-batch \
         gradient descent on B (step {}) over {} {} ({} positive, dimension {}). H(B; A) is \
         the Hessian of the mean cross-entropy with respect to B (r × r), κ = λ_max / λ_min \
         over its whole spectrum (no cut-off: H has full rank r here). FFA-LoRA keeps A at its \
         Kaiming-uniform draw; FedSVD refactorizes (B, A) after every step, so A is an \
         orthonormal basis of the same row space. Mean over {} draws of A (seeds 1–{}), range \
         in parentheses. Embedding took {:.0} s and the probe {:.1} s on {}. Source: `{}`.\n",
        p.config.rank,
        p.config.lr,
        p.examples,
        p.features,
        p.positives,
        p.dimension,
        p.draws.len(),
        p.draws.len(),
        p.embed_seconds,
        p.probe_seconds,
        p.machine,
        probe.display()
    );
    probe_table(w, &p);
    let last = |f: &dyn Fn(&fedsvd::probe::ProbeReport) -> Option<f64>| -> Option<f64> {
        let v: Vec<f64> = p.draws.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    if let (Some(ffa), Some(svd), Some(ka)) = (
        last(&|d| d.ffa.last().map(|q| q.kappa)),
        last(&|d| d.fedsvd.last().map(|q| q.kappa)),
        last(&|d| d.ffa.last().map(|q| q.kappa_a_squared)),
    ) {
        let _ = writeln!(
            w,
            "\nReading: after the last iteration κ(H) is {ffa:.2} with FFA-LoRA's A and \
             {svd:.2} with FedSVD's (mean over the draws). The factor FedSVD removes is κ(A)², \
             {ka:.2} on average for a Kaiming-uniform A of r × d = {} × {}; the rest is the conditioning of the \
             features on A's row space, which the refactorization keeps. The paper reports \
             about 10.2 against 1.5 on BERT features of SST-2.",
            p.config.rank, p.dimension
        );
    }
    let _ = writeln!(w);
    Ok(())
}

/// The Gauss–Newton conditioning of each module at the end of real runs,
/// or a line saying it has not been measured.
fn gauss_newton_section(w: &mut String, path: &Path) -> anyhow::Result<()> {
    let _ = writeln!(
        w,
        "### At the end of real runs: each module's Gauss–Newton matrix in B
"
    );
    if !path.is_file() {
        let _ = writeln!(
            w,
            "Not measured yet (`{}` does not exist; `fedsvd probe --runs DIR,DIR --out {}` \
             writes it from a FedSVD and an FFA-LoRA run folder).\n",
            path.display(),
            path.display()
        );
        return Ok(());
    }
    let g = crate::conditioning::read(path)?;
    let runs: Vec<String> = g
        .runs
        .iter()
        .map(|r| {
            format!(
                "{} (`{}`, {} rounds)",
                crate::report::method_label(&r.method),
                r.dir,
                r.rounds
            )
        })
        .collect();
    let params = g
        .runs
        .first()
        .and_then(|r| r.modules.first())
        .map_or(0, |m| m.parameters);
    let seconds: f64 = g.runs.iter().map(|r| r.seconds).sum();
    let _ = writeln!(
        w,
        "For each LoRA module, G = (1/n) Σ_i J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i, the Gauss–Newton \
         matrix of the mean cross-entropy with respect to that module's B ({params} entries; \
         J_i = ∂logits_i/∂B, no dropout), at the last checkpoint of: {}. n = {} training \
         examples, one seeded sample of the pooled clients shared by every run. κ = λ_max / \
         λ_min over the non-zero spectrum: eigenvalues below {:.0e} · λ_max count as zero (with \
         two labels each example adds a rank-one term, so at most n are non-zero); the number \
         kept is in parentheses. Measured in {seconds:.0} s on {} by `fedsvd probe --runs {} \
         --gn-examples {} --cutoff {:.0e} --out {}`.\n",
        runs.join(" and "),
        g.examples,
        g.cutoff,
        g.machine,
        g.runs
            .iter()
            .map(|r| r.dir.as_str())
            .collect::<Vec<_>>()
            .join(","),
        g.examples,
        g.cutoff,
        path.display()
    );
    let _ = writeln!(w, "{}", crate::conditioning::table(&g));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalize_and_link_relative_to_the_markdown() {
        let md = normalize(Path::new("studies/../docs/results.md"));
        let plot = normalize(Path::new("studies/../docs/img/plot.svg"));
        assert_eq!(md, PathBuf::from("docs/results.md"));
        assert_eq!(relative_link(md.parent().unwrap(), &plot), "img/plot.svg");
        assert_eq!(
            relative_link(Path::new("docs"), Path::new("studies/results/t.csv")),
            "../studies/results/t.csv"
        );
        assert_eq!(normalize(Path::new("../a/./b")), PathBuf::from("../a/b"));
    }

    #[test]
    fn verdicts_follow_the_interval() {
        let higher = Summary::of(&[0.02, 0.03, 0.04]).unwrap();
        let around = Summary::of(&[-0.02, 0.03, 0.01]).unwrap();
        let lower = Summary::of(&[-0.02, -0.03, -0.04]).unwrap();
        let one = Summary::of(&[0.5]).unwrap();
        assert_eq!(
            verdict("fedsvd", "ffa", Some(&higher)),
            "FedSVD higher than FFA-LoRA"
        );
        assert_eq!(
            verdict("fedsvd", "ffa", Some(&lower)),
            "FedSVD lower than FFA-LoRA"
        );
        assert!(verdict("fedsvd", "ffa", Some(&around)).starts_with("no difference"));
        assert!(verdict("fedsvd", "ffa", Some(&one)).contains("no interval"));
        assert_eq!(verdict("fedsvd", "ffa", None), "no paired seeds yet");
    }

    #[test]
    fn paired_interval_of_five_seeds_uses_four_degrees_of_freedom() {
        // Differences 1, 2, 3, 4, 5 pp: mean 3, s = √2.5, t(0.975, 4) =
        // 2.776445105 (statistics tables), half-width 2.776445·√2.5/√5.
        let d = [0.01, 0.02, 0.03, 0.04, 0.05];
        let s = Summary::of(&d).unwrap();
        let half = 2.776_445_105 * (2.5f64).sqrt() / 5f64.sqrt() / 100.0;
        assert!((s.mean - 0.03).abs() < 1e-12);
        assert!((s.ci95_half_width.unwrap() - half).abs() < 1e-9, "{s:?}");
        assert_eq!(
            verdict("fedsvd", "fedavg", Some(&s)),
            "FedSVD higher than FedAvg-LoRA"
        );
    }

    #[test]
    fn epsilons_are_numbers_or_inf() {
        assert_eq!(parse_epsilon(&serde_json::json!(6)).unwrap(), Some(6.0));
        assert_eq!(parse_epsilon(&serde_json::json!("inf")).unwrap(), None);
        assert!(parse_epsilon(&serde_json::json!(0)).is_err());
        assert!(parse_epsilon(&serde_json::json!("six")).is_err());
    }

    fn write_study(dir: &Path, body: Value) -> PathBuf {
        let path = dir.join("s.json");
        fs::write(&path, body.to_string()).unwrap();
        path
    }

    fn base_study() -> Value {
        serde_json::json!({
            "name": "t",
            "question": "Q?",
            "preset": "quick",
            "set": ["federation.eval_every=1"],
            "methods": ["fedsvd", "ffa"],
            "epsilons": [6, "inf"],
            "seeds": [1, 2],
            "reference": "fedsvd",
            "results": "results/t",
            "markdown": "../docs/r.md",
            "plot": "../docs/img/t.svg",
            "table": "results/t.csv"
        })
    }

    #[test]
    fn a_study_resolves_a_seed_major_paired_grid() {
        let tmp = tempfile::tempdir().unwrap();
        let study = Study::load(&write_study(tmp.path(), base_study())).unwrap();
        let names: Vec<&str> = study.cells.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "fedsvd-eps6-seed1",
                "ffa-eps6-seed1",
                "fedsvd-epsinf-seed1",
                "ffa-epsinf-seed1",
                "fedsvd-eps6-seed2",
                "ffa-eps6-seed2",
                "fedsvd-epsinf-seed2",
                "ffa-epsinf-seed2"
            ]
        );
        for c in &study.cells {
            assert_eq!(c.config.data.seed, c.seed);
            assert_eq!(c.config.federation.seed, Some(c.seed));
            assert_eq!(c.config.federation.eval_every, 1);
        }
        assert_eq!(study.markdown, normalize(&tmp.path().join("../docs/r.md")));
    }

    #[test]
    fn bad_studies_are_refused_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let cases = [
            ("reference", serde_json::json!("fedex"), "reference"),
            ("methods", serde_json::json!(["fedsvd"]), "at least two"),
            ("seeds", serde_json::json!([1, 1]), "distinct"),
            ("epsilons", serde_json::json!([6, "x"]), "epsilons"),
            ("preset", serde_json::json!("huge"), "preset"),
            ("set", serde_json::json!(["federation.nope=1"]), "nope"),
            ("name", serde_json::json!("a b"), "name"),
        ];
        for (key, value, want) in cases {
            let mut body = base_study();
            body[key] = value;
            let err = format!(
                "{:#}",
                Study::load(&write_study(tmp.path(), body)).unwrap_err()
            );
            assert!(err.contains(want), "{key}: {err}");
        }
        let mut body = base_study();
        body["extra"] = serde_json::json!(1);
        let err = Study::load(&write_study(tmp.path(), body))
            .unwrap_err()
            .to_string();
        assert!(err.contains("extra"), "{err}");
    }

    #[test]
    fn an_empty_results_folder_says_pending_and_invents_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let study = Study::load(&write_study(tmp.path(), base_study())).unwrap();
        let a = analyze(&study).unwrap();
        assert_eq!((a.finished, a.missing.len()), (0, 8));
        let md = markdown(&study, &a).unwrap();
        assert!(
            md.contains("The grid is pending: 0 of 8 runs have finished"),
            "{md}"
        );
        assert!(md.contains("--run"), "{md}");
        assert!(!md.contains('%') || !md.contains("| FedSVD |"), "{md}");
        assert!(!md.contains("## The answer"), "{md}");
    }
}
