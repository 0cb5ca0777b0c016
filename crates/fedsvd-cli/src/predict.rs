//! `fedsvd predict --adapter DIR [--model DIR] [--json] TEXT...`: classifies
//! texts with an exported adapter (PEFT LoRA folder) or merged checkpoint.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use fedsvd_model::gpu::Precision;
use fedsvd_model::peft::{ADAPTER_CONFIG_FILE, MERGED_CONFIG_FILE, MERGED_WEIGHTS_FILE};
use fedsvd_model::{
    AdapterSidecar, BertWeights, ComputeEngine, CpuEngine, HeadConfig, LoraConfig, LoraState,
    Model, Pooling, Tokenizer, load_merged_checkpoint, load_peft_adapter,
};

/// Texts per forward pass; bounds memory for long input lists.
const CHUNK: usize = 32;

/// Arguments of `fedsvd predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// The exported folder: a PEFT LoRA adapter (`adapter_config.json`,
    /// `adapter_model.safetensors`) as every run writes, or a merged
    /// checkpoint (`config.json`, `model.safetensors`) as FLoRA and
    /// FedEx-LoRA runs write; for a mean-pooling run either comes with
    /// `head.safetensors` (the classifier) and is run with mean pooling.
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,
    /// Base model folder the adapter applies to (`config.json`,
    /// `model.safetensors`, `tokenizer.json`). Default: the `base_model` of
    /// the adapter's `fedsvd_adapter.json`, else PEFT's
    /// `base_model_name_or_path` (a folder, or a Hub id such as
    /// `sentence-transformers/all-MiniLM-L6-v2` read from its local copy
    /// under `assets/models/`), else the local all-MiniLM-L6-v2 under
    /// assets/. Not allowed with a merged checkpoint, which holds its own
    /// weights.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Truncate every text to this many tokens ([CLS] and [SEP] included).
    /// Default: the `max_len` the run trained with (from
    /// `fedsvd_adapter.json`), else 128.
    #[arg(long, value_name = "N")]
    pub max_len: Option<usize>,
    /// Print JSON: `{"adapter","kind","pooling","labels","max_len","predictions":
    /// [{"text","label","label_index","probabilities","logits","input_ids"},..]}`.
    #[arg(long)]
    pub json: bool,
    /// Where to compute the logits: auto (a usable CUDA device, else the
    /// CPU), cpu or cuda.
    #[arg(long, value_name = "DEVICE", default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    pub device: String,
    /// The texts to classify.
    #[arg(required = true, value_name = "TEXT")]
    pub texts: Vec<String>,
}

/// Everything needed to classify, from either kind of export.
struct Loaded {
    kind: &'static str,
    weights: Arc<BertWeights>,
    lora: LoraConfig,
    head: HeadConfig,
    state: LoraState,
    sidecar: Option<AdapterSidecar>,
    tokenizer: PathBuf,
}

fn load(args: &PredictArgs) -> anyhow::Result<Loaded> {
    let dir = &args.adapter;
    if dir.join(ADAPTER_CONFIG_FILE).is_file() {
        let a = load_peft_adapter(dir)
            .with_context(|| format!("loading the adapter in {}", dir.display()))?;
        let model_dir = match &args.model {
            Some(m) => m.clone(),
            None => a
                .base_model_dir(dir, &fedsvd_data::assets::default_dir())
                .with_context(|| {
                    format!(
                        "resolving the base model of the adapter in {}",
                        dir.display()
                    )
                })?,
        };
        let weights = BertWeights::from_dir(&model_dir)
            .with_context(|| format!("loading the base model {}", model_dir.display()))?;
        let tokenizer = match &a.sidecar {
            Some(s) if args.model.is_none() => AdapterSidecar::resolve(dir, &s.tokenizer),
            _ => model_dir.join("tokenizer.json"),
        };
        Ok(Loaded {
            kind: "peft_lora",
            weights,
            lora: a.lora,
            head: a.head,
            state: a.state,
            sidecar: a.sidecar,
            tokenizer,
        })
    } else if dir.join(MERGED_CONFIG_FILE).is_file() && dir.join(MERGED_WEIGHTS_FILE).is_file() {
        if args.model.is_some() {
            bail!(
                "{} is a merged checkpoint with its own weights; drop --model",
                dir.display()
            );
        }
        let m = load_merged_checkpoint(dir)
            .with_context(|| format!("loading the checkpoint in {}", dir.display()))?;
        let tokenizer = match &m.sidecar {
            Some(s) => AdapterSidecar::resolve(dir, &s.tokenizer),
            None => dir.join("tokenizer.json"),
        };
        Ok(Loaded {
            kind: "merged_checkpoint",
            weights: m.weights,
            lora: m.lora,
            head: m.head,
            state: m.state,
            sidecar: m.sidecar,
            tokenizer,
        })
    } else {
        bail!(
            "{} holds neither a PEFT adapter ({ADAPTER_CONFIG_FILE}) nor a checkpoint \
             ({MERGED_CONFIG_FILE} + {MERGED_WEIGHTS_FILE})",
            dir.display()
        )
    }
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

fn argmax(p: &[f64]) -> usize {
    // Lowest index on ties, so the answer does not depend on float noise order.
    p.iter()
        .enumerate()
        .fold(0, |best, (i, &v)| if v > p[best] { i } else { best })
}

pub fn run(args: PredictArgs) -> anyhow::Result<()> {
    let l = load(&args)?;
    let max_len = args
        .max_len
        .or(l.sidecar.as_ref().map(|s| s.max_len))
        .unwrap_or(128);
    if max_len < 2 {
        bail!("--max-len must be at least 2 ([CLS] and [SEP]), got {max_len}");
    }
    let tokenizer = Tokenizer::from_file(&l.tokenizer, max_len)
        .with_context(|| format!("loading the tokenizer {}", l.tokenizer.display()))?;
    let n = l.head.num_labels;
    let labels: Vec<String> = match l.sidecar.as_ref().and_then(|s| s.labels.clone()) {
        Some(names) => names,
        None => (0..n).map(|i| format!("LABEL_{i}")).collect(),
    };
    let model = Model::new(l.weights.clone(), l.lora.clone(), l.head)?;
    model.check_state(&l.state).with_context(|| {
        format!(
            "the adapter in {} does not fit the base model",
            args.adapter.display()
        )
    })?;
    let choice: fedsvd::DeviceChoice = args.device.parse()?;
    let (gpu, _) = fedsvd::device::resolve_gpu(choice, || {
        // Inference only: which factors would train does not matter.
        let lora = LoraConfig {
            train_a: false,
            train_b: true,
            ..l.lora.clone()
        };
        fedsvd_model::GpuModel::cuda(l.weights.clone(), lora, l.head, Precision::F32)
    })?;
    let mut engine: Box<dyn ComputeEngine + '_> = match gpu {
        Some(g) => Box::new(g),
        None => Box::new(CpuEngine(&model)),
    };

    let mut rows = Vec::with_capacity(args.texts.len());
    for chunk in args.texts.chunks(CHUNK) {
        let batch = tokenizer.encode(chunk)?;
        let logits = engine.logits(&l.state, &batch)?;
        for (i, text) in chunk.iter().enumerate() {
            let lg = logits[i * n..(i + 1) * n].to_vec();
            let p = softmax(&lg);
            rows.push((text, argmax(&p), p, lg, batch.ids(i).to_vec()));
        }
    }

    if args.json {
        let preds: Vec<_> = rows
            .iter()
            .map(|(text, k, p, lg, ids)| {
                serde_json::json!({
                    "text": text,
                    "label": labels[*k],
                    "label_index": k,
                    "probabilities": p,
                    "logits": lg,
                    "input_ids": ids,
                })
            })
            .collect();
        let out = serde_json::json!({
            "adapter": args.adapter.display().to_string(),
            "kind": l.kind,
            "pooling": match l.head.pooling {
                Pooling::ClsPooler => "cls_pooler",
                Pooling::Mean => "mean",
            },
            "labels": labels,
            "max_len": max_len,
            "predictions": preds,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let width = labels.iter().map(String::len).max().unwrap_or(0);
        for (i, (text, k, p, _, _)) in rows.iter().enumerate() {
            println!("[{i}] {text:?}");
            println!("    -> {} ({:.1} %)", labels[*k], 100.0 * p[*k]);
            for (name, q) in labels.iter().zip(p) {
                println!("       {name:<width$}  {q:.4}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn softmax_is_a_distribution_and_argmax_takes_the_first_tie() {
        let p = softmax(&[1000.0, 1000.0, -5.0]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((p[0] - 0.5).abs() < 1e-6);
        assert_eq!(argmax(&p), 0);
        assert_eq!(argmax(&softmax(&[0.1, 2.0, 1.9])), 1);
    }

    #[test]
    fn a_folder_without_an_export_is_an_error() {
        let dir = std::env::temp_dir();
        let args = PredictArgs {
            adapter: Path::new(&dir).join("fedsvd-no-such-export"),
            model: None,
            max_len: None,
            json: false,
            device: "cpu".into(),
            texts: vec!["x".into()],
        };
        let e = load(&args).err().expect("must fail");
        assert!(e.to_string().contains("neither a PEFT adapter"), "{e}");
    }
}
