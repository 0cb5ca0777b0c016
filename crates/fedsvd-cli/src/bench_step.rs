//! `fedsvd bench step`: times one local step of the training path
//! (`fedsvd::train_locally`, what `fedsvd run` executes: forward, backward,
//! per-example clipping, the discrete Gaussian release, SGD update) on MiniLM
//! with r = 8 LoRA on query/value and only B trainable.

use anyhow::Context;
use clap::Args;
use fedsvd::bench::{StepBenchConfig, run_step_benchmark};
use fedsvd_model::{BertWeights, minilm_dir};

/// Arguments of `fedsvd bench step`.
#[derive(Debug, Args)]
pub struct StepArgs {
    /// Examples per step.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Tokens per example (every example is exactly this long: the worst case).
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    /// Timed steps (after one warm-up step); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Time the same step without clipping and noise (the DP overhead is
    /// the ratio of the two).
    #[arg(long)]
    pub non_private: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &StepArgs) -> anyhow::Result<()> {
    let weights = BertWeights::from_dir(&minilm_dir()?).context("loading the MiniLM weights")?;
    let config = StepBenchConfig {
        batch: args.batch,
        seq: args.seq,
        steps: args.steps,
        private: !args.non_private,
    };
    let r = run_step_benchmark(weights, config)?;
    if args.json {
        let out = serde_json::json!({
            "examples_per_s": r.examples_per_s,
            "step_s": r.step_s,
            "batch": args.batch,
            "seq": args.seq,
            "private": !args.non_private,
            "threads": r.threads,
            "peak_rss_mib": r.peak_rss_mib,
            "steps_s": r.times_s,
        });
        println!("{}", serde_json::to_string(&out)?);
    } else {
        let what = if args.non_private {
            "non-private step (no clipping, no noise)"
        } else {
            "DP-SGD step (C=2, sigma=1)"
        };
        println!(
            "{what} on MiniLM (LoRA r=8 on query/value, B only): batch {} x seq {}, {} threads",
            args.batch, args.seq, r.threads
        );
        println!(
            "  median of {} steps: {:.3} s/step = {:.1} examples/s",
            args.steps, r.step_s, r.examples_per_s
        );
        if let Some(p) = r.peak_rss_mib {
            println!("  peak resident memory: {p:.0} MiB");
        }
    }
    Ok(())
}
