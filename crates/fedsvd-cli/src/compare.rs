//! `fedsvd compare`: a grid of runs (methods × privacy levels × seeds), each
//! in its own run folder, then the results tables and plots.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use fedsvd::runner::files;
use fedsvd::{RunConfig, Runner};
use serde_json::Value;

use crate::config::{ConfigOptions, Preset, resolve_value, to_run_config};

/// Arguments of `fedsvd compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// A JSON config merged over the preset (as for `fedsvd run`); the grid
    /// overrides its method, ε and seed.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Starting point: quick, default or paper (as for `fedsvd run`).
    #[arg(long, value_enum, default_value_t = Preset::Default)]
    pub preset: Preset,
    /// Methods to compare, comma-separated: fedsvd, ffa, fedavg, flora, fedex.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fedsvd,ffa,fedavg,flora,fedex"
    )]
    pub methods: Vec<String>,
    /// Number of seeds per (method, ε). Seed s seeds the noise, the client
    /// sampling and the initialization, and draws its own split and
    /// partition (data.seed = s); runs are paired by seed: the same seed
    /// gives every method the same clients and the same client sampling.
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Keep the config's data.seed for every seed (one split and partition
    /// for the whole grid, as fedsvd compare did before it drew one per
    /// seed).
    #[arg(long)]
    pub same_data: bool,
    /// Privacy levels, comma-separated; `inf` trains without DP.
    #[arg(long, value_delimiter = ',', default_value = "6")]
    pub epsilons: Vec<String>,
    /// Override one config key for every run (as for `fedsvd run`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Where to compute: auto (a usable CUDA device, which trains every
    /// method, else the CPU), cpu or cuda (the key model.device). A grid may
    /// resume on another device than it started on.
    #[arg(long, value_name = "DEVICE", value_parser = ["auto", "cpu", "cuda"])]
    pub device: Option<String>,
    /// GEMM precision of the frozen encoder on a GPU: f32, tf32 or bf16 (the
    /// key model.precision).
    #[arg(long, value_name = "P", value_parser = ["f32", "tf32", "bf16"])]
    pub precision: Option<String>,
    /// Output folder: run folders go to OUT/runs/, the results to OUT.
    #[arg(long, value_name = "DIR", default_value = "runs/compare")]
    pub out: PathBuf,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Parses `6`, `3.5` or `inf` (`None`: no DP).
fn parse_epsilon(text: &str) -> anyhow::Result<Option<f64>> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("inf") || t == "∞" {
        return Ok(None);
    }
    match t.parse::<f64>() {
        Ok(e) if e.is_finite() && e > 0.0 => Ok(Some(e)),
        _ => bail!("--epsilons: {text:?} is not a positive number or `inf`"),
    }
}

fn epsilon_label(eps: Option<f64>) -> String {
    eps.map_or_else(|| "inf".to_string(), |e| format!("{e}"))
}

/// Runs `fedsvd compare`.
pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let epsilons = args
        .epsilons
        .iter()
        .map(|e| parse_epsilon(e))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for m in &args.methods {
        fedsvd::Method::from_name(m).map_err(|e| anyhow::anyhow!("--methods: {e}"))?;
    }
    // Resolve every configuration before running anything, so a bad option
    // fails in the first second, not after hours.
    let sets = crate::run::device_sets(
        &args.sets,
        args.device.as_deref(),
        args.precision.as_deref(),
    );
    let spec = GridSpec {
        preset: args.preset,
        config: args.config.as_deref(),
        sets: &sets,
        same_data: args.same_data,
    };
    let mut grid = Vec::new();
    for &eps in &epsilons {
        for method in &args.methods {
            for seed in 1..=args.seeds {
                let cell = spec.cell(method, eps, seed)?;
                let dir = args.out.join("runs").join(&cell.name);
                if dir.join(files::CONFIG).is_file() {
                    check_same_config(&dir, &cell.config)?;
                }
                grid.push((dir, cell.config));
            }
        }
    }
    let assets = crate::assets::ensure_default()?;
    let total = grid.len();
    for (i, (dir, config)) in grid.into_iter().enumerate() {
        let label = format!(
            "[{}/{total}] {}",
            i + 1,
            dir.file_name().unwrap_or_default().to_string_lossy()
        );
        if dir.join(files::SUMMARY).is_file() {
            if !args.quiet {
                eprintln!("{label}: finished earlier, kept");
            }
            continue;
        }
        let mut runner = if dir.join(files::CONFIG).is_file() {
            if !args.quiet {
                eprintln!("{label}: resuming");
            }
            Runner::resume_on(&dir, &assets, args.device.as_deref())
                .with_context(|| format!("resuming {}", dir.display()))?
        } else {
            if !args.quiet {
                eprintln!("{label}: starting");
            }
            Runner::create(config, &dir, &assets)
                .with_context(|| format!("starting {}", dir.display()))?
        };
        let summary = crate::run::drive(&mut runner, args.quiet)?;
        crate::export::export_run(&runner, &assets)?;
        if !args.quiet {
            eprintln!("{label}: {}", crate::run::headline(&summary));
        }
    }
    crate::report::write_compare_report(&args.out)?;
    Ok(())
}

/// What every cell of a grid shares: the preset, the user's config file,
/// the `--set` overrides and whether the data layout follows the seed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GridSpec<'a> {
    /// The starting point.
    pub preset: Preset,
    /// A JSON config merged over the preset.
    pub config: Option<&'a Path>,
    /// `key=value` overrides for every run.
    pub sets: &'a [String],
    /// Keep the config's data.seed instead of drawing one per seed.
    pub same_data: bool,
}

/// One run of a grid: its folder name and complete configuration.
#[derive(Debug, Clone)]
pub(crate) struct GridCell {
    /// `<method>-eps<ε>-seed<s>`, the run folder's name.
    pub name: String,
    /// The resolved configuration.
    pub config: RunConfig,
}

impl GridSpec<'_> {
    /// The configuration of (method, ε, seed): the method, ε (`None`: no
    /// DP) and `federation.seed = seed` over the resolved config, and
    /// `data.seed = seed` unless `same_data`, so each seed draws its own
    /// split and partition and every method of a seed shares them.
    pub fn cell(&self, method: &str, epsilon: Option<f64>, seed: u64) -> anyhow::Result<GridCell> {
        let options = ConfigOptions {
            preset: Some(self.preset),
            file: self.config,
            method: Some(method),
            sets: self.sets,
        };
        let mut value = resolve_value(&options)?;
        value["federation"]["privacy"]["epsilon"] = epsilon.map_or(Value::Null, Value::from);
        value["federation"]["seed"] = Value::from(seed);
        if !self.same_data {
            value["data"]["seed"] = Value::from(data_seed(seed));
        }
        let name = run_name(method, epsilon, seed);
        let config = to_run_config(value, &name)?;
        Ok(GridCell { name, config })
    }
}

/// The data seed (split and partition) of a grid seed: the seed itself, so
/// a run folder's config.json shows the pairing at a glance.
pub(crate) fn data_seed(seed: u64) -> u64 {
    seed
}

/// `<method>-eps<ε>-seed<s>` (`inf` for no DP).
pub(crate) fn run_name(method: &str, epsilon: Option<f64>, seed: u64) -> String {
    format!("{method}-eps{}-seed{seed}", epsilon_label(epsilon))
}

/// Refuses a run folder whose `config.json` differs from the configuration
/// the grid asks for (an older grid, an edited study, another preset), so
/// that runs of different set-ups are never resumed or reported as one
/// cell. The message names the keys that differ.
pub(crate) fn check_same_config(dir: &Path, wanted: &RunConfig) -> anyhow::Result<()> {
    let path = dir.join(files::CONFIG);
    let existing: RunConfig =
        fedsvd::runner::read_json(&path).with_context(|| format!("reading {}", path.display()))?;
    // Where a run computes is not part of what it is: a grid may resume on
    // another device (seeded runs are reproducible per device kind).
    let wanted = &fedsvd::RunConfig {
        model: fedsvd::ModelConfig {
            device: existing.model.device,
            ..wanted.model.clone()
        },
        ..wanted.clone()
    };
    if &existing == wanted {
        return Ok(());
    }
    let mut keys = Vec::new();
    json_diff(
        &serde_json::to_value(&existing)?,
        &serde_json::to_value(wanted)?,
        String::new(),
        &mut keys,
    );
    let shown: Vec<String> = keys.iter().take(6).cloned().collect();
    bail!(
        "{} was started with a different configuration than this grid asks for ({}{}); \
         finish it with its own settings elsewhere, remove it, or choose another output folder \
         (a grid started before each seed drew its own partition resumes with --same-data)",
        dir.display(),
        if shown.is_empty() {
            "differences below printing precision".to_string()
        } else {
            shown.join("; ")
        },
        if keys.len() > shown.len() {
            "; …"
        } else {
            ""
        }
    )
}

/// Dotted paths where `a` and `b` differ, as `key: a → b`.
fn json_diff(a: &Value, b: &Value, path: String, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for key in keys {
                let sub = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                json_diff(
                    x.get(key).unwrap_or(&Value::Null),
                    y.get(key).unwrap_or(&Value::Null),
                    sub,
                    out,
                );
            }
        }
        _ if a != b => out.push(format!("{path}: {a} in the folder, {b} wanted")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epsilons_parse_with_inf_as_non_private() {
        assert_eq!(parse_epsilon("6").unwrap(), Some(6.0));
        assert_eq!(parse_epsilon(" 3.5 ").unwrap(), Some(3.5));
        assert_eq!(parse_epsilon("inf").unwrap(), None);
        assert!(parse_epsilon("0").is_err());
        assert!(parse_epsilon("-1").is_err());
        assert!(parse_epsilon("six").is_err());
        assert_eq!(epsilon_label(None), "inf");
        assert_eq!(epsilon_label(Some(6.0)), "6");
    }

    fn spec(same_data: bool) -> GridSpec<'static> {
        GridSpec {
            preset: Preset::Quick,
            config: None,
            sets: &[],
            same_data,
        }
    }

    #[test]
    fn each_seed_draws_its_own_data_and_methods_share_it() {
        let a = spec(false).cell("fedsvd", Some(6.0), 2).unwrap();
        let b = spec(false).cell("ffa", Some(6.0), 2).unwrap();
        let c = spec(false).cell("fedsvd", Some(6.0), 3).unwrap();
        assert_eq!(a.name, "fedsvd-eps6-seed2");
        assert_eq!(a.config.data, b.config.data);
        assert_eq!(a.config.federation.seed, Some(2));
        assert_eq!(b.config.federation.seed, Some(2));
        assert_eq!(a.config.data.seed, 2);
        assert_eq!(c.config.data.seed, 3);
        let non_private = spec(false).cell("ffa", None, 1).unwrap();
        assert_eq!(non_private.name, "ffa-epsinf-seed1");
        assert_eq!(non_private.config.federation.privacy.epsilon, None);
    }

    #[test]
    fn same_data_keeps_the_config_seed() {
        let preset_seed = spec(true)
            .cell("fedsvd", Some(6.0), 1)
            .unwrap()
            .config
            .data
            .seed;
        let cell = spec(true).cell("fedsvd", Some(6.0), 4).unwrap();
        assert_eq!(cell.config.data.seed, preset_seed);
        assert_eq!(cell.config.federation.seed, Some(4));
    }

    #[test]
    fn a_folder_of_another_configuration_is_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let old = spec(true).cell("fedsvd", Some(6.0), 3).unwrap();
        fedsvd::runner::write_json_atomic(&dir.path().join(files::CONFIG), &old.config).unwrap();
        check_same_config(dir.path(), &old.config).unwrap();
        let new = spec(false).cell("fedsvd", Some(6.0), 3).unwrap();
        let err = check_same_config(dir.path(), &new.config)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("data.seed: 1 in the folder, 3 wanted"),
            "{err}"
        );
        assert!(err.contains("--same-data"), "{err}");
    }
}
