//! A tiny random BERT written to disk as a real checkpoint.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use fedsvd_model::{BertConfig, BertWeights, write_safetensors};

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

/// Deterministic pseudo-random values in [-scale, scale].
pub fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// All tensors of a random BERT with `config`, names prefixed by `prefix`.
pub fn tiny_tensors(config: &BertConfig, prefix: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let h = config.hidden_size;
    let ff = config.intermediate_size;
    let mut out = Vec::new();
    let mut seed = 1u64;
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        seed += 1;
        let n = shape.iter().product();
        let v = values(n, seed, scale)
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

/// Writes `config.json` and `model.safetensors` into `dir`.
pub fn write_checkpoint(
    dir: &Path,
    config: &BertConfig,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) {
    let json = format!(
        r#"{{"architectures":["BertModel"],"vocab_size":{},"hidden_size":{},"num_hidden_layers":{},
"num_attention_heads":{},"intermediate_size":{},"hidden_act":"gelu","max_position_embeddings":{},
"type_vocab_size":{},"layer_norm_eps":1e-12,"pad_token_id":0,"position_embedding_type":"absolute",
"model_type":"bert"}}"#,
        config.vocab_size,
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.intermediate_size,
        config.max_position_embeddings,
        config.type_vocab_size
    );
    std::fs::write(dir.join("config.json"), json).unwrap();
    std::fs::write(
        dir.join("model.safetensors"),
        write_safetensors(tensors).unwrap(),
    )
    .unwrap();
}

/// The tiny model, written to a temporary folder and loaded back through the
/// normal loader.
pub fn tiny_weights() -> Arc<BertWeights> {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config();
    write_checkpoint(dir.path(), &config, &tiny_tensors(&config, ""));
    BertWeights::from_dir(dir.path()).unwrap()
}
