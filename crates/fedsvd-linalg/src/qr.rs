//! Thin Householder QR, tuned for the tall-skinny matrices of LoRA factors.
//!
//! Columns are stored contiguously (one `m`-long slice per column) so every
//! reflector update is a unit-stride dot product and axpy.

use ndarray::{Array2, ArrayView2};

use crate::kernels::{axpy, dot, norm2, scal};
use crate::scalar::{check_finite, check_nonempty};
use crate::{Real, Result};

/// A Householder QR factorization `M = Q·R` of an `m × n` matrix held as
/// `n` contiguous columns. `Q = H_0·H_1···H_{k-1}`, `k = min(m, n)`, with
/// `H_j = I − τ_j v_j v_jᵀ`, `v_j = [0…0, 1, tail_j]`; the tails live below
/// the diagonal of the column buffer and `R` on and above it.
#[derive(Debug, Clone)]
pub(crate) struct Householder<T> {
    m: usize,
    n: usize,
    cols: Vec<T>,
    tau: Vec<T>,
}

impl<T: Real> Householder<T> {
    /// Factors the `m × n` matrix whose column `j` is `cols[j*m .. (j+1)*m]`.
    pub(crate) fn factor(m: usize, n: usize, mut cols: Vec<T>) -> Self {
        debug_assert_eq!(cols.len(), m * n);
        let k = m.min(n);
        let mut tau = vec![T::zero(); k];
        for j in 0..k {
            let (head, rest) = cols.split_at_mut((j + 1) * m);
            let col = &mut head[j * m..];
            let alpha = col[j];
            let tail_norm = norm2(&col[j + 1..]);
            if tail_norm == T::zero() {
                // Already upper triangular in this column: H_j = I.
                continue;
            }
            let norm = hypot(alpha, tail_norm);
            let beta = if alpha >= T::zero() { -norm } else { norm };
            tau[j] = (beta - alpha) / beta;
            scal(T::one() / (alpha - beta), &mut col[j + 1..]);
            col[j] = beta;
            let v = &col[j + 1..];
            let t = tau[j];
            for other in rest.chunks_exact_mut(m) {
                let s = t * (other[j] + dot(v, &other[j + 1..]));
                other[j] -= s;
                axpy(-s, v, &mut other[j + 1..]);
            }
        }
        Self { m, n, cols, tau }
    }

    /// Gives back the column buffer (reflectors and R), for reuse.
    pub(crate) fn into_columns(self) -> Vec<T> {
        self.cols
    }

    /// Number of reflectors, `min(m, n)`.
    pub(crate) fn k(&self) -> usize {
        self.tau.len()
    }

    /// `R[i][j]` for `i ≤ j` (`i < k`), zero below the diagonal.
    #[inline]
    pub(crate) fn r(&self, i: usize, j: usize) -> T {
        if i <= j {
            self.cols[j * self.m + i]
        } else {
            T::zero()
        }
    }

    /// The `k × n` upper-trapezoidal factor R.
    pub(crate) fn r_matrix(&self) -> Array2<T> {
        Array2::from_shape_fn((self.k(), self.n), |(i, j)| self.r(i, j))
    }

    /// Overwrites each `m`-long chunk `z` of `rows` by `Q·z`.
    pub(crate) fn apply_q(&self, rows: &mut [T]) {
        let m = self.m;
        for z in rows.chunks_exact_mut(m) {
            for j in (0..self.k()).rev() {
                let t = self.tau[j];
                if t == T::zero() {
                    continue;
                }
                let v = &self.cols[j * m + j + 1..(j + 1) * m];
                let s = t * (z[j] + dot(v, &z[j + 1..]));
                z[j] -= s;
                axpy(-s, v, &mut z[j + 1..]);
            }
        }
    }

    /// The thin `m × k` factor Q, as `k` contiguous columns (column `j` is
    /// `Q·e_j`).
    pub(crate) fn thin_q_columns(&self) -> Vec<T> {
        let (m, k) = (self.m, self.k());
        let mut q = vec![T::zero(); m * k];
        for j in 0..k {
            q[j * m + j] = T::one();
        }
        self.apply_q(&mut q);
        q
    }
}

/// `sqrt(a² + b²)` without intermediate overflow.
#[inline]
pub(crate) fn hypot<T: Real>(a: T, b: T) -> T {
    let (a, b) = (a.abs(), b.abs());
    let (big, small) = if a > b { (a, b) } else { (b, a) };
    if big == T::zero() {
        return T::zero();
    }
    let r = small / big;
    big * (T::one() + r * r).sqrt()
}

/// Columns of `a` as one contiguous buffer (`m` values per column).
pub(crate) fn columns_of<T: Real>(a: ArrayView2<'_, T>) -> Vec<T> {
    let (m, n) = a.dim();
    let mut cols = vec![T::zero(); m * n];
    for (i, row) in a.outer_iter().enumerate() {
        for (j, &x) in row.iter().enumerate() {
            cols[j * m + i] = x;
        }
    }
    cols
}

/// `m × k` matrix from `k` contiguous columns of length `m`.
pub(crate) fn matrix_from_columns<T: Real>(m: usize, k: usize, cols: &[T]) -> Array2<T> {
    Array2::from_shape_fn((m, k), |(i, j)| cols[j * m + i])
}

/// Thin QR factorization `A = Q·R` by Householder reflections.
///
/// For an `m × n` matrix with `k = min(m, n)`, returns `Q` (`m × k`,
/// orthonormal columns) and `R` (`k × n`, upper trapezoidal). Works for
/// rank-deficient input (Q stays orthonormal). Errors on an empty or
/// non-finite matrix.
///
/// ```
/// use ndarray::array;
/// let a = array![[1.0_f64, 2.0], [3.0, 4.0], [5.0, 6.0]];
/// let (q, r) = fedsvd_linalg::thin_qr(a.view()).unwrap();
/// let back = q.dot(&r);
/// assert!((&back - &a).iter().all(|x| x.abs() < 1e-12));
/// ```
pub fn thin_qr<T: Real>(a: ArrayView2<'_, T>) -> Result<(Array2<T>, Array2<T>)> {
    check_nonempty("thin_qr input", a)?;
    check_finite("thin_qr input", a)?;
    let (m, n) = a.dim();
    let h = Householder::factor(m, n, columns_of(a));
    let q = matrix_from_columns(m, h.k(), &h.thin_q_columns());
    Ok((q, h.r_matrix()))
}

/// An orthonormal basis of the column space of `y` (`m × n`, `n ≤ m`
/// expected): the thin Q of its QR factorization.
pub(crate) fn orthonormal_basis<T: Real>(y: ArrayView2<'_, T>) -> Array2<T> {
    let (m, n) = y.dim();
    let h = Householder::factor(m, n, columns_of(y));
    matrix_from_columns(m, h.k(), &h.thin_q_columns())
}
