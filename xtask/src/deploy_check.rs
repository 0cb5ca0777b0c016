//! `cargo xtask deploy-check`: the Flower deployment against the simulation
//! (issue 22), as CI runs it.
//!
//! 1. The wheel (`cargo xtask wheel`, dev profile unless `--release`) and
//!    the package's pytest suite in a fresh venv.
//! 2. The quick preset with 3 clients, all sampled, seeded, once through
//!    `fedsvd run` and once through `fedsvd deploy local` (a SuperLink and 3
//!    SuperNodes as separate processes on loopback). Sampled clients and ε
//!    must be identical; every round's accuracy and loss and the final
//!    adapters within 1e-6. Then the Flower app's own unit tests (stdlib
//!    `unittest`, `flower/tests`) in the deployment venv, which has flwr.
//! 3. The fault drill: the same deployment with one SuperNode killed in
//!    round 2 must fail, naming the node's partition, and leave a checkpoint
//!    from which `fedsvd deploy local --resume` finishes the run with the
//!    simulation's result, ε included: the clients that answered the cut
//!    round resend their kept reply instead of training and paying again.
//!
//! Every comparison fails loudly; nothing is skipped.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use serde_json::Value;

use crate::wheel;

/// The configuration both sides run (quick preset overrides).
const SETS: [&str; 3] = [
    "data.clients=3",
    "federation.clients_per_round=3",
    "federation.seed=11",
];

/// Tolerance on accuracies, losses and adapter entries.
const TOLERANCE: f64 = 1e-6;

fn timed<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let started = Instant::now();
    let value = f()?;
    println!("  {what}: {:.1} s", started.elapsed().as_secs_f64());
    Ok(value)
}

fn fedsvd(root: &Path) -> Command {
    let mut command = Command::new(root.join("target/debug/fedsvd"));
    command.current_dir(root);
    command
}

fn with_sets(command: &mut Command) -> &mut Command {
    command.args(["--preset", "quick"]);
    for set in SETS {
        command.args(["--set", set]);
    }
    command
}

fn succeed(what: &str, command: &mut Command) -> anyhow::Result<()> {
    let out = command
        .output()
        .with_context(|| format!("cannot start {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `cargo xtask deploy-check [--release]`.
pub fn deploy_check(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let release = match args {
        [] => false,
        [flag] if flag == "--release" => true,
        other => bail!("usage: cargo xtask deploy-check [--release] (got {other:?})"),
    };
    let started = Instant::now();
    let built = timed("wheel build", || wheel::build_wheel(root, release))?;
    println!("  wheel: {}", built.display());
    timed("pytest of the wheel in a fresh venv", || {
        wheel::test_wheel(root, &built)
    })?;

    let scratch = root.join("target/deploy-check");
    if scratch.exists() {
        fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    fs::create_dir_all(&scratch)?;
    let simulated = scratch.join("simulated");
    timed("fedsvd run (the simulation)", || {
        succeed(
            "fedsvd run",
            with_sets(fedsvd(root).arg("run"))
                .arg("--quiet")
                .arg("--out")
                .arg(&simulated),
        )
    })?;
    let deployed = scratch.join("deployed");
    timed(
        "fedsvd deploy local (venv, SuperLink, 3 SuperNodes, run)",
        || {
            succeed(
                "fedsvd deploy local",
                with_sets(fedsvd(root).args(["deploy", "local"]))
                    .args(["--round-timeout", "300"])
                    .arg("--out")
                    .arg(&deployed),
            )
        },
    )?;
    timed(
        "the Flower app's unit tests (in the deployment venv)",
        || {
            succeed(
                "python -m unittest discover -s tests (in flower/)",
                Command::new(root.join("target/deploy-venv/bin/python"))
                    .args(["-m", "unittest", "discover", "-s", "tests"])
                    .current_dir(root.join("flower")),
            )
        },
    )?;
    compare(&simulated, &deployed)?;
    println!(
        "  deployed run = simulation (clients, ε exact; accuracy, loss, adapters within 1e-6)"
    );
    report_round_times(&simulated, &deployed)?;

    let killed = scratch.join("killed");
    let message = timed(
        "fault drill: SuperNode of partition 1 killed in round 2",
        || {
            let out = with_sets(fedsvd(root).args(["deploy", "local"]))
                .args(["--round-timeout", "90", "--base-port", "19291"])
                .args(["--kill-partition", "1", "--kill-in-round", "2"])
                .arg("--out")
                .arg(&killed)
                .output()
                .context("cannot start fedsvd deploy local")?;
            ensure!(
                !out.status.success(),
                "a deployment whose SuperNode was killed reported success"
            );
            Ok(String::from_utf8_lossy(&out.stderr).into_owned())
        },
    )?;
    ensure!(
        message.contains("partition 1"),
        "the failed deployment does not name the killed node's partition 1:\n{message}"
    );
    let done = metrics(&killed)?.len();
    ensure!(
        (1..3).contains(&done) && killed.join("checkpoint.json").is_file(),
        "the killed deployment left {done} finished rounds and {} checkpoint (want 1 or 2 rounds and a checkpoint)",
        if killed.join("checkpoint.json").is_file() {
            "a"
        } else {
            "no"
        }
    );
    timed("fedsvd deploy local --resume of the killed run", || {
        succeed(
            "fedsvd deploy local --resume",
            fedsvd(root)
                .args(["deploy", "local", "--base-port", "19391", "--resume"])
                .arg(&killed),
        )
    })?;
    compare(&simulated, &killed)?;
    // The resume writes its logs beside the failed attempt's, which keep
    // the reason.
    let failed_log = killed.join("deploy-logs/attempt-1/serverapp.log");
    let failed_text = fs::read_to_string(&failed_log)
        .with_context(|| format!("reading {}", failed_log.display()))?;
    ensure!(
        failed_text.contains("partition 1")
            && killed.join("deploy-logs/attempt-2/serverapp.log").is_file(),
        "the resume did not keep the failed attempt's log naming partition 1 ({})",
        failed_log.display()
    );
    println!(
        "  killed after {done} round(s), resumed: = simulation; deploy-check passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn metrics(run: &Path) -> anyhow::Result<Vec<Value>> {
    let path = run.join("metrics.jsonl");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("a line of {}", path.display())))
        .collect()
}

fn number(value: &Value, what: &str) -> anyhow::Result<f64> {
    value
        .as_f64()
        .with_context(|| format!("{what} is not a number: {value}"))
}

/// The round lines, final adapters and summary headline (endpoint, final
/// accuracy and loss, ε) of `run` against `reference`.
fn compare(reference: &Path, run: &Path) -> anyhow::Result<()> {
    let (want, got) = (metrics(reference)?, metrics(run)?);
    ensure!(
        want.len() == got.len(),
        "{} has {} rounds, {} has {}",
        reference.display(),
        want.len(),
        run.display(),
        got.len()
    );
    for (w, g) in want.iter().zip(&got) {
        let round = &w["round"];
        for key in [
            "round",
            "sampled_clients",
            "trained_clients",
            "refactorized",
        ] {
            ensure!(
                w[key] == g[key],
                "round {round}: {key} {} vs {}",
                w[key],
                g[key]
            );
        }
        for key in ["eval_accuracy", "eval_loss"] {
            let (a, b) = (&w[key], &g[key]);
            if a.is_null() && b.is_null() {
                continue;
            }
            let (a, b) = (number(a, key)?, number(b, key)?);
            ensure!(
                (a - b).abs() <= TOLERANCE,
                "round {round}: {key} {a} vs {b}"
            );
        }
        let (we, ge) = (&w["client_epsilon"], &g["client_epsilon"]);
        ensure!(we == ge, "round {round}: client_epsilon {we} vs {ge}");
    }
    let state = |dir: &Path| -> anyhow::Result<Value> {
        let path = dir.join("checkpoint.json");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)?;
        Ok(value["checkpoint"]["state"].clone())
    };
    let (w, g) = (state(reference)?, state(run)?);
    ensure!(
        !w.is_null(),
        "{} holds no adapter state",
        reference.display()
    );
    let mut compared = 0usize;
    close(&w, &g, "state", &mut compared)?;
    ensure!(compared > 1000, "only {compared} adapter numbers compared");
    // The headline numbers the summaries report.
    let summary = |dir: &Path| -> anyhow::Result<Value> {
        let path = dir.join("summary.json");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    let (w, g) = (summary(reference)?, summary(run)?);
    for key in ["completed_rounds", "endpoint_rounds", "max_epsilon_spent"] {
        ensure!(
            w[key] == g[key],
            "summary.json: {key} {} vs {}",
            w[key],
            g[key]
        );
    }
    for key in ["endpoint_accuracy", "final_accuracy", "final_loss"] {
        let (a, b) = (number(&w[key], key)?, number(&g[key], key)?);
        ensure!((a - b).abs() <= TOLERANCE, "summary.json: {key} {a} vs {b}");
    }
    Ok(())
}

fn close(a: &Value, b: &Value, at: &str, compared: &mut usize) -> anyhow::Result<()> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            *compared += 1;
            ensure!((x - y).abs() <= TOLERANCE, "{at}: {x} vs {y}");
        }
        (Value::Array(x), Value::Array(y)) => {
            ensure!(
                x.len() == y.len(),
                "{at}: {} vs {} entries",
                x.len(),
                y.len()
            );
            for (i, (x, y)) in x.iter().zip(y).enumerate() {
                close(x, y, &format!("{at}[{i}]"), compared)?;
            }
        }
        (Value::Object(x), Value::Object(y)) => {
            ensure!(
                x.keys().eq(y.keys()),
                "{at}: keys {:?} vs {:?}",
                x.keys().collect::<Vec<_>>(),
                y.keys().collect::<Vec<_>>()
            );
            for (k, v) in x {
                close(v, &y[k], &format!("{at}.{k}"), compared)?;
            }
        }
        (x, y) => ensure!(x == y, "{at}: {x} vs {y}"),
    }
    Ok(())
}

/// Wall time per round on both sides, and how the deployment's splits:
/// the server's `deploy-timing.json` separates the time it waited for
/// replies (the clients' training, in parallel processes, plus Flower's
/// transport) from its own work (aggregation, refactorization, evaluation,
/// checkpoints).
fn report_round_times(simulated: &Path, deployed: &Path) -> anyhow::Result<()> {
    let times: Vec<f64> = metrics(simulated)?
        .iter()
        .filter_map(|l| l["round_seconds"].as_f64())
        .collect();
    ensure!(!times.is_empty(), "the simulation recorded no round times");
    let simulated_mean = times.iter().sum::<f64>() / times.len() as f64;
    let path = deployed.join("deploy-timing.json");
    let timing: Value = serde_json::from_str(
        &fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    let rounds = number(&timing["rounds"], "rounds")?;
    let per_round = |key: &str| -> anyhow::Result<f64> { Ok(number(&timing[key], key)? / rounds) };
    println!(
        "  seconds per round: simulation {simulated_mean:.1} (3 clients one after another); \
         deployment {:.1} = {:.1} waiting for the 3 parallel clients + {:.1} server",
        per_round("wall_seconds")?,
        per_round("seconds_waiting_for_clients")?,
        per_round("server_seconds")?
    );
    // The clients log their own setup and training time on their node.
    let mut slowest: std::collections::BTreeMap<u64, (f64, f64)> = Default::default();
    // An uninterrupted deployment has one attempt.
    for entry in fs::read_dir(deployed.join("deploy-logs").join("attempt-1"))? {
        let path = entry?.path();
        if !path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("supernode-"))
        {
            continue;
        }
        for line in fs::read_to_string(&path)?.lines() {
            let Some(rest) = line.split("fedsvd-client timing: round ").nth(1) else {
                continue;
            };
            let words: Vec<&str> = rest.split_whitespace().collect();
            if let [
                round,
                "partition",
                _,
                "setup",
                setup,
                "s",
                "training",
                training,
                "s",
                ..,
            ] = words.as_slice()
                && let (Ok(round), Ok(setup), Ok(training)) = (
                    round.parse::<u64>(),
                    setup.parse::<f64>(),
                    training.parse::<f64>(),
                )
            {
                let e = slowest.entry(round).or_insert((0.0, 0.0));
                if setup + training > e.0 + e.1 {
                    *e = (setup, training);
                }
            }
        }
    }
    if slowest.is_empty() {
        println!("  (no client timing lines in the SuperNode logs: no split of the waiting time)");
    } else {
        let n = slowest.len() as f64;
        let setup = slowest.values().map(|v| v.0).sum::<f64>() / n;
        let training = slowest.values().map(|v| v.1).sum::<f64>() / n;
        let waiting = per_round("seconds_waiting_for_clients")?;
        println!(
            "  of the waiting, per round (slowest client of {} logged rounds): training {training:.1} s, \
             client setup (a fresh ClientApp process loads model and data) {setup:.1} s, \
             Flower transport and process start {:.1} s",
            slowest.len(),
            waiting - setup - training
        );
    }
    Ok(())
}
