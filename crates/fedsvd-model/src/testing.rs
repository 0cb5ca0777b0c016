//! A tiny random BERT for the tests and benchmarks of this crate and of the
//! crates built on it. Real weights come from [`crate::BertWeights::from_dir`];
//! this model only exercises the same code paths at a size a test can afford.

use std::path::Path;
use std::sync::Arc;

use crate::config::BertConfig;
use crate::error::{Error, Result};
use crate::weights::{BertWeights, write_safetensors};

/// A 2-layer BERT with hidden size 32, 4 heads, FFN 64, vocabulary 50 and 32
/// positions.
pub fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 50,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        hidden_act: "gelu".into(),
        max_position_embeddings: 32,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        pad_token_id: 0,
        position_embedding_type: "absolute".into(),
    }
}

/// `n` deterministic pseudo-random values in [−scale, scale] (a 64-bit LCG:
/// reproducible everywhere, no RNG crate needed).
pub fn random_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let step = |s: u64| {
        s.wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
    };
    let mut s = step(seed);
    (0..n)
        .map(|_| {
            s = step(s);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Every tensor of a random BERT with `config`, named like a Hugging Face
/// checkpoint with `prefix` in front (e.g. `""` or `"bert."`).
pub fn random_tensors(config: &BertConfig, prefix: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let h = config.hidden_size;
    let ff = config.intermediate_size;
    let mut out = Vec::new();
    let mut seed = 1u64;
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        seed += 1;
        let n = shape.iter().product();
        let v = random_values(n, seed, scale)
            .into_iter()
            .map(|x| x + offset)
            .collect();
        out.push((format!("{prefix}{name}"), shape, v));
    };
    add(
        "embeddings.word_embeddings.weight".into(),
        vec![config.vocab_size, h],
        1.0,
        0.0,
    );
    add(
        "embeddings.position_embeddings.weight".into(),
        vec![config.max_position_embeddings, h],
        0.5,
        0.0,
    );
    add(
        "embeddings.token_type_embeddings.weight".into(),
        vec![config.type_vocab_size, h],
        0.5,
        0.0,
    );
    add("embeddings.LayerNorm.weight".into(), vec![h], 0.2, 1.0);
    add("embeddings.LayerNorm.bias".into(), vec![h], 0.1, 0.0);
    for l in 0..config.num_hidden_layers {
        let p = format!("encoder.layer.{l}");
        for (m, o, i) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", ff, h),
            ("output.dense", h, ff),
        ] {
            add(
                format!("{p}.{m}.weight"),
                vec![o, i],
                1.0 / (i as f32).sqrt() * 1.7,
                0.0,
            );
            add(format!("{p}.{m}.bias"), vec![o], 0.1, 0.0);
        }
        for m in ["attention.output.LayerNorm", "output.LayerNorm"] {
            add(format!("{p}.{m}.weight"), vec![h], 0.2, 1.0);
            add(format!("{p}.{m}.bias"), vec![h], 0.1, 0.0);
        }
    }
    add(
        "pooler.dense.weight".into(),
        vec![h, h],
        1.0 / (h as f32).sqrt() * 1.7,
        0.0,
    );
    add("pooler.dense.bias".into(), vec![h], 0.1, 0.0);
    out
}

/// `config.json` of `config` as Hugging Face writes it for a BERT model.
pub fn hf_config_json(config: &BertConfig) -> serde_json::Value {
    serde_json::json!({
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id,
        "position_embedding_type": config.position_embedding_type,
    })
}

/// [`tiny_config`] with MiniLM's vocabulary (30,522) and 64 positions, so
/// MiniLM's tokenizer drives it: runs of the real pipeline at test size.
pub fn tiny_config_with_minilm_vocab() -> BertConfig {
    BertConfig {
        vocab_size: 30522,
        max_position_embeddings: 64,
        ..tiny_config()
    }
}

/// Writes a model folder `fedsvd` loads like a downloaded one:
/// `config.json` ([`hf_config_json`]), `model.safetensors` (the random
/// tensors of [`random_tensors`]) and a copy of `tokenizer`, then reads it
/// back through the normal loader, so a folder it returns is accepted.
///
/// ```
/// use fedsvd_model::testing::{tiny_config, write_random_model};
/// let dir = std::env::temp_dir().join(format!("fedsvd-doc-{}", std::process::id()));
/// let tok = dir.join("source-tokenizer.json");
/// std::fs::create_dir_all(&dir).unwrap();
/// std::fs::write(&tok, "{}").unwrap();
/// write_random_model(&dir.join("model"), &tiny_config(), &tok).unwrap();
/// assert!(dir.join("model").join("tokenizer.json").is_file());
/// std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn write_random_model(dir: &Path, config: &BertConfig, tokenizer: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join("config.json");
    let mut text = serde_json::to_string_pretty(&hf_config_json(config))
        .map_err(|e| Error::InvalidOption(format!("config.json of {}: {e}", dir.display())))?;
    text.push('\n');
    std::fs::write(&path, text).map_err(io(&path))?;
    let path = dir.join("model.safetensors");
    std::fs::write(&path, write_safetensors(&random_tensors(config, ""))?).map_err(io(&path))?;
    let path = dir.join("tokenizer.json");
    std::fs::copy(tokenizer, &path).map_err(io(tokenizer))?;
    BertWeights::from_dir(dir)?;
    Ok(())
}

/// The random BERT of `config`, serialized as safetensors and loaded back
/// through the normal loader (so every shape check runs).
pub fn random_weights(config: &BertConfig) -> Result<Arc<BertWeights>> {
    let bytes = write_safetensors(&random_tensors(config, ""))?;
    BertWeights::from_safetensors_bytes(config.clone(), &bytes)
}
