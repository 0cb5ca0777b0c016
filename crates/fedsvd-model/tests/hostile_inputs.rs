//! Regressions found by the fuzz harness (`crates/fedsvd-fuzz`): hostile
//! model, adapter and tokenizer files are typed errors that name the file,
//! never a panic, an abort or an allocation sized by a number in the file.

// Not every helper of the shared module is used here.
#[allow(unused_imports)]
mod common;

use std::path::Path;

use common::{tiny_config, tiny_tensors, write_checkpoint};
use fedsvd_model::{
    BertWeights, Error, HeadConfig, LoraConfig, LoraState, Pooling, Tokenizer, load_peft_adapter,
    save_peft_adapter, write_safetensors,
};

fn assert_names(e: &Error, path: &Path) {
    let text = e.to_string();
    assert!(
        text.contains(&path.display().to_string()),
        "`{text}` does not name {}",
        path.display()
    );
}

/// `num_hidden_layers: 4294967296` used to size a `Vec` of layers before
/// any tensor was read: a 1.5 TB allocation and an abort.
#[test]
fn a_huge_layer_count_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config();
    write_checkpoint(dir.path(), &config, &tiny_tensors(&config, ""));
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        &format!("\"num_hidden_layers\":{}", config.num_hidden_layers),
        "\"num_hidden_layers\":4294967296",
    );
    std::fs::write(&path, text).unwrap();
    let e = BertWeights::from_dir(dir.path()).unwrap_err();
    assert_names(&e, &dir.path().join("model.safetensors"));
    assert!(e.to_string().contains("missing"), "{e}");
}

/// Tensor-level errors of a model file used to name the tensor only.
#[test]
fn tensor_errors_of_a_model_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config();
    let mut tensors = tiny_tensors(&config, "");
    tensors[3].2[0] = f32::NAN;
    write_checkpoint(dir.path(), &config, &tensors);
    let e = BertWeights::from_dir(dir.path()).unwrap_err();
    assert_names(&e, &dir.path().join("model.safetensors"));
    match e {
        Error::TensorInFile { source, .. } => {
            assert!(matches!(*source, Error::NonFiniteWeight { .. }), "{source}")
        }
        e => panic!("{e}"),
    }

    let mut tensors = tiny_tensors(&config, "");
    tensors.retain(|(n, _, _)| !n.ends_with("output.dense.bias"));
    write_checkpoint(dir.path(), &config, &tensors);
    let e = BertWeights::from_dir(dir.path()).unwrap_err();
    assert_names(&e, &dir.path().join("model.safetensors"));
}

/// A config the encoder cannot run used to be reported without its file.
#[test]
fn an_unsupported_config_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config();
    write_checkpoint(dir.path(), &config, &tiny_tensors(&config, ""));
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"gelu\"", "\"relu\"");
    std::fs::write(&path, text).unwrap();
    let e = BertWeights::from_dir(dir.path()).unwrap_err();
    assert_names(&e, &path);
    assert!(e.to_string().contains("relu"), "{e}");
}

fn saved_adapter(pooling: Pooling) -> tempfile::TempDir {
    let config = tiny_config();
    let lora = LoraConfig::default();
    let head = HeadConfig {
        num_labels: 2,
        pooling,
    };
    let state = LoraState::init(&config, &lora, &head, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let meta = fedsvd_model::ExportMeta {
        base_model: "m".into(),
        tokenizer: "t".into(),
        max_len: 16,
        labels: None,
        method: None,
    };
    save_peft_adapter(dir.path(), &config, &lora, &head, &state, &meta).unwrap();
    dir
}

/// Rewrites the tensors of a safetensors file.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let values = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, v.shape().to_vec(), values)
        })
        .collect();
    edit(&mut tensors);
    std::fs::write(path, write_safetensors(&tensors).unwrap()).unwrap();
}

/// The layer index of a tensor name used to size the adapter list
/// (`encoder.layer.99999999999.…`: an abort), and `usize::MAX` overflowed.
#[test]
fn a_huge_layer_index_in_an_adapter_is_refused() {
    for index in ["99999999999", "18446744073709551615"] {
        let dir = saved_adapter(Pooling::ClsPooler);
        let path = dir.path().join("adapter_model.safetensors");
        rewrite(&path, |t| {
            for (name, _, _) in t.iter_mut() {
                if name.contains("layer.0.attention.self.value") {
                    *name = name.replace("layer.0.", &format!("layer.{index}."));
                }
            }
        });
        let e = load_peft_adapter(dir.path()).unwrap_err();
        assert!(matches!(e, Error::Adapter { .. }), "{e}");
        assert_names(&e, &path);
    }
}

/// A non-finite value in a mean-pooling head used to name the tensor only.
#[test]
fn a_bad_head_file_is_named() {
    let dir = saved_adapter(Pooling::Mean);
    let path = dir.path().join("head.safetensors");
    rewrite(&path, |t| t[0].2[0] = f32::INFINITY);
    let e = load_peft_adapter(dir.path()).unwrap_err();
    assert_names(&e, &path);
}

const TOKENIZER: &str = r###"{
  "version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [
    {"id": 0, "content": "[PAD]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 2, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 3, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
  "pre_tokenizer": {"type": "BertPreTokenizer"},
  "post_processor": {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
    "special_tokens": {
      "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
      "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
    }
  },
  "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
  "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
    "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "good": 4, "movie": 5}}
}"###;

/// The `tokenizers` crate panics on a decoder that does not parse (an
/// `expect` in its deserializer) and, when encoding, on a template whose
/// special-token table is keyed by another name than the template uses.
/// Both used to reach the caller as panics.
#[test]
fn panics_inside_tokenizers_are_typed_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, TOKENIZER).unwrap();
    let t = Tokenizer::from_file(&path, 16).unwrap();
    assert_eq!(t.encode(&["good movie"]).unwrap().ids(0), [2, 4, 5, 3]);

    std::fs::write(
        &path,
        TOKENIZER.replace("\"cleanup\": true}", "\"cleanup\": true,}"),
    )
    .unwrap();
    let e = Tokenizer::from_file(&path, 16).unwrap_err();
    assert!(matches!(e, Error::Tokenizer(_)), "{e}");
    assert_names(&e, &path);

    std::fs::write(
        &path,
        TOKENIZER.replace("\"[CLS]\": {\"id\"", "\"[XLS]\": {\"id\""),
    )
    .unwrap();
    let t = Tokenizer::from_file(&path, 16).unwrap();
    let e = t.encode(&["good movie"]).unwrap_err();
    assert!(matches!(e, Error::Tokenizer(_)), "{e}");
    assert_names(&e, &path);
    let e = t.encode_pairs(&[("good", "movie")]).unwrap_err();
    assert_names(&e, &path);
}
