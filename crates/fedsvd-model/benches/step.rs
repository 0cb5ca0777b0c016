//! Criterion benchmark of the model's part of a DP-SGD client step on the
//! real MiniLM (LoRA r = 8 on query/value, B trainable): forward + backward
//! with per-example clipping and the clipped sum, forward + backward alone,
//! and the evaluation forward; the same three on the tiny random BERT of
//! `fedsvd_model::testing` (small size). The whole step (noise, update) is
//! `fedsvd bench step`, which times the training path itself. Needs the
//! model assets (`fedsvd assets fetch`).

use criterion::{Criterion, criterion_group, criterion_main};
use fedsvd_model::{
    Batch, BertWeights, HeadConfig, LoraConfig, Model, Target, minilm_dir,
    testing::{random_weights, tiny_config},
};

/// Token ids of a batch: [CLS] id, [SEP] id, and the range of ordinary ids.
type Vocab = (u32, u32, u32, u64);

fn batch(n: usize, seq: usize, (cls, sep, first, span): Vocab) -> Batch {
    let mut s = 7u64;
    let ids: Vec<Vec<u32>> = (0..n)
        .map(|_| {
            let mut v = vec![cls];
            v.extend((0..seq - 2).map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                first + ((s >> 33) % span) as u32
            }));
            v.push(sep);
            v
        })
        .collect();
    Batch::from_sequences(&ids, &vec![vec![0; seq]; n], 0).unwrap()
}

/// Clipped sum, forward + backward, and evaluation forward of `model` on a
/// batch of `n` sequences of `seq` tokens, as the benchmark group `name`.
fn bench_model(c: &mut Criterion, name: &str, model: &Model, vocab: Vocab, n: usize, seq: usize) {
    let state = model.init_state(0).unwrap();
    let b = batch(n, seq, vocab);
    let labels: Vec<usize> = (0..n).map(|i| i % 2).collect();
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.bench_function(format!("clipped_sum_b{n}_s{seq}"), |bch| {
        bch.iter(|| {
            let grads = model.gradients(&state, &b, &labels, Some(1)).unwrap();
            grads.clipped_sum(2.0).unwrap()
        })
    });
    g.bench_function(format!("gradients_b{n}_s{seq}"), |bch| {
        bch.iter(|| model.gradients(&state, &b, &labels, Some(1)).unwrap())
    });
    g.bench_function(format!("eval_logits_b{n}_s{seq}"), |bch| {
        bch.iter(|| model.logits(&state, &b).unwrap())
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let lora = LoraConfig {
        targets: vec![Target::Query, Target::Value],
        train_a: false,
        ..LoraConfig::default()
    };
    let tiny = Model::new(
        random_weights(&tiny_config()).unwrap(),
        lora.clone(),
        HeadConfig::default(),
    )
    .unwrap();
    bench_model(c, "tiny", &tiny, (1, 2, 3, 40), 32, 16);
    let dir = minilm_dir().unwrap_or_else(|e| panic!("{e}"));
    let weights = BertWeights::from_dir(&dir).unwrap();
    let model = Model::new(weights, lora, HeadConfig::default()).unwrap();
    bench_model(c, "minilm", &model, (101, 102, 1996, 28000), 32, 64);
}

criterion_group!(benches, bench);
criterion_main!(benches);
