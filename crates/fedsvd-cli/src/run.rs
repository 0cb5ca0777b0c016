//! `fedsvd run`: one federated fine-tuning run, from a preset or a config
//! file, with progress, a run folder and an exported adapter.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use fedsvd::{RoundMetrics, RunSummary, Runner};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::{ConfigOptions, Preset, resolve, resolve_value};

/// Arguments of `fedsvd run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A JSON config merged over the preset; it needs only the keys it
    /// changes (see --print-config for every key).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Starting point: quick (about a minute on 2 cores), default (about 10
    /// minutes: MiniLM on Rotten Tomatoes with FedSVD at ε = 6, δ = 1e-5,
    /// 6 clients, Dirichlet α = 0.5, all 6 in each of 20 rounds), or paper
    /// (the paper's hyper-parameters; hours).
    #[arg(long, value_enum, default_value_t = Preset::Default)]
    pub preset: Preset,
    /// The method: fedsvd, ffa, fedavg, flora or fedex (default: the preset's,
    /// fedsvd).
    #[arg(long, value_name = "NAME")]
    pub method: Option<String>,
    /// Override one config key by its dotted path, e.g. --set
    /// federation.rounds=10 --set federation.privacy.epsilon=3 (null disables
    /// DP). Repeatable; applied after --config and --method.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Run folder (default: runs/<preset>-<method>-<UTC time>). It must not
    /// hold a run already.
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in DIR from its last checkpoint; its config.json is
    /// used and every other option is refused.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "method", "sets"])]
    pub resume: Option<PathBuf>,
    /// Where to compute: auto (a usable CUDA device, which trains every
    /// method, else the CPU), cpu or cuda (the key model.device).
    #[arg(long, value_name = "DEVICE", value_parser = ["auto", "cpu", "cuda"])]
    pub device: Option<String>,
    /// GEMM precision of the frozen encoder on a GPU: f32, tf32 or bf16 (the
    /// key model.precision).
    #[arg(long, value_name = "P", value_parser = ["f32", "tf32", "bf16"], conflicts_with = "resume")]
    pub precision: Option<String>,
    /// Print the resolved configuration as JSON and exit without running.
    #[arg(long)]
    pub print_config: bool,
    /// No progress output; only the final summary line.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Runs `fedsvd run`.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let sets = device_sets(
        &args.sets,
        args.device.as_deref(),
        args.precision.as_deref(),
    );
    let options = ConfigOptions {
        preset: Some(args.preset),
        file: args.config.as_deref(),
        method: args.method.as_deref(),
        sets: &sets,
    };
    if args.print_config {
        // Checked first, so a printed config is always a valid one.
        resolve(&options)?;
        println!(
            "{}",
            serde_json::to_string_pretty(&resolve_value(&options)?)?
        );
        return Ok(());
    }
    let assets = match &args.resume {
        Some(_) => crate::assets::ensure_default()?,
        None => crate::assets::ensure_for(&resolve(&options)?)?,
    };
    let mut runner = match &args.resume {
        Some(dir) => {
            let runner = Runner::resume_on(dir, &assets, args.device.as_deref())
                .with_context(|| format!("resuming the run in {}", dir.display()))?;
            if !args.quiet {
                eprintln!(
                    "resuming {} after round {} of {}",
                    dir.display(),
                    runner.history().len(),
                    runner.config().federation.rounds
                );
            }
            runner
        }
        None => {
            let config = resolve(&options)?;
            let dir = args.out.clone().unwrap_or_else(|| {
                default_run_dir(args.preset.name(), config.federation.method.name())
            });
            if !args.quiet {
                eprintln!(
                    "preparing {} on {} ({} clients) in {}",
                    config.federation.method,
                    config.data.dataset,
                    config.data.clients,
                    dir.display()
                );
            }
            Runner::create(config, &dir, &assets)
                .with_context(|| format!("starting the run in {}", dir.display()))?
        }
    };
    let summary = drive(&mut runner, args.quiet)?;
    let export = crate::export::export_run(&runner, &assets)?;
    print_summary(&runner, &summary, export.as_deref());
    Ok(())
}

/// `--set` overrides with `--device` and `--precision` appended (so they
/// win over a config file, as `--set` does).
pub fn device_sets(sets: &[String], device: Option<&str>, precision: Option<&str>) -> Vec<String> {
    let mut all = sets.to_vec();
    if let Some(d) = device {
        all.push(format!("model.device={d:?}"));
    }
    if let Some(p) = precision {
        all.push(format!("model.precision={p:?}"));
    }
    all
}

/// The line that says which device computes, and why when `auto` chose the
/// CPU.
pub fn device_line(runner: &Runner) -> String {
    let d = runner.device();
    let mut line = format!("device: {}", d.device.name);
    if let Some(driver) = &d.device.driver {
        line.push_str(&format!(", CUDA driver {driver}"));
    }
    if d.device.kind != "cpu" {
        line.push_str(&format!(", {} GEMMs", d.device.precision));
    }
    if let Some(why) = &d.fallback_reason {
        line.push_str(&format!(
            " (asked for {}; the CPU because {why})",
            d.requested
        ));
    }
    if let Some(before) = runner.previous_device() {
        line.push_str(&format!(
            "\nresumed on another device than the interrupted process ({}): seeded runs are \
             bit-reproducible per device kind, not across CPU and GPU",
            before.name
        ));
    }
    line
}

/// Runs the remaining rounds of `runner` with progress output and writes the
/// summary.
pub fn drive(runner: &mut Runner, quiet: bool) -> anyhow::Result<RunSummary> {
    if !quiet {
        eprintln!("{}", device_line(runner));
    }
    let rounds = runner.config().federation.rounds as u64;
    let done = runner.history().len() as u64;
    let privacy = runner.config().federation.privacy;
    let report = privacy.report_unprotected;
    if !quiet {
        let sigmas: Vec<String> = runner
            .federation()
            .privacy()
            .iter()
            .map(|p| format!("{:.3}", p.noise_multiplier))
            .collect();
        match privacy.epsilon {
            Some(eps) => eprintln!(
                "DP-SGD: ε = {eps}, δ = {}, C = {}, per-client σ = {} ({} accountant, {} budget rule){}",
                privacy.delta,
                privacy.clip,
                if report {
                    format!("[{}]", sigmas.join(", "))
                } else {
                    "withheld (report_unprotected = false)".to_string()
                },
                accountant_name(privacy.accountant),
                budget_rule_name(privacy.budget_rule),
                if runner.federation().uses_os_entropy() {
                    ""
                } else {
                    "; seeded noise: reproducible, not for a real release"
                }
            ),
            None => eprintln!("non-private training (no DP guarantee)"),
        }
        eprintln!(
            "majority-class accuracy on the held-out split: {:.4}",
            runner.majority_accuracy()
        );
    }
    let interactive = !quiet && std::io::stderr().is_terminal();
    let bar = interactive.then(|| {
        let bar = ProgressBar::new(rounds);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] round {pos}/{len} {msg} ({elapsed_precise}, ETA {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(runner.config().federation.method.name());
        bar.set_position(done);
        bar.enable_steady_tick(Duration::from_millis(500));
        bar
    });
    let target = privacy.epsilon;
    let started = Instant::now();
    let summary = runner.run_to_end(|m| {
        let line = round_line(m, target);
        match &bar {
            Some(bar) => {
                bar.set_position(m.round as u64);
                bar.set_message(line.clone());
                if m.eval_accuracy.is_some() {
                    bar.println(format!("round {:>3}/{rounds}  {line}", m.round));
                }
            }
            None if !quiet => {
                let per_round =
                    started.elapsed().as_secs_f64() / (m.round as u64 - done).max(1) as f64;
                let eta = per_round * (rounds - m.round as u64) as f64;
                match m.round_seconds {
                    Some(seconds) => eprintln!(
                        "round {:>3}/{rounds}  {line}  {seconds:.1}s  ETA {}",
                        m.round,
                        format_seconds(eta)
                    ),
                    None => eprintln!("round {:>3}/{rounds}  {line}", m.round),
                }
            }
            None => {}
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(summary)
}

fn round_line(m: &RoundMetrics, target: Option<f64>) -> String {
    let mut parts = vec![format!("clients {:?}", m.trained_clients)];
    if !m.budget_exhausted_clients.is_empty() {
        parts.push(format!("out of budget {:?}", m.budget_exhausted_clients));
    }
    if let Some(loss) = m.train_loss {
        parts.push(format!("loss {loss:.4}"));
    }
    if let Some(acc) = m.eval_accuracy {
        parts.push(format!("accuracy {acc:.4}"));
    }
    if let (Some(eps), Some(target)) = (m.max_epsilon, target) {
        parts.push(format!("ε {eps:.2}/{target}"));
    }
    parts.join("  ")
}

fn print_summary(runner: &Runner, s: &RunSummary, export: Option<&Path>) {
    let eps = match (s.max_epsilon_spent, s.epsilon) {
        (Some(spent), Some(target)) => format!("ε spent {spent:.3} of {target} (δ = {})", s.delta),
        _ => "non-private".to_string(),
    };
    let wall = s
        .wall_seconds
        .map(|w| format!("; {w:.0}s"))
        .unwrap_or_default();
    println!("{}; {eps}{wall}", headline(s));
    println!("run folder: {}", runner.dir().display());
    if let Some(dir) = export {
        println!("exported model: {}", dir.display());
    }
}

/// The result line: the steadier endpoint (mean over the last evaluated
/// rounds, saying which), then the last round's accuracy and the majority
/// class.
pub fn headline(s: &RunSummary) -> String {
    let endpoint = match s.endpoint_accuracy {
        Some(acc) => format!(
            "accuracy {acc:.4} (mean of the last {} evaluated round{}: {}), last round {:.4}",
            s.endpoint_rounds.len(),
            if s.endpoint_rounds.len() == 1 {
                ""
            } else {
                "s"
            },
            rounds_label(&s.endpoint_rounds),
            s.final_accuracy
        ),
        None => format!("last-round accuracy {:.4}", s.final_accuracy),
    };
    format!(
        "{}: {endpoint}; majority class {:.4}; {} rounds",
        s.method, s.majority_accuracy, s.completed_rounds
    )
}

/// `26–30` for consecutive rounds, else the rounds listed.
pub fn rounds_label(rounds: &[usize]) -> String {
    match rounds {
        [] => "none".to_string(),
        [one] => one.to_string(),
        [first, .., last] if rounds.windows(2).all(|w| w[1] == w[0] + 1) => {
            format!("{first}–{last}")
        }
        _ => rounds
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn accountant_name(kind: fedsvd_dp::AccountantKind) -> &'static str {
    match kind {
        fedsvd_dp::AccountantKind::Rdp => "RDP",
        fedsvd_dp::AccountantKind::Prv => "PRV",
    }
}

fn budget_rule_name(rule: fedsvd::BudgetRule) -> &'static str {
    match rule {
        fedsvd::BudgetRule::Conservative => "conservative",
        fedsvd::BudgetRule::Expected => "expected-participation",
    }
}

fn format_seconds(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// `runs/<preset>-<method>-<YYYYMMDD-HHMMSS>` (UTC).
pub fn default_run_dir(preset: &str, method: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("{preset}-{method}-{}", utc_stamp(secs)))
}

/// `YYYYMMDD-HHMMSS` for seconds since the Unix epoch (proleptic Gregorian,
/// UTC), without a date-time dependency.
fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps_match_known_dates() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        // 2000-02-29 12:34:56 UTC, a leap day.
        assert_eq!(utc_stamp(951_827_696), "20000229-123456");
        // 2026-11-26 16:38:37 UTC.
        assert_eq!(utc_stamp(1_795_711_117), "20261126-163837");
    }

    #[test]
    fn round_lists_compress_consecutive_runs_only() {
        assert_eq!(rounds_label(&[26, 27, 28, 29, 30]), "26–30");
        assert_eq!(rounds_label(&[10, 15, 20, 25, 30]), "10, 15, 20, 25, 30");
        assert_eq!(rounds_label(&[6]), "6");
        assert_eq!(rounds_label(&[]), "none");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(format_seconds(42.4), "42s");
        assert_eq!(format_seconds(125.0), "2m05s");
        assert_eq!(format_seconds(3723.0), "1h02m");
    }
}
