//! Exporting a finished run's model: a PEFT LoRA adapter for the methods
//! that keep the base weights, a full Hugging Face checkpoint for those that
//! merge updates into them (FLoRA, FedEx-LoRA). A [CLS]-pooler head exports
//! as `BertForSequenceClassification` (a `SEQ_CLS` adapter or checkpoint); a
//! mean-pooling head (the quick and default presets) as `BertModel` (a
//! `FEATURE_EXTRACTION` adapter or checkpoint) with the classifier in
//! `head.safetensors` (see `fedsvd_model::peft`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use fedsvd::Runner;
use fedsvd_model::peft::{ExportMeta, save_merged_checkpoint, save_peft_adapter};

/// The export folder inside a run folder.
pub const EXPORT_DIR: &str = "model";

/// Writes the run's final model into `<run>/model`. Returns the folder, or
/// `None` (with a note on stderr) when the run has no Hugging Face
/// equivalent (a merged [CLS]-pooler checkpoint of a base without a pooler).
pub fn export_run(runner: &Runner, assets: &Path) -> anyhow::Result<Option<PathBuf>> {
    let fed = runner.federation();
    let model = fed.model();
    let state = fed.global_lora()?;
    let model_dir = runner.config().model_dir(assets);
    let model_dir = model_dir.canonicalize().unwrap_or(model_dir);
    let meta = ExportMeta {
        base_model: model_dir.display().to_string(),
        tokenizer: model_dir.join("tokenizer.json").display().to_string(),
        max_len: runner.config().model.max_len,
        labels: Some(runner.label_names().to_vec()),
        method: Some(runner.config().federation.method.name().to_string()),
    };
    let out = runner.dir().join(EXPORT_DIR);
    let merges = fed.state().base_delta_parameters() > 0;
    let result = if merges {
        save_merged_checkpoint(
            &out,
            fed.merged_weights(),
            model.lora_config(),
            model.head_config(),
            &state,
            &meta,
        )
    } else {
        save_peft_adapter(
            &out,
            &fed.merged_weights().config,
            model.lora_config(),
            model.head_config(),
            &state,
            &meta,
        )
    };
    match result {
        Ok(()) => Ok(Some(out)),
        Err(fedsvd_model::Error::NotExportable(why)) => {
            eprintln!("note: no Hugging Face export for this run: {why}");
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("exporting the model into {}", out.display())),
    }
}
