//! Helpers shared by the integration tests.
#![allow(dead_code)]

use fedsvd_linalg::{Real, thin_qr};
use ndarray::{Array1, Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn gaussian<T: Real>(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<T> {
    Array2::from_shape_simple_fn((rows, cols), || {
        T::from_f64(rng.sample::<f64, _>(StandardNormal))
    })
}

pub fn frob<T: Real>(a: ArrayView2<'_, T>) -> f64 {
    a.iter()
        .map(|x| x.to_f64() * x.to_f64())
        .sum::<f64>()
        .sqrt()
}

pub fn max_abs_diff<T: Real>(a: ArrayView2<'_, T>, b: ArrayView2<'_, T>) -> f64 {
    assert_eq!(a.dim(), b.dim());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x.to_f64() - y.to_f64()).abs())
        .fold(0.0, f64::max)
}

/// Largest deviation of `x·xᵀ` from the identity (rows orthonormal).
pub fn row_orthonormality_error<T: Real>(x: ArrayView2<'_, T>) -> f64 {
    let g = x.dot(&x.t());
    let eye = Array2::<T>::eye(x.nrows());
    max_abs_diff(g.view(), eye.view())
}

/// A random `rows × cols` matrix with orthonormal columns (`rows ≥ cols`).
pub fn orthonormal_columns(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Array2<f64> {
    thin_qr(gaussian::<f64>(rng, rows, cols).view()).unwrap().0
}

/// `U·diag(s)·Vᵀ` with random orthonormal U, V: a matrix with a known
/// spectrum.
pub fn with_spectrum(
    rng: &mut ChaCha8Rng,
    rows: usize,
    cols: usize,
    s: &Array1<f64>,
) -> Array2<f64> {
    let k = s.len();
    let mut u = orthonormal_columns(rng, rows, k);
    let v = orthonormal_columns(rng, cols, k);
    for (mut c, &sv) in u.columns_mut().into_iter().zip(s.iter()) {
        c *= sv;
    }
    u.dot(&v.t())
}

/// The sign convention: the largest-magnitude entry of each row is positive
/// (the first one on a tie).
pub fn rows_follow_sign_convention<T: Real>(vt: ArrayView2<'_, T>) -> bool {
    vt.rows().into_iter().all(|row| {
        let mut best = 0;
        for (i, x) in row.iter().enumerate() {
            if x.abs() > row[best].abs() {
                best = i;
            }
        }
        row[best] > T::zero()
    })
}
