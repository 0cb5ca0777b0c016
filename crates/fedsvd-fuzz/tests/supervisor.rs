//! The supervisor sees what kills a worker: an allocation above the cap
//! that aborts the process, and an input that hangs. Both are reported,
//! saved under the findings folder, and the run continues after them.

use std::path::Path;
use std::process::Command;

fn fuzz(target: &str, findings: &Path, extra: &[&str]) -> (bool, String) {
    let corpus = tempfile::tempdir().unwrap();
    let dir = corpus.path().join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a-ok"), b"fine").unwrap();
    std::fs::write(dir.join("b-bad"), b"!bad").unwrap();
    std::fs::write(dir.join("c-ok"), b"also fine").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fedsvd-fuzz"))
        .args(["--target", target, "--seconds", "60", "--max-inputs", "3"])
        .arg("--corpus")
        .arg(corpus.path())
        .arg("--findings")
        .arg(findings)
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn an_aborting_allocation_is_a_saved_crash_and_the_run_goes_on() {
    let findings = tempfile::tempdir().unwrap();
    let (ok, text) = fuzz("planted-abort", findings.path(), &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("FINDING planted-abort [crash] input 1"),
        "{text}"
    );
    assert!(text.contains("memory allocation of"), "{text}");
    let saved = findings.path().join("planted-abort/crash-1.bin");
    assert_eq!(std::fs::read(&saved).unwrap(), b"!bad", "{text}");
    // Inputs 0 and 2 ran too: three inputs in all.
    let row = text
        .lines()
        .find(|l| l.starts_with("planted-abort"))
        .unwrap();
    assert_eq!(row.split_whitespace().nth(1), Some("3"), "{text}");
}

#[test]
fn a_hanging_input_is_a_saved_finding() {
    let findings = tempfile::tempdir().unwrap();
    let (ok, text) = fuzz(
        "planted-hang",
        findings.path(),
        &["--exec-timeout-ms", "300"],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("FINDING planted-hang [hang] input 1"),
        "{text}"
    );
    assert!(findings.path().join("planted-hang/hang-1.bin").is_file());
}

#[test]
fn a_clean_run_exits_zero() {
    let findings = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fedsvd-fuzz"))
        .args(["--target", "csv", "--seconds", "1", "--seed", "3"])
        .arg("--findings")
        .arg(findings.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("csv"), "{text}");
}
