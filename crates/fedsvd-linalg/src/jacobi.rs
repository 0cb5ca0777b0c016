//! One-sided (Hestenes) Jacobi SVD for the small cores of the factored and
//! randomized SVDs. Singular values come out with high relative accuracy and
//! the accumulated rotation is orthogonal to working precision.

use crate::kernels::dot;
use crate::{Error, Real, Result};

/// Sweeps after which the iteration is declared stuck. Quadratic
/// convergence makes 6–10 sweeps typical for the sizes used here.
const MAX_SWEEPS: usize = 80;

/// Rotates the `n` columns of `x` (each `m` long, contiguous) until they are
/// mutually orthogonal, applying the same rotations to the `n × n` matrix
/// `v` (columns contiguous). On return `x_new = x_old · v_rot`, so with `v`
/// entering as the identity, `x_old = x_new · vᵀ` is an SVD up to column
/// norms.
pub(crate) fn one_sided_jacobi<T: Real>(
    m: usize,
    n: usize,
    x: &mut [T],
    v: &mut [T],
) -> Result<()> {
    debug_assert_eq!(x.len(), m * n);
    debug_assert_eq!(v.len(), n * n);
    let tol = T::EPSILON * T::from_f64((m.max(1) as f64).sqrt());
    for _sweep in 0..MAX_SWEEPS {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (xp, xq) = pair(x, m, p, q);
                let a = dot(xp, xp);
                let b = dot(xq, xq);
                let c = dot(xp, xq);
                if c == T::zero() || c.abs() <= tol * a.sqrt() * b.sqrt() {
                    continue;
                }
                rotated = true;
                let (cs, sn) = rotation(a, b, c);
                rotate(xp, xq, cs, sn);
                let (vp, vq) = pair(v, n, p, q);
                rotate(vp, vq, cs, sn);
            }
        }
        if !rotated {
            return Ok(());
        }
    }
    Err(Error::NoConvergence {
        rows: m,
        cols: n,
        detail: format!("one-sided Jacobi exceeded {MAX_SWEEPS} sweeps"),
    })
}

/// Columns `p < q` of a column-contiguous buffer as two disjoint slices.
#[inline]
fn pair<T>(buf: &mut [T], len: usize, p: usize, q: usize) -> (&mut [T], &mut [T]) {
    let (lo, hi) = buf.split_at_mut(q * len);
    (&mut lo[p * len..(p + 1) * len], &mut hi[..len])
}

/// The rotation `[[cs, sn], [−sn, cs]]` that makes the two columns with
/// Gram entries `a = ‖x_p‖²`, `b = ‖x_q‖²`, `c = x_p·x_q` orthogonal, using
/// the smaller of the two angles (Rutishauser's formulas).
#[inline]
fn rotation<T: Real>(a: T, b: T, c: T) -> (T, T) {
    let two = T::from_f64(2.0);
    let zeta = (b - a) / (two * c);
    let az = zeta.abs();
    let root = if az > T::one() {
        let inv = T::one() / az;
        az * (T::one() + inv * inv).sqrt()
    } else {
        (T::one() + zeta * zeta).sqrt()
    };
    let mut t = T::one() / (az + root);
    if zeta < T::zero() {
        t = -t;
    }
    let cs = T::one() / (T::one() + t * t).sqrt();
    (cs, cs * t)
}

#[inline]
fn rotate<T: Real>(xp: &mut [T], xq: &mut [T], cs: T, sn: T) {
    for (p, q) in xp.iter_mut().zip(xq.iter_mut()) {
        let (a, b) = (*p, *q);
        *p = cs * a - sn * b;
        *q = sn * a + cs * b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_orthogonalizes_columns_and_keeps_the_product() {
        let (m, n) = (5usize, 4usize);
        let x0: Vec<f64> = (0..m * n)
            .map(|i| ((i * 7 + 3) % 11) as f64 - 5.0)
            .collect();
        let mut x = x0.clone();
        let mut v = vec![0.0; n * n];
        for j in 0..n {
            v[j * n + j] = 1.0;
        }
        one_sided_jacobi(m, n, &mut x, &mut v).unwrap();
        for p in 0..n {
            for q in p + 1..n {
                let c = dot(&x[p * m..(p + 1) * m], &x[q * m..(q + 1) * m]);
                assert!(c.abs() < 1e-12, "columns {p},{q} not orthogonal: {c}");
            }
        }
        // x0 = x · vᵀ
        for i in 0..m {
            for j in 0..n {
                let back: f64 = (0..n).map(|l| x[l * m + i] * v[l * n + j]).sum();
                assert!((back - x0[j * m + i]).abs() < 1e-12);
            }
        }
    }
}
