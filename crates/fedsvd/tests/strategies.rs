//! Server rules of the five methods on random adapter states.

use fedsvd::{ClientUpdate, Error, GlobalState, Method, ModuleAdapter, SvdSolver};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

const SHAPES: [(usize, usize); 3] = [(24, 16), (16, 40), (9, 9)];
const RANK: usize = 4;

fn random(rows: usize, cols: usize, rng: &mut ChaCha20Rng) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || rng.random_range(-1.0f32..1.0))
}

fn state(rng: &mut ChaCha20Rng) -> GlobalState {
    GlobalState {
        modules: SHAPES
            .iter()
            .enumerate()
            .map(|(i, &(d_out, d_in))| {
                let mut m = ModuleAdapter::initialized(format!("m{i}"), d_out, d_in, RANK, rng);
                m.b = random(d_out, RANK, rng);
                m
            })
            .collect(),
        scale: 2.0,
        head: None,
    }
}

fn updates(state: &GlobalState, with_a: bool, rng: &mut ChaCha20Rng) -> Vec<ClientUpdate> {
    [120usize, 40, 240]
        .iter()
        .map(|&examples| ClientUpdate {
            examples,
            b: state
                .modules
                .iter()
                .map(|m| random(m.d_out(), RANK, rng))
                .collect(),
            a: with_a.then(|| {
                state
                    .modules
                    .iter()
                    .map(|m| random(RANK, m.d_in(), rng))
                    .collect()
            }),
            head: None,
        })
        .collect()
}

fn weights(updates: &[ClientUpdate]) -> Vec<f64> {
    let total: usize = updates.iter().map(|u| u.examples).sum();
    updates
        .iter()
        .map(|u| u.examples as f64 / total as f64)
        .collect()
}

fn rel_err(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    let diff = (a - b).mapv(|x| x * x).sum().sqrt();
    diff / b.mapv(|x| x * x).sum().sqrt().max(f32::MIN_POSITIVE)
}

/// The effective weight change of a module: Δ + s·B·A.
fn effective(module: &ModuleAdapter, scale: f32) -> Array2<f32> {
    let product = module.product() * scale;
    match &module.base_delta {
        Some(d) => d + &product,
        None => product,
    }
}

#[test]
fn fedsvd_keeps_every_product_and_orthonormalizes_a() {
    for solver in [SvdSolver::Factored, SvdSolver::Dense, SvdSolver::Randomized] {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let mut s = state(&mut rng);
        let ups = updates(&s, false, &mut rng);
        let strategy = Method::Fedsvd {
            svd_period: 1,
            svd_warmup: 0,
            solver,
        }
        .strategy();
        // The product after aggregation but before refactorization.
        let mut averaged = s.clone();
        Method::Ffa
            .strategy()
            .apply(&mut averaged, &ups, 0, &mut rng)
            .unwrap();
        let step = strategy.apply(&mut s, &ups, 0, &mut rng).unwrap();
        assert!(step.refactorized);
        for (m, reference) in s.modules.iter().zip(&averaged.modules) {
            let err = rel_err(&m.product(), &reference.product());
            assert!(err <= 1e-5, "{solver:?} {}: product moved by {err}", m.name);
            let gram = m.a.dot(&m.a.t());
            let eye = Array2::<f32>::eye(RANK);
            assert!(
                (&gram - &eye).iter().all(|x| x.abs() <= 1e-5),
                "{solver:?} {}: A Aᵀ = {gram:?}",
                m.name
            );
        }
    }
}

#[test]
fn fedsvd_follows_its_schedule() {
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let mut s = state(&mut rng);
    let strategy = Method::Fedsvd {
        svd_period: 2,
        svd_warmup: 2,
        solver: SvdSolver::Factored,
    }
    .strategy();
    let mut refactorized = Vec::new();
    for round in 0..6 {
        let ups = updates(&s, false, &mut rng);
        let a_before: Vec<_> = s.modules.iter().map(|m| m.a.clone()).collect();
        let step = strategy.apply(&mut s, &ups, round, &mut rng).unwrap();
        let a_moved = s.modules.iter().zip(&a_before).any(|(m, a)| m.a != a);
        assert_eq!(step.refactorized, a_moved, "round {round}");
        refactorized.push(step.refactorized);
    }
    // Rounds 1, 3, 5 end a period; round 1 (2 done) is still in the warm-up.
    assert_eq!(refactorized, [false, false, false, true, false, true]);
}

#[test]
fn ffa_never_changes_a_and_averages_b_by_examples() {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let mut s = state(&mut rng);
    let a0: Vec<_> = s.modules.iter().map(|m| m.a.clone()).collect();
    let strategy = Method::Ffa.strategy();
    for round in 0..3 {
        let ups = updates(&s, false, &mut rng);
        let w = weights(&ups);
        strategy.apply(&mut s, &ups, round, &mut rng).unwrap();
        for (i, m) in s.modules.iter().enumerate() {
            assert_eq!(m.a, a0[i]);
            let mut expected = Array2::<f32>::zeros(m.b.dim());
            for (u, &wk) in ups.iter().zip(&w) {
                expected.scaled_add(wk as f32, &u.b[i]);
            }
            assert!(rel_err(&m.b, &expected) < 1e-6);
        }
    }
}

#[test]
fn fedavg_averages_both_factors() {
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    let mut s = state(&mut rng);
    let ups = updates(&s, true, &mut rng);
    let w = weights(&ups);
    Method::Fedavg
        .strategy()
        .apply(&mut s, &ups, 0, &mut rng)
        .unwrap();
    for (i, m) in s.modules.iter().enumerate() {
        let mut a = Array2::<f32>::zeros(m.a.dim());
        for (u, &wk) in ups.iter().zip(&w) {
            a.scaled_add(wk as f32, &u.a.as_ref().unwrap()[i]);
        }
        assert!(rel_err(&m.a, &a) < 1e-6);
        assert!(m.base_delta.is_none());
    }
}

#[test]
fn fedex_global_product_is_the_exact_mean_of_products() {
    let mut rng = ChaCha20Rng::seed_from_u64(21);
    let mut s = state(&mut rng);
    let strategy = Method::Fedex.strategy();
    for round in 0..2 {
        let before: Vec<_> = s.modules.iter().map(|m| m.base_delta.clone()).collect();
        let ups = updates(&s, true, &mut rng);
        let w = weights(&ups);
        strategy.apply(&mut s, &ups, round, &mut rng).unwrap();
        for (i, m) in s.modules.iter().enumerate() {
            let mut exact = Array2::<f32>::zeros((m.d_out(), m.d_in()));
            for (u, &wk) in ups.iter().zip(&w) {
                exact.scaled_add(wk as f32, &u.b[i].dot(&u.a.as_ref().unwrap()[i]));
            }
            let mut expected = exact * s.scale;
            if let Some(d) = &before[i] {
                expected += d;
            }
            assert!(rel_err(&effective(m, s.scale), &expected) < 1e-5);
        }
    }
}

#[test]
fn flora_folds_the_mean_product_into_the_base_and_restarts() {
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let mut s = state(&mut rng);
    let a0: Vec<_> = s.modules.iter().map(|m| m.a.clone()).collect();
    let ups = updates(&s, true, &mut rng);
    let w = weights(&ups);
    let step = Method::Flora
        .strategy()
        .apply(&mut s, &ups, 0, &mut rng)
        .unwrap();
    assert!(step.refactorized);
    for (i, m) in s.modules.iter().enumerate() {
        let mut exact = Array2::<f32>::zeros((m.d_out(), m.d_in()));
        for (u, &wk) in ups.iter().zip(&w) {
            exact.scaled_add(wk as f32, &u.b[i].dot(&u.a.as_ref().unwrap()[i]));
        }
        let delta = m.base_delta.as_ref().expect("FLoRA merges into the base");
        assert!(rel_err(delta, &(exact * s.scale)) < 1e-5);
        assert!(m.b.iter().all(|&x| x == 0.0));
        assert_ne!(m.a, a0[i], "A must be re-drawn");
        let bound = 1.0 / (m.d_in() as f32).sqrt();
        assert!(m.a.iter().all(|x| x.abs() <= bound));
    }
}

#[test]
fn bad_updates_are_typed_errors() {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let mut s = state(&mut rng);
    let mut ups = updates(&s, false, &mut rng);
    ups[1].b[2] = Array2::zeros((9, RANK + 1));
    let err = Method::Ffa
        .strategy()
        .apply(&mut s, &ups, 0, &mut rng)
        .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("m2"), "{err}");

    let ups = updates(&s, false, &mut rng);
    let err = Method::Fedavg
        .strategy()
        .apply(&mut s, &ups, 0, &mut rng)
        .unwrap_err();
    assert!(matches!(err, Error::MissingUpload { .. }), "{err}");

    let mut ups = updates(&s, false, &mut rng);
    ups[0].b[0][[0, 0]] = f32::NAN;
    let err = Method::Fedsvd {
        svd_period: 1,
        svd_warmup: 0,
        solver: SvdSolver::Factored,
    }
    .strategy()
    .apply(&mut s, &ups, 0, &mut rng)
    .unwrap_err();
    assert!(matches!(err, Error::NonFinite { .. }), "{err}");

    assert!(Method::from_name("fedprox").is_err());
    assert!(
        Method::Fedsvd {
            svd_period: 0,
            svd_warmup: 0,
            solver: SvdSolver::Factored
        }
        .validate()
        .is_err()
    );
}

#[test]
fn upload_sizes_follow_what_each_method_shares() {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let s = state(&mut rng);
    let b: usize = SHAPES.iter().map(|&(d_out, _)| d_out * RANK).sum();
    let a: usize = SHAPES.iter().map(|&(_, d_in)| d_in * RANK).sum();
    assert_eq!(Method::fedsvd().strategy().upload_parameters(&s), b);
    assert_eq!(Method::Ffa.strategy().upload_parameters(&s), b);
    assert_eq!(Method::Fedavg.strategy().upload_parameters(&s), a + b);
    assert_eq!(Method::Flora.strategy().upload_parameters(&s), a + b);
    assert_eq!(Method::Fedex.strategy().upload_parameters(&s), a + b);
}
