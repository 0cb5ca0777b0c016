//! Dense kernels: GEMM wrappers over `matrixmultiply` and row-wise
//! LayerNorm, GELU and softmax. Every routine computes each output element
//! with a fixed operation order, so results do not depend on the number of
//! threads (matrixmultiply splits its work over disjoint output blocks, and
//! the row-wise kernels run one row per task).

use rayon::prelude::*;

/// A strided matrix view: element `(i, j)` is at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// Row-major `[rows, cols]`.
    pub fn rm(data: &'a [f32], cols: usize) -> Self {
        View {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major `[rows, cols]` matrix.
    pub fn rm_t(data: &'a [f32], cols: usize) -> Self {
        View {
            data,
            rs: 1,
            cs: cols,
        }
    }
    fn last(&self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * self.rs + (cols - 1) * self.cs + 1
        }
    }
}

/// `C ← beta·C + alpha·A·B` with `A` `[m, k]`, `B` `[k, n]`, `C` `[m, n]`
/// strided by `(rsc, csc)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: View<'_>,
    b: View<'_>,
    beta: f32,
    c: &mut [f32],
    rsc: usize,
    csc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Invariants of the callers (shapes validated at the API boundary); a
    // violation is a bug in this crate, never a user error.
    assert!(a.data.len() >= a.last(m, k), "gemm: A too small");
    assert!(b.data.len() >= b.last(k, n), "gemm: B too small");
    let c_last = (m - 1) * rsc + (n - 1) * csc + 1;
    assert!(c.len() >= c_last, "gemm: C too small");
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                c[i * rsc + j * csc] *= beta;
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every access of the three strided
    // matrices inside their slices; `c` is borrowed mutably and does not
    // alias `a` or `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        );
    }
}

/// [`gemm`] for tall `A`/`C` (many tokens). matrixmultiply splits large
/// products over its own threads by disjoint output blocks, which keeps every
/// element's operation order fixed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_par(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: View<'_>,
    b: View<'_>,
    beta: f32,
    c: &mut [f32],
    rsc: usize,
) {
    gemm(m, k, n, alpha, a, b, beta, c, rsc, 1);
}

/// `Y[n, d_out] = X[n, d_in] · Wᵀ + bias` with `W` `[d_out, d_in]`.
pub(crate) fn linear(x: &[f32], w: &[f32], bias: &[f32], d_in: usize, d_out: usize, y: &mut [f32]) {
    let n = x.len() / d_in;
    for row in y.chunks_exact_mut(d_out) {
        row.copy_from_slice(bias);
    }
    gemm(
        n,
        d_in,
        d_out,
        1.0,
        View::rm(x, d_in),
        View::rm_t(w, d_in),
        1.0,
        y,
        d_out,
        1,
    );
}

/// `dX[n, d_in] (+)= dY[n, d_out] · W` with `W` `[d_out, d_in]`.
pub(crate) fn linear_backward(
    dy: &[f32],
    w: &[f32],
    d_in: usize,
    d_out: usize,
    dx: &mut [f32],
    accumulate: bool,
) {
    let n = dy.len() / d_out;
    gemm(
        n,
        d_out,
        d_in,
        1.0,
        View::rm(dy, d_out),
        View::rm(w, d_in),
        if accumulate { 1.0 } else { 0.0 },
        dx,
        d_in,
        1,
    );
}

/// Rows per rayon task in the row-wise kernels.
const ROWS: usize = 16;

/// LayerNorm of every row of `x` (width `h`) into `y`; keeps the normalized
/// rows and reciprocal standard deviations for the backward pass when asked.
pub(crate) fn layer_norm(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    y: &mut [f32],
    mut save: Option<(&mut [f32], &mut [f32])>,
) {
    let h = gamma.len();
    let one = |xr: &[f32], yr: &mut [f32], xhat: Option<&mut [f32]>, rstd_out: Option<&mut f32>| {
        let mean = xr.iter().sum::<f32>() / h as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        match xhat {
            Some(xh) => {
                for j in 0..h {
                    let z = (xr[j] - mean) * rstd;
                    xh[j] = z;
                    yr[j] = z * gamma[j] + beta[j];
                }
            }
            None => {
                for j in 0..h {
                    yr[j] = (xr[j] - mean) * rstd * gamma[j] + beta[j];
                }
            }
        }
        if let Some(r) = rstd_out {
            *r = rstd;
        }
    };
    match save.as_mut() {
        Some((xhat, rstd)) => {
            x.par_chunks(ROWS * h)
                .zip(y.par_chunks_mut(ROWS * h))
                .zip(xhat.par_chunks_mut(ROWS * h))
                .zip(rstd.par_chunks_mut(ROWS))
                .for_each(|(((xc, yc), hc), rc)| {
                    for (((xr, yr), hr), r) in xc
                        .chunks_exact(h)
                        .zip(yc.chunks_exact_mut(h))
                        .zip(hc.chunks_exact_mut(h))
                        .zip(rc.iter_mut())
                    {
                        one(xr, yr, Some(hr), Some(r));
                    }
                });
        }
        None => {
            x.par_chunks(ROWS * h)
                .zip(y.par_chunks_mut(ROWS * h))
                .for_each(|(xc, yc)| {
                    for (xr, yr) in xc.chunks_exact(h).zip(yc.chunks_exact_mut(h)) {
                        one(xr, yr, None, None);
                    }
                });
        }
    }
}

/// Backward of LayerNorm with frozen scale: `dy` is replaced in place by the
/// gradient with respect to the LayerNorm input.
pub(crate) fn layer_norm_backward(dy: &mut [f32], xhat: &[f32], rstd: &[f32], gamma: &[f32]) {
    let h = gamma.len();
    dy.par_chunks_mut(ROWS * h)
        .zip(xhat.par_chunks(ROWS * h))
        .zip(rstd.par_chunks(ROWS))
        .for_each(|((dc, hc), rc)| {
            for ((d, xh), &r) in dc.chunks_exact_mut(h).zip(hc.chunks_exact(h)).zip(rc) {
                let mut s1 = 0.0f32;
                let mut s2 = 0.0f32;
                for j in 0..h {
                    let g = d[j] * gamma[j];
                    s1 += g;
                    s2 += g * xh[j];
                }
                let m1 = s1 / h as f32;
                let m2 = s2 / h as f32;
                for j in 0..h {
                    d[j] = r * (d[j] * gamma[j] - m1 - xh[j] * m2);
                }
            }
        });
}

/// erf with absolute error below 1.5e-7 (Abramowitz & Stegun 7.1.26), also
/// returning `exp(-x²)` which the GELU derivative reuses.
#[inline]
fn erf_and_gauss(x: f32) -> (f32, f32) {
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * ax);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let g = (-ax * ax).exp();
    let y = 1.0 - poly * g;
    (if x < 0.0 { -y } else { y }, g)
}

/// In place `x ← gelu(x) = x·Φ(x)` (erf form); when `deriv` is given it
/// receives `gelu'(x) = Φ(x) + x·φ(x)`.
pub(crate) fn gelu(x: &mut [f32], deriv: Option<&mut [f32]>) {
    const CHUNK: usize = 4096;
    let inv_sqrt2 = std::f32::consts::FRAC_1_SQRT_2;
    let inv_sqrt_2pi = 0.398_942_3_f32;
    match deriv {
        Some(d) => x
            .par_chunks_mut(CHUNK)
            .zip(d.par_chunks_mut(CHUNK))
            .for_each(|(xc, dc)| {
                for (v, dv) in xc.iter_mut().zip(dc.iter_mut()) {
                    let (e, g) = erf_and_gauss(*v * inv_sqrt2);
                    let cdf = 0.5 * (1.0 + e);
                    *dv = cdf + *v * inv_sqrt_2pi * g;
                    *v *= cdf;
                }
            }),
        None => x.par_chunks_mut(CHUNK).for_each(|xc| {
            for v in xc.iter_mut() {
                let (e, _) = erf_and_gauss(*v * inv_sqrt2);
                *v *= 0.5 * (1.0 + e);
            }
        }),
    }
}

/// In-place softmax of one row.
#[inline]
pub(crate) fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_reference_values() {
        // erf(0.5), erf(1), erf(2), erf(-1.3) to 9 digits.
        for (x, want) in [
            (0.5f32, 0.520_499_878f64),
            (1.0, 0.842_700_793),
            (2.0, 0.995_322_265),
            (-1.3, -0.934_007_945),
            (0.0, 0.0),
        ] {
            let (e, _) = erf_and_gauss(x);
            assert!(
                (e as f64 - want).abs() < 5e-7,
                "erf({x}) = {e}, want {want}"
            );
        }
    }

    #[test]
    fn gelu_derivative_matches_finite_difference() {
        let xs: Vec<f32> = (-40..=40).map(|i| i as f32 * 0.1).collect();
        let mut y = xs.clone();
        let mut d = vec![0.0; xs.len()];
        gelu(&mut y, Some(&mut d));
        for (i, &x) in xs.iter().enumerate() {
            let f = |v: f64| v * 0.5 * (1.0 + erf_and_gauss((v / 2f64.sqrt()) as f32).0 as f64);
            let num = (f(x as f64 + 1e-3) - f(x as f64 - 1e-3)) / 2e-3;
            assert!((num - d[i] as f64).abs() < 1e-3, "x={x}: {num} vs {}", d[i]);
        }
    }

    #[test]
    fn gemm_matches_naive_with_strides() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let bias = vec![0.5, -1.0, 2.0];
        let mut y = vec![0.0; m * n];
        linear(&a, &w, &bias, k, n, &mut y);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = bias[j] + (0..k).map(|t| a[i * k + t] * w[j * k + t]).sum::<f32>();
                assert!((y[i * n + j] - want).abs() < 1e-5);
            }
        }
    }
}
