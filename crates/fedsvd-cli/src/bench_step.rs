//! `fedsvd bench step`: times one local step of the training path
//! (`fedsvd::train_locally`, what `fedsvd run` executes: forward, backward,
//! per-example clipping, the discrete Gaussian release, SGD update) on MiniLM
//! with r = 8 LoRA on query/value and only B trainable. With `--device
//! cuda` (or `auto` on a machine with a usable GPU) the same step runs on
//! the GPU engine of `fedsvd_model::gpu` (the clipped sum on the GPU, the
//! discrete Gaussian release and the SGD update on the host), on random
//! weights of the `--shape` size.

use anyhow::Context;
use clap::{Args, ValueEnum};
use fedsvd::bench::{
    BenchShape, GpuStepBenchConfig, StepBenchConfig, random_bench_weights, run_gpu_step_benchmark,
    run_step_benchmark,
};
use fedsvd_model::gpu::Precision;
use fedsvd_model::{BertWeights, minilm_dir};

/// Where the step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// CUDA when a device is usable, else the CPU.
    Auto,
    /// The CPU training path (`fedsvd::train_locally`).
    Cpu,
    /// The CUDA step of `fedsvd_model::gpu`.
    Cuda,
}

/// GEMM precision of the CUDA step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    /// Plain f32.
    F32,
    /// TF32 tensor cores.
    Tf32,
    /// bf16 inputs, f32 accumulation.
    Bf16,
}

/// Model size of random weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShapeArg {
    /// MiniLM-L6 (384 × 6 layers).
    Minilm,
    /// RoBERTa-large (1024 × 24 layers).
    RobertaLarge,
}

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
    /// Train the LoRA A factors too, as FedAvg-LoRA, FLoRA and FedEx-LoRA
    /// do (default: B only, as FedSVD and FFA-LoRA; the Opacus peers
    /// train B only).
    #[arg(long)]
    pub train_a: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Where the step runs.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// GEMM precision (cuda only).
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
    /// Random weights of this size instead of the real MiniLM from the
    /// assets (with `--device cuda`, random
    /// weights always; minilm when not given).
    #[arg(long, value_enum)]
    pub shape: Option<ShapeArg>,
}

fn shape_of(s: ShapeArg) -> BenchShape {
    match s {
        ShapeArg::Minilm => BenchShape::MiniLm,
        ShapeArg::RobertaLarge => BenchShape::RobertaLarge,
    }
}

fn run_cuda(args: &StepArgs) -> anyhow::Result<()> {
    let shape = shape_of(args.shape.unwrap_or(ShapeArg::Minilm));
    let (precision, pname) = match args.precision {
        PrecisionArg::F32 => (Precision::F32, "f32"),
        PrecisionArg::Tf32 => (Precision::Tf32, "tf32"),
        PrecisionArg::Bf16 => (Precision::Bf16, "bf16"),
    };
    let weights = random_bench_weights(shape);
    let config = GpuStepBenchConfig {
        batch: args.batch,
        seq: args.seq,
        steps: args.steps,
        private: !args.non_private,
        precision,
        train_a: args.train_a,
    };
    let r = run_gpu_step_benchmark(weights, config).context("the CUDA step benchmark")?;
    if args.json {
        let out = serde_json::json!({
            "bench": "step",
            "device": "cuda",
            "device_name": r.device,
            "shape": shape.name(),
            "precision": pname,
            "examples_per_s": r.examples_per_s,
            "step_s": r.step_s,
            "batch": args.batch,
            "seq": args.seq,
            "private": !args.non_private,
            "train_a": args.train_a,
            "model_bytes": r.model_bytes,
            "peak_device_bytes": r.peak_device_bytes,
            "peak_allocated_bytes": r.peak_allocated_bytes,
            "last_loss": r.last_loss,
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
            "{what} on {} ({}, {pname}, LoRA r=8 on query/value, {}): batch {} x seq {}",
            shape.name(),
            r.device,
            trained(args.train_a),
            args.batch,
            args.seq
        );
        println!(
            "  median of {} steps: {:.4} s/step = {:.1} examples/s",
            args.steps, r.step_s, r.examples_per_s
        );
        let mib = |b: Option<usize>| {
            b.map_or("n/a".into(), |b| {
                format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
            })
        };
        println!(
            "  device memory: {:.1} MiB allocated by the model, peak allocated {} \
             (as PyTorch's max_memory_allocated), peak in use {} beyond the context",
            r.model_bytes as f64 / (1 << 20) as f64,
            mib(r.peak_allocated_bytes),
            mib(r.peak_device_bytes)
        );
    }
    Ok(())
}

pub fn run(args: &StepArgs) -> anyhow::Result<()> {
    let cuda = match args.device {
        Device::Cuda => true,
        Device::Cpu => false,
        Device::Auto => fedsvd_model::gpu::cuda_available(),
    };
    if cuda {
        return run_cuda(args);
    }
    if args.precision != PrecisionArg::F32 {
        anyhow::bail!("--precision applies to --device cuda only (the CPU path is f32)");
    }
    let weights = match args.shape {
        Some(s) => random_bench_weights(shape_of(s)),
        None => BertWeights::from_dir(&minilm_dir()?).context("loading the MiniLM weights")?,
    };
    let config = StepBenchConfig {
        batch: args.batch,
        seq: args.seq,
        steps: args.steps,
        private: !args.non_private,
        train_a: args.train_a,
    };
    let r = run_step_benchmark(weights, config)?;
    if args.json {
        let out = serde_json::json!({
            "examples_per_s": r.examples_per_s,
            "step_s": r.step_s,
            "batch": args.batch,
            "seq": args.seq,
            "private": !args.non_private,
            "train_a": args.train_a,
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
            "{what} on MiniLM (LoRA r=8 on query/value, {}): batch {} x seq {}, {} threads",
            trained(args.train_a),
            args.batch,
            args.seq,
            r.threads
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

/// Arguments of the hidden `fedsvd bench random-model`.
#[derive(Debug, Args)]
pub struct RandomModelArgs {
    /// The architecture.
    #[arg(long, value_enum, default_value_t = ShapeArg::Minilm)]
    pub shape: ShapeArg,
    /// The `tokenizer.json` to put beside the weights (its vocabulary must
    /// fit the shape's).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: std::path::PathBuf,
    /// The model folder to write (`config.json`, `model.safetensors`,
    /// `tokenizer.json`).
    #[arg(long, value_name = "DIR")]
    pub out: std::path::PathBuf,
}

/// Writes a random model folder of a benchmark shape.
pub fn write_random_model(args: &RandomModelArgs) -> anyhow::Result<()> {
    let c = shape_of(args.shape).config();
    fedsvd_model::testing::write_random_model(&args.out, &c, &args.tokenizer)
        .with_context(|| format!("writing a random model to {}", args.out.display()))?;
    println!(
        "wrote a random {} model to {}",
        shape_of(args.shape).name(),
        args.out.display()
    );
    Ok(())
}

/// Which LoRA factors the benchmarked step trains, for the printed line.
fn trained(train_a: bool) -> &'static str {
    if train_a { "A and B" } else { "B only" }
}
