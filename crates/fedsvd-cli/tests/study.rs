//! Smoke tests of `fedsvd study`: a one-seed, two-round grid on a tiny
//! random BERT (MiniLM's tokenizer, hidden size 32, so a run takes about a
//! second) is run, kept as small result files and analysed; then the
//! analysis is rebuilt from those files alone. The study's real grid is not
//! part of CI.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fedsvd_model::testing::{tiny_config_with_minilm_vocab, write_random_model};
use serde_json::{Value, json};

/// A random BERT of hidden size 32 with MiniLM's vocabulary and tokenizer.
fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny-bert");
    let tokenizer = fedsvd_data::assets::default_dir()
        .join("models")
        .join(fedsvd_model::MINILM_DIR)
        .join("tokenizer.json");
    write_random_model(&model, &tiny_config_with_minilm_vocab(), &tokenizer).unwrap();
    model
}

/// A study on the tiny model: quick preset, small data, `rounds` rounds,
/// evaluated every round.
fn write_study(
    dir: &Path,
    methods: &[&str],
    epsilons: Value,
    seeds: &[u64],
    rounds: usize,
) -> PathBuf {
    let model = tiny_model(dir);
    let study = json!({
        "name": "smoke",
        "question": "Smoke test?",
        "preset": "quick",
        "set": [
            format!("model.dir={:?}", model.display().to_string()),
            "model.max_len=32",
            "data.train_examples=160",
            "data.test_examples=60",
            "data.clients=4",
            "data.min_examples_per_client=8",
            format!("federation.rounds={rounds}"),
            "federation.clients_per_round=2",
            "federation.eval_every=1",
            "federation.training.local_steps=2",
            "federation.training.batch_size=16",
            "federation.training.physical_batch_size=16"
        ],
        "methods": methods,
        "epsilons": epsilons,
        "seeds": seeds,
        "reference": "fedsvd",
        "results": "results/smoke",
        "table": "results/smoke.csv",
        "markdown": "docs/results.md",
        "plot": "docs/img/smoke.svg",
        "probe": "results/probe.json"
    });
    let path = dir.join("smoke.json");
    fs::write(&path, serde_json::to_string_pretty(&study).unwrap()).unwrap();
    path
}

fn study(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_fedsvd"))
        .current_dir(dir)
        .arg("study")
        .arg("smoke.json")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fedsvd study failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json_file(path: &Path) -> Value {
    serde_json::from_str(
        &fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

fn metrics(dir: &Path) -> Vec<Value> {
    fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn sampled(dir: &Path) -> Vec<Value> {
    metrics(dir)
        .iter()
        .map(|m| m["sampled_clients"].clone())
        .collect()
}

/// The CSV as records of (column → value).
fn read_csv(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let text = fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    lines
        .map(|l| {
            header
                .iter()
                .cloned()
                .zip(l.split(',').map(String::from))
                .collect()
        })
        .collect()
}

#[test]
fn one_seed_two_rounds_runs_keeps_small_files_and_analyses_paired_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_study(
        dir,
        &["fedsvd", "ffa", "fedavg"],
        json!([6, "inf"]),
        &[1],
        2,
    );
    study(dir, &["--run", "--quiet", "--machine", "smoke machine"]);

    let results = dir.join("results/smoke");
    let names = [
        "fedsvd-eps6-seed1",
        "ffa-eps6-seed1",
        "fedavg-eps6-seed1",
        "fedsvd-epsinf-seed1",
        "ffa-epsinf-seed1",
        "fedavg-epsinf-seed1",
    ];
    let mut kept: Vec<String> = fs::read_dir(&results)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(kept, want, "result folders");
    for name in names {
        let run = results.join(name);
        let mut files: Vec<String> = fs::read_dir(&run)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        // Small files only: no checkpoint, no exported model.
        assert_eq!(
            files,
            [
                "config.json",
                "data.json",
                "metrics.jsonl",
                "record.json",
                "summary.json"
            ],
            "{name}"
        );
        let m = metrics(&run);
        assert_eq!(m.len(), 2, "{name}: two rounds");
        let summary = json_file(&run.join("summary.json"));
        assert_eq!(summary["endpoint_rounds"], json!([1, 2]), "{name}");
        let mean = (m[0]["eval_accuracy"].as_f64().unwrap()
            + m[1]["eval_accuracy"].as_f64().unwrap())
            / 2.0;
        assert!(
            (summary["endpoint_accuracy"].as_f64().unwrap() - mean).abs() < 1e-12,
            "{name}"
        );
        let config = json_file(&run.join("config.json"));
        assert_eq!(config["data"]["seed"], json!(1), "{name}");
        assert_eq!(config["federation"]["seed"], json!(1), "{name}");
        assert_eq!(
            json_file(&run.join("record.json"))["machine"],
            "smoke machine"
        );
    }
    // The scratch folders (checkpoints) are gone once a run is kept.
    let work = dir.join("runs/study-smoke");
    assert!(
        !work.exists() || fs::read_dir(&work).unwrap().next().is_none(),
        "scratch runs left behind"
    );

    // Paired by seed: one partition and one client sampling for every
    // method and ε of the seed.
    let first = results.join(names[0]);
    let partition = json_file(&first.join("data.json"))["partition"].clone();
    assert!(partition.is_object() || partition.is_array(), "{partition}");
    for name in &names[1..] {
        let run = results.join(name);
        assert_eq!(
            json_file(&run.join("data.json"))["partition"],
            partition,
            "{name}"
        );
        assert_eq!(sampled(&run), sampled(&first), "{name}");
    }

    // The analysis: the paired table, the CSV, the plot.
    let md = fs::read_to_string(dir.join("docs/results.md")).unwrap();
    for text in [
        "All 6 runs finished.",
        "Pairing checked",
        "## The answer: paired differences",
        "| 6 | FedSVD − FFA-LoRA | 1 (1) |",
        "| ∞ | FedSVD − FedAvg-LoRA | 1 (1) |",
        "one paired seed: no interval",
        "![Held-out accuracy against round",
        "(img/smoke.svg)",
        "smoke machine (6 runs)",
        "Not measured yet",
    ] {
        assert!(md.contains(text), "results.md lacks {text:?}:\n{md}");
    }
    assert!(!md.contains("pending"), "{md}");
    let svg = fs::read_to_string(dir.join("docs/img/smoke.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("FedSVD") && svg.contains("FFA-LoRA"));
    let rows = read_csv(&dir.join("results/smoke.csv"));
    assert_eq!(rows.len(), 4);
    let endpoint = |name: &str| {
        json_file(&results.join(name).join("summary.json"))["endpoint_accuracy"]
            .as_f64()
            .unwrap()
    };
    let row = rows
        .iter()
        .find(|r| r["epsilon"] == "6" && r["other"] == "ffa")
        .unwrap();
    let diff: f64 = row["endpoint_difference_mean"].parse().unwrap();
    assert!(
        (diff - (endpoint("fedsvd-eps6-seed1") - endpoint("ffa-eps6-seed1"))).abs() < 1e-12,
        "{row:?}"
    );
    assert_eq!(row["n"], "1");

    // Rebuilding from the kept files alone gives the same bytes; --run
    // with nothing missing runs nothing.
    let md_before = fs::read(dir.join("docs/results.md")).unwrap();
    let csv_before = fs::read(dir.join("results/smoke.csv")).unwrap();
    let record_before = fs::read(results.join(names[0]).join("record.json")).unwrap();
    study(dir, &[]);
    assert_eq!(fs::read(dir.join("docs/results.md")).unwrap(), md_before);
    assert_eq!(fs::read(dir.join("results/smoke.csv")).unwrap(), csv_before);
    let again = study(dir, &["--run"]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("6 of 6 runs finished, 0 to run"),
        "{stderr}"
    );
    assert_eq!(
        fs::read(results.join(names[0]).join("record.json")).unwrap(),
        record_before
    );
    assert_eq!(fs::read(dir.join("docs/results.md")).unwrap(), md_before);
}

#[test]
fn seeds_draw_their_own_partitions_and_a_grid_spreads_over_calls() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_study(dir, &["fedsvd", "ffa"], json!(["inf"]), &[1, 2], 1);

    // One run now: the page says pending and gives no answer.
    study(dir, &["--run", "--quiet", "--max-runs", "1"]);
    let results = dir.join("results/smoke");
    assert!(results.join("fedsvd-epsinf-seed1/summary.json").is_file());
    assert!(!results.join("ffa-epsinf-seed1").exists());
    let md = fs::read_to_string(dir.join("docs/results.md")).unwrap();
    assert!(
        md.contains("The grid is pending: 1 of 4 runs have finished"),
        "{md}"
    );
    assert!(md.contains("| ∞ | FedSVD − FFA-LoRA | 0 () |"), "{md}");

    // The rest later.
    study(dir, &["--run", "--quiet"]);
    let partition =
        |name: &str| json_file(&results.join(name).join("data.json"))["partition"].clone();
    assert_eq!(
        partition("fedsvd-epsinf-seed1"),
        partition("ffa-epsinf-seed1")
    );
    assert_eq!(
        partition("fedsvd-epsinf-seed2"),
        partition("ffa-epsinf-seed2")
    );
    assert_ne!(
        partition("fedsvd-epsinf-seed1"),
        partition("fedsvd-epsinf-seed2"),
        "each seed draws its own partition"
    );
    let md = fs::read_to_string(dir.join("docs/results.md")).unwrap();
    assert!(md.contains("All 4 runs finished."), "{md}");
    // Two paired seeds give an interval.
    let row = md
        .lines()
        .find(|l| l.starts_with("| ∞ | FedSVD − FFA-LoRA | 2 (1, 2) |"))
        .unwrap_or_else(|| panic!("{md}"));
    assert!(row.contains(" to "), "{row}");

    // An edited study no longer matches its results: refused, naming the key.
    let path = dir.join("smoke.json");
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace("data.train_examples=160", "data.train_examples=150");
    fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fedsvd"))
        .current_dir(dir)
        .args(["study", "smoke.json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("data.train_examples: 160 in the folder, 150 wanted"),
        "{stderr}"
    );
}

/// `fedsvd probe --runs`: the Gauss–Newton conditioning of every module at
/// the end of a FedSVD and an FFA-LoRA run on the tiny model, written as
/// JSON and reported by the study's page.
#[test]
fn gauss_newton_probe_reads_run_folders_without_writing_into_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = tiny_model(dir);
    let mut runs = Vec::new();
    for method in ["fedsvd", "ffa"] {
        let out = dir.join(method);
        let status = Command::new(env!("CARGO_BIN_EXE_fedsvd"))
            .current_dir(dir)
            .args(["run", "--preset", "quick", "--method", method, "--quiet"])
            .args([
                "--set",
                &format!("model.dir={:?}", model.display().to_string()),
            ])
            .args([
                "--set",
                "model.max_len=32",
                "--set",
                "data.train_examples=160",
            ])
            .args(["--set", "data.test_examples=60", "--set", "data.clients=4"])
            .args(["--set", "data.min_examples_per_client=8"])
            .args(["--set", "federation.rounds=2", "--set", "federation.seed=3"])
            .args(["--set", "federation.training.local_steps=2"])
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        runs.push(out);
    }
    let before: Vec<Vec<u8>> = runs
        .iter()
        .map(|r| fs::read(r.join("checkpoint.json")).unwrap())
        .collect();
    let result = dir.join("gn.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fedsvd"))
        .current_dir(dir)
        .args(["probe", "--gn-examples", "40", "--machine", "smoke machine"])
        .arg("--runs")
        .arg(format!("{},{}", runs[0].display(), runs[1].display()))
        .arg("--out")
        .arg(&result)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let g = json_file(&result);
    assert_eq!(g["examples"], json!(40));
    let measured = g["runs"].as_array().unwrap();
    assert_eq!(measured.len(), 2);
    assert_eq!(measured[0]["method"], json!("fedsvd"));
    assert_eq!(measured[1]["method"], json!("ffa"));
    for run in measured {
        assert_eq!(run["rounds"], json!(2));
        let modules = run["modules"].as_array().unwrap();
        // Two layers, query and value.
        assert_eq!(modules.len(), 4);
        for m in modules {
            let kappa = m["kappa"].as_f64().unwrap();
            let kept = m["nonzero"].as_u64().unwrap();
            assert!(kappa.is_finite() && kappa >= 1.0, "{m}");
            // Two labels: at most one non-zero eigenvalue per example.
            assert!((1..=40).contains(&kept), "{m}");
            assert_eq!(m["parameters"], json!(32 * 8));
        }
    }
    // The probe only reads the run folders.
    for (r, b) in runs.iter().zip(&before) {
        assert_eq!(&fs::read(r.join("checkpoint.json")).unwrap(), b);
        assert!(!r.join("device.json.tmp").exists());
    }
    // A folder that is not a run is a clear error.
    let bad = Command::new(env!("CARGO_BIN_EXE_fedsvd"))
        .current_dir(dir)
        .args(["probe", "--runs", "no-such-run", "--out", "x.json"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("no-such-run"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// `fedsvd compare --device`: the runs compute where asked, say so in
/// their summaries, and a grid resumes on another device without being
/// taken for a different configuration.
#[test]
fn compare_runs_on_the_device_asked_for_and_resumes_on_another() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = tiny_model(dir);
    let compare = |device: &str| {
        Command::new(env!("CARGO_BIN_EXE_fedsvd"))
            .current_dir(dir)
            .args(["compare", "--preset", "quick", "--methods", "fedsvd"])
            .args(["--seeds", "1", "--epsilons", "6", "--quiet"])
            .args(["--device", device, "--out", "grid"])
            .args([
                "--set",
                &format!("model.dir={:?}", model.display().to_string()),
            ])
            .args([
                "--set",
                "model.max_len=32",
                "--set",
                "data.train_examples=160",
            ])
            .args(["--set", "data.test_examples=60", "--set", "data.clients=4"])
            .args(["--set", "data.min_examples_per_client=8"])
            .args(["--set", "federation.rounds=2"])
            .args(["--set", "federation.training.local_steps=2"])
            .output()
            .unwrap()
    };
    let first = compare("cpu");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let runs: Vec<PathBuf> = fs::read_dir(dir.join("grid/runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1);
    let summary = json_file(&runs[0].join("summary.json"));
    assert_eq!(summary["device"]["kind"], json!("cpu"), "{summary}");
    let config = json_file(&runs[0].join("config.json"));
    assert_eq!(config["model"]["device"], json!("cpu"));
    // Asked again with another device: the finished run is kept, not
    // refused as a different configuration.
    let again = compare("auto");
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(json_file(&runs[0].join("summary.json")), summary);
}
