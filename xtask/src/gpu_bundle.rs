//! `cargo xtask gpu-bundle`: everything the GPU machine (CUDA, no Rust
//! toolchain) needs to test and benchmark `fedsvd-kernels` and the device
//! training step of `fedsvd-model`, in the ignored folder `gpu-bundle/`: the
//! release test binaries of `fedsvd-kernels` (`tests/`), the `fedsvd-model`
//! GPU parity test (`model-tests/gpu`), the stripped `fedsvd` binary
//! (`bin/fedsvd`, for `fedsvd bench step --device cuda`), the benchmark binary,
//! `run.sh` (from `gpu/run.sh`) and, when the checkout has `shared/` beside
//! it, the peer's PyTorch/Opacus step `bench/opacus_gpu_step.py`; for the
//! federated acceptance, the `fedsvd` crate's `device` integration test
//! (`fedsvd-tests/device`), `compare_runs.py` (from `gpu/`), the pinned
//! Opacus wheel (`wheels/`, downloaded once with `pip download` into
//! `target/gpu-bundle-wheels/`; the bundle builds without it when the
//! download fails) and, from the assets folder (`$FEDSVD_ASSETS` or the
//! workspace's `assets/`), the MiniLM `tokenizer.json` and the Rotten
//! Tomatoes package `data/rt` (with its manifest) as `assets/`, so run.sh can
//! train a random model of the MiniLM shape on the GPU and on the CPU and
//! compare. The bundle must stay under 64 MiB.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

const LIMIT: u64 = 64 * 1024 * 1024;
/// The Opacus release the peer benchmark is pinned to.
const OPACUS: &str = "opacus==1.6.0";

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
    let device_tests = cargo_executables(
        &[
            "test",
            "--release",
            "-p",
            "fedsvd",
            "--test",
            "device",
            "--no-run",
            "--message-format=json",
        ],
        |m| is_package(m, "fedsvd") && m["profile"]["test"] == true,
    )?;
    let Some((_, device_test)) = device_tests.into_iter().next() else {
        bail!("cargo built no fedsvd device test binary");
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
    std::fs::create_dir_all(out.join("fedsvd-tests"))?;
    let device_dst = out.join("fedsvd-tests/device");
    std::fs::copy(&device_test, &device_dst)
        .with_context(|| format!("cannot copy {}", device_test.display()))?;
    files.push(device_dst);
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

    let compare = root.join("gpu/compare_runs.py");
    let compare_dst = out.join("compare_runs.py");
    std::fs::copy(&compare, &compare_dst)
        .with_context(|| format!("cannot copy {}", compare.display()))?;
    files.push(compare_dst);
    match opacus_wheel(root) {
        Ok(wheel) => {
            std::fs::create_dir_all(out.join("wheels"))?;
            let name = wheel.file_name().context("wheel without a name")?;
            let dst = out.join("wheels").join(name);
            std::fs::copy(&wheel, &dst)
                .with_context(|| format!("cannot copy {}", wheel.display()))?;
            files.push(dst);
        }
        Err(e) => println!("note: no Opacus wheel in the bundle ({e:#})"),
    }
    copy_assets(root, &out, &mut files)?;

    let mut total = dir_size(&out)?;
    if total > LIMIT {
        // Line tables make backtraces readable; drop them only when needed.
        println!("bundle is {total} bytes, stripping debug info");
        let binary = |f: &&PathBuf| f.extension().is_none() && !f.starts_with(out.join("assets"));
        for f in files.iter().filter(binary) {
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

/// The pinned Opacus wheel, downloaded into `target/gpu-bundle-wheels/`
/// unless a wheel is there already.
fn opacus_wheel(root: &Path) -> anyhow::Result<PathBuf> {
    let cache = root.join("target/gpu-bundle-wheels");
    let version = OPACUS.split("==").nth(1).unwrap_or_default();
    let find = || -> anyhow::Result<Option<PathBuf>> {
        if !cache.is_dir() {
            return Ok(None);
        }
        for entry in std::fs::read_dir(&cache)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with(&format!("opacus-{version}-")) && name.ends_with(".whl") {
                return Ok(Some(path));
            }
        }
        Ok(None)
    };
    if let Some(w) = find()? {
        return Ok(w);
    }
    std::fs::create_dir_all(&cache)?;
    println!("==> python3 -m pip download --no-deps --only-binary=:all: {OPACUS}");
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
        ])
        .arg(&cache)
        .arg(OPACUS)
        .status()
        .context("cannot run python3 -m pip")?;
    if !status.success() {
        bail!("pip download {OPACUS} failed ({status})");
    }
    find()?.with_context(|| format!("pip download left no opacus wheel in {}", cache.display()))
}

/// Copies the MiniLM tokenizer and the Rotten Tomatoes package (with its
/// manifest, which the loader checks) from the assets folder into
/// `out/assets/`, in the same layout.
fn copy_assets(root: &Path, out: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let src = std::env::var_os("FEDSVD_ASSETS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("assets"));
    let tokenizer = "models/all-MiniLM-L6-v2/tokenizer.json";
    let rt = "data/rt";
    if !src.join(tokenizer).is_file() || !src.join(rt).is_dir() {
        bail!(
            "{} lacks {tokenizer} or {rt}: run `cargo run --release --bin fedsvd -- assets fetch` first",
            src.display()
        );
    }
    let dst = out.join("assets");
    std::fs::create_dir_all(dst.join("models/all-MiniLM-L6-v2"))?;
    std::fs::copy(src.join(tokenizer), dst.join(tokenizer))
        .with_context(|| format!("cannot copy {}", src.join(tokenizer).display()))?;
    files.push(dst.join(tokenizer));
    std::fs::create_dir_all(dst.join(rt))?;
    for entry in std::fs::read_dir(src.join(rt))? {
        let path = entry?.path();
        if path.is_file() {
            let to = dst.join(rt).join(path.file_name().context("no file name")?);
            std::fs::copy(&path, &to).with_context(|| format!("cannot copy {}", path.display()))?;
            files.push(to);
        }
    }
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
