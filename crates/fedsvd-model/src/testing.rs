//! A tiny random BERT for the tests and benchmarks of this crate and of the
//! crates built on it. Real weights come from [`crate::BertWeights::from_dir`];
//! this model only exercises the same code paths at a size a test can afford.

use std::sync::Arc;

use crate::config::BertConfig;
use crate::error::Result;
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

/// The random BERT of `config`, serialized as safetensors and loaded back
/// through the normal loader (so every shape check runs).
pub fn random_weights(config: &BertConfig) -> Result<Arc<BertWeights>> {
    let bytes = write_safetensors(&random_tensors(config, ""))?;
    BertWeights::from_safetensors_bytes(config.clone(), &bytes)
}
