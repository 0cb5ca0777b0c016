#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod config;
mod engine;
mod error;
pub mod gpu;
mod grad;
mod lora;
mod model;
mod ops;
pub mod peft;
pub mod testing;
mod tokenizer;
mod weights;

use std::path::{Path, PathBuf};

pub use config::BertConfig;
pub use engine::{ComputeEngine, CpuEngine, DeviceInfo, StepSums, precision_name};
pub use error::{Error, Result};
pub use gpu::{GpuGradients, GpuModel};
pub use grad::Gradients;
pub use lora::{
    Adapter, HeadConfig, LoraConfig, LoraState, ParamKind, ParamLayout, ParamSlot, Pooling, Target,
};
pub use model::{EvalMetrics, Model};
pub use peft::{
    AdapterSidecar, ExportKind, ExportMeta, MergedCheckpoint, PeftAdapter, load_merged_checkpoint,
    load_peft_adapter, save_merged_checkpoint, save_peft_adapter,
};
pub use tokenizer::{Batch, Tokenizer};
pub use weights::{BertWeights, LayerNorm, LayerWeights, Linear, write_safetensors};

/// Folder name of the project's model under `assets/models/`.
pub const MINILM_DIR: &str = "all-MiniLM-L6-v2";

/// The assets folder: `$FEDSVD_ASSETS` when set, else `<workspace>/assets`.
pub fn assets_dir() -> PathBuf {
    match std::env::var_os("FEDSVD_ASSETS") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets"),
    }
}

/// The MiniLM model folder, or an error naming the fetch command when its
/// files are missing.
pub fn minilm_dir() -> Result<PathBuf> {
    let dir = assets_dir().join("models").join(MINILM_DIR);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        if !dir.join(f).is_file() {
            return Err(Error::Io {
                path: dir.join(f),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "model asset missing; run `cargo run -p fedsvd-cli -- assets fetch` \
                     (or `fedsvd assets fetch`) first",
                ),
            });
        }
    }
    Ok(dir)
}

/// The local folder of the base model an adapter names, as PEFT's
/// `base_model_name_or_path` names it.
///
/// A folder that holds `config.json` is used as it is. Otherwise a Hugging
/// Face Hub id (`owner/name`, e.g. `sentence-transformers/all-MiniLM-L6-v2`)
/// resolves to the local copy `<assets>/models/<name>`, the layout `fedsvd
/// assets fetch` installs, so adapters trained with PEFT on the Hub model
/// load without naming the folder. Nothing is downloaded. Anything else
/// (an absolute path, `..`, more than two segments) is returned as the path
/// it is, for the loader to report what it cannot read.
///
/// ```
/// # let assets = tempfile::tempdir().unwrap();
/// let local = assets.path().join("models/all-MiniLM-L6-v2");
/// std::fs::create_dir_all(&local).unwrap();
/// std::fs::write(local.join("config.json"), "{}").unwrap();
/// let dir = fedsvd_model::resolve_base_model(
///     "sentence-transformers/all-MiniLM-L6-v2",
///     assets.path(),
/// )
/// .unwrap();
/// assert_eq!(dir, local);
/// ```
pub fn resolve_base_model(reference: &str, assets: &Path) -> Result<PathBuf> {
    let as_path = PathBuf::from(reference);
    if as_path.join("config.json").is_file() {
        return Ok(as_path);
    }
    // A Hub id is `owner/name` or a bare `name`: path segments without
    // `..`, so the local copy cannot point outside `<assets>/models`.
    let segments: Vec<&str> = reference.split('/').collect();
    let is_hub_id = (1..=2).contains(&segments.len())
        && segments.iter().all(|s| {
            !s.is_empty()
                && *s != "."
                && *s != ".."
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        });
    if !is_hub_id {
        // A path: loading it names the file that is missing.
        return Ok(as_path);
    }
    let local = assets
        .join("models")
        .join(segments.last().copied().unwrap_or_default());
    if local.join("config.json").is_file() {
        return Ok(local);
    }
    Err(Error::BaseModelNotFound {
        reference: reference.to_string(),
        local,
    })
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`; `None`
/// elsewhere).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Threads the model's parallel loops use (rayon's current pool).
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}
