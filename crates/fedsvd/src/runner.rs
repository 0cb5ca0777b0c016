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
//! Crash safety: a round appends its metrics line before it replaces the
//! checkpoint, so after a crash `metrics.jsonl` has at least as many lines
//! as the checkpoint has rounds; [`Runner::resume`] drops the extra lines.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::client::ClientData;
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
        let (federation, data) = build(&config, assets_dir)?;
        fs::create_dir_all(dir).map_err(|e| Error::io("creating the run folder", dir, e))?;
        write_json_atomic(&dir.join(files::CONFIG), &config)?;
        let report = config.federation.privacy.report_unprotected;
        let record = DataRecord {
            label_names: &data.label_names,
            partition: report.then_some(&data.partition),
            client_examples: report.then(|| data.clients.iter().map(ClientData::len).collect()),
            test_examples: data.test.len(),
            majority_accuracy: majority(&config, &data),
            load_report: report.then_some(&data.load_report),
        };
        write_json_atomic(&dir.join(files::DATA), &record)?;
        let metrics = dir.join(files::METRICS);
        File::create(&metrics).map_err(|e| Error::io("creating", &metrics, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            majority_accuracy: majority(&config, &data),
            config,
            federation,
            label_names: data.label_names,
            history: Vec::new(),
        })
    }

    /// Continues the run in `dir` from its last checkpoint (or from the start
    /// when no round had finished). A seeded run then produces exactly the
    /// metrics an uninterrupted run would (wall times aside).
    pub fn resume(dir: &Path, assets_dir: &Path) -> Result<Self> {
        let config_path = dir.join(files::CONFIG);
        if !config_path.is_file() {
            return Err(Error::NotARun {
                dir: dir.to_path_buf(),
            });
        }
        let config: RunConfig = read_json(&config_path)?;
        config.validate()?;
        let (mut federation, data) = build(&config, assets_dir)?;
        let checkpoint_path = dir.join(files::CHECKPOINT);
        let rounds_done = if checkpoint_path.is_file() {
            let checkpoint: FederationCheckpoint = read_json(&checkpoint_path)?;
            federation.restore(checkpoint)?;
            federation.next_round()
        } else {
            0
        };
        let metrics_path = dir.join(files::METRICS);
        let mut history = read_metrics(&metrics_path)?;
        if history.len() < rounds_done {
            return Err(Error::CorruptRun {
                path: metrics_path,
                reason: format!(
                    "{} round lines, but the checkpoint is after round {rounds_done}",
                    history.len()
                ),
            });
        }
        // Lines past the checkpoint belong to a round that did not finish
        // checkpointing: it runs again.
        history.truncate(rounds_done);
        rewrite_metrics(&metrics_path, &history)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            majority_accuracy: majority(&config, &data),
            config,
            federation,
            label_names: data.label_names,
            history,
        })
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
        write_json_atomic(
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
        };
        write_json_atomic(&self.dir.join(files::SUMMARY), &summary)?;
        Ok(summary)
    }
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

fn rewrite_metrics(path: &Path, history: &[RoundMetrics]) -> Result<()> {
    let mut text = String::new();
    for m in history {
        text.push_str(&serde_json::to_string(m).map_err(|e| Error::json(path, 0, e))?);
        text.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    fs::write(&tmp, text)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| Error::io("rewriting", path, e))
}
