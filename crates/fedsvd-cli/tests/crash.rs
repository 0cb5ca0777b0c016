//! Crash anywhere, lose nothing: real `fedsvd run` processes are killed
//! with SIGKILL at many instants (start-up, local training, aggregation,
//! while `metrics.jsonl` or `checkpoint.json` is written, while the model
//! is exported), resumed (and sometimes killed again), and finished. The
//! final `metrics.jsonl` (wall times aside), `checkpoint.json` and exported
//! adapter must be byte-identical to an uninterrupted seeded run.
//!
//! Most kill points use a tiny random BERT (hidden 32) that reads the real
//! MiniLM tokenizer, so a run takes seconds; one runs on the real MiniLM.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fedsvd_model::testing::{tiny_config_with_minilm_vocab, write_random_model};

fn assets() -> PathBuf {
    fedsvd_data::assets::default_dir()
}

fn minilm() -> PathBuf {
    assets().join("models").join(fedsvd_model::MINILM_DIR)
}

/// A random BERT of hidden size 32 with MiniLM's vocabulary and tokenizer.
fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny-bert");
    write_random_model(
        &model,
        &tiny_config_with_minilm_vocab(),
        &minilm().join("tokenizer.json"),
    )
    .unwrap();
    model
}

/// `fedsvd run` arguments for a seeded quick-preset run on `model`.
fn run_args(model: &Path, rounds: usize, train: usize) -> Vec<String> {
    let sets = [
        format!("model.dir={:?}", model.display().to_string()),
        "model.max_len=32".into(),
        format!("data.train_examples={train}"),
        "data.test_examples=60".into(),
        "data.clients=4".into(),
        "data.min_examples_per_client=8".into(),
        format!("federation.rounds={rounds}"),
        "federation.clients_per_round=2".into(),
        "federation.eval_every=1".into(),
        "federation.training.local_steps=2".into(),
        "federation.training.batch_size=16".into(),
        "federation.training.physical_batch_size=16".into(),
        "federation.seed=3".into(),
    ];
    let mut args = vec![
        "run".to_string(),
        "--preset".into(),
        "quick".into(),
        "--quiet".into(),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s);
    }
    args
}

fn fedsvd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fedsvd"));
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Runs to completion; panics with stderr on failure.
fn finish(mut command: Command) {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "fedsvd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `command`, kills it with SIGKILL after `after`; true when it was
/// still running (the kill landed).
fn kill_after(mut command: Command, after: Duration) -> bool {
    let mut child = command.stderr(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    while started.elapsed() < after {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
    true
}

/// The next step of an interrupted run in `dir`: resume if a run folder
/// exists, else start again.
fn continue_run(dir: &Path, args: &[String]) -> Command {
    let mut c = fedsvd();
    if dir.join("config.json").is_file() {
        c.args(["run", "--quiet", "--resume"]).arg(dir);
    } else {
        c.args(args).arg("--out").arg(dir);
    }
    c
}

/// The files that must match, by name: metrics lines without wall times,
/// the checkpoint, every exported file.
fn outcome(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let metrics = fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<String> = metrics
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["round_seconds"] = 0.into();
            v["server_seconds"] = 0.into();
            v.to_string()
        })
        .collect();
    out.insert("metrics.jsonl".into(), lines.join("\n").into_bytes());
    out.insert(
        "checkpoint.json".into(),
        fs::read(dir.join("checkpoint.json")).unwrap(),
    );
    for entry in fs::read_dir(dir.join("model")).unwrap() {
        let path = entry.unwrap().path();
        out.insert(
            format!("model/{}", path.file_name().unwrap().to_string_lossy()),
            fs::read(&path).unwrap(),
        );
    }
    out
}

fn assert_same(reference: &BTreeMap<String, Vec<u8>>, dir: &Path, what: &str) {
    let got = outcome(dir);
    assert_eq!(
        reference.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "{what}: different files"
    );
    for (name, bytes) in reference {
        if got[name] != *bytes {
            let (a, b) = (
                String::from_utf8_lossy(bytes),
                String::from_utf8_lossy(&got[name]),
            );
            let first = a
                .lines()
                .zip(b.lines())
                .find(|(x, y)| x != y)
                .map(|(x, y)| format!("\n  expected {x}\n  got      {y}"))
                .unwrap_or_else(|| {
                    format!(" ({} vs {} lines)", a.lines().count(), b.lines().count())
                });
            panic!("{what}: {name} differs from the uninterrupted run{first}");
        }
    }
}

/// Where in its life a killed run was, judged from its folder.
fn phase(dir: &Path) -> String {
    if !dir.join("config.json").is_file() {
        return "start-up (no run folder yet)".into();
    }
    let Ok(text) = fs::read_to_string(dir.join("checkpoint.json")) else {
        return "before the first checkpoint".into();
    };
    let Ok(sealed) = serde_json::from_str::<serde_json::Value>(&text) else {
        return "while checkpoint.json was written".into();
    };
    let done = sealed["checkpoint"]["next_round"].as_u64().unwrap_or(0);
    let lines = fs::read_to_string(dir.join("metrics.jsonl"))
        .map(|m| m.lines().count() as u64)
        .unwrap_or(0);
    if dir.join("summary.json").is_file() {
        "after the summary (exporting)".into()
    } else if lines > done {
        "between a round's metrics line and its checkpoint".into()
    } else {
        "inside a round (training or aggregation)".into()
    }
}

/// Kill instants spread over a whole run, from a fixed LCG (deterministic).
fn instants(count: usize, span: Duration, seed: u64) -> Vec<Duration> {
    let mut s = seed;
    (0..count)
        .map(|i| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let jitter = (s >> 11) as f64 / (1u64 << 53) as f64;
            // stratified: one instant in each of `count` slices of the run
            span.mul_f64((i as f64 + jitter) / count as f64)
        })
        .collect()
}

#[test]
fn kill_nine_at_any_instant_then_resume_gives_the_uninterrupted_run() {
    let root = tempfile::tempdir().unwrap();
    let model = tiny_model(root.path());
    let args = run_args(&model, 12, 240);

    let reference_dir = root.path().join("reference");
    let started = Instant::now();
    let mut c = fedsvd();
    c.args(&args).arg("--out").arg(&reference_dir);
    finish(c);
    let span = started.elapsed();
    let reference = outcome(&reference_dir);

    let mut landed = 0;
    let mut phases = BTreeMap::<String, usize>::new();
    // 30 instants over the first 85 % of the reference run: a later instant
    // can fall after a (faster) run has ended, and then nothing is killed.
    for (i, at) in instants(30, span.mul_f64(0.85), 11).into_iter().enumerate() {
        let dir = root.path().join(format!("killed-{i}"));
        let mut c = fedsvd();
        c.args(&args).arg("--out").arg(&dir);
        if kill_after(c, at) {
            landed += 1;
            *phases.entry(phase(&dir)).or_default() += 1;
        }
        // Every third run is killed a second time while it resumes.
        if i % 3 == 0 && kill_after(continue_run(&dir, &args), at / 2) {
            landed += 1;
            *phases.entry(phase(&dir)).or_default() += 1;
        }
        finish(continue_run(&dir, &args));
        assert_same(&reference, &dir, &format!("killed at {at:?}"));
    }
    eprintln!("{landed} kills landed over a run of {span:?}: {phases:?}");
    assert!(
        landed >= 20,
        "only {landed} kills landed before the runs ended"
    );
}

#[test]
fn kill_nine_on_the_real_minilm_then_resume_gives_the_uninterrupted_run() {
    let root = tempfile::tempdir().unwrap();
    let args = run_args(&minilm(), 3, 120);
    let reference_dir = root.path().join("reference");
    let started = Instant::now();
    let mut c = fedsvd();
    c.args(&args).arg("--out").arg(&reference_dir);
    finish(c);
    let span = started.elapsed();
    let reference = outcome(&reference_dir);

    let dir = root.path().join("killed");
    let mut c = fedsvd();
    c.args(&args).arg("--out").arg(&dir);
    // Two thirds in: past start-up, inside training.
    assert!(
        kill_after(c, span.mul_f64(0.66)),
        "the run ended before the kill"
    );
    finish(continue_run(&dir, &args));
    assert_same(&reference, &dir, "MiniLM killed at two thirds");
}
