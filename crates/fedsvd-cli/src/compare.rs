//! `fedsvd compare`: a grid of runs (methods × privacy levels × seeds), each
//! in its own run folder, then the results tables and plots.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use fedsvd::Runner;
use fedsvd::runner::files;
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
    /// Number of seeds per (method, ε); seeds 1..=N seed the noise, the
    /// client sampling and the initialization (the data split and partition
    /// stay those of the config, so every run sees the same clients).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Privacy levels, comma-separated; `inf` trains without DP.
    #[arg(long, value_delimiter = ',', default_value = "6")]
    pub epsilons: Vec<String>,
    /// Override one config key for every run (as for `fedsvd run`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
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
    let mut grid = Vec::new();
    for &eps in &epsilons {
        for method in &args.methods {
            for seed in 1..=args.seeds {
                let options = ConfigOptions {
                    preset: Some(args.preset),
                    file: args.config.as_deref(),
                    method: Some(method),
                    sets: &args.sets,
                };
                let mut value = resolve_value(&options)?;
                value["federation"]["privacy"]["epsilon"] = eps.map_or(Value::Null, Value::from);
                value["federation"]["seed"] = Value::from(seed);
                let name = format!("{method}-eps{}-seed{seed}", epsilon_label(eps));
                let config = to_run_config(value, &name)?;
                grid.push((args.out.join("runs").join(&name), config));
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
            Runner::resume(&dir, &assets).with_context(|| format!("resuming {}", dir.display()))?
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
            eprintln!(
                "{label}: accuracy {:.4} (majority {:.4})",
                summary.final_accuracy, summary.majority_accuracy
            );
        }
    }
    crate::report::write_compare_report(&args.out)?;
    Ok(())
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
}
