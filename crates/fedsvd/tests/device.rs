//! The federation on the GPU engine (`fedsvd_model::GpuModel`) against the
//! same seeded run on the CPU model, for a method that trains `B` only
//! (FedSVD), one that trains `A` and `B` (FedAvg-LoRA) and those that also
//! merge into the frozen weights (FLoRA, FedEx-LoRA): on the kernels' CPU
//! reference backend everywhere (the device path's wiring, kernels and
//! layouts), and on CUDA when a device is present (required under
//! `FEDSVD_REQUIRE_GPU=1`).

mod common;
use common::synthetic;

use std::sync::Arc;

use fedsvd::{
    BudgetRule, DeviceChoice, Federation, FederationConfig, Method, PrecisionChoice, PrivacyConfig,
    RoundMetrics, TrainingConfig,
};
use fedsvd_dp::AccountantKind;
use fedsvd_model::gpu::{GpuModel, Precision};
use fedsvd_model::testing::{random_weights, tiny_config};
use fedsvd_model::{BertWeights, HeadConfig, LoraConfig, Pooling};

fn config(method: Method) -> FederationConfig {
    FederationConfig {
        method,
        rounds: 3,
        clients_per_round: 2,
        eval_every: 1,
        training: TrainingConfig {
            local_steps: 2,
            batch_size: 8,
            physical_batch_size: 5,
            lr: 0.5,
        },
        privacy: PrivacyConfig {
            epsilon: Some(3.0),
            delta: 1e-5,
            clip: 1.0,
            accountant: AccountantKind::Rdp,
            budget_rule: BudgetRule::Conservative,
            report_unprotected: true,
            max_grad_norm: None,
        },
        seed: Some(7),
    }
}

fn lora(dropout: f32) -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout,
        ..LoraConfig::default()
    }
}

fn head() -> HeadConfig {
    HeadConfig {
        num_labels: 2,
        pooling: Pooling::Mean,
    }
}

fn federation(weights: &Arc<BertWeights>, method: Method, dropout: f32) -> Federation {
    let clients = (0..4)
        .map(|k| synthetic(20 + 5 * k, k as u64 + 1))
        .collect();
    Federation::new(
        config(method),
        weights.clone(),
        lora(dropout),
        head(),
        clients,
        synthetic(40, 99),
    )
    .unwrap()
}

fn run(mut f: Federation) -> (Vec<RoundMetrics>, fedsvd::GlobalState) {
    let mut m = Vec::new();
    while !f.finished() {
        m.push(f.run_round().unwrap());
    }
    (m, f.state().clone())
}

/// Every number in the JSON form of `state`, in order.
fn numbers(state: &fedsvd::GlobalState) -> Vec<f64> {
    fn walk(v: &serde_json::Value, out: &mut Vec<f64>) {
        match v {
            serde_json::Value::Number(n) => out.extend(n.as_f64()),
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            serde_json::Value::Object(o) => o.values().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&serde_json::to_value(state).unwrap(), &mut out);
    out
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-12)
}

/// The acceptance comparison: losses within 1e-3 relative each
/// round, ε identical, sampled clients identical, accuracy within one test
/// example.
fn assert_matches(cpu: &[RoundMetrics], dev: &[RoundMetrics], test_examples: usize) {
    assert_eq!(cpu.len(), dev.len());
    for (c, d) in cpu.iter().zip(dev) {
        assert_eq!(c.sampled_clients, d.sampled_clients);
        assert_eq!(c.max_epsilon, d.max_epsilon, "round {}", c.round);
        assert_eq!(c.client_epsilon, d.client_epsilon);
        let (tc, td) = (c.train_loss.unwrap(), d.train_loss.unwrap());
        assert!(
            close(tc, td, 1e-3),
            "round {}: train loss {tc} vs {td}",
            c.round
        );
        let (ec, ed) = (c.eval_loss.unwrap(), d.eval_loss.unwrap());
        assert!(
            close(ec, ed, 1e-3),
            "round {}: eval loss {ec} vs {ed}",
            c.round
        );
        let (ac, ad) = (c.eval_accuracy.unwrap(), d.eval_accuracy.unwrap());
        assert!(
            (ac - ad).abs() * test_examples as f64 <= 1.0 + 1e-9,
            "round {}: accuracy {ac} vs {ad}",
            c.round
        );
    }
}

fn engine_run(weights: &Arc<BertWeights>, method: Method, dropout: f32, cuda: bool) {
    let (cpu, cpu_state) = run(federation(weights, method, dropout));
    let mut f = federation(weights, method, dropout);
    let gpu = if cuda {
        GpuModel::cuda(
            weights.clone(),
            f.model().lora_config().clone(),
            head(),
            Precision::F32,
        )
    } else {
        GpuModel::cpu_reference(
            weights.clone(),
            f.model().lora_config().clone(),
            head(),
            Precision::F32,
        )
    }
    .unwrap();
    let device = f.compute_on(gpu).unwrap();
    assert_eq!(device.kind, if cuda { "cuda" } else { "cpu-reference" });
    let (dev, dev_state) = run(f);
    assert_matches(&cpu, &dev, 40);
    // The final adapters agree too: every number of the global state
    // (A, B and any merged delta) within 1e-3 relative L2 (moved by the
    // same noise on both).
    let (a, b) = (numbers(&cpu_state), numbers(&dev_state));
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = a.iter().map(|x| x * x).sum();
    assert!(
        (num / den).sqrt() < 1e-3,
        "{method:?}: global state differs: {}",
        (num / den).sqrt()
    );
}

#[test]
fn the_reference_backend_engine_matches_the_cpu_run() {
    let w = random_weights(&tiny_config()).unwrap();
    for dropout in [0.0, 0.1] {
        engine_run(&w, Method::fedsvd(), dropout, false);
    }
}

#[test]
fn a_method_that_trains_a_matches_the_cpu_run_on_the_reference_backend() {
    // FedAvg-LoRA: A and B train, with their per-example gradients clipped
    // jointly; the server averages both.
    let w = random_weights(&tiny_config()).unwrap();
    for dropout in [0.0, 0.1] {
        engine_run(&w, Method::Fedavg, dropout, false);
    }
}

#[test]
fn merging_methods_match_the_cpu_run_on_the_reference_backend() {
    // FLoRA and FedEx-LoRA change the frozen weights after every round: the
    // engine must train on the merged ones, or the losses part ways.
    let w = random_weights(&tiny_config()).unwrap();
    for method in [Method::Flora, Method::Fedex] {
        engine_run(&w, method, 0.1, false);
    }
}

#[test]
fn gpu_federated_run_matches_the_cpu_run() {
    let required = std::env::var("FEDSVD_REQUIRE_GPU").is_ok_and(|v| v == "1");
    if !fedsvd_model::gpu::cuda_available() {
        assert!(!required, "FEDSVD_REQUIRE_GPU=1 but no usable CUDA device");
        eprintln!("skipping gpu_federated_run_matches_the_cpu_run: no CUDA device");
        return;
    }
    let w = random_weights(&tiny_config()).unwrap();
    engine_run(&w, Method::fedsvd(), 0.0, true);
    engine_run(&w, Method::Fedavg, 0.1, true);
    engine_run(&w, Method::Flora, 0.0, true);
}

#[test]
fn an_engine_of_another_model_is_refused() {
    let w = random_weights(&tiny_config()).unwrap();
    for method in [Method::fedsvd(), Method::Fedavg] {
        let mut f = federation(&w, method, 0.0);
        let mut other = (*w).clone();
        other.layers[0].qkv.weight[0] += 1.0;
        let gpu = GpuModel::cpu_reference(
            Arc::new(other),
            f.model().lora_config().clone(),
            head(),
            Precision::F32,
        )
        .unwrap();
        let err = f.compute_on(gpu).unwrap_err().to_string();
        assert!(err.contains("not this federation's"), "{err}");
    }
}

#[test]
fn a_method_that_trains_a_is_not_refused_a_device() {
    // Without CUDA the only reason `cuda` fails, and `auto` stays on the
    // CPU, is the missing device, never the method.
    if fedsvd_model::gpu::cuda_available() {
        return;
    }
    let w = random_weights(&tiny_config()).unwrap();
    for method in [Method::Fedavg, Method::Flora, Method::Fedex] {
        let mut f = federation(&w, method, 0.0);
        let err = f
            .set_device(DeviceChoice::Cuda, PrecisionChoice::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("CUDA") && !err.contains("A factors"), "{err}");
        let resolved = f
            .set_device(DeviceChoice::Auto, PrecisionChoice::F32)
            .unwrap();
        assert_eq!(resolved.device.kind, "cpu");
        let why = resolved.fallback_reason.unwrap();
        assert!(why.contains("CUDA") && !why.contains("A factors"), "{why}");
    }
}

#[test]
fn cuda_without_a_device_is_a_clear_error_and_auto_picks_the_cpu() {
    if fedsvd_model::gpu::cuda_available() {
        return;
    }
    let w = random_weights(&tiny_config()).unwrap();
    let mut f = federation(&w, Method::fedsvd(), 0.0);
    let err = f
        .set_device(DeviceChoice::Cuda, PrecisionChoice::F32)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("device cuda: "), "{err}");
    assert!(err.contains("CUDA"), "{err}");
    let resolved = f
        .set_device(DeviceChoice::Auto, PrecisionChoice::F32)
        .unwrap();
    assert_eq!(resolved.device.kind, "cpu");
    assert!(resolved.fallback_reason.is_some());
}
