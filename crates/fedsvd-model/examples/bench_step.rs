//! `cargo run --example bench_step -p fedsvd-model [BATCH SEQ STEPS]`: the
//! DP-SGD step benchmark without the CLI (same code as `fedsvd bench step`).

use fedsvd_model::bench::{StepBenchConfig, run_step_benchmark};
use fedsvd_model::{BertWeights, minilm_dir};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let config = StepBenchConfig {
        batch: args.first().copied().unwrap_or(32),
        seq: args.get(1).copied().unwrap_or(64),
        steps: args.get(2).copied().unwrap_or(5),
    };
    let weights = BertWeights::from_dir(&minilm_dir()?)?;
    let r = run_step_benchmark(weights, config)?;
    println!(
        "batch {} seq {}: {:.3} s/step, {:.1} examples/s, threads {}, peak {:?} MiB, steps {:?}",
        config.batch, config.seq, r.step_s, r.examples_per_s, r.threads, r.peak_rss_mib, r.times_s
    );
    Ok(())
}
