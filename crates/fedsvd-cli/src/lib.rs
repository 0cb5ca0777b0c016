//! The library side of the `fedsvd` binary: the parts that other crates
//! exercise directly. Today only the resolution of a run's configuration
//! (preset, `--config FILE`, `--method`, `--set key=value`), which the fuzz
//! harness (`crates/fedsvd-fuzz`) feeds hostile files and assignments.
#![warn(missing_docs)]

pub mod config;
