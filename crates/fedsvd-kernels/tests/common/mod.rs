//! Helpers shared by the integration tests (included with `mod common`).
#![allow(dead_code)]

use fedsvd_kernels::{BatchStrides, GemmSpec};
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

/// f64 reference of a strided-batched row-major GEMM and the bound
/// Σ|a||b| of each element (the scale of its rounding error).
pub fn gemm_f64(
    spec: &GemmSpec,
    batch: &BatchStrides,
    a: &[f32],
    b: &[f32],
    c: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let mut out: Vec<f64> = c.iter().map(|&v| f64::from(v)).collect();
    let mut bound = vec![0.0f64; c.len()];
    for p in 0..batch.count {
        for i in 0..spec.m {
            for j in 0..spec.n {
                let (mut s, mut sb) = (0.0f64, 0.0f64);
                for l in 0..spec.k {
                    let av = if spec.trans_a {
                        a[spec.offset_a + p * batch.stride_a + l * spec.lda + i]
                    } else {
                        a[spec.offset_a + p * batch.stride_a + i * spec.lda + l]
                    };
                    let bv = if spec.trans_b {
                        b[spec.offset_b + p * batch.stride_b + j * spec.ldb + l]
                    } else {
                        b[spec.offset_b + p * batch.stride_b + l * spec.ldb + j]
                    };
                    s += f64::from(av) * f64::from(bv);
                    sb += (f64::from(av) * f64::from(bv)).abs();
                }
                let o = spec.offset_c + p * batch.stride_c + i * spec.ldc + j;
                let old = if spec.beta == 0.0 {
                    0.0
                } else {
                    f64::from(spec.beta) * f64::from(c[o])
                };
                out[o] = f64::from(spec.alpha) * s + old;
                bound[o] = f64::from(spec.alpha.abs()) * sb + old.abs();
            }
        }
    }
    (out, bound)
}
