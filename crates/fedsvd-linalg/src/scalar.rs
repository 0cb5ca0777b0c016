//! The two floating-point types the crate works in.

use ndarray::{Array1, Array2, ArrayView2};

use crate::{Error, Result};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// `f32` or `f64`: the element types every routine here accepts.
///
/// Sealed: the kernels rely on IEEE semantics and on faer supporting the
/// type, so no other implementor is admitted.
pub trait Real:
    sealed::Sealed
    + ndarray::LinalgScalar
    + ndarray::ScalarOperand
    + PartialOrd
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::fmt::Debug
    + std::fmt::Display
    + Send
    + Sync
    + 'static
{
    /// Machine epsilon (distance from 1 to the next representable number).
    const EPSILON: Self;
    /// Smallest positive normal number.
    const MIN_POSITIVE: Self;
    /// Converts from f64, rounding to nearest.
    fn from_f64(x: f64) -> Self;
    /// Widens to f64 (exact).
    fn to_f64(self) -> f64;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Absolute value.
    fn abs(self) -> Self;
    /// Neither NaN nor infinite.
    fn is_finite(self) -> bool;
    /// Dot product kernel (SIMD-dispatched); crate-internal.
    #[doc(hidden)]
    fn dot_kernel(a: &[Self], b: &[Self]) -> Self;
    /// `y += alpha·x` kernel (SIMD-dispatched); crate-internal.
    #[doc(hidden)]
    fn axpy_kernel(alpha: Self, x: &[Self], y: &mut [Self]);
    /// The slice as `f64` when `Self` is `f64` (None for `f32`), so f64
    /// buffers can be used in place; crate-internal.
    #[doc(hidden)]
    fn as_f64_mut(values: &mut [Self]) -> Option<&mut [f64]>;
    /// Dense thin SVD through faer: `(U, s, Vᵀ)`, singular values
    /// descending. Input must be finite and non-empty (checked by callers).
    fn faer_thin_svd(a: ArrayView2<'_, Self>)
    -> Result<(Array2<Self>, Array1<Self>, Array2<Self>)>;
    /// Singular values only through faer, descending. Input must be finite
    /// and non-empty (checked by callers).
    fn faer_singular_values(a: ArrayView2<'_, Self>) -> Result<Array1<Self>>;
}

macro_rules! impl_real {
    ($t:ty, $dot:ident, $axpy:ident, $as_f64:expr) => {
        impl Real for $t {
            #[inline]
            fn as_f64_mut(values: &mut [Self]) -> Option<&mut [f64]> {
                $as_f64(values)
            }
            #[inline]
            fn dot_kernel(a: &[Self], b: &[Self]) -> Self {
                #[cfg(target_arch = "x86_64")]
                if crate::kernels::x86::has_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked above).
                    return unsafe { crate::kernels::x86::$dot(a, b) };
                }
                crate::kernels::dot_portable(a, b)
            }
            #[inline]
            fn axpy_kernel(alpha: Self, x: &[Self], y: &mut [Self]) {
                #[cfg(target_arch = "x86_64")]
                if crate::kernels::x86::has_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked above).
                    return unsafe { crate::kernels::x86::$axpy(alpha, x, y) };
                }
                crate::kernels::axpy_portable(alpha, x, y)
            }
            const EPSILON: Self = <$t>::EPSILON;
            const MIN_POSITIVE: Self = <$t>::MIN_POSITIVE;
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            fn faer_thin_svd(
                a: ArrayView2<'_, Self>,
            ) -> Result<(Array2<Self>, Array1<Self>, Array2<Self>)> {
                let (m, n) = a.dim();
                let owned = a.as_standard_layout();
                let svd = faer_view(&owned)
                    .thin_svd()
                    .map_err(|e| no_convergence(m, n, "faer thin SVD", e))?;
                let k = m.min(n);
                let (u, v, s) = (svd.U(), svd.V(), svd.S().column_vector());
                let u_out = Array2::from_shape_fn((m, k), |(i, j)| u[(i, j)]);
                let vt_out = Array2::from_shape_fn((k, n), |(i, j)| v[(j, i)]);
                let s_out = Array1::from_shape_fn(k, |i| s[i]);
                Ok((u_out, s_out, vt_out))
            }
            fn faer_singular_values(a: ArrayView2<'_, Self>) -> Result<Array1<Self>> {
                let (m, n) = a.dim();
                let owned = a.as_standard_layout();
                let s = faer_view(&owned)
                    .singular_values()
                    .map_err(|e| no_convergence(m, n, "faer singular values", e))?;
                Ok(Array1::from(s))
            }
        }
    };
}

/// A standard-layout matrix as a row-major faer view (no copy).
fn faer_view<'a, T>(owned: &'a ndarray::CowArray<'_, T, ndarray::Ix2>) -> faer::MatRef<'a, T> {
    let (m, n) = owned.dim();
    let slice = owned
        .as_slice()
        .expect("as_standard_layout yields a contiguous array");
    faer::MatRef::from_row_major_slice(slice, m, n)
}

/// A faer decomposition of an `m × n` input that did not converge.
fn no_convergence(m: usize, n: usize, what: &str, e: impl std::fmt::Debug) -> Error {
    Error::NoConvergence {
        rows: m,
        cols: n,
        detail: format!("{what}: {e:?}"),
    }
}

impl_real!(f32, dot_f32, axpy_f32, |_: &mut [f32]| None);
impl_real!(f64, dot_f64, axpy_f64, Some);

/// Fails with [`Error::NonFinite`] naming `what` at the first NaN/∞ entry.
pub(crate) fn check_finite<T: Real>(what: &str, a: ArrayView2<'_, T>) -> Result<()> {
    if let Some(slice) = a.as_slice_memory_order()
        && slice.iter().all(|x| x.is_finite())
    {
        return Ok(());
    }
    for ((row, col), &value) in a.indexed_iter() {
        if !value.is_finite() {
            return Err(Error::NonFinite {
                what: what.to_string(),
                row,
                col,
                value: value.to_f64(),
            });
        }
    }
    Ok(())
}

/// Fails with [`Error::Empty`] when `a` has no rows or no columns.
pub(crate) fn check_nonempty<T>(what: &str, a: ArrayView2<'_, T>) -> Result<()> {
    let (rows, cols) = a.dim();
    if rows == 0 || cols == 0 {
        return Err(Error::Empty {
            what: what.to_string(),
            rows,
            cols,
        });
    }
    Ok(())
}
