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
            device: Default::default(),
            precision: Default::default(),
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
                report_unprotected: true,
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
    // The metrics say something: with 4 rounds, all of them lie in the
    // endpoint window, so every round is evaluated despite eval_every = 2.
    let m = comparable_metrics(&straight);
    assert!(m.iter().all(|r| r["eval_accuracy"].as_f64().unwrap() > 0.0));
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

    // A line torn by a crash past the checkpoint is dropped: that round
    // runs again.
    let metrics = dir.join(files::METRICS);
    let whole = fs::read_to_string(&metrics).unwrap();
    fs::write(&metrics, format!("{whole}{{\"round\": 2, \"method\": ")).unwrap();
    let resumed = Runner::resume(&dir, &assets()).unwrap();
    assert_eq!(resumed.history().len(), 1);
    assert_eq!(fs::read_to_string(&metrics).unwrap(), whole);
    drop(resumed);

    // A damaged line the checkpoint covers names the file and line.
    fs::write(&metrics, whole.replacen("\"round\"", "\"round", 1)).unwrap();
    let err = Runner::resume(&dir, &assets()).unwrap_err();
    assert!(err.to_string().contains("metrics.jsonl:1"), "{err}");
    fs::write(&metrics, &whole).unwrap();

    // An edited or torn checkpoint is refused, naming the file, and the
    // refusal overwrites nothing.
    let checkpoint = dir.join(files::CHECKPOINT);
    let sealed = fs::read_to_string(&checkpoint).unwrap();
    let edited = sealed.replacen("\"next_round\": 1", "\"next_round\": 2", 1);
    assert_ne!(
        edited, sealed,
        "the checkpoint's layout changed; fix the test"
    );
    for bad in [edited, sealed[..sealed.len() / 2].to_string()] {
        fs::write(&checkpoint, &bad).unwrap();
        let err = Runner::resume(&dir, &assets()).unwrap_err().to_string();
        assert!(err.contains("checkpoint.json"), "{err}");
        assert_eq!(fs::read_to_string(&checkpoint).unwrap(), bad);
        assert_eq!(fs::read_to_string(&metrics).unwrap(), whole);
    }
    fs::write(&checkpoint, &sealed).unwrap();

    // A config that cannot run is refused before anything is written.
    let mut bad = config;
    bad.federation.clients_per_round = 7;
    let fresh = root.path().join("fresh");
    let err = Runner::create(bad, &fresh, &assets()).unwrap_err();
    assert!(err.to_string().contains("clients_per_round"), "{err}");
    assert!(!fresh.exists());
}

/// Every key of every JSON object in `value`, dotted.
fn keys(value: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    if let serde_json::Value::Object(map) = value {
        for (k, v) in map {
            let key = format!("{prefix}{k}");
            keys(v, &format!("{key}."), out);
            out.push(key);
        }
    }
}

#[test]
fn withheld_statistics_appear_in_no_output_and_only_private_unseeded_runs_are_release_ready() {
    let root = tempfile::tempdir().unwrap();
    let mut config = small_config(Method::Ffa);
    config.federation.rounds = 2;
    config.federation.privacy.report_unprotected = false;
    let dir = root.path().join("withheld");
    let summary = Runner::create(config.clone(), &dir, &assets())
        .unwrap()
        .run_to_end(|_| {})
        .unwrap();
    // Seeded: reproducible, so not fit for release.
    assert!(!summary.release_ready);
    assert!(!summary.unprotected_reported);

    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&fs::read_to_string(dir.join(name)).unwrap()).unwrap()
    };
    let mut found = Vec::new();
    keys(&read(files::DATA), "data.", &mut found);
    keys(&read(files::SUMMARY), "summary.", &mut found);
    for line in fs::read_to_string(dir.join(files::METRICS))
        .unwrap()
        .lines()
    {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        keys(&m, "metrics.", &mut found);
        assert!(m["train_loss"].is_null(), "{m}");
        assert!(m["client_epsilon"].as_array().unwrap().is_empty(), "{m}");
    }
    for unprotected in [
        "data.partition",
        "data.client_examples",
        "data.load_report",
        "metrics.round_seconds",
    ] {
        assert!(
            !found.iter().any(|k| k == unprotected),
            "{unprotected} was written"
        );
    }
    let summary_json = read(files::SUMMARY);
    assert!(summary_json["wall_seconds"].is_null());
    assert!(
        summary_json["noise_multipliers"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // The majority bar comes from the held-out split itself.
    let share = summary_json["majority_accuracy"].as_f64().unwrap();
    assert!((0.5..=1.0).contains(&share), "{share}");

    // The same run reporting everything writes those fields.
    let mut open = config.clone();
    open.federation.privacy.report_unprotected = true;
    let dir2 = root.path().join("reported");
    Runner::create(open, &dir2, &assets())
        .unwrap()
        .run_to_end(|_| {})
        .unwrap();
    let data: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir2.join(files::DATA)).unwrap()).unwrap();
    assert!(data["client_examples"].is_array());

    // Non-private runs are never release ready, even unseeded.
    let mut plain = config;
    plain.federation.privacy.epsilon = None;
    plain.federation.seed = None;
    let summary = Runner::create(plain, &root.path().join("plain"), &assets())
        .unwrap()
        .run_to_end(|_| {})
        .unwrap();
    assert!(!summary.release_ready);
}

#[test]
fn a_full_disk_names_the_file_and_keeps_the_last_checkpoint() {
    // /dev/full fails every write with ENOSPC, as a full disk does; the run
    // folder's files are pointed at it one at a time.
    if !Path::new("/dev/full").exists() {
        panic!("this test needs /dev/full (Linux)");
    }
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run");
    let mut runner = Runner::create(small_config(Method::Ffa), &dir, &assets()).unwrap();
    runner.run_round().unwrap();
    let checkpoint = dir.join(files::CHECKPOINT);
    let saved = fs::read(&checkpoint).unwrap();

    // The checkpoint's replacement cannot be written.
    std::os::unix::fs::symlink("/dev/full", dir.join("checkpoint.json.tmp")).unwrap();
    let err = runner.run_round().unwrap_err().to_string();
    assert!(
        err.contains("checkpoint.json") && err.contains("space"),
        "{err}"
    );
    assert_eq!(
        fs::read(&checkpoint).unwrap(),
        saved,
        "the last checkpoint changed"
    );
    drop(runner);

    // The metrics line cannot be appended.
    let mut runner = Runner::resume(&dir, &assets()).unwrap();
    let metrics = dir.join(files::METRICS);
    let lines = fs::read(&metrics).unwrap();
    fs::remove_file(&metrics).unwrap();
    std::os::unix::fs::symlink("/dev/full", &metrics).unwrap();
    let err = runner.run_round().unwrap_err().to_string();
    assert!(
        err.contains("metrics.jsonl") && err.contains("space"),
        "{err}"
    );
    assert_eq!(
        fs::read(&checkpoint).unwrap(),
        saved,
        "the last checkpoint changed"
    );
    drop(runner);

    // With space again the run resumes from the checkpoint it kept.
    fs::remove_file(&metrics).unwrap();
    fs::write(&metrics, lines).unwrap();
    let resumed = Runner::resume(&dir, &assets()).unwrap();
    assert_eq!(resumed.history().len(), 1);
}
