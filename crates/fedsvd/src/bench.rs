//! The DP-SGD step benchmark behind `fedsvd bench step`: one full client step
//! (forward, backward, per-example clipping, Gaussian noise, SGD update) on a
//! batch of full-length sequences, with r = 8 LoRA on query/value and only
//! `B` trainable.

use std::sync::Arc;
use std::time::Instant;

use crate::dp::{DpSgdConfig, dp_sgd_step};
use crate::error::{Error, Result};
use crate::lora::{HeadConfig, LoraConfig, Pooling, Target};
use crate::model::Model;
use crate::tokenizer::Batch;
use crate::weights::BertWeights;

/// What to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepBenchConfig {
    /// Examples per step.
    pub batch: usize,
    /// Tokens per example; every example has exactly this many (the worst case).
    pub seq: usize,
    /// Timed steps after one warm-up step.
    pub steps: usize,
}

/// The measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct StepBenchResult {
    /// Median seconds per step.
    pub step_s: f64,
    /// `batch / step_s`.
    pub examples_per_s: f64,
    /// Every timed step, seconds.
    pub times_s: Vec<f64>,
    /// Threads of the rayon pool.
    pub threads: usize,
    /// Peak resident memory of the process (Linux `VmHWM`), MiB.
    pub peak_rss_mib: Option<f64>,
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Times DP-SGD steps (C = 2, σ = 1, lr = 0.5, LoRA r = 8, alpha 8, dropout
/// 0.05 on query/value, only B trainable, [CLS] pooler head) on `weights`.
pub fn run_step_benchmark(
    weights: Arc<BertWeights>,
    config: StepBenchConfig,
) -> Result<StepBenchResult> {
    if config.batch == 0 || config.steps == 0 || config.seq < 2 {
        return Err(Error::InvalidOption(format!(
            "benchmark needs batch >= 1, steps >= 1 and seq >= 2, got {config:?}"
        )));
    }
    let vocab = weights.config.vocab_size as u64;
    if vocab < 2000 {
        return Err(Error::InvalidOption(
            "benchmark expects a BERT vocabulary".into(),
        ));
    }
    let lora = LoraConfig {
        rank: 8,
        alpha: 8.0,
        dropout: 0.05,
        targets: vec![Target::Query, Target::Value],
        train_a: false,
        train_b: true,
        train_head: false,
    };
    let head = HeadConfig {
        num_labels: 2,
        pooling: Pooling::ClsPooler,
    };
    let model = Model::new(weights, lora, head)?;
    let mut state = model.init_state(0)?;
    // [CLS] w_1 .. w_{seq-2} [SEP] with word-piece ids from a fixed LCG.
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (1996 + (s >> 33) % (vocab - 1996)) as u32
    };
    let ids: Vec<Vec<u32>> = (0..config.batch)
        .map(|_| {
            let mut v = vec![101];
            v.extend((0..config.seq - 2).map(|_| next()));
            v.push(102);
            v
        })
        .collect();
    let types = vec![vec![0u32; config.seq]; config.batch];
    let batch = Batch::from_sequences(&ids, &types, 0)?;
    let labels: Vec<usize> = (0..config.batch).map(|i| i % 2).collect();
    let dp = DpSgdConfig {
        clip: 2.0,
        noise_multiplier: 1.0,
        lr: 0.5,
    };
    dp_sgd_step(&model, &mut state, &batch, &labels, &dp, 0)?;
    let mut times_s = Vec::with_capacity(config.steps);
    for step in 0..config.steps {
        let t = Instant::now();
        dp_sgd_step(&model, &mut state, &batch, &labels, &dp, step as u64 + 1)?;
        times_s.push(t.elapsed().as_secs_f64());
    }
    let mut sorted = times_s.clone();
    sorted.sort_by(f64::total_cmp);
    let step_s = sorted[sorted.len() / 2];
    Ok(StepBenchResult {
        step_s,
        examples_per_s: config.batch as f64 / step_s,
        times_s,
        threads: rayon::current_num_threads(),
        peak_rss_mib: peak_rss_mib(),
    })
}
