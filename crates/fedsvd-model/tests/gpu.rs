//! The device training step (`fedsvd_model::gpu`) against the CPU model:
//! logits, per-example losses, per-example gradients, their norms and the
//! clipped sum of every trainable tensor (`B` alone, `A` and `B`, `A`
//! alone, with or without the head), with and without LoRA dropout, on
//! padded batches. The same code runs on the kernels' CPU backend (always) and on
//! CUDA; the CUDA tests print SKIP and pass without a device, and fail when
//! `FEDSVD_REQUIRE_GPU=1` (the GPU machine's run sets it).

use std::io::Write;
use std::sync::Arc;

use fedsvd_kernels::{Backend, CudaBackend, DeviceProbe, probe};
use fedsvd_model::gpu::{GpuModel, Precision};
use fedsvd_model::testing::{random_values, random_weights, tiny_config};
use fedsvd_model::{
    Batch, BertConfig, BertWeights, HeadConfig, LoraConfig, LoraState, Model, Pooling, Target,
};

fn cuda_or_skip(test: &str) -> Option<Backend> {
    let required = std::env::var("FEDSVD_REQUIRE_GPU").as_deref() == Ok("1");
    match probe() {
        DeviceProbe::Devices(_) => match CudaBackend::new(0) {
            Ok(be) => Some(Backend::Cuda(be)),
            Err(e) => panic!("{test}: a CUDA device is present but the backend failed: {e}"),
        },
        other => {
            if required {
                panic!("{test}: FEDSVD_REQUIRE_GPU=1 but no usable CUDA device ({other:?})");
            }
            let _ = writeln!(std::io::stderr(), "SKIP {test}: no CUDA device ({other:?})");
            None
        }
    }
}

fn minilm_shape() -> BertConfig {
    BertConfig {
        vocab_size: 30522,
        hidden_size: 384,
        num_hidden_layers: 6,
        num_attention_heads: 12,
        intermediate_size: 1536,
        max_position_embeddings: 512,
        ..tiny_config()
    }
}

/// Sequences of different lengths (so padding is exercised), the first
/// token 1 as a [CLS] stand-in, a two-segment example among them.
fn batch(config: &BertConfig, examples: usize, max_len: usize, seed: u64) -> Batch {
    let mut ids = Vec::new();
    let mut types = Vec::new();
    for i in 0..examples {
        let len = (max_len - (i * 7) % (max_len / 2).max(1)).max(2);
        let r = random_values(len, seed + i as u64, 1.0);
        let mut s: Vec<u32> = r
            .iter()
            .map(|v| 2 + ((v.abs() * 1e6) as usize % (config.vocab_size - 2)) as u32)
            .collect();
        s[0] = 1;
        let t: Vec<u32> = (0..len)
            .map(|p| u32::from(i % 3 == 1 && p >= len / 2))
            .collect();
        ids.push(s);
        types.push(t);
    }
    Batch::from_sequences(&ids, &types, 0).unwrap()
}

fn state_for(model: &Model, seed: u64) -> LoraState {
    let mut state = model.init_state(seed).unwrap();
    // Non-zero B (a fresh B is 0) so adapters change the forward pass and
    // pass gradient to earlier layers; a larger head so gradients are well
    // above round-off.
    for (k, ad) in state.adapters.iter_mut().enumerate() {
        ad.b = random_values(ad.b.len(), 100 + k as u64, 0.3);
    }
    state.head_weight = random_values(state.head_weight.len(), 99, 0.5);
    state.head_bias = random_values(state.head_bias.len(), 98, 0.2);
    state
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

struct Case {
    targets: Vec<Target>,
    pooling: Pooling,
    dropout: f32,
    examples: usize,
    max_len: usize,
    train_head: bool,
    /// `(train_a, train_b)`.
    factors: (bool, bool),
}

/// Runs one case on `be` and compares with the CPU model; `tol` is the
/// relative L2 error allowed per tensor.
fn compare(be: Backend, weights: &Arc<BertWeights>, case: &Case, tol: f64) {
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: case.dropout,
        targets: case.targets.clone(),
        train_a: case.factors.0,
        train_b: case.factors.1,
        train_head: case.train_head,
    };
    let head = HeadConfig {
        num_labels: 3,
        pooling: case.pooling,
    };
    let model = Model::new(weights.clone(), lora.clone(), head).unwrap();
    let state = state_for(&model, 5);
    let b = batch(&weights.config, case.examples, case.max_len, 17);
    let labels: Vec<usize> = (0..b.len()).map(|i| i % 3).collect();
    let seed = (case.dropout > 0.0).then_some(4242);

    let mut gpu = GpuModel::new(be, weights.clone(), lora, head, Precision::F32).unwrap();
    gpu.set_state(&state).unwrap();

    let cpu_logits = model.logits(&state, &b).unwrap();
    let got = gpu.logits(&b).unwrap();
    let e = rel(&got, &cpu_logits);
    assert!(e < tol, "eval logits: relative error {e:e}");

    let grads = model.gradients(&state, &b, &labels, seed).unwrap();
    let layout = model.layout(&state);
    assert_eq!(gpu.layout(), Some(&layout));
    // Every slot of every example's gradient, before any reduction: a
    // gradient written to the wrong slot, transposed or without its
    // dropout mask fails here even where the sums would hide it.
    let cpu_each = grads.per_example();
    let each = gpu.per_example_gradients(&b, &labels, seed).unwrap();
    assert_eq!(each.len(), cpu_each.len());
    for i in 0..b.len() {
        let row = i * layout.len;
        for slot in &layout.slots {
            let r = row + slot.offset..row + slot.offset + slot.len();
            let e = rel(&each[r.clone()], &cpu_each[r]);
            assert!(
                e < tol,
                "example {i}, {}: relative error {e:e} ({:?})",
                slot.name,
                case.factors
            );
        }
    }
    let mut norms = grads.norms();
    norms.sort_by(f32::total_cmp);
    // Clip at the median norm: some examples are clipped, some are not.
    let clip = norms[norms.len() / 2];
    let (cpu_sum, cpu_norms) = grads.clipped_sum(clip).unwrap();
    let out = gpu.clipped_sum(&b, &labels, clip, seed).unwrap();
    let e = rel(&out.logits, grads.logits());
    assert!(e < tol, "training logits: relative error {e:e}");
    let e = rel(&out.losses, grads.losses());
    assert!(e < tol, "losses: relative error {e:e}");
    let e = rel(&out.norms, &cpu_norms);
    assert!(e < tol, "norms: relative error {e:e}");
    assert_eq!(out.sum.len(), layout.len);
    for slot in &layout.slots {
        let r = slot.offset..slot.offset + slot.len();
        let e = rel(&out.sum[r.clone()], &cpu_sum[r]);
        assert!(
            e < tol,
            "clipped sum of {}: relative error {e:e}",
            slot.name
        );
    }
    // The plain sum (non-private step) is the clip-free weighting.
    let plain = gpu.sum(&b, &labels, seed).unwrap();
    let e = rel(&plain.sum, &grads.sum());
    assert!(e < tol, "plain sum: relative error {e:e}");
    // A second step on the same shape reuses the buffers and agrees.
    let again = gpu.clipped_sum(&b, &labels, clip, seed).unwrap();
    assert_eq!(again.sum, out.sum);
}

/// B alone (FedSVD, FFA-LoRA), A and B (FedAvg-LoRA, FLoRA, FedEx-LoRA),
/// and A alone.
const FACTORS: [(bool, bool); 3] = [(false, true), (true, true), (true, false)];

fn tiny_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for pooling in [Pooling::ClsPooler, Pooling::Mean] {
        for dropout in [0.0, 0.2] {
            for factors in FACTORS {
                v.push(Case {
                    targets: vec![Target::Query, Target::Value],
                    pooling,
                    dropout,
                    examples: 5,
                    max_len: 12,
                    train_head: false,
                    factors,
                });
                // The head trains too (the default preset's configuration).
                v.push(Case {
                    targets: vec![Target::Query, Target::Value],
                    pooling,
                    dropout,
                    examples: 6,
                    max_len: 10,
                    train_head: true,
                    factors,
                });
                // Every target: the first layer's query, key and value need
                // dH for A although no input gradient leaves that layer.
                v.push(Case {
                    targets: Target::ALL.to_vec(),
                    pooling,
                    dropout,
                    examples: 4,
                    max_len: 9,
                    train_head: false,
                    factors,
                });
            }
        }
    }
    // Only the head trains: the adapters stay fixed.
    v.push(Case {
        targets: vec![Target::Query, Target::Value],
        pooling: Pooling::Mean,
        dropout: 0.2,
        examples: 5,
        max_len: 12,
        train_head: true,
        factors: (false, false),
    });
    v
}

#[test]
fn cpu_backend_step_matches_cpu_model() {
    let w = random_weights(&tiny_config()).unwrap();
    for case in tiny_cases() {
        compare(Backend::cpu(), &w, &case, 2e-5);
    }
}

#[test]
fn cpu_backend_minilm_shape_step_matches_cpu_model() {
    // The kernels' CPU GEMMs sum in another order than the model's, as
    // cuBLAS does: a proxy of the GPU's round-off at the real width/depth.
    let w = random_weights(&minilm_shape()).unwrap();
    let case = Case {
        targets: vec![Target::Query, Target::Value],
        pooling: Pooling::ClsPooler,
        dropout: 0.1,
        examples: 3,
        max_len: 24,
        train_head: true,
        factors: (true, true),
    };
    compare(Backend::cpu(), &w, &case, 1e-4);
}

#[test]
fn rejects_unsupported_configs_and_bad_input() {
    let w = random_weights(&tiny_config()).unwrap();
    let head = HeadConfig::default();
    // Nothing to train is refused with a reason, not a panic.
    let frozen = LoraConfig {
        train_a: false,
        train_b: false,
        train_head: false,
        ..LoraConfig::default()
    };
    let err = GpuModel::new(Backend::cpu(), w.clone(), frozen, head, Precision::F32).unwrap_err();
    assert!(
        err.to_string().contains("needs something to train"),
        "{err}"
    );
    // Both factors train (the default configuration).
    let lora = LoraConfig::default();
    let mut gpu = GpuModel::new(
        Backend::cpu(),
        w.clone(),
        lora.clone(),
        head,
        Precision::F32,
    )
    .unwrap();
    let b = batch(&w.config, 2, 6, 1);
    // No state yet.
    assert!(gpu.clipped_sum(&b, &[0, 1], 1.0, None).is_err());
    let model = Model::new(w.clone(), lora, head).unwrap();
    gpu.set_state(&model.init_state(1).unwrap()).unwrap();
    assert!(gpu.clipped_sum(&b, &[0], 1.0, None).is_err());
    assert!(gpu.clipped_sum(&b, &[0, 7], 1.0, None).is_err());
    assert!(gpu.clipped_sum(&b, &[0, 1], 0.0, None).is_err());
    let mut bad = b.clone();
    bad.input_ids[0] = 10_000;
    assert!(gpu.clipped_sum(&bad, &[0, 1], 1.0, None).is_err());
    assert!(gpu.device_bytes() > 0);
}

#[test]
fn gpu_tiny_step_matches_cpu_model() {
    let Some(_) = cuda_or_skip("gpu_tiny_step_matches_cpu_model") else {
        return;
    };
    let w = random_weights(&tiny_config()).unwrap();
    for case in tiny_cases() {
        let be = cuda_or_skip("gpu_tiny_step_matches_cpu_model").unwrap();
        compare(be, &w, &case, 1e-4);
    }
}

#[test]
fn gpu_minilm_shape_step_matches_cpu_model() {
    let Some(_) = cuda_or_skip("gpu_minilm_shape_step_matches_cpu_model") else {
        return;
    };
    let w = random_weights(&minilm_shape()).unwrap();
    for (pooling, dropout, train_head, factors) in [
        (Pooling::ClsPooler, 0.0, false, (false, true)),
        (Pooling::Mean, 0.1, true, (false, true)),
        (Pooling::ClsPooler, 0.1, false, (true, true)),
        (Pooling::Mean, 0.0, true, (true, true)),
    ] {
        let be = cuda_or_skip("gpu_minilm_shape_step_matches_cpu_model").unwrap();
        let case = Case {
            targets: vec![Target::Query, Target::Value],
            pooling,
            dropout,
            examples: 6,
            max_len: 40,
            train_head,
            factors,
        };
        compare(be, &w, &case, 1e-4);
    }
}

#[test]
fn gpu_tf32_and_bf16_steps_stay_close() {
    let Some(_) = cuda_or_skip("gpu_tf32_and_bf16_steps_stay_close") else {
        return;
    };
    // Reduced precision is not bit-comparable; the clipped sum stays
    // within a few percent of the f32 result.
    let w = random_weights(&minilm_shape()).unwrap();
    let lora = LoraConfig {
        rank: 8,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec![Target::Query, Target::Value],
        train_a: false,
        train_b: true,
        train_head: false,
    };
    let head = HeadConfig {
        num_labels: 2,
        pooling: Pooling::Mean,
    };
    let model = Model::new(w.clone(), lora.clone(), head).unwrap();
    let state = state_for(&model, 3);
    let b = batch(&w.config, 8, 64, 5);
    let labels: Vec<usize> = (0..b.len()).map(|i| i % 2).collect();
    let mut sums = Vec::new();
    for p in [Precision::F32, Precision::Tf32, Precision::Bf16] {
        let be = cuda_or_skip("gpu_tf32_and_bf16_steps_stay_close").unwrap();
        let mut gpu = GpuModel::new(be, w.clone(), lora.clone(), head, p).unwrap();
        gpu.set_state(&state).unwrap();
        sums.push(gpu.clipped_sum(&b, &labels, 1.0, None).unwrap().sum);
    }
    for (name, s) in [("tf32", &sums[1]), ("bf16", &sums[2])] {
        let e = rel(s, &sums[0]);
        let _ = writeln!(std::io::stderr(), "{name}: relative error {e:e}");
        assert!(e < 0.1, "{name}: relative error {e:e}");
    }
}

#[test]
fn new_frozen_weights_replace_the_uploaded_ones() {
    // FLoRA and FedEx-LoRA merge deltas into the frozen weights each round:
    // after `set_weights` the engine computes with the new ones.
    let w = random_weights(&tiny_config()).unwrap();
    // A merged delta on layer 0's query/key/value block.
    let mut m = (*w).clone();
    let delta = random_values(m.layers[0].qkv.weight.len(), 77, 0.3);
    for (v, d) in m.layers[0].qkv.weight.iter_mut().zip(delta) {
        *v += d;
    }
    let merged = Arc::new(m);
    let lora = LoraConfig {
        rank: 4,
        targets: vec![Target::Query, Target::Value],
        ..LoraConfig::default()
    };
    let head = HeadConfig {
        num_labels: 3,
        pooling: Pooling::ClsPooler,
    };
    let mut gpu = GpuModel::new(
        Backend::cpu(),
        w.clone(),
        lora.clone(),
        head,
        Precision::F32,
    )
    .unwrap();
    let model = Model::new(merged.clone(), lora.clone(), head).unwrap();
    let state = state_for(&model, 5);
    gpu.set_state(&state).unwrap();
    let b = batch(&w.config, 4, 10, 3);
    let labels = [0, 1, 2, 0];
    let before = gpu.per_example_gradients(&b, &labels, None).unwrap();
    gpu.set_weights(merged.clone()).unwrap();
    assert!(Arc::ptr_eq(gpu.model().weights(), &merged));
    let after = gpu.per_example_gradients(&b, &labels, None).unwrap();
    let cpu = model
        .per_example_gradients(&state, &b, &labels, None)
        .unwrap();
    assert!(rel(&after, &cpu) < 2e-5, "{:e}", rel(&after, &cpu));
    assert!(
        rel(&before, &cpu) > 1e-2,
        "the old weights gave the same gradients"
    );
    // Weights of another shape are refused, and the engine keeps working.
    let wider = random_weights(&BertConfig {
        intermediate_size: tiny_config().intermediate_size * 2,
        ..tiny_config()
    })
    .unwrap();
    let err = gpu.set_weights(wider).unwrap_err();
    assert!(err.to_string().contains("configuration"), "{err}");
    assert_eq!(gpu.per_example_gradients(&b, &labels, None).unwrap(), after);
}
