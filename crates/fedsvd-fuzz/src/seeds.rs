//! The generated seed inputs and the fixed companion files of the targets.
//!
//! `cargo run -p fedsvd-fuzz -- gen-corpus` writes the generated seeds under
//! `crates/fedsvd-fuzz/corpus/<target>/` (names starting `seed-`); regression
//! inputs found by the fuzzer sit beside them (names starting `regress-`)
//! and are written by hand. A unit test checks that the committed seeds are
//! what this module generates, and that every one of them is accepted.

use std::path::Path;

use fedsvd::{ClientPrivacy, FederationCheckpoint, GlobalState, ModuleAdapter};
use fedsvd_dp::{AccountantKind, HistoryEntry, PrivacyLedger};
use fedsvd_model::testing::random_tensors;
use fedsvd_model::{
    BertConfig, BertWeights, ExportMeta, HeadConfig, LoraConfig, LoraState, Pooling, Target,
    save_merged_checkpoint, save_peft_adapter, write_safetensors,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// A one-layer BERT of width 4 (2 heads, FFN 8, vocabulary 16, 8
/// positions): every tensor the loader reads, in about 1.5 KB.
pub fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 16,
        hidden_size: 4,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 8,
        hidden_act: "gelu".into(),
        max_position_embeddings: 8,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        pad_token_id: 0,
        position_embedding_type: "absolute".into(),
    }
}

/// `config.json` of [`tiny_config`], as Hugging Face writes it.
pub fn tiny_config_json() -> Vec<u8> {
    let mut value = fedsvd_model::testing::hf_config_json(&tiny_config());
    value["architectures"] = serde_json::json!(["BertModel"]);
    pretty(&value)
}

fn pretty(value: &serde_json::Value) -> Vec<u8> {
    let mut text = serde_json::to_vec_pretty(value).unwrap_or_default();
    text.push(b'\n');
    text
}

/// `model.safetensors` of [`tiny_config`] (Hugging Face `BertModel` names,
/// with the pooler), or `None` if serialization fails.
pub fn tiny_model(prefix: &str) -> Option<Vec<u8>> {
    write_safetensors(&random_tensors(&tiny_config(), prefix)).ok()
}

fn export_meta() -> ExportMeta {
    ExportMeta {
        base_model: "tiny-bert".into(),
        tokenizer: "tokenizer.json".into(),
        max_len: 8,
        labels: Some(vec!["no".into(), "yes".into()]),
        method: Some("fedsvd".into()),
    }
}

fn tiny_lora() -> LoraConfig {
    LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec![Target::Query, Target::Value, Target::Intermediate],
        train_a: true,
        train_b: true,
        train_head: true,
    }
}

/// A PEFT export of the tiny model into `dir`: `SEQ_CLS` for the [CLS]
/// pooler, `FEATURE_EXTRACTION` with `head.safetensors` for mean pooling.
pub fn write_peft_adapter(dir: &Path, pooling: Pooling) -> std::io::Result<()> {
    let config = tiny_config();
    let lora = tiny_lora();
    let head = HeadConfig {
        num_labels: 2,
        pooling,
    };
    let state = LoraState::init(&config, &lora, &head, 7).map_err(std::io::Error::other)?;
    save_peft_adapter(dir, &config, &lora, &head, &state, &export_meta())
        .map_err(std::io::Error::other)
}

/// A merged `BertForSequenceClassification` checkpoint of the tiny model.
pub fn write_merged_checkpoint(dir: &Path) -> std::io::Result<()> {
    let config = tiny_config();
    let bytes = tiny_model("").ok_or_else(|| std::io::Error::other("tiny model"))?;
    let weights = BertWeights::from_safetensors_bytes(config.clone(), &bytes)
        .map_err(std::io::Error::other)?;
    let lora = tiny_lora();
    let head = HeadConfig {
        num_labels: 2,
        pooling: Pooling::ClsPooler,
    };
    let state = LoraState::init(&config, &lora, &head, 7).map_err(std::io::Error::other)?;
    save_merged_checkpoint(dir, &weights, &lora, &head, &state, &export_meta())
        .map_err(std::io::Error::other)
}

/// A small WordPiece `tokenizer.json` laid out like MiniLM's.
pub const WORDPIECE_TOKENIZER: &str = r###"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [
    {"id": 0, "content": "[PAD]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 2, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 3, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 4, "content": "[MASK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
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
  "model": {
    "type": "WordPiece",
    "unk_token": "[UNK]",
    "continuing_subword_prefix": "##",
    "max_input_chars_per_word": 100,
    "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "the": 5, "movie": 6, "was": 7, "good": 8, "bad": 9, "##s": 10, "a": 11, "film": 12, "!": 13, ".": 14, "hello": 15}
  }
}
"###;

/// A byte-level BPE `tokenizer.json` with regex normalizer and splitter.
pub const BPE_TOKENIZER: &str = r###"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [
    {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}, {"type": "Lowercase"}]},
  "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "[0-9]+"}, "behavior": "Isolated", "invert": false}, {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
  "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
  "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
  "model": {
    "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null, "end_of_word_suffix": null,
    "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
    "vocab": {"<unk>": 0, "h": 1, "e": 2, "l": 3, "o": 4, "he": 5, "ll": 6, "hell": 7, "hello": 8, "Ġ": 9, "w": 10},
    "merges": ["h e", "l l", "he ll", "hell o"]
  }
}
"###;

/// A Unigram `tokenizer.json` with a Metaspace splitter and BERT-style
/// special tokens.
pub const UNIGRAM_TOKENIZER: &str = r###"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [],
  "normalizer": {"type": "Strip", "strip_left": true, "strip_right": true},
  "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
  "post_processor": {"type": "BertProcessing", "sep": ["</s>", 2], "cls": ["<s>", 1]},
  "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
  "model": {
    "type": "Unigram", "unk_id": 0, "byte_fallback": false,
    "vocab": [["<unk>", 0.0], ["<s>", 0.0], ["</s>", 0.0], ["▁hello", -1.0], ["▁", -2.0], ["h", -3.0], ["e", -3.0], ["l", -3.0], ["o", -3.0], ["w", -3.0], ["r", -3.0], ["d", -3.0]]
  }
}
"###;

/// A `checkpoint.json` of a two-client federation with two adapted modules
/// (one ledger accounted with RDP, one with PRV), or `None` if building it
/// fails.
pub fn checkpoint_json() -> Option<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut q =
        ModuleAdapter::initialized("encoder.layer.0.attention.self.query", 4, 4, 2, &mut rng);
    q.b.fill(0.25);
    let v = ModuleAdapter::initialized("encoder.layer.0.attention.self.value", 4, 4, 2, &mut rng);
    let entry = HistoryEntry::new(1.1, 0.05, 20).ok()?;
    let mut privacy = Vec::new();
    for (k, accountant) in [AccountantKind::Rdp, AccountantKind::Prv]
        .into_iter()
        .enumerate()
    {
        let mut ledger = PrivacyLedger::new(format!("client {k}"), 6.0, 1e-5, accountant).ok()?;
        ledger.record(entry);
        privacy.push(ClientPrivacy {
            sample_rate: 0.05,
            noise_multiplier: 1.1,
            ledger: Some(ledger),
        });
    }
    let checkpoint = FederationCheckpoint {
        next_round: 1,
        init_seed: 42,
        state: GlobalState {
            modules: vec![q, v],
            scale: 2.0,
            head: Some(vec![0.5, -0.5, 0.25, 0.0, 0.1, 0.2, 0.3, 0.4, -0.1, -0.2]),
        },
        privacy,
    };
    serde_json::to_value(&checkpoint).ok().map(|v| pretty(&v))
}

/// The generated seeds of `target`: `(file name, bytes)`.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let text = |name: &str, s: &str| (name.to_owned(), s.as_bytes().to_vec());
    let from_dir = |name: &str, file: &str, write: &dyn Fn(&Path) -> std::io::Result<()>| {
        let dir = tempfile::tempdir().ok()?;
        write(dir.path()).ok()?;
        Some((name.to_owned(), std::fs::read(dir.path().join(file)).ok()?))
    };
    let mut out: Vec<Option<(String, Vec<u8>)>> = Vec::new();
    match target {
        "cli-config" => {
            out.push(Some(text(
                "seed-method.json",
                r#"{"federation": {"rounds": 2, "method": {"name": "ffa"}}}"#,
            )));
            out.push(Some(text(
                "seed-full.json",
                include_str!("../../fedsvd-cli/presets/quick.json"),
            )));
            out.push(Some(text(
                "seed-csv.json",
                r#"{"data": {"dataset": "file", "file": {"path": "data.csv", "text_column": "text", "label_column": "label", "pair_column": null, "skip_malformed": true}, "partition": {"kind": "iid"}}, "adapters": {"targets": ["query", "key", "value"]}, "federation": {"privacy": {"epsilon": null, "accountant": "rdp"}, "seed": 3}}"#,
            )));
        }
        "cli-set" => {
            out.push(Some(text(
                "seed-sets.txt",
                "federation.rounds=3\nfederation.privacy.epsilon=null\ndata.dataset=spam\n",
            )));
            out.push(Some(text(
                "seed-method.txt",
                "--method flora\nfederation.method.name=fedsvd\nfederation.method.svd_period=4\nadapters.targets=[\"query\",\"value\"]\nfederation.training.lr=0.25\n",
            )));
        }
        "csv" => {
            out.push(Some(text(
                "seed-basic.csv",
                "text,label,pair\n\"a good movie\",1,first\nbad film,0,second\n\"quoted, with \"\"comma\"\"\",1,third\n",
            )));
            out.push(Some(text(
                "seed-strings.csv",
                "id,text,pair,label\n1,hello there,x,positive\n2,\"multi\nline\",y,negative\n3,ok,z,positive\n",
            )));
        }
        "jsonl" => {
            out.push(Some(text(
                "seed-basic.jsonl",
                "{\"text\": \"a good movie\", \"label\": 1, \"pair\": \"one\"}\n\n{\"text\": \"bad\", \"label\": 0, \"pair\": \"two\"}\n",
            )));
            out.push(Some(text(
                "seed-types.jsonl",
                "{\"text\": \"caf\\u00e9 \\\"x\\\"\", \"label\": \"pos\", \"pair\": \"p\", \"extra\": [1, {\"a\": null}]}\n{\"text\": \"t\", \"label\": true, \"pair\": \"q\"}\n",
            )));
        }
        "model-config" => {
            out.push(Some(("seed-config.json".to_owned(), tiny_config_json())));
        }
        "safetensors" => {
            out.push(tiny_model("").map(|b| ("seed-bert-model.safetensors".to_owned(), b)));
            out.push(from_dir(
                "seed-merged-classifier.safetensors",
                "model.safetensors",
                &write_merged_checkpoint,
            ));
        }
        "peft-config" => out.push(from_dir(
            "seed-adapter_config.json",
            "adapter_config.json",
            &|d| write_peft_adapter(d, Pooling::ClsPooler),
        )),
        "peft-weights" => {
            out.push(from_dir(
                "seed-seq-cls.safetensors",
                "adapter_model.safetensors",
                &|d| write_peft_adapter(d, Pooling::ClsPooler),
            ));
            out.push(from_dir(
                "seed-feature-extraction.safetensors",
                "adapter_model.safetensors",
                &|d| write_peft_adapter(d, Pooling::Mean),
            ));
        }
        "peft-head" => out.push(from_dir(
            "seed-head.safetensors",
            "head.safetensors",
            &|d| write_peft_adapter(d, Pooling::Mean),
        )),
        "peft-sidecar" => out.push(from_dir(
            "seed-fedsvd_adapter.json",
            "fedsvd_adapter.json",
            &|d| write_peft_adapter(d, Pooling::ClsPooler),
        )),
        "checkpoint" => {
            out.push(checkpoint_json().map(|b| ("seed-checkpoint.json".to_owned(), b)));
        }
        "tokenizer" => {
            out.push(Some(text("seed-wordpiece.json", WORDPIECE_TOKENIZER)));
            out.push(Some(text("seed-bpe.json", BPE_TOKENIZER)));
            out.push(Some(text("seed-unigram.json", UNIGRAM_TOKENIZER)));
        }
        _ => {}
    }
    out.into_iter().flatten().collect()
}

/// Writes the generated seeds of every target under `root/<target>/`.
pub fn write_corpus(root: &Path, targets: &[&str]) -> std::io::Result<usize> {
    let mut n = 0;
    for target in targets {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds(target) {
            std::fs::write(dir.join(name), bytes)?;
            n += 1;
        }
    }
    Ok(n)
}

/// The corpus of one target as committed: every file of
/// `root/<target>/`, sorted by name (so input indices are stable).
pub fn read_corpus(root: &Path, target: &str) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let dir = root.join(target);
    let mut entries = Vec::new();
    if !dir.is_dir() {
        return Ok(entries);
    }
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.is_file() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with('.') {
                continue;
            }
            entries.push((name, std::fs::read(&path)?));
        }
    }
    entries.sort();
    Ok(entries)
}
