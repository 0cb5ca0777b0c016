//! Properties any correct accountant has: monotonicity in σ, q and steps,
//! δ(ε(δ)) = δ, and composition that does not depend on how a history is
//! split or ordered.

use fedsvd_dp::{HistoryEntry, PrvAccountant, RdpAccountant};
use proptest::prelude::*;

fn entry(sigma: f64, q: f64, steps: u64) -> HistoryEntry {
    HistoryEntry::new(sigma, q, steps).unwrap()
}

fn rdp_eps(sigma: f64, q: f64, steps: u64, delta: f64) -> f64 {
    RdpAccountant::default()
        .epsilon(&[entry(sigma, q, steps)], delta)
        .unwrap()
        .epsilon
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn rdp_epsilon_monotone(
        sigma in 0.5f64..5.0,
        q in 0.001f64..0.5,
        steps in 1u64..5000,
        grow in 1.05f64..2.0,
    ) {
        let base = rdp_eps(sigma, q, steps, 1e-5);
        prop_assert!(base.is_finite() && base > 0.0);
        prop_assert!(rdp_eps(sigma * grow, q, steps, 1e-5) < base);
        prop_assert!(rdp_eps(sigma, (q * grow).min(1.0), steps, 1e-5) > base);
        prop_assert!(rdp_eps(sigma, q, steps + 1 + steps / 2, 1e-5) > base);
        prop_assert!(rdp_eps(sigma, q, steps, 1e-6) > base);
    }

    #[test]
    fn rdp_delta_inverts_epsilon(
        sigma in 0.5f64..5.0,
        q in 0.001f64..0.5,
        steps in 1u64..5000,
        log_delta in -12f64..-3.0,
    ) {
        let acc = RdpAccountant::default();
        let h = [entry(sigma, q, steps)];
        let delta = 10f64.powf(log_delta);
        let e = acc.epsilon(&h, delta).unwrap();
        let d = acc.delta(&h, e.epsilon.max(0.0)).unwrap();
        if e.epsilon >= 0.0 {
            prop_assert!((d.delta - delta).abs() <= 1e-9 * delta, "{} vs {}", d.delta, delta);
        }
    }

    #[test]
    fn rdp_composition_is_additive(
        parts in proptest::collection::vec((0.5f64..5.0, 0.001f64..0.5, 1u64..2000), 1..5),
        split in 1u64..1000,
    ) {
        let acc = RdpAccountant::default();
        let history: Vec<HistoryEntry> = parts.iter().map(|&(s, q, t)| entry(s, q, t)).collect();
        let curve = acc.curve(&history).unwrap();
        let mut sum = vec![0.0; curve.len()];
        for e in &history {
            for (s, c) in sum.iter_mut().zip(acc.curve(&[*e]).unwrap()) {
                *s += c;
            }
        }
        for (a, b) in curve.iter().zip(&sum) {
            prop_assert!((a - b).abs() <= 1e-12 * a.abs());
        }
        // Splitting one entry into two changes nothing.
        let (s, q, t) = parts[0];
        let t = t + split;
        let whole = acc.epsilon(&[entry(s, q, t)], 1e-5).unwrap().epsilon;
        let halves = acc.epsilon(&[entry(s, q, split), entry(s, q, t - split)], 1e-5).unwrap().epsilon;
        prop_assert!((whole - halves).abs() <= 1e-12 * whole);
    }

    #[test]
    fn no_nan_escapes(
        sigma in 1e-3f64..1e3,
        q in 0f64..=1.0,
        steps in 1u64..100_000,
        log_delta in -15f64..-0.01,
    ) {
        let delta = 10f64.powf(log_delta);
        let e = rdp_eps(sigma, q, steps, delta);
        prop_assert!(!e.is_nan());
    }
}

#[test]
fn prv_epsilon_monotone_on_a_grid() {
    let acc = PrvAccountant::default();
    let eps = |s: f64, q: f64, t: u64| acc.epsilon(&[entry(s, q, t)], 1e-5).unwrap().upper;
    for &(sigma, q, steps) in &[(0.8, 0.01, 500u64), (1.5, 0.05, 200), (3.0, 0.2, 50)] {
        let base = eps(sigma, q, steps);
        assert!(eps(sigma * 1.1, q, steps) < base, "sigma {sigma}");
        assert!(eps(sigma, q * 1.2, steps) > base, "q {q}");
        assert!(eps(sigma, q, steps * 2) > base, "steps {steps}");
        // PRV is tighter than RDP.
        assert!(base < rdp_eps(sigma, q, steps, 1e-5));
    }
}

#[test]
fn prv_delta_inverts_epsilon() {
    let acc = PrvAccountant::new().with_delta_error(1e-8).unwrap();
    for &(sigma, q, steps) in &[(1.0, 0.01, 1000u64), (0.7, 0.1, 30), (4.0, 0.25, 300)] {
        let composed = acc.compose(&[entry(sigma, q, steps)], 1e-8).unwrap();
        for delta in [1e-6, 1e-5, 1e-3] {
            let e = composed.epsilon(delta).unwrap();
            let back = composed.delta_estimate(e.estimate);
            assert!(
                (back - delta).abs() <= 1e-9 * delta,
                "{sigma} {q} {steps}: {back} vs {delta}"
            );
            // And the bounds bracket the estimate.
            assert!(e.lower <= e.estimate && e.estimate < e.upper);
            let d = composed.delta(e.estimate).unwrap();
            assert!(d.lower <= d.estimate && d.estimate <= d.upper);
        }
    }
}

#[test]
fn prv_composition_is_independent_of_splitting_and_order() {
    let acc = PrvAccountant::default();
    let whole = acc.epsilon(&[entry(1.1, 0.02, 900)], 1e-5).unwrap();
    let split = acc
        .epsilon(
            &[
                entry(1.1, 0.02, 200),
                entry(1.1, 0.02, 300),
                entry(1.1, 0.02, 400),
            ],
            1e-5,
        )
        .unwrap();
    assert!(
        (whole.upper - split.upper).abs() < 1e-9,
        "{whole:?} vs {split:?}"
    );

    let a = [
        entry(0.9, 0.01, 300),
        entry(2.0, 0.1, 100),
        entry(1.3, 0.05, 50),
    ];
    let b = [a[2], a[0], a[1]];
    let ea = acc.epsilon(&a, 1e-5).unwrap().upper;
    let eb = acc.epsilon(&b, 1e-5).unwrap().upper;
    assert!((ea - eb).abs() < 1e-9, "{ea} vs {eb}");
    // A heterogeneous history spends more than each of its parts.
    for part in &a {
        assert!(acc.epsilon(&[*part], 1e-5).unwrap().upper < ea);
    }
    // ... and no more than RDP says.
    let rdp = RdpAccountant::default().epsilon(&a, 1e-5).unwrap().epsilon;
    assert!(ea < rdp, "{ea} vs {rdp}");
}

/// ε of a history is a function of the history alone: not of the queries a
/// thread answered before (a resumed run must report the same ε as an
/// uninterrupted one, bit for bit).
#[test]
fn prv_epsilon_does_not_depend_on_earlier_queries() {
    let target = HistoryEntry::new(2.947860585644807, 0.7619047619047619, 14).unwrap();
    let fresh = std::thread::spawn(move || {
        PrvAccountant::default()
            .epsilon(&[target], 1e-5)
            .unwrap()
            .upper
    })
    .join()
    .unwrap();
    let after_others = std::thread::spawn(move || {
        let acc = PrvAccountant::default();
        for steps in 1..14 {
            let e = HistoryEntry::new(2.947860585644807, 0.7619047619047619, steps).unwrap();
            acc.epsilon(&[e], 1e-5).unwrap();
        }
        let other = HistoryEntry::new(0.8387856445323416, 0.1111111111111111, 12).unwrap();
        acc.epsilon(&[other], 1e-5).unwrap();
        acc.epsilon(&[target], 1e-5).unwrap().upper
    })
    .join()
    .unwrap();
    assert_eq!(
        fresh.to_bits(),
        after_others.to_bits(),
        "{fresh} vs {after_others}"
    );
}
