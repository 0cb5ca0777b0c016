//! The privacy audit on the tiny random BERT: below the accountant on the
//! real mechanism, tight enough to matter, and above it when the mechanism
//! is broken on purpose (through the test-only `fault-injection` hooks).

use fedsvd::{
    AuditConfig, AuditReport, CanaryMode, ClientData, ClientStreams, Fault, Instrumentation,
    LocalTraining, Privatization, audit_client,
};
use fedsvd_dp::{Accountant, AccountantKind, calibrate_noise};
use fedsvd_model::testing::{random_weights, tiny_config};
use fedsvd_model::{HeadConfig, LoraConfig, Model, Pooling, Target};

const DELTA: f64 = 1e-5;
const STEPS: usize = 4;
const EXAMPLES: usize = 8;

fn data() -> ClientData {
    let mut s = 0x1234_5678u64;
    let mut next = |m: u64| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s % m
    };
    let ids: Vec<Vec<u32>> = (0..EXAMPLES)
        .map(|_| {
            let mut v = vec![2u32];
            v.extend((0..6).map(|_| 8 + next(40) as u32));
            v.push(3);
            v
        })
        .collect();
    ClientData {
        type_ids: ids.iter().map(|v| vec![0; v.len()]).collect(),
        labels: (0..EXAMPLES).map(|i| i % 2).collect(),
        ids,
        pad_id: 0,
    }
}

/// Rank 16 on every target of the tiny BERT: 7,168 trainable B values, room
/// for thousands of distinct gradient canaries.
fn model() -> Model {
    let lora = LoraConfig {
        rank: 16,
        alpha: 16.0,
        dropout: 0.0,
        targets: vec![
            Target::Query,
            Target::Key,
            Target::Value,
            Target::AttentionOutput,
            Target::Intermediate,
            Target::Output,
        ],
        train_a: false,
        train_b: true,
        train_head: false,
    };
    let head = HeadConfig {
        num_labels: 2,
        pooling: Pooling::Mean,
    };
    Model::new(random_weights(&tiny_config()).unwrap(), lora, head).unwrap()
}

/// One client that holds all its data in every batch (q = 1) for four
/// steps, with σ calibrated for `epsilon`.
fn audit(epsilon: f64, mode: CanaryMode, canaries: usize, fault: Option<Fault>) -> AuditReport {
    let model = model();
    let init = model.init_state(3).unwrap();
    let accountant = Accountant::new(AccountantKind::Prv);
    let sigma = calibrate_noise(&accountant, epsilon, 1.0, STEPS as u64, DELTA, 0.01)
        .unwrap()
        .noise_multiplier;
    let training = LocalTraining {
        steps: STEPS,
        expected_batch: EXAMPLES,
        physical_batch: EXAMPLES,
        lr: 0.05,
        privatization: Privatization::DpSgd {
            clip: 1.0,
            noise_multiplier: sigma,
        },
    };
    let config = AuditConfig {
        mode,
        canaries,
        confidence: 0.95,
        seed: 17,
        gradient_norm_factor: 1000.0,
    };
    let extra = match fault {
        Some(f) => Instrumentation::default().with_fault(f),
        None => Instrumentation::default(),
    };
    let report = audit_client(
        &model,
        &init,
        &data(),
        &training,
        &accountant,
        DELTA,
        &config,
        &mut ClientStreams::from_seed(99),
        extra,
    )
    .unwrap();
    eprintln!("epsilon {epsilon}, {mode:?}, fault {fault:?}: {report:?}");
    report
}

#[test]
fn gradient_canaries_stay_below_the_accountant_and_come_close_at_six() {
    for epsilon in [1.0, 3.0, 6.0] {
        let r = audit(epsilon, CanaryMode::Gradient, 5000, None);
        assert!(r.epsilon_accountant <= epsilon + 1e-9);
        assert!(
            r.epsilon_lower_bound <= r.epsilon_accountant,
            "the audit of a correct mechanism exceeded its accountant: {r:?}"
        );
        if epsilon == 6.0 {
            assert!(
                r.epsilon_lower_bound >= 0.3 * epsilon,
                "the bound is too loose to matter: {r:?}"
            );
        }
    }
}

#[test]
fn input_canaries_stay_below_the_accountant() {
    let r = audit(6.0, CanaryMode::Input, 1000, None);
    assert!(r.epsilon_lower_bound <= r.epsilon_accountant, "{r:?}");
    assert_eq!(r.canaries, 1000);
}

#[test]
fn a_mechanism_without_clipping_is_caught() {
    let r = audit(
        3.0,
        CanaryMode::Gradient,
        2000,
        Some(Fault::DisableClipping),
    );
    assert!(
        r.epsilon_lower_bound > r.epsilon_accountant,
        "clipping disabled went unnoticed: {r:?}"
    );
}

#[test]
fn a_mechanism_with_a_tenth_of_the_noise_is_caught() {
    let r = audit(
        3.0,
        CanaryMode::Gradient,
        2000,
        Some(Fault::DivideNoise(10.0)),
    );
    assert!(
        r.epsilon_lower_bound > r.epsilon_accountant,
        "noise divided by 10 went unnoticed: {r:?}"
    );
}
