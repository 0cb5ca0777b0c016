//! The registry of workloads. Sizes are chosen so that one run under
//! callgrind (roughly 50× slower than native) takes seconds, not minutes,
//! while still exercising the same code paths as the full-size runs.

use std::hint::black_box;
use std::sync::Arc;

use fedsvd::{ClientData, ClientStreams, LocalTraining, Privatization, train_locally};
use fedsvd_dp::{
    Accountant, AccountantKind, HistoryEntry, PrvAccountant, RdpAccountant, calibrate_noise,
};
use fedsvd_kernels::{GradShape, NoiseSpec, OutLayout, cpu, philox};
use fedsvd_linalg::{RsvdParams, refactorize_many, refactorize_randomized};
use fedsvd_model::testing::{random_values, random_weights, tiny_config};
use fedsvd_model::{Batch, BertConfig, BertWeights, HeadConfig, LoraConfig, Model};
use ndarray::Array2;

use crate::{Job, Result, Workload};

/// Every benchmark of the gate, in the order of `benches/gate.rs`.
///
/// To add one: write a `fn(...) -> Result<Job>` below, add a [`Workload`]
/// here, add the matching `#[bench::NAME(args = ("NAME"), setup = ...)]`
/// line in `benches/gate.rs`, and record it with
/// `cargo xtask bench-gate --update` (a test checks the first two agree).
pub static WORKLOADS: &[Workload] = &[
    Workload {
        name: "dp_prv_epsilon",
        about: "PRV epsilon, sigma 1, q 0.01, 1000 steps, delta 1e-5",
        prepare: dp_prv_epsilon,
    },
    Workload {
        name: "dp_rdp_epsilon",
        about: "RDP epsilon, sigma 1, q 0.01, 1000 steps, delta 1e-5",
        prepare: dp_rdp_epsilon,
    },
    Workload {
        name: "dp_prv_calibrate",
        about: "PRV calibration to epsilon 6, q 0.01, 1000 steps, delta 1e-5",
        prepare: dp_prv_calibrate,
    },
    Workload {
        name: "dp_rdp_calibrate",
        about: "RDP calibration to epsilon 6, q 0.01, 1000 steps, delta 1e-5",
        prepare: dp_rdp_calibrate,
    },
    Workload {
        name: "linalg_refactorize_minilm",
        about: "factored refactorization, 4 modules of 384x384, r 8 (f64)",
        prepare: linalg_refactorize_minilm,
    },
    Workload {
        name: "linalg_randomized_minilm",
        about: "randomized refactorization, 384x384, r 8, p 8, q 1 (f64)",
        prepare: linalg_randomized_minilm,
    },
    Workload {
        name: "kernels_per_example_grads",
        about: "per-example LoRA grads + norms, B 8, T 32, d_out 384, r 8",
        prepare: kernels_per_example_grads,
    },
    Workload {
        name: "kernels_clip_and_noise",
        about: "row norms, then clip, sum and Philox noise, 8 x 16384",
        prepare: kernels_clip_and_noise,
    },
    Workload {
        name: "model_tiny_forward",
        about: "tiny BERT logits, batch 8, seq 16",
        prepare: model_tiny_forward,
    },
    Workload {
        name: "model_tiny_gradients",
        about: "tiny BERT forward + backward + per-example grads, batch 8, seq 16",
        prepare: model_tiny_gradients,
    },
    Workload {
        name: "model_tiny_dp_step",
        about: "tiny BERT DP-SGD step of fedsvd::train_locally, batch 8, seq 16",
        prepare: model_tiny_dp_step,
    },
    Workload {
        name: "model_minilm_layer_dp_step",
        about: "full DP-SGD step, one MiniLM-shaped encoder layer (hidden 384, 12 heads, FFN 1536), batch 2, seq 16",
        prepare: model_minilm_layer_dp_step,
    },
];

const DELTA: f64 = 1e-5;

fn history() -> Result<Vec<HistoryEntry>> {
    Ok(vec![HistoryEntry::new(1.0, 0.01, 1000)?])
}

fn dp_prv_epsilon() -> Result<Job> {
    let history = history()?;
    let accountant = PrvAccountant::default();
    Ok(Box::new(move || {
        Ok(accountant.epsilon(black_box(&history), DELTA)?.upper)
    }))
}

fn dp_rdp_epsilon() -> Result<Job> {
    let history = history()?;
    let accountant = RdpAccountant::default();
    Ok(Box::new(move || {
        Ok(accountant.epsilon(black_box(&history), DELTA)?.epsilon)
    }))
}

fn calibrate(kind: AccountantKind) -> Result<Job> {
    let accountant = Accountant::new(kind);
    Ok(Box::new(move || {
        Ok(calibrate_noise(&accountant, black_box(6.0), 0.01, 1000, DELTA, 0.01)?.noise_multiplier)
    }))
}

fn dp_prv_calibrate() -> Result<Job> {
    calibrate(AccountantKind::Prv)
}

fn dp_rdp_calibrate() -> Result<Job> {
    calibrate(AccountantKind::Rdp)
}

/// A LoRA pair shaped like a trained MiniLM adapter: small B, A with rows of
/// norm about 1.
fn lora_pair(d: usize, r: usize, seed: u64) -> (Array2<f64>, Array2<f64>) {
    let matrix = |rows: usize, cols: usize, seed: u64, scale: f32| {
        let v = random_values(rows * cols, seed, scale);
        Array2::from_shape_fn((rows, cols), |(i, j)| f64::from(v[i * cols + j]))
    };
    let b = matrix(d, r, seed, 0.01);
    let a = matrix(r, d, seed + 1, (3.0 / d as f32).sqrt());
    (b, a)
}

fn linalg_refactorize_minilm() -> Result<Job> {
    let pairs: Vec<_> = (0..4).map(|i| lora_pair(384, 8, 10 + 2 * i)).collect();
    Ok(Box::new(move || {
        let views: Vec<_> = pairs.iter().map(|(b, a)| (b.view(), a.view())).collect();
        let out = refactorize_many(black_box(&views))?;
        Ok(out.iter().map(|(b, a)| b.sum() + a.sum()).sum())
    }))
}

fn linalg_randomized_minilm() -> Result<Job> {
    let (b, a) = lora_pair(384, 8, 30);
    let params = RsvdParams {
        rank: 8,
        oversampling: 8,
        power_iterations: 1,
        seed: 1,
    };
    Ok(Box::new(move || {
        let (nb, na) = refactorize_randomized(black_box(b.view()), black_box(a.view()), &params)?;
        Ok(nb.sum() + na.sum())
    }))
}

fn gaussian(len: usize, seed: u64) -> Vec<f32> {
    let mut v = vec![0.0; len];
    philox::fill_gaussian(seed, 0, &mut v);
    v
}

fn kernels_per_example_grads() -> Result<Job> {
    let shape = GradShape {
        batch: 8,
        tokens: 32,
        d_out: 384,
        rank: 8,
    };
    let g = gaussian(shape.g_len(), 1);
    let h = gaussian(shape.h_len(), 2);
    let mut out = vec![0.0; shape.batch * shape.block_len()];
    let mut sq = vec![0.0; shape.batch];
    Ok(Box::new(move || {
        cpu::per_example_grads(
            black_box(&g),
            black_box(&h),
            shape,
            OutLayout::packed(&shape),
            &mut out,
            &mut sq,
        )?;
        Ok(f64::from(sq.iter().sum::<f32>()))
    }))
}

fn kernels_clip_and_noise() -> Result<Job> {
    let (rows, cols) = (8usize, 1usize << 14);
    let x = gaussian(rows * cols, 3);
    let mut sq = vec![0.0; rows];
    let mut out = vec![0.0; cols];
    let noise = NoiseSpec {
        sigma: 1.0,
        clip: 50.0,
        scale: 1.0 / rows as f32,
        seed: 42,
        offset: 0,
    };
    Ok(Box::new(move || {
        cpu::row_sq_norms(black_box(&x), rows, cols, &mut sq)?;
        cpu::clip_and_noise(&x, rows, cols, &sq, &noise, &mut out)?;
        Ok(f64::from(out.iter().sum::<f32>()))
    }))
}

/// One layer of all-MiniLM-L6-v2's encoder (hidden 384, 12 heads, FFN 1536)
/// with random weights, so the gate needs no downloaded assets. One layer
/// and a small batch keep the run under callgrind short (the six-layer model
/// at batch 4 × 32 tokens took minutes per benchmark, most of it building the
/// random weights, which callgrind slows as much as the measured part);
/// every layer runs the same code. The vocabulary and position tables are
/// cut to what the batch uses: a lookup costs the same whatever their length.
fn minilm_layer_shape() -> BertConfig {
    BertConfig {
        vocab_size: 1024,
        hidden_size: 384,
        num_hidden_layers: 1,
        num_attention_heads: 12,
        intermediate_size: 1536,
        max_position_embeddings: 64,
        ..tiny_config()
    }
}

/// A model with LoRA on query and value (only B trainable, as FedSVD and
/// FFA-LoRA train), a batch of `n` sequences of `seq` tokens and labels.
struct ModelCase {
    model: Model,
    state: fedsvd_model::LoraState,
    batch: Batch,
    labels: Vec<usize>,
    /// The same examples as one client's data set.
    data: ClientData,
}

fn model_case(weights: Arc<BertWeights>, n: usize, seq: usize) -> Result<ModelCase> {
    let vocab = weights.config.vocab_size as u64;
    let lora = LoraConfig {
        train_a: false,
        ..LoraConfig::default()
    };
    let model = Model::new(weights, lora, HeadConfig::default())?;
    let state = model.init_state(0)?;
    let mut s = 7u64;
    let ids: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            // Unequal lengths, so padding and masks are exercised.
            let len = seq - (i % 3) * 2;
            (0..len)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (1 + (s >> 33) % (vocab - 1)) as u32
                })
                .collect()
        })
        .collect();
    let types: Vec<Vec<u32>> = ids.iter().map(|v| vec![0; v.len()]).collect();
    let batch = Batch::from_sequences(&ids, &types, 0)?;
    let labels: Vec<usize> = (0..n).map(|i| i % 2).collect();
    let data = ClientData {
        ids,
        type_ids: types,
        labels: labels.clone(),
        pad_id: 0,
    };
    Ok(ModelCase {
        model,
        state,
        batch,
        labels,
        data,
    })
}

fn tiny_case() -> Result<ModelCase> {
    model_case(random_weights(&tiny_config())?, 8, 16)
}

fn minilm_layer_case() -> Result<ModelCase> {
    model_case(random_weights(&minilm_layer_shape())?, 2, 16)
}

fn forward(case: ModelCase) -> Result<Job> {
    Ok(Box::new(move || {
        let logits = case.model.logits(&case.state, black_box(&case.batch))?;
        Ok(logits.iter().map(|&v| f64::from(v)).sum())
    }))
}

fn gradients(case: ModelCase) -> Result<Job> {
    Ok(Box::new(move || {
        let grads =
            case.model
                .gradients(&case.state, black_box(&case.batch), &case.labels, Some(1))?;
        Ok(grads.norms().iter().map(|&v| f64::from(v)).sum())
    }))
}

/// One step of the training path itself (`fedsvd::train_locally`, as `fedsvd
/// run` executes it) with the whole batch sampled (q = 1).
fn dp_step(mut case: ModelCase) -> Result<Job> {
    let n = case.data.len();
    let training = LocalTraining {
        steps: 1,
        expected_batch: n,
        physical_batch: n,
        lr: 0.5,
        privatization: Privatization::DpSgd {
            clip: 2.0,
            noise_multiplier: 1.0,
        },
    };
    Ok(Box::new(move || {
        let mut streams = ClientStreams::from_seed(1);
        let report = train_locally(
            &case.model,
            &mut case.state,
            black_box(&case.data),
            &training,
            &mut streams,
        )?;
        Ok(report.mean_loss)
    }))
}

fn model_tiny_forward() -> Result<Job> {
    forward(tiny_case()?)
}

fn model_tiny_gradients() -> Result<Job> {
    gradients(tiny_case()?)
}

fn model_tiny_dp_step() -> Result<Job> {
    dp_step(tiny_case()?)
}

fn model_minilm_layer_dp_step() -> Result<Job> {
    dp_step(minilm_layer_case()?)
}

#[cfg(test)]
mod tests {
    use crate::{WORKLOADS, prepare};

    /// Every workload runs, gives a finite result, and gives the same result
    /// from freshly prepared inputs (a workload whose output changes between
    /// runs would also change its instruction count).
    #[test]
    fn every_workload_runs_and_is_reproducible() {
        for w in WORKLOADS {
            let first = prepare(w.name).unwrap().run().unwrap();
            let second = prepare(w.name).unwrap().run().unwrap();
            assert!(first.is_finite(), "{}: {first}", w.name);
            assert_eq!(first.to_bits(), second.to_bits(), "{}", w.name);
        }
    }
}
