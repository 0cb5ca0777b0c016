//! The DP-SGD step benchmark behind `fedsvd bench step`: one local step of
//! [`crate::train_locally`] — exactly what `fedsvd run` executes: forward,
//! backward, per-example clipping, the discrete Gaussian release, SGD update
//! — on a fixed batch of full-length sequences, with r = 8 LoRA on
//! query/value and only `B` trainable.
//!
//! The batch is fixed (every example in every step) as in the peer's
//! benchmark: the expected batch equals the client's data, so the Poisson
//! sampling rate is 1.

use std::sync::Arc;
use std::time::Instant;

use fedsvd_model::gpu::{GpuModel, Precision};
use fedsvd_model::testing::{random_values, tiny_config};
use fedsvd_model::{
    BertConfig, BertWeights, ComputeEngine, CpuEngine, HeadConfig, LayerNorm, LayerWeights, Linear,
    LoraConfig, Model, Pooling, Target, peak_rss_mib,
};

use crate::client::{
    ClientData, ClientStreams, Instrumentation, LocalTraining, Privatization, train_locally_on,
};
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
    /// Train the A factors too (FedAvg-LoRA, FLoRA, FedEx-LoRA), not only
    /// B (FedSVD, FFA-LoRA).
    pub train_a: bool,
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

/// What both step benchmarks (CPU and device) train: r = 8 LoRA on
/// query/value with only B trainable, the frozen [CLS] pooler head, and a
/// fixed batch of `batch` sequences of exactly `seq` tokens.
struct StepInputs {
    lora: LoraConfig,
    head: HeadConfig,
    ids: Vec<Vec<u32>>,
}

fn step_inputs(
    vocab: usize,
    batch: usize,
    seq: usize,
    steps: usize,
    train_a: bool,
) -> Result<StepInputs> {
    if batch == 0 || steps == 0 || seq < 2 {
        return Err(Error::InvalidConfig {
            key: "bench step",
            value: format!("batch {batch}, seq {seq}, steps {steps}"),
            allowed: "batch >= 1, seq >= 2 and steps >= 1",
        });
    }
    let vocab = vocab as u64;
    if vocab < 2000 {
        return Err(Error::InvalidConfig {
            key: "bench step",
            value: format!("a vocabulary of {vocab} tokens"),
            allowed: "a BERT vocabulary (at least 2000 tokens)",
        });
    }
    // [CLS] w_1 .. w_{seq-2} [SEP] with word-piece ids from a fixed LCG.
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (1996 + (s >> 33) % (vocab - 1996)) as u32
    };
    let ids = (0..batch)
        .map(|_| {
            let mut v = vec![101];
            v.extend((0..seq - 2).map(|_| next()));
            v.push(102);
            v
        })
        .collect();
    Ok(StepInputs {
        lora: LoraConfig {
            rank: 8,
            alpha: 8.0,
            dropout: 0.05,
            targets: vec![Target::Query, Target::Value],
            train_a,
            train_b: true,
            train_head: false,
        },
        head: HeadConfig {
            num_labels: 2,
            pooling: Pooling::ClsPooler,
        },
        ids,
    })
}

/// The client data (a fixed batch: q = 1) and the local training (one step,
/// C = 2, σ = 1, lr = 0.5) both step benchmarks run.
fn bench_client(
    ids: Vec<Vec<u32>>,
    batch: usize,
    seq: usize,
    private: bool,
) -> (ClientData, LocalTraining) {
    let data = ClientData {
        type_ids: vec![vec![0u32; seq]; batch],
        ids,
        labels: (0..batch).map(|i| i % 2).collect(),
        pad_id: 0,
    };
    let training = LocalTraining {
        steps: 1,
        expected_batch: batch,
        physical_batch: batch,
        lr: 0.5,
        privatization: if private {
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
    (data, training)
}

/// Runs one warm-up step and `steps` timed steps of [`train_locally_on`]
/// on `engine`, calling `after` after each; returns the timed seconds and
/// the mean loss of the last step.
fn timed_steps<E: ComputeEngine>(
    engine: &mut E,
    data: &ClientData,
    training: &LocalTraining,
    steps: usize,
    mut after: impl FnMut(&mut E),
) -> Result<(Vec<f64>, f64)> {
    let mut state = engine.model().init_state(0)?;
    let mut streams = ClientStreams::from_seed(0);
    let extra = Instrumentation::default();
    let mut times_s = Vec::with_capacity(steps);
    let mut last_loss = 0.0;
    for step in 0..=steps {
        let t = Instant::now();
        let report = train_locally_on(engine, &mut state, data, training, &mut streams, &extra)?;
        let elapsed = t.elapsed().as_secs_f64();
        if step > 0 {
            times_s.push(elapsed);
        }
        last_loss = report.mean_loss;
        after(engine);
    }
    Ok((times_s, last_loss))
}

fn median(times: &[f64]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Times local steps (C = 2, σ = 1, lr = 0.5, LoRA r = 8, alpha 8, dropout
/// 0.05 on query/value, B trainable (and A with `train_a`), frozen [CLS]
/// pooler head) on
/// `weights`, through [`crate::train_locally`] with a seeded stream.
pub fn run_step_benchmark(
    weights: Arc<BertWeights>,
    config: StepBenchConfig,
) -> Result<StepBenchResult> {
    let StepInputs { lora, head, ids } = step_inputs(
        weights.config.vocab_size,
        config.batch,
        config.seq,
        config.steps,
        config.train_a,
    )?;
    let model = Model::new(weights, lora, head)?;
    let (data, training) = bench_client(ids, config.batch, config.seq, config.private);
    let (times_s, _) = timed_steps(
        &mut CpuEngine(&model),
        &data,
        &training,
        config.steps,
        |_| {},
    )?;
    let step_s = median(&times_s);
    Ok(StepBenchResult {
        step_s,
        examples_per_s: config.batch as f64 / step_s,
        times_s,
        threads: rayon::current_num_threads(),
        peak_rss_mib: peak_rss_mib(),
    })
}

/// A BERT-family encoder size for benchmarks on random weights (no
/// download needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchShape {
    /// all-MiniLM-L6-v2: hidden 384, 6 layers, 12 heads, FFN 1536.
    MiniLm,
    /// RoBERTa-large: hidden 1024, 24 layers, 16 heads, FFN 4096, vocab
    /// 50265, 514 positions (a BERT-family encoder of that size; RoBERTa's
    /// position-id offset plays no part in the cost).
    RobertaLarge,
}

impl BenchShape {
    /// The architecture.
    pub fn config(self) -> BertConfig {
        let (vocab, h, layers, heads, ff, pos) = match self {
            BenchShape::MiniLm => (30522, 384, 6, 12, 1536, 512),
            BenchShape::RobertaLarge => (50265, 1024, 24, 16, 4096, 514),
        };
        BertConfig {
            vocab_size: vocab,
            hidden_size: h,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            intermediate_size: ff,
            max_position_embeddings: pos,
            ..tiny_config()
        }
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BenchShape::MiniLm => "minilm",
            BenchShape::RobertaLarge => "roberta-large",
        }
    }
}

/// Random weights of `shape` (weights ±0.05, biases ±0.01, LayerNorm 1/0),
/// built directly rather than through a safetensors round trip, which
/// would double the 1.4 GB of RoBERTa-large.
pub fn random_bench_weights(shape: BenchShape) -> Arc<BertWeights> {
    let c = shape.config();
    let (h, ff) = (c.hidden_size, c.intermediate_size);
    let mut seed = 1u64;
    let mut vals = |n: usize, scale: f32| {
        seed += 1;
        random_values(n, seed, scale)
    };
    let mut lin = |d_out: usize, d_in: usize| Linear {
        weight: vals(d_out * d_in, 0.05),
        bias: vals(d_out, 0.01),
        d_in,
        d_out,
    };
    let ln = || LayerNorm {
        gamma: vec![1.0; h],
        beta: vec![0.0; h],
    };
    let layers = (0..c.num_hidden_layers)
        .map(|_| LayerWeights {
            qkv: lin(3 * h, h),
            attn_out: lin(h, h),
            attn_ln: ln(),
            intermediate: lin(ff, h),
            output: lin(h, ff),
            output_ln: ln(),
        })
        .collect();
    let pooler = Some(lin(h, h));
    let mut seed2 = 1000u64;
    let mut emb = |n: usize| {
        seed2 += 1;
        random_values(n, seed2, 0.05)
    };
    Arc::new(BertWeights {
        word_embeddings: emb(c.vocab_size * h),
        position_embeddings: emb(c.max_position_embeddings * h),
        token_type_embeddings: emb(c.type_vocab_size * h),
        embeddings_ln: ln(),
        layers,
        pooler,
        config: c,
    })
}

/// What the device step benchmark times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuStepBenchConfig {
    /// Examples per step.
    pub batch: usize,
    /// Tokens per example (all full length).
    pub seq: usize,
    /// Timed steps after one warm-up step.
    pub steps: usize,
    /// DP-SGD (true) or the plain sum without clipping and noise (false).
    pub private: bool,
    /// GEMM precision of the encoder.
    pub precision: Precision,
    /// Train the A factors too, not only B.
    pub train_a: bool,
}

/// The device step measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuStepBenchResult {
    /// Median seconds per step.
    pub step_s: f64,
    /// `batch / step_s`.
    pub examples_per_s: f64,
    /// Every timed step, seconds.
    pub times_s: Vec<f64>,
    /// The backend and device.
    pub device: String,
    /// Bytes the model allocated itself (weights, state, every buffer of
    /// the step).
    pub model_bytes: usize,
    /// Peak over the steps of the device memory in use beyond what was in
    /// use before the weights were uploaded (the CUDA context excluded),
    /// sampled after each step.
    pub peak_device_bytes: Option<usize>,
    /// The most memory the model's buffers held at once, weights included
    /// (the pool's high watermark: measured as the peer measures
    /// `max_memory_allocated`); `None` without CUDA.
    pub peak_allocated_bytes: Option<usize>,
    /// The mean loss of the last step.
    pub last_loss: f64,
}

/// Times the DP-SGD step of [`train_locally_on`] on the GPU engine of
/// `fedsvd_model::gpu` (C = 2, σ = 1, lr = 0.5, LoRA r = 8, alpha 8, dropout
/// 0.05 on query/value, B trainable (and A with `train_a`), frozen [CLS]
/// pooler head, as [`run_step_benchmark`]): the clipped sum on the device
/// while the host draws the discrete Gaussian noise, then on the host the
/// release, the division by the batch and the SGD update of the adapters,
/// re-uploaded (they are small: 37k values of B for MiniLM). A fixed batch: every example every step.
pub fn run_gpu_step_benchmark(
    weights: Arc<BertWeights>,
    config: GpuStepBenchConfig,
) -> Result<GpuStepBenchResult> {
    device_step_benchmark(weights, config, true)
}

/// The device step benchmark on CUDA (`cuda`) or on the kernels' CPU
/// reference backend (the same code path, for the tests of this crate).
fn device_step_benchmark(
    weights: Arc<BertWeights>,
    config: GpuStepBenchConfig,
    cuda: bool,
) -> Result<GpuStepBenchResult> {
    let StepInputs { lora, head, ids } = step_inputs(
        weights.config.vocab_size,
        config.batch,
        config.seq,
        config.steps,
        config.train_a,
    )?;
    let mut gpu = if cuda {
        GpuModel::cuda(weights, lora, head, config.precision)?
    } else {
        GpuModel::cpu_reference(weights, lora, head, config.precision)?
    };
    let (data, training) = bench_client(ids, config.batch, config.seq, config.private);
    let mut peak: Option<usize> = None;
    let (times_s, last_loss) = timed_steps(&mut gpu, &data, &training, config.steps, |g| {
        if let Some(m) = g.device_memory_allocated() {
            peak = Some(peak.map_or(m, |p| p.max(m)));
        }
    })?;
    let step_s = median(&times_s);
    Ok(GpuStepBenchResult {
        step_s,
        examples_per_s: config.batch as f64 / step_s,
        times_s,
        device: gpu.backend_name(),
        model_bytes: gpu.device_bytes(),
        peak_device_bytes: peak,
        peak_allocated_bytes: gpu.peak_allocated_bytes(),
        last_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_step_benchmark_runs_on_the_cpu_backend() {
        let w = random_bench_weights(BenchShape::MiniLm);
        assert_eq!(w.config.hidden_size, 384);
        for private in [true, false] {
            let config = GpuStepBenchConfig {
                batch: 3,
                seq: 8,
                steps: 2,
                private,
                precision: Precision::F32,
                train_a: !private,
            };
            let r = device_step_benchmark(w.clone(), config, false).unwrap();
            assert_eq!(r.times_s.len(), 2);
            assert!(r.examples_per_s > 0.0 && r.last_loss.is_finite());
            assert!(r.model_bytes > 4 * 22_000_000);
            assert_eq!(r.peak_device_bytes, None);
            assert_eq!(r.peak_allocated_bytes, None);
        }
        let config = GpuStepBenchConfig {
            batch: 0,
            seq: 8,
            steps: 1,
            private: true,
            precision: Precision::F32,
            train_a: false,
        };
        assert!(device_step_benchmark(w, config, false).is_err());
    }

    #[test]
    fn roberta_large_shape_is_the_published_one() {
        let c = BenchShape::RobertaLarge.config();
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.num_attention_heads),
            (1024, 24, 16)
        );
        assert_eq!(
            (c.intermediate_size, c.vocab_size, c.max_position_embeddings),
            (4096, 50265, 514)
        );
        c.validate().unwrap();
    }
}
