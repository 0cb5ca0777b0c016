//! PEFT adapter and merged-checkpoint export on the tiny random BERT, for
//! the [CLS]-pooler head (`SEQ_CLS`, `BertForSequenceClassification`) and the
//! mean-pooling head (`FEATURE_EXTRACTION`, `BertModel` + `head.safetensors`):
//! the key layout against the names PEFT and transformers write, bit-exact
//! save/load round trips, typed errors for damaged or contradictory folders,
//! and the merged checkpoint computing the same logits as base + adapter.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use fedsvd_model::peft::{
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, HEAD_FILE, MERGED_CONFIG_FILE, MERGED_WEIGHTS_FILE,
    SIDECAR_FILE,
};
use fedsvd_model::testing::{random_values, random_weights, tiny_config};
use fedsvd_model::{
    Batch, BertWeights, Error, ExportKind, ExportMeta, HeadConfig, LoraConfig, LoraState, Model,
    Pooling, Target, load_merged_checkpoint, load_peft_adapter, save_merged_checkpoint,
    save_peft_adapter, write_safetensors,
};
use safetensors::SafeTensors;
use serde_json::Value;

/// A model with non-zero `A`, `B` and head, so that every exported tensor
/// moves the logits.
fn trained(weights: Arc<BertWeights>, lora: LoraConfig, num_labels: usize) -> (Model, LoraState) {
    trained_with(weights, lora, num_labels, Pooling::ClsPooler)
}

/// [`trained`] with the given pooling.
fn trained_with(
    weights: Arc<BertWeights>,
    lora: LoraConfig,
    num_labels: usize,
    pooling: Pooling,
) -> (Model, LoraState) {
    let head = HeadConfig {
        num_labels,
        pooling,
    };
    let model = Model::new(weights, lora, head).unwrap();
    let mut state = model.init_state(7).unwrap();
    for (i, ad) in state.adapters.iter_mut().enumerate() {
        ad.b = random_values(ad.b.len(), 100 + i as u64, 0.3);
    }
    state.head_weight = random_values(state.head_weight.len(), 99, 0.5);
    state.head_bias = random_values(state.head_bias.len(), 98, 0.5);
    (model, state)
}

fn meta(labels: Option<Vec<String>>) -> ExportMeta {
    ExportMeta {
        base_model: "/models/tiny".into(),
        tokenizer: "/models/tiny/tokenizer.json".into(),
        max_len: 24,
        labels,
        method: Some("fedsvd".into()),
    }
}

fn batch() -> Batch {
    let ids = vec![
        vec![1, 5, 9, 17, 2],
        vec![1, 33, 2],
        vec![1, 8, 8, 40, 41, 42, 3, 2],
    ];
    let types = ids.iter().map(|s| vec![0; s.len()]).collect::<Vec<_>>();
    Batch::from_sequences(&ids, &types, 0).unwrap()
}

fn save(dir: &Path, model: &Model, state: &LoraState) {
    save_peft_adapter(
        dir,
        &model.weights().config,
        model.lora_config(),
        model.head_config(),
        state,
        &meta(None),
    )
    .unwrap();
}

fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (n, (v.shape().to_vec(), vals))
        })
        .collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn adapter_keys_follow_the_peft_naming() {
    let w = random_weights(&tiny_config()).unwrap();
    let (model, state) = trained(w, LoraConfig::default(), 3);
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), &model, &state);
    let t = tensors(&dir.path().join(ADAPTER_WEIGHTS_FILE));
    // The names and shapes PEFT 0.21.2 (transformers 5.24.0) writes for a
    // LoRA on query and value of BertForSequenceClassification, task
    // SEQ_CLS, r = 8, 3 labels (observed by saving one with the library);
    // hidden 32 and 2 layers here.
    let mut expected = vec![
        ("base_model.model.classifier.bias".to_owned(), vec![3]),
        ("base_model.model.classifier.weight".to_owned(), vec![3, 32]),
    ];
    for l in 0..2 {
        for m in ["query", "value"] {
            let p = format!("base_model.model.bert.encoder.layer.{l}.attention.self.{m}");
            expected.push((format!("{p}.lora_A.weight"), vec![8, 32]));
            expected.push((format!("{p}.lora_B.weight"), vec![32, 8]));
        }
    }
    expected.sort();
    let found: Vec<(String, Vec<usize>)> =
        t.iter().map(|(n, (s, _))| (n.clone(), s.clone())).collect();
    assert_eq!(found, expected);

    let bytes = std::fs::read(dir.path().join(ADAPTER_WEIGHTS_FILE)).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        header.metadata().as_ref().and_then(|m| m.get("format")),
        Some(&"pt".to_owned())
    );

    let c = json(&dir.path().join(ADAPTER_CONFIG_FILE));
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "SEQ_CLS");
    assert_eq!(c["r"], 8);
    assert_eq!(c["lora_alpha"], 8);
    assert_eq!(c["lora_dropout"], 0.05);
    assert_eq!(c["bias"], "none");
    assert_eq!(c["use_rslora"], false);
    assert_eq!(c["use_dora"], false);
    assert_eq!(c["fan_in_fan_out"], false);
    assert_eq!(c["modules_to_save"], serde_json::json!(["classifier"]));
    assert_eq!(c["target_modules"], serde_json::json!(["query", "value"]));
    assert_eq!(c["base_model_name_or_path"], "/models/tiny");

    let s = json(&dir.path().join(SIDECAR_FILE));
    assert_eq!(s["format"], "fedsvd-adapter");
    assert_eq!(s["kind"], "peft_lora");
    assert_eq!(s["pooling"], "cls_pooler");
    assert_eq!(s["max_len"], 24);
    assert_eq!(s["num_labels"], 3);
}

#[test]
fn every_target_is_named_like_its_module() {
    let lora = LoraConfig {
        rank: 2,
        targets: Target::ALL.to_vec(),
        ..LoraConfig::default()
    };
    let w = random_weights(&tiny_config()).unwrap();
    let (model, state) = trained(w, lora, 2);
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), &model, &state);
    let t = tensors(&dir.path().join(ADAPTER_WEIGHTS_FILE));
    let p = "base_model.model.bert.encoder.layer.1";
    for (module, a, b) in [
        ("attention.self.key", [2, 32], [32, 2]),
        ("attention.output.dense", [2, 32], [32, 2]),
        ("intermediate.dense", [2, 32], [64, 2]),
        ("output.dense", [2, 64], [32, 2]),
    ] {
        assert_eq!(t[&format!("{p}.{module}.lora_A.weight")].0, a, "{module}");
        assert_eq!(t[&format!("{p}.{module}.lora_B.weight")].0, b, "{module}");
    }
    assert_eq!(t.len(), 2 * 6 * 2 + 2);
}

#[test]
fn adapter_round_trips_bit_exactly() {
    for (targets, alpha, labels) in [
        (vec![Target::Query, Target::Value], 16.0, None),
        (
            vec![Target::Output, Target::Key],
            3.5,
            Some(vec!["neg".to_owned(), "pos".to_owned()]),
        ),
        (Target::ALL.to_vec(), 8.0, None),
    ] {
        let lora = LoraConfig {
            rank: 3,
            alpha,
            dropout: 0.1,
            targets,
            train_a: false,
            train_b: true,
            train_head: true,
        };
        let w = random_weights(&tiny_config()).unwrap();
        let (model, state) = trained(w.clone(), lora, 2);
        let dir = tempfile::tempdir().unwrap();
        save_peft_adapter(
            dir.path(),
            &w.config,
            model.lora_config(),
            model.head_config(),
            &state,
            &meta(labels.clone()),
        )
        .unwrap();
        let back = load_peft_adapter(dir.path()).unwrap();
        assert_eq!(&back.lora, model.lora_config());
        assert_eq!(&back.head, model.head_config());
        assert_eq!(back.state, state);
        assert_eq!(
            back.base_model_name_or_path.as_deref(),
            Some("/models/tiny")
        );
        let side = back.sidecar.unwrap();
        assert_eq!(side.kind, ExportKind::PeftLora);
        assert_eq!(side.labels, labels);
        assert_eq!(side.method.as_deref(), Some("fedsvd"));
        let again = Model::new(w, back.lora, back.head).unwrap();
        assert_eq!(
            again.logits(&back.state, &batch()).unwrap(),
            model.logits(&state, &batch()).unwrap()
        );
    }
}

#[test]
fn adapter_without_sidecar_loads_as_peft_defaults() {
    let w = random_weights(&tiny_config()).unwrap();
    let (model, state) = trained(w, LoraConfig::default(), 2);
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), &model, &state);
    std::fs::remove_file(dir.path().join(SIDECAR_FILE)).unwrap();
    let back = load_peft_adapter(dir.path()).unwrap();
    assert!(back.sidecar.is_none());
    assert_eq!(back.head.pooling, Pooling::ClsPooler);
    assert_eq!(back.state, state);
}

/// Rewrites the adapter file of `dir` after `edit` changes its tensors.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) {
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let mut t: Vec<_> = tensors(&path)
        .into_iter()
        .map(|(n, (s, v))| (n, s, v))
        .collect();
    edit(&mut t);
    std::fs::write(&path, write_safetensors(&t).unwrap()).unwrap();
}

fn edit_config(dir: &Path, key: &str, value: Value) {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let mut c = json(&path);
    c[key] = value;
    std::fs::write(&path, c.to_string()).unwrap();
}

fn saved() -> tempfile::TempDir {
    let w = random_weights(&tiny_config()).unwrap();
    let (model, state) = trained(w, LoraConfig::default(), 2);
    let dir = tempfile::tempdir().unwrap();
    save(dir.path(), &model, &state);
    dir
}

#[test]
fn damaged_adapters_are_typed_errors() {
    let key = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight";

    let dir = saved();
    rewrite(dir.path(), |t| t.retain(|(n, _, _)| n != key));
    match load_peft_adapter(dir.path()).unwrap_err() {
        Error::MissingTensor { name } => assert_eq!(name, key),
        e => panic!("{e}"),
    }

    let dir = saved();
    rewrite(dir.path(), |t| {
        t.retain(|(n, _, _)| !n.contains("classifier.weight"))
    });
    assert!(matches!(
        load_peft_adapter(dir.path()).unwrap_err(),
        Error::MissingTensor { name } if name == "base_model.model.classifier.weight"
    ));

    let dir = saved();
    rewrite(dir.path(), |t| {
        let e = t.iter_mut().find(|(n, _, _)| n == key).unwrap();
        e.1 = vec![16, 8];
        e.2.truncate(16 * 8);
    });
    match load_peft_adapter(dir.path()).unwrap_err() {
        Error::ShapeMismatch {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, key);
            assert_eq!(expected, [32, 8]);
            assert_eq!(found, [16, 8]);
        }
        e => panic!("{e}"),
    }

    // `r` disagreeing with the stored factors.
    let dir = saved();
    edit_config(dir.path(), "r", 4.into());
    assert!(matches!(
        load_peft_adapter(dir.path()).unwrap_err(),
        Error::ShapeMismatch { .. }
    ));

    let dir = saved();
    rewrite(dir.path(), |t| {
        t.push((
            "base_model.model.bert.pooler.dense.weight".into(),
            vec![32, 32],
            vec![0.0; 32 * 32],
        ))
    });
    assert!(matches!(
        load_peft_adapter(dir.path()).unwrap_err(),
        Error::Adapter { message, .. } if message.contains("pooler")
    ));

    for (k, v) in [
        ("use_dora", Value::Bool(true)),
        ("use_rslora", Value::Bool(true)),
        ("peft_type", "IA3".into()),
        ("rank_pattern", serde_json::json!({"query": 4})),
        ("target_modules", serde_json::json!(["query"])),
        ("target_modules", serde_json::json!(["dense_h_to_4h"])),
    ] {
        let dir = saved();
        edit_config(dir.path(), k, v.clone());
        assert!(
            matches!(
                load_peft_adapter(dir.path()).unwrap_err(),
                Error::Adapter { .. }
            ),
            "{k} = {v}"
        );
    }

    let dir = saved();
    std::fs::remove_file(dir.path().join(ADAPTER_CONFIG_FILE)).unwrap();
    assert!(matches!(
        load_peft_adapter(dir.path()).unwrap_err(),
        Error::Io { .. }
    ));

    let dir = saved();
    let side = dir.path().join(SIDECAR_FILE);
    let mut s = json(&side);
    s["num_labels"] = 5.into();
    std::fs::write(&side, s.to_string()).unwrap();
    assert!(matches!(
        load_peft_adapter(dir.path()).unwrap_err(),
        Error::Adapter { .. }
    ));
}

#[test]
fn a_state_that_does_not_match_the_config_is_refused() {
    let config = tiny_config();
    let w = random_weights(&config).unwrap();
    let (model, mut state) = trained(w, LoraConfig::default(), 2);
    let dir = tempfile::tempdir().unwrap();
    let m = meta(Some(vec!["only one".into()]));
    let e = save_peft_adapter(
        dir.path(),
        &config,
        model.lora_config(),
        model.head_config(),
        &state,
        &m,
    )
    .unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { .. }), "{e}");
    state.adapters.pop();
    let e = save_peft_adapter(
        dir.path(),
        &config,
        model.lora_config(),
        model.head_config(),
        &state,
        &meta(None),
    )
    .unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { .. }), "{e}");
    assert!(!dir.path().join(ADAPTER_WEIGHTS_FILE).exists());
}

#[test]
fn merged_checkpoint_gives_the_logits_of_base_plus_adapter() {
    let config = tiny_config();
    let w = random_weights(&config).unwrap();
    let lora = LoraConfig {
        rank: 4,
        alpha: 12.0,
        targets: Target::ALL.to_vec(),
        ..LoraConfig::default()
    };
    let (model, state) = trained(w.clone(), lora, 3);
    let dir = tempfile::tempdir().unwrap();
    let labels = Some(vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]);
    save_merged_checkpoint(
        dir.path(),
        &w,
        model.lora_config(),
        model.head_config(),
        &state,
        &meta(labels.clone()),
    )
    .unwrap();

    let c = json(&dir.path().join(MERGED_CONFIG_FILE));
    assert_eq!(
        c["architectures"],
        serde_json::json!(["BertForSequenceClassification"])
    );
    assert_eq!(c["model_type"], "bert");
    assert_eq!(
        c["id2label"],
        serde_json::json!({"0": "a", "1": "b", "2": "c"})
    );
    assert_eq!(c["label2id"], serde_json::json!({"a": 0, "b": 1, "c": 2}));
    assert_eq!(c["hidden_size"], 32);
    let t = tensors(&dir.path().join(MERGED_WEIGHTS_FILE));
    for name in [
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.1.attention.self.key.weight",
        "bert.encoder.layer.1.output.LayerNorm.bias",
        "bert.pooler.dense.weight",
        "classifier.weight",
        "classifier.bias",
    ] {
        assert!(t.contains_key(name), "{name}");
    }
    // BertModel's 5 embedding + 16 per layer + 2 pooler tensors, and the
    // classifier's 2.
    assert_eq!(t.len(), 5 + 16 * 2 + 2 + 2);
    // The key projection of layer 1 is W0 + s·B·A.
    let ad = state.adapter(1, Target::Key).unwrap();
    let w0 = &w.layers[1].qkv.weight[32 * 32..2 * 32 * 32];
    let merged = &t["bert.encoder.layer.1.attention.self.key.weight"].1;
    let p: f32 = (0..4).map(|k| ad.b[5 * 4 + k] * ad.a[k * 32 + 7]).sum();
    assert!((merged[5 * 32 + 7] - w0[5 * 32 + 7] - 3.0 * p).abs() < 1e-5);

    let back = load_merged_checkpoint(dir.path()).unwrap();
    assert_eq!(back.head, *model.head_config());
    assert_eq!(
        back.sidecar.as_ref().unwrap().kind,
        ExportKind::MergedCheckpoint
    );
    assert_eq!(back.sidecar.as_ref().unwrap().labels, labels);
    let merged = Model::new(back.weights, back.lora, back.head).unwrap();
    let ours = model.logits(&state, &batch()).unwrap();
    let theirs = merged.logits(&back.state, &batch()).unwrap();
    let diff = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");
    // The adapters moved the logits, so agreement is not trivial.
    let base = Model::new(w, LoraConfig::default(), *model.head_config()).unwrap();
    let mut zero = base.init_state(1).unwrap();
    zero.head_weight = state.head_weight.clone();
    zero.head_bias = state.head_bias.clone();
    let plain = base.logits(&zero, &batch()).unwrap();
    let moved = ours
        .iter()
        .zip(&plain)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(moved > 1e-2, "adapters change the logits by only {moved}");
}

#[test]
fn merged_checkpoint_needs_a_pooler() {
    let config = tiny_config();
    let w = random_weights(&config).unwrap();
    let (model, state) = trained(w.clone(), LoraConfig::default(), 2);
    let mut no_pooler = (*w).clone();
    no_pooler.pooler = None;
    let dir = tempfile::tempdir().unwrap();
    let e = save_merged_checkpoint(
        dir.path(),
        &no_pooler,
        model.lora_config(),
        model.head_config(),
        &state,
        &meta(None),
    )
    .unwrap_err();
    assert!(matches!(e, Error::NotExportable(_)), "{e}");
}

/// Every key PEFT 0.21.2 writes into `adapter_config.json` for a LoRA (the
/// same set for `SEQ_CLS` and `FEATURE_EXTRACTION`; observed by saving both
/// on all-MiniLM-L6-v2 with the library).
const PEFT_CONFIG_KEYS: [&str; 41] = [
    "alora_invocation_tokens",
    "alpha_pattern",
    "arrow_config",
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "corda_config",
    "ensure_weight_tying",
    "eva_config",
    "exclude_modules",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "kasa_config",
    "layer_replication",
    "layers_pattern",
    "layers_to_transform",
    "loftq_config",
    "lora_alpha",
    "lora_bias",
    "lora_dropout",
    "lora_ga_config",
    "megatron_config",
    "megatron_core",
    "modules_to_save",
    "monteclora_config",
    "peft_type",
    "peft_version",
    "qalora_group_size",
    "r",
    "rank_pattern",
    "revision",
    "target_modules",
    "target_parameters",
    "task_type",
    "trainable_token_indices",
    "use_bdlora",
    "use_dora",
    "use_qalora",
    "use_rslora",
    "velora_config",
];

fn config_keys(dir: &Path) -> Vec<String> {
    let c = json(&dir.join(ADAPTER_CONFIG_FILE));
    c.as_object().unwrap().keys().cloned().collect()
}

fn format_metadata(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("format"))
        .cloned()
}

fn save_mean(dir: &Path, lora: LoraConfig, num_labels: usize) -> (Model, LoraState) {
    let w = random_weights(&tiny_config()).unwrap();
    let (model, state) = trained_with(w, lora, num_labels, Pooling::Mean);
    save(dir, &model, &state);
    (model, state)
}

#[test]
fn config_keys_are_those_peft_writes() {
    let want: Vec<String> = PEFT_CONFIG_KEYS.iter().map(|k| k.to_string()).collect();
    let dir = saved();
    assert_eq!(config_keys(dir.path()), want);
    let dir = tempfile::tempdir().unwrap();
    save_mean(dir.path(), LoraConfig::default(), 2);
    assert_eq!(config_keys(dir.path()), want);
}

#[test]
fn mean_adapter_keys_follow_the_peft_naming() {
    let dir = tempfile::tempdir().unwrap();
    let (_, state) = save_mean(dir.path(), LoraConfig::default(), 3);
    let t = tensors(&dir.path().join(ADAPTER_WEIGHTS_FILE));
    // The names and shapes PEFT 0.21.2 (transformers 5.24.0) writes for a
    // LoRA on query and value of the bare BertModel, task
    // FEATURE_EXTRACTION, r = 8 (observed by saving one with the library):
    // no `bert.` prefix and no classifier; hidden 32 and 2 layers here.
    let mut expected = Vec::new();
    for l in 0..2 {
        for m in ["query", "value"] {
            let p = format!("base_model.model.encoder.layer.{l}.attention.self.{m}");
            expected.push((format!("{p}.lora_A.weight"), vec![8, 32]));
            expected.push((format!("{p}.lora_B.weight"), vec![32, 8]));
        }
    }
    expected.sort();
    let found: Vec<(String, Vec<usize>)> =
        t.iter().map(|(n, (s, _))| (n.clone(), s.clone())).collect();
    assert_eq!(found, expected);
    assert_eq!(
        format_metadata(&dir.path().join(ADAPTER_WEIGHTS_FILE)).as_deref(),
        Some("pt")
    );

    let c = json(&dir.path().join(ADAPTER_CONFIG_FILE));
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "FEATURE_EXTRACTION");
    assert_eq!(c["modules_to_save"], Value::Null);
    assert_eq!(c["target_modules"], serde_json::json!(["query", "value"]));
    assert_eq!(c["r"], 8);
    assert_eq!(c["lora_alpha"], 8);
    assert_eq!(c["use_dora"], false);
    assert_eq!(c["use_rslora"], false);
    assert_eq!(c["base_model_name_or_path"], "/models/tiny");

    // The head, as torch.nn.Linear's state dict.
    let head_path = dir.path().join(HEAD_FILE);
    let h = tensors(&head_path);
    assert_eq!(h.keys().collect::<Vec<_>>(), ["bias", "weight"]);
    assert_eq!(h["weight"], (vec![3, 32], state.head_weight.clone()));
    assert_eq!(h["bias"], (vec![3], state.head_bias.clone()));
    assert_eq!(format_metadata(&head_path).as_deref(), Some("pt"));

    let s = json(&dir.path().join(SIDECAR_FILE));
    assert_eq!(s["kind"], "peft_lora");
    assert_eq!(s["pooling"], "mean");
    assert_eq!(s["num_labels"], 3);
}

/// fedsvd's logits for a mean-pooling head are `head(mean of the final
/// hidden states over every real token, [CLS] and [SEP] included)`: the
/// recipe the export documents for PyTorch.
fn mean_pool_recipe(model: &Model, state: &LoraState, batch: &Batch) -> Vec<f32> {
    let hidden = model.hidden_states(Some(state), batch).unwrap();
    let h = model.weights().config.hidden_size;
    let n = model.head_config().num_labels;
    let mut out = Vec::new();
    let mut t0 = 0;
    for &len in &batch.lengths {
        let mut pooled = vec![0.0f64; h];
        for t in t0..t0 + len {
            for j in 0..h {
                pooled[j] += hidden[t * h + j] as f64;
            }
        }
        t0 += len;
        for k in 0..n {
            let dot: f64 = (0..h)
                .map(|j| state.head_weight[k * h + j] as f64 * pooled[j] / len as f64)
                .sum();
            out.push((dot + state.head_bias[k] as f64) as f32);
        }
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

#[test]
fn mean_adapter_round_trips_bit_exactly() {
    for (targets, labels) in [
        (vec![Target::Query, Target::Value], None),
        (
            vec![Target::Output, Target::Intermediate],
            Some(vec!["neg".to_owned(), "pos".to_owned()]),
        ),
        (Target::ALL.to_vec(), None),
    ] {
        let lora = LoraConfig {
            rank: 3,
            alpha: 6.0,
            dropout: 0.1,
            targets,
            train_a: false,
            train_b: true,
            train_head: true,
        };
        let w = random_weights(&tiny_config()).unwrap();
        let (model, state) = trained_with(w.clone(), lora, 2, Pooling::Mean);
        let dir = tempfile::tempdir().unwrap();
        save_peft_adapter(
            dir.path(),
            &w.config,
            model.lora_config(),
            model.head_config(),
            &state,
            &meta(labels.clone()),
        )
        .unwrap();
        let back = load_peft_adapter(dir.path()).unwrap();
        assert_eq!(back.head.pooling, Pooling::Mean);
        assert_eq!(&back.head, model.head_config());
        assert_eq!(&back.lora, model.lora_config());
        assert_eq!(back.state, state);
        let side = back.sidecar.unwrap();
        assert_eq!(side.pooling, "mean");
        assert_eq!(side.labels, labels);
        let again = Model::new(w.clone(), back.lora, back.head).unwrap();
        let ours = model.logits(&state, &batch()).unwrap();
        assert_eq!(again.logits(&back.state, &batch()).unwrap(), ours);
        // The documented PyTorch recipe gives the same logits, and they are
        // not those of the [CLS] pooler.
        assert!(max_diff(&mean_pool_recipe(&model, &state, &batch()), &ours) < 1e-5);
        let cls = Model::new(
            w,
            model.lora_config().clone(),
            HeadConfig {
                num_labels: 2,
                pooling: Pooling::ClsPooler,
            },
        )
        .unwrap();
        assert!(max_diff(&cls.logits(&state, &batch()).unwrap(), &ours) > 1e-3);
    }
}

#[test]
fn mean_adapter_without_sidecar_loads_with_mean_pooling() {
    let dir = tempfile::tempdir().unwrap();
    let (_, state) = save_mean(dir.path(), LoraConfig::default(), 2);
    std::fs::remove_file(dir.path().join(SIDECAR_FILE)).unwrap();
    let back = load_peft_adapter(dir.path()).unwrap();
    assert!(back.sidecar.is_none());
    assert_eq!(back.head.pooling, Pooling::Mean);
    assert_eq!(back.state, state);
}

fn set_sidecar_pooling(dir: &Path, pooling: &str) {
    let side = dir.join(SIDECAR_FILE);
    let mut s = json(&side);
    s["pooling"] = pooling.into();
    std::fs::write(&side, s.to_string()).unwrap();
}

fn adapter_error(dir: &Path) -> String {
    match load_peft_adapter(dir).unwrap_err() {
        e @ Error::Adapter { .. } => e.to_string(),
        e => panic!("expected an adapter error, got {e}"),
    }
}

#[test]
fn contradictory_adapters_are_refused() {
    // Mean pooling claimed for a SEQ_CLS adapter: PyTorch would run the
    // [CLS] pooler.
    let dir = saved();
    set_sidecar_pooling(dir.path(), "mean");
    assert!(adapter_error(dir.path()).contains("SEQ_CLS"));

    let mean = || {
        let dir = tempfile::tempdir().unwrap();
        save_mean(dir.path(), LoraConfig::default(), 2);
        dir
    };
    let dir = mean();
    set_sidecar_pooling(dir.path(), "cls_pooler");
    assert!(adapter_error(dir.path()).contains("FEATURE_EXTRACTION"));

    let dir = mean();
    std::fs::remove_file(dir.path().join(HEAD_FILE)).unwrap();
    assert!(adapter_error(dir.path()).contains(HEAD_FILE));

    for task in ["SEQ_CLS", "TOKEN_CLS"] {
        let dir = mean();
        edit_config(dir.path(), "task_type", task.into());
        assert!(adapter_error(dir.path()).contains(task));
    }
    let dir = saved();
    edit_config(dir.path(), "task_type", "FEATURE_EXTRACTION".into());
    assert!(adapter_error(dir.path()).contains("FEATURE_EXTRACTION"));

    // A classifier inside a bare-encoder adapter.
    let dir = mean();
    rewrite(dir.path(), |t| {
        t.push((
            "base_model.model.classifier.weight".into(),
            vec![2, 32],
            vec![0.0; 64],
        ))
    });
    assert!(adapter_error(dir.path()).contains("classifier"));

    // Names of both layouts in one file.
    let dir = mean();
    rewrite(dir.path(), |t| {
        t[0].0 = t[0]
            .0
            .replace("base_model.model.", "base_model.model.bert.")
    });
    assert!(adapter_error(dir.path()).contains("BertForSequenceClassification"));

    // A damaged head file.
    let dir = mean();
    let head = dir.path().join(HEAD_FILE);
    let wrong = vec![
        ("weight".to_owned(), vec![2, 32], vec![0.5; 64]),
        ("bias".to_owned(), vec![3], vec![0.0; 3]),
    ];
    std::fs::write(&head, write_safetensors(&wrong).unwrap()).unwrap();
    assert!(adapter_error(dir.path()).contains("bias"));
    let extra = vec![
        ("weight".to_owned(), vec![2, 32], vec![0.5; 64]),
        ("bias".to_owned(), vec![2], vec![0.0; 2]),
        ("scale".to_owned(), vec![1], vec![1.0]),
    ];
    std::fs::write(&head, write_safetensors(&extra).unwrap()).unwrap();
    assert!(adapter_error(dir.path()).contains("scale"));
}

fn save_merged_mean(dir: &Path, w: &Arc<BertWeights>) -> (Model, LoraState) {
    let lora = LoraConfig {
        rank: 4,
        alpha: 12.0,
        targets: Target::ALL.to_vec(),
        ..LoraConfig::default()
    };
    let (model, state) = trained_with(w.clone(), lora, 3, Pooling::Mean);
    save_merged_checkpoint(
        dir,
        w,
        model.lora_config(),
        model.head_config(),
        &state,
        &meta(Some(vec!["a".into(), "b".into(), "c".into()])),
    )
    .unwrap();
    (model, state)
}

#[test]
fn merged_mean_checkpoint_is_a_bert_model_and_gives_the_same_logits() {
    let w = random_weights(&tiny_config()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (model, state) = save_merged_mean(dir.path(), &w);

    let c = json(&dir.path().join(MERGED_CONFIG_FILE));
    assert_eq!(c["architectures"], serde_json::json!(["BertModel"]));
    assert_eq!(c["model_type"], "bert");
    let t = tensors(&dir.path().join(MERGED_WEIGHTS_FILE));
    // The names BertModel.save_pretrained writes (observed with
    // transformers 5.24.0 on all-MiniLM-L6-v2): no `bert.` prefix, no
    // classifier; 5 embedding + 16 per layer + 2 pooler tensors.
    let mut want = vec![
        "embeddings.LayerNorm.bias".to_owned(),
        "embeddings.LayerNorm.weight".into(),
        "embeddings.position_embeddings.weight".into(),
        "embeddings.token_type_embeddings.weight".into(),
        "embeddings.word_embeddings.weight".into(),
        "pooler.dense.bias".into(),
        "pooler.dense.weight".into(),
    ];
    for l in 0..2 {
        for m in [
            "attention.output.LayerNorm",
            "attention.output.dense",
            "attention.self.key",
            "attention.self.query",
            "attention.self.value",
            "intermediate.dense",
            "output.LayerNorm",
            "output.dense",
        ] {
            for p in ["bias", "weight"] {
                want.push(format!("encoder.layer.{l}.{m}.{p}"));
            }
        }
    }
    want.sort();
    assert_eq!(t.keys().cloned().collect::<Vec<_>>(), want);
    assert_eq!(
        format_metadata(&dir.path().join(MERGED_WEIGHTS_FILE)).as_deref(),
        Some("pt")
    );
    // The value projection of layer 0 is W0 + s·B·A.
    let ad = state.adapter(0, Target::Value).unwrap();
    let w0 = &w.layers[0].qkv.weight[2 * 32 * 32..3 * 32 * 32];
    let merged = &t["encoder.layer.0.attention.self.value.weight"].1;
    let p: f32 = (0..4).map(|k| ad.b[9 * 4 + k] * ad.a[k * 32 + 3]).sum();
    assert!((merged[9 * 32 + 3] - w0[9 * 32 + 3] - 3.0 * p).abs() < 1e-5);
    let h = tensors(&dir.path().join(HEAD_FILE));
    assert_eq!(h["weight"], (vec![3, 32], state.head_weight.clone()));
    assert_eq!(h["bias"], (vec![3], state.head_bias.clone()));

    let back = load_merged_checkpoint(dir.path()).unwrap();
    assert_eq!(back.head, *model.head_config());
    assert_eq!(back.head.pooling, Pooling::Mean);
    assert_eq!(back.state.head_weight, state.head_weight);
    assert_eq!(back.state.head_bias, state.head_bias);
    let side = back.sidecar.as_ref().unwrap();
    assert_eq!(side.kind, ExportKind::MergedCheckpoint);
    assert_eq!(side.pooling, "mean");
    let merged = Model::new(back.weights, back.lora, back.head).unwrap();
    let ours = model.logits(&state, &batch()).unwrap();
    let theirs = merged.logits(&back.state, &batch()).unwrap();
    assert!(max_diff(&ours, &theirs) < 1e-4);
    // The adapters moved the logits, so agreement is not trivial.
    let plain = Model::new(w, LoraConfig::default(), *model.head_config()).unwrap();
    let mut zero = plain.init_state(1).unwrap();
    zero.head_weight = state.head_weight.clone();
    zero.head_bias = state.head_bias.clone();
    let moved = max_diff(&ours, &plain.logits(&zero, &batch()).unwrap());
    assert!(moved > 1e-2, "adapters change the logits by only {moved}");
}

#[test]
fn contradictory_merged_checkpoints_are_refused() {
    let w = random_weights(&tiny_config()).unwrap();
    let merged_error = |dir: &Path| match load_merged_checkpoint(dir).unwrap_err() {
        e @ Error::Adapter { .. } => e.to_string(),
        e => panic!("expected an adapter error, got {e}"),
    };

    let dir = tempfile::tempdir().unwrap();
    save_merged_mean(dir.path(), &w);
    set_sidecar_pooling(dir.path(), "cls_pooler");
    assert!(merged_error(dir.path()).contains("BertModel"));

    let dir = tempfile::tempdir().unwrap();
    save_merged_mean(dir.path(), &w);
    std::fs::remove_file(dir.path().join(HEAD_FILE)).unwrap();
    assert!(merged_error(dir.path()).contains(HEAD_FILE));

    // A head for another hidden width.
    let dir = tempfile::tempdir().unwrap();
    save_merged_mean(dir.path(), &w);
    let wrong = vec![
        ("weight".to_owned(), vec![3, 16], vec![0.5; 48]),
        ("bias".to_owned(), vec![3], vec![0.0; 3]),
    ];
    std::fs::write(
        dir.path().join(HEAD_FILE),
        write_safetensors(&wrong).unwrap(),
    )
    .unwrap();
    assert!(merged_error(dir.path()).contains("[num_labels, 32]"));

    // Mean pooling claimed for a BertForSequenceClassification checkpoint.
    let (model, state) = trained(w.clone(), LoraConfig::default(), 2);
    let dir = tempfile::tempdir().unwrap();
    save_merged_checkpoint(
        dir.path(),
        &w,
        model.lora_config(),
        model.head_config(),
        &state,
        &meta(None),
    )
    .unwrap();
    set_sidecar_pooling(dir.path(), "mean");
    assert!(merged_error(dir.path()).contains("BertForSequenceClassification"));
}

#[test]
fn a_hub_id_resolves_to_its_local_copy_and_a_path_stays_a_path() {
    let assets = tempfile::tempdir().unwrap();
    let local = assets.path().join("models").join("all-MiniLM-L6-v2");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("config.json"), "{}").unwrap();

    let resolve = |r: &str| fedsvd_model::resolve_base_model(r, assets.path());
    assert_eq!(
        resolve("sentence-transformers/all-MiniLM-L6-v2").unwrap(),
        local
    );
    assert_eq!(resolve("all-MiniLM-L6-v2").unwrap(), local);
    // A folder that holds config.json wins, whatever its name.
    let folder = local.display().to_string();
    assert_eq!(resolve(&folder).unwrap(), local);

    // A Hub id without a local copy names the id and the folder looked in.
    let missing = resolve("bert-base-uncased").unwrap_err().to_string();
    assert!(missing.contains("`bert-base-uncased`"), "{missing}");
    assert!(missing.contains("models/bert-base-uncased"), "{missing}");
    // Paths are not Hub ids: `..` never reaches outside <assets>/models, and
    // a missing folder is left for the loader to name.
    std::fs::write(assets.path().join("config.json"), "{}").unwrap();
    for path in ["models/..", "a/b/c", "/nowhere"] {
        assert_eq!(resolve(path).unwrap(), std::path::PathBuf::from(path));
    }
}
