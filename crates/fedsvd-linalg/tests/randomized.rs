//! Randomized SVD against the Halko–Martinsson–Tropp error bounds.

mod common;

use common::*;
use fedsvd_linalg::{
    Error, FactoredSum, LinearOperator, Result, RsvdParams, randomized_svd, refactorize,
    refactorize_randomized, thin_svd,
};
use ndarray::{Array1, Array2, ArrayView2};

fn spectral_norm(a: &Array2<f64>) -> f64 {
    thin_svd(a.view()).unwrap().s[0]
}

/// HMT 2011 eq. (1.9)/Thm 10.8: with probability ≥ 1 − 6·p^{−p},
/// ‖A − QQᵀA‖ ≤ [1 + 11·√(k+p)·√min(m,n)]·σ_{k+1}; with q power iterations
/// the same holds for (AAᵀ)^q·A, hence the (2q+1)-th root (Cor. 10.10).
/// Truncating to rank k adds at most σ_{k+1} (HMT §9.4).
fn hmt_spectral_bound(k: usize, p: usize, q: usize, m: usize, n: usize, sigma_next: f64) -> f64 {
    let c = 1.0 + 11.0 * ((k + p) as f64).sqrt() * (m.min(n) as f64).sqrt();
    c.powf(1.0 / (2 * q + 1) as f64) * sigma_next + sigma_next
}

#[test]
fn error_within_hmt_bound_on_decaying_spectra() {
    let (m, n) = (150, 90);
    for (decay, seed) in [(0.8f64, 1u64), (0.5, 2)] {
        let s = Array1::from_shape_fn(n, |j| decay.powi(j as i32));
        let a = with_spectrum(&mut rng(seed), m, n, &s);
        for (k, p, q) in [(5, 5, 0), (10, 10, 0), (10, 5, 1), (8, 4, 2)] {
            for run in 0..3 {
                let params = RsvdParams {
                    rank: k,
                    oversampling: p,
                    power_iterations: q,
                    seed: 10 * seed + run,
                };
                let svd = randomized_svd(&a, &params).unwrap();
                assert_eq!(svd.rank(), k);
                let err = spectral_norm(&(&a - &svd.reconstruct()));
                let bound = hmt_spectral_bound(k, p, q, m, n, s[k]);
                assert!(
                    err <= bound,
                    "decay {decay} k {k} p {p} q {q}: {err:e} > {bound:e}"
                );
                // Never better than the optimum (Eckart–Young): a wrong
                // "error" computation would break this.
                assert!(
                    err >= s[k] * (1.0 - 1e-9),
                    "error {err:e} below σ_(k+1) = {:e}",
                    s[k]
                );
                assert!(row_orthonormality_error(svd.vt.view()) <= 1e-12);
                assert!(row_orthonormality_error(svd.u.t()) <= 1e-12);
            }
        }
    }
}

#[test]
fn mean_frobenius_error_within_hmt_expectation_bound() {
    // HMT Thm 10.5: E‖A − QQᵀA‖_F ≤ (1 + k/(p−1))^{1/2}·(Σ_{j>k} σ_j²)^{1/2}
    // for a sketch of k + p columns. With rank = k + p and no oversampling,
    // randomized_svd returns exactly QQᵀA.
    let (m, n, k, p) = (120, 80, 6, 4);
    let s = Array1::from_shape_fn(n, |j| 0.85f64.powi(j as i32));
    let a = with_spectrum(&mut rng(5), m, n, &s);
    let tail = s.iter().skip(k).map(|x| x * x).sum::<f64>().sqrt();
    let bound = (1.0 + k as f64 / (p as f64 - 1.0)).sqrt() * tail;
    let runs = 20;
    let mean = (0..runs)
        .map(|seed| {
            let params = RsvdParams {
                rank: k + p,
                oversampling: 0,
                power_iterations: 0,
                seed,
            };
            frob((&a - &randomized_svd(&a, &params).unwrap().reconstruct()).view())
        })
        .sum::<f64>()
        / runs as f64;
    assert!(mean <= bound, "mean {mean:e} > bound {bound:e}");
    // And no better than the best rank-(k+p) approximation.
    let best = s.iter().skip(k + p).map(|x| x * x).sum::<f64>().sqrt();
    assert!(mean >= best * (1.0 - 1e-9));
}

#[test]
fn power_iterations_recover_leading_singular_values() {
    let (m, n, k) = (200, 100, 8);
    let s = Array1::from_shape_fn(n, |j| 0.5f64.powi(j as i32));
    let a = with_spectrum(&mut rng(9), m, n, &s);
    let svd = randomized_svd(
        &a,
        &RsvdParams {
            rank: k,
            oversampling: 10,
            power_iterations: 2,
            seed: 3,
        },
    )
    .unwrap();
    for i in 0..k {
        assert!(
            (svd.s[i] - s[i]).abs() <= 1e-9,
            "σ_{i}: {} vs {}",
            svd.s[i],
            s[i]
        );
    }
    assert!(rows_follow_sign_convention(svd.vt.view()));
}

#[test]
fn same_seed_same_bits_other_seed_other_sketch() {
    let a = with_spectrum(
        &mut rng(4),
        60,
        40,
        &Array1::from_shape_fn(40, |j| 0.9f64.powi(j as i32)),
    );
    let p = RsvdParams {
        rank: 5,
        oversampling: 3,
        power_iterations: 0,
        seed: 77,
    };
    let x = randomized_svd(&a, &p).unwrap();
    let y = randomized_svd(&a, &p).unwrap();
    assert_eq!(x, y);
    let z = randomized_svd(&a, &RsvdParams { seed: 78, ..p }).unwrap();
    assert_ne!(x.s, z.s, "the seed must change the sketch");
}

#[test]
fn factored_sum_operator_is_exact_without_forming_the_matrix() {
    let (d_out, d_in) = (70, 50);
    let mut g = rng(12);
    let terms: Vec<(f64, Array2<f64>, Array2<f64>)> = [(0.5, 4usize), (0.3, 4), (0.2, 2)]
        .iter()
        .map(|&(w, r)| (w, gaussian(&mut g, d_out, r), gaussian(&mut g, r, d_in)))
        .collect();
    let mut sum = FactoredSum::new(d_out, d_in).unwrap();
    for (w, b, a) in &terms {
        sum.push(*w, b.view(), a.view()).unwrap();
    }
    assert_eq!(sum.len(), 3);
    let dense = terms
        .iter()
        .fold(Array2::<f64>::zeros((d_out, d_in)), |acc, (w, b, a)| {
            acc + b.dot(a) * *w
        });
    assert!(max_abs_diff(sum.to_dense().view(), dense.view()) <= 1e-12);
    let x: Array2<f64> = gaussian(&mut g, d_in, 3);
    let y: Array2<f64> = gaussian(&mut g, d_out, 3);
    assert!(max_abs_diff(sum.apply(x.view()).unwrap().view(), dense.dot(&x).view()) <= 1e-11);
    assert!(
        max_abs_diff(
            sum.apply_transpose(y.view()).unwrap().view(),
            dense.t().dot(&y).view()
        ) <= 1e-11
    );

    // Inner rank 10: a rank-10 randomized SVD is exact and equals the dense
    // SVD's leading triplets.
    let svd = randomized_svd(
        &sum,
        &RsvdParams {
            rank: 10,
            oversampling: 5,
            power_iterations: 1,
            seed: 1,
        },
    )
    .unwrap();
    assert!(frob((&svd.reconstruct() - &dense).view()) <= 1e-12 * frob(dense.view()));
    let reference = thin_svd(dense.view()).unwrap();
    for i in 0..10 {
        assert!((svd.s[i] - reference.s[i]).abs() <= 1e-12 * reference.s[0]);
    }
}

#[test]
fn randomized_refactorization_matches_the_factored_one() {
    let mut g = rng(13);
    let b: Array2<f64> = gaussian(&mut g, 90, 6);
    let a: Array2<f64> = gaussian(&mut g, 6, 110);
    let (b1, a1) = refactorize(b.view(), a.view()).unwrap();
    let (b2, a2) = refactorize_randomized(b.view(), a.view(), &RsvdParams::new(6)).unwrap();
    assert!(max_abs_diff(a1.view(), a2.view()) <= 1e-9);
    assert!(max_abs_diff(b1.view(), b2.view()) <= 1e-9 * frob(b1.view()));
    let m = b.dot(&a);
    assert!(frob((&b2.dot(&a2) - &m).view()) <= 1e-12 * frob(m.view()));
}

#[test]
fn f32_randomized_svd_is_accurate_to_single_precision() {
    let mut g = rng(14);
    let b: Array2<f32> = gaussian(&mut g, 80, 5);
    let a: Array2<f32> = gaussian(&mut g, 5, 60);
    let m = b.dot(&a);
    let svd = randomized_svd(&m, &RsvdParams::new(5)).unwrap();
    assert!(frob((&svd.reconstruct() - &m).view()) <= 1e-5 * frob(m.view()));
    assert!(row_orthonormality_error(svd.vt.view()) <= 1e-5);
}

/// An operator that lies about its output shape.
struct Liar;
impl LinearOperator<f64> for Liar {
    fn nrows(&self) -> usize {
        10
    }
    fn ncols(&self) -> usize {
        8
    }
    fn apply(&self, x: ArrayView2<'_, f64>) -> Result<Array2<f64>> {
        Ok(Array2::zeros((9, x.ncols())))
    }
    fn apply_transpose(&self, y: ArrayView2<'_, f64>) -> Result<Array2<f64>> {
        Ok(Array2::zeros((8, y.ncols())))
    }
}

#[test]
fn bad_parameters_and_operators_give_typed_errors() {
    let a = Array2::<f64>::ones((6, 4));
    for rank in [0, 5] {
        assert!(matches!(
            randomized_svd(&a, &RsvdParams::new(rank)),
            Err(Error::InvalidParameter { name: "rank", .. })
        ));
    }
    assert!(matches!(
        randomized_svd(&Liar, &RsvdParams::new(2)),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut sum = FactoredSum::<f64>::new(6, 4).unwrap();
    assert!(matches!(
        sum.push(1.0, Array2::zeros((6, 2)), Array2::zeros((3, 4))),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        sum.push(f64::NAN, Array2::zeros((6, 2)), Array2::zeros((2, 4))),
        Err(Error::InvalidParameter { name: "weight", .. })
    ));
    let mut nan_b = Array2::<f64>::zeros((6, 2));
    nan_b[[1, 1]] = f64::NAN;
    assert!(matches!(
        sum.push(1.0, nan_b, Array2::zeros((2, 4))),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        sum.apply(Array2::zeros((5, 1)).view()),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        FactoredSum::<f64>::new(0, 4),
        Err(Error::Empty { .. })
    ));
}
