//! A complete run as a user states it: the model, the data and its
//! federated partition, the adapters and the federation, in one serializable
//! [`RunConfig`]; turning it into tokenized clients ([`prepare_data`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedsvd_data::{
    DatasetName, OnMalformed, Partition, PartitionReport, TableSpec, partition_dirichlet,
    partition_iid, train_test_split_sizes,
};
use fedsvd_model::{BertWeights, HeadConfig, LoraConfig, Pooling, Target, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::client::ClientData;
use crate::device::{DeviceChoice, PrecisionChoice};
use crate::error::{Error, Result};
use crate::federation::FederationConfig;

/// Everything that defines a run. Serialized as the run folder's
/// `config.json`; every key is required there, so a run folder states its
/// complete resolved configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The frozen encoder.
    pub model: ModelConfig,
    /// The data set, its split and its partition among clients.
    pub data: DataConfig,
    /// The LoRA adapters and the classifier head.
    pub adapters: AdapterConfig,
    /// Rounds, sampling, local training and privacy.
    pub federation: FederationConfig,
}

/// Which encoder, and how long its inputs may be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A folder with `config.json`, `model.safetensors` and `tokenizer.json`;
    /// `null`: the fetched all-MiniLM-L6-v2 in the assets folder.
    pub dir: Option<PathBuf>,
    /// Longest input in tokens ([CLS] and [SEP] included); longer texts are
    /// truncated.
    pub max_len: usize,
    /// Where training and evaluation compute: `auto` (a CUDA device when
    /// one is usable, for every method, else the CPU), `cpu` or `cuda`.
    /// The device actually used is in `summary.json`.
    #[serde(default)]
    pub device: DeviceChoice,
    /// GEMM precision of the frozen encoder on a GPU: `f32` (the
    /// reference), `tf32` or `bf16`. The CPU computes in f32.
    #[serde(default)]
    pub precision: PrecisionChoice,
}

/// A user's own table of examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSource {
    /// The file: `.csv` (with a header row) or `.jsonl` (one object per line).
    pub path: PathBuf,
    /// Column (CSV header or JSON key) holding the text.
    pub text_column: String,
    /// Column holding a second text for pair tasks, if any.
    pub pair_column: Option<String>,
    /// Column holding the label (string, integer or boolean).
    pub label_column: String,
    /// Skip malformed rows (listed in the run's data report) instead of
    /// failing on the first.
    pub skip_malformed: bool,
}

/// How the training split is dealt to clients.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum PartitionConfig {
    /// Even, label-blind shares.
    Iid,
    /// Label skew: each class split among clients by a Dirichlet(α) draw.
    Dirichlet {
        /// Concentration α (smaller: more skew).
        alpha: f64,
    },
}

/// The data set, its held-out split and its partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `rt`, `bbc-topic`, `bbc-pairs`, `spam` (fetched assets), or `file`
    /// (then `file` says which).
    pub dataset: String,
    /// The user's table when `dataset` is `file`.
    pub file: Option<FileSource>,
    /// Training examples drawn (stratified); `null`: every example not held
    /// out.
    pub train_examples: Option<usize>,
    /// Held-out examples drawn (stratified); `null`: `test_fraction` of the
    /// data set.
    pub test_examples: Option<usize>,
    /// Held-out share when `test_examples` is `null`.
    pub test_fraction: f64,
    /// Number of clients K.
    pub clients: usize,
    /// How the training split is dealt to the clients.
    pub partition: PartitionConfig,
    /// Fewest training examples any client may get (Dirichlet draws are
    /// repeated until this holds).
    pub min_examples_per_client: usize,
    /// Seed of the split and the partition (data layout, not noise: it is
    /// always fixed, so a resumed run sees the same clients).
    pub seed: u64,
}

/// How the classifier reads the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolingConfig {
    /// The checkpoint's pretrained pooler (tanh dense) on [CLS], as
    /// `BertForSequenceClassification` and the paper.
    Cls,
    /// The mean of the token states (what sentence-transformers trained
    /// all-MiniLM-L6-v2 for).
    Mean,
}

/// The LoRA adapters and the classifier head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// Rank r.
    pub rank: usize,
    /// `lora_alpha`; the scale is alpha / r.
    pub alpha: f32,
    /// Dropout on the adapter input during training.
    pub dropout: f32,
    /// Adapted modules: `query`, `key`, `value`, `attention.output.dense`,
    /// `intermediate.dense`, `output.dense`.
    pub targets: Vec<String>,
    /// Pooling in front of the classifier.
    pub pooling: PoolingConfig,
    /// Whether clients train (and upload) the classifier head; the paper
    /// keeps it frozen at its seeded random initialization.
    pub train_head: bool,
}

impl AdapterConfig {
    /// The model-side LoRA configuration (which factors train is the
    /// method's business and set by [`crate::Federation::new`]).
    pub fn lora(&self) -> Result<LoraConfig> {
        let targets = self
            .targets
            .iter()
            .map(|t| {
                Target::parse(t).map_err(|_| Error::InvalidConfig {
                    key: "adapters.targets",
                    value: t.clone(),
                    allowed: "query, key, value, attention.output.dense, intermediate.dense, \
                              output.dense",
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lora = LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            targets,
            train_a: false,
            train_b: true,
            train_head: self.train_head,
        };
        lora.validate().map_err(|e| Error::InvalidConfig {
            key: "adapters",
            value: e.to_string(),
            allowed: "rank >= 1, alpha > 0, dropout in [0, 1), at least one target",
        })?;
        Ok(lora)
    }

    /// The model-side head configuration for `num_labels` classes.
    pub fn head(&self, num_labels: usize) -> HeadConfig {
        HeadConfig {
            num_labels,
            pooling: match self.pooling {
                PoolingConfig::Cls => Pooling::ClsPooler,
                PoolingConfig::Mean => Pooling::Mean,
            },
        }
    }
}

impl RunConfig {
    /// Checks every value that can be checked before loading anything,
    /// naming the offending key.
    pub fn validate(&self) -> Result<()> {
        if self.model.max_len < 2 {
            return Err(Error::InvalidConfig {
                key: "model.max_len",
                value: self.model.max_len.to_string(),
                allowed: "at least 2 tokens ([CLS] and [SEP])",
            });
        }
        let d = &self.data;
        self.dataset_source()?;
        if d.test_examples.is_none() && !(d.test_fraction > 0.0 && d.test_fraction < 1.0) {
            return Err(Error::InvalidConfig {
                key: "data.test_fraction",
                value: d.test_fraction.to_string(),
                allowed: "strictly between 0 and 1",
            });
        }
        if d.clients == 0 {
            return Err(Error::InvalidConfig {
                key: "data.clients",
                value: "0".into(),
                allowed: "a whole number, at least 1",
            });
        }
        if let PartitionConfig::Dirichlet { alpha } = d.partition
            && !(alpha.is_finite() && alpha > 0.0)
        {
            return Err(Error::InvalidConfig {
                key: "data.partition.alpha",
                value: alpha.to_string(),
                allowed: "a positive finite concentration",
            });
        }
        self.adapters.lora()?;
        self.federation.validate(d.clients)
    }

    fn dataset_source(&self) -> Result<DataSource<'_>> {
        let d = &self.data;
        match (d.dataset.as_str(), &d.file) {
            ("file", Some(file)) => Ok(DataSource::File(file)),
            ("file", None) => Err(Error::InvalidConfig {
                key: "data.file",
                value: "null".into(),
                allowed: "an object {path, text_column, pair_column, label_column, \
                          skip_malformed} when data.dataset is \"file\"",
            }),
            (name, None) => name
                .parse::<DatasetName>()
                .map(DataSource::Builtin)
                .map_err(|_| Error::InvalidConfig {
                    key: "data.dataset",
                    value: name.to_string(),
                    allowed: "rt, bbc-topic, bbc-pairs, spam, or file",
                }),
            (name, Some(_)) => Err(Error::InvalidConfig {
                key: "data.file",
                value: format!("set while data.dataset is {name:?}"),
                allowed: "null unless data.dataset is \"file\"",
            }),
        }
    }

    /// The model folder: the configured one or the fetched MiniLM.
    pub fn model_dir(&self, assets_dir: &Path) -> PathBuf {
        self.model
            .dir
            .clone()
            .unwrap_or_else(|| assets_dir.join("models").join(fedsvd_model::MINILM_DIR))
    }
}

enum DataSource<'a> {
    Builtin(DatasetName),
    File(&'a FileSource),
}

/// The tokenized clients and held-out split of a run, and what the run
/// folder reports about them.
#[derive(Debug, Clone)]
pub struct PreparedData {
    /// One entry per client, in client order.
    pub clients: Vec<ClientData>,
    /// The held-out split.
    pub test: ClientData,
    /// Label names, indexing the labels.
    pub label_names: Vec<String>,
    /// Examples per label per client (the run folder's `partition.json`).
    pub partition: PartitionReport,
    /// Held-out accuracy of always predicting the training split's most
    /// common label (the bar a run must clear; computed from private
    /// training labels).
    pub majority_accuracy: f64,
    /// The same bar from the held-out split's own most common label: what
    /// a run reports when it withholds statistics of the training data.
    pub test_majority_accuracy: f64,
    /// Rows dropped or skipped while loading, with reasons.
    pub load_report: fedsvd_data::LoadReport,
}

/// Loads the data set, splits it, partitions the training split among the
/// clients and tokenizes every example once.
pub fn prepare_data(config: &RunConfig, assets_dir: &Path) -> Result<PreparedData> {
    config.validate()?;
    let d = &config.data;
    let dataset = match config.dataset_source()? {
        DataSource::Builtin(name) => fedsvd_data::load(name, assets_dir, d.seed)?,
        DataSource::File(file) => load_table(&file.table_spec(&file.path))?,
    };
    if dataset.num_labels() < 2 {
        return Err(Error::InvalidConfig {
            key: "data.dataset",
            value: format!("{} with {} label(s)", dataset.name, dataset.num_labels()),
            allowed: "a classification data set with at least two labels",
        });
    }
    let labels = dataset.labels();
    let n = labels.len();
    let test_size = d
        .test_examples
        .unwrap_or_else(|| ((n as f64) * d.test_fraction).round() as usize);
    let train_size = d.train_examples.unwrap_or(n.saturating_sub(test_size));
    let split = train_test_split_sizes(&labels, train_size, test_size, d.seed)?;
    let partition: Partition = match d.partition {
        PartitionConfig::Iid => partition_iid(&labels, &split.train, d.clients, d.seed)?,
        PartitionConfig::Dirichlet { alpha } => partition_dirichlet(
            &labels,
            &split.train,
            d.clients,
            alpha,
            d.min_examples_per_client,
            d.seed,
        )?,
    };
    let report = PartitionReport::new(&partition, &labels, &dataset.label_names)?;

    let tokenizer_path = config.model_dir(assets_dir).join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tokenizer_path, config.model.max_len)?;
    let tokenize = |indices: &[usize]| {
        tokenize_examples(&tokenizer, indices.iter().map(|&i| &dataset.examples[i]))
    };
    let clients = partition
        .clients
        .iter()
        .map(|indices| tokenize(indices))
        .collect::<Result<Vec<_>>>()?;
    let test = tokenize(&split.test)?;

    let mut train_counts = vec![0usize; dataset.num_labels()];
    for &i in &split.train {
        train_counts[labels[i]] += 1;
    }
    let majority = (0..train_counts.len())
        .max_by_key(|&c| (train_counts[c], std::cmp::Reverse(c)))
        .unwrap_or(0);
    let share = |label: usize| {
        if test.is_empty() {
            0.0
        } else {
            test.labels.iter().filter(|&&l| l == label).count() as f64 / test.len() as f64
        }
    };
    let majority_accuracy = share(majority);
    let test_majority_accuracy = (0..dataset.num_labels()).map(share).fold(0.0f64, f64::max);
    Ok(PreparedData {
        clients,
        test,
        label_names: dataset.label_names.clone(),
        partition: report,
        majority_accuracy,
        test_majority_accuracy,
        load_report: dataset.report,
    })
}

impl FileSource {
    /// How to read `path` with this source's columns and malformed-row rule.
    fn table_spec(&self, path: &Path) -> TableSpec {
        TableSpec {
            path: path.to_path_buf(),
            text_column: self.text_column.clone(),
            pair_column: self.pair_column.clone(),
            label_column: self.label_column.clone(),
            on_malformed: if self.skip_malformed {
                OnMalformed::Skip
            } else {
                OnMalformed::Error
            },
        }
    }
}

/// Reads a user's table: JSONL for `.jsonl`/`.json`, CSV otherwise.
fn load_table(spec: &TableSpec) -> Result<fedsvd_data::Dataset> {
    let is_jsonl = spec
        .path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json"));
    Ok(if is_jsonl {
        fedsvd_data::load_jsonl(spec)?
    } else {
        fedsvd_data::load_csv(spec)?
    })
}

/// Tokenizes `examples` into a client's data, in order.
fn tokenize_examples<'a>(
    tokenizer: &Tokenizer,
    examples: impl Iterator<Item = &'a fedsvd_data::Example>,
) -> Result<ClientData> {
    let examples: Vec<&fedsvd_data::Example> = examples.collect();
    let mut data = ClientData {
        ids: Vec::with_capacity(examples.len()),
        type_ids: Vec::with_capacity(examples.len()),
        labels: Vec::with_capacity(examples.len()),
        pad_id: tokenizer.pad_id(),
    };
    for chunk in examples.chunks(256) {
        let batch = if chunk.iter().all(|e| e.text_pair.is_some()) {
            let pairs: Vec<(&str, &str)> = chunk
                .iter()
                .map(|e| (e.text.as_str(), e.text_pair.as_deref().unwrap_or("")))
                .collect();
            tokenizer.encode_pairs(&pairs)?
        } else {
            let texts: Vec<&str> = chunk.iter().map(|e| e.text.as_str()).collect();
            tokenizer.encode(&texts)?
        };
        for (i, example) in chunk.iter().enumerate() {
            data.ids.push(batch.ids(i).to_vec());
            data.type_ids.push(batch.type_ids(i).to_vec());
            data.labels.push(example.label);
        }
    }
    Ok(data)
}

/// A deployed client's own training data: every row of `path` (`.csv` with
/// a header, or `.jsonl`), read with the run's columns (`data.file`'s, or
/// `text`/`label` for a built-in data set) and tokenized as the run
/// tokenizes. Nothing is split off or partitioned: on a real deployment
/// each node holds its own file, and the server evaluates on its own
/// held-out data.
///
/// Labels are matched to the run's `label_names` by name (`"fresh"`), or,
/// when a value is not a name, as an index (`1`), so every node's labels
/// mean what the server's mean even when a node sees only some of them. A
/// label that is neither is an [`Error::NodeData`] naming it and the file.
pub fn load_node_data(
    config: &RunConfig,
    assets_dir: &Path,
    path: &Path,
    label_names: &[String],
) -> Result<(ClientData, fedsvd_data::LoadReport)> {
    config.validate()?;
    if label_names.len() < 2 {
        return Err(Error::NodeData {
            path: path.to_path_buf(),
            reason: format!(
                "the run must name at least two labels to map this file's labels to (got {label_names:?})"
            ),
        });
    }
    let spec = match config.dataset_source()? {
        DataSource::File(file) => file.table_spec(path),
        DataSource::Builtin(_) => TableSpec {
            path: path.to_path_buf(),
            text_column: "text".into(),
            pair_column: None,
            label_column: "label".into(),
            on_malformed: OnMalformed::Error,
        },
    };
    let mut dataset = load_table(&spec)?;
    let mut to_run = Vec::with_capacity(dataset.label_names.len());
    for name in &dataset.label_names {
        let index = label_names.iter().position(|n| n == name).or_else(|| {
            name.parse::<usize>()
                .ok()
                .filter(|&i| i < label_names.len())
        });
        match index {
            Some(i) => to_run.push(i),
            None => {
                return Err(Error::NodeData {
                    path: path.to_path_buf(),
                    reason: format!(
                        "label {name:?} is not one of the run's labels {label_names:?} \
                         (nor an index below {})",
                        label_names.len()
                    ),
                });
            }
        }
    }
    for example in &mut dataset.examples {
        example.label = to_run[example.label];
    }
    let tokenizer_path = config.model_dir(assets_dir).join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tokenizer_path, config.model.max_len)?;
    let data = tokenize_examples(&tokenizer, dataset.examples.iter())?;
    Ok((data, dataset.report))
}

/// Loads the frozen encoder of a run.
pub fn load_weights(config: &RunConfig, assets_dir: &Path) -> Result<Arc<BertWeights>> {
    Ok(BertWeights::from_dir(&config.model_dir(assets_dir))?)
}
