//! `fedsvd report` on run folders written here: the confidence intervals,
//! the grouping by ε and method, skipped and malformed runs, and the files
//! it writes (valid PNG and SVG).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

/// One run folder's contents, as the runner writes them.
struct FakeRun<'a> {
    method: &'a str,
    epsilon: Option<f64>,
    seed: u64,
    final_accuracy: f64,
    /// eval accuracy per round (`None`: not evaluated that round).
    curve: &'a [Option<f64>],
}

impl FakeRun<'_> {
    fn write(&self, dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        let eps = self.epsilon.map_or("null".to_string(), |e| format!("{e}"));
        let rounds = self.curve.len();
        fs::write(
            dir.join("config.json"),
            "{\"note\": \"not read by the report\"}",
        )
        .unwrap();
        let mut metrics = String::new();
        for (i, acc) in self.curve.iter().enumerate() {
            let acc = acc.map_or("null".to_string(), |a| format!("{a}"));
            metrics.push_str(&format!(
                "{{\"round\": {}, \"method\": \"{}\", \"sampled_clients\": [0, 3, 5], \
                 \"trained_clients\": [0, 3, 5], \"budget_exhausted_clients\": [], \
                 \"train_loss\": 0.69, \"eval_accuracy\": {acc}, \"eval_loss\": null, \
                 \"max_epsilon\": 1.2, \"client_epsilon\": [1.2, 0.0, 1.1], \
                 \"bytes_uploaded\": 36864, \"server_seconds\": 0.0004, \
                 \"round_seconds\": 12.3, \"refactorized\": true, \"future_field\": 1}}\n",
                i + 1,
                self.method
            ));
        }
        fs::write(dir.join("metrics.jsonl"), metrics).unwrap();
        let summary = format!(
            "{{\n  \"method\": \"{}\",\n  \"epsilon\": {eps},\n  \"delta\": 1e-5,\n  \"seed\": {},\n  \
             \"rounds\": {rounds},\n  \"completed_rounds\": {rounds},\n  \"final_accuracy\": {},\n  \
             \"final_loss\": 0.58,\n  \"majority_accuracy\": 0.5,\n  \"max_epsilon_spent\": {},\n  \
             \"mean_bytes_uploaded_per_round\": 73728.0,\n  \"mean_server_seconds\": 0.0004,\n  \
             \"wall_seconds\": 612.3,\n  \"dataset\": \"rt\"\n}}\n",
            self.method,
            self.seed,
            self.final_accuracy,
            self.epsilon
                .map_or("null".to_string(), |e| format!("{}", e * 0.99)),
        );
        fs::write(dir.join("summary.json"), summary).unwrap();
    }
}

fn fedsvd(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedsvd"))
        .args(args)
        .output()
        .expect("the fedsvd binary runs")
}

fn report(dirs: &[PathBuf], out: &Path) -> Output {
    let mut args: Vec<&std::ffi::OsStr> = vec!["report".as_ref()];
    args.extend(dirs.iter().map(|d| d.as_os_str()));
    args.push("--out".as_ref());
    args.push(out.as_os_str());
    fedsvd(&args)
}

fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "fedsvd report failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
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

fn num(row: &std::collections::HashMap<String, String>, key: &str) -> f64 {
    row[key]
        .parse()
        .unwrap_or_else(|_| panic!("{key} = {:?} is not a number", row[key]))
}

#[test]
fn ci_half_width_is_the_student_t_interval_of_the_seeds() {
    let tmp = TempDir::new().unwrap();
    let accs = [0.70, 0.72, 0.77];
    let mut dirs = Vec::new();
    for (i, acc) in accs.iter().enumerate() {
        let dir = tmp.path().join(format!("fedsvd-eps6-seed{}", i + 1));
        FakeRun {
            method: "fedsvd",
            epsilon: Some(6.0),
            seed: i as u64 + 1,
            final_accuracy: *acc,
            curve: &[Some(0.6), Some(*acc)],
        }
        .write(&dir);
        dirs.push(dir);
    }
    let out = tmp.path().join("report");
    let output = report(&dirs, &out);
    assert_ok(&output);

    // By hand: mean 0.73, deviations −0.03, −0.01, 0.04, s² = 0.0026 / 2,
    // half-width = t(0.975, 2) · s / √3 with t(0.975, 2) = 4.302652729911275
    // (statistics tables; closed form 2√(0.95² / (1 − 0.95²)) / √2).
    let t = 4.302_652_729_911_275;
    let s = (0.0026f64 / 2.0).sqrt();
    let half = t * s / 3f64.sqrt();
    assert!((half - 0.089_565).abs() < 1e-5, "hand computation {half}");

    let rows = read_csv(&out.join("results.csv"));
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row["method"], "fedsvd");
    assert_eq!(row["epsilon"], "6");
    assert_eq!(row["n"], "3");
    assert_eq!(row["seeds"], "1;2;3");
    assert!((num(row, "final_accuracy_mean") - 0.73).abs() < 1e-12);
    assert!((num(row, "ci95_half_width") - half).abs() < 1e-9);
    assert!((num(row, "ci95_low") - (0.73 - half)).abs() < 1e-9);
    assert!((num(row, "ci95_high") - (0.73 + half)).abs() < 1e-9);
    assert!((num(row, "majority_accuracy") - 0.5).abs() < 1e-12);
    assert!((num(row, "bytes_uploaded_per_round") - 73728.0).abs() < 1e-9);

    let md = fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("| FedSVD | 3 (1, 2, 3) | 73.00 ± 8.96 |"),
        "results.md:\n{md}"
    );
}

#[test]
fn runs_are_grouped_by_epsilon_and_method_with_infinity_last() {
    let tmp = TempDir::new().unwrap();
    let runs = tmp.path().join("compare").join("runs");
    let grid = [
        ("ffa", None, 1, 0.81),
        ("fedsvd", Some(6.0), 1, 0.74),
        ("fedsvd", Some(6.0), 2, 0.76),
        ("ffa", Some(6.0), 1, 0.70),
        ("fedsvd", Some(3.0), 1, 0.69),
        ("fedsvd", None, 1, 0.83),
        ("fedsvd", None, 2, 0.85),
    ];
    for (method, epsilon, seed, acc) in grid {
        let name = format!(
            "{method}-{}-{seed}",
            epsilon.map_or("inf".into(), |e: f64| e.to_string())
        );
        FakeRun {
            method,
            epsilon,
            seed,
            final_accuracy: acc,
            curve: &[None, Some(acc - 0.05), Some(acc)],
        }
        .write(&runs.join(name));
    }
    // The compare folder is expanded to its runs/*, and without --out the
    // report goes into the compare folder itself.
    let compare = tmp.path().join("compare");
    let output = fedsvd(&["report".as_ref(), compare.as_os_str()]);
    assert_ok(&output);

    let rows = read_csv(&compare.join("results.csv"));
    let cells: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r["epsilon"].clone(), r["method"].clone(), r["n"].clone()))
        .collect();
    let want = [
        ("3", "fedsvd", "1"),
        ("6", "fedsvd", "2"),
        ("6", "ffa", "1"),
        ("inf", "fedsvd", "2"),
        ("inf", "ffa", "1"),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(cells, want);
    assert!((num(&rows[1], "final_accuracy_mean") - 0.75).abs() < 1e-12);
    assert!((num(&rows[3], "final_accuracy_mean") - 0.84).abs() < 1e-12);
    // n = 1: no interval.
    assert_eq!(rows[0]["ci95_half_width"], "");
    assert_eq!(rows[4]["max_epsilon_spent"], "");

    let md = fs::read_to_string(compare.join("results.md")).unwrap();
    let h3 = md.find("## ε = 3,").expect("ε = 3 section");
    let h6 = md.find("## ε = 6,").expect("ε = 6 section");
    let hinf = md.find("## ε = ∞").expect("ε = ∞ section");
    assert!(h3 < h6 && h6 < hinf, "sections out of order:\n{md}");
    assert!(md.contains("| FFA-LoRA | 1 (1) | 81.00 (n=1) |"), "{md}");
    assert!(md.contains("7 finished runs"), "{md}");
}

#[test]
fn unfinished_runs_are_skipped_with_a_warning() {
    let tmp = TempDir::new().unwrap();
    let done = tmp.path().join("done");
    FakeRun {
        method: "fedavg",
        epsilon: Some(3.0),
        seed: 7,
        final_accuracy: 0.66,
        curve: &[Some(0.6), Some(0.66)],
    }
    .write(&done);
    let unfinished = tmp.path().join("still-running");
    FakeRun {
        method: "fedavg",
        epsilon: Some(3.0),
        seed: 8,
        final_accuracy: 0.1,
        curve: &[Some(0.1)],
    }
    .write(&unfinished);
    fs::remove_file(unfinished.join("summary.json")).unwrap();

    let out = tmp.path().join("out");
    let output = report(&[done, unfinished.clone()], &out);
    assert_ok(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("warning") && stderr.contains("still-running"),
        "stderr: {stderr}"
    );
    let rows = read_csv(&out.join("results.csv"));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["n"], "1");
    assert!((num(&rows[0], "final_accuracy_mean") - 0.66).abs() < 1e-12);
    let md = fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("1 unfinished run folder skipped"), "{md}");
    assert!(md.contains("still-running"), "{md}");
}

#[test]
fn only_unfinished_runs_is_an_error() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("r");
    FakeRun {
        method: "fedsvd",
        epsilon: None,
        seed: 1,
        final_accuracy: 0.5,
        curve: &[Some(0.5)],
    }
    .write(&dir);
    fs::remove_file(dir.join("summary.json")).unwrap();
    let output = report(&[dir], &tmp.path().join("out"));
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no finished runs"));
    assert!(!tmp.path().join("out").join("results.md").exists());
}

#[test]
fn malformed_metrics_line_is_reported_with_file_and_line() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("run");
    FakeRun {
        method: "fedsvd",
        epsilon: Some(6.0),
        seed: 1,
        final_accuracy: 0.7,
        curve: &[Some(0.6), Some(0.65), Some(0.7)],
    }
    .write(&dir);
    let metrics = dir.join("metrics.jsonl");
    let text = fs::read_to_string(&metrics).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[2] = "{\"round\": 3, \"eval_accuracy\": 0.7,";
    fs::write(&metrics, lines.join("\n")).unwrap();

    let output = report(&[dir], &tmp.path().join("out"));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let want = format!("{}:3:", metrics.display());
    assert!(stderr.contains(&want), "want {want} in: {stderr}");
}

#[test]
fn malformed_summary_names_the_file() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("run");
    FakeRun {
        method: "fedsvd",
        epsilon: Some(6.0),
        seed: 1,
        final_accuracy: 0.7,
        curve: &[Some(0.7)],
    }
    .write(&dir);
    // A summary without its ε key must not pass as a non-private run.
    let summary = dir.join("summary.json");
    let text = fs::read_to_string(&summary).unwrap();
    fs::write(&summary, text.replace("\"epsilon\": 6,", "")).unwrap();
    let output = report(&[dir], &tmp.path().join("out"));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("summary.json") && stderr.contains("epsilon"),
        "{stderr}"
    );
}

/// Reads the PNG signature and IHDR chunk by hand, then decodes the image.
fn check_png(path: &Path, width: u32, height: u32) -> Vec<u8> {
    let bytes = fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR", "first chunk is IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((w, h), (width, height));

    let decoder = png::Decoder::new(fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (width, height));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    buf
}

/// A minimal well-formedness check: one root `<svg>` element, every tag
/// closed in order.
fn check_svg(text: &str) {
    let body = text
        .trim_start()
        .strip_prefix("<?xml")
        .map_or(text.trim_start(), |rest| {
            &rest[rest.find("?>").expect("XML declaration ends") + 2..]
        })
        .trim();
    assert!(body.starts_with("<svg"), "root element is <svg");
    let mut stack: Vec<String> = Vec::new();
    let mut rest = body;
    let mut roots = 0;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').expect("tag ends") + start;
        let tag = &rest[start + 1..end];
        rest = &rest[end + 1..];
        if tag.starts_with('!') || tag.starts_with('?') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name.trim()), "closing tag");
        } else {
            if stack.is_empty() {
                roots += 1;
            }
            if !tag.ends_with('/') {
                let name = tag.split_whitespace().next().unwrap();
                stack.push(name.to_string());
            }
        }
    }
    assert!(stack.is_empty(), "unclosed tags: {stack:?}");
    assert_eq!(roots, 1, "one root element");
    assert!(rest.trim().is_empty(), "text after the root");
}

#[test]
fn plots_are_valid_png_and_svg_with_one_panel_per_epsilon() {
    let tmp = TempDir::new().unwrap();
    let mut dirs = Vec::new();
    for (method, epsilon) in [("fedsvd", Some(6.0)), ("ffa", Some(6.0)), ("fedsvd", None)] {
        for seed in 1..=2u64 {
            let dir = tmp.path().join(format!("{method}-{epsilon:?}-{seed}"));
            let base = if method == "fedsvd" { 0.7 } else { 0.6 };
            let jitter = 0.01 * seed as f64;
            FakeRun {
                method,
                epsilon,
                seed,
                final_accuracy: base + jitter,
                curve: &[
                    Some(0.5 + jitter),
                    None,
                    Some(base - 0.05 + jitter),
                    Some(base + jitter),
                ],
            }
            .write(&dir);
            dirs.push(dir);
        }
    }
    let out = tmp.path().join("out");
    let output = report(&dirs, &out);
    assert_ok(&output);

    // Two ε values: two 640 × 460 panels side by side.
    let pixels = check_png(&out.join("accuracy.png"), 1280, 460);
    // FedSVD's fixed colour (214, 39, 40) is drawn: its line is there.
    let fedsvd_pixels = pixels
        .chunks_exact(3)
        .filter(|p| p == &[214, 39, 40])
        .count();
    assert!(
        fedsvd_pixels > 100,
        "{fedsvd_pixels} FedSVD-coloured pixels"
    );
    // Text was rendered (the embedded font works): the PNG is far from
    // two colours only.
    let distinct: std::collections::BTreeSet<&[u8]> = pixels.chunks_exact(3).collect();
    assert!(distinct.len() > 20, "{} distinct colours", distinct.len());

    let svg = fs::read_to_string(out.join("accuracy.svg")).unwrap();
    check_svg(&svg);
    for text in [
        "FedSVD",
        "FFA-LoRA",
        "ε = ∞ (non-private)",
        "ε = 6",
        "round",
        "eval accuracy",
    ] {
        assert!(svg.contains(text), "the SVG lacks {text:?}");
    }
}

#[test]
fn help_explains_every_option_and_its_default() {
    let output = fedsvd(&["report".as_ref(), "--help".as_ref()]);
    assert_ok(&output);
    let help = String::from_utf8_lossy(&output.stdout);
    for text in ["RUN_DIR", "--out", "Default:", "summary.json", "Student-t"] {
        assert!(help.contains(text), "help lacks {text:?}:\n{help}");
    }
}
