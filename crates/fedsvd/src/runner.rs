//! A run on disk: the run folder, its per-round metrics and checkpoints,
//! resume, and the summary.
//!
//! Layout of a run folder:
//! - `config.json`: the complete resolved [`RunConfig`];
//! - `data.json`: label names, the partition report (examples per label per
//!   client), the majority-class accuracy and rows skipped while loading;
//! - `metrics.jsonl`: one [`RoundMetrics`] per line, per round;
//! - `checkpoint.json`: the state after the last finished round, replaced
//!   atomically (write, sync, rename) every round;
//! - `summary.json`: the [`RunSummary`], once the last round has run.
//!
//! Crash safety (a `kill -9` at any instant loses nothing): a round appends
//! its metrics line before it replaces the checkpoint, so after a crash
//! `metrics.jsonl` has at least as many lines as the checkpoint has rounds;
//! [`Runner::resume`] drops the extra lines, a torn last one included.
//! `checkpoint.json` carries the SHA-256 of its contents, so a torn or
//! edited checkpoint is refused (naming the file) before anything is
//! overwritten. A run killed before its first checkpoint resumes from the
//! start; one killed while `data.json` or `metrics.jsonl` was being created
//! gets them again.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::client::ClientData;
use crate::device::ResolvedDevice;
use crate::error::{Error, Result};
use crate::federation::{Federation, FederationCheckpoint, RoundMetrics};
use crate::run::{PreparedData, RunConfig, load_weights, prepare_data};

/// File names inside a run folder.
pub mod files {
    /// The resolved configuration.
    pub const CONFIG: &str = "config.json";
    /// Label names, partition report, majority accuracy, load report.
    pub const DATA: &str = "data.json";
    /// One JSON object per round.
    pub const METRICS: &str = "metrics.jsonl";
    /// The resumable state after the last finished round.
    pub const CHECKPOINT: &str = "checkpoint.json";
    /// Final results.
    pub const SUMMARY: &str = "summary.json";
    /// The compute device of the last process that ran rounds.
    pub const DEVICE: &str = "device.json";
}

/// What a finished run reports (`summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Method name.
    pub method: String,
    /// Data set name (`rt`, …, or `file`).
    pub dataset: String,
    /// Target ε per client (`null`: non-private).
    pub epsilon: Option<f64>,
    /// δ of the guarantee.
    pub delta: f64,
    /// The run seed (`null`: operating-system entropy).
    pub seed: Option<u64>,
    /// Whether the model may be released under the stated guarantee: the
    /// run is private and its noise came from operating-system entropy. A
    /// seeded run is reproducible but its noise is predictable from the
    /// seed; a non-private run has no guarantee at all.
    pub release_ready: bool,
    /// Whether the statistics DP does not cover were reported
    /// (`federation.privacy.report_unprotected`).
    #[serde(default = "yes")]
    pub unprotected_reported: bool,
    /// Which step count σ was calibrated for (`conservative` or `expected`).
    pub budget_rule: String,
    /// Configured rounds.
    pub rounds: usize,
    /// Rounds run.
    pub completed_rounds: usize,
    /// Held-out accuracy after the last round.
    pub final_accuracy: f64,
    /// Held-out mean loss after the last round.
    pub final_loss: f64,
    /// The steadier endpoint: mean held-out accuracy over the last
    /// [`crate::study::ENDPOINT_WINDOW`] evaluated rounds, or over all of
    /// them when fewer were evaluated (`null` when none was; absent from
    /// summaries written before it existed).
    #[serde(default)]
    pub endpoint_accuracy: Option<f64>,
    /// The evaluated rounds averaged into `endpoint_accuracy`.
    #[serde(default)]
    pub endpoint_rounds: Vec<usize>,
    /// Held-out accuracy of always predicting the majority training label
    /// (the held-out split's own majority when unprotected statistics are
    /// withheld).
    pub majority_accuracy: f64,
    /// The largest ε any client spent (`null`: non-private).
    pub max_epsilon_spent: Option<f64>,
    /// Every client's calibrated noise multiplier σ_k (empty when
    /// unprotected statistics are withheld: σ_k follows from n_k).
    #[serde(default)]
    pub noise_multipliers: Vec<f64>,
    /// Rounds in which some sampled client sat out for lack of budget.
    pub rounds_with_exhausted_clients: usize,
    /// Mean bytes all clients uploaded per round.
    pub mean_bytes_uploaded_per_round: f64,
    /// Mean server refactorization / merge time per round, seconds.
    pub mean_server_seconds: f64,
    /// Sum of the rounds' wall times, seconds (`null` when unprotected
    /// statistics are withheld).
    pub wall_seconds: Option<f64>,
    /// The device that computed the last rounds (absent from summaries
    /// written before devices existed).
    #[serde(default)]
    pub device: Option<fedsvd_model::DeviceInfo>,
}

fn yes() -> bool {
    true
}

/// `data.json`: what the run learned about its data while preparing it.
/// Fields that describe the private training data are absent when the run
/// withholds unprotected statistics.
#[derive(Debug, Clone, Serialize)]
struct DataRecord<'a> {
    label_names: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<&'a fedsvd_data::PartitionReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_examples: Option<Vec<usize>>,
    test_examples: usize,
    majority_accuracy: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    load_report: Option<&'a fedsvd_data::LoadReport>,
}

/// A run bound to its folder: every round is recorded and checkpointed.
#[derive(Debug)]
pub struct Runner {
    dir: PathBuf,
    config: RunConfig,
    federation: Federation,
    label_names: Vec<String>,
    majority_accuracy: f64,
    history: Vec<RoundMetrics>,
    device: ResolvedDevice,
    previous_device: Option<fedsvd_model::DeviceInfo>,
}

impl Runner {
    /// Starts a new run in `dir` (created if missing; it must not already
    /// hold a run). Loads the model and data, calibrates the clients' noise
    /// and writes `config.json` and `data.json`.
    pub fn create(config: RunConfig, dir: &Path, assets_dir: &Path) -> Result<Self> {
        config.validate()?;
        if dir.join(files::CONFIG).exists() {
            return Err(Error::RunExists {
                dir: dir.to_path_buf(),
            });
        }
        let (mut federation, data) = build(&config, assets_dir)?;
        let device = federation.set_device(config.model.device, config.model.precision)?;
        fs::create_dir_all(dir).map_err(|e| Error::io("creating the run folder", dir, e))?;
        write_json_atomic(&dir.join(files::CONFIG), &config)?;
        write_json_atomic(&dir.join(files::DEVICE), &device)?;
        write_data_record(dir, &config, &data)?;
        let metrics = dir.join(files::METRICS);
        File::create(&metrics).map_err(|e| Error::io("creating", &metrics, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            majority_accuracy: majority(&config, &data),
            config,
            federation,
            label_names: data.label_names,
            history: Vec::new(),
            device,
            previous_device: None,
        })
    }

    /// Continues the run in `dir` from its last checkpoint (or from the start
    /// when no round had finished). A seeded run then produces exactly the
    /// metrics an uninterrupted run would (wall times aside).
    pub fn resume(dir: &Path, assets_dir: &Path) -> Result<Self> {
        Self::resume_on(dir, assets_dir, None)
    }

    /// [`Runner::resume`] on `device` (`auto`, `cpu` or `cuda`) instead of
    /// the configured `model.device`, for this process only: `config.json`
    /// keeps what the run asked for.
    pub fn resume_on(dir: &Path, assets_dir: &Path, device: Option<&str>) -> Result<Self> {
        let (config, mut federation, data) = open_run(dir, assets_dir)?;
        let choice = match device {
            Some(d) => d.parse()?,
            None => config.model.device,
        };
        let device = federation.set_device(choice, config.model.precision)?;
        let device_path = dir.join(files::DEVICE);
        // A record that cannot be read only costs the "other device" notice.
        let previous_device = read_json::<ResolvedDevice>(&device_path)
            .ok()
            .map(|d| d.device)
            .filter(|d| d.kind != device.device.kind || d.name != device.device.name);
        let checkpoint_path = dir.join(files::CHECKPOINT);
        let rounds_done = if checkpoint_path.is_file() {
            federation.restore(read_checkpoint(&checkpoint_path)?)?;
            federation.next_round()
        } else {
            0
        };
        let metrics_path = dir.join(files::METRICS);
        // Only the lines the checkpoint covers must be whole: later ones
        // belong to a round that did not finish checkpointing (the last of
        // them may be torn by the crash), and that round runs again.
        let history = if metrics_path.is_file() {
            read_metrics_prefix(&metrics_path, rounds_done)?
        } else {
            Vec::new()
        };
        if history.len() < rounds_done {
            return Err(Error::CorruptRun {
                path: metrics_path,
                reason: format!(
                    "{} round lines, but the checkpoint is after round {rounds_done}",
                    history.len()
                ),
            });
        }
        if !dir.join(files::DATA).is_file() {
            write_data_record(dir, &config, &data)?;
        }
        rewrite_metrics(&metrics_path, &history)?;
        write_json_atomic(&device_path, &device)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            majority_accuracy: majority(&config, &data),
            config,
            federation,
            label_names: data.label_names,
            history,
            device,
            previous_device,
        })
    }

    /// The federation of the run folder `dir` at its last checkpoint, on the
    /// CPU, for reading (probes, analyses): unlike [`Runner::resume`] it
    /// writes nothing into the folder. A folder without a checkpoint gives
    /// the federation as initialized.
    pub fn load_read_only(dir: &Path, assets_dir: &Path) -> Result<Federation> {
        let (_, mut federation, _) = open_run(dir, assets_dir)?;
        let checkpoint_path = dir.join(files::CHECKPOINT);
        if checkpoint_path.is_file() {
            federation.restore(read_checkpoint(&checkpoint_path)?)?;
        }
        Ok(federation)
    }

    /// The device that computes, as asked for and as resolved.
    pub fn device(&self) -> &ResolvedDevice {
        &self.device
    }

    /// On a resume, the device of the interrupted process when it was
    /// another one (seeded runs are bit-reproducible per device kind only).
    pub fn previous_device(&self) -> Option<&fedsvd_model::DeviceInfo> {
        self.previous_device.as_ref()
    }

    /// The run folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The resolved configuration.
    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    /// The federation (global state, ledgers, model).
    pub fn federation(&self) -> &Federation {
        &self.federation
    }

    /// Label names, indexing the classifier's outputs.
    pub fn label_names(&self) -> &[String] {
        &self.label_names
    }

    /// Held-out accuracy of always predicting the majority label (of the
    /// training split, or of the held-out split when unprotected
    /// statistics are withheld).
    pub fn majority_accuracy(&self) -> f64 {
        self.majority_accuracy
    }

    /// The metrics of every finished round.
    pub fn history(&self) -> &[RoundMetrics] {
        &self.history
    }

    /// Whether every round has run.
    pub fn finished(&self) -> bool {
        self.federation.finished()
    }

    /// Runs the next round, appends its metrics line and replaces the
    /// checkpoint.
    pub fn run_round(&mut self) -> Result<RoundMetrics> {
        let metrics = self.federation.run_round()?;
        let path = self.dir.join(files::METRICS);
        let mut file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io("opening", &path, e))?;
        let line = serde_json::to_string(&metrics).map_err(|e| Error::json(&path, 0, e))?;
        writeln!(file, "{line}")
            .and_then(|()| file.sync_data())
            .map_err(|e| Error::io("appending to", &path, e))?;
        write_checkpoint(
            &self.dir.join(files::CHECKPOINT),
            &self.federation.checkpoint(),
        )?;
        self.history.push(metrics.clone());
        Ok(metrics)
    }

    /// Runs every remaining round, calling `on_round` after each.
    pub fn run_to_end(&mut self, mut on_round: impl FnMut(&RoundMetrics)) -> Result<RunSummary> {
        while !self.finished() {
            let metrics = self.run_round()?;
            on_round(&metrics);
        }
        self.finish()
    }

    /// Writes `summary.json` (the run must be finished).
    pub fn finish(&self) -> Result<RunSummary> {
        let Some(last) = self.history.last().filter(|_| self.finished()) else {
            return Err(Error::Unfinished {
                dir: self.dir.clone(),
                done: self.history.len(),
                rounds: self.config.federation.rounds,
            });
        };
        let fed = &self.config.federation;
        let rounds = self.history.len().max(1) as f64;
        let endpoint = crate::study::run_endpoint(&self.history);
        let summary = RunSummary {
            method: fed.method.name().to_string(),
            dataset: self.config.data.dataset.clone(),
            epsilon: fed.privacy.epsilon,
            delta: fed.privacy.delta,
            seed: fed.seed,
            release_ready: fed.seed.is_none() && fed.privacy.epsilon.is_some(),
            unprotected_reported: fed.privacy.report_unprotected,
            budget_rule: match fed.privacy.budget_rule {
                crate::BudgetRule::Conservative => "conservative".into(),
                crate::BudgetRule::Expected => "expected".into(),
            },
            rounds: fed.rounds,
            completed_rounds: self.history.len(),
            final_accuracy: last.eval_accuracy.unwrap_or(f64::NAN),
            final_loss: last.eval_loss.unwrap_or(f64::NAN),
            endpoint_accuracy: endpoint.as_ref().map(|e| e.accuracy),
            endpoint_rounds: endpoint.map(|e| e.rounds).unwrap_or_default(),
            majority_accuracy: self.majority_accuracy,
            max_epsilon_spent: last.max_epsilon,
            noise_multipliers: if fed.privacy.report_unprotected {
                self.federation
                    .privacy()
                    .iter()
                    .map(|p| p.noise_multiplier)
                    .collect()
            } else {
                Vec::new()
            },
            rounds_with_exhausted_clients: self
                .history
                .iter()
                .filter(|m| !m.budget_exhausted_clients.is_empty())
                .count(),
            mean_bytes_uploaded_per_round: self
                .history
                .iter()
                .map(|m| m.bytes_uploaded as f64)
                .sum::<f64>()
                / rounds,
            mean_server_seconds: self.history.iter().map(|m| m.server_seconds).sum::<f64>()
                / rounds,
            wall_seconds: fed
                .privacy
                .report_unprotected
                .then(|| self.history.iter().filter_map(|m| m.round_seconds).sum()),
            device: Some(self.device.device.clone()),
        };
        write_json_atomic(&self.dir.join(files::SUMMARY), &summary)?;
        Ok(summary)
    }
}

/// Writes `data.json` for a run.
fn write_data_record(dir: &Path, config: &RunConfig, data: &PreparedData) -> Result<()> {
    let report = config.federation.privacy.report_unprotected;
    let record = DataRecord {
        label_names: &data.label_names,
        partition: report.then_some(&data.partition),
        client_examples: report.then(|| data.clients.iter().map(ClientData::len).collect()),
        test_examples: data.test.len(),
        majority_accuracy: majority(config, data),
        load_report: report.then_some(&data.load_report),
    };
    write_json_atomic(&dir.join(files::DATA), &record)
}

/// The majority-class bar a run reports: from the training labels when it
/// reports unprotected statistics, else from the held-out split alone.
fn majority(config: &RunConfig, data: &PreparedData) -> f64 {
    if config.federation.privacy.report_unprotected {
        data.majority_accuracy
    } else {
        data.test_majority_accuracy
    }
}

/// The run folder's checked `config.json` and the federation it builds (as
/// initialized: restoring the checkpoint is the caller's).
fn open_run(dir: &Path, assets_dir: &Path) -> Result<(RunConfig, Federation, PreparedData)> {
    let config_path = dir.join(files::CONFIG);
    if !config_path.is_file() {
        return Err(Error::NotARun {
            dir: dir.to_path_buf(),
        });
    }
    let config: RunConfig = read_json(&config_path)?;
    config.validate()?;
    let (federation, data) = build(&config, assets_dir)?;
    Ok((config, federation, data))
}

fn build(config: &RunConfig, assets_dir: &Path) -> Result<(Federation, PreparedData)> {
    let data = prepare_data(config, assets_dir)?;
    let weights = load_weights(config, assets_dir)?;
    let lora = config.adapters.lora()?;
    let head = config.adapters.head(data.label_names.len());
    let federation = Federation::new(
        config.federation,
        weights,
        lora,
        head,
        data.clients.clone(),
        data.test.clone(),
    )?;
    Ok((federation, data))
}

/// Writes `value` as pretty JSON to `path` atomically: a temporary file in
/// the same folder, synced, then renamed over the target, so a crash leaves
/// either the old or the new file, never a torn one.
pub fn write_json_atomic<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::json(path, 0, e))?;
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io("writing", path, e)
    })
}

/// `checkpoint.json`: the checkpoint and the SHA-256 (hex) of its compact
/// JSON serialization.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealedCheckpoint {
    sha256: String,
    checkpoint: FederationCheckpoint,
}

fn checkpoint_digest(path: &Path, checkpoint: &FederationCheckpoint) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = serde_json::to_vec(checkpoint).map_err(|e| Error::json(path, 0, e))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Writes a checkpoint with its checksum, atomically.
pub fn write_checkpoint(path: &Path, checkpoint: &FederationCheckpoint) -> Result<()> {
    let sealed = SealedCheckpoint {
        sha256: checkpoint_digest(path, checkpoint)?,
        checkpoint: checkpoint.clone(),
    };
    write_json_atomic(path, &sealed)
}

/// Reads a checkpoint and verifies its checksum: a torn, truncated or edited
/// file is refused with an error naming it, and nothing is overwritten.
pub fn read_checkpoint(path: &Path) -> Result<FederationCheckpoint> {
    let text = fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    let sealed: SealedCheckpoint = serde_json::from_str(&text).map_err(|e| Error::CorruptRun {
        path: path.to_path_buf(),
        reason: format!(
            "not a complete checkpoint with its checksum (line {}: {e}); the file is torn, \
             edited or from an older fedsvd",
            e.line()
        ),
    })?;
    let actual = checkpoint_digest(path, &sealed.checkpoint)?;
    if actual != sealed.sha256 {
        return Err(Error::CorruptRun {
            path: path.to_path_buf(),
            reason: format!(
                "its checksum does not match its contents (stored {}, computed {actual}): the \
                 file was edited or damaged; refusing to resume from it",
                sealed.sha256
            ),
        });
    }
    Ok(sealed.checkpoint)
}

/// Reads a JSON file into `T`, naming the file on failure.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::json(path, e.line(), e))
}

/// Reads `metrics.jsonl`, naming the file and line of a malformed entry.
pub fn read_metrics(path: &Path) -> Result<Vec<RoundMetrics>> {
    let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io("reading", path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let metrics = serde_json::from_str(&line).map_err(|e| Error::json(path, i + 1, e))?;
        out.push(metrics);
    }
    Ok(out)
}

/// The first `rounds` lines of `metrics.jsonl`, which must be whole; any
/// later lines (a round that did not finish, a line torn by a crash) are
/// ignored.
fn read_metrics_prefix(path: &Path, rounds: usize) -> Result<Vec<RoundMetrics>> {
    let text = fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    let mut out = Vec::with_capacity(rounds);
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        if out.len() == rounds {
            break;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let metrics = serde_json::from_slice(line).map_err(|e| Error::json(path, i + 1, e))?;
        out.push(metrics);
    }
    Ok(out)
}

fn rewrite_metrics(path: &Path, history: &[RoundMetrics]) -> Result<()> {
    let mut text = String::new();
    for m in history {
        text.push_str(&serde_json::to_string(m).map_err(|e| Error::json(path, 0, e))?);
        text.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io("rewriting", path, e)
    })
}
