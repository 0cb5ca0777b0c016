//! `fedsvd predict` on exports of the real MiniLM with random non-zero
//! adapters, for the [CLS]-pooler and the mean-pooling head: the logits it
//! prints are those of the in-memory model that was exported. Needs the
//! model assets (`fedsvd assets fetch`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use fedsvd_model::testing::random_values;
use fedsvd_model::{
    BertWeights, ExportMeta, HeadConfig, LoraConfig, LoraState, Model, Pooling, Target, Tokenizer,
    minilm_dir, save_merged_checkpoint, save_peft_adapter,
};

const TEXTS: [&str; 3] = [
    "a gripping, beautifully acted film",
    "the plot is a tedious mess",
    "fine",
];

/// A fresh folder under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("fedsvd-predict-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn randomize(state: &mut LoraState, seed: u64) {
    for (i, ad) in state.adapters.iter_mut().enumerate() {
        ad.b = random_values(ad.b.len(), seed + i as u64, 0.1);
    }
    state.head_weight = random_values(state.head_weight.len(), seed + 500, 0.3);
    state.head_bias = random_values(state.head_bias.len(), seed + 501, 0.3);
}

fn predict(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_fedsvd"))
        .arg("predict")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fedsvd predict failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check(printed: &serde_json::Value, model: &Model, state: &LoraState, tok: &Tokenizer) {
    let batch = tok.encode(&TEXTS).unwrap();
    let want = model.logits(state, &batch).unwrap();
    let n = model.head_config().num_labels;
    let preds = printed["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), TEXTS.len());
    for (i, p) in preds.iter().enumerate() {
        assert_eq!(p["text"], TEXTS[i]);
        let got: Vec<f64> = p["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (g, w) in got.iter().zip(&want[i * n..(i + 1) * n]) {
            assert!((g - *w as f64).abs() < 1e-4, "text {i}: {g} vs {w}");
        }
        let probs: Vec<f64> = p["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let k = p["label_index"].as_u64().unwrap() as usize;
        assert!(probs.iter().all(|&q| q <= probs[k]));
        assert_eq!(p["label"], printed["labels"][k]);
    }
}

fn setup() -> (PathBuf, Arc<BertWeights>, Tokenizer) {
    let dir = minilm_dir().unwrap_or_else(|e| panic!("{e}"));
    let w = BertWeights::from_dir(&dir).unwrap();
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json"), 32).unwrap();
    (dir, w, tok)
}

fn meta(dir: &Path) -> ExportMeta {
    ExportMeta {
        base_model: dir.display().to_string(),
        tokenizer: dir.join("tokenizer.json").display().to_string(),
        max_len: 32,
        labels: Some(vec!["neg".into(), "pos".into()]),
        method: None,
    }
}

/// The two forms `fedsvd predict` reads.
#[derive(Clone, Copy)]
enum Form {
    PeftAdapter,
    MergedCheckpoint,
}

/// The real MiniLM with random non-zero adapters and head, exported in
/// `form` to a scratch folder, with the in-memory model and state the
/// printed logits must reproduce.
struct Exported {
    dir: PathBuf,
    out: Scratch,
    model: Model,
    state: LoraState,
    tok: Tokenizer,
}

fn export(form: Form, pooling: Pooling, lora: LoraConfig, seed: u64, tag: &str) -> Exported {
    let (dir, w, tok) = setup();
    let head = HeadConfig {
        num_labels: 2,
        pooling,
    };
    let model = Model::new(w.clone(), lora, head).unwrap();
    let mut state = model.init_state(seed).unwrap();
    randomize(&mut state, 1000 * seed);
    let out = Scratch::new(tag);
    match form {
        Form::PeftAdapter => save_peft_adapter(
            &out.0,
            &w.config,
            model.lora_config(),
            &head,
            &state,
            &meta(&dir),
        ),
        Form::MergedCheckpoint => {
            save_merged_checkpoint(&out.0, &w, model.lora_config(), &head, &state, &meta(&dir))
        }
    }
    .unwrap();
    Exported {
        dir,
        out,
        model,
        state,
        tok,
    }
}

impl Exported {
    /// `fedsvd predict --adapter <export> --json TEXTS…`, checked against
    /// the in-memory model; returns what it printed.
    fn predict_and_check(&self) -> serde_json::Value {
        let printed = predict(&[
            "--adapter",
            self.out.0.to_str().unwrap(),
            "--json",
            TEXTS[0],
            TEXTS[1],
            TEXTS[2],
        ]);
        check(&printed, &self.model, &self.state, &self.tok);
        printed
    }
}

#[test]
fn predict_reproduces_the_exported_adapter() {
    let e = export(
        Form::PeftAdapter,
        Pooling::ClsPooler,
        LoraConfig::default(),
        3,
        "adapter",
    );
    let printed = e.predict_and_check();
    assert_eq!(printed["kind"], "peft_lora");
    assert_eq!(printed["max_len"], 32);
    assert_eq!(printed["labels"], serde_json::json!(["neg", "pos"]));
}

#[test]
fn predict_reproduces_the_merged_checkpoint() {
    let lora = LoraConfig {
        rank: 2,
        targets: vec![Target::Value, Target::Intermediate],
        ..LoraConfig::default()
    };
    let e = export(
        Form::MergedCheckpoint,
        Pooling::ClsPooler,
        lora,
        4,
        "merged",
    );
    assert!(e.out.0.join("tokenizer.json").is_file());
    assert_eq!(e.predict_and_check()["kind"], "merged_checkpoint");
}

#[test]
fn predict_reproduces_a_mean_pooling_adapter() {
    let lora = LoraConfig {
        targets: vec![Target::Query, Target::Value, Target::Output],
        ..LoraConfig::default()
    };
    let e = export(Form::PeftAdapter, Pooling::Mean, lora, 5, "mean-adapter");
    assert!(e.out.0.join("head.safetensors").is_file());
    let printed = e.predict_and_check();
    assert_eq!(printed["kind"], "peft_lora");
    assert_eq!(printed["pooling"], "mean");
}

#[test]
fn predict_reproduces_a_mean_pooling_merged_checkpoint() {
    let lora = LoraConfig {
        rank: 2,
        targets: vec![Target::Key, Target::AttentionOutput],
        ..LoraConfig::default()
    };
    let e = export(
        Form::MergedCheckpoint,
        Pooling::Mean,
        lora,
        6,
        "mean-merged",
    );
    let printed = e.predict_and_check();
    assert_eq!(printed["kind"], "merged_checkpoint");
    assert_eq!(printed["pooling"], "mean");
}

#[test]
fn a_peft_adapter_naming_the_hub_model_loads_from_the_local_copy() {
    // As PEFT writes it for a model loaded from the Hub: no fedsvd sidecar,
    // and base_model_name_or_path is the Hub id, not a folder.
    let e = export(
        Form::PeftAdapter,
        Pooling::ClsPooler,
        LoraConfig::default(),
        7,
        "hub-id",
    );
    std::fs::remove_file(e.out.0.join(fedsvd_model::peft::SIDECAR_FILE)).unwrap();
    let config_path = e.out.0.join(fedsvd_model::peft::ADAPTER_CONFIG_FILE);
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["base_model_name_or_path"] = "sentence-transformers/all-MiniLM-L6-v2".into();
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();

    // The assets folder is the one holding the model (<assets>/models/<name>).
    let assets = e.dir.parent().unwrap().parent().unwrap();
    let run = |assets: &Path| {
        Command::new(env!("CARGO_BIN_EXE_fedsvd"))
            .env("FEDSVD_ASSETS", assets)
            .args(["predict", "--adapter", e.out.0.to_str().unwrap(), "--json"])
            .args(TEXTS)
            .output()
            .unwrap()
    };
    let found = run(assets);
    assert!(
        found.status.success(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&found.stdout).unwrap();
    check(&printed, &e.model, &e.state, &e.tok);

    // Without a local copy the error names the Hub id and where it looked.
    let empty = Scratch::new("hub-id-no-assets");
    let missing = run(&empty.0);
    assert!(!missing.status.success());
    let message = String::from_utf8_lossy(&missing.stderr);
    assert!(
        message.contains("sentence-transformers/all-MiniLM-L6-v2")
            && message.contains("models/all-MiniLM-L6-v2"),
        "{message}"
    );
}
