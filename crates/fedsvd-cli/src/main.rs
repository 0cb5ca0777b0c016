//! The `fedsvd` command: differentially private federated fine-tuning of LoRA
//! adapters from the command line.
//!
//! Each subcommand lives in its own module and only parses arguments, calls
//! the library crates and prints; no algorithm lives here.

mod assets;
mod audit;
mod bench;
mod bench_step;
mod bench_svd;
mod compare;
mod conditioning;
use fedsvd_cli::config;
mod data;
mod deploy;
mod embed;
mod export;
mod predict;
mod privacy;
mod report;
mod run;
mod study;

use std::process::ExitCode;

/// mimalloc keeps freed pages for reuse. A training step allocates and
/// frees a few hundred MiB of activations; with glibc's allocator every
/// buffer above its mmap threshold came back as fresh, zeroed pages on each
/// step, and those page faults cost ≈ 15 % of `fedsvd bench step`
/// (27 → 32 examples/s on the 2-core build machine, docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's index of its `purge_delay` option (15 in both its v2 and v3
/// headers; the Rust bindings name no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Lets mimalloc keep freed pages for a second (its default is 10 ms)
/// before returning them to the OS.
///
/// Why: a DP-SGD step frees its activations at the end and allocates them
/// again right after; after 10 ms they had been returned, and faulting
/// them back in (kernel page clearing) took ≈ 5 % of a steady-state step
/// (perf, docs/benchmarks.md). One second spans a step on the machines we
/// measured, while idle memory still goes back between rounds.
fn keep_freed_pages_for_a_second() {
    // SAFETY: mi_option_set only stores an integer in mimalloc's option
    // table; any value is valid for purge_delay.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) }
}

use clap::{Parser, Subcommand};

/// Differentially private federated fine-tuning of LoRA adapters (FedSVD and
/// its baselines).
#[derive(Debug, Parser)]
#[command(name = "fedsvd", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the main job: federated DP fine-tuning of MiniLM on Rotten Tomatoes
    /// sentiment with FedSVD (ε = 6, δ = 1e-5, 6 clients, all in every round), or
    /// any configuration (presets, config files, --set overrides, resume).
    Run(run::RunArgs),
    /// Run a grid of methods × ε × seeds (resumable), then write results.md,
    /// results.csv and accuracy plots.
    Compare(compare::CompareArgs),
    /// Audit a client's DP guarantee empirically: canaries in one training
    /// run give a lower bound on epsilon, printed next to the accountant's.
    Audit(audit::AuditArgs),
    /// Fetch and inspect the model and data assets.
    #[command(subcommand)]
    Assets(assets::AssetsCommand),
    /// Inspect data sets and federated partitions.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Privacy accounting: epsilon of a DP-SGD run, noise for a target epsilon.
    #[command(subcommand)]
    Privacy(privacy::PrivacyCommand),
    /// Performance benchmarks of the library paths.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Sentence embeddings (mean-pooled, L2-normalized) from the local MiniLM.
    Embed(embed::EmbedArgs),
    /// Classify texts with an exported adapter or merged checkpoint (labels
    /// and class probabilities).
    Predict(predict::PredictArgs),
    /// Results tables (markdown, CSV) and accuracy plots (SVG, PNG) from
    /// finished run folders.
    Report(report::ReportArgs),
    /// Run the federation as real Flower processes (SuperLink, one SuperNode per client).
    #[command(subcommand)]
    Deploy(deploy::DeployCommand),
    /// A committed study (grid, results, analysis): rebuild its tables and
    /// plot from the committed results, or --run its missing runs first.
    Study(study::StudyArgs),
    /// The mechanism probe: condition number of the loss Hessian in B on
    /// frozen MiniLM features, FFA-LoRA's A against FedSVD's.
    Probe(study::ProbeArgs),
}

fn main() -> ExitCode {
    die_quietly_on_a_closed_pipe();
    keep_freed_pages_for_a_second();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Audit(args) => audit::run(args),
        Command::Assets(command) => assets::run(command),
        Command::Data(command) => data::run(command),
        Command::Privacy(command) => privacy::run(command),
        Command::Bench(command) => bench::run(command),
        Command::Embed(args) => embed::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Report(args) => report::run(args),
        Command::Deploy(command) => deploy::run(command),
        Command::Study(args) => study::run(args),
        Command::Probe(args) => study::run_probe(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// Restores the default action of SIGPIPE, which Rust's runtime ignores, so
/// that `fedsvd study … | head` ends the way a Unix tool does when its reader
/// goes away, instead of panicking inside `println!` on the broken pipe.
/// Nothing in the binary writes to a child's stdin or to a socket, where a
/// closed peer would then end the process instead of returning an error.
fn die_quietly_on_a_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: called first in `main`, before any thread exists; SIG_DFL is a
    // valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The error and its causes, outermost first, joined by ": ". A cause whose
/// text the message already holds is left out: our library errors often
/// print their source inside their own message and also return it as the
/// source, and anyhow's `{:#}` would then say the same clause twice.
fn error_chain(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards the hard-coded option index: the option at 15 must start at
    /// mimalloc's documented purge_delay default (10 ms in the v2 sources
    /// this build compiles) and then read back what we set.
    #[test]
    fn the_purge_delay_option_is_the_one_we_set() {
        // SAFETY: reads an integer from mimalloc's option table.
        let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert!(before == 10 || before == 1000, "option 15 reads {before}");
        keep_freed_pages_for_a_second();
        // SAFETY: as above.
        let after = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(after, 1000);
    }
}
