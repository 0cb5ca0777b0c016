//! Vector kernels for the tall-skinny QR and Jacobi sweeps.
//!
//! Written with several independent accumulators so the compiler can keep
//! SIMD lanes busy; the summation order is fixed by the code (never by
//! thread scheduling), so results are reproducible.

use crate::Real;

const LANES: usize = 8;

/// `Σ a_i b_i` over the common length (dispatched to an AVX2/FMA kernel
/// when the CPU has one).
#[inline]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    T::dot_kernel(a, b)
}

/// `y ← y + alpha·x` over the common length (dispatched like [`dot`]).
#[inline]
pub(crate) fn axpy<T: Real>(alpha: T, x: &[T], y: &mut [T]) {
    T::axpy_kernel(alpha, x, y)
}

/// Portable [`dot`]: eight independent accumulators, combined pairwise.
#[inline]
pub(crate) fn dot_portable<T: Real>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = T::zero();
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    let s0 = (acc[0] + acc[4]) + (acc[1] + acc[5]);
    let s1 = (acc[2] + acc[6]) + (acc[3] + acc[7]);
    (s0 + s1) + tail
}

/// Portable [`axpy`]; also the inlined choice for very short vectors.
#[inline]
pub(crate) fn axpy_portable<T: Real>(alpha: T, x: &[T], y: &mut [T]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// AVX2 + FMA kernels, selected at run time. Same fixed summation order on
/// every call, so results are reproducible on a given machine.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    macro_rules! fma_kernels {
        ($t:ty, $dot:ident, $axpy:ident, $lanes:expr) => {
            /// FMA dot product with `$lanes` independent accumulators.
            #[target_feature(enable = "avx2,fma")]
            pub(crate) fn $dot(a: &[$t], b: &[$t]) -> $t {
                let n = a.len().min(b.len());
                let (a, b) = (&a[..n], &b[..n]);
                let mut acc = [0.0 as $t; $lanes];
                let mut ca = a.chunks_exact($lanes);
                let mut cb = b.chunks_exact($lanes);
                for (x, y) in (&mut ca).zip(&mut cb) {
                    for l in 0..$lanes {
                        acc[l] = x[l].mul_add(y[l], acc[l]);
                    }
                }
                let mut tail = 0.0 as $t;
                for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
                    tail = x.mul_add(y, tail);
                }
                let mut width = $lanes;
                while width > 1 {
                    width /= 2;
                    for l in 0..width {
                        acc[l] += acc[l + width];
                    }
                }
                acc[0] + tail
            }

            /// FMA axpy.
            #[target_feature(enable = "avx2,fma")]
            pub(crate) fn $axpy(alpha: $t, x: &[$t], y: &mut [$t]) {
                for (yi, &xi) in y.iter_mut().zip(x) {
                    *yi = xi.mul_add(alpha, *yi);
                }
            }
        };
    }
    fma_kernels!(f64, dot_f64, axpy_f64, 16);
    fma_kernels!(f32, dot_f32, axpy_f32, 32);

    /// `row ← row·C` for every `R`-long row of `rows` (`C` is `R × R`,
    /// row-major), each row's accumulators held in registers.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn rows_times_small_f64<const R: usize>(rows: &mut [f64], c: &[[f64; R]; R]) {
        for row in rows.chunks_exact_mut(R) {
            let mut acc = [0.0f64; R];
            for (l, &bl) in row.iter().enumerate() {
                for i in 0..R {
                    acc[i] = bl.mul_add(c[l][i], acc[i]);
                }
            }
            row.copy_from_slice(&acc);
        }
    }

    /// Whether the FMA kernels may run here (cached by std).
    #[inline]
    pub(crate) fn has_fma() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
}

/// `x ← alpha·x`.
#[inline]
pub(crate) fn scal<T: Real>(alpha: T, x: &mut [T]) {
    for xi in x.iter_mut() {
        *xi *= alpha;
    }
}

/// Euclidean norm without overflow or harmful underflow: a plain sum of
/// squares first, rescaled only when it leaves the safe range.
#[inline]
pub(crate) fn norm2<T: Real>(x: &[T]) -> T {
    let ss = dot(x, x);
    let big = T::one() / (T::MIN_POSITIVE.sqrt() * T::EPSILON);
    let small = T::MIN_POSITIVE / T::EPSILON;
    if ss.is_finite() && ss > small && ss < big {
        return ss.sqrt();
    }
    let scale = x.iter().fold(T::zero(), |m, &v| {
        let a = v.abs();
        if a > m { a } else { m }
    });
    if scale == T::zero() || !scale.is_finite() {
        return scale;
    }
    let inv = T::one() / scale;
    let mut acc = T::zero();
    for &v in x {
        let t = v * inv;
        acc += t * t;
    }
    scale * acc.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_and_axpy_match_naive_loops_on_all_tail_lengths() {
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 31, 33, 64, 65, 100] {
            let a: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
            let b: Vec<f64> = (0..n).map(|i| (i as f64 * 1.1).cos()).collect();
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-13, "f64 dot, n = {n}");
            assert!((dot_portable(&a, &b) - naive).abs() < 1e-13, "n = {n}");
            let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
            let b32: Vec<f32> = b.iter().map(|&x| x as f32).collect();
            assert!(
                ((dot(&a32, &b32) as f64) - naive).abs() < 1e-4,
                "f32 dot, n = {n}"
            );
            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-15, "axpy, n = {n}");
            }
            let mut y32 = b32.clone();
            axpy(0.5f32, &a32, &mut y32);
            for i in 0..n {
                assert!((y32[i] - (b32[i] + 0.5 * a32[i])).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn norm2_survives_overflow_and_underflow_ranges() {
        let big = [3e200f64, 4e200];
        assert!((norm2(&big) / 5e200 - 1.0).abs() < 1e-15);
        let tiny = [3e-200f64, 4e-200];
        assert!((norm2(&tiny) / 5e-200 - 1.0).abs() < 1e-15);
        let big32 = [3e30f32, 4e30];
        assert!((norm2(&big32) / 5e30 - 1.0).abs() < 1e-6);
        assert_eq!(norm2::<f64>(&[0.0, 0.0]), 0.0);
    }
}
