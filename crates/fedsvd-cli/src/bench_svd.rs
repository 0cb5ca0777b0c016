//! `fedsvd bench svd`: wall time of the three refactorization paths on the
//! adapter shapes of MiniLM and RoBERTa-large, and their largest error.

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use fedsvd_linalg::{Method, RsvdParams, refactorize_many_in_place, refactorize_many_with};
use ndarray::{Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::Serialize;

/// Arguments of `fedsvd bench svd`.
#[derive(Debug, Args)]
pub struct SvdArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Timed repetitions of the factored and randomized paths (the median is
    /// reported).
    #[arg(long, default_value_t = 30)]
    repeats: usize,
    /// Timed repetitions of the dense path (slow: seconds per repetition).
    #[arg(long, default_value_t = 1)]
    dense_repeats: usize,
    /// Seed of the random adapter factors.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// One benchmark case: the q and v adapters of a model.
struct Case {
    name: &'static str,
    modules: usize,
    d_out: usize,
    d_in: usize,
    rank: usize,
}

/// MiniLM-L6 has 6 layers × {q, v} of 384 × 384; RoBERTa-large 24 layers ×
/// {q, v} of 1024 × 1024.
const CASES: [Case; 2] = [
    Case {
        name: "minilm-qv",
        modules: 12,
        d_out: 384,
        d_in: 384,
        rank: 8,
    },
    Case {
        name: "roberta-large-qv",
        modules: 48,
        d_out: 1024,
        d_in: 1024,
        rank: 8,
    },
];

/// One row of the JSON output (field names fixed by the issue).
#[derive(Debug, Serialize)]
struct CaseResult {
    name: &'static str,
    modules: usize,
    d_out: usize,
    d_in: usize,
    rank: usize,
    dense_ms: f64,
    randomized_ms: f64,
    factored_ms: f64,
    max_rel_err: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    cases: Vec<CaseResult>,
}

/// Randomized-path parameters: sketch of r + 8 columns, one power
/// iteration (exact for rank-r products in exact arithmetic).
const RSVD: RsvdParams = RsvdParams {
    rank: 8,
    oversampling: 8,
    power_iterations: 1,
    seed: 0,
};

/// Runs the benchmark and prints a table or (`--json`) one JSON object.
pub fn run(args: &SvdArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.repeats >= 1, "--repeats must be at least 1");
    anyhow::ensure!(
        args.dense_repeats >= 1,
        "--dense-repeats must be at least 1"
    );
    let mut cases = Vec::new();
    for case in &CASES {
        let modules = adapter_factors(case, args.seed);
        let views: Vec<(ArrayView2<'_, f64>, ArrayView2<'_, f64>)> =
            modules.iter().map(|(b, a)| (b.view(), a.view())).collect();
        let methods = [
            ("dense", Method::Dense, args.dense_repeats, false),
            ("randomized", Method::Randomized(RSVD), args.repeats, true),
            ("factored", Method::Factored, args.repeats, true),
        ];
        let mut times = [0.0f64; 3];
        let mut errors = [0.0f64; 3];
        for (slot, (label, method, repeats, warm_up)) in methods.into_iter().enumerate() {
            let (ms, out) = if method == Method::Factored {
                time_in_place(repeats, &modules)
            } else {
                time_median(repeats, warm_up, || refactorize_many_with(&views, method))
            }
            .with_context(|| format!("{}: {label} refactorization", case.name))?;
            times[slot] = ms;
            errors[slot] = max_relative_error(&modules, &out);
            if !args.json {
                eprintln!(
                    "{} {label}: {ms:.3} ms, max rel err {:.2e}",
                    case.name, errors[slot]
                );
            }
        }
        cases.push(CaseResult {
            name: case.name,
            modules: case.modules,
            d_out: case.d_out,
            d_in: case.d_in,
            rank: case.rank,
            dense_ms: times[0],
            randomized_ms: times[1],
            factored_ms: times[2],
            max_rel_err: errors.iter().copied().fold(0.0, f64::max),
        });
    }
    if args.json {
        println!("{}", serde_json::to_string(&Report { cases })?);
    } else {
        print_table(&cases);
    }
    Ok(())
}

/// Random LoRA factors at the scale training produces: A ~ N(0, 1/d_in)
/// (the usual initialisation), B ~ N(0, 0.02²) (trained away from zero).
fn adapter_factors(case: &Case, seed: u64) -> Vec<(Array2<f64>, Array2<f64>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut normal = |rows: usize, cols: usize, scale: f64| {
        Array2::from_shape_simple_fn((rows, cols), || {
            scale * rng.sample::<f64, _>(StandardNormal)
        })
    };
    (0..case.modules)
        .map(|_| {
            let b = normal(case.d_out, case.rank, 0.02);
            let a = normal(case.rank, case.d_in, 1.0 / (case.d_in as f64).sqrt());
            (b, a)
        })
        .collect()
}

/// Runs `f` once untimed when `warm_up` (caches, thread pool), then
/// `repeats ≥ 1` times; returns the median wall time in ms and the last
/// output. The slow dense path skips the warm-up: seconds dwarf cold caches.
fn time_median<T, E>(
    repeats: usize,
    warm_up: bool,
    mut f: impl FnMut() -> Result<T, E>,
) -> Result<(f64, T), E> {
    if warm_up {
        f()?;
    }
    let mut samples = Vec::with_capacity(repeats);
    let mut out = None;
    for _ in 0..repeats {
        let start = Instant::now();
        out = Some(f()?);
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let out = out.expect("repeats ≥ 1 is checked by the caller");
    Ok((median(samples), out))
}

/// The median of ≥ 1 timings (the upper one of an even count).
fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// One module's `(B, A)`.
type Factors = (Array2<f64>, Array2<f64>);

/// The factored path as the server runs it
/// ([`refactorize_many_in_place`], no allocation once warm): each of one
/// warm-up and `repeats` timed runs works on a fresh copy of the modules,
/// made outside the timed region. Returns the median in ms and the last
/// result.
fn time_in_place(
    repeats: usize,
    modules: &[Factors],
) -> Result<(f64, Vec<Factors>), fedsvd_linalg::Error> {
    let mut samples = Vec::with_capacity(repeats);
    let mut out = Vec::new();
    for run in 0..=repeats {
        let mut fresh = modules.to_vec();
        let mut views: Vec<_> = fresh
            .iter_mut()
            .map(|(b, a)| (b.view_mut(), a.view_mut()))
            .collect();
        let start = Instant::now();
        refactorize_many_in_place(&mut views)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if run > 0 {
            samples.push(ms);
        }
        out = fresh;
    }
    Ok((median(samples), out))
}

/// Largest ‖B_new·A_new − B·A‖_F / ‖B·A‖_F over the modules, formed
/// densely (outside the timed region) so nothing cancels.
fn max_relative_error(
    modules: &[(Array2<f64>, Array2<f64>)],
    out: &[(Array2<f64>, Array2<f64>)],
) -> f64 {
    modules
        .iter()
        .zip(out)
        .map(|((b, a), (b_new, a_new))| {
            let m = b.dot(a);
            let diff = &b_new.dot(a_new) - &m;
            frob(&diff) / frob(&m)
        })
        .fold(0.0, f64::max)
}

fn frob(a: &Array2<f64>) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn print_table(cases: &[CaseResult]) {
    println!(
        "{:<18} {:>7} {:>11} {:>5} {:>12} {:>14} {:>12} {:>12} {:>11}",
        "case",
        "modules",
        "shape",
        "rank",
        "dense ms",
        "randomized ms",
        "factored ms",
        "dense/fact",
        "max rel err"
    );
    for c in cases {
        println!(
            "{:<18} {:>7} {:>11} {:>5} {:>12.1} {:>14.3} {:>12.3} {:>11.0}x {:>11.2e}",
            c.name,
            c.modules,
            format!("{}x{}", c.d_out, c.d_in),
            c.rank,
            c.dense_ms,
            c.randomized_ms,
            c.factored_ms,
            c.dense_ms / c.factored_ms,
            c.max_rel_err
        );
    }
}
