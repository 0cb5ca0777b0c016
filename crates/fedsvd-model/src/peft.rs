//! Export of trained adapters in the formats PyTorch users load, and import
//! of them back.
//!
//! Two exports, both a folder, each in two layouts that follow the head's
//! pooling:
//!
//! - **PEFT LoRA adapter** ([`save_peft_adapter`]): `adapter_model.safetensors`
//!   and `adapter_config.json` exactly as Hugging Face PEFT writes them.
//!   - [CLS]-pooler head ([`Pooling::ClsPooler`]): a LoRA on
//!     `BertForSequenceClassification` (task `SEQ_CLS`), the classifier saved
//!     as a module to save. A PyTorch user gets fedsvd's logits with
//!     `PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=N), ADAPTER_DIR)`.
//!     The pooler is not saved: it is frozen in fedsvd, so the base
//!     checkpoint's pooler (which `from_pretrained` loads) is the one fedsvd used.
//!   - Mean-pooling head ([`Pooling::Mean`]): a LoRA on the bare encoder
//!     `BertModel` (task `FEATURE_EXTRACTION`, no module to save) and the
//!     classifier in its own file [`HEAD_FILE`] (`weight` `[num_labels,
//!     hidden]`, `bias` `[num_labels]`), since transformers has no
//!     mean-pooling classifier. See the recipe below.
//! - **Merged checkpoint** ([`save_merged_checkpoint`]): a full Hugging Face
//!   checkpoint (`config.json`, `model.safetensors`) with the LoRA product
//!   `s·B·A` folded into the base weights, for methods whose updates are
//!   merged into the base (FLoRA, FedEx-LoRA): a
//!   `BertForSequenceClassification` for the [CLS]-pooler head (load it with
//!   `BertForSequenceClassification.from_pretrained(DIR)`), a `BertModel`
//!   plus [`HEAD_FILE`] for the mean-pooling head (`BertModel.from_pretrained(DIR)`,
//!   then the recipe below).
//!
//! All get `fedsvd_adapter.json` ([`SIDECAR_FILE`], [`AdapterSidecar`]):
//! what `fedsvd predict` needs beyond the weights (tokenizer, maximum length,
//! pooling, label names). PyTorch ignores it.
//!
//! # Mean pooling in PyTorch
//!
//! fedsvd's mean pooling averages the final hidden states over every real
//! token of the text, [CLS] and [SEP] included, padding excluded (texts are
//! truncated to the sidecar's `max_len` tokens, [CLS] and [SEP] counted), and
//! applies the head to the average, with no tanh and no normalization:
//!
//! ```text
//! enc = PeftModel.from_pretrained(BertModel.from_pretrained(MODEL_DIR), DIR).eval()  # or BertModel.from_pretrained(DIR)
//! head = torch.nn.Linear(hidden, num_labels)
//! head.load_state_dict(safetensors.torch.load_file(f"{DIR}/head.safetensors"))
//! h = enc(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
//! pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
//! logits = head(pooled)
//! ```
//!
//! Tensor names follow PEFT 0.21.2 with transformers 5.24.0 (observed by
//! saving LoRAs on all-MiniLM-L6-v2 with the real library):
//! `base_model.model.bert.encoder.layer.{l}.attention.self.query.lora_A.weight`
//! (`[r, d_in]`), `...lora_B.weight` (`[d_out, r]`),
//! `base_model.model.classifier.weight` / `.bias` for `SEQ_CLS`;
//! `base_model.model.encoder.layer.{l}.attention.self.query.lora_A.weight`
//! (no `bert.`) and no classifier for `FEATURE_EXTRACTION`; safetensors
//! metadata `{"format": "pt"}`. `BertModel.save_pretrained` names the
//! encoder's tensors without the `bert.` prefix
//! (`embeddings.word_embeddings.weight`, `encoder.layer.{l}...`,
//! `pooler.dense.weight`). PEFT's LoRA computes `W0 x + (alpha / r)·B A x`,
//! the same convention as [`LoraConfig`].
//!
//! What stays refused ([`Error::NotExportable`]): a merged [CLS]-pooler
//! checkpoint of a base without a pooler. On import, a sidecar whose pooling
//! contradicts the layout (mean pooling with a `SEQ_CLS` adapter or a
//! `BertForSequenceClassification` checkpoint, the [CLS] pooler with a bare
//! encoder) is an [`Error::Adapter`], since PyTorch would compute other logits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::lora::{Adapter, HeadConfig, LoraConfig, LoraState, Pooling, Target};
use crate::weights::{BertWeights, Linear, in_file};

/// The PEFT adapter weights file.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The PEFT adapter config file.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// fedsvd's own description of an export (see [`AdapterSidecar`]).
pub const SIDECAR_FILE: &str = "fedsvd_adapter.json";
/// The weights file of a merged checkpoint.
pub const MERGED_WEIGHTS_FILE: &str = "model.safetensors";
/// The config file of a merged checkpoint.
pub const MERGED_CONFIG_FILE: &str = "config.json";
/// Value of [`AdapterSidecar::format`].
pub const SIDECAR_FORMAT: &str = "fedsvd-adapter";
/// The classification head of a mean-pooling export (`weight`, `bias`).
pub const HEAD_FILE: &str = "head.safetensors";
/// Prefix PEFT puts before every tensor name of the wrapped model.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Which LoRA factor a tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// `A`, `[r, d_in]`.
    A,
    /// `B`, `[d_out, r]`.
    B,
}

/// The PEFT task an adapter is saved for, which fixes the wrapped model and
/// so the tensor names. It follows from the head's pooling
/// ([`PeftTask::for_pooling`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeftTask {
    /// `SEQ_CLS` on `BertForSequenceClassification`: encoder tensors under
    /// `bert.`, the classifier a module to save ([CLS]-pooler head).
    SeqCls,
    /// `FEATURE_EXTRACTION` on the bare `BertModel`: encoder tensors with no
    /// prefix, the head in [`HEAD_FILE`] (mean-pooling head).
    FeatureExtraction,
}

impl PeftTask {
    /// The task whose Hugging Face model computes `pooling`'s features.
    pub fn for_pooling(pooling: Pooling) -> Self {
        match pooling {
            Pooling::ClsPooler => PeftTask::SeqCls,
            Pooling::Mean => PeftTask::FeatureExtraction,
        }
    }

    /// The pooling fedsvd uses with an adapter of this task.
    pub fn pooling(self) -> Pooling {
        match self {
            PeftTask::SeqCls => Pooling::ClsPooler,
            PeftTask::FeatureExtraction => Pooling::Mean,
        }
    }

    /// PEFT's `task_type` string.
    pub fn task_type(self) -> &'static str {
        match self {
            PeftTask::SeqCls => "SEQ_CLS",
            PeftTask::FeatureExtraction => "FEATURE_EXTRACTION",
        }
    }

    /// The transformers class PEFT wraps.
    pub fn model_class(self) -> &'static str {
        match self {
            PeftTask::SeqCls => "BertForSequenceClassification",
            PeftTask::FeatureExtraction => "BertModel",
        }
    }

    /// Where the encoder sits inside the wrapped model (`bert.` or nothing).
    fn encoder_prefix(self) -> &'static str {
        match self {
            PeftTask::SeqCls => "bert.",
            PeftTask::FeatureExtraction => "",
        }
    }
}

/// The module path of `target` inside an encoder layer of Hugging Face BERT.
pub fn module_path(target: Target) -> &'static str {
    match target {
        Target::Query => "attention.self.query",
        Target::Key => "attention.self.key",
        Target::Value => "attention.self.value",
        Target::AttentionOutput => "attention.output.dense",
        Target::Intermediate => "intermediate.dense",
        Target::Output => "output.dense",
    }
}

/// The name PEFT gives a LoRA factor in `adapter_model.safetensors` for an
/// adapter of `task`.
pub fn peft_lora_key(task: PeftTask, layer: usize, target: Target, factor: Factor) -> String {
    let f = match factor {
        Factor::A => "A",
        Factor::B => "B",
    };
    format!(
        "{PEFT_PREFIX}{}encoder.layer.{layer}.{}.lora_{f}.weight",
        task.encoder_prefix(),
        module_path(target)
    )
}

/// The name PEFT gives the classifier weight (`"weight"`) or bias (`"bias"`)
/// saved as a module to save in a `SEQ_CLS` adapter (a `FEATURE_EXTRACTION`
/// adapter has no classifier: its head is [`HEAD_FILE`]).
pub fn peft_classifier_key(param: &str) -> String {
    format!("{PEFT_PREFIX}classifier.{param}")
}

/// The `target_modules` list written to `adapter_config.json`. PEFT matches a
/// module when its name equals an entry or ends with `.` + an entry, so
/// `output.dense` alone would also adapt `attention.output.dense`; when only
/// the FFN output is adapted it is therefore named per layer.
pub fn peft_target_modules(targets: &[Target], num_layers: usize) -> Vec<String> {
    let mut t = targets.to_vec();
    t.sort();
    t.dedup();
    let mut out = Vec::new();
    for target in &t {
        if *target == Target::Output && !t.contains(&Target::AttentionOutput) {
            out.extend((0..num_layers).map(|l| format!("encoder.layer.{l}.output.dense")));
        } else {
            out.push(target.name().to_owned());
        }
    }
    out
}

/// What kind of export a folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportKind {
    /// A PEFT LoRA adapter over a base model.
    PeftLora,
    /// A full checkpoint: `BertForSequenceClassification`, or `BertModel`
    /// plus [`HEAD_FILE`] for a mean-pooling head.
    MergedCheckpoint,
}

/// What the caller knows about a run beyond its weights.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportMeta {
    /// The base model folder (written as PEFT's `base_model_name_or_path`).
    pub base_model: String,
    /// The `tokenizer.json` the run used.
    pub tokenizer: String,
    /// The maximum sequence length texts were truncated to.
    pub max_len: usize,
    /// Class names in label order, when known.
    pub labels: Option<Vec<String>>,
    /// The federated method that trained the adapters (`fedsvd`, `flora`, ...).
    pub method: Option<String>,
}

/// The contents of `fedsvd_adapter.json`, written beside every export.
///
/// ```json
/// {"format": "fedsvd-adapter", "version": 1, "kind": "peft_lora",
///  "base_model": "/path/all-MiniLM-L6-v2", "tokenizer": "/path/all-MiniLM-L6-v2/tokenizer.json",
///  "max_len": 128, "pooling": "cls_pooler", "num_labels": 2, "labels": ["negative", "positive"],
///  "method": "fedsvd", "train_a": true, "train_b": true, "train_head": false}
/// ```
///
/// Relative paths are relative to the folder holding the file (a merged
/// checkpoint carries its own `tokenizer.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterSidecar {
    /// Always [`SIDECAR_FORMAT`].
    pub format: String,
    /// Version of this layout (1).
    pub version: u32,
    /// Which export the folder holds.
    pub kind: ExportKind,
    /// The base model the adapter applies to (for a merged checkpoint: the
    /// model it was derived from).
    pub base_model: String,
    /// The tokenizer file.
    pub tokenizer: String,
    /// Texts are truncated to this many tokens ([CLS] and [SEP] included).
    pub max_len: usize,
    /// `cls_pooler` (a `SEQ_CLS` adapter or `BertForSequenceClassification`
    /// checkpoint) or `mean` (a `FEATURE_EXTRACTION` adapter or `BertModel`
    /// checkpoint, with [`HEAD_FILE`]).
    pub pooling: String,
    /// Number of classes.
    pub num_labels: usize,
    /// Class names in label order, when known.
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// The federated method that trained the adapters.
    #[serde(default)]
    pub method: Option<String>,
    /// Whether `A` was trained (PEFT does not record it).
    #[serde(default = "yes")]
    pub train_a: bool,
    /// Whether `B` was trained.
    #[serde(default = "yes")]
    pub train_b: bool,
    /// Whether the classifier head was trained.
    #[serde(default)]
    pub train_head: bool,
}

fn yes() -> bool {
    true
}

impl AdapterSidecar {
    /// Reads and checks `dir/fedsvd_adapter.json`; `Ok(None)` when absent.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(SIDECAR_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = read_text(&path)?;
        let s: AdapterSidecar = serde_json::from_str(&text).map_err(|e| Error::Adapter {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if s.format != SIDECAR_FORMAT || s.version != 1 {
            return Err(Error::Adapter {
                path,
                message: format!(
                    "format `{}` version {}, expected `{SIDECAR_FORMAT}` version 1",
                    s.format, s.version
                ),
            });
        }
        if s.pooling_kind().is_none() {
            return Err(Error::Adapter {
                path,
                message: format!(
                    "unknown pooling `{}` (expected cls_pooler or mean)",
                    s.pooling
                ),
            });
        }
        if let Some(l) = &s.labels
            && l.len() != s.num_labels
        {
            return Err(Error::Adapter {
                path,
                message: format!("{} label names for {} classes", l.len(), s.num_labels),
            });
        }
        Ok(Some(s))
    }

    /// The pooling named in the file.
    pub fn pooling_kind(&self) -> Option<Pooling> {
        match self.pooling.as_str() {
            "cls_pooler" => Some(Pooling::ClsPooler),
            "mean" => Some(Pooling::Mean),
            _ => None,
        }
    }

    /// `path` of the file resolved against the folder `dir` holding it.
    pub fn resolve(dir: &Path, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_owned()
        } else {
            dir.join(p)
        }
    }
}

/// An adapter read back by [`load_peft_adapter`].
#[derive(Debug, Clone, PartialEq)]
pub struct PeftAdapter {
    /// Rank, alpha, dropout and targets from `adapter_config.json` (the
    /// trainable flags from the sidecar when present).
    pub lora: LoraConfig,
    /// Number of classes (from the classifier's shape) and pooling (from
    /// the layout: [CLS] pooler for `SEQ_CLS`, mean for `FEATURE_EXTRACTION`).
    pub head: HeadConfig,
    /// The adapters and classifier.
    pub state: LoraState,
    /// PEFT's `base_model_name_or_path`, if set.
    pub base_model_name_or_path: Option<String>,
    /// `fedsvd_adapter.json`, when the folder has one.
    pub sidecar: Option<AdapterSidecar>,
}

impl PeftAdapter {
    /// The folder of the base model this adapter (read from `dir`) applies
    /// to: the sidecar's `base_model` (relative to `dir`) when fedsvd wrote
    /// it; else PEFT's `base_model_name_or_path`, a folder or a Hub id read
    /// from its local copy under `<assets>/models/` (see
    /// [`resolve_base_model`](crate::resolve_base_model)); else the fetched
    /// all-MiniLM-L6-v2 under `assets`.
    pub fn base_model_dir(&self, dir: &Path, assets: &Path) -> Result<PathBuf> {
        match (&self.sidecar, &self.base_model_name_or_path) {
            (Some(s), _) => Ok(AdapterSidecar::resolve(dir, &s.base_model)),
            (None, Some(reference)) => crate::resolve_base_model(reference, assets),
            (None, None) => Ok(assets.join("models").join(crate::MINILM_DIR)),
        }
    }
}

/// A merged checkpoint read back by [`load_merged_checkpoint`].
#[derive(Debug, Clone)]
pub struct MergedCheckpoint {
    /// The encoder with every update folded in.
    pub weights: Arc<BertWeights>,
    /// A rank-1 LoRA on the query projections whose `B` is zero: the model
    /// needs an adapter, and this one changes nothing.
    pub lora: LoraConfig,
    /// Number of classes and pooling.
    pub head: HeadConfig,
    /// The zero adapters and the classifier.
    pub state: LoraState,
    /// `fedsvd_adapter.json`, when the folder has one.
    pub sidecar: Option<AdapterSidecar>,
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// reader never sees half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|source| Error::Write {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Write {
        path: dir.to_owned(),
        source,
    })
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::Write {
        path: path.to_owned(),
        source: std::io::Error::other(e),
    })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Safetensors bytes with the `{"format": "pt"}` metadata that PyTorch
/// writers put there (transformers checks it when loading).
fn safetensors_bytes(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<Vec<u8>> {
    let bytes: Vec<(&str, &[usize], Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            (
                n.as_str(),
                s.as_slice(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (n, s, b) in &bytes {
        let view =
            safetensors::tensor::TensorView::new(Dtype::F32, s.to_vec(), b).map_err(|e| {
                Error::Safetensors {
                    path: Default::default(),
                    message: format!("tensor `{n}`: {e}"),
                }
            })?;
        views.push((n.to_string(), view));
    }
    let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize(views, Some(meta)).map_err(|e| Error::Safetensors {
        path: Default::default(),
        message: e.to_string(),
    })
}

/// An f32 as the shortest JSON number that reads back to it (`0.05`, not
/// `0.05000000074505806`), and as an integer when it is one (PEFT writes
/// `"lora_alpha": 8`).
fn json_f32(x: f32) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        // The shortest decimal that round-trips in f32 also parses as the
        // f64 nearest it, which casts back to the same f32.
        json!(format!("{x}").parse::<f64>().unwrap_or(x as f64))
    }
}

fn pooling_name(p: Pooling) -> &'static str {
    match p {
        Pooling::ClsPooler => "cls_pooler",
        Pooling::Mean => "mean",
    }
}

/// Checks that `state` is exactly what `lora` and `head` describe on a model
/// with `config`: every layer has every target with the right shapes, the
/// head has `num_labels` rows, every value is finite.
fn check_export(
    config: &BertConfig,
    lora: &LoraConfig,
    head: &HeadConfig,
    state: &LoraState,
    meta: &ExportMeta,
) -> Result<()> {
    lora.validate()?;
    if head.num_labels == 0 {
        return Err(Error::InvalidOption("num_labels must be at least 1".into()));
    }
    if let Some(l) = &meta.labels
        && l.len() != head.num_labels
    {
        return Err(Error::LengthMismatch {
            what: "label names".into(),
            expected: head.num_labels,
            found: l.len(),
        });
    }
    if state.rank != lora.rank {
        return Err(Error::InvalidOption(format!(
            "state has rank {}, LoRA config says {}",
            state.rank, lora.rank
        )));
    }
    let targets = lora.sorted_targets();
    let expected = config.num_hidden_layers * targets.len();
    if state.adapters.len() != expected {
        return Err(Error::LengthMismatch {
            what: "adapters in the state".into(),
            expected,
            found: state.adapters.len(),
        });
    }
    for layer in 0..config.num_hidden_layers {
        for &target in &targets {
            let name = format!("layer {layer} {}", target.name());
            let ad = state.adapter(layer, target).ok_or_else(|| {
                Error::InvalidOption(format!("the state has no adapter on {name}"))
            })?;
            let (d_in, d_out) = target.dims(config);
            check_tensor(&format!("A of {name}"), &ad.a, lora.rank * d_in)?;
            check_tensor(&format!("B of {name}"), &ad.b, d_out * lora.rank)?;
        }
    }
    check_tensor(
        "classifier weight",
        &state.head_weight,
        head.num_labels * config.hidden_size,
    )?;
    check_tensor("classifier bias", &state.head_bias, head.num_labels)
}

fn check_tensor(what: &str, values: &[f32], expected: usize) -> Result<()> {
    if values.len() != expected {
        return Err(Error::LengthMismatch {
            what: what.to_owned(),
            expected,
            found: values.len(),
        });
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite(what.to_owned()));
    }
    Ok(())
}

fn sidecar_for(
    kind: ExportKind,
    lora: &LoraConfig,
    head: &HeadConfig,
    meta: &ExportMeta,
    tokenizer: String,
) -> AdapterSidecar {
    AdapterSidecar {
        format: SIDECAR_FORMAT.into(),
        version: 1,
        kind,
        base_model: meta.base_model.clone(),
        tokenizer,
        max_len: meta.max_len,
        pooling: pooling_name(head.pooling).into(),
        num_labels: head.num_labels,
        labels: meta.labels.clone(),
        method: meta.method.clone(),
        train_a: lora.train_a,
        train_b: lora.train_b,
        train_head: lora.train_head,
    }
}

fn write_sidecar(dir: &Path, sidecar: &AdapterSidecar) -> Result<()> {
    let path = dir.join(SIDECAR_FILE);
    let value = serde_json::to_value(sidecar).map_err(|e| Error::Write {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    write_json(&path, &value)
}

/// The `adapter_config.json` PEFT 0.21.2 writes for a LoRA of `task` (every
/// key it writes, in its order). The options whose defaults would change the
/// computation are spelled out, so an older or newer PEFT cannot read them
/// differently.
fn peft_adapter_config(
    task: PeftTask,
    config: &BertConfig,
    lora: &LoraConfig,
    meta: &ExportMeta,
) -> Value {
    let modules_to_save = match task {
        PeftTask::SeqCls => json!(["classifier"]),
        PeftTask::FeatureExtraction => Value::Null,
    };
    json!({
        "alora_invocation_tokens": null,
        "alpha_pattern": {},
        "arrow_config": null,
        "auto_mapping": null,
        "base_model_name_or_path": meta.base_model,
        "bias": "none",
        "corda_config": null,
        "ensure_weight_tying": false,
        "eva_config": null,
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "kasa_config": null,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": json_f32(lora.alpha),
        "lora_bias": false,
        "lora_dropout": json_f32(lora.dropout),
        "lora_ga_config": null,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": modules_to_save,
        "monteclora_config": null,
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "qalora_group_size": 16,
        "r": lora.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": peft_target_modules(&lora.targets, config.num_hidden_layers),
        "target_parameters": null,
        "task_type": task.task_type(),
        "trainable_token_indices": null,
        "use_bdlora": null,
        "use_dora": false,
        "use_qalora": false,
        "use_rslora": false,
        "velora_config": null,
    })
}

/// The head as [`HEAD_FILE`] holds it: `weight` `[num_labels, hidden]` and
/// `bias` `[num_labels]`, what `torch.nn.Linear.load_state_dict` takes.
fn head_tensors(
    head: &HeadConfig,
    hidden: usize,
    state: &LoraState,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    vec![
        (
            "weight".to_owned(),
            vec![head.num_labels, hidden],
            state.head_weight.clone(),
        ),
        (
            "bias".to_owned(),
            vec![head.num_labels],
            state.head_bias.clone(),
        ),
    ]
}

/// Writes [`HEAD_FILE`] for a mean-pooling head, or removes a stale one
/// (from an earlier export into the same folder) for the [CLS] pooler.
fn write_or_clear_head(
    dir: &Path,
    head: &HeadConfig,
    hidden: usize,
    state: &LoraState,
) -> Result<()> {
    let path = dir.join(HEAD_FILE);
    match head.pooling {
        Pooling::Mean => write_atomic(
            &path,
            &safetensors_bytes(&head_tensors(head, hidden, state))?,
        ),
        Pooling::ClsPooler => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::Write { path, source: e })
            }
            _ => Ok(()),
        },
    }
}

/// Writes `state` as a PEFT LoRA adapter into `dir` (created if needed):
/// `adapter_model.safetensors`, `adapter_config.json` and
/// `fedsvd_adapter.json`.
///
/// The layout follows the head's pooling ([`PeftTask::for_pooling`]): for
/// the [CLS] pooler a LoRA on `BertForSequenceClassification` (task
/// `SEQ_CLS`, `modules_to_save: ["classifier"]`, the classifier in the
/// adapter file); for mean pooling a LoRA on `BertModel` (task
/// `FEATURE_EXTRACTION`, no module to save) and the classifier in
/// [`HEAD_FILE`].
///
/// `config` is the base model's architecture; every adapter of every layer
/// must be present.
pub fn save_peft_adapter(
    dir: &Path,
    config: &BertConfig,
    lora: &LoraConfig,
    head: &HeadConfig,
    state: &LoraState,
    meta: &ExportMeta,
) -> Result<()> {
    check_export(config, lora, head, state, meta)?;
    let task = PeftTask::for_pooling(head.pooling);
    let r = lora.rank;
    let mut tensors = Vec::with_capacity(2 * state.adapters.len() + 2);
    for ad in &state.adapters {
        tensors.push((
            peft_lora_key(task, ad.layer, ad.target, Factor::A),
            vec![r, ad.d_in],
            ad.a.clone(),
        ));
        tensors.push((
            peft_lora_key(task, ad.layer, ad.target, Factor::B),
            vec![ad.d_out, r],
            ad.b.clone(),
        ));
    }
    if task == PeftTask::SeqCls {
        tensors.push((
            peft_classifier_key("weight"),
            vec![head.num_labels, config.hidden_size],
            state.head_weight.clone(),
        ));
        tensors.push((
            peft_classifier_key("bias"),
            vec![head.num_labels],
            state.head_bias.clone(),
        ));
    }
    let adapter_config = peft_adapter_config(task, config, lora, meta);
    create_dir(dir)?;
    write_atomic(
        &dir.join(ADAPTER_WEIGHTS_FILE),
        &safetensors_bytes(&tensors)?,
    )?;
    write_or_clear_head(dir, head, config.hidden_size, state)?;
    write_json(&dir.join(ADAPTER_CONFIG_FILE), &adapter_config)?;
    let sidecar = sidecar_for(
        ExportKind::PeftLora,
        lora,
        head,
        meta,
        meta.tokenizer.clone(),
    );
    write_sidecar(dir, &sidecar)
}

/// One tensor of an adapter file, checked to be f32 and finite.
fn read_f32(st: &SafeTensors<'_>, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let view = st.tensor(name).map_err(|_| Error::MissingTensor {
        name: name.to_owned(),
    })?;
    let values = crate::weights::f32_values(&view, name)?;
    Ok((view.shape().to_vec(), values))
}

/// Splits an adapter tensor name into `(task, layer, target, factor)`, the
/// task read off the encoder's prefix; `None` for names that are not a LoRA
/// factor of an encoder layer.
fn parse_lora_key(key: &str) -> Option<(PeftTask, usize, Target, Factor)> {
    let rest = key.strip_prefix(PEFT_PREFIX)?;
    let (task, rest) = match rest.strip_prefix("bert.") {
        Some(r) => (PeftTask::SeqCls, r),
        None => (PeftTask::FeatureExtraction, rest),
    };
    let rest = rest.strip_prefix("encoder.layer.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, factor) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, Factor::A)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, Factor::B)
    };
    let target = Target::ALL
        .into_iter()
        .find(|t| module_path(*t) == module)?;
    Some((task, layer, target, factor))
}

/// A `target_modules` entry as a target: our names (`query`,
/// `attention.output.dense`, ...), full module paths, or the per-layer
/// `encoder.layer.N.output.dense` form [`peft_target_modules`] writes.
fn parse_target_module(entry: &str) -> Option<Target> {
    if let Some(t) = Target::ALL
        .into_iter()
        .find(|t| t.name() == entry || module_path(*t) == entry)
    {
        return Some(t);
    }
    let rest = entry
        .strip_prefix("bert.")
        .unwrap_or(entry)
        .strip_prefix("encoder.layer.")?;
    let (layer, module) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    Target::ALL.into_iter().find(|t| module_path(*t) == module)
}

fn config_err(path: &Path, message: String) -> Error {
    Error::Adapter {
        path: path.to_owned(),
        message,
    }
}

/// The options of `adapter_config.json` fedsvd reads, after refusing those
/// it cannot represent.
struct PeftOptions {
    rank: usize,
    alpha: f32,
    dropout: f32,
    /// `None` when `target_modules` is a regular expression (the tensor names
    /// then decide).
    targets: Option<BTreeSet<Target>>,
    base_model: Option<String>,
    /// PEFT's `task_type`, when set.
    task_type: Option<String>,
}

fn read_peft_config(path: &Path) -> Result<PeftOptions> {
    let text = read_text(path)?;
    let v: Value = serde_json::from_str(&text).map_err(|e| config_err(path, e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| config_err(path, "not a JSON object".into()))?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    if let Some(t) = get("peft_type")
        && t.as_str() != Some("LORA")
    {
        return Err(config_err(
            path,
            format!("peft_type {t}, only LORA is read"),
        ));
    }
    let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
    for k in ["use_dora", "use_rslora", "fan_in_fan_out", "lora_bias"] {
        if flag(k) {
            return Err(config_err(path, format!("`{k}: true` is not supported")));
        }
    }
    if let Some(b) = get("bias")
        && b.as_str() != Some("none")
    {
        return Err(config_err(
            path,
            format!("bias {b}, only \"none\" is supported"),
        ));
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if get(k)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(config_err(
                path,
                format!("a non-empty `{k}` (per-module ranks or alphas) is not supported"),
            ));
        }
    }
    if get("layers_to_transform").is_some() || get("layer_replication").is_some() {
        return Err(config_err(
            path,
            "`layers_to_transform` / `layer_replication`: fedsvd adapts every layer".into(),
        ));
    }
    let rank = get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| config_err(path, "`r` must be a positive integer".into()))?
        as usize;
    let alpha = get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| config_err(path, "`lora_alpha` must be a number".into()))?
        as f32;
    let dropout = match get("lora_dropout") {
        None => 0.0,
        Some(d) => d
            .as_f64()
            .ok_or_else(|| config_err(path, "`lora_dropout` must be a number".into()))?
            as f32,
    };
    let targets = match get("target_modules") {
        Some(Value::Array(list)) => {
            let mut set = BTreeSet::new();
            for e in list {
                let s = e.as_str().unwrap_or_default();
                let t = parse_target_module(s).ok_or_else(|| {
                    config_err(
                        path,
                        format!(
                            "target module {e} is not one of query, key, value, \
                             attention.output.dense, intermediate.dense, output.dense"
                        ),
                    )
                })?;
                set.insert(t);
            }
            Some(set)
        }
        Some(Value::String(_)) => None,
        Some(other) => {
            return Err(config_err(
                path,
                format!("`target_modules` must be a list or a string, got {other}"),
            ));
        }
        None => return Err(config_err(path, "`target_modules` is missing".into())),
    };
    Ok(PeftOptions {
        rank,
        alpha,
        dropout,
        targets,
        base_model: get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_owned),
        task_type: get("task_type").and_then(Value::as_str).map(str::to_owned),
    })
}

fn shape_err(name: &str, expected: Vec<usize>, found: Vec<usize>) -> Error {
    Error::ShapeMismatch {
        name: name.to_owned(),
        expected,
        found,
    }
}

/// Reads [`HEAD_FILE`]: `(num_labels, hidden, weight, bias)`. The file must
/// hold exactly `weight` `[num_labels, hidden]` and `bias` `[num_labels]`
/// (f32, finite: [`read_f32`] checks); `hidden`, when given, is checked too.
fn read_head_file(
    path: &Path,
    hidden: Option<usize>,
) -> Result<(usize, usize, Vec<f32>, Vec<f32>)> {
    if !path.is_file() {
        return Err(config_err(
            path,
            "missing: a mean-pooling export keeps its classification head in this file".into(),
        ));
    }
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if let Some(n) = st
        .names()
        .into_iter()
        .find(|n| *n != "weight" && *n != "bias")
    {
        return Err(config_err(
            path,
            format!("unexpected tensor `{n}` (a head holds `weight` and `bias`)"),
        ));
    }
    let tensor = |name: &str| {
        if st.tensor(name).is_err() {
            return Err(config_err(path, format!("no tensor `{name}`")));
        }
        read_f32(&st, name).map_err(|e| in_file(path, e))
    };
    let (ws, weight) = tensor("weight")?;
    let (bs, bias) = tensor("bias")?;
    if ws.len() != 2 || ws[0] == 0 || hidden.is_some_and(|h| ws[1] != h) {
        return Err(config_err(
            path,
            format!(
                "`weight` has shape {ws:?}, expected [num_labels, {}]",
                hidden.map_or("hidden".to_owned(), |h| h.to_string())
            ),
        ));
    }
    if bs != [ws[0]] {
        return Err(config_err(
            path,
            format!("`bias` has shape {bs:?}, expected [{}]", ws[0]),
        ));
    }
    Ok((ws[0], ws[1], weight, bias))
}

/// Reads an adapter written by [`save_peft_adapter`] (or by PEFT itself): a
/// `SEQ_CLS` LoRA on `BertForSequenceClassification` with the classifier as
/// a module to save ([CLS]-pooler head), or a `FEATURE_EXTRACTION` LoRA on
/// `BertModel` with the head in [`HEAD_FILE`] (mean-pooling head). The
/// tensor names decide which; a `task_type` or sidecar pooling that
/// contradicts them is an [`Error::Adapter`]. Every tensor name is checked;
/// a missing factor, a mis-shaped tensor, an unknown tensor or an
/// unsupported PEFT option is a typed error. The returned state still has to
/// match the base model: [`crate::Model::check_state`] compares it with the
/// architecture.
pub fn load_peft_adapter(dir: &Path) -> Result<PeftAdapter> {
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let opts = read_peft_config(&config_path)?;
    let sidecar = AdapterSidecar::read(dir)?;
    let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
    let bytes = std::fs::read(&weights_path).map_err(|source| Error::Io {
        path: weights_path.clone(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors {
        path: weights_path.clone(),
        message: e.to_string(),
    })?;
    let (w_key, b_key) = (peft_classifier_key("weight"), peft_classifier_key("bias"));
    let mut found: BTreeSet<(usize, Target)> = BTreeSet::new();
    let mut task: Option<PeftTask> = None;
    let mut has_classifier = false;
    let mut names = st.names();
    names.sort();
    for name in names {
        if name == w_key || name == b_key {
            has_classifier = true;
            continue;
        }
        let (t, layer, target, _) = parse_lora_key(name).ok_or_else(|| {
            config_err(
                &weights_path,
                format!(
                    "unexpected tensor `{name}` (fedsvd reads the LoRA factors of the \
                     encoder layers and the classifier)"
                ),
            )
        })?;
        match task {
            Some(prev) if prev != t => {
                return Err(config_err(
                    &weights_path,
                    format!(
                        "tensor `{name}` is named for {} but others for {}",
                        t.model_class(),
                        prev.model_class()
                    ),
                ));
            }
            _ => task = Some(t),
        }
        found.insert((layer, target));
    }
    let targets: BTreeSet<Target> = match &opts.targets {
        Some(t) => t.clone(),
        None => found.iter().map(|(_, t)| *t).collect(),
    };
    if let Some((l, t)) = found.iter().find(|(_, t)| !targets.contains(t)) {
        return Err(config_err(
            &weights_path,
            format!(
                "layer {l} has a `{}` adapter but target_modules does not list it",
                t.name()
            ),
        ));
    }
    let num_layers = found
        .iter()
        .map(|(l, _)| l.saturating_add(1))
        .max()
        .unwrap_or(0);
    if num_layers == 0 || targets.is_empty() {
        return Err(config_err(
            &weights_path,
            "the file holds no LoRA factor".into(),
        ));
    }
    // The layer index comes from a tensor name: refuse a gap before
    // sizing anything by it (`encoder.layer.99999999999.…` alone would
    // otherwise ask for room for 10^11 adapters).
    let layers: BTreeSet<usize> = found.iter().map(|(l, _)| *l).collect();
    if let Some((missing, _)) = layers.iter().enumerate().find(|(i, l)| i != *l) {
        return Err(config_err(
            &weights_path,
            format!(
                "has adapters for layer {} but none for layer {missing}; fedsvd adapts every layer",
                num_layers - 1
            ),
        ));
    }
    let task = task.unwrap_or(PeftTask::SeqCls);
    if let Some(tt) = &opts.task_type {
        let declared = match tt.as_str() {
            "SEQ_CLS" => PeftTask::SeqCls,
            "FEATURE_EXTRACTION" => PeftTask::FeatureExtraction,
            _ => {
                return Err(config_err(
                    &config_path,
                    format!(
                        "task_type `{tt}`: fedsvd reads SEQ_CLS and FEATURE_EXTRACTION adapters"
                    ),
                ));
            }
        };
        if declared != task {
            return Err(config_err(
                &config_path,
                format!(
                    "task_type `{tt}` wraps {}, but the tensors are named for {} ({})",
                    declared.model_class(),
                    task.model_class(),
                    task.task_type()
                ),
            ));
        }
    }
    if let Some(s) = &sidecar
        && s.pooling_kind() != Some(task.pooling())
    {
        return Err(config_err(
            &dir.join(SIDECAR_FILE),
            format!(
                "says pooling `{}`, but a {} adapter (LoRA on {}) is for the `{}` head",
                s.pooling,
                task.task_type(),
                task.model_class(),
                pooling_name(task.pooling())
            ),
        ));
    }
    let r = opts.rank;
    let (num_labels, hidden, head_weight, head_bias) = match task {
        PeftTask::SeqCls => {
            let (cls_shape, head_weight) = read_f32(&st, &w_key)?;
            if cls_shape.len() != 2 || cls_shape[0] == 0 {
                return Err(shape_err(&w_key, vec![0, 0], cls_shape));
            }
            let (num_labels, hidden) = (cls_shape[0], cls_shape[1]);
            let (bias_shape, head_bias) = read_f32(&st, &b_key)?;
            if bias_shape != [num_labels] {
                return Err(shape_err(&b_key, vec![num_labels], bias_shape));
            }
            (num_labels, hidden, head_weight, head_bias)
        }
        PeftTask::FeatureExtraction => {
            if has_classifier {
                return Err(config_err(
                    &weights_path,
                    format!(
                        "`{w_key}` in an adapter on the bare encoder (BertModel has no \
                         classifier; a mean-pooling head is read from {HEAD_FILE})"
                    ),
                ));
            }
            read_head_file(&dir.join(HEAD_FILE), None)?
        }
    };
    // Every adapter of one target has the same dims; the first layer's
    // `A` and `B` fix them, checked against the hidden width where the
    // architecture ties them to it.
    let mut dims: BTreeMap<Target, (usize, usize)> = BTreeMap::new();
    let mut adapters = Vec::with_capacity(num_layers * targets.len());
    for layer in 0..num_layers {
        for &target in &targets {
            let ka = peft_lora_key(task, layer, target, Factor::A);
            let kb = peft_lora_key(task, layer, target, Factor::B);
            let (sa, a) = read_f32(&st, &ka)?;
            let (sb, b) = read_f32(&st, &kb)?;
            if sa.len() != 2 || sa[0] != r {
                return Err(shape_err(&ka, vec![r, sa.get(1).copied().unwrap_or(0)], sa));
            }
            if sb.len() != 2 || sb[1] != r {
                return Err(shape_err(
                    &kb,
                    vec![sb.first().copied().unwrap_or(0), r],
                    sb,
                ));
            }
            let (d_in, d_out) = (sa[1], sb[0]);
            let (want_in, want_out) = *dims.entry(target).or_insert((d_in, d_out));
            let tied_in = matches!(
                target,
                Target::Query
                    | Target::Key
                    | Target::Value
                    | Target::AttentionOutput
                    | Target::Intermediate
            );
            let tied_out = target != Target::Intermediate;
            let want_in = if tied_in { hidden } else { want_in };
            let want_out = if tied_out { hidden } else { want_out };
            if d_in != want_in {
                return Err(shape_err(&ka, vec![r, want_in], sa));
            }
            if d_out != want_out {
                return Err(shape_err(&kb, vec![want_out, r], sb));
            }
            adapters.push(Adapter {
                layer,
                target,
                d_in,
                d_out,
                a,
                b,
            });
        }
    }
    let pooling = task.pooling();
    if let Some(s) = &sidecar
        && s.num_labels != num_labels
    {
        return Err(config_err(
            &dir.join(SIDECAR_FILE),
            format!(
                "says {} classes, the classifier has {num_labels}",
                s.num_labels
            ),
        ));
    }
    let lora = LoraConfig {
        rank: r,
        alpha: opts.alpha,
        dropout: opts.dropout,
        targets: targets.iter().copied().collect(),
        train_a: sidecar.as_ref().is_none_or(|s| s.train_a),
        train_b: sidecar.as_ref().is_none_or(|s| s.train_b),
        train_head: sidecar.as_ref().is_some_and(|s| s.train_head),
    };
    lora.validate()
        .map_err(|e| config_err(&config_path, e.to_string()))?;
    Ok(PeftAdapter {
        lora,
        head: HeadConfig {
            num_labels,
            pooling,
        },
        state: LoraState {
            rank: r,
            adapters,
            head_weight,
            head_bias,
        },
        base_model_name_or_path: opts.base_model,
        sidecar,
    })
}

/// `W += s·B·A` on a `[d_out, d_in]` block of rows, accumulated in f64.
fn fold(weight: &mut [f32], ad: &Adapter, rank: usize, scale: f32) {
    let s = scale as f64;
    for (o, row) in weight.chunks_exact_mut(ad.d_in).take(ad.d_out).enumerate() {
        let b = &ad.b[o * rank..(o + 1) * rank];
        for (i, w) in row.iter_mut().enumerate() {
            let mut acc = 0.0f64;
            for (k, &bk) in b.iter().enumerate() {
                acc += bk as f64 * ad.a[k * ad.d_in + i] as f64;
            }
            *w = (*w as f64 + s * acc) as f32;
        }
    }
}

/// Writes a full Hugging Face checkpoint into `dir` (created if needed):
/// `config.json` (with the class names as `id2label`), `model.safetensors`,
/// `fedsvd_adapter.json`, and a copy of the tokenizer file when
/// `meta.tokenizer` exists, so the folder stands alone.
///
/// For the [CLS]-pooler head it is a `BertForSequenceClassification`
/// (`bert.`-prefixed encoder, pooler, classifier); for a mean-pooling head a
/// `BertModel` (encoder and, when the base has one, pooler, named as
/// `BertModel.save_pretrained` names them) plus the head in [`HEAD_FILE`].
///
/// `weights` is the base encoder with any merged updates already in it; the
/// current adapters `s·B·A` of `state` are folded in on top. The [CLS]-pooler
/// head needs the pretrained pooler: without one it is refused with
/// [`Error::NotExportable`].
pub fn save_merged_checkpoint(
    dir: &Path,
    weights: &BertWeights,
    lora: &LoraConfig,
    head: &HeadConfig,
    state: &LoraState,
    meta: &ExportMeta,
) -> Result<()> {
    let c = &weights.config;
    check_export(c, lora, head, state, meta)?;
    let cls = head.pooling == Pooling::ClsPooler;
    if cls && weights.pooler.is_none() {
        return Err(Error::NotExportable(
            "the base checkpoint has no pooler, which the [CLS]-pooler head needs".into(),
        ));
    }
    // BertForSequenceClassification keeps the encoder under `bert.`;
    // BertModel's own checkpoint has no prefix.
    let pre = if cls { "bert." } else { "" };
    let h = c.hidden_size;
    let s = lora.scale();
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, v: Vec<f32>| t.push((name, shape, v));
    push(
        format!("{pre}embeddings.word_embeddings.weight"),
        vec![c.vocab_size, h],
        weights.word_embeddings.clone(),
    );
    push(
        format!("{pre}embeddings.position_embeddings.weight"),
        vec![c.max_position_embeddings, h],
        weights.position_embeddings.clone(),
    );
    push(
        format!("{pre}embeddings.token_type_embeddings.weight"),
        vec![c.type_vocab_size, h],
        weights.token_type_embeddings.clone(),
    );
    push(
        format!("{pre}embeddings.LayerNorm.weight"),
        vec![h],
        weights.embeddings_ln.gamma.clone(),
    );
    push(
        format!("{pre}embeddings.LayerNorm.bias"),
        vec![h],
        weights.embeddings_ln.beta.clone(),
    );
    for (l, lw) in weights.layers.iter().enumerate() {
        let p = format!("{pre}encoder.layer.{l}");
        let mut linear = |target: Target, lin: &Linear, rows: std::ops::Range<usize>| {
            let mut w = lin.weight[rows.start * lin.d_in..rows.end * lin.d_in].to_vec();
            if let Some(ad) = state.adapter(l, target) {
                fold(&mut w, ad, state.rank, s);
            }
            let name = format!("{p}.{}", module_path(target));
            push(format!("{name}.weight"), vec![rows.len(), lin.d_in], w);
            push(
                format!("{name}.bias"),
                vec![rows.len()],
                lin.bias[rows].to_vec(),
            );
        };
        linear(Target::Query, &lw.qkv, 0..h);
        linear(Target::Key, &lw.qkv, h..2 * h);
        linear(Target::Value, &lw.qkv, 2 * h..3 * h);
        linear(Target::AttentionOutput, &lw.attn_out, 0..h);
        linear(
            Target::Intermediate,
            &lw.intermediate,
            0..c.intermediate_size,
        );
        linear(Target::Output, &lw.output, 0..h);
        for (name, ln) in [
            ("attention.output.LayerNorm", &lw.attn_ln),
            ("output.LayerNorm", &lw.output_ln),
        ] {
            push(format!("{p}.{name}.weight"), vec![h], ln.gamma.clone());
            push(format!("{p}.{name}.bias"), vec![h], ln.beta.clone());
        }
    }
    // The pooler is frozen in fedsvd; a mean-pooling head ignores it, but
    // BertModel has one, so it is kept whenever the base has it.
    if let Some(pooler) = &weights.pooler {
        push(
            format!("{pre}pooler.dense.weight"),
            vec![h, h],
            pooler.weight.clone(),
        );
        push(
            format!("{pre}pooler.dense.bias"),
            vec![h],
            pooler.bias.clone(),
        );
    }
    if cls {
        push(
            "classifier.weight".into(),
            vec![head.num_labels, h],
            state.head_weight.clone(),
        );
        push(
            "classifier.bias".into(),
            vec![head.num_labels],
            state.head_bias.clone(),
        );
    }

    let labels: Vec<String> = match &meta.labels {
        Some(l) => l.clone(),
        None => (0..head.num_labels).map(|i| format!("LABEL_{i}")).collect(),
    };
    let id2label: serde_json::Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), json!(l)))
        .collect();
    let label2id: serde_json::Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), json!(i)))
        .collect();
    // Dropout probabilities and the initializer range are not part of
    // `BertConfig` (fedsvd never applies BERT's internal dropouts); BERT's
    // defaults are written, and they do not affect evaluation-mode logits.
    let architecture = PeftTask::for_pooling(head.pooling).model_class();
    let config = json!({
        "architectures": [architecture],
        "model_type": "bert",
        "attention_probs_dropout_prob": 0.1,
        "classifier_dropout": null,
        "hidden_act": c.hidden_act,
        "hidden_dropout_prob": 0.1,
        "hidden_size": h,
        "id2label": id2label,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "label2id": label2id,
        "layer_norm_eps": c.layer_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "pad_token_id": c.pad_token_id,
        "position_embedding_type": c.position_embedding_type,
        "type_vocab_size": c.type_vocab_size,
        "vocab_size": c.vocab_size,
    });
    create_dir(dir)?;
    write_atomic(&dir.join(MERGED_WEIGHTS_FILE), &safetensors_bytes(&t)?)?;
    write_or_clear_head(dir, head, h, state)?;
    write_json(&dir.join(MERGED_CONFIG_FILE), &config)?;
    let tok_src = Path::new(&meta.tokenizer);
    let tokenizer = if tok_src.is_file() {
        let bytes = std::fs::read(tok_src).map_err(|source| Error::Io {
            path: tok_src.to_owned(),
            source,
        })?;
        write_atomic(&dir.join("tokenizer.json"), &bytes)?;
        "tokenizer.json".to_owned()
    } else {
        meta.tokenizer.clone()
    };
    let sidecar = sidecar_for(ExportKind::MergedCheckpoint, lora, head, meta, tokenizer);
    write_sidecar(dir, &sidecar)
}

/// Reads a checkpoint written by [`save_merged_checkpoint`]: the encoder, the
/// classifier, and a do-nothing rank-1 adapter so that [`crate::Model`] can
/// run it. A checkpoint whose `model.safetensors` holds `classifier.weight`
/// (any Hugging Face `BertForSequenceClassification` safetensors checkpoint
/// with a pooler) runs with the [CLS]-pooler head; one without (a `BertModel`)
/// needs [`HEAD_FILE`] beside it and runs with mean pooling. A sidecar whose
/// pooling contradicts this is an [`Error::Adapter`].
pub fn load_merged_checkpoint(dir: &Path) -> Result<MergedCheckpoint> {
    let sidecar = AdapterSidecar::read(dir)?;
    let weights = BertWeights::from_dir(dir)?;
    let path = dir.join(MERGED_WEIGHTS_FILE);
    let bytes = std::fs::read(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let c = &weights.config;
    let h = c.hidden_size;
    let head_path = dir.join(HEAD_FILE);
    let has_classifier =
        st.tensor("classifier.weight").is_ok() || st.tensor("classifier.bias").is_ok();
    let (pooling, num_labels, head_weight, head_bias) = if has_classifier {
        let classifier = || {
            let (ws, head_weight) = read_f32(&st, "classifier.weight")?;
            if ws.len() != 2 || ws[1] != h || ws[0] == 0 {
                return Err(shape_err("classifier.weight", vec![0, h], ws));
            }
            let num_labels = ws[0];
            let (bs, head_bias) = read_f32(&st, "classifier.bias")?;
            if bs != [num_labels] {
                return Err(shape_err("classifier.bias", vec![num_labels], bs));
            }
            Ok((num_labels, head_weight, head_bias))
        };
        let (num_labels, head_weight, head_bias) = classifier().map_err(|e| in_file(&path, e))?;
        (Pooling::ClsPooler, num_labels, head_weight, head_bias)
    } else if head_path.is_file() {
        let (num_labels, _, w, b) = read_head_file(&head_path, Some(h))?;
        (Pooling::Mean, num_labels, w, b)
    } else {
        return Err(config_err(
            &path,
            format!(
                "no `classifier.weight` (a BertForSequenceClassification checkpoint) and \
                 no {HEAD_FILE} beside it (a BertModel checkpoint of a mean-pooling run)"
            ),
        ));
    };
    if let Some(s) = &sidecar
        && s.pooling_kind() != Some(pooling)
    {
        return Err(config_err(
            &dir.join(SIDECAR_FILE),
            format!(
                "says pooling `{}`, but the checkpoint is a {} for the `{}` head",
                s.pooling,
                PeftTask::for_pooling(pooling).model_class(),
                pooling_name(pooling)
            ),
        ));
    }
    if let Some(s) = &sidecar
        && s.num_labels != num_labels
    {
        return Err(config_err(
            &dir.join(SIDECAR_FILE),
            format!(
                "says {} classes, the classifier has {num_labels}",
                s.num_labels
            ),
        ));
    }
    let lora = LoraConfig {
        rank: 1,
        alpha: 1.0,
        dropout: 0.0,
        targets: vec![Target::Query],
        train_a: false,
        train_b: false,
        train_head: false,
    };
    let adapters = (0..c.num_hidden_layers)
        .map(|layer| Adapter {
            layer,
            target: Target::Query,
            d_in: h,
            d_out: h,
            a: vec![0.0; h],
            b: vec![0.0; h],
        })
        .collect();
    Ok(MergedCheckpoint {
        weights,
        lora,
        head: HeadConfig {
            num_labels,
            pooling,
        },
        state: LoraState {
            rank: 1,
            adapters,
            head_weight,
            head_bias,
        },
        sidecar,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{random_values, random_weights, tiny_config};

    #[test]
    fn json_numbers_are_short_and_exact() {
        assert_eq!(json_f32(8.0).to_string(), "8");
        assert_eq!(json_f32(0.05).to_string(), "0.05");
        for x in [0.05f32, 0.1, 1.0 / 3.0, 16.5, 1e-7] {
            assert_eq!(json_f32(x).as_f64().unwrap() as f32, x);
        }
    }

    #[test]
    fn target_modules_never_match_more_than_the_adapted_modules() {
        assert_eq!(
            peft_target_modules(&[Target::Value, Target::Query], 2),
            ["query", "value"]
        );
        assert_eq!(
            peft_target_modules(&[Target::Output, Target::AttentionOutput], 2),
            ["attention.output.dense", "output.dense"]
        );
        // Alone, `output.dense` would also match `attention.output.dense`
        // under PEFT's suffix rule.
        assert_eq!(
            peft_target_modules(&[Target::Output], 2),
            [
                "encoder.layer.0.output.dense",
                "encoder.layer.1.output.dense"
            ]
        );
        for e in peft_target_modules(&Target::ALL, 3) {
            assert!(parse_target_module(&e).is_some(), "{e}");
        }
    }

    #[test]
    fn lora_keys_parse_back() {
        for task in [PeftTask::SeqCls, PeftTask::FeatureExtraction] {
            for t in Target::ALL {
                for f in [Factor::A, Factor::B] {
                    let key = peft_lora_key(task, 5, t, f);
                    assert_eq!(parse_lora_key(&key), Some((task, 5, t, f)), "{key}");
                }
            }
        }
        assert_eq!(
            peft_lora_key(PeftTask::SeqCls, 2, Target::Value, Factor::B),
            "base_model.model.bert.encoder.layer.2.attention.self.value.lora_B.weight"
        );
        assert_eq!(
            peft_lora_key(PeftTask::FeatureExtraction, 2, Target::Value, Factor::B),
            "base_model.model.encoder.layer.2.attention.self.value.lora_B.weight"
        );
        assert_eq!(parse_lora_key("base_model.model.classifier.weight"), None);
        assert_eq!(
            parse_lora_key("base_model.model.bert.encoder.layer.0.attention.self.query.weight"),
            None
        );
        assert_eq!(
            parse_lora_key("base_model.model.encoder.layer.0.attention.self.query.weight"),
            None
        );
    }

    #[test]
    fn task_follows_pooling() {
        for p in [Pooling::ClsPooler, Pooling::Mean] {
            assert_eq!(PeftTask::for_pooling(p).pooling(), p);
        }
        assert_eq!(
            PeftTask::for_pooling(Pooling::Mean).task_type(),
            "FEATURE_EXTRACTION"
        );
        assert_eq!(
            PeftTask::for_pooling(Pooling::ClsPooler).task_type(),
            "SEQ_CLS"
        );
    }

    #[test]
    fn fold_adds_the_scaled_product() {
        let ad = Adapter {
            layer: 0,
            target: Target::Query,
            d_in: 3,
            d_out: 2,
            a: random_values(6, 1, 1.0),
            b: random_values(4, 2, 1.0),
        };
        let mut w = random_values(6, 3, 1.0);
        let w0 = w.clone();
        fold(&mut w, &ad, 2, 0.5);
        for o in 0..2 {
            for i in 0..3 {
                let p: f32 = (0..2).map(|k| ad.b[o * 2 + k] * ad.a[k * 3 + i]).sum();
                assert!((w[o * 3 + i] - w0[o * 3 + i] - 0.5 * p).abs() < 1e-6);
            }
        }
    }

    fn export_meta() -> ExportMeta {
        ExportMeta {
            base_model: "m".into(),
            tokenizer: "t".into(),
            max_len: 16,
            labels: None,
            method: None,
        }
    }

    /// Mean pooling needs no pooler, so a base without one still exports a
    /// merged checkpoint; the [CLS]-pooler head without a pooler is what
    /// stays refused.
    #[test]
    fn only_the_cls_pooler_head_needs_a_pooler() {
        let config = tiny_config();
        let lora = LoraConfig::default();
        let mut w = (*random_weights(&config).unwrap()).clone();
        w.pooler = None;
        let dir = tempfile::tempdir().unwrap();
        let mean = HeadConfig {
            num_labels: 2,
            pooling: Pooling::Mean,
        };
        let state = LoraState::init(&config, &lora, &mean, 1).unwrap();
        save_merged_checkpoint(dir.path(), &w, &lora, &mean, &state, &export_meta()).unwrap();
        assert!(dir.path().join(HEAD_FILE).is_file());
        let back = load_merged_checkpoint(dir.path()).unwrap();
        assert_eq!(back.head, mean);
        assert!(back.weights.pooler.is_none());

        let cls = HeadConfig {
            pooling: Pooling::ClsPooler,
            ..mean
        };
        let other = tempfile::tempdir().unwrap();
        let e = save_merged_checkpoint(other.path(), &w, &lora, &cls, &state, &export_meta())
            .unwrap_err();
        assert!(matches!(e, Error::NotExportable(_)), "{e}");
        assert!(!other.path().join(MERGED_WEIGHTS_FILE).exists());
    }

    /// A [CLS]-pooler export into a folder that held a mean-pooling one
    /// leaves no stale head behind.
    #[test]
    fn a_cls_export_removes_a_stale_head() {
        let config = tiny_config();
        let lora = LoraConfig::default();
        let dir = tempfile::tempdir().unwrap();
        for pooling in [Pooling::Mean, Pooling::ClsPooler] {
            let head = HeadConfig {
                num_labels: 2,
                pooling,
            };
            let state = LoraState::init(&config, &lora, &head, 1).unwrap();
            save_peft_adapter(dir.path(), &config, &lora, &head, &state, &export_meta()).unwrap();
            assert_eq!(
                dir.path().join(HEAD_FILE).is_file(),
                pooling == Pooling::Mean
            );
            assert_eq!(load_peft_adapter(dir.path()).unwrap().head, head);
        }
    }
}
