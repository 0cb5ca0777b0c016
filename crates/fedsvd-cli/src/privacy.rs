//! `fedsvd privacy …`: ε of a DP-SGD run, and the noise for a target ε.

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use fedsvd_dp::{Accountant, AccountantKind, HistoryEntry, calibrate_noise};
use serde::Serialize;

/// Privacy accounting subcommands.
#[derive(Debug, Subcommand)]
pub enum PrivacyCommand {
    /// ε spent by `steps` DP-SGD steps with noise multiplier σ and Poisson
    /// sampling rate q, at δ.
    Epsilon(EpsilonArgs),
    /// The smallest noise multiplier whose ε at δ is at most the target
    /// (within the tolerance below it).
    Noise(NoiseArgs),
}

/// Accountant choice on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AccountantArg {
    /// Rényi DP (Opacus's RDPAccountant, default orders).
    Rdp,
    /// Privacy random variables (Opacus's PRVAccountant); tighter.
    Prv,
}

impl From<AccountantArg> for AccountantKind {
    fn from(a: AccountantArg) -> Self {
        match a {
            AccountantArg::Rdp => AccountantKind::Rdp,
            AccountantArg::Prv => AccountantKind::Prv,
        }
    }
}

/// Options shared by both subcommands.
#[derive(Debug, Args)]
pub struct MechanismArgs {
    /// Poisson sampling rate q (expected batch size / dataset size).
    #[arg(long)]
    sample_rate: f64,
    /// Number of DP-SGD steps.
    #[arg(long)]
    steps: u64,
    /// δ of the (ε, δ) guarantee.
    #[arg(long)]
    delta: f64,
    /// Accountant.
    #[arg(long, value_enum, default_value = "prv")]
    accountant: AccountantArg,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Options of `fedsvd privacy epsilon`.
#[derive(Debug, Args)]
pub struct EpsilonArgs {
    /// Noise multiplier σ (noise std / clipping norm).
    #[arg(long)]
    noise_multiplier: f64,
    #[command(flatten)]
    mechanism: MechanismArgs,
}

/// Options of `fedsvd privacy noise`.
#[derive(Debug, Args)]
pub struct NoiseArgs {
    /// Target ε.
    #[arg(long)]
    epsilon: f64,
    /// The calibrated σ's ε lies in [target − tolerance, target].
    #[arg(long, default_value_t = fedsvd_dp::DEFAULT_EPSILON_TOLERANCE)]
    epsilon_tolerance: f64,
    #[command(flatten)]
    mechanism: MechanismArgs,
}

/// The JSON printed with `--json` (key order as documented).
#[derive(Debug, Serialize)]
struct Report {
    accountant: AccountantKind,
    epsilon: f64,
    delta: f64,
    noise_multiplier: f64,
    sample_rate: f64,
    steps: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    order: Option<f64>,
}

/// Runs a privacy subcommand.
pub fn run(command: PrivacyCommand) -> anyhow::Result<()> {
    match command {
        PrivacyCommand::Epsilon(args) => print_report(&epsilon(&args)?, false),
        PrivacyCommand::Noise(args) => print_report(&noise(&args)?, true),
    }
}

/// Prints the report: one JSON object when `--json` was given (the bool).
fn print_report(report: &(Report, bool), calibrated: bool) -> anyhow::Result<()> {
    let (r, json) = report;
    if *json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    if calibrated {
        println!(
            "noise multiplier = {:.6} gives epsilon = {:.4} at delta = {:e}",
            r.noise_multiplier, r.epsilon, r.delta
        );
    } else {
        println!("epsilon = {:.4} at delta = {:e}", r.epsilon, r.delta);
    }
    let order = r
        .order
        .map(|o| format!(", optimal Renyi order {o}"))
        .unwrap_or_default();
    println!(
        "  {} accountant: noise multiplier {}, sample rate {}, {} steps{order}",
        r.accountant, r.noise_multiplier, r.sample_rate, r.steps
    );
    Ok(())
}

fn epsilon(args: &EpsilonArgs) -> anyhow::Result<(Report, bool)> {
    let m = &args.mechanism;
    let kind = AccountantKind::from(m.accountant);
    let entry = HistoryEntry::new(args.noise_multiplier, m.sample_rate, m.steps)
        .context("invalid mechanism")?;
    let spent = Accountant::new(kind)
        .epsilon(&[entry], m.delta)
        .with_context(|| format!("computing epsilon with the {kind} accountant"))?;
    Ok((
        Report {
            accountant: kind,
            epsilon: spent.epsilon,
            delta: m.delta,
            noise_multiplier: args.noise_multiplier,
            sample_rate: m.sample_rate,
            steps: m.steps,
            order: spent.order,
        },
        m.json,
    ))
}

fn noise(args: &NoiseArgs) -> anyhow::Result<(Report, bool)> {
    let m = &args.mechanism;
    let kind = AccountantKind::from(m.accountant);
    let cal = calibrate_noise(
        &Accountant::new(kind),
        args.epsilon,
        m.sample_rate,
        m.steps,
        m.delta,
        args.epsilon_tolerance,
    )
    .with_context(|| format!("calibrating the noise multiplier with the {kind} accountant"))?;
    Ok((
        Report {
            accountant: kind,
            epsilon: cal.epsilon,
            delta: m.delta,
            noise_multiplier: cal.noise_multiplier,
            sample_rate: m.sample_rate,
            steps: m.steps,
            order: cal.order,
        },
        m.json,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mechanism(accountant: AccountantArg) -> MechanismArgs {
        MechanismArgs {
            sample_rate: 0.01,
            steps: 1000,
            delta: 1e-5,
            accountant,
            json: true,
        }
    }

    #[test]
    fn epsilon_json_has_the_documented_keys_in_order() {
        let args = EpsilonArgs {
            noise_multiplier: 1.0,
            mechanism: mechanism(AccountantArg::Rdp),
        };
        let (report, json) = epsilon(&args).unwrap();
        assert!(json);
        let text = serde_json::to_string(&report).unwrap();
        let keys: Vec<&str> = [
            "accountant",
            "epsilon",
            "delta",
            "noise_multiplier",
            "sample_rate",
            "steps",
            "order",
        ]
        .to_vec();
        let mut last = 0;
        for k in &keys {
            let at = text
                .find(&format!("\"{k}\""))
                .unwrap_or_else(|| panic!("{k} in {text}"));
            assert!(at >= last, "{k} out of order in {text}");
            last = at;
        }
        assert!(text.contains("\"accountant\":\"rdp\""));
        // PRV reports no order.
        let args = EpsilonArgs {
            noise_multiplier: 1.0,
            mechanism: mechanism(AccountantArg::Prv),
        };
        let text = serde_json::to_string(&epsilon(&args).unwrap().0).unwrap();
        assert!(!text.contains("order") && text.contains("\"accountant\":\"prv\""));
    }

    #[test]
    fn noise_reports_the_achieved_epsilon() {
        let args = NoiseArgs {
            epsilon: 6.0,
            epsilon_tolerance: 0.01,
            mechanism: mechanism(AccountantArg::Rdp),
        };
        let (report, _) = noise(&args).unwrap();
        assert!(report.epsilon <= 6.0 && report.epsilon >= 5.99);
        assert!(report.noise_multiplier > 0.5 && report.noise_multiplier < 1.0);
        let bad = NoiseArgs {
            epsilon: 6.0,
            epsilon_tolerance: 0.01,
            mechanism: MechanismArgs {
                delta: 0.0,
                ..mechanism(AccountantArg::Rdp)
            },
        };
        assert!(noise(&bad).is_err());
    }
}
