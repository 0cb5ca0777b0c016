//! The real all-MiniLM-L6-v2 checkpoint against the reference values of
//! `shared/docs/datasets.md`. Needs the model assets (`fedsvd assets fetch`).

use std::sync::{Arc, OnceLock};

use fedsvd_model::{
    BertWeights, HeadConfig, LoraConfig, Model, Pooling, Target, Tokenizer, minilm_dir,
};

fn assets() -> &'static (Arc<BertWeights>, Tokenizer) {
    static CELL: OnceLock<(Arc<BertWeights>, Tokenizer)> = OnceLock::new();
    CELL.get_or_init(|| {
        let dir = minilm_dir().unwrap_or_else(|e| panic!("{e}"));
        let weights = BertWeights::from_dir(&dir).expect("load MiniLM");
        let tok = Tokenizer::from_file(&dir.join("tokenizer.json"), 128).expect("load tokenizer");
        (weights, tok)
    })
}

fn model() -> Model {
    let (w, _) = assets();
    Model::new(w.clone(), LoraConfig::default(), HeadConfig::default()).unwrap()
}

#[test]
fn checkpoint_matches_the_documented_architecture() {
    let (w, _) = assets();
    let c = &w.config;
    assert_eq!(
        (
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.intermediate_size
        ),
        (6, 384, 12, 1536)
    );
    assert_eq!(c.vocab_size, 30522);
    assert!(w.pooler.is_some());
    // 22.7 M parameters in all-MiniLM-L6-v2.
    assert_eq!(w.num_parameters(), 22_713_216);
}

#[test]
fn token_ids_match_the_reference() {
    let (_, tok) = assets();
    let b = tok
        .encode(&["A man is eating food.", "A man is eating a piece of bread."])
        .unwrap();
    assert_eq!(b.ids(0), [101, 1037, 2158, 2003, 5983, 2833, 1012, 102]);
    assert_eq!(
        b.ids(1),
        [
            101, 1037, 2158, 2003, 5983, 1037, 3538, 1997, 7852, 1012, 102
        ]
    );
    // Dynamic padding: to the longest of the batch, not to 128.
    assert_eq!(b.seq_len, 11);
    assert_eq!(b.attention_mask[..11], [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]);
    assert_eq!(b.input_ids[8..11], [0, 0, 0]);
    let p = tok
        .encode_pairs(&[("A three-hour cinema master class.", "The movie is great.")])
        .unwrap();
    assert_eq!(
        p.ids(0),
        [
            101, 1037, 2093, 1011, 3178, 5988, 3040, 2465, 1012, 102, 1996, 3185, 2003, 2307, 1012,
            102
        ]
    );
    let mut types = vec![0u32; 10];
    types.extend([1; 6]);
    assert_eq!(p.type_ids(0), types);
}

#[test]
fn truncation_is_applied() {
    let (_, tok) = assets();
    let long = "word ".repeat(300);
    let b = tok.encode(&[long.as_str(), "short"]).unwrap();
    assert_eq!(b.lengths, vec![128, 3]);
    let t8 = Tokenizer::from_file(&minilm_dir().unwrap().join("tokenizer.json"), 8).unwrap();
    let b = t8.encode(&["A man is eating a piece of bread."]).unwrap();
    assert_eq!(b.ids(0), [101, 1037, 2158, 2003, 5983, 1037, 3538, 102]);
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn embeddings_and_cosines_match_the_reference() {
    let (_, tok) = assets();
    let texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome.",
        "A monkey is playing drums.",
    ];
    let e = model().embed(None, &tok.encode(&texts).unwrap()).unwrap();
    let h = 384;
    let want0 = [
        0.03324, 0.00441, -0.00628, 0.04838, -0.13870, -0.03362, 0.10113, -0.05438,
    ];
    let want1 = [
        0.05252, 0.05524, -0.01119, -0.00575, -0.12721, -0.02225, 0.07688, 0.01319,
    ];
    for j in 0..8 {
        // The reference is rounded to 5 decimals (±5e-6).
        assert!((e[j] - want0[j]).abs() < 1e-4, "emb0[{j}] = {}", e[j]);
        assert!(
            (e[h + j] - want1[j]).abs() < 1e-4,
            "emb1[{j}] = {}",
            e[h + j]
        );
    }
    let c01 = cosine(&e[..h], &e[h..2 * h]);
    assert!((c01 - 0.75534).abs() < 1e-4, "cos = {c01}");
    // These two are given to 3 decimals only.
    let c02 = cosine(&e[..h], &e[2 * h..3 * h]);
    let c03 = cosine(&e[..h], &e[3 * h..4 * h]);
    assert!((c02 - -0.046).abs() < 1e-3, "cos = {c02}");
    assert!((c03 - 0.048).abs() < 1e-3, "cos = {c03}");
    // Batched with other sentences or alone, an embedding is the same.
    let alone = model()
        .embed(None, &tok.encode(&[texts[1]]).unwrap())
        .unwrap();
    for j in 0..h {
        assert!((alone[j] - e[h + j]).abs() < 1e-6);
    }
}

#[test]
fn zero_b_adapters_reproduce_the_base_model_exactly() {
    let (w, tok) = assets();
    let lora = LoraConfig {
        targets: Target::ALL.to_vec(),
        ..LoraConfig::default()
    };
    let head = HeadConfig {
        num_labels: 2,
        pooling: Pooling::ClsPooler,
    };
    let model = Model::new(w.clone(), lora, head).unwrap();
    let state = model.init_state(5).unwrap();
    assert!(state.adapters.iter().all(|a| a.b.iter().all(|v| *v == 0.0)));
    assert!(state.adapters.iter().all(|a| a.a.iter().any(|v| *v != 0.0)));
    let batch = tok
        .encode(&["A man is eating food.", "The new movie is awesome."])
        .unwrap();
    assert_eq!(
        model.hidden_states(Some(&state), &batch).unwrap(),
        model.hidden_states(None, &batch).unwrap()
    );
    assert_eq!(
        model.embed(Some(&state), &batch).unwrap(),
        model.embed(None, &batch).unwrap()
    );
    // And a trained (non-zero) B does change the output.
    let mut trained = state.clone();
    trained.adapters[0].b[0] = 0.5;
    assert_ne!(
        model.hidden_states(Some(&trained), &batch).unwrap(),
        model.hidden_states(None, &batch).unwrap()
    );
}

#[test]
fn clipped_sgd_steps_change_only_b_and_lower_the_loss() {
    let (w, tok) = assets();
    let lora = LoraConfig {
        train_a: false,
        ..LoraConfig::default()
    };
    let model = Model::new(w.clone(), lora, HeadConfig::default()).unwrap();
    let mut state = model.init_state(1).unwrap();
    let batch = tok
        .encode(&[
            "a wonderful, moving film",
            "dull and far too long",
            "great acting",
            "a mess",
        ])
        .unwrap();
    let labels = [1usize, 0, 1, 0];
    let before = model.evaluate(&state, [(&batch, &labels[..])]).unwrap();
    let a_before: Vec<Vec<f32>> = state.adapters.iter().map(|a| a.a.clone()).collect();
    for step in 0..3 {
        let grads = model
            .gradients(&state, &batch, &labels, Some(step))
            .unwrap();
        let (mut sum, _) = grads.clipped_sum(10.0).unwrap();
        sum.iter_mut().for_each(|g| *g /= labels.len() as f32);
        grads.layout().apply_update(&mut state, &sum, 0.5).unwrap();
    }
    let after = model.evaluate(&state, [(&batch, &labels[..])]).unwrap();
    assert!(
        after.loss < before.loss,
        "{} -> {}",
        before.loss,
        after.loss
    );
    let a_after: Vec<Vec<f32>> = state.adapters.iter().map(|a| a.a.clone()).collect();
    assert_eq!(a_before, a_after);
    assert!(state.adapters.iter().any(|a| a.b.iter().any(|v| *v != 0.0)));
}
