//! The `fedsvd` command: differentially private federated fine-tuning of LoRA
//! adapters from the command line.
//!
//! Each subcommand lives in its own module and only parses arguments, calls
//! the library crates and prints; no algorithm lives here.

mod assets;
mod bench;
mod bench_step;
mod bench_svd;
mod compare;
mod config;
mod data;
mod embed;
mod export;
mod predict;
mod privacy;
mod report;
mod run;

use std::process::ExitCode;

/// mimalloc keeps freed pages for reuse. A training step allocates and
/// frees a few hundred MiB of activations; with glibc's allocator every
/// buffer above its mmap threshold came back as fresh, zeroed pages on each
/// step, and those page faults cost ≈ 15 % of `fedsvd bench step`
/// (27 → 32 examples/s on the 2-core build machine, docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// sentiment with FedSVD (ε = 6, δ = 1e-5, 6 clients, 3 per round), or
    /// any configuration (presets, config files, --set overrides, resume).
    Run(run::RunArgs),
    /// Run a grid of methods × ε × seeds (resumable), then write results.md,
    /// results.csv and accuracy plots.
    Compare(compare::CompareArgs),
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Assets(command) => assets::run(command),
        Command::Data(command) => data::run(command),
        Command::Privacy(command) => privacy::run(command),
        Command::Bench(command) => bench::run(command),
        Command::Embed(args) => embed::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Report(args) => report::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
