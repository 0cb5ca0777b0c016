//! Helpers shared by the integration tests (included with `mod common`).
#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A fresh generator; the seed is printed so a failure can be replayed with
/// `FEDSVD_TEST_SEED`.
pub fn rng(test: &str) -> StdRng {
    let seed = std::env::var("FEDSVD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: FEDSVD_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

pub fn uniform(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// f64 reference of out_i = G_iᵀ H_i and the absolute-value bound
/// Σ_t |g||h| per element (the scale of the rounding error).
pub fn grads_f64(
    g: &[f32],
    h: &[f32],
    batch: usize,
    tokens: usize,
    d_out: usize,
    rank: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0f64; batch * d_out * rank];
    let mut bound = vec![0.0f64; batch * d_out * rank];
    for i in 0..batch {
        for t in 0..tokens {
            for m in 0..d_out {
                let gv = f64::from(g[(i * tokens + t) * d_out + m]);
                for n in 0..rank {
                    let hv = f64::from(h[(i * tokens + t) * rank + n]);
                    out[(i * d_out + m) * rank + n] += gv * hv;
                    bound[(i * d_out + m) * rank + n] += (gv * hv).abs();
                }
            }
        }
    }
    (out, bound)
}

/// Largest |a - b| / max(scale, tiny) over all elements.
pub fn max_rel(a: &[f32], b: &[f64], scale: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .zip(scale)
        .map(|((&x, &y), &s)| (f64::from(x) - y).abs() / s.max(1e-30))
        .fold(0.0, f64::max)
}

pub fn rel(a: f32, b: f32) -> f64 {
    let (a, b) = (f64::from(a), f64::from(b));
    (a - b).abs() / b.abs().max(1e-30)
}
