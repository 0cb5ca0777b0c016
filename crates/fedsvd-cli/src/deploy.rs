//! `fedsvd deploy local`: the federation as real Flower processes on this
//! machine: a SuperLink and one SuperNode per client on loopback, each
//! SuperNode serving its own data partition, the Flower app of `flower/`
//! (fedsvd's client and server through the `fedsvd` Python package), and
//! `flwr run`. It waits for the run's final status (`flwr run` returns at
//! once, and exits 0 even when the run fails: the status comes from `flwr
//! ls`), then stops every process it started.
//!
//! The Python side lives in `target/deploy-venv`, created once with
//! `python3` from PATH (at least 3.11), the pinned flwr and the wheel that
//! `cargo xtask wheel` built into `target/wheels/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use fedsvd_cli::config::{ConfigOptions, Preset, resolve};

/// The flwr the deployment runs (the app's `pyproject.toml` pins the same).
pub const FLWR: &str = "flwr==1.42.0";

/// `fedsvd deploy ...`.
#[derive(Debug, Subcommand)]
pub enum DeployCommand {
    /// A SuperLink and one SuperNode per client on loopback, then `flwr run`.
    Local(LocalArgs),
}

/// Options of `fedsvd deploy local`.
#[derive(Debug, Args)]
pub struct LocalArgs {
    /// A JSON config merged over the preset (as `fedsvd run --config`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Starting point: quick, default or paper.
    #[arg(long, value_enum, default_value_t = Preset::Default)]
    pub preset: Preset,
    /// The method: fedsvd, ffa, fedavg, flora or fedex.
    #[arg(long, value_name = "NAME")]
    pub method: Option<String>,
    /// Override one config key by its dotted path (as `fedsvd run --set`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// The run folder (`fedsvd run`'s layout).
    #[arg(long, value_name = "DIR", required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in DIR from its last checkpoint.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "method", "sets", "out"])]
    pub resume: Option<PathBuf>,
    /// Seconds the server waits for a round's replies before it ends the
    /// run, naming the node that did not answer.
    #[arg(long, default_value_t = 600.0)]
    pub round_timeout: f64,
    /// First of the loopback ports (SuperLink: this and the next two;
    /// SuperNodes: from this + 10).
    #[arg(long, default_value_t = 19091)]
    pub base_port: u16,
    /// Kill the SuperNode of this partition once the server has sent round
    /// `--kill-in-round` (a fault drill; the run must then fail naming it).
    #[arg(long, value_name = "K", hide = true)]
    pub kill_partition: Option<usize>,
    /// The round of `--kill-partition`.
    #[arg(long, value_name = "R", default_value_t = 2, hide = true)]
    pub kill_in_round: usize,
}

/// Runs a deploy subcommand.
pub fn run(command: DeployCommand) -> anyhow::Result<()> {
    match command {
        DeployCommand::Local(args) => local(args),
    }
}

/// The workspace root (the nearest ancestor of the current folder whose
/// Cargo.toml declares a workspace and holds `flower/`).
fn workspace_root() -> anyhow::Result<PathBuf> {
    let cwd = std::env::current_dir().context("reading the current folder")?;
    for dir in cwd.ancestors() {
        if dir.join("flower").join("pyproject.toml").is_file()
            && fs::read_to_string(dir.join("Cargo.toml"))
                .is_ok_and(|t| t.lines().any(|l| l.trim() == "[workspace]"))
        {
            return Ok(dir.to_path_buf());
        }
    }
    bail!("run `fedsvd deploy local` inside the fedsvd repository (it needs flower/ and target/)")
}

fn check(what: &str, command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// The deployment venv with flwr and the built wheel (installed once; the
/// wheel again whenever it changes). Returns its `bin` folder.
fn ensure_venv(root: &Path) -> anyhow::Result<PathBuf> {
    let venv = root.join("target").join("deploy-venv");
    let bin = venv.join("bin");
    let wheels = root.join("target").join("wheels");
    let wheel = fs::read_dir(&wheels)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.extension().is_some_and(|e| e == "whl")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("fedsvd-"))
        })
        .with_context(|| {
            format!(
                "no fedsvd wheel in {}: build it with `cargo xtask wheel`",
                wheels.display()
            )
        })?;
    if !bin.join("python").is_file() {
        let started = Instant::now();
        eprintln!(
            "creating {} with {FLWR} (once; about 30 s and 150 MB)",
            venv.display()
        );
        check(
            "python3 -m venv (Python 3.11 or newer must be on PATH)",
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
        )?;
        check(
            "the Python version check",
            Command::new(bin.join("python")).args([
                "-c",
                "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 'fedsvd needs Python 3.11 or newer')",
            ]),
        )?;
        check(
            &format!("pip install {FLWR}"),
            Command::new(bin.join("python")).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                FLWR,
            ]),
        )?;
        eprintln!("  ({:.0} s)", started.elapsed().as_secs_f64());
    }
    let stamp = venv.join("fedsvd-wheel.stamp");
    let id = format!(
        "{} {:?}",
        wheel.display(),
        fs::metadata(&wheel).and_then(|m| m.modified()).ok()
    );
    if fs::read_to_string(&stamp).ok().as_deref() != Some(id.as_str()) {
        check(
            "pip install of the fedsvd wheel",
            Command::new(bin.join("python"))
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--force-reinstall",
                    "--no-deps",
                ])
                .arg(&wheel),
        )?;
        check(
            "pip install of numpy",
            Command::new(bin.join("python")).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "numpy",
            ]),
        )?;
        fs::write(&stamp, id).with_context(|| format!("writing {}", stamp.display()))?;
    }
    Ok(bin)
}

/// The processes of a deployment, stopped (SIGTERM, then SIGKILL) when
/// dropped, whatever happened.
struct Processes(Vec<(String, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        // SIGTERM first, so flower stops its own subprocesses.
        for (_, child) in &mut self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (_, child) in &mut self.0 {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn(name: &str, command: &mut Command, logs: &Path) -> anyhow::Result<Child> {
    let log = logs.join(format!("{name}.log"));
    let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = file.try_clone()?;
    command
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name}"))
}

/// The final status of run `id` from `flwr ls`, once it has one.
fn run_status(
    bin: &Path,
    env: &[(String, PathBuf)],
    app: &Path,
    id: u64,
) -> anyhow::Result<Option<String>> {
    let out = Command::new(bin.join("flwr"))
        .args([
            "ls",
            "fedsvd-local",
            "--run-id",
            &id.to_string(),
            "--format",
            "json",
        ])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(app)
        .output()
        .context("running flwr ls")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let value: serde_json::Value = match serde_json::from_str(text.trim()) {
        Ok(v) => v,
        Err(_) => return Ok(None),
    };
    let status = value
        .pointer("/runs/0/status")
        .and_then(|s| s.as_str())
        .unwrap_or_default()
        .to_string();
    Ok(status.starts_with("finished").then_some(status))
}

/// A new `deploy-logs/attempt-N` folder for this deployment of `run_dir`
/// (N one more than the highest there), so that a resume keeps the logs of
/// the attempt that failed, and its SuperLink starts from an empty state
/// (a resumed deployment must not see the nodes of the run it continues).
fn attempt_logs(run_dir: &Path) -> anyhow::Result<PathBuf> {
    let parent = run_dir.join("deploy-logs");
    fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let last = fs::read_dir(&parent)
        .with_context(|| format!("reading {}", parent.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("attempt-"))
                .and_then(|n| n.parse::<u32>().ok())
        })
        .max()
        .unwrap_or(0);
    let logs = parent.join(format!("attempt-{}", last + 1));
    fs::create_dir(&logs).with_context(|| format!("creating {}", logs.display()))?;
    Ok(logs)
}

fn local(args: LocalArgs) -> anyhow::Result<()> {
    let root = workspace_root()?;
    let (run_dir, request, resume) = match &args.resume {
        Some(dir) => {
            if !dir.join("config.json").is_file() {
                bail!("{} holds no run (no config.json)", dir.display());
            }
            (dir.clone(), dir.join("config.json"), true)
        }
        None => {
            let out = args.out.clone().context("--out DIR is required")?;
            if out.join("config.json").exists() {
                bail!(
                    "{} already holds a run (config.json exists); resume it or choose another folder",
                    out.display()
                );
            }
            let config = resolve(&ConfigOptions {
                preset: Some(args.preset),
                file: args.config.as_deref(),
                method: args.method.as_deref(),
                sets: &args.sets,
            })?;
            fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let request = out.join("deploy-request.json");
            fs::write(&request, serde_json::to_string_pretty(&config)?)
                .with_context(|| format!("writing {}", request.display()))?;
            (out, request, false)
        }
    };
    let run_dir = fs::canonicalize(&run_dir)?;
    let request = fs::canonicalize(&request)?;
    let config: fedsvd::RunConfig = fedsvd::runner::read_json(&request)?;
    let clients = config.data.clients;
    let bin = ensure_venv(&root)?;
    let app = root.join("flower");
    let logs = attempt_logs(&run_dir)?;
    let home = root.join("target").join("deploy-venv").join("flwr-home");
    fs::create_dir_all(&home)?;
    let port = args.base_port;
    // flwr 1.42 serves its Runtime, Control and Fleet APIs on one HTTP port.
    let link = port;
    fs::write(
        home.join("config.toml"),
        format!(
            "[superlink]\ndefault = \"fedsvd-local\"\n\n[superlink.fedsvd-local]\naddress = \"127.0.0.1:{link}\"\ninsecure = true\n"
        ),
    )?;
    let assets = fs::canonicalize(fedsvd_data::assets::default_dir())
        .unwrap_or_else(|_| root.join("assets"));
    let env: Vec<(String, PathBuf)> = vec![
        ("FLWR_HOME".into(), home.clone()),
        ("FEDSVD_ASSETS".into(), assets),
        ("PYTHONUNBUFFERED".into(), PathBuf::from("1")),
        // The SuperExec that starts each ClientApp and the ServerApp polls
        // for work every second by default; on loopback a tenth of that
        // costs nothing. (On the 2-core machine the round time did not
        // measurably change: docs/benchmarks.md, 2026-12-06.)
        (
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL".into(),
            PathBuf::from("0.1"),
        ),
        // Flower starts its helpers (flower-superexec, ...) from PATH.
        (
            "PATH".into(),
            PathBuf::from(format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            )),
        ),
    ];
    let started = Instant::now();
    let mut processes = Processes(Vec::new());
    let superlink = spawn(
        "superlink",
        Command::new(bin.join("flower-superlink"))
            .arg("--insecure")
            .arg("--disable-runtime-dependency-installation")
            .args(["--host", "127.0.0.1", "--port", &link.to_string()])
            .args([
                "--database",
                &logs.join("superlink.db").display().to_string(),
            ])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(&run_dir),
        &logs,
    )?;
    processes.0.push(("superlink".into(), superlink));
    for k in 0..clients {
        let ledgers = run_dir.join("ledgers").join(format!("client-{k}"));
        let node = spawn(
            &format!("supernode-{k}"),
            Command::new(bin.join("flower-supernode"))
                .arg("--insecure")
                .args(["--superlink", &format!("127.0.0.1:{link}")])
                .args(["--host", "127.0.0.1"])
                .args(["--port", &(port + 10 + k as u16).to_string()])
                .args([
                    "--node-config",
                    &format!("partition-id={k} ledger-dir=\"{}\"", ledgers.display()),
                ])
                .envs(env.iter().map(|(k, v)| (k, v)))
                .current_dir(&run_dir),
            &logs,
        )?;
        processes.0.push((format!("supernode-{k}"), node));
    }
    let run_config = format!(
        "config-file=\"{}\" out-dir=\"{}\" resume={} round-timeout={:?}",
        request.display(),
        run_dir.display(),
        resume,
        args.round_timeout
    );
    // The SuperLink needs a moment to listen; flwr run retries on its own
    // only briefly.
    let mut run_id = None;
    for _ in 0..60 {
        let out = Command::new(bin.join("flwr"))
            .arg("run")
            .arg(&app)
            .arg("fedsvd-local")
            .args(["--run-config", &run_config, "--format", "json"])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(&app)
            .output()
            .context("running flwr run")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(text.trim())
            && let Some(id) = value.get("run-id").and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
        {
            run_id = Some(id);
            break;
        }
        thread::sleep(Duration::from_secs(1));
    }
    let run_id = run_id.with_context(|| {
        format!(
            "flwr run did not start a run on the SuperLink (see {})",
            logs.join("superlink.log").display()
        )
    })?;
    eprintln!(
        "flower run {run_id}: {clients} SuperNodes, run folder {}",
        run_dir.display()
    );
    let mut killed = false;
    let status = loop {
        if let Some(status) = run_status(&bin, &env, &app, run_id)? {
            break status;
        }
        if let Some(k) = args.kill_partition
            && !killed
            && fs::read_to_string(run_dir.join("metrics.jsonl"))
                .map(|t| t.lines().count() + 1 >= args.kill_in_round)
                .unwrap_or(false)
        {
            let name = format!("supernode-{k}");
            if let Some((_, child)) = processes.0.iter_mut().find(|(n, _)| *n == name) {
                let _ = child.kill();
                eprintln!("killed {name} (fault drill)");
            }
            killed = true;
        }
        thread::sleep(Duration::from_millis(500));
    };
    let elapsed = started.elapsed().as_secs_f64();
    // The ServerApp's output lives on the SuperLink: keep it before stopping it.
    let server_log = logs.join("serverapp.log");
    if let Ok(out) = Command::new(bin.join("flwr"))
        .args(["log", &run_id.to_string(), "fedsvd-local", "--show"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&app)
        .stdin(Stdio::null())
        .output()
    {
        let _ = fs::write(&server_log, &out.stdout);
    }
    drop(processes);
    if status != "finished:completed" {
        let log = fs::read_to_string(&server_log).unwrap_or_default();
        let reason = log
            .lines()
            .rev()
            .find(|l| l.contains("RoundFailed") || l.contains("Error"))
            .unwrap_or("see the logs")
            .to_string();
        bail!(
            "flower run {run_id} ended {status} after {elapsed:.1} s: {reason} (logs in {})",
            logs.display()
        );
    }
    println!(
        "flower run {run_id} completed in {elapsed:.1} s; run folder {}",
        run_dir.display()
    );
    Ok(())
}
