//! Targets with planted bugs, for testing the harness itself: each breaks
//! one property on inputs that start with `!` and behaves on the others.
//! They are never part of `cargo xtask fuzz`; `--target planted-…` runs one.

use std::path::Path;

use crate::harness::{Target, no_exception, no_setup};
use crate::mutate::Format;

fn planted(name: &'static str, run: fn(&Path, &[u8]) -> Result<(), String>) -> Target {
    Target {
        name,
        about: "a planted bug for the harness's own tests",
        format: Format::Text,
        input_file: "input.txt",
        setup: no_setup,
        names_file: true,
        unnamed_ok: no_exception,
        dictionary: &["!"],
        run,
    }
}

/// Rejects `?…` naming the file, accepts the rest unless `!…`.
fn ordinary(dir: &Path, input: &[u8]) -> Result<(), String> {
    if input.first() == Some(&b'?') {
        return Err(format!(
            "{}: starts with ?",
            dir.join("input.txt").display()
        ));
    }
    Ok(())
}

fn panics(dir: &Path, input: &[u8]) -> Result<(), String> {
    if input.first() == Some(&b'!') {
        let index = input.len() + 10;
        // A planted out-of-bounds index.
        return Err(format!("{}", input[index]));
    }
    ordinary(dir, input)
}

fn allocates_fallibly(dir: &Path, input: &[u8]) -> Result<(), String> {
    if input.first() == Some(&b'!') {
        let mut v: Vec<u8> = Vec::new();
        // A size field of 2^40 trusted, but through a fallible API.
        return v
            .try_reserve_exact(1 << 40)
            .map_err(|e| format!("{}: {e}", dir.display()));
    }
    ordinary(dir, input)
}

fn allocates(dir: &Path, input: &[u8]) -> Result<(), String> {
    if input.first() == Some(&b'!') {
        // A size field of 2^40 trusted: the allocator refuses, Rust aborts.
        let v: Vec<u8> = Vec::with_capacity(std::hint::black_box(1 << 40));
        return Err(format!("{}", v.capacity()));
    }
    ordinary(dir, input)
}

fn unnamed(dir: &Path, input: &[u8]) -> Result<(), String> {
    if input.first() == Some(&b'!') {
        return Err("bad input (no file named)".into());
    }
    ordinary(dir, input)
}

fn hangs(dir: &Path, input: &[u8]) -> Result<(), String> {
    if input.first() == Some(&b'!') {
        std::thread::sleep(std::time::Duration::from_secs(30));
    }
    ordinary(dir, input)
}

/// The planted targets.
pub fn all() -> Vec<Target> {
    vec![
        planted("planted-panic", panics),
        planted("planted-oversized", allocates_fallibly),
        planted("planted-abort", allocates),
        planted("planted-unnamed", unnamed),
        planted("planted-hang", hangs),
    ]
}
