//! Run folders on the real MiniLM and Rotten Tomatoes (fetched by the asset
//! step before the tests): outputs, bit-exact resume from disk after a
//! crash between a round's metrics line and its checkpoint, and errors.

use std::fs;
use std::path::{Path, PathBuf};

use fedsvd::runner::files;
use fedsvd::{
    AdapterConfig, BudgetRule, DataConfig, FederationConfig, Method, ModelConfig, PartitionConfig,
    PoolingConfig, PrivacyConfig, RunConfig, Runner, TrainingConfig,
};
use fedsvd_dp::AccountantKind;

fn assets() -> PathBuf {
    fedsvd_data::assets::default_dir()
}

fn small_config(method: Method) -> RunConfig {
    RunConfig {
        model: ModelConfig {
            dir: None,
            max_len: 32,
        },
        data: DataConfig {
            dataset: "rt".into(),
            file: None,
            train_examples: Some(120),
            test_examples: Some(40),
            test_fraction: 0.2,
            clients: 6,
            partition: PartitionConfig::Dirichlet { alpha: 0.5 },
            min_examples_per_client: 8,
            seed: 5,
        },
        adapters: AdapterConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.05,
            targets: vec!["query".into(), "value".into()],
            pooling: PoolingConfig::Cls,
            train_head: false,
        },
        federation: FederationConfig {
            method,
            rounds: 4,
            clients_per_round: 3,
            eval_every: 2,
            training: TrainingConfig {
                local_steps: 1,
                batch_size: 8,
                physical_batch_size: 8,
                lr: 0.5,
            },
            privacy: PrivacyConfig {
                epsilon: Some(6.0),
                delta: 1e-5,
                clip: 2.0,
                accountant: AccountantKind::Rdp,
                budget_rule: BudgetRule::Conservative,
                max_grad_norm: None,
            },
            seed: Some(11),
        },
    }
}

/// Every metrics line with its wall-clock fields zeroed.
fn comparable_metrics(dir: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(dir.join(files::METRICS))
        .unwrap()
        .lines()
        .map(|line| {
            let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
            v["round_seconds"] = 0.into();
            v["server_seconds"] = 0.into();
            v
        })
        .collect()
}

#[test]
fn resume_after_a_crash_reproduces_the_uninterrupted_run_bit_for_bit() {
    let root = tempfile::tempdir().unwrap();
    let config = small_config(Method::fedsvd());

    let straight = root.path().join("straight");
    let mut runner = Runner::create(config.clone(), &straight, &assets()).unwrap();
    let summary = runner.run_to_end(|_| {}).unwrap();
    assert_eq!(summary.completed_rounds, 4);
    assert!(
        !summary.release_ready,
        "a seeded run is not fit for release"
    );
    assert!(summary.max_epsilon_spent.unwrap() <= 6.0);
    for name in [
        files::CONFIG,
        files::DATA,
        files::METRICS,
        files::CHECKPOINT,
        files::SUMMARY,
    ] {
        assert!(straight.join(name).is_file(), "{name} missing");
    }
    let written: RunConfig =
        serde_json::from_str(&fs::read_to_string(straight.join(files::CONFIG)).unwrap()).unwrap();
    assert_eq!(written, config);

    // Two rounds, then a third whose checkpoint never lands (the process
    // "dies" after appending the metrics line), then resume.
    let interrupted = root.path().join("interrupted");
    let mut runner = Runner::create(config.clone(), &interrupted, &assets()).unwrap();
    runner.run_round().unwrap();
    runner.run_round().unwrap();
    let checkpoint_after_two = fs::read(interrupted.join(files::CHECKPOINT)).unwrap();
    runner.run_round().unwrap();
    drop(runner);
    fs::write(interrupted.join(files::CHECKPOINT), checkpoint_after_two).unwrap();
    assert_eq!(comparable_metrics(&interrupted).len(), 3);

    let mut resumed = Runner::resume(&interrupted, &assets()).unwrap();
    assert_eq!(resumed.history().len(), 2);
    resumed.run_to_end(|_| {}).unwrap();

    assert_eq!(
        comparable_metrics(&straight),
        comparable_metrics(&interrupted)
    );
    assert_eq!(
        fs::read(straight.join(files::CHECKPOINT)).unwrap(),
        fs::read(interrupted.join(files::CHECKPOINT)).unwrap(),
        "final adapter state, ledgers and round counter are identical"
    );
    // The metrics say something: accuracy is evaluated on rounds 2 and 4.
    let m = comparable_metrics(&straight);
    assert!(m[0]["eval_accuracy"].is_null() && m[1]["eval_accuracy"].is_number());
    assert!(m[3]["eval_accuracy"].as_f64().unwrap() > 0.0);
}

#[test]
fn merging_methods_resume_with_their_merged_weights() {
    // FLoRA's state lives partly in the base-weight deltas: a resume that
    // forgot to rebuild W0 + Δ would evaluate a different model.
    let root = tempfile::tempdir().unwrap();
    let mut config = small_config(Method::Flora);
    config.federation.rounds = 3;
    config.federation.eval_every = 1;
    let straight = root.path().join("straight");
    Runner::create(config.clone(), &straight, &assets())
        .unwrap()
        .run_to_end(|_| {})
        .unwrap();
    let interrupted = root.path().join("interrupted");
    Runner::create(config, &interrupted, &assets())
        .unwrap()
        .run_round()
        .unwrap();
    Runner::resume(&interrupted, &assets())
        .unwrap()
        .run_to_end(|_| {})
        .unwrap();
    assert_eq!(
        comparable_metrics(&straight),
        comparable_metrics(&interrupted)
    );
}

#[test]
fn run_folders_refuse_reuse_and_report_corruption() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run");
    let config = small_config(Method::Ffa);
    let mut runner = Runner::create(config.clone(), &dir, &assets()).unwrap();
    runner.run_round().unwrap();
    drop(runner);

    let err = Runner::create(config.clone(), &dir, &assets()).unwrap_err();
    assert!(err.to_string().contains("already holds a run"), "{err}");

    let err = Runner::resume(&root.path().join("nothing"), &assets()).unwrap_err();
    assert!(err.to_string().contains("holds no run"), "{err}");

    // The summary of an unfinished run is refused.
    let runner = Runner::resume(&dir, &assets()).unwrap();
    let err = runner.finish().unwrap_err();
    assert!(err.to_string().contains("1 of 4 rounds"), "{err}");

    // A torn metrics file names the file and line.
    let metrics = dir.join(files::METRICS);
    let mut text = fs::read_to_string(&metrics).unwrap();
    text.push_str("{\"round\": 2, \"method\": \n");
    fs::write(&metrics, text).unwrap();
    let err = Runner::resume(&dir, &assets()).unwrap_err();
    assert!(err.to_string().contains("metrics.jsonl:2"), "{err}");

    // A config that cannot run is refused before anything is written.
    let mut bad = config;
    bad.federation.clients_per_round = 7;
    let fresh = root.path().join("fresh");
    let err = Runner::create(bad, &fresh, &assets()).unwrap_err();
    assert!(err.to_string().contains("clients_per_round"), "{err}");
    assert!(!fresh.exists());
}
