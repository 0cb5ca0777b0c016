//! `cargo xtask fuzz [--seconds N] [fedsvd-fuzz options]`: builds the fuzz
//! harness (`crates/fedsvd-fuzz`, dev profile, which is opt-level 3 here)
//! and runs every target for N seconds each; findings land in
//! `target/fuzz-findings/<target>/`.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

/// Seconds per target in `cargo xtask ci`: 12 targets × 8 s plus the
/// incremental build after the test step stays under 3 minutes on the
/// 2-core build machine.
pub const CI_SECONDS_PER_TARGET: u32 = 8;

/// Runs the harness with `args` (default: 10 s per target).
pub fn fuzz(args: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut command = Command::new("cargo");
    command.args(["run", "--quiet", "--package", "fedsvd-fuzz", "--"]);
    command.args(args);
    let status = command
        .status()
        .context("cannot start `cargo run --package fedsvd-fuzz`")?;
    println!(
        "<== fuzz: {} in {:.1} s",
        if status.success() { "ok" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!("fuzzing found problems or failed ({status}); inputs are in target/fuzz-findings/");
    }
    Ok(())
}
