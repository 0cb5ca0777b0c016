//! A tiny random BERT written to disk as a real checkpoint.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use fedsvd_model::{BertConfig, BertWeights, write_safetensors};

pub use fedsvd_model::testing::{random_values as values, tiny_config};

/// All tensors of a random BERT with `config`, names prefixed by `prefix`.
pub fn tiny_tensors(config: &BertConfig, prefix: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    fedsvd_model::testing::random_tensors(config, prefix)
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
