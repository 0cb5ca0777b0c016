//! The CUDA kernel sources, their committed PTX, and NVRTC compilation.
//!
//! Each `kernels/NAME.cu` has a committed `kernels/NAME.ptx` whose first line
//! is [`HEADER_PREFIX`] followed by the SHA-256 of the `.cu` source. The CUDA
//! backend loads the embedded PTX (the driver JIT-compiles it for the
//! device), so running the kernels needs no compiler; `cargo xtask
//! build-kernels` regenerates the PTX with [`compile_source`] and a test fails
//! when a source changed without its PTX.

use std::panic::{AssertUnwindSafe, catch_unwind};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// First-line prefix of every committed PTX file.
pub const HEADER_PREFIX: &str = "// fedsvd-kernels source-sha256: ";

/// Virtual architecture the PTX targets: Ampere and newer (the driver
/// JIT-compiles it for Hopper).
pub const ARCH: &str = "compute_80";

/// Highest PTX ISA version the GPU machine's driver (CUDA 13.0) accepts.
pub const MAX_PTX_ISA: (u32, u32) = (9, 0);

/// One kernel file: its source and its committed PTX.
#[derive(Debug, Clone, Copy)]
pub struct KernelFile {
    /// File stem (`grads` for `kernels/grads.cu`).
    pub name: &'static str,
    /// The CUDA C++ source.
    pub source: &'static str,
    /// The committed PTX, header line included.
    pub ptx: &'static str,
}

macro_rules! kernel_file {
    ($name:literal) => {
        KernelFile {
            name: $name,
            source: include_str!(concat!("../kernels/", $name, ".cu")),
            ptx: include_str!(concat!("../kernels/", $name, ".ptx")),
        }
    };
}

/// Every kernel file of the crate.
pub const KERNELS: &[KernelFile] = &[
    kernel_file!("grads"),
    kernel_file!("norms"),
    kernel_file!("clip_noise"),
    kernel_file!("layers"),
];

/// Lower-case hex SHA-256 of a kernel source.
pub fn source_sha256(source: &str) -> String {
    let digest = Sha256::digest(source.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The PTX file text for `source` compiled to `ptx`: the hash header line,
/// then the PTX.
pub fn render_ptx_file(source: &str, ptx: &str) -> String {
    let mut out = format!("{HEADER_PREFIX}{}\n", source_sha256(source));
    out.push_str(ptx);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// Names of the `extern "C" __global__` functions a source defines: the
/// entry points its PTX must contain.
pub fn entry_points(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("extern \"C\" __global__") {
        rest = &rest[at + "extern \"C\" __global__".len()..];
        let Some(paren) = find_name_paren(rest) else {
            break;
        };
        let before = &rest[..paren];
        if let Some(name) = before
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .rfind(|t| !t.is_empty())
        {
            names.push(name.to_string());
        }
        rest = &rest[paren..];
    }
    names
}

/// Position of the parenthesis that opens the parameter list, skipping an
/// `__launch_bounds__(...)` annotation.
fn find_name_paren(s: &str) -> Option<usize> {
    let mut from = 0;
    loop {
        let p = from + s[from..].find('(')?;
        if s[..p].trim_end().ends_with("__launch_bounds__") {
            from = p + s[p..].find(')')? + 1;
        } else {
            return Some(p);
        }
    }
}

/// Checks that a PTX file belongs to `source`: the header hash matches, the
/// ISA version is at most [`MAX_PTX_ISA`], the target is `sm_80`, and every
/// entry point of the source is present.
pub fn check_ptx(name: &str, source: &str, ptx_file: &str) -> Result<()> {
    let stale = |detail: String| Error::StalePtx {
        kernel: name.to_string(),
        detail,
    };
    let first = ptx_file.lines().next().unwrap_or("");
    let Some(hash) = first.strip_prefix(HEADER_PREFIX) else {
        return Err(stale(format!(
            "first line is not `{HEADER_PREFIX}<sha256>`; run `cargo xtask build-kernels`"
        )));
    };
    let want = source_sha256(source);
    if hash.trim() != want {
        return Err(stale(format!(
            "source hash is {want} but the PTX was built from {}; run `cargo xtask build-kernels`",
            hash.trim()
        )));
    }
    let version = ptx_file
        .lines()
        .find_map(|l| l.trim().strip_prefix(".version "))
        .and_then(|v| {
            let (a, b) = v.trim().split_once('.')?;
            Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?))
        })
        .ok_or_else(|| stale("no `.version` directive".into()))?;
    if version > MAX_PTX_ISA {
        return Err(stale(format!(
            "PTX ISA {}.{} is newer than {}.{}, which the CUDA 13.0 driver refuses",
            version.0, version.1, MAX_PTX_ISA.0, MAX_PTX_ISA.1
        )));
    }
    if !ptx_file.lines().any(|l| l.trim() == ".target sm_80") {
        return Err(stale("target is not sm_80".into()));
    }
    for entry in entry_points(source) {
        let found = ptx_file.lines().any(|l| {
            l.trim_start()
                .strip_prefix(".visible .entry ")
                .is_some_and(|r| r.starts_with(&entry) && r[entry.len()..].starts_with('('))
        });
        if !found {
            return Err(stale(format!("entry point `{entry}` is missing")));
        }
    }
    Ok(())
}

/// Whether the NVRTC library can be loaded in this process.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to open the shared library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles a CUDA C++ source to PTX text with NVRTC for [`ARCH`]. NVRTC must
/// be loadable (`libnvrtc.so*` and its builtins library on the library
/// path); otherwise, or when the source does not compile, the error carries
/// the reason and the compiler log.
pub fn compile_source(name: &str, source: &str) -> Result<String> {
    let err = |log: String| Error::Nvrtc {
        kernel: name.to_string(),
        log,
    };
    if source.contains('\0') {
        return Err(err("the source contains a NUL byte".into()));
    }
    if !nvrtc_available() {
        return Err(err(
            "libnvrtc was not found on the library path; `cargo xtask build-kernels` fetches it"
                .into(),
        ));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(ARCH),
        name: Some(format!("{name}.cu")),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    let compiled = catch_unwind(AssertUnwindSafe(|| {
        cudarc::nvrtc::compile_ptx_with_opts(source, opts).map(|p| p.to_src())
    }))
    .map_err(|_| err("NVRTC panicked (is libnvrtc-builtins on the library path?)".into()))?;
    match compiled {
        Ok(ptx) => Ok(ptx),
        Err(cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. }) => {
            Err(err(format!("{nvrtc:?}\n{}", log.to_string_lossy())))
        }
        Err(other) => Err(err(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_ptx_matches_its_source() {
        for k in KERNELS {
            if let Err(e) = check_ptx(k.name, k.source, k.ptx) {
                panic!("{e}");
            }
        }
    }

    #[test]
    fn every_cu_file_is_listed_and_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut on_disk = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("kernels/ exists") {
            let path = entry.expect("readable entry").path();
            if path.extension().is_some_and(|e| e == "cu") {
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                on_disk.push(stem.to_string());
                let k = KERNELS
                    .iter()
                    .find(|k| k.name == stem)
                    .unwrap_or_else(|| panic!("{} is not listed in ptx::KERNELS", path.display()));
                let text = std::fs::read_to_string(&path).expect("readable source");
                assert_eq!(
                    text,
                    k.source,
                    "{} differs from the embedded source",
                    path.display()
                );
                let ptx_path = path.with_extension("ptx");
                let ptx = std::fs::read_to_string(&ptx_path)
                    .unwrap_or_else(|_| panic!("{} is missing", ptx_path.display()));
                check_ptx(stem, &text, &ptx).unwrap_or_else(|e| panic!("{e}"));
            }
        }
        assert_eq!(on_disk.len(), KERNELS.len());
    }

    #[test]
    fn stale_or_foreign_ptx_is_rejected() {
        let k = KERNELS[0];
        let changed = format!("{}\n// edited\n", k.source);
        assert!(matches!(
            check_ptx(k.name, &changed, k.ptx),
            Err(Error::StalePtx { .. })
        ));
        let headerless = k.ptx.split_once('\n').map(|x| x.1).unwrap_or("");
        assert!(check_ptx(k.name, k.source, headerless).is_err());
        let newer = k.ptx.replace(".version 9.0", ".version 9.5");
        assert!(check_ptx(k.name, k.source, &newer).is_err());
        // PTX of another kernel lacks this kernel's entry points.
        let other = KERNELS[1];
        let swapped = render_ptx_file(k.source, other.ptx.split_once('\n').map(|x| x.1).unwrap());
        assert!(check_ptx(k.name, k.source, &swapped).is_err());
    }

    #[test]
    fn entry_points_are_parsed() {
        let src = "extern \"C\" __global__ void __launch_bounds__(128) alpha(int x) {}\n\
                   extern \"C\" __global__ void beta(float* y) {}\n";
        assert_eq!(entry_points(src), vec!["alpha", "beta"]);
        let grads = KERNELS.iter().find(|k| k.name == "grads").unwrap();
        assert_eq!(
            entry_points(grads.source),
            vec![
                "per_example_grads_n8",
                "per_example_grads_n16",
                "per_example_grads_n32"
            ]
        );
    }
}
