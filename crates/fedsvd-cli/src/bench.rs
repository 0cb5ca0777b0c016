//! `fedsvd bench …`: performance benchmarks of the library paths. Each
//! benchmark is a variant of [`BenchCommand`] with its own module.

use clap::Subcommand;

/// The benchmarks `fedsvd bench` can run.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time the server's refactorization of LoRA adapters: dense SVD of B·A
    /// (the reference approach), randomized SVD and the exact factored SVD.
    Svd(crate::bench_svd::SvdArgs),
    /// Time one full DP-SGD client step on MiniLM (forward, backward,
    /// per-example clipping, noise, SGD update), LoRA r = 8 on query/value, B only;
    /// `--device cuda` times the GPU step on random weights of `--shape`.
    Step(crate::bench_step::StepArgs),
    /// Write a random BERT of a benchmark shape as a model folder, with a
    /// given tokenizer (for machines that cannot receive the real weights,
    /// such as the GPU bundle's).
    #[command(hide = true)]
    RandomModel(crate::bench_step::RandomModelArgs),
}

/// Runs one benchmark.
pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Svd(args) => crate::bench_svd::run(&args),
        BenchCommand::Step(args) => crate::bench_step::run(&args),
        BenchCommand::RandomModel(args) => crate::bench_step::write_random_model(&args),
    }
}
