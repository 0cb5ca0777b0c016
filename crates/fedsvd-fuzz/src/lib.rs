#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod alloc;
pub mod harness;
pub mod mutate;
pub mod planted;
pub mod seeds;
pub mod targets;

pub use harness::{Finding, Kind, Limits, Target, Verdict, run_one};
pub use mutate::{Format, Mutator};

/// The unit tests run under the capping allocator too, so the harness's
/// oversized-allocation check is tested as the binary uses it.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: alloc::CapAlloc = alloc::CapAlloc::new();

/// Longest input the mutator builds: 1 MiB, far above every seed.
pub const MAX_INPUT_LEN: usize = 1 << 20;

/// The committed corpus: `crates/fedsvd-fuzz/corpus`.
pub fn default_corpus_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// The mutator of `target` over its corpus entries.
pub fn mutator_for(target: &Target, corpus: Vec<Vec<u8>>) -> Mutator {
    Mutator::new(
        corpus,
        target
            .dictionary
            .iter()
            .map(|t| t.as_bytes().to_vec())
            .collect(),
        target.format,
        MAX_INPUT_LEN,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::{Kind, RunSettings, Stats, fuzz};
    use std::sync::{Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    /// The allocator's cap and counters are process-wide, as in the fuzz
    /// binary, which runs one input at a time: so do these tests.
    fn one_input_at_a_time() -> MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn verdict(name: &str, input: &[u8]) -> Verdict {
        let _serial = one_input_at_a_time();
        let target = targets::by_name(name).unwrap();
        let dir = tempfile::tempdir().unwrap();
        (target.setup)(dir.path()).unwrap();
        harness::install_quiet_panic_hook();
        run_one(&target, dir.path(), input, Limits::default()).unwrap()
    }

    fn kind(v: &Verdict) -> Option<Kind> {
        match v {
            Verdict::Finding(f) => Some(f.kind),
            _ => None,
        }
    }

    #[test]
    fn a_planted_panic_is_a_finding_with_its_location() {
        assert_eq!(verdict("planted-panic", b"fine"), Verdict::Accepted);
        assert_eq!(verdict("planted-panic", b"?named"), Verdict::Rejected);
        match verdict("planted-panic", b"!boom") {
            Verdict::Finding(f) => {
                assert_eq!(f.kind, Kind::Panic);
                assert!(f.message.contains("planted.rs"), "{}", f.message);
                assert!(f.message.contains("out of bounds"), "{}", f.message);
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn an_oversized_allocation_is_refused_and_reported() {
        match verdict("planted-oversized", b"!") {
            Verdict::Finding(f) => {
                assert_eq!(f.kind, Kind::Oversized);
                assert!(
                    f.message.contains(&(1u64 << 40).to_string()),
                    "{}",
                    f.message
                );
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_rejection_that_names_no_file_is_a_finding() {
        assert_eq!(kind(&verdict("planted-unnamed", b"!")), Some(Kind::Unnamed));
        assert_eq!(verdict("planted-unnamed", b"?"), Verdict::Rejected);
    }

    #[test]
    fn the_fuzz_loop_saves_one_input_per_distinct_finding() {
        let target = targets::by_name("planted-panic").unwrap();
        let mutator = mutator_for(&target, vec![b"ok".to_vec(), b"!x".to_vec()]);
        let findings = tempfile::tempdir().unwrap();
        let settings = RunSettings {
            seed: 1,
            start: 0,
            deadline: Instant::now() + Duration::from_secs(60),
            max_inputs: Some(300),
            limits: Limits::default(),
            exec_timeout: Duration::from_secs(10),
            findings_dir: findings.path().to_path_buf(),
            max_len: 1024,
        };
        let stats: Stats = {
            let _serial = one_input_at_a_time();
            fuzz(&target, &mutator, &settings).unwrap()
        };
        assert_eq!(stats.execs, 300);
        assert!(stats.finding_inputs >= 1, "{stats:?}");
        assert_eq!(stats.findings.len(), 1, "one signature: {stats:?}");
        let saved = &stats.findings[0];
        assert_eq!(saved.index, 1, "the corpus entry `!x` runs second");
        assert_eq!(std::fs::read(&saved.file).unwrap(), b"!x");
        let note = std::fs::read_to_string(saved.file.with_extension("txt")).unwrap();
        assert!(
            note.contains("planted-panic") && note.contains("panic"),
            "{note}"
        );
        assert_eq!(
            stats.execs,
            stats.accepted + stats.rejected + stats.finding_inputs
        );
    }

    /// The committed seeds are what the generator writes, so a change of
    /// a format shows up here and `gen-corpus` refreshes them.
    #[test]
    fn committed_seeds_match_the_generator() {
        let root = default_corpus_dir();
        for target in targets::all() {
            let committed = seeds::read_corpus(&root, target.name).unwrap();
            for (name, bytes) in seeds::seeds(target.name) {
                // A copy of the `quick` preset, which changes with the
                // presets; merged over the preset, an older copy stays a
                // valid file (the next test checks that).
                if name == "seed-full.json" {
                    continue;
                }
                let found = committed.iter().find(|(n, _)| *n == name);
                assert_eq!(
                    found.map(|(_, b)| b),
                    Some(&bytes),
                    "{}/{name}: run `cargo run -p fedsvd-fuzz -- gen-corpus`",
                    target.name
                );
            }
        }
    }

    /// Every generated seed is a valid input (so mutations start from
    /// files that reach deep into the parser), and every regression seed is
    /// rejected cleanly.
    #[test]
    fn seeds_are_accepted_and_regressions_rejected() {
        let _serial = one_input_at_a_time();
        harness::install_quiet_panic_hook();
        let root = default_corpus_dir();
        for target in targets::all() {
            let dir = tempfile::tempdir().unwrap();
            (target.setup)(dir.path()).unwrap();
            let corpus = seeds::read_corpus(&root, target.name).unwrap();
            assert!(!corpus.is_empty(), "{} has no corpus", target.name);
            for (name, bytes) in corpus {
                let v = run_one(&target, dir.path(), &bytes, Limits::default()).unwrap();
                let want = if name.starts_with("seed-") {
                    Verdict::Accepted
                } else {
                    Verdict::Rejected
                };
                assert_eq!(v, want, "{}/{name}", target.name);
            }
        }
    }
}
