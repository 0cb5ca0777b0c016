//! `cargo xtask wheel [--test]`: builds the Python package `fedsvd`
//! (`crates/fedsvd-py`) into `target/wheels/` with maturin, which it
//! installs itself into a venv under `target/`; `--test` then installs the
//! wheel into a fresh venv and runs the package's pytest suite.
//!
//! Nothing is installed by hand: the venvs are made with `python3` from
//! PATH (at least 3.11, the wheel's abi3 floor), and maturin and pytest
//! are pinned here.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

/// The maturin that builds the wheel.
pub const MATURIN: &str = "maturin==1.16.0";
/// The pytest that runs the package's tests.
pub const PYTEST: &str = "pytest==8.4.2";

/// The venv holding maturin.
pub fn build_venv(root: &Path) -> PathBuf {
    root.join("target").join("wheel-venv")
}

/// Where the wheel lands.
pub fn wheel_dir(root: &Path) -> PathBuf {
    root.join("target").join("wheels")
}

fn run(what: &str, command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {what} ({command:?})"))?;
    if !status.success() {
        bail!("{what} failed ({status}): {command:?}");
    }
    Ok(())
}

/// Creates a venv at `dir` with `python3` from PATH unless one is there,
/// checking the interpreter is at least 3.11.
pub fn ensure_venv(dir: &Path) -> anyhow::Result<PathBuf> {
    let python = dir.join("bin").join("python");
    if python.is_file() {
        return Ok(python);
    }
    let check = Command::new("python3")
        .args([
            "-c",
            "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)",
        ])
        .status()
        .context("cannot run python3 from PATH (Python 3.11 or newer is needed)")?;
    if !check.success() {
        bail!("python3 on PATH is older than 3.11; the fedsvd wheel needs Python 3.11 or newer");
    }
    run(
        "creating a venv",
        Command::new("python3").arg("-m").arg("venv").arg(dir),
    )?;
    Ok(python)
}

/// `pip install` of `packages` into the venv of `python`, quietly.
pub fn pip_install(python: &Path, packages: &[&str]) -> anyhow::Result<()> {
    run(
        &format!("pip install {}", packages.join(" ")),
        Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(packages),
    )
}

/// Builds the wheel (cargo's release profile, or with `release` false the
/// dev profile, which shares the test build's compiled dependencies) and
/// returns its path.
pub fn build_wheel(root: &Path, release: bool) -> anyhow::Result<PathBuf> {
    let venv = build_venv(root);
    let python = ensure_venv(&venv)?;
    let maturin = venv.join("bin").join("maturin");
    let version = MATURIN.trim_start_matches("maturin==");
    let installed = Command::new(&maturin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(version))
        .unwrap_or(false);
    if !installed {
        pip_install(&python, &[MATURIN])?;
    }
    let out = wheel_dir(root);
    // Only this version's wheels stay, so the newest is unambiguous.
    if out.is_dir() {
        for entry in fs::read_dir(&out).with_context(|| format!("reading {}", out.display()))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "whl") {
                fs::remove_file(&path)
                    .with_context(|| format!("removing the old wheel {}", path.display()))?;
            }
        }
    }
    run(
        "maturin build",
        Command::new(&maturin)
            .args(["build", "--quiet", "--profile"])
            .arg(if release { "release" } else { "dev" })
            .arg("--manifest-path")
            .arg(root.join("crates/fedsvd-py/Cargo.toml"))
            .arg("--out")
            .arg(&out)
            .arg("--interpreter")
            .arg(&python)
            .env("PYO3_PYTHON", &python),
    )?;
    let wheel = fs::read_dir(&out)
        .with_context(|| format!("reading {}", out.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.extension().is_some_and(|e| e == "whl")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("fedsvd-"))
        })
        .with_context(|| format!("maturin left no fedsvd wheel in {}", out.display()))?;
    Ok(wheel)
}

/// Installs `wheel` into a fresh venv (removed first) with pytest, and
/// runs the package's tests against the dev build of the `fedsvd` binary.
pub fn test_wheel(root: &Path, wheel: &Path) -> anyhow::Result<()> {
    let venv = root.join("target").join("wheel-test-venv");
    if venv.exists() {
        fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    let python = ensure_venv(&venv)?;
    let wheel = wheel.to_string_lossy();
    pip_install(&python, &[wheel.as_ref(), PYTEST])?;
    // The tests compare the package with the CLI.
    run(
        "building the fedsvd binary",
        Command::new("cargo").args([
            "build",
            "--quiet",
            "--package",
            "fedsvd-cli",
            "--bin",
            "fedsvd",
        ]),
    )?;
    run(
        "pytest crates/fedsvd-py/tests",
        Command::new(&python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(root.join("crates/fedsvd-py/tests"))
            .env("FEDSVD_BIN", root.join("target/debug/fedsvd"))
            .env("FEDSVD_ASSETS", root.join("assets")),
    )
}

/// `cargo xtask wheel [--test]`.
pub fn wheel(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let test = match args {
        [] => false,
        [flag] if flag == "--test" => true,
        other => bail!("usage: cargo xtask wheel [--test] (got {other:?})"),
    };
    let started = Instant::now();
    let wheel = build_wheel(root, true)?;
    println!(
        "wheel: {} ({:.1} s)",
        wheel.display(),
        started.elapsed().as_secs_f64()
    );
    if test {
        let started = Instant::now();
        test_wheel(root, &wheel)?;
        println!(
            "wheel tests: ok in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
