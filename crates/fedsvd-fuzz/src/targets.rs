//! The fuzz targets: one per parser of user input.

use std::path::Path;

use fedsvd::FederationCheckpoint;
use fedsvd_cli::config::{ConfigOptions, resolve};
use fedsvd_data::{OnMalformed, TableSpec, load_csv, load_jsonl};
use fedsvd_model::{BertWeights, Pooling, Tokenizer, load_merged_checkpoint, load_peft_adapter};

use crate::harness::{Target, no_exception, no_setup};
use crate::mutate::Format;
use crate::seeds;

/// JSON punctuation and literals every JSON target gets, plus its own tokens.
macro_rules! dictionary {
    ($($extra:literal),* $(,)?) => {
        &[
            "{", "}", "[", "]", ",", ":", "\"", "null", "true", "false", "-", "1e999",
            "\\u0000", "\"\":", "{}", "[]", $($extra),*
        ]
    };
}

/// Every target, in the order `cargo xtask fuzz` runs them.
pub fn all() -> Vec<Target> {
    vec![
        Target {
            name: "cli-config",
            about: "`fedsvd run --config FILE`: JSON merged over the preset, then RunConfig + validate",
            format: Format::Text,
            input_file: "config.json",
            setup: no_setup,
            names_file: true,
            unnamed_ok: no_exception,
            dictionary: dictionary!(
                "\"federation\"",
                "\"data\"",
                "\"model\"",
                "\"adapters\"",
                "\"method\"",
                "\"name\"",
                "\"rounds\"",
                "\"clients\"",
                "\"clients_per_round\"",
                "\"privacy\"",
                "\"epsilon\"",
                "\"delta\"",
                "\"training\"",
                "\"lr\"",
                "\"partition\"",
                "\"kind\"",
                "\"alpha\"",
                "\"rank\"",
                "\"targets\"",
                "\"max_len\"",
                "\"dataset\"",
                "\"file\"",
                "\"svd_period\"",
                "\"fedsvd\"",
                "\"flora\"",
                "\"fedex\"",
                "\"ffa\"",
                "\"fedavg\"",
                "\"iid\"",
                "\"dirichlet\"",
                "\"prv\"",
                "\"rdp\"",
                "\"file\"",
                "\"mean\"",
                "\"seed\""
            ),
            run: run_cli_config,
        },
        Target {
            name: "cli-set",
            about: "`fedsvd run --method NAME --set KEY=VALUE...` (one assignment per line)",
            format: Format::Text,
            input_file: "",
            setup: no_setup,
            names_file: false,
            unnamed_ok: no_exception,
            dictionary: dictionary!(
                "=",
                ".",
                "\n",
                "--method ",
                "federation.",
                "data.",
                "model.",
                "adapters.",
                "method.",
                "name=",
                "rounds=",
                "privacy.",
                "epsilon=",
                "training.",
                "partition.",
                "kind=",
                "clients=",
                "rank=",
                "targets=",
                "fedsvd",
                "flora",
                "fedex",
                "ffa",
                "fedavg",
                "svd_period=",
                "solver=",
                "seed="
            ),
            run: run_cli_set,
        },
        Target {
            name: "csv",
            about: "the user's CSV data (fedsvd-data load_csv, error and skip modes)",
            format: Format::Text,
            input_file: "data.csv",
            setup: no_setup,
            names_file: true,
            unnamed_ok: no_exception,
            dictionary: &[
                ",", "\"", "\"\"", "\n", "\r\n", "\r", "text", "label", "pair", ",,", "\u{feff}",
                "\u{0}", "\u{e9}", "\u{ff}",
            ],
            run: run_csv,
        },
        Target {
            name: "jsonl",
            about: "the user's JSON Lines data (fedsvd-data load_jsonl, error and skip modes)",
            format: Format::Text,
            input_file: "data.jsonl",
            setup: no_setup,
            names_file: true,
            unnamed_ok: no_exception,
            dictionary: dictionary!(
                "\n",
                "\"text\"",
                "\"label\"",
                "\"pair\"",
                "\r\n",
                "\u{feff}"
            ),
            run: run_jsonl,
        },
        Target {
            name: "model-config",
            about: "a model folder's config.json (BertWeights::from_dir)",
            format: Format::Text,
            input_file: "config.json",
            setup: setup_model_weights,
            names_file: true,
            unnamed_ok: no_exception,
            dictionary: dictionary!(
                "\"vocab_size\"",
                "\"hidden_size\"",
                "\"num_hidden_layers\"",
                "\"num_attention_heads\"",
                "\"intermediate_size\"",
                "\"hidden_act\"",
                "\"max_position_embeddings\"",
                "\"type_vocab_size\"",
                "\"layer_norm_eps\"",
                "\"pad_token_id\"",
                "\"position_embedding_type\"",
                "\"gelu\"",
                "\"absolute\""
            ),
            run: run_model,
        },
        Target {
            name: "safetensors",
            about: "a model folder's model.safetensors (BertWeights::from_dir, load_merged_checkpoint)",
            format: Format::Safetensors,
            input_file: "model.safetensors",
            setup: setup_model_config,
            names_file: true,
            unnamed_ok: no_exception,
            dictionary: dictionary!(
                "\"dtype\"",
                "\"shape\"",
                "\"data_offsets\"",
                "\"F32\"",
                "\"F16\"",
                "\"BF16\"",
                "\"I64\"",
                "\"U8\"",
                "\"__metadata__\"",
                "\"bert.\"",
                "\"classifier.weight\"",
                "\"classifier.bias\"",
                "\"pooler.dense.weight\"",
                "\"embeddings.word_embeddings.weight\""
            ),
            run: run_safetensors,
        },
        Target {
            name: "peft-config",
            about: "a PEFT adapter's adapter_config.json (load_peft_adapter)",
            format: Format::Text,
            input_file: "adapter_config.json",
            setup: setup_peft_cls,
            names_file: true,
            unnamed_ok: peft_tensor_error,
            dictionary: dictionary!(
                "\"r\"",
                "\"lora_alpha\"",
                "\"lora_dropout\"",
                "\"target_modules\"",
                "\"peft_type\"",
                "\"LORA\"",
                "\"task_type\"",
                "\"SEQ_CLS\"",
                "\"FEATURE_EXTRACTION\"",
                "\"bias\"",
                "\"none\"",
                "\"use_dora\"",
                "\"rank_pattern\"",
                "\"layers_to_transform\"",
                "\"query\"",
                "\"value\"",
                "\"intermediate.dense\"",
                "\"encoder.layer.0.output.dense\"",
                "\"base_model_name_or_path\"",
                "\"modules_to_save\""
            ),
            run: run_peft,
        },
        Target {
            name: "peft-weights",
            about: "a PEFT adapter's adapter_model.safetensors (load_peft_adapter)",
            format: Format::Safetensors,
            input_file: "adapter_model.safetensors",
            setup: setup_peft_weights,
            names_file: true,
            unnamed_ok: peft_tensor_error,
            dictionary: dictionary!(
                "\"dtype\"",
                "\"shape\"",
                "\"data_offsets\"",
                "\"F32\"",
                "\"F64\"",
                "\"BF16\"",
                "\"__metadata__\"",
                "base_model.model.",
                "bert.",
                "encoder.layer.",
                "99999999999",
                "18446744073709551615",
                ".attention.self.query",
                ".attention.self.value",
                ".intermediate.dense",
                ".lora_A.weight",
                ".lora_B.weight",
                "\"base_model.model.classifier.weight\"",
                "\"base_model.model.classifier.bias\""
            ),
            run: run_peft,
        },
        Target {
            name: "peft-head",
            about: "a mean-pooling PEFT export's head.safetensors (load_peft_adapter)",
            format: Format::Safetensors,
            input_file: "head.safetensors",
            setup: setup_peft_mean,
            names_file: true,
            unnamed_ok: peft_tensor_error,
            dictionary: dictionary!(
                "\"dtype\"",
                "\"shape\"",
                "\"data_offsets\"",
                "\"F32\"",
                "\"F16\"",
                "\"weight\"",
                "\"bias\"",
                "\"__metadata__\""
            ),
            run: run_peft,
        },
        Target {
            name: "peft-sidecar",
            about: "an export's fedsvd_adapter.json (load_peft_adapter)",
            format: Format::Text,
            input_file: "fedsvd_adapter.json",
            setup: setup_peft_cls,
            names_file: true,
            unnamed_ok: peft_tensor_error,
            dictionary: dictionary!(
                "\"format\"",
                "\"fedsvd-adapter\"",
                "\"version\"",
                "\"kind\"",
                "\"peft_lora\"",
                "\"merged_checkpoint\"",
                "\"pooling\"",
                "\"cls_pooler\"",
                "\"mean\"",
                "\"num_labels\"",
                "\"labels\"",
                "\"train_a\"",
                "\"max_len\""
            ),
            run: run_peft,
        },
        Target {
            name: "checkpoint",
            about: "a run folder's checkpoint.json (FederationCheckpoint, then each ledger's epsilon)",
            format: Format::Text,
            input_file: "checkpoint.json",
            setup: no_setup,
            names_file: true,
            unnamed_ok: no_exception,
            dictionary: dictionary!(
                "\"next_round\"",
                "\"init_seed\"",
                "\"state\"",
                "\"modules\"",
                "\"a\"",
                "\"b\"",
                "\"v\"",
                "\"dim\"",
                "\"data\"",
                "\"base_delta\"",
                "\"scale\"",
                "\"head\"",
                "\"privacy\"",
                "\"sample_rate\"",
                "\"noise_multiplier\"",
                "\"ledger\"",
                "\"history\"",
                "\"steps\"",
                "\"accountant\"",
                "\"rdp\"",
                "\"prv\"",
                "\"budget_epsilon\"",
                "\"delta\""
            ),
            run: run_checkpoint,
        },
        Target {
            name: "tokenizer",
            about: "tokenizer.json (Tokenizer::from_file, then encoding texts and pairs)",
            format: Format::Text,
            input_file: "tokenizer.json",
            setup: no_setup,
            names_file: true,
            unnamed_ok: no_exception,
            dictionary: dictionary!(
                "\"type\"",
                "\"model\"",
                "\"WordPiece\"",
                "\"BPE\"",
                "\"Unigram\"",
                "\"WordLevel\"",
                "\"vocab\"",
                "\"merges\"",
                "\"normalizer\"",
                "\"pre_tokenizer\"",
                "\"post_processor\"",
                "\"decoder\"",
                "\"Sequence\"",
                "\"Regex\"",
                "\"String\"",
                "\"Replace\"",
                "\"Split\"",
                "\"Precompiled\"",
                "\"precompiled_charsmap\"",
                "\"TemplateProcessing\"",
                "\"special_tokens\"",
                "\"ids\"",
                "\"added_tokens\"",
                "\"truncation\"",
                "\"padding\"",
                "\"max_length\"",
                "\"stride\"",
                "\"pad_to_multiple_of\"",
                "\"unk_token\"",
                "\"unk_id\"",
                "\"max_input_chars_per_word\"",
                "\"dropout\"",
                "\"(?:\"",
                "\"[^\\\\s]+\"",
                "\"Fixed\"",
                "\"BatchLongest\"",
                "\"Metaspace\"",
                "\"ByteLevel\"",
                "\"Digits\"",
                "\"Punctuation\"",
                "\"Strip\"",
                "\"NFKC\"",
                "\"byte_fallback\""
            ),
            run: run_tokenizer,
        },
    ]
}

/// The target named `name`, planted test targets included.
pub fn by_name(name: &str) -> Option<Target> {
    all()
        .into_iter()
        .chain(crate::planted::all())
        .find(|t| t.name == name)
}

/// Tensor-level errors of the PEFT loader (`MissingTensor`,
/// `ShapeMismatch`, `UnsupportedDtype`, `NonFiniteWeight`) name the tensor
/// but not the file, and fedsvd-model's integration tests match those
/// variants field by field, so they cannot gain a path here; the tensor
/// names of an adapter file (`base_model.model.…`) and of a head file
/// (`weight`, `bias`) identify the file. Reported in the fuzzing notes.
fn peft_tensor_error(message: &str) -> bool {
    message.starts_with("tensor `base_model.model.")
}

fn display<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn run_cli_config(dir: &Path, _: &[u8]) -> Result<(), String> {
    let file = dir.join("config.json");
    let config = resolve(&ConfigOptions {
        file: Some(&file),
        ..ConfigOptions::default()
    })
    .map_err(|e| format!("{e:#}"))?;
    // What `fedsvd run` does next with the config: write it into the run
    // folder and name the data files.
    serde_json::to_string(&config).map_err(display)?;
    Ok(())
}

fn run_cli_set(_: &Path, input: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(input);
    let mut method = None;
    let mut sets = Vec::new();
    for line in text.lines() {
        match line.strip_prefix("--method ") {
            Some(m) => method = Some(m.to_owned()),
            None => sets.push(line.to_owned()),
        }
    }
    resolve(&ConfigOptions {
        method: method.as_deref(),
        sets: &sets,
        ..ConfigOptions::default()
    })
    .map_err(|e| format!("{e:#}"))?;
    Ok(())
}

/// The first error of several, preferring one that does not name `dir` (so
/// the harness sees it).
fn first_error(dir: &Path, results: Vec<Result<(), String>>) -> Result<(), String> {
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    let dir = dir.display().to_string();
    match errors.iter().find(|e| !e.contains(&dir)) {
        Some(e) => Err(e.clone()),
        None => errors.into_iter().next().map_or(Ok(()), Err),
    }
}

fn run_table(
    dir: &Path,
    file: &str,
    load: fn(&TableSpec) -> fedsvd_data::Result<fedsvd_data::Dataset>,
) -> Result<(), String> {
    let spec = |pair: Option<&str>, on_malformed| TableSpec {
        path: dir.join(file),
        text_column: "text".into(),
        pair_column: pair.map(str::to_owned),
        label_column: "label".into(),
        on_malformed,
    };
    let strict = load(&spec(None, OnMalformed::Error))
        .map(|_| ())
        .map_err(display);
    let lenient = load(&spec(Some("pair"), OnMalformed::Skip))
        .map(|d| {
            // The report of skipped rows is printed to the user.
            let _ = format!("{:?}", d.report);
        })
        .map_err(display);
    first_error(dir, vec![strict, lenient])
}

fn run_csv(dir: &Path, _: &[u8]) -> Result<(), String> {
    run_table(dir, "data.csv", load_csv)
}

fn run_jsonl(dir: &Path, _: &[u8]) -> Result<(), String> {
    run_table(dir, "data.jsonl", load_jsonl)
}

fn setup_model_weights(dir: &Path) -> std::io::Result<()> {
    let bytes = seeds::tiny_model("").ok_or_else(|| std::io::Error::other("tiny model"))?;
    std::fs::write(dir.join("model.safetensors"), bytes)
}

fn setup_model_config(dir: &Path) -> std::io::Result<()> {
    std::fs::write(dir.join("config.json"), seeds::tiny_config_json())
}

fn run_model(dir: &Path, _: &[u8]) -> Result<(), String> {
    BertWeights::from_dir(dir).map(|_| ()).map_err(display)
}

/// Loads the folder as a `BertModel` and as a merged checkpoint. A plain
/// `BertModel` file is no merged checkpoint (it has no classifier), so only
/// the first load decides acceptance; the second must still name the file
/// when it refuses.
fn run_safetensors(dir: &Path, _: &[u8]) -> Result<(), String> {
    BertWeights::from_dir(dir).map_err(display)?;
    match load_merged_checkpoint(dir) {
        Err(e) if !e.to_string().contains(&dir.display().to_string()) => Err(e.to_string()),
        _ => Ok(()),
    }
}

fn setup_peft_cls(dir: &Path) -> std::io::Result<()> {
    seeds::write_peft_adapter(dir, Pooling::ClsPooler)
}

fn setup_peft_mean(dir: &Path) -> std::io::Result<()> {
    seeds::write_peft_adapter(dir, Pooling::Mean)
}

/// A mean-pooling export without its sidecar and `task_type`, so adapter
/// files of either layout load.
fn setup_peft_weights(dir: &Path) -> std::io::Result<()> {
    seeds::write_peft_adapter(dir, Pooling::Mean)?;
    std::fs::remove_file(dir.join("fedsvd_adapter.json"))?;
    let path = dir.join("adapter_config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path)?).map_err(std::io::Error::other)?;
    if let Some(object) = config.as_object_mut() {
        object.remove("task_type");
    }
    std::fs::write(
        &path,
        serde_json::to_vec(&config).map_err(std::io::Error::other)?,
    )
}

fn run_peft(dir: &Path, _: &[u8]) -> Result<(), String> {
    load_peft_adapter(dir).map(|_| ()).map_err(display)
}

fn run_checkpoint(dir: &Path, _: &[u8]) -> Result<(), String> {
    let path = dir.join("checkpoint.json");
    let checkpoint: FederationCheckpoint = fedsvd::runner::read_json(&path).map_err(display)?;
    // A resumed run asks every ledger what it spent before the next round.
    for client in &checkpoint.privacy {
        if let Some(ledger) = &client.ledger {
            ledger
                .spent_epsilon()
                .map_err(|e| format!("{}: ledger: {e}", path.display()))?;
        }
    }
    Ok(())
}

fn run_tokenizer(dir: &Path, _: &[u8]) -> Result<(), String> {
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"), 16).map_err(display)?;
    tokenizer
        .encode(&["The movie was good!", "ünïcödé 42 — 日本語 text"])
        .map_err(display)?;
    tokenizer
        .encode_pairs(&[("hello world", "a second, longer segment of text")])
        .map_err(display)?;
    Ok(())
}
