//! `cargo xtask gpu-bundle`: everything the GPU machine (CUDA, no Rust
//! toolchain) needs to test and benchmark `fedsvd-kernels` and the device
//! training step of `fedsvd-model`, in the ignored folder `gpu-bundle/`: the
//! release test binaries of `fedsvd-kernels` (`tests/`), the `fedsvd-model`
//! GPU parity test (`model-tests/gpu`), the stripped `fedsvd` binary
//! (`bin/fedsvd`, for `fedsvd bench step --device cuda`), the benchmark binary,
//! `run.sh` (from `gpu/run.sh`) and, when the checkout has `shared/` beside
//! it, the peer's PyTorch/Opacus step `bench/opacus_gpu_step.py`. The bundle
//! must stay under 64 MiB.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

const LIMIT: u64 = 64 * 1024 * 1024;

/// Runs cargo with JSON messages and returns the executables of the
/// artifacts that `keep` accepts, as (target name, path).
fn cargo_executables(
    args: &[&str],
    keep: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    println!("==> cargo {}", args.join(" "));
    let output = Command::new("cargo")
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo")?;
    if !output.status.success() {
        bail!("cargo {} failed ({})", args.join(" "), output.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || !keep(&msg) {
            continue;
        }
        if let Some(exe) = msg["executable"].as_str() {
            let name = msg["target"]["name"].as_str().unwrap_or("test").to_string();
            found.push((name, PathBuf::from(exe)));
        }
    }
    Ok(found)
}

fn is_kernels(msg: &serde_json::Value) -> bool {
    is_package(msg, "fedsvd-kernels")
}

/// Whether a cargo message is about package `name` (its package id names
/// the package's folder or `name@version`).
fn is_package(msg: &serde_json::Value, name: &str) -> bool {
    msg["package_id"].as_str().is_some_and(|id| {
        id.contains(&format!("/{name}#"))
            || id.contains(&format!("/{name}@"))
            || id.contains(&format!("#{name}@"))
            || id.starts_with(&format!("{name} "))
    })
}

/// Entry point of `cargo xtask gpu-bundle`.
pub fn gpu_bundle(root: &Path) -> anyhow::Result<()> {
    let tests = cargo_executables(
        &[
            "test",
            "--release",
            "-p",
            "fedsvd-kernels",
            "--no-run",
            "--message-format=json",
        ],
        // The bin target's own (empty) test harness is left out.
        |m| {
            is_kernels(m)
                && m["profile"]["test"] == true
                && !m["target"]["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|x| x == "bin"))
        },
    )?;
    if tests.is_empty() {
        bail!("cargo built no test binaries for fedsvd-kernels");
    }
    let bench = cargo_executables(
        &[
            "build",
            "--release",
            "-p",
            "fedsvd-kernels",
            "--bin",
            "fedsvd-kernels-bench",
            "--message-format=json",
        ],
        is_kernels,
    )?;
    let Some((_, bench)) = bench.into_iter().next() else {
        bail!("cargo built no fedsvd-kernels-bench binary");
    };

    let model_tests = cargo_executables(
        &[
            "test",
            "--release",
            "-p",
            "fedsvd-model",
            "--test",
            "gpu",
            "--no-run",
            "--message-format=json",
        ],
        |m| is_package(m, "fedsvd-model") && m["profile"]["test"] == true,
    )?;
    let Some((_, model_test)) = model_tests.into_iter().next() else {
        bail!("cargo built no fedsvd-model gpu test binary");
    };
    let cli = cargo_executables(
        &[
            "build",
            "--release",
            "-p",
            "fedsvd-cli",
            "--bin",
            "fedsvd",
            "--message-format=json",
        ],
        |m| is_package(m, "fedsvd-cli"),
    )?;
    let Some((_, cli)) = cli.into_iter().next() else {
        bail!("cargo built no fedsvd binary");
    };

    let out = root.join("gpu-bundle");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("cannot clear {}", out.display()))?;
    }
    std::fs::create_dir_all(out.join("tests"))?;
    std::fs::create_dir_all(out.join("bin"))?;
    let mut files = Vec::new();
    for (name, exe) in &tests {
        let dst = out.join("tests").join(name);
        std::fs::copy(exe, &dst).with_context(|| format!("cannot copy {}", exe.display()))?;
        files.push(dst);
    }
    let bench_dst = out.join("bin/fedsvd-kernels-bench");
    std::fs::copy(&bench, &bench_dst)?;
    files.push(bench_dst);
    std::fs::create_dir_all(out.join("model-tests"))?;
    let model_dst = out.join("model-tests/gpu");
    std::fs::copy(&model_test, &model_dst)
        .with_context(|| format!("cannot copy {}", model_test.display()))?;
    files.push(model_dst);
    // The CLI is large (tokenizers, faer); it travels without symbols.
    let cli_dst = out.join("bin/fedsvd");
    std::fs::copy(&cli, &cli_dst).with_context(|| format!("cannot copy {}", cli.display()))?;
    let status = Command::new("strip").arg(&cli_dst).status();
    if !matches!(status, Ok(s) if s.success()) {
        bail!("strip failed on {}", cli_dst.display());
    }
    files.push(cli_dst);
    let run = root.join("gpu/run.sh");
    let run_dst = out.join("run.sh");
    std::fs::copy(&run, &run_dst).with_context(|| format!("cannot copy {}", run.display()))?;
    set_executable(&run_dst)?;
    // The peer's figures come from the same machine in the same run; the
    // script is optional (run.sh skips it when absent).
    let peer = root.join("../shared/bench/opacus_gpu_step.py");
    if peer.is_file() {
        std::fs::create_dir_all(out.join("bench"))?;
        let dst = out.join("bench/opacus_gpu_step.py");
        std::fs::copy(&peer, &dst).with_context(|| format!("cannot copy {}", peer.display()))?;
        files.push(dst);
    } else {
        println!(
            "note: {} not found; the bundle carries no peer benchmark",
            peer.display()
        );
    }

    let mut total = dir_size(&out)?;
    if total > LIMIT {
        // Line tables make backtraces readable; drop them only when needed.
        println!("bundle is {total} bytes, stripping debug info");
        for f in files.iter().filter(|f| f.extension().is_none()) {
            let status = Command::new("strip").arg("--strip-debug").arg(f).status();
            if !matches!(status, Ok(s) if s.success()) {
                bail!("strip failed on {}", f.display());
            }
        }
        total = dir_size(&out)?;
    }
    let commit = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut manifest = format!("fedsvd-kernels GPU bundle\ncommit {commit}\n");
    for f in &files {
        let len = std::fs::metadata(f)?.len();
        let rel = f.strip_prefix(&out).unwrap_or(f);
        manifest.push_str(&format!("{len:>10}  {}\n", rel.display()));
    }
    std::fs::write(out.join("MANIFEST"), manifest)?;
    if total > LIMIT {
        bail!("gpu-bundle is {total} bytes, over the 64 MiB limit");
    }
    println!(
        "gpu-bundle: {} files, {:.1} MiB in {} (run: gpu-bundle/run.sh)",
        files.len() + 2,
        total as f64 / (1024.0 * 1024.0),
        out.display()
    );
    Ok(())
}

fn set_executable(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut p = std::fs::metadata(path)?.permissions();
        p.set_mode(0o755);
        std::fs::set_permissions(path, p)?;
    }
    Ok(())
}

fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}
