//! `fedsvd audit`: an empirical lower bound on one client's ε from one
//! training run with canaries (Steinke, Nasr & Jagielski 2023), printed next
//! to the accountant's ε and written to `audit.json`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use fedsvd::{AuditConfig, CanaryMode};

use crate::config::{ConfigOptions, Preset, resolve};

/// The kind of canary, as on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// White-box canaries in the trainable factors' gradients.
    Gradient,
    /// Random-text examples with random labels.
    Input,
}

/// Arguments of `fedsvd audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The run to audit: a preset (quick: about a minute on 2 cores).
    #[arg(long, value_enum, default_value_t = Preset::Quick)]
    pub preset: Preset,
    /// A JSON config merged over the preset.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The method (default: the preset's).
    #[arg(long, value_name = "NAME")]
    pub method: Option<String>,
    /// Override one config key by its dotted path (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Which client's guarantee to audit.
    #[arg(long, default_value_t = 0)]
    pub client: usize,
    /// The kind of canary.
    #[arg(long, value_enum, default_value_t = Mode::Gradient)]
    pub mode: Mode,
    /// Number of canaries m, each included with probability 1/2.
    #[arg(long, default_value_t = 1000)]
    pub canaries: usize,
    /// Seed of the canaries and their inclusion.
    #[arg(long, default_value_t = 0)]
    pub canary_seed: u64,
    /// Where to write audit.json (default: runs/audit-<preset>-<UTC time>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `fedsvd audit`.
pub fn run(args: AuditArgs) -> anyhow::Result<()> {
    let options = ConfigOptions {
        preset: Some(args.preset),
        file: args.config.as_deref(),
        method: args.method.as_deref(),
        sets: &args.sets,
    };
    let config = resolve(&options)?;
    let assets = crate::assets::ensure_default()?;
    let audit = AuditConfig {
        mode: match args.mode {
            Mode::Gradient => CanaryMode::Gradient,
            Mode::Input => CanaryMode::Input,
        },
        canaries: args.canaries,
        seed: args.canary_seed,
        ..AuditConfig::default()
    };
    if !args.json {
        eprintln!(
            "auditing client {} of the {} preset ({}) with {} {} canaries",
            args.client,
            args.preset.name(),
            config.federation.method,
            args.canaries,
            audit.mode.name()
        );
    }
    let report = fedsvd::audit_run(&config, &assets, args.client, &audit)?;
    let dir = args.out.unwrap_or_else(|| {
        crate::run::default_run_dir(&format!("audit-{}", args.preset.name()), audit.mode.name())
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("audit.json");
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&path, format!("{text}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    if args.json {
        println!("{text}");
    } else {
        println!(
            "empirical epsilon >= {:.3} ({:.0} % confidence, {} of {} guesses right, {} canaries, {} included)",
            report.epsilon_lower_bound,
            report.confidence * 100.0,
            report.correct,
            report.guesses,
            report.canaries,
            report.included
        );
        println!(
            "accountant epsilon  = {:.3} at delta = {} (sigma {:.4}, q {:.4}, {} steps)",
            report.epsilon_accountant,
            report.delta,
            report.noise_multiplier,
            report.sample_rate,
            report.steps
        );
        println!("written: {}", path.display());
    }
    Ok(())
}
