//! Dense kernels: GEMM wrappers over faer and row-wise LayerNorm, GELU and
//! softmax. Every routine computes each output element with a fixed
//! operation order, so results do not depend on the number of threads (faer
//! splits its work over disjoint output blocks, and the row-wise kernels run
//! one row per task).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

/// Runs `$body` (a loop over slices, written as a closure-free block) in a
/// copy compiled for AVX2 when the CPU has it, else in the baseline copy.
/// Both copies perform the same IEEE operations in the same order (no fused
/// multiply-add is enabled), so results are identical either way; AVX2 only
/// lets the compiler process eight lanes at once.
macro_rules! simd_dispatch {
    (fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? $body
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above), the
                    // only requirement of calling a function compiled with it.
                    return unsafe { avx2($($arg),*) };
                }
            }
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            fn base($($arg: $ty),*) $(-> $ret)? $body
            base($($arg),*)
        }
    };
}

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
    if k == 0 || (beta != 0.0 && beta != 1.0) {
        // C ← beta·C first; beta = 0 writes zeros whatever C held (as in
        // BLAS), since a buffer may come uninitialised in that sense (see
        // `overwritten_buffer`).
        for i in 0..m {
            for j in 0..n {
                let v = &mut c[i * rsc + j * csc];
                *v = if beta == 0.0 { 0.0 } else { *v * beta };
            }
        }
    }
    if k == 0 {
        return;
    }
    // faer on the calling thread: at the attention's per-head shapes (64 ×
    // 32 × 64, rows 1,152 apart) it ran at 45–51 GFLOP/s on the 2-core
    // build machine against 41–44 for matrixmultiply, which packs both
    // operands on every call.
    use faer::{Accum, MatMut, MatRef, Par};
    let accum = if beta == 0.0 {
        Accum::Replace
    } else {
        Accum::Add
    };
    // SAFETY: the asserts above keep every access of the three strided
    // matrices inside their slices; `c` is borrowed mutably and does not
    // alias `a` or `b`.
    let (lhs, rhs, dst) = unsafe {
        (
            MatRef::from_raw_parts(a.data.as_ptr(), m, k, a.rs as isize, a.cs as isize),
            MatRef::from_raw_parts(b.data.as_ptr(), k, n, b.rs as isize, b.cs as isize),
            MatMut::from_raw_parts_mut(c.as_mut_ptr(), m, n, rsc as isize, csc as isize),
        )
    };
    faer::linalg::matmul::matmul(dst, accum, lhs, rhs, alpha, Par::Seq);
}

/// Below this many multiply-adds a product runs on the calling thread only
/// ([`gemm`]); above it, on the rayon pool unless inside [`serial_until_idle`].
const BIG_GEMM: usize = 1 << 22;

thread_local! {
    /// Set while this thread works through one chunk of a batch that is
    /// split over all threads (see [`serial_until_idle`]).
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// While [`SERIAL`] is set: the flag that says another thread of the
    /// pool has run out of chunks (see [`serial_until_idle`]).
    static IDLE: std::cell::RefCell<Option<Arc<AtomicBool>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this crate's large GEMMs on the calling thread only.
///
/// Why: when a batch is split into as many chunks as there are threads,
/// every thread already has a chunk of its own; splitting each GEMM again
/// would only add synchronisation and repacking. faer computes every output
/// element in the same order either way, so results are unchanged (checked
/// by `large_gemm_is_right_and_independent_of_the_thread_count`). The
/// encoder uses [`serial_until_idle`]; this form is for tests.
#[cfg(test)]
pub(crate) fn serial<R>(f: impl FnOnce() -> R) -> R {
    serial_until_idle(&Arc::new(AtomicBool::new(false)), f)
}

/// Runs `f` with this crate's large GEMMs on the calling thread only (as
/// `serial` does), except that once `idle` is set (another thread of the pool
/// has no chunk left) the large GEMMs go back to the whole pool, so the idle
/// thread takes part in the chunks still running.
///
/// Why: equal chunks still finish far apart on this machine. Timed on the
/// 2-core build machine, 512-token chunks of one step took 0.34 to 0.50 s,
/// and the thread that finished first then waited up to 0.19 s of a 0.9 s
/// step. The switch can happen at any GEMM; results do not change, because
/// faer sums every element in the same order on one thread or several.
pub(crate) fn serial_until_idle<R>(idle: &Arc<AtomicBool>, f: impl FnOnce() -> R) -> R {
    let previous = SERIAL.with(|s| s.replace(true));
    let previous_idle = IDLE.with(|i| i.replace(Some(Arc::clone(idle))));
    let out = f();
    IDLE.with(|i| *i.borrow_mut() = previous_idle);
    SERIAL.with(|s| s.set(previous));
    out
}

/// Whether this thread's large GEMMs run on the calling thread only: inside
/// [`serial_until_idle`] and while no other thread is idle.
fn gemm_on_this_thread_only() -> bool {
    SERIAL.with(std::cell::Cell::get)
        && !IDLE.with(|i| {
            i.borrow()
                .as_ref()
                .is_some_and(|flag| flag.load(Ordering::Relaxed))
        })
}

/// `C[m, n] (+)= A[m, k]·B[k, n]` for the encoder's large products (the
/// weight GEMMs over all tokens), with `A` row-major, `B` given as a
/// row-major `[k, n]` matrix or (`b_transposed`) as the row-major `[n, k]`
/// matrix whose transpose it is, and `C` row-major.
///
/// Why faer here: measured on the 2-core build machine at the step's
/// shapes (2,048 tokens), faer's matmul on the rayon pool ran at 102–163
/// GFLOP/s against 85–153 for matrixmultiply's own thread pool, and it
/// shares rayon's two workers instead of starting a second pool beside
/// them. faer splits the work over disjoint blocks of `C` and keeps each
/// element's sum over `k` in one fixed order, so results do not depend on
/// the number of threads (checked by the thread-count tests).
#[allow(clippy::too_many_arguments)]
fn dense_gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    b: &[f32],
    b_transposed: bool,
    accumulate: bool,
    c: &mut [f32],
) {
    if m * k * n < BIG_GEMM || k == 0 {
        let bv = if b_transposed {
            View::rm_t(b, k)
        } else {
            View::rm(b, n)
        };
        let beta = if accumulate { 1.0 } else { 0.0 };
        gemm(m, k, n, 1.0, View::rm(a, k), bv, beta, c, n, 1);
        return;
    }
    use faer::{Accum, MatMut, MatRef, Par};
    let lhs = MatRef::from_row_major_slice(&a[..m * k], m, k);
    let rhs = if b_transposed {
        MatRef::from_row_major_slice(&b[..n * k], n, k).transpose()
    } else {
        MatRef::from_row_major_slice(&b[..k * n], k, n)
    };
    let mut dst = MatMut::from_row_major_slice_mut(&mut c[..m * n], m, n);
    let accum = if accumulate {
        Accum::Add
    } else {
        Accum::Replace
    };
    if !gemm_on_this_thread_only() {
        faer::linalg::matmul::matmul(dst, accum, lhs, rhs, 1.0f32, Par::rayon(0));
        return;
    }
    let mut j0 = 0;
    while j0 < n {
        let width = SERIAL_COLUMN_BLOCK.min(n - j0);
        faer::linalg::matmul::matmul(
            dst.as_mut().subcols_mut(j0, width),
            accum,
            lhs,
            rhs.subcols(j0, width),
            1.0f32,
            Par::Seq,
        );
        j0 += width;
    }
}

/// Output columns per faer call when a large product runs on one thread.
///
/// Why: faer's single-thread kernel walks the output columns in cache blocks
/// whose size is a multiple of 16 but not always of 24, the height of its
/// AVX2 register tile, so each block ended in a narrow edge tile (the
/// 8-row edge kernel took 7 % of a step's samples). Blocks of 96 columns
/// (four tiles) avoid the edge. In a separate loop at the step's shapes
/// (512 rows, one thread, 60 alternations) they took 0.91–0.96 of the time
/// of one call. Each output element keeps its sum over `k` in the same
/// order, so results are unchanged (checked by
/// `large_gemm_is_right_and_independent_of_the_thread_count`).
const SERIAL_COLUMN_BLOCK: usize = 96;

thread_local! {
    /// Buffers handed back with [`recycle`], for [`overwritten_buffer`].
    static SPARE: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Most values [`recycle`] keeps per thread: 8 Mi `f32` (32 MiB). On the
/// step benchmark this was as fast as 96 MiB, which raised the peak RSS
/// from 337 to 444 MiB.
const SPARE_VALUES: usize = 8 << 20;

/// A buffer of `len` values for an output that is written in full before
/// it is read. It is the smallest buffer handed back with [`recycle`] on
/// this thread that holds `len` values and at most twice as many (so that a
/// large buffer is not spent on a small output), keeping its stale values;
/// or, if none fits, a new zeroed one. In builds with debug assertions (the
/// tests) every value is NaN instead, so that a caller that reads before it
/// writes fails the tests.
///
/// Why: a step allocates and frees about 15 MB of activations per layer and
/// chunk. A zeroed allocation of recycled memory is filled with zeros first,
/// which took 3 % of a step's samples; stale values cost nothing and are
/// overwritten anyway.
pub(crate) fn overwritten_buffer(len: usize) -> Vec<f32> {
    let fill = if cfg!(debug_assertions) {
        f32::NAN
    } else {
        0.0
    };
    let spare = SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        let best = spare
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len && b.capacity() <= 2 * len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)?;
        Some(spare.swap_remove(best))
    });
    match spare {
        Some(mut buffer) => {
            if cfg!(debug_assertions) {
                buffer.clear();
            }
            // Shrinks without writing; grows (within capacity) with `fill`.
            buffer.resize(len, fill);
            buffer
        }
        None => vec![fill; len],
    }
}

/// Hands a buffer that is no longer needed to [`overwritten_buffer`] on this
/// thread, up to [`SPARE_VALUES`] values in all (beyond that it is freed).
pub(crate) fn recycle(buffer: Vec<f32>) {
    if buffer.capacity() == 0 {
        return;
    }
    SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        let held: usize = spare.iter().map(Vec::capacity).sum();
        if held + buffer.capacity() <= SPARE_VALUES {
            spare.push(buffer);
        }
    });
}

/// `Y[n, d_out] = X[n, d_in] · Wᵀ + bias` with `W` `[d_out, d_in]`.
///
/// The output starts as copies of the bias in an [`overwritten_buffer`]
/// (no zero fill first: these are the largest buffers of a step).
pub(crate) fn linear(x: &[f32], w: &[f32], bias: &[f32], d_in: usize, d_out: usize) -> Vec<f32> {
    let n = x.len() / d_in;
    let mut y = overwritten_buffer(n * d_out);
    for row in y.chunks_exact_mut(d_out.max(1)) {
        row.copy_from_slice(bias);
    }
    dense_gemm(n, d_in, d_out, x, w, true, true, &mut y);
    y
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
    dense_gemm(n, d_out, d_in, dy, w, false, accumulate, dx);
}

/// Rows per rayon task in the row-wise kernels.
const ROWS: usize = 16;

/// Sum of `f(v)` over a row in eight lanes added in a fixed order, so that
/// the loop vectorizes and the result is the same on every machine.
#[inline(always)]
fn lane_sum(row: &[f32], f: impl Fn(usize, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let (chunks, tail) = row.as_chunks::<8>();
    for (c, vals) in chunks.iter().enumerate() {
        for l in 0..8 {
            acc[l] += f(c * 8 + l, vals[l]);
        }
    }
    let mut rest = 0.0f32;
    for (j, &v) in tail.iter().enumerate() {
        rest += f(chunks.len() * 8 + j, v);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + rest
}

simd_dispatch!(
    fn layer_norm_rows(
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        y: &mut [f32],
        xhat: Option<&mut [f32]>,
        rstd: Option<&mut [f32]>,
    ) {
        let h = gamma.len();
        let mut xhat = xhat;
        let mut rstd = rstd;
        for (i, (xr, yr)) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)).enumerate() {
            let mean = lane_sum(xr, |_, v| v) / h as f32;
            let var = lane_sum(xr, |_, v| (v - mean) * (v - mean)) / h as f32;
            let r = 1.0 / (var + eps).sqrt();
            match xhat.as_deref_mut() {
                Some(xh) => {
                    let xh = &mut xh[i * h..(i + 1) * h];
                    for j in 0..h {
                        let z = (xr[j] - mean) * r;
                        xh[j] = z;
                        yr[j] = z * gamma[j] + beta[j];
                    }
                }
                None => {
                    for j in 0..h {
                        yr[j] = (xr[j] - mean) * r * gamma[j] + beta[j];
                    }
                }
            }
            if let Some(rs) = rstd.as_deref_mut() {
                rs[i] = r;
            }
        }
    }
);

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
    match save.as_mut() {
        Some((xhat, rstd)) => {
            x.par_chunks(ROWS * h)
                .zip(y.par_chunks_mut(ROWS * h))
                .zip(xhat.par_chunks_mut(ROWS * h))
                .zip(rstd.par_chunks_mut(ROWS))
                .for_each(|(((xc, yc), hc), rc)| {
                    layer_norm_rows(xc, gamma, beta, eps, yc, Some(hc), Some(rc));
                });
        }
        None => {
            x.par_chunks(ROWS * h)
                .zip(y.par_chunks_mut(ROWS * h))
                .for_each(|(xc, yc)| layer_norm_rows(xc, gamma, beta, eps, yc, None, None));
        }
    }
}

simd_dispatch!(
    fn layer_norm_backward_rows(dy: &mut [f32], xhat: &[f32], rstd: &[f32], gamma: &[f32]) {
        let h = gamma.len();
        for ((d, xh), &r) in dy.chunks_exact_mut(h).zip(xhat.chunks_exact(h)).zip(rstd) {
            let m1 = lane_sum(d, |j, v| v * gamma[j]) / h as f32;
            let m2 = lane_sum(d, |j, v| v * gamma[j] * xh[j]) / h as f32;
            for j in 0..h {
                d[j] = r * (d[j] * gamma[j] - m1 - xh[j] * m2);
            }
        }
    }
);

/// In place: the gradient of a LayerNorm's output becomes that of its input.
pub(crate) fn layer_norm_backward(dy: &mut [f32], xhat: &[f32], rstd: &[f32], gamma: &[f32]) {
    let h = gamma.len();
    dy.par_chunks_mut(ROWS * h)
        .zip(xhat.par_chunks(ROWS * h))
        .zip(rstd.par_chunks(ROWS))
        .for_each(|((dc, hc), rc)| layer_norm_backward_rows(dc, hc, rc, gamma));
}

/// `exp(x)` for `x ≤ 88`, relative error about 2e-7, written without
/// branches or library calls so that loops over it vectorize: `x = n·ln2 + r`
/// with `|r| ≤ ln2/2` (Cody–Waite split of ln2), a degree-6 minimax
/// polynomial for `exp(r)` (Cephes' coefficients), and `2ⁿ` built from the
/// exponent bits. Inputs below −87 give `exp(−87)` (about 1.6e-38) instead of
/// a subnormal or zero, which is harmless for softmax weights and GELU.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer in the
    // default rounding mode (no `round` call, which would not vectorize
    // without SSE4.1).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// erf with absolute error below 1.5e-7 (Abramowitz & Stegun 7.1.26), also
/// returning `exp(-x²)` which the GELU derivative reuses.
#[inline(always)]
fn erf_and_gauss(x: f32) -> (f32, f32) {
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * ax);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let g = exp_approx(-ax * ax);
    let y = 1.0 - poly * g;
    (y.copysign(x), g)
}

simd_dispatch!(
    fn gelu_block(x: &mut [f32], d: &mut [f32]) {
        const INV_SQRT2: f32 = std::f32::consts::FRAC_1_SQRT_2;
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for (v, dv) in x.iter_mut().zip(d.iter_mut()) {
            let (e, g) = erf_and_gauss(*v * INV_SQRT2);
            let cdf = 0.5 * (1.0 + e);
            *dv = cdf + *v * INV_SQRT_2PI * g;
            *v *= cdf;
        }
    }
);

simd_dispatch!(
    fn gelu_block_nd(x: &mut [f32]) {
        const INV_SQRT2: f32 = std::f32::consts::FRAC_1_SQRT_2;
        for v in x.iter_mut() {
            let (e, _) = erf_and_gauss(*v * INV_SQRT2);
            *v *= 0.5 * (1.0 + e);
        }
    }
);

/// In place `x ← gelu(x) = x·Φ(x)` (erf form); when `deriv` is given it
/// receives `gelu'(x) = Φ(x) + x·φ(x)`.
pub(crate) fn gelu(x: &mut [f32], deriv: Option<&mut [f32]>) {
    const CHUNK: usize = 4096;
    match deriv {
        Some(d) => x
            .par_chunks_mut(CHUNK)
            .zip(d.par_chunks_mut(CHUNK))
            .for_each(|(xc, dc)| gelu_block(xc, dc)),
        None => x.par_chunks_mut(CHUNK).for_each(gelu_block_nd),
    }
}

simd_dispatch!(
    fn exp_shift_sum(row: &mut [f32], max: f32) -> f32 {
        // Eight partial sums in a fixed order, so the reduction vectorizes yet
        // stays deterministic.
        let mut acc = [0.0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                *v = exp_approx(*v - max);
                *a += *v;
            }
        }
        let mut tail = 0.0f32;
        for v in chunks.into_remainder() {
            *v = exp_approx(*v - max);
            tail += *v;
        }
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
    }
);

/// In-place softmax of one row.
#[inline]
pub(crate) fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = exp_shift_sum(row, max);
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Rows per rayon task in the rank-`r` adapter kernels.
const LOW_RANK_ROWS: usize = 32;

simd_dispatch!(
    fn project_rows(
        x: &[f32],
        rsx: usize,
        mask: Option<&[f32]>,
        w: &[f32],
        d: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        // One row of `out` per row of `x`: r dot products of length d, each
        // in eight lanes summed in a fixed order.
        let r = w.len() / d;
        for (t, o) in out.chunks_exact_mut(r).enumerate() {
            let xt = &x[t * rsx..t * rsx + d];
            for (j, oj) in o.iter_mut().enumerate() {
                let wj = &w[j * d..(j + 1) * d];
                let mut acc = [0.0f32; 8];
                let (xc, xr) = xt.as_chunks::<8>();
                let (wc, wr) = wj.as_chunks::<8>();
                let mut tail = 0.0f32;
                match mask {
                    Some(m) => {
                        let mt = &m[t * d..(t + 1) * d];
                        let (mc, mr) = mt.as_chunks::<8>();
                        for ((a, b), c) in xc.iter().zip(wc).zip(mc) {
                            for l in 0..8 {
                                acc[l] += a[l] * c[l] * b[l];
                            }
                        }
                        for ((a, b), c) in xr.iter().zip(wr).zip(mr) {
                            tail += a * c * b;
                        }
                    }
                    None => {
                        for (a, b) in xc.iter().zip(wc) {
                            for l in 0..8 {
                                acc[l] += a[l] * b[l];
                            }
                        }
                        for (a, b) in xr.iter().zip(wr) {
                            tail += a * b;
                        }
                    }
                }
                let sum = ((acc[0] + acc[4]) + (acc[1] + acc[5]))
                    + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
                    + tail;
                *oj = scale * sum;
            }
        }
    }
);

simd_dispatch!(
    fn expand_rows(
        hh: &[f32],
        w: &[f32],
        d: usize,
        scale: f32,
        mask: Option<&[f32]>,
        y: &mut [f32],
        rsy: usize,
        col0: usize,
        tmp: &mut [f32],
    ) {
        // y_t += scale · (Σ_j h_tj w_j) ⊙ m_t, the sum over j in order.
        let r = w.len() / d;
        for (t, ht) in hh.chunks_exact(r).enumerate() {
            tmp.fill(0.0);
            for (j, &hj) in ht.iter().enumerate() {
                for (a, b) in tmp.iter_mut().zip(&w[j * d..(j + 1) * d]) {
                    *a += hj * b;
                }
            }
            let yt = &mut y[t * rsy + col0..t * rsy + col0 + d];
            match mask {
                Some(m) => {
                    for ((a, b), c) in yt.iter_mut().zip(tmp.iter()).zip(&m[t * d..(t + 1) * d]) {
                        *a += scale * b * c;
                    }
                }
                None => {
                    for (a, b) in yt.iter_mut().zip(tmp.iter()) {
                        *a += scale * b;
                    }
                }
            }
        }
    }
);

/// `out[n, r] = scale · (X ⊙ M)[n, d] · Wᵀ` for a rank-`r` factor `W`
/// (`[r, d]` row-major) and `n` rows of `X` read from `x` with row stride
/// `rsx` (the first `d` values of each), `M` an optional `[n, d]` mask.
///
/// Why not the general GEMM: with `r` = 8 one side is too thin for a packed
/// GEMM to pay off (packing cost about equal to the arithmetic), and these
/// products run once per adapter per pass. Each output is one dot product
/// in a fixed order, so results do not depend on the thread count.
pub(crate) fn low_rank_project(
    x: &[f32],
    rsx: usize,
    mask: Option<&[f32]>,
    w: &[f32],
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    let r = w.len() / d;
    if r == 0 || out.is_empty() {
        return;
    }
    out.par_chunks_mut(LOW_RANK_ROWS * r)
        .enumerate()
        .for_each(|(b, o)| {
            let t0 = b * LOW_RANK_ROWS;
            let rows = o.len() / r;
            let xs = &x[t0 * rsx..(t0 + rows - 1) * rsx + d];
            let ms = mask.map(|m| &m[t0 * d..(t0 + rows) * d]);
            project_rows(xs, rsx, ms, w, d, scale, o);
        });
}

/// `Y[:, col0..col0 + d] += scale · (H[n, r] · W) ⊙ M` for a rank-`r`
/// factor `W` (`[r, d]` row-major), `Y` with row stride `rsy`, `M` an
/// optional `[n, d]` mask. See [`low_rank_project`] for why.
#[allow(clippy::too_many_arguments)]
pub(crate) fn low_rank_expand(
    hh: &[f32],
    w: &[f32],
    d: usize,
    scale: f32,
    mask: Option<&[f32]>,
    y: &mut [f32],
    rsy: usize,
    col0: usize,
) {
    let r = w.len() / d;
    if r == 0 || hh.is_empty() {
        return;
    }
    let n = hh.len() / r;
    // Row blocks of `y` (the last one may end at its last used column).
    let mut blocks = Vec::with_capacity(n.div_ceil(LOW_RANK_ROWS));
    let mut rest = &mut y[..];
    for b in 0..n.div_ceil(LOW_RANK_ROWS) {
        let rows = LOW_RANK_ROWS.min(n - b * LOW_RANK_ROWS);
        let take = if b * LOW_RANK_ROWS + rows == n {
            rest.len()
        } else {
            rows * rsy
        };
        let (head, tail) = rest.split_at_mut(take);
        blocks.push(head);
        rest = tail;
    }
    blocks.into_par_iter().enumerate().for_each(|(b, yb)| {
        let t0 = b * LOW_RANK_ROWS;
        let rows = LOW_RANK_ROWS.min(n - t0);
        let hs = &hh[t0 * r..(t0 + rows) * r];
        let ms = mask.map(|m| &m[t0 * d..(t0 + rows) * d]);
        let mut tmp = vec![0.0f32; d];
        expand_rows(hs, w, d, scale, ms, yb, rsy, col0, &mut tmp);
    });
}

/// `[cols, rows]` transpose of a row-major `[rows, cols]` matrix.
pub(crate) fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; m.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = m[i * cols + j];
        }
    }
    t
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
    fn exp_approx_is_accurate_over_the_softmax_and_gelu_range() {
        let mut worst = 0.0f64;
        for i in 0..=20_000 {
            let x = -87.0 + i as f64 * (87.0 + 10.0) / 20_000.0;
            let got = exp_approx(x as f32) as f64;
            let want = (x as f32 as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_keep_order() {
        for len in [1usize, 7, 8, 13, 64] {
            let mut row: Vec<f32> = (0..len).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
            let orig = row.clone();
            softmax_row(&mut row);
            let s: f32 = row.iter().sum();
            assert!((s - 1.0).abs() < 1e-6, "len {len}: sum {s}");
            let m: f64 = orig.iter().map(|&v| (v as f64).exp()).sum();
            for (p, v) in row.iter().zip(&orig) {
                assert!(((*p as f64) - (*v as f64).exp() / m).abs() < 1e-6);
            }
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
        let y = linear(&a, &w, &bias, k, n);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = bias[j] + (0..k).map(|t| a[i * k + t] * w[j * k + t]).sum::<f32>();
                assert!((y[i * n + j] - want).abs() < 1e-5);
            }
        }
    }

    /// `C ← beta·C + alpha·A·B` for beta 0 (C's old values, even NaN, are
    /// ignored), 1 and 0.5, with a strided C, and with an empty depth.
    #[test]
    fn gemm_applies_beta_with_and_without_depth() {
        let (m, k, n) = (3, 4, 2);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.25 - 1.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| 1.0 - i as f32 * 0.5).collect();
        for depth in [k, 0] {
            for (beta, start) in [(0.0f32, f32::NAN), (1.0, 3.0), (0.5, 3.0)] {
                // C is [m, n] with rows 5 apart; the gaps must stay untouched.
                let mut c = vec![start; m * 5];
                c.iter_mut().skip(n).step_by(5).for_each(|v| *v = -7.0);
                gemm(
                    m,
                    depth,
                    n,
                    2.0,
                    View::rm(&a, k),
                    View::rm(&b, n),
                    beta,
                    &mut c,
                    5,
                    1,
                );
                for i in 0..m {
                    for j in 0..n {
                        let ab: f32 = (0..depth).map(|t| a[i * k + t] * b[t * n + j]).sum();
                        let old = if beta == 0.0 { 0.0 } else { beta * start };
                        let want = old + 2.0 * ab;
                        let got = c[i * 5 + j];
                        assert!(
                            (got - want).abs() < 1e-5,
                            "depth {depth} beta {beta}: {got} vs {want}"
                        );
                    }
                    assert_eq!(c[i * 5 + n], -7.0, "a value outside C changed");
                }
            }
        }
    }

    /// The large-product path (faer on the rayon pool): right against a
    /// naive sum, both layouts of the weight, accumulate or replace, and
    /// bit-identical whatever the number of threads.
    #[test]
    fn large_gemm_is_right_and_independent_of_the_thread_count() {
        // 100M multiply-adds: large enough that faer splits it over threads.
        // n is not a multiple of the serial column block, and as the depth
        // of the backward product it spans two of faer's depth blocks.
        let (m, k, n) = (1024, 384, 552);
        assert!(m * k * n >= BIG_GEMM);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104_729 % 997) as f32 / 498.0) - 1.0)
            .collect();
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01).collect();
        let both = || {
            let y = linear(&a, &w, &bias, k, n);
            // dX = dY·W with dY = y (as [m, n]) and W [n, k], added to a start value.
            let mut dx = vec![1.0; m * k];
            linear_backward(&y, &w, k, n, &mut dx, true);
            (y, dx)
        };
        let run = |threads: usize, one_thread_only: bool| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                if one_thread_only {
                    serial(both)
                } else {
                    both()
                }
            })
        };
        let (y1, dx1) = run(1, false);
        for (threads, one_thread_only) in [(2, false), (3, false), (3, true)] {
            let (y, dx) = run(threads, one_thread_only);
            assert!(
                y == y1 && dx == dx1,
                "{threads} threads (serial: {one_thread_only}) changed the result"
            );
        }
        // A chunk whose GEMMs go back to the pool part-way (another thread
        // fell idle between the two products) gets the same result.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for idle_before in [false, true] {
            let idle = Arc::new(AtomicBool::new(idle_before));
            let (y, dx) = pool.install(|| {
                serial_until_idle(&idle, || {
                    let y = linear(&a, &w, &bias, k, n);
                    idle.store(true, Ordering::Relaxed);
                    assert!(!gemm_on_this_thread_only());
                    let mut dx = vec![1.0; m * k];
                    linear_backward(&y, &w, k, n, &mut dx, true);
                    (y, dx)
                })
            });
            assert!(
                y == y1 && dx == dx1,
                "idle from the start: {idle_before}; the switch changed the result"
            );
        }
        let never = Arc::new(AtomicBool::new(false));
        assert!(serial_until_idle(&never, gemm_on_this_thread_only));
        assert!(!gemm_on_this_thread_only());
        for i in (0..m).step_by(37) {
            for j in (0..n).step_by(11) {
                let want: f64 = bias[j] as f64
                    + (0..k)
                        .map(|t| a[i * k + t] as f64 * w[j * k + t] as f64)
                        .sum::<f64>();
                assert!((y1[i * n + j] as f64 - want).abs() < 1e-3, "y[{i}, {j}]");
            }
            for t in (0..k).step_by(13) {
                let want: f64 = 1.0
                    + (0..n)
                        .map(|j| y1[i * n + j] as f64 * w[j * k + t] as f64)
                        .sum::<f64>();
                assert!(
                    (dx1[i * k + t] as f64 - want).abs() < 1e-2 * (1.0 + want.abs() * 1e-3),
                    "dx[{i}, {t}]"
                );
            }
        }
    }

    /// Recycled buffers are reused best-fit on the same thread (never one
    /// more than twice too large), the pool is bounded, and in builds with
    /// debug assertions every value handed out is NaN, so that a read
    /// before a write shows.
    #[test]
    fn overwritten_buffers_are_recycled_best_fit_and_poisoned_in_tests() {
        std::thread::spawn(|| {
            let big = vec![1.0f32; 1000];
            let small = vec![2.0f32; 100];
            let (big_ptr, small_ptr) = (big.as_ptr(), small.as_ptr());
            recycle(big);
            recycle(small);
            let a = overwritten_buffer(80);
            assert_eq!(a.as_ptr(), small_ptr, "the smallest buffer that fits");
            assert_eq!(a.len(), 80);
            let poisoned = |v: &[f32]| v.iter().all(|x| x.is_nan());
            // Release builds keep the stale values (checked by the bits
            // of the model tests, which do not change).
            assert_eq!(poisoned(&a), cfg!(debug_assertions));
            let b = overwritten_buffer(2000);
            assert_ne!(b.as_ptr(), big_ptr, "too small to reuse");
            assert_eq!(b.len(), 2000);
            let tiny = overwritten_buffer(400);
            assert_ne!(tiny.as_ptr(), big_ptr, "more than twice too large");
            let c = overwritten_buffer(1000);
            assert_eq!(c.as_ptr(), big_ptr);
            assert_eq!(poisoned(&c), cfg!(debug_assertions));
            // Beyond the bound, buffers are freed instead of kept.
            recycle(vec![0.0; SPARE_VALUES]);
            recycle(vec![0.0; 10]);
            let held = SPARE.with(|s| s.borrow().iter().map(Vec::capacity).sum::<usize>());
            assert_eq!(held, SPARE_VALUES);
        })
        .join()
        .unwrap();
    }

    /// The rank-r kernels against a naive f64 product, with a width that is
    /// not a multiple of eight, strided rows, an offset column block, a mask,
    /// and row counts that leave a partial last block.
    #[test]
    fn low_rank_kernels_match_naive_products() {
        let (n, d, r, rs, col0) = (70, 13, 3, 20, 4);
        let x: Vec<f32> = (0..n * rs)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let w: Vec<f32> = (0..r * d)
            .map(|i| ((i * 11 % 23) as f32 / 11.0) - 1.0)
            .collect();
        let m: Vec<f32> = (0..n * d)
            .map(|i| if i % 5 == 0 { 0.0 } else { 1.25 })
            .collect();
        let mut h = vec![0.0f32; n * r];
        low_rank_project(&x[col0..], rs, Some(&m), &w, d, 0.5, &mut h);
        for t in 0..n {
            for j in 0..r {
                let want: f64 = 0.5
                    * (0..d)
                        .map(|k| {
                            x[t * rs + col0 + k] as f64 * m[t * d + k] as f64 * w[j * d + k] as f64
                        })
                        .sum::<f64>();
                assert!(
                    (h[t * r + j] as f64 - want).abs() < 1e-5,
                    "project [{t}, {j}]"
                );
            }
        }
        let mut y = x.clone();
        low_rank_expand(&h, &w, d, 2.0, Some(&m), &mut y[col0..], rs, 0);
        for t in 0..n {
            for c in 0..rs {
                let mut want = x[t * rs + c] as f64;
                if (col0..col0 + d).contains(&c) {
                    let k = c - col0;
                    let p: f64 = (0..r)
                        .map(|j| h[t * r + j] as f64 * w[j * d + k] as f64)
                        .sum();
                    want += 2.0 * p * m[t * d + k] as f64;
                }
                assert!(
                    (y[t * rs + c] as f64 - want).abs() < 1e-5,
                    "expand [{t}, {c}]"
                );
            }
        }
        assert_eq!(transpose(&w, r, d)[5 * r + 2], w[2 * d + 5]);
    }
}
