//! The factored SVD and refactorization against the dense reference.

mod common;

use common::*;
use fedsvd_linalg::{
    Error, Real, factored_svd, refactorize, refactorize_dense, refactorize_many, singular_values,
    thin_qr, thin_svd,
};
use ndarray::{Array2, s};

/// (d_out, d_in, r) covering d_out ≠ d_in both ways, r = 1, r = 64 and
/// r = min(d_out, d_in).
const SHAPES: &[(usize, usize, usize)] = &[
    (40, 25, 1),
    (25, 40, 3),
    (96, 96, 8),
    (150, 70, 16),
    (70, 150, 64),
    (80, 64, 64),
];

fn lora_pair<T: Real>(seed: u64, d_out: usize, d_in: usize, r: usize) -> (Array2<T>, Array2<T>) {
    let mut g = rng(seed);
    (gaussian(&mut g, d_out, r), gaussian(&mut g, r, d_in))
}

/// B = G₁·G₂ with G₁ of `rank` columns: rank(B) = rank < r.
fn rank_deficient_b<T: Real>(seed: u64, d_out: usize, r: usize, rank: usize) -> Array2<T> {
    let mut g = rng(seed);
    let g1: Array2<T> = gaussian(&mut g, d_out, rank);
    let g2: Array2<T> = gaussian(&mut g, rank, r);
    g1.dot(&g2)
}

/// Every property a correct refactorization has, at tolerance `tol`.
fn check_refactorization<T: Real>(b: &Array2<T>, a: &Array2<T>, tol: f64) {
    let (d_out, r) = b.dim();
    let d_in = a.ncols();
    let (b_new, a_new) = refactorize(b.view(), a.view()).unwrap();
    assert_eq!(b_new.dim(), (d_out, r));
    assert_eq!(a_new.dim(), (r, d_in));

    // Same product.
    let m = b.dot(a);
    let rel = frob(((&b_new.dot(&a_new)) - &m).view()) / frob(m.view());
    assert!(rel <= tol, "{d_out}x{d_in} r={r}: relative error {rel:e}");
    // A_new has orthonormal rows.
    let orth = row_orthonormality_error(a_new.view());
    assert!(
        orth <= tol,
        "{d_out}x{d_in} r={r}: A_new·A_newᵀ − I = {orth:e}"
    );
    // Singular values: the column norms of B_new equal the dense SVD's.
    let dense = thin_svd(m.view()).unwrap();
    let smax = dense.s[0].to_f64();
    let mut prev = f64::INFINITY;
    for i in 0..r {
        let norm = frob(b_new.slice(s![.., i..i + 1]));
        let diff = (norm - dense.s[i].to_f64()).abs();
        assert!(
            diff <= tol * smax,
            "σ_{i}: {norm} vs dense {} ({d_out}x{d_in} r={r})",
            dense.s[i]
        );
        // Descending, up to rounding (rank-deficient tails are noise).
        assert!(norm <= prev + tol * smax, "σ not descending at {i}");
        prev = norm;
    }
    // B_new's columns are mutually orthogonal (B_new = U·Σ).
    let g = b_new.t().dot(&b_new);
    for i in 0..r {
        for j in 0..r {
            if i != j {
                assert!(
                    g[[i, j]].to_f64().abs() <= tol * smax * smax,
                    "B_new columns {i},{j}"
                );
            }
        }
    }
    assert!(rows_follow_sign_convention(a_new.view()));
}

#[test]
fn refactorize_f64_matches_dense_on_random_shapes() {
    for (seed, &(d_out, d_in, r)) in SHAPES.iter().enumerate() {
        let (b, a) = lora_pair::<f64>(seed as u64, d_out, d_in, r);
        check_refactorization(&b, &a, 1e-12);
    }
}

#[test]
fn refactorize_f32_matches_dense_on_random_shapes() {
    for (seed, &(d_out, d_in, r)) in SHAPES.iter().enumerate() {
        let (b, a) = lora_pair::<f32>(100 + seed as u64, d_out, d_in, r);
        check_refactorization(&b, &a, 1e-5);
    }
}

#[test]
fn refactorize_handles_rank_deficient_b() {
    for &(d_out, d_in, r, rank) in &[
        (60usize, 45usize, 8usize, 2usize),
        (90, 120, 64, 5),
        (30, 30, 4, 1),
    ] {
        let b = rank_deficient_b::<f64>(7, d_out, r, rank);
        let a = lora_pair::<f64>(8, d_out, d_in, r).1;
        check_refactorization(&b, &a, 1e-12);
        let (b_new, _) = refactorize(b.view(), a.view()).unwrap();
        // Columns beyond the rank carry only rounding.
        let tail = frob(b_new.slice(s![.., rank..]));
        assert!(tail <= 1e-12 * frob(b_new.view()), "tail {tail:e}");

        let b32 = rank_deficient_b::<f32>(9, d_out, r, rank);
        let a32 = lora_pair::<f32>(10, d_out, d_in, r).1;
        check_refactorization(&b32, &a32, 1e-5);
    }
}

#[test]
fn refactorize_handles_rank_deficient_a_and_zero_b() {
    let mut g = rng(11);
    let (d_out, d_in, r) = (50, 40, 6);
    let b: Array2<f64> = gaussian(&mut g, d_out, r);
    let a = gaussian::<f64>(&mut g, r, 2).dot(&gaussian::<f64>(&mut g, 2, d_in));
    check_refactorization(&b, &a, 1e-12);

    // A zero product: B_new is zero and A_new still has orthonormal rows.
    let zero = Array2::<f64>::zeros((d_out, r));
    let (b_new, a_new) = refactorize(zero.view(), a.view()).unwrap();
    assert!(b_new.iter().all(|&x| x == 0.0));
    assert!(row_orthonormality_error(a_new.view()) <= 1e-12);
    let svd = factored_svd(zero.view(), a.view()).unwrap();
    assert!(svd.s.iter().all(|&x| x == 0.0));
    assert!(row_orthonormality_error(svd.u.t()) <= 1e-12);
}

#[test]
fn factored_svd_is_a_complete_thin_svd_and_agrees_with_refactorize() {
    for (seed, &(d_out, d_in, r)) in SHAPES.iter().enumerate() {
        let (b, a) = lora_pair::<f64>(200 + seed as u64, d_out, d_in, r);
        let svd = factored_svd(b.view(), a.view()).unwrap();
        assert!(
            row_orthonormality_error(svd.u.t()) <= 1e-12,
            "U not orthonormal"
        );
        assert!(
            row_orthonormality_error(svd.vt.view()) <= 1e-12,
            "Vᵀ not orthonormal"
        );
        let m = b.dot(&a);
        assert!(frob((&svd.reconstruct() - &m).view()) <= 1e-12 * frob(m.view()));
        let (b_new, a_new) = refactorize(b.view(), a.view()).unwrap();
        assert_eq!(a_new, svd.vt, "same right factor, bit for bit");
        assert!(max_abs_diff(b_new.view(), svd.u_sigma().view()) <= 1e-12 * svd.s[0]);
    }
    // Rank-deficient: U is still completed to r orthonormal columns.
    let b = rank_deficient_b::<f64>(3, 70, 10, 3);
    let a = lora_pair::<f64>(4, 70, 50, 10).1;
    let svd = factored_svd(b.view(), a.view()).unwrap();
    assert!(row_orthonormality_error(svd.u.t()) <= 1e-12);
    assert!(svd.s[3] <= 1e-12 * svd.s[0]);
}

#[test]
fn singular_vectors_match_the_dense_svd_under_the_sign_convention() {
    // Well-separated singular values make the vectors unique up to sign;
    // with the shared convention they must coincide.
    let mut g = rng(21);
    let (d_out, d_in, r) = (80, 60, 5);
    let q_b = orthonormal_columns(&mut g, d_out, r);
    let mut b = q_b.clone();
    for (i, mut c) in b.columns_mut().into_iter().enumerate() {
        c *= 2f64.powi(-(i as i32));
    }
    let a = orthonormal_columns(&mut g, d_in, r).t().to_owned();
    let svd = factored_svd(b.view(), a.view()).unwrap();
    let dense = thin_svd(b.dot(&a).view()).unwrap().truncate(r).unwrap();
    assert!(max_abs_diff(svd.vt.view(), dense.vt.view()) <= 1e-10);
    assert!(max_abs_diff(svd.u.view(), dense.u.view()) <= 1e-10);
    let (b_dense, a_dense) = refactorize_dense(b.view(), a.view()).unwrap();
    let (b_new, a_new) = refactorize(b.view(), a.view()).unwrap();
    assert!(max_abs_diff(a_new.view(), a_dense.view()) <= 1e-10);
    assert!(max_abs_diff(b_new.view(), b_dense.view()) <= 1e-10);
    // Flipping the sign of a factor pair does not change the output.
    let (b_neg, a_neg) = (-&b, -&a);
    let (b2, a2) = refactorize(b_neg.view(), a_neg.view()).unwrap();
    assert!(max_abs_diff(a2.view(), a_new.view()) <= 1e-12);
    assert!(max_abs_diff(b2.view(), b_new.view()) <= 1e-12);
}

#[test]
fn refactorizing_twice_is_stable() {
    // The server refactorizes every round: a refactorized pair must map to
    // itself (same sign convention, A already orthonormal).
    let (b, a) = lora_pair::<f64>(31, 64, 48, 8);
    let (b1, a1) = refactorize(b.view(), a.view()).unwrap();
    let (b2, a2) = refactorize(b1.view(), a1.view()).unwrap();
    assert!(max_abs_diff(a1.view(), a2.view()) <= 1e-10);
    assert!(max_abs_diff(b1.view(), b2.view()) <= 1e-10 * frob(b1.view()));
}

#[test]
fn refactorize_many_equals_single_calls_for_any_thread_count() {
    let mods: Vec<(Array2<f64>, Array2<f64>)> = (0..9)
        .map(|i| lora_pair(300 + i, 64 + 8 * i as usize, 48, 4))
        .collect();
    let views: Vec<_> = mods.iter().map(|(b, a)| (b.view(), a.view())).collect();
    let single: Vec<_> = views
        .iter()
        .map(|(b, a)| refactorize(*b, *a).unwrap())
        .collect();
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let many = pool.install(|| refactorize_many(&views)).unwrap();
        assert_eq!(many, single, "{threads} threads");
    }
}

#[test]
fn refactorize_many_names_the_failing_module() {
    let (b, a) = lora_pair::<f64>(1, 20, 20, 2);
    let bad = Array2::<f64>::zeros((20, 3));
    let views = vec![
        (b.view(), a.view()),
        (b.view(), a.view()),
        (bad.view(), a.view()),
    ];
    match refactorize_many(&views) {
        Err(Error::InModule { index: 2, source }) => {
            assert!(matches!(*source, Error::ShapeMismatch { .. }))
        }
        other => panic!("expected module 2 to fail, got {other:?}"),
    }
}

#[test]
fn bad_input_gives_typed_errors() {
    let (b, a) = lora_pair::<f64>(1, 10, 12, 3);
    let a_wrong = Array2::<f64>::zeros((4, 12));
    assert!(matches!(
        refactorize(b.view(), a_wrong.view()),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut b_nan = b.clone();
    b_nan[[4, 1]] = f64::NAN;
    match refactorize(b_nan.view(), a.view()) {
        Err(Error::NonFinite {
            what,
            row: 4,
            col: 1,
            ..
        }) => assert_eq!(what, "B"),
        other => panic!("{other:?}"),
    }
    let mut a_inf = a.clone();
    a_inf[[0, 0]] = f64::INFINITY;
    assert!(matches!(
        factored_svd(b.view(), a_inf.view()),
        Err(Error::NonFinite { .. })
    ));
    // r = 5 > d_out = 4.
    let (b5, a5) = lora_pair::<f64>(2, 4, 12, 5);
    assert!(matches!(
        refactorize(b5.view(), a5.view()),
        Err(Error::RankTooLarge { rank: 5, .. })
    ));
    let empty = Array2::<f64>::zeros((0, 3));
    assert!(matches!(
        refactorize(empty.view(), a.view()),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(thin_qr(empty.view()), Err(Error::Empty { .. })));
    assert!(matches!(
        thin_svd(b_nan.view()),
        Err(Error::NonFinite { .. })
    ));
}

#[test]
fn thin_qr_factors_tall_wide_and_rank_deficient_matrices() {
    let mut g = rng(41);
    let tall: Array2<f64> = gaussian(&mut g, 30, 7);
    let wide: Array2<f64> = gaussian(&mut g, 5, 9);
    let deficient = gaussian::<f64>(&mut g, 20, 2).dot(&gaussian::<f64>(&mut g, 2, 6));
    for m in [tall, wide, deficient] {
        let (q, r) = thin_qr(m.view()).unwrap();
        let k = m.nrows().min(m.ncols());
        assert_eq!(q.dim(), (m.nrows(), k));
        assert_eq!(r.dim(), (k, m.ncols()));
        assert!(max_abs_diff(q.dot(&r).view(), m.view()) <= 1e-12 * frob(m.view()));
        assert!(row_orthonormality_error(q.t()) <= 1e-13);
        for i in 0..k {
            for j in 0..i.min(m.ncols()) {
                assert_eq!(r[[i, j]], 0.0, "R not upper triangular");
            }
        }
    }
    let m32: Array2<f32> = gaussian(&mut g, 40, 6);
    let (q, r) = thin_qr(m32.view()).unwrap();
    assert!(max_abs_diff(q.dot(&r).view(), m32.view()) <= 1e-5 * frob(m32.view()));
    assert!(row_orthonormality_error(q.t()) <= 1e-5);
}

#[test]
fn dense_thin_svd_reconstructs_and_follows_the_sign_convention() {
    let mut g = rng(51);
    for (m, n) in [(30usize, 20usize), (20, 30)] {
        let x: Array2<f64> = gaussian(&mut g, m, n);
        let svd = thin_svd(x.view()).unwrap();
        assert_eq!(svd.rank(), 20);
        assert!(max_abs_diff(svd.reconstruct().view(), x.view()) <= 1e-12 * frob(x.view()));
        assert!(row_orthonormality_error(svd.vt.view()) <= 1e-12);
        assert!(row_orthonormality_error(svd.u.t()) <= 1e-12);
        assert!(rows_follow_sign_convention(svd.vt.view()));
        assert!(svd.s.windows(2).into_iter().all(|w| w[0] >= w[1]));
    }
}

/// A known spectrum comes back, descending, for tall and wide inputs and
/// in f32; a rank-deficient matrix gives (near) zeros past its rank; bad
/// input is a typed error.
#[test]
fn singular_values_recover_a_known_spectrum() {
    let mut g = rng(52);
    let spectrum = ndarray::Array1::from(vec![9.0, 4.0, 1.5, 0.25, 1e-3]);
    for (m, n) in [(60usize, 5usize), (5, 60), (40, 12)] {
        let x = with_spectrum(&mut g, m, n, &spectrum);
        let s = singular_values(x.view()).unwrap();
        assert_eq!(s.len(), m.min(n));
        for (i, &want) in spectrum.iter().enumerate() {
            assert!(
                (s[i] - want).abs() <= 1e-12 * 9.0,
                "{m}x{n} s[{i}] = {}",
                s[i]
            );
        }
        assert!(
            s.iter()
                .skip(spectrum.len())
                .all(|&v| v.abs() <= 1e-12 * 9.0)
        );
        assert!(s.windows(2).into_iter().all(|w| w[0] >= w[1]));
        let dense = thin_svd(x.view()).unwrap().s;
        assert!(
            max_abs_diff(
                s.view().insert_axis(ndarray::Axis(0)),
                dense.view().insert_axis(ndarray::Axis(0))
            ) <= 1e-12 * 9.0
        );
        let x32 = x.mapv(|v| v as f32);
        let s32 = singular_values(x32.view()).unwrap();
        assert!((f64::from(s32[0]) - 9.0).abs() <= 1e-5 * 9.0);
    }
    let mut bad: Array2<f64> = gaussian(&mut g, 4, 3);
    bad[[2, 1]] = f64::NAN;
    assert!(matches!(
        singular_values(bad.view()),
        Err(Error::NonFinite { row: 2, col: 1, .. })
    ));
    let empty = Array2::<f64>::zeros((0, 3));
    assert!(matches!(
        singular_values(empty.view()),
        Err(Error::Empty { .. })
    ));
}

/// In place gives the allocating path's numbers (bit for bit in f64, where
/// both run the same arithmetic), for every shape in turn on one thread, so
/// the reused scratch space is resized up and down between calls; and a
/// non-contiguous (transposed) view, which takes the general copy path.
#[test]
fn in_place_matches_refactorize_across_shapes_and_layouts() {
    for (k, &(d_out, d_in, r)) in SHAPES.iter().enumerate() {
        let (b, a) = lora_pair::<f64>(900 + k as u64, d_out, d_in, r);
        let (b_ref, a_ref) = refactorize(b.view(), a.view()).unwrap();
        let (mut b_in, mut a_in) = (b.clone(), a.clone());
        fedsvd_linalg::refactorize_in_place(b_in.view_mut(), a_in.view_mut()).unwrap();
        assert_eq!(b_in, b_ref, "{d_out}x{d_in} r={r}: B");
        assert_eq!(a_in, a_ref, "{d_out}x{d_in} r={r}: A");

        // The same factors held transposed in memory (Fortran order).
        let mut b_t = Array2::<f64>::zeros((r, d_out));
        b_t.assign(&b.t());
        let mut a_t = Array2::<f64>::zeros((d_in, r));
        a_t.assign(&a.t());
        fedsvd_linalg::refactorize_in_place(
            b_t.view_mut().reversed_axes(),
            a_t.view_mut().reversed_axes(),
        )
        .unwrap();
        let tol = 1e-13 * (1.0 + frob(b_ref.view()));
        assert!(
            max_abs_diff(b_t.t(), b_ref.view()) <= tol,
            "{d_out}x{d_in} r={r}: strided B"
        );
        assert!(
            max_abs_diff(a_t.t(), a_ref.view()) <= 1e-13,
            "{d_out}x{d_in} r={r}: strided A"
        );

        // f32 in place: computed in f64, rounded once.
        let (b32, a32) = (b.mapv(|x| x as f32), a.mapv(|x| x as f32));
        let (mut b32_in, mut a32_in) = (b32.clone(), a32.clone());
        fedsvd_linalg::refactorize_in_place(b32_in.view_mut(), a32_in.view_mut()).unwrap();
        let m = b32.dot(&a32);
        let rel = frob((&b32_in.dot(&a32_in) - &m).view()) / frob(m.view());
        assert!(
            rel <= 1e-5,
            "{d_out}x{d_in} r={r}: f32 relative error {rel:e}"
        );
        assert!(row_orthonormality_error(a32_in.view()) <= 1e-5);
    }
}

/// A module with a NaN is reported by index and left as it was; the other
/// modules are refactorized.
#[test]
fn in_place_batch_reports_the_bad_module_and_leaves_it_unchanged() {
    let (b0, a0) = lora_pair::<f64>(1, 30, 20, 4);
    let (mut b1, a1) = lora_pair::<f64>(2, 30, 20, 4);
    b1[[7, 2]] = f64::NAN;
    let (mut w0, mut v0, mut w1, mut v1) = (b0.clone(), a0.clone(), b1.clone(), a1.clone());
    let err = fedsvd_linalg::refactorize_many_in_place(&mut [
        (w0.view_mut(), v0.view_mut()),
        (w1.view_mut(), v1.view_mut()),
    ])
    .unwrap_err();
    match err {
        Error::InModule { index: 1, source } => {
            assert!(source.to_string().contains('B'), "{source}");
        }
        other => panic!("unexpected error {other}"),
    }
    assert_eq!(v1, a1);
    assert!(w1[[7, 2]].is_nan() && w1.iter().zip(&b1).filter(|(x, y)| x != y).count() == 1);
    assert_eq!((w0, v0), refactorize(b0.view(), a0.view()).unwrap());
}
