//! The exact SVD of a low-rank product `B·A` from its factors (method.md
//! §4), in O((d_out + d_in)·r²) instead of a dense SVD's O(d³).

use ndarray::{Array1, Array2, ArrayView2, ArrayViewMut2};
use rayon::prelude::*;

use crate::jacobi::one_sided_jacobi;
use crate::kernels::{axpy, axpy_portable, dot, norm2, scal};
use crate::qr::Householder;
use crate::scalar::{check_finite, check_nonempty};
use crate::svd::{ThinSvd, argmax_abs};
use crate::{Error, Real, Result};

/// Per-thread buffers of the factored path, reused from call to call: the
/// two QR column buffers and the new `A`. At LoRA sizes each is tens of
/// kilobytes, and fresh buffers of that size come back from the allocator
/// as new pages on every call; their page faults cost as much as the
/// arithmetic (measured: 271 µs → 134 µs per 1024 × 1024, r = 8 module).
#[derive(Default)]
struct Workspace {
    b_cols: Vec<f64>,
    a_cols: Vec<f64>,
    a_new: Vec<f64>,
}

thread_local! {
    static WORKSPACE: std::cell::RefCell<Workspace> = std::cell::RefCell::new(Workspace::default());
}

/// Buffers larger than this many values are dropped after use rather than
/// kept, so one huge call does not leave memory resident in every thread.
const MAX_KEPT: usize = 1 << 22;

/// Runs `f` with this thread's workspace (a fresh one if it is in use).
fn with_workspace<R>(f: impl FnOnce(&mut Workspace) -> R) -> R {
    WORKSPACE.with(|cell| match cell.try_borrow_mut() {
        Ok(mut ws) => {
            let out = f(&mut ws);
            let ws = &mut *ws;
            for buf in [&mut ws.b_cols, &mut ws.a_cols, &mut ws.a_new] {
                if buf.capacity() > MAX_KEPT {
                    *buf = Vec::new();
                }
            }
            out
        }
        Err(_) => f(&mut Workspace::default()),
    })
}

/// Checks the shapes of `B` (d_out × r) and `A` (r × d_in) without reading
/// their values; returns `(d_out, r, d_in)`.
fn validate_shapes<T: Real>(
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
    Ok((d_out, r, d_in))
}

/// Checks that `B` (d_out × r) and `A` (r × d_in) form a product whose SVD
/// has `r` orthonormal singular vectors on both sides; returns
/// `(d_out, r, d_in)`.
pub(crate) fn validate_product<T: Real>(
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
) -> Result<(usize, usize, usize)> {
    let dims = validate_shapes(b, a)?;
    check_finite("B", b)?;
    check_finite("A", a)?;
    Ok(dims)
}

/// Writes the transpose of `m` (rows × cols) into `out` as f64, so that
/// column `j` of `m` is `out[j*rows..]`, checking every value is finite
/// on the way (one pass over the input instead of two).
fn transpose_widen_checked<T: Real>(
    what: &str,
    m: ArrayView2<'_, T>,
    out: &mut Vec<f64>,
) -> Result<()> {
    let (rows, cols) = m.dim();
    out.clear();
    out.resize(rows * cols, 0.0);
    // Branch-free check in the copy loop; the location is looked up only
    // when something is wrong.
    let mut finite = true;
    match m.as_slice() {
        Some(src) => {
            for (i, row) in src.chunks_exact(cols).enumerate() {
                for (j, &x) in row.iter().enumerate() {
                    finite &= x.is_finite();
                    out[j * rows + i] = x.to_f64();
                }
            }
        }
        None => {
            for (i, row) in m.outer_iter().enumerate() {
                for (j, &x) in row.iter().enumerate() {
                    finite &= x.is_finite();
                    out[j * rows + i] = x.to_f64();
                }
            }
        }
    }
    if finite {
        Ok(())
    } else {
        check_finite(what, m)
    }
}

/// Writes `m` row after row into `out` as f64, checking finiteness.
fn widen_checked<T: Real>(what: &str, m: ArrayView2<'_, T>, out: &mut Vec<f64>) -> Result<()> {
    out.clear();
    let mut finite = true;
    match m.as_slice() {
        Some(src) => out.extend(src.iter().map(|&x| {
            finite &= x.is_finite();
            x.to_f64()
        })),
        None => out.extend(m.iter().map(|&x| {
            finite &= x.is_finite();
            x.to_f64()
        })),
    }
    if finite {
        Ok(())
    } else {
        check_finite(what, m)
    }
}

/// Everything the two public entry points share: QR of `B` and `Aᵀ`, the
/// Jacobi SVD of the `r × r` core `X = R_b·R_aᵀ`, sorted and sign-fixed.
/// Always in f64 (the server's precision, CONTRIBUTING): `f32` input is
/// widened as it is copied into the QR buffers, and results are rounded
/// once by the callers, so orthonormality holds to f32 rounding even for
/// r = 64.
struct Core {
    d_out: usize,
    r: usize,
    d_in: usize,
    hb: Householder<f64>,
    ha: Householder<f64>,
    /// Right singular vectors of X, sorted and signed: column `i` at
    /// `v[i*r..]`.
    v: Vec<f64>,
    /// `X·v`, same order and signs: column `i` is `σ_i ũ_i`.
    xv: Vec<f64>,
    sigma: Vec<f64>,
}

/// Computes the [`Core`] of `B·A` (then [`Core::fill_a_new`] gives
/// `A_new`).
fn core<T: Real>(b: ArrayView2<'_, T>, a: ArrayView2<'_, T>, ws: &mut Workspace) -> Result<Core> {
    let (d_out, r, d_in) = validate_shapes(b, a)?;
    let mut b_cols = std::mem::take(&mut ws.b_cols);
    transpose_widen_checked("B", b, &mut b_cols)?;
    // The rows of A are the columns of Aᵀ: A row by row is already the
    // column buffer the QR wants.
    let mut a_cols = std::mem::take(&mut ws.a_cols);
    widen_checked("A", a, &mut a_cols)?;
    let hb = Householder::factor(d_out, r, b_cols);
    let ha = Householder::factor(d_in, r, a_cols);

    // X = R_b·R_aᵀ (both upper triangular), stored by columns.
    let mut x = vec![0.0; r * r];
    for j in 0..r {
        for i in 0..r {
            let mut s = 0.0;
            for l in i.max(j)..r {
                s += hb.r(i, l) * ha.r(j, l);
            }
            x[j * r + i] = s;
        }
    }
    let mut v0 = vec![0.0; r * r];
    for j in 0..r {
        v0[j * r + j] = 1.0;
    }
    one_sided_jacobi(r, r, &mut x, &mut v0)?;

    let sigma0: Vec<f64> = x.chunks_exact(r).map(norm2).collect();
    let mut order: Vec<usize> = (0..r).collect();
    // Stable sort, descending; σ are finite so partial_cmp never fails.
    order.sort_by(|&p, &q| {
        sigma0[q]
            .partial_cmp(&sigma0[p])
            .unwrap_or(std::cmp::Ordering::Equal)
    });

    let mut v = vec![0.0; r * r];
    let mut xv = vec![0.0; r * r];
    let mut sigma = vec![0.0; r];
    for (i, &o) in order.iter().enumerate() {
        v[i * r..(i + 1) * r].copy_from_slice(&v0[o * r..(o + 1) * r]);
        xv[i * r..(i + 1) * r].copy_from_slice(&x[o * r..(o + 1) * r]);
        sigma[i] = sigma0[o];
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
    })
}

impl Core {
    /// Writes `A_new = (Q_a·Ṽ)ᵀ` (`r × d_in`, row-major) into `a_new` and
    /// applies the sign convention to it and to `Ṽ`, `X·Ṽ`. Call once,
    /// before anything reads `v` or `xv`.
    fn fill_a_new(&mut self, a_new: &mut [f64]) {
        let (r, d_in) = (self.r, self.d_in);
        a_new.fill(0.0);
        for i in 0..r {
            a_new[i * d_in..i * d_in + r].copy_from_slice(&self.v[i * r..(i + 1) * r]);
        }
        self.ha.apply_q(a_new);
        for i in 0..r {
            let row = &mut a_new[i * d_in..(i + 1) * d_in];
            if row[argmax_abs(row)] < 0.0 {
                scal(-1.0, row);
                scal(-1.0, &mut self.v[i * r..(i + 1) * r]);
                scal(-1.0, &mut self.xv[i * r..(i + 1) * r]);
            }
        }
    }

    /// Returns the QR buffers to the workspace.
    fn recycle(self, ws: &mut Workspace) {
        ws.b_cols = self.hb.into_columns();
        ws.a_cols = self.ha.into_columns();
    }

    /// [`Core::fill_a_new`] into the workspace's buffer.
    fn fill_a_new_in(&mut self, ws: &mut Workspace) {
        let mut buf = std::mem::take(&mut ws.a_new);
        buf.resize(self.r * self.d_in, 0.0);
        self.fill_a_new(&mut buf);
        ws.a_new = buf;
    }
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
    with_workspace(|ws| {
        let mut c = core(b, a, ws)?;
        c.fill_a_new_in(ws);
        let r = c.r;
        // Ũ: the normalized columns of X·Ṽ where σ is safely nonzero; the
        // rest (σ at rounding level, directions meaningless) completed to an
        // orthonormal basis of R^r.
        let tol = c.sigma[0] * f64::EPSILON * r as f64;
        let mut ut = vec![0.0; r * r];
        let mut filled = 0;
        for i in 0..r {
            if c.sigma[i] > tol && c.sigma[i] > 0.0 {
                let col = &mut ut[i * r..(i + 1) * r];
                col.copy_from_slice(&c.xv[i * r..(i + 1) * r]);
                scal(1.0 / c.sigma[i], col);
                filled += 1;
            } else {
                break;
            }
        }
        complete_orthonormal(r, filled, &mut ut);
        // U = Q_b·[Ũ; 0], computed column by column.
        let d_out = c.d_out;
        let mut u_cols = vec![0.0; r * d_out];
        for i in 0..r {
            u_cols[i * d_out..i * d_out + r].copy_from_slice(&ut[i * r..(i + 1) * r]);
        }
        c.hb.apply_q(&mut u_cols);
        let u = Array2::from_shape_fn((d_out, r), |(i, j)| T::from_f64(u_cols[j * d_out + i]));
        let d_in = c.d_in;
        let vt = Array2::from_shape_fn((r, d_in), |(i, j)| T::from_f64(ws.a_new[i * d_in + j]));
        let s = Array1::from_iter(c.sigma.iter().map(|&x| T::from_f64(x)));
        c.recycle(ws);
        Ok(ThinSvd { u, s, vt })
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
    let (d_out, r) = b.dim();
    let d_in = a.ncols();
    let mut b_new = Array2::from_elem((d_out, r), T::zero());
    let mut a_new = Array2::from_elem((r, d_in), T::zero());
    refactorize_into(b, a, b_new.view_mut(), a_new.view_mut())?;
    Ok((b_new, a_new))
}

/// [`refactorize`] in place: overwrites `b` with `B_new` and `a` with
/// `A_new`, allocating nothing per call once the thread's scratch space is
/// warm (the server refactorizes the same shapes every round). On error
/// both are left unchanged.
///
/// ```
/// use ndarray::array;
/// let mut b = array![[1.0_f64, 2.0], [3.0, 4.0], [5.0, 6.0]];
/// let mut a = array![[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]];
/// let product = b.dot(&a);
/// fedsvd_linalg::refactorize_in_place(b.view_mut(), a.view_mut()).unwrap();
/// assert!((&b.dot(&a) - &product).iter().all(|x| x.abs() < 1e-12));
/// ```
pub fn refactorize_in_place<T: Real>(
    mut b: ArrayViewMut2<'_, T>,
    mut a: ArrayViewMut2<'_, T>,
) -> Result<()> {
    with_workspace(|ws| {
        let mut c = core(b.view(), a.view(), ws)?;
        // The QR holds its own copy of A, so an f64 A can take A_new
        // directly; anything else goes through the workspace.
        match a.as_slice_mut().and_then(T::as_f64_mut) {
            Some(direct) => c.fill_a_new(direct),
            None => {
                c.fill_a_new_in(ws);
                write_a_new(&ws.a_new, &mut a);
            }
        }
        write_b_new(&c, &mut b);
        c.recycle(ws);
        Ok(())
    })
}

/// [`refactorize`] into caller-provided outputs of the right shapes.
fn refactorize_into<T: Real>(
    b: ArrayView2<'_, T>,
    a: ArrayView2<'_, T>,
    mut b_out: ArrayViewMut2<'_, T>,
    mut a_out: ArrayViewMut2<'_, T>,
) -> Result<()> {
    with_workspace(|ws| {
        let mut c = core(b, a, ws)?;
        c.fill_a_new_in(ws);
        b_out.assign(&b);
        write_b_new(&c, &mut b_out);
        write_a_new(&ws.a_new, &mut a_out);
        c.recycle(ws);
        Ok(())
    })
}

/// Overwrites `b` (holding the old B) with `B_new = B·(R_aᵀ·Ṽ)`.
fn write_b_new<T: Real>(c: &Core, b: &mut ArrayViewMut2<'_, T>) {
    let r = c.r;
    // C = R_aᵀ·Ṽ, r × r, row-major: C[l][i] = Σ_{j ≤ l} R_a[j][l]·Ṽ[j][i].
    let mut cm = vec![0.0; r * r];
    for l in 0..r {
        for i in 0..r {
            let vi = &c.v[i * r..(i + 1) * r];
            let mut s = 0.0;
            for (j, &vj) in vi.iter().enumerate().take(l + 1) {
                s += c.ha.r(j, l) * vj;
            }
            cm[l * r + i] = s;
        }
    }
    // Row by row: with r this small a general GEMM spends more on packing
    // than on arithmetic.
    match r {
        8 => rows_times_small::<T, 8>(b, &cm),
        16 => rows_times_small::<T, 16>(b, &cm),
        _ => {
            let mut acc = vec![0.0; r];
            for mut row in b.outer_iter_mut() {
                acc.iter_mut().for_each(|x| *x = 0.0);
                for (l, &bl) in row.iter().enumerate() {
                    axpy_portable(bl.to_f64(), &cm[l * r..(l + 1) * r], &mut acc);
                }
                row.iter_mut()
                    .zip(&acc)
                    .for_each(|(o, &x)| *o = T::from_f64(x));
            }
        }
    }
}

/// Copies the row-major `r × d_in` f64 buffer into `a`, rounding once.
fn write_a_new<T: Real>(a_new: &[f64], a: &mut ArrayViewMut2<'_, T>) {
    let d_in = a.ncols();
    for (row, src) in a.outer_iter_mut().zip(a_new.chunks_exact(d_in)) {
        for (o, &x) in row.into_iter().zip(src) {
            *o = T::from_f64(x);
        }
    }
}

/// Overwrites each row `b_i` of `b` (`d × R`) by `b_i·C` (`C` is `R × R`,
/// row-major), with `R` known at compile time so each row stays in
/// registers.
fn rows_times_small<T: Real, const R: usize>(b: &mut ArrayViewMut2<'_, T>, c: &[f64]) {
    let mut cm = [[0.0; R]; R];
    for (l, row) in cm.iter_mut().enumerate() {
        row.copy_from_slice(&c[l * R..(l + 1) * R]);
    }
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::x86::has_fma()
        && let Some(rows) = b.as_slice_mut().and_then(T::as_f64_mut)
    {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        unsafe { crate::kernels::x86::rows_times_small_f64::<R>(rows, &cm) };
        return;
    }
    for mut brow in b.outer_iter_mut() {
        let mut acc = [0.0; R];
        for (l, &bl) in brow.iter().enumerate().take(R) {
            let bl = bl.to_f64();
            for i in 0..R {
                acc[i] += bl * cm[l][i];
            }
        }
        brow.iter_mut()
            .zip(&acc)
            .for_each(|(o, &x)| *o = T::from_f64(x));
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

/// [`refactorize_in_place`] over many modules in parallel (rayon): what the
/// server runs each round. Each module is computed independently and
/// sequentially, so the results do not depend on the number of threads.
/// Every module is either refactorized or, if its own input is invalid,
/// left unchanged; the first failing module (by index) is reported as
/// [`Error::InModule`].
///
/// ```
/// use ndarray::array;
/// let mut b = array![[1.0_f32, 2.0], [3.0, 4.0], [5.0, 6.0]];
/// let mut a = array![[1.0_f32, 0.0, 1.0], [0.0, 1.0, 1.0]];
/// let before = b.dot(&a);
/// fedsvd_linalg::refactorize_many_in_place(&mut [(b.view_mut(), a.view_mut())]).unwrap();
/// assert!((&b.dot(&a) - &before).iter().all(|x| x.abs() < 1e-5));
/// ```
pub fn refactorize_many_in_place<T: Real>(
    pairs: &mut [(ArrayViewMut2<'_, T>, ArrayViewMut2<'_, T>)],
) -> Result<()> {
    let results: Vec<Result<()>> = pairs
        .par_iter_mut()
        .map(|(b, a)| refactorize_in_place(b.view_mut(), a.view_mut()))
        .collect();
    for (index, r) in results.into_iter().enumerate() {
        r.map_err(|e| Error::InModule {
            index,
            source: Box::new(e),
        })?;
    }
    Ok(())
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
