//! Writes a PEFT adapter and a merged checkpoint of the real MiniLM with
//! random non-zero adapters and head, plus the logits fedsvd computes for
//! them, so `scripts/check_peft_export.py` can compare PyTorch's logits.
//!
//! ```sh
//! cargo run --release -p fedsvd-model --example peft_export -- OUT_DIR [cls|mean]
//! ```
//!
//! The second argument picks the head's pooling: `cls` (the default, the
//! [CLS] pooler: a `SEQ_CLS` adapter and a `BertForSequenceClassification`
//! checkpoint) or `mean` (mean pooling: a `FEATURE_EXTRACTION` adapter on
//! `BertModel` and a `BertModel` checkpoint, each with `head.safetensors`).
//! It writes `OUT_DIR/adapter` (LoRA r = 4 on query, key, value and the FFN
//! output — the last named per layer in `target_modules`), `OUT_DIR/merged`
//! (a base with random "merged" deltas on two projections, LoRA on every
//! projection folded in) and `OUT_DIR/ours_{adapter,merged}.json` (fedsvd's
//! logits from the unmerged in-memory model, for the texts in the file).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedsvd_model::testing::random_values;
use fedsvd_model::{
    BertWeights, ExportMeta, HeadConfig, LoraConfig, LoraState, Model, Pooling, Target, Tokenizer,
    minilm_dir, save_merged_checkpoint, save_peft_adapter,
};

const TEXTS: [&str; 4] = [
    "a gripping, beautifully acted film",
    "the plot is a tedious mess and the jokes never land",
    "It's fine.",
    "An unexpectedly moving story about two brothers, told with restraint and humour, \
     that stays with you long after the credits roll.",
];
const MAX_LEN: usize = 64;

fn randomize(state: &mut LoraState, seed: u64) {
    for (i, ad) in state.adapters.iter_mut().enumerate() {
        ad.a = random_values(ad.a.len(), seed + 2 * i as u64, 0.1);
        ad.b = random_values(ad.b.len(), seed + 2 * i as u64 + 1, 0.1);
    }
    state.head_weight = random_values(state.head_weight.len(), seed + 1000, 0.3);
    state.head_bias = random_values(state.head_bias.len(), seed + 1001, 0.3);
}

fn write_logits(path: &Path, model: &Model, state: &LoraState, tok: &Tokenizer) {
    let batch = tok.encode(&TEXTS).expect("tokenize");
    let logits = model.logits(state, &batch).expect("logits");
    let n = model.head_config().num_labels;
    let preds: Vec<_> = TEXTS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({
                "text": t,
                "input_ids": batch.ids(i),
                "logits": &logits[i * n..(i + 1) * n],
            })
        })
        .collect();
    let pooling = match model.head_config().pooling {
        Pooling::ClsPooler => "cls_pooler",
        Pooling::Mean => "mean",
    };
    let out = serde_json::json!({"max_len": MAX_LEN, "pooling": pooling, "predictions": preds});
    std::fs::write(path, serde_json::to_string_pretty(&out).unwrap()).expect("write logits");
}

fn main() {
    const USAGE: &str = "usage: peft_export OUT_DIR [cls|mean]";
    let out = PathBuf::from(std::env::args().nth(1).expect(USAGE));
    let pooling = match std::env::args().nth(2).as_deref() {
        None | Some("cls") => Pooling::ClsPooler,
        Some("mean") => Pooling::Mean,
        Some(other) => panic!("unknown pooling `{other}`; {USAGE}"),
    };
    let dir = minilm_dir().unwrap_or_else(|e| panic!("{e}"));
    let weights = BertWeights::from_dir(&dir).expect("load MiniLM");
    let tok_path = dir.join("tokenizer.json");
    let tok = Tokenizer::from_file(&tok_path, MAX_LEN).expect("tokenizer");
    let head = HeadConfig {
        num_labels: 3,
        pooling,
    };
    let meta = ExportMeta {
        base_model: dir.display().to_string(),
        tokenizer: tok_path.display().to_string(),
        max_len: MAX_LEN,
        labels: Some(vec!["negative".into(), "neutral".into(), "positive".into()]),
        method: Some("example".into()),
    };

    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.05,
        targets: vec![Target::Query, Target::Key, Target::Value, Target::Output],
        ..LoraConfig::default()
    };
    let model = Model::new(weights.clone(), lora, head).expect("model");
    let mut state = model.init_state(1).expect("state");
    randomize(&mut state, 10);
    save_peft_adapter(
        &out.join("adapter"),
        &weights.config,
        model.lora_config(),
        &head,
        &state,
        &meta,
    )
    .expect("save adapter");
    write_logits(&out.join("ours_adapter.json"), &model, &state, &tok);

    // A base carrying merged updates (what FLoRA / FedEx-LoRA accumulate),
    // with a live adapter on every projection on top.
    let mut merged_base = (*weights).clone();
    for (l, layer) in merged_base.layers.iter_mut().enumerate() {
        let d = random_values(layer.attn_out.weight.len(), 55 + l as u64, 0.01);
        for (w, d) in layer.attn_out.weight.iter_mut().zip(d) {
            *w += d;
        }
        let d = random_values(layer.intermediate.weight.len(), 77 + l as u64, 0.01);
        for (w, d) in layer.intermediate.weight.iter_mut().zip(d) {
            *w += d;
        }
    }
    let merged_base = Arc::new(merged_base);
    let lora = LoraConfig {
        rank: 2,
        alpha: 6.0,
        targets: Target::ALL.to_vec(),
        ..LoraConfig::default()
    };
    let model = Model::new(merged_base.clone(), lora, head).expect("model");
    let mut state = model.init_state(2).expect("state");
    randomize(&mut state, 20);
    save_merged_checkpoint(
        &out.join("merged"),
        &merged_base,
        model.lora_config(),
        &head,
        &state,
        &meta,
    )
    .expect("save merged");
    write_logits(&out.join("ours_merged.json"), &model, &state, &tok);
    println!("wrote {}", out.display());
}
