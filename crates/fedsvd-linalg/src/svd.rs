//! Thin SVD results, the dense reference SVD and the sign convention.

use ndarray::{Array1, Array2, ArrayView2, Axis};

use crate::scalar::{check_finite, check_nonempty};
use crate::{Error, Real, Result};

/// A thin singular value decomposition `M ≈ U·diag(s)·Vᵀ`.
///
/// `u` is `m × k` with orthonormal columns, `s` holds the `k` singular values
/// in descending order, `vt` is `k × n` with orthonormal rows.
///
/// Sign convention (all constructors in this crate): in every row of `vt`
/// (a right singular vector) the entry of largest magnitude — the first one
/// on a tie — is positive; the matching column of `u` carries the same flip,
/// so the product is unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct ThinSvd<T> {
    /// Left singular vectors, `m × k`.
    pub u: Array2<T>,
    /// Singular values, descending, length `k`.
    pub s: Array1<T>,
    /// Right singular vectors as rows, `k × n`.
    pub vt: Array2<T>,
}

impl<T: Real> ThinSvd<T> {
    /// Number of singular triplets held.
    pub fn rank(&self) -> usize {
        self.s.len()
    }

    /// `U·diag(s)·Vᵀ` as a dense matrix.
    pub fn reconstruct(&self) -> Array2<T> {
        self.u_sigma().dot(&self.vt)
    }

    /// `U·diag(s)` (`m × k`): the `B_new` of a refactorization.
    pub fn u_sigma(&self) -> Array2<T> {
        let mut us = self.u.clone();
        for (mut col, &s) in us.axis_iter_mut(Axis(1)).zip(self.s.iter()) {
            col *= s;
        }
        us
    }

    /// Keeps the leading `k` triplets; errors when `k` is zero or more than
    /// are held.
    pub fn truncate(mut self, k: usize) -> Result<Self> {
        if k == 0 || k > self.rank() {
            return Err(Error::InvalidParameter {
                name: "k",
                value: k.to_string(),
                reason: format!("must be in 1..={}", self.rank()),
            });
        }
        self.u = self.u.slice(ndarray::s![.., ..k]).to_owned();
        self.s = self.s.slice(ndarray::s![..k]).to_owned();
        self.vt = self.vt.slice(ndarray::s![..k, ..]).to_owned();
        Ok(self)
    }
}

/// Index of the entry of largest magnitude (the first on a tie).
pub(crate) fn argmax_abs<T: Real>(v: &[T]) -> usize {
    let mut best = 0;
    let mut best_abs = T::zero();
    for (i, &x) in v.iter().enumerate() {
        let a = x.abs();
        if a > best_abs {
            best = i;
            best_abs = a;
        }
    }
    best
}

/// Applies the sign convention in place: flips row `i` of `vt` and column
/// `i` of `u` when the largest-magnitude entry of the row is negative.
pub(crate) fn fix_signs<T: Real>(u: &mut Array2<T>, vt: &mut Array2<T>) {
    for i in 0..vt.nrows() {
        let row = vt.row(i);
        let idx = match row.as_slice() {
            Some(s) => argmax_abs(s),
            None => argmax_abs(&row.to_vec()),
        };
        if vt[[i, idx]] < T::zero() {
            vt.row_mut(i).mapv_inplace(|x| -x);
            u.column_mut(i).mapv_inplace(|x| -x);
        }
    }
}

/// Dense thin SVD of a full `m × n` matrix (faer's bidiagonal divide and
/// conquer), with singular values descending and the crate's sign
/// convention. This is the O(mn·min(m,n)) reference the fast paths are
/// checked against.
///
/// ```
/// use ndarray::array;
/// let m = array![[3.0_f64, 0.0], [0.0, -2.0], [0.0, 0.0]];
/// let svd = fedsvd_linalg::thin_svd(m.view()).unwrap();
/// assert!((svd.s[0] - 3.0).abs() < 1e-12 && (svd.s[1] - 2.0).abs() < 1e-12);
/// assert!((&svd.reconstruct() - &m).iter().all(|x| x.abs() < 1e-12));
/// ```
pub fn thin_svd<T: Real>(a: ArrayView2<'_, T>) -> Result<ThinSvd<T>> {
    check_nonempty("thin_svd input", a)?;
    check_finite("thin_svd input", a)?;
    let (mut u, s, mut vt) = T::faer_thin_svd(a)?;
    fix_signs(&mut u, &mut vt);
    Ok(ThinSvd { u, s, vt })
}

/// The singular values of a full `m × n` matrix, descending, without the
/// singular vectors: for spectra of tall matrices (a Gauss–Newton factor
/// with thousands of rows), where [`thin_svd`]'s vectors would cost most of
/// the time and memory.
///
/// ```
/// use ndarray::array;
/// let m = array![[0.0_f64, 2.0], [3.0, 0.0], [0.0, 0.0]];
/// let s = fedsvd_linalg::singular_values(m.view()).unwrap();
/// assert!((s[0] - 3.0).abs() < 1e-12 && (s[1] - 2.0).abs() < 1e-12);
/// ```
pub fn singular_values<T: Real>(a: ArrayView2<'_, T>) -> Result<Array1<T>> {
    check_nonempty("singular_values input", a)?;
    check_finite("singular_values input", a)?;
    T::faer_singular_values(a)
}

/// The reference refactorization: forms `M = B·A` densely, takes its thin
/// SVD and keeps the leading `r` triplets, returning
/// `(B_new, A_new) = (U_r·Σ_r, V_rᵀ)`. O(d_out·d_in·min(d_out, d_in)); use
/// [`crate::refactorize`] in real code.
pub fn refactorize_dense<T: Real>(
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
) -> Result<(Array2<T>, Array2<T>)> {
    let (_, r, _) = crate::factored::validate_product(b, a)?;
    let svd = thin_svd(b.dot(&a).view())?.truncate(r)?;
    Ok((svd.u_sigma(), svd.vt))
}
