//! The `fedsvd` binary's error output: a clear message, a non-zero exit,
//! and every clause said once (an error whose text already holds its
//! cause's text must not print the cause again).

use std::path::Path;
use std::process::Command;

/// Runs `fedsvd` with `args`; returns its stderr, asserting failure.
fn fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fedsvd"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "fedsvd {args:?} succeeded; stderr: {stderr}"
    );
    stderr
}

/// The `error:` line of `stderr`, checked for repeated clauses.
fn error_line(stderr: &str) -> String {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in: {stderr}"))
        .to_string();
    let clauses: Vec<&str> = line.split(": ").map(str::trim).collect();
    for (i, a) in clauses.iter().enumerate() {
        for b in &clauses[i + 1..] {
            assert!(
                a.len() < 12 || a != b,
                "the clause {a:?} is repeated in: {line}"
            );
        }
    }
    line
}

fn file_run(dir: &Path, csv: &str, extra: &[&str]) -> String {
    let path = dir.join("bad.csv");
    std::fs::write(&path, csv).unwrap();
    let file = format!(
        "data.file={{\"path\": {:?}, \"text_column\": \"text\", \"pair_column\": null, \
         \"label_column\": \"label\", \"skip_malformed\": false}}",
        path.display().to_string()
    );
    let out = dir.join("run").display().to_string();
    let mut args = vec![
        "run",
        "--preset",
        "quick",
        "--quiet",
        "--set",
        "data.dataset=file",
        "--set",
        &file,
        "--out",
        &out,
    ];
    for e in extra {
        args.push("--set");
        args.push(e);
    }
    error_line(&fails(&args))
}

#[test]
fn privacy_errors_say_each_clause_once_and_reject_a_zero_target() {
    let common = ["--sample-rate", "0.1", "--steps", "60", "--delta", "1e-5"];
    let zero = error_line(&fails(
        &[&["privacy", "noise", "--epsilon", "0"][..], &common].concat(),
    ));
    assert!(zero.contains("> 0"), "{zero}");
    let impossible = error_line(&fails(
        &[&["privacy", "noise", "--epsilon", "0.00001"][..], &common].concat(),
    ));
    assert!(impossible.contains("impossible"), "{impossible}");
}

#[test]
fn data_errors_name_the_file_and_line_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = file_run(dir.path(), "text,label\na,1\nb,0\nc\n", &[]);
    assert!(missing.contains("bad.csv"), "{missing}");
    let split = file_run(
        dir.path(),
        "text,label\ngood film,1\nbad film,0\n",
        &["data.train_examples=1200", "data.test_examples=400"],
    );
    assert!(split.contains("1200"), "{split}");
}

#[test]
fn run_folder_errors_say_each_clause_once() {
    let dir = tempfile::tempdir().unwrap();
    let nothing = dir.path().join("nothing").display().to_string();
    let line = error_line(&fails(&["run", "--resume", &nothing]));
    assert!(line.contains("no run"), "{line}");
}

/// A reader that goes away (`fedsvd … | head`) ends the binary by SIGPIPE,
/// as it ends any Unix tool, not by a panic inside `println!`. The pipe's
/// read end is closed before the binary starts, so its first write fails
/// deterministically.
#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_the_binary_quietly_by_sigpipe() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;

    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_fedsvd"))
        .args([
            "privacy",
            "epsilon",
            "--noise-multiplier",
            "1.0",
            "--sample-rate",
            "0.01",
            "--steps",
            "100",
            "--delta",
            "1e-5",
            "--accountant",
            "rdp",
        ])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "fedsvd panicked on a closed stdout: {stderr}"
    );
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "want death by SIGPIPE, got {:?}; stderr: {stderr}",
        out.status
    );
}
