//! The exact SVD of a low-rank product `B·A` from its factors (method.md
//! §4), in O((d_out + d_in)·r²) instead of a dense SVD's O(d³).

use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;

use crate::jacobi::one_sided_jacobi;
use crate::kernels::{axpy, axpy_portable, dot, norm2, scal};
use crate::qr::{Householder, columns_of};
use crate::scalar::{check_finite, check_nonempty};
use crate::svd::{ThinSvd, argmax_abs};
use crate::{Error, Real, Result};

/// Checks that `B` (d_out × r) and `A` (r × d_in) form a product whose SVD
/// has `r` orthonormal singular vectors on both sides; returns
/// `(d_out, r, d_in)`.
pub(crate) fn validate_product<T: Real>(
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
) -> Result<(usize, usize, usize)> {
    check_nonempty("B", b)?;
    check_nonempty("A", a)?;
    let (d_out, r) = b.dim();
    let (ra, d_in) = a.dim();
    if r != ra {
        return Err(Error::ShapeMismatch {
            context: "B·A".to_string(),
            detail: format!(
                "B is {d_out} × {r} but A is {ra} × {d_in}: B's columns must equal A's rows"
            ),
        });
    }
    if r > d_out || r > d_in {
        return Err(Error::RankTooLarge {
            rank: r,
            rows: d_out,
            cols: d_in,
        });
    }
    check_finite("B", b)?;
    check_finite("A", a)?;
    Ok((d_out, r, d_in))
}

/// f32 input: the server's factorization runs in f64 (CONTRIBUTING) and the
/// result is rounded once, so orthonormality holds to f32 rounding even for
/// r = 64.
fn is_single<T: Real>() -> bool {
    std::mem::size_of::<T>() == std::mem::size_of::<f32>()
}

fn widen<T: Real>(x: ArrayView2<'_, T>) -> Array2<f64> {
    x.mapv(|v| v.to_f64())
}

/// Everything the two public entry points share: QR of `B` and `Aᵀ`, the
/// Jacobi SVD of the `r × r` core `X = R_b·R_aᵀ`, sorted and sign-fixed.
struct Core<T> {
    d_out: usize,
    r: usize,
    d_in: usize,
    hb: Householder<T>,
    ha: Householder<T>,
    /// Right singular vectors of X, sorted and signed: column `i` at
    /// `v[i*r..]`.
    v: Vec<T>,
    /// `X·v`, same order and signs: column `i` is `σ_i ũ_i`.
    xv: Vec<T>,
    sigma: Vec<T>,
    /// `A_new = (Q_a·v)ᵀ`, `r × d_in`, row-major.
    a_new: Vec<T>,
}

fn core<T: Real>(b: ArrayView2<'_, T>, a: ArrayView2<'_, T>) -> Result<Core<T>> {
    let (d_out, r, d_in) = validate_product(b, a)?;
    let hb = Householder::factor(d_out, r, columns_of(b));
    // The rows of A are the columns of Aᵀ: its row-major data is already
    // the column buffer the QR wants.
    let a_std = a.as_standard_layout();
    let a_cols = match a_std.as_slice() {
        Some(s) => s.to_vec(),
        None => a_std.iter().copied().collect(),
    };
    let ha = Householder::factor(d_in, r, a_cols);

    // X = R_b·R_aᵀ (both upper triangular), stored by columns.
    let mut x = vec![T::zero(); r * r];
    for j in 0..r {
        for i in 0..r {
            let mut s = T::zero();
            for l in i.max(j)..r {
                s += hb.r(i, l) * ha.r(j, l);
            }
            x[j * r + i] = s;
        }
    }
    let mut v0 = vec![T::zero(); r * r];
    for j in 0..r {
        v0[j * r + j] = T::one();
    }
    one_sided_jacobi(r, r, &mut x, &mut v0)?;

    let sigma0: Vec<T> = x.chunks_exact(r).map(norm2).collect();
    let mut order: Vec<usize> = (0..r).collect();
    // Stable sort, descending; σ are finite so partial_cmp never fails.
    order.sort_by(|&p, &q| {
        sigma0[q]
            .partial_cmp(&sigma0[p])
            .unwrap_or(std::cmp::Ordering::Equal)
    });

    let mut v = vec![T::zero(); r * r];
    let mut xv = vec![T::zero(); r * r];
    let mut sigma = vec![T::zero(); r];
    let mut a_new = vec![T::zero(); r * d_in];
    for (i, &o) in order.iter().enumerate() {
        v[i * r..(i + 1) * r].copy_from_slice(&v0[o * r..(o + 1) * r]);
        xv[i * r..(i + 1) * r].copy_from_slice(&x[o * r..(o + 1) * r]);
        sigma[i] = sigma0[o];
        a_new[i * d_in..i * d_in + r].copy_from_slice(&v0[o * r..(o + 1) * r]);
    }
    ha.apply_q(&mut a_new);
    for i in 0..r {
        let row = &mut a_new[i * d_in..(i + 1) * d_in];
        if row[argmax_abs(row)] < T::zero() {
            scal(-T::one(), row);
            scal(-T::one(), &mut v[i * r..(i + 1) * r]);
            scal(-T::one(), &mut xv[i * r..(i + 1) * r]);
        }
    }
    Ok(Core {
        d_out,
        r,
        d_in,
        hb,
        ha,
        v,
        xv,
        sigma,
        a_new,
    })
}

/// The exact thin SVD of `M = B·A` from its factors, without forming `M`.
///
/// `B` is `d_out × r`, `A` is `r × d_in`, `r ≤ min(d_out, d_in)`. With
/// `B = Q_b R_b` and `Aᵀ = Q_a R_a` (Householder) and the Jacobi SVD
/// `R_b R_aᵀ = Ũ Σ Ṽᵀ`, returns `U = Q_b Ũ`, `Σ`, `Vᵀ = (Q_a Ṽ)ᵀ`: all `r`
/// triplets, singular values descending, the [`ThinSvd`] sign convention.
/// When `M` has rank below `r` the trailing singular values are (near)
/// zero and their singular vectors are completed to orthonormal sets. Cost
/// O((d_out + d_in)·r² + r³). `f32` input is computed in `f64` and
/// rounded once at the end.
///
/// ```
/// use ndarray::array;
/// let b = array![[1.0_f64, 0.0], [0.0, 2.0], [1.0, 1.0]];
/// let a = array![[1.0, 2.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]];
/// let svd = fedsvd_linalg::factored_svd(b.view(), a.view()).unwrap();
/// let dense = fedsvd_linalg::thin_svd(b.dot(&a).view()).unwrap();
/// assert!((svd.s[0] - dense.s[0]).abs() < 1e-12 && (svd.s[1] - dense.s[1]).abs() < 1e-12);
/// assert!((&svd.reconstruct() - &b.dot(&a)).iter().all(|x| x.abs() < 1e-12));
/// ```
pub fn factored_svd<T: Real>(b: ArrayView2<'_, T>, a: ArrayView2<'_, T>) -> Result<ThinSvd<T>> {
    if is_single::<T>() {
        validate_product(b, a)?;
        let svd = factored_svd(widen(b).view(), widen(a).view())?;
        return Ok(ThinSvd {
            u: svd.u.mapv(T::from_f64),
            s: svd.s.mapv(T::from_f64),
            vt: svd.vt.mapv(T::from_f64),
        });
    }
    let c = core(b, a)?;
    let r = c.r;
    // Ũ: the normalized columns of X·Ṽ where σ is safely nonzero; the rest
    // (σ at rounding level, directions meaningless) completed to an
    // orthonormal basis of R^r.
    let tol = c.sigma[0] * T::EPSILON * T::from_f64(r as f64);
    let mut ut = vec![T::zero(); r * r];
    let mut filled = 0;
    for i in 0..r {
        if c.sigma[i] > tol && c.sigma[i] > T::zero() {
            let col = &mut ut[i * r..(i + 1) * r];
            col.copy_from_slice(&c.xv[i * r..(i + 1) * r]);
            scal(T::one() / c.sigma[i], col);
            filled += 1;
        } else {
            break;
        }
    }
    complete_orthonormal(r, filled, &mut ut);
    // U = Q_b·[Ũ; 0], computed column by column into a row-major buffer.
    let d_out = c.d_out;
    let mut u_cols = vec![T::zero(); r * d_out];
    for i in 0..r {
        u_cols[i * d_out..i * d_out + r].copy_from_slice(&ut[i * r..(i + 1) * r]);
    }
    c.hb.apply_q(&mut u_cols);
    let u = Array2::from_shape_fn((d_out, r), |(i, j)| u_cols[j * d_out + i]);
    let vt = Array2::from_shape_vec((r, c.d_in), c.a_new).map_err(|e| Error::ShapeMismatch {
        context: "factored_svd: Vᵀ".to_string(),
        detail: e.to_string(),
    })?;
    Ok(ThinSvd {
        u,
        s: Array1::from(c.sigma),
        vt,
    })
}

/// Fills columns `filled..r` of the column-contiguous `r × r` buffer with
/// unit vectors orthogonal to the first `filled` (assumed orthonormal) and to
/// each other: each is the standard basis vector with the largest residual
/// after two rounds of Gram–Schmidt.
fn complete_orthonormal<T: Real>(r: usize, filled: usize, q: &mut [T]) {
    for i in filled..r {
        let (done, rest) = q.split_at_mut(i * r);
        let mut best = vec![T::zero(); r];
        let mut best_norm = -T::one();
        for e in 0..r {
            let mut w = vec![T::zero(); r];
            w[e] = T::one();
            for _ in 0..2 {
                for prev in done.chunks_exact(r) {
                    let s = dot(prev, &w);
                    axpy(-s, prev, &mut w);
                }
            }
            let nrm = norm2(&w);
            if nrm > best_norm {
                best_norm = nrm;
                best = w;
            }
        }
        scal(T::one() / best_norm, &mut best);
        rest[..r].copy_from_slice(&best);
    }
}

/// Refactorizes a LoRA pair: returns `(B_new, A_new)` with
/// `B_new·A_new = B·A` (up to rounding), `A_new` (`r × d_in`) with
/// orthonormal rows — the right singular vectors of `B·A` — and
/// `B_new = U·Σ` (`d_out × r`, orthogonal columns of norms σ descending).
///
/// Sign convention: the largest-magnitude entry of each row of `A_new` (the
/// first on a tie) is positive, so the result is a deterministic function of
/// the input. Same numbers as [`factored_svd`] but cheaper: `B_new` is
/// computed as `B·(R_aᵀ Ṽ)` (because `B·A·V = B·R_aᵀ·Ṽ`), skipping `Q_b`.
/// `f32` input is computed in `f64` and rounded once at the end.
///
/// ```
/// use ndarray::array;
/// let b = array![[1.0_f64, 2.0], [3.0, 4.0], [5.0, 6.0]];
/// let a = array![[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]];
/// let (b_new, a_new) = fedsvd_linalg::refactorize(b.view(), a.view()).unwrap();
/// assert!((&b_new.dot(&a_new) - &b.dot(&a)).iter().all(|x| x.abs() < 1e-12));
/// let gram = a_new.dot(&a_new.t());
/// assert!((&gram - &ndarray::Array2::<f64>::eye(2)).iter().all(|x| x.abs() < 1e-12));
/// ```
pub fn refactorize<T: Real>(
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
) -> Result<(Array2<T>, Array2<T>)> {
    if is_single::<T>() {
        validate_product(b, a)?;
        let (b_new, a_new) = refactorize(widen(b).view(), widen(a).view())?;
        return Ok((b_new.mapv(T::from_f64), a_new.mapv(T::from_f64)));
    }
    let c = core(b, a)?;
    let (r, d_out) = (c.r, c.d_out);
    // C = R_aᵀ·Ṽ, r × r, row-major: C[l][i] = Σ_{j ≤ l} R_a[j][l]·Ṽ[j][i].
    let mut cm = vec![T::zero(); r * r];
    for l in 0..r {
        for i in 0..r {
            let vi = &c.v[i * r..(i + 1) * r];
            let mut s = T::zero();
            for (j, &vj) in vi.iter().enumerate().take(l + 1) {
                s += c.ha.r(j, l) * vj;
            }
            cm[l * r + i] = s;
        }
    }
    // B_new = B·C, row by row: with r this small a general GEMM spends more
    // on packing than on arithmetic.
    let b_std = b.as_standard_layout();
    let mut b_new = vec![T::zero(); d_out * r];
    match r {
        8 => rows_times_small::<T, 8>(&b_std, &cm, &mut b_new),
        16 => rows_times_small::<T, 16>(&b_std, &cm, &mut b_new),
        _ => {
            for (brow, out) in b_std.outer_iter().zip(b_new.chunks_exact_mut(r)) {
                for (l, &bl) in brow.iter().enumerate() {
                    axpy_portable(bl, &cm[l * r..(l + 1) * r], out);
                }
            }
        }
    }
    let b_new = Array2::from_shape_vec((d_out, r), b_new).map_err(|e| Error::ShapeMismatch {
        context: "refactorize: B_new".to_string(),
        detail: e.to_string(),
    })?;
    let a_new = Array2::from_shape_vec((r, c.d_in), c.a_new).map_err(|e| Error::ShapeMismatch {
        context: "refactorize: A_new".to_string(),
        detail: e.to_string(),
    })?;
    Ok((b_new, a_new))
}

/// `out = B·C` for row-major `B` (`d × R`), `C` (`R × R`) with `R` known at
/// compile time, so each output row stays in registers.
fn rows_times_small<T: Real, const R: usize>(
    b: &ndarray::ArrayBase<impl ndarray::Data<Elem = T>, ndarray::Ix2>,
    c: &[T],
    out: &mut [T],
) {
    let mut cm = [[T::zero(); R]; R];
    for (l, row) in cm.iter_mut().enumerate() {
        row.copy_from_slice(&c[l * R..(l + 1) * R]);
    }
    for (brow, out_row) in b.outer_iter().zip(out.chunks_exact_mut(R)) {
        let mut acc = [T::zero(); R];
        for (l, &bl) in brow.iter().enumerate().take(R) {
            for i in 0..R {
                acc[i] += bl * cm[l][i];
            }
        }
        out_row.copy_from_slice(&acc);
    }
}

/// [`refactorize`] over many modules in parallel (rayon). Each module is
/// computed independently and sequentially, so the results do not depend
/// on the number of threads. The first failing module (by index) is
/// reported as [`Error::InModule`].
pub fn refactorize_many<T: Real>(
    pairs: &[(ArrayView2<'_, T>, ArrayView2<'_, T>)],
) -> Result<Vec<(Array2<T>, Array2<T>)>> {
    refactorize_many_with(pairs, Method::Factored)
}

/// Which algorithm [`refactorize_many_with`] runs on each module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// [`refactorize`]: exact, from QR of the factors. The one to use.
    Factored,
    /// [`crate::refactorize_randomized`] with these parameters (the rank is
    /// taken from each module's `r`).
    Randomized(crate::RsvdParams),
    /// [`crate::refactorize_dense`]: forms `B·A` and takes its dense SVD,
    /// the reference implementation's approach.
    Dense,
}

/// [`refactorize_many`] with a chosen [`Method`], for comparing the paths.
/// Modules run in parallel; each result is independent of the thread
/// count.
pub fn refactorize_many_with<T: Real>(
    pairs: &[(ArrayView2<'_, T>, ArrayView2<'_, T>)],
    method: Method,
) -> Result<Vec<(Array2<T>, Array2<T>)>> {
    let one = |b: ArrayView2<'_, T>, a: ArrayView2<'_, T>| match method {
        Method::Factored => refactorize(b, a),
        Method::Randomized(p) => crate::refactorize_randomized(b, a, &p),
        Method::Dense => crate::refactorize_dense(b, a),
    };
    let results: Vec<Result<(Array2<T>, Array2<T>)>> = pairs
        .par_iter()
        .map(|(b, a)| one(b.view(), a.view()))
        .collect();
    results
        .into_iter()
        .enumerate()
        .map(|(index, r)| {
            r.map_err(|e| Error::InModule {
                index,
                source: Box::new(e),
            })
        })
        .collect()
}
