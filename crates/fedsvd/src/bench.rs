//! The DP-SGD step benchmark behind `fedsvd bench step`: one local step of
//! [`train_locally`] — exactly what `fedsvd run` executes: forward,
//! backward, per-example clipping, the discrete Gaussian release, SGD update
//! — on a fixed batch of full-length sequences, with r = 8 LoRA on
//! query/value and only `B` trainable.
//!
//! The batch is fixed (every example in every step) as in the peer's
//! benchmark: the expected batch equals the client's data, so the Poisson
//! sampling rate is 1.

use std::sync::Arc;
use std::time::Instant;

use fedsvd_model::{BertWeights, HeadConfig, LoraConfig, Model, Pooling, Target, peak_rss_mib};

use crate::client::{ClientData, ClientStreams, LocalTraining, Privatization, train_locally};
use crate::error::{Error, Result};

/// What to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepBenchConfig {
    /// Examples per step.
    pub batch: usize,
    /// Tokens per example; every example has exactly this many (the worst case).
    pub seq: usize,
    /// Timed steps after one warm-up step.
    pub steps: usize,
    /// DP-SGD (true) or the same step without clipping and noise (false).
    pub private: bool,
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

/// Times local steps (C = 2, σ = 1, lr = 0.5, LoRA r = 8, alpha 8, dropout
/// 0.05 on query/value, only B trainable, frozen [CLS] pooler head) on
/// `weights`, through [`train_locally`] with a seeded stream.
pub fn run_step_benchmark(
    weights: Arc<BertWeights>,
    config: StepBenchConfig,
) -> Result<StepBenchResult> {
    if config.batch == 0 || config.steps == 0 || config.seq < 2 {
        return Err(Error::InvalidConfig {
            key: "bench step",
            value: format!(
                "batch {}, seq {}, steps {}",
                config.batch, config.seq, config.steps
            ),
            allowed: "batch >= 1, seq >= 2 and steps >= 1",
        });
    }
    let vocab = weights.config.vocab_size as u64;
    if vocab < 2000 {
        return Err(Error::InvalidConfig {
            key: "bench step",
            value: format!("a vocabulary of {vocab} tokens"),
            allowed: "a BERT vocabulary (at least 2000 tokens)",
        });
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
    let data = ClientData {
        type_ids: vec![vec![0u32; config.seq]; config.batch],
        ids,
        labels: (0..config.batch).map(|i| i % 2).collect(),
        pad_id: 0,
    };
    let training = LocalTraining {
        steps: 1,
        expected_batch: config.batch,
        physical_batch: config.batch,
        lr: 0.5,
        privatization: if config.private {
            Privatization::DpSgd {
                clip: 2.0,
                noise_multiplier: 1.0,
            }
        } else {
            Privatization::NonPrivate {
                max_grad_norm: None,
            }
        },
    };
    let mut streams = ClientStreams::from_seed(0);
    train_locally(&model, &mut state, &data, &training, &mut streams)?;
    let mut times_s = Vec::with_capacity(config.steps);
    for _ in 0..config.steps {
        let t = Instant::now();
        train_locally(&model, &mut state, &data, &training, &mut streams)?;
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
