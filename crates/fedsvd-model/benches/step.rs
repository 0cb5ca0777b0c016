//! Criterion benchmark of one DP-SGD client step on the real MiniLM
//! (LoRA r = 8 on query/value, B trainable) and of the evaluation forward.
//! Needs the model assets (`fedsvd assets fetch`).

use criterion::{Criterion, criterion_group, criterion_main};
use fedsvd_model::{
    Batch, BertWeights, DpSgdConfig, HeadConfig, LoraConfig, Model, Target, dp_sgd_step, minilm_dir,
};

fn batch(n: usize, seq: usize) -> Batch {
    let mut s = 7u64;
    let ids: Vec<Vec<u32>> = (0..n)
        .map(|_| {
            let mut v = vec![101];
            v.extend((0..seq - 2).map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (1996 + (s >> 33) % 28000) as u32
            }));
            v.push(102);
            v
        })
        .collect();
    Batch::from_sequences(&ids, &vec![vec![0; seq]; n], 0).unwrap()
}

fn bench(c: &mut Criterion) {
    let dir = minilm_dir().unwrap_or_else(|e| panic!("{e}"));
    let weights = BertWeights::from_dir(&dir).unwrap();
    let lora = LoraConfig {
        targets: vec![Target::Query, Target::Value],
        train_a: false,
        ..LoraConfig::default()
    };
    let model = Model::new(weights, lora, HeadConfig::default()).unwrap();
    let mut state = model.init_state(0).unwrap();
    let b = batch(32, 64);
    let labels: Vec<usize> = (0..32).map(|i| i % 2).collect();
    let cfg = DpSgdConfig {
        clip: 2.0,
        noise_multiplier: 1.0,
        lr: 0.5,
    };
    let mut g = c.benchmark_group("minilm");
    g.sample_size(10);
    let mut seed = 0;
    g.bench_function("dp_sgd_step_b32_s64", |bch| {
        bch.iter(|| {
            seed += 1;
            dp_sgd_step(&model, &mut state, &b, &labels, &cfg, seed).unwrap()
        })
    });
    g.bench_function("eval_logits_b32_s64", |bch| {
        bch.iter(|| model.logits(&state, &b).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
