//! The speed goals: PRV ε for σ = 1, q = 0.01, 1000 steps, and
//! calibration to ε = 6 for q = 0.01, 1000 steps (δ = 1e-5), for both
//! accountants. Opacus's times for the same are in
//! `tests/data/opacus-accountant-dev.json` (`python_seconds`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use fedsvd_dp::{
    Accountant, AccountantKind, GaussianNoise, HistoryEntry, PrvAccountant, RdpAccountant,
    calibrate_noise,
};
use rand::SeedableRng;

fn accounting(c: &mut Criterion) {
    let history = [HistoryEntry::new(1.0, 0.01, 1000).unwrap()];
    let prv = PrvAccountant::default();
    c.bench_function("prv_epsilon sigma=1 q=0.01 T=1000 delta=1e-5", |b| {
        b.iter(|| prv.epsilon(black_box(&history), 1e-5).unwrap())
    });
    let rdp = RdpAccountant::default();
    c.bench_function("rdp_epsilon sigma=1 q=0.01 T=1000 delta=1e-5", |b| {
        b.iter(|| rdp.epsilon(black_box(&history), 1e-5).unwrap())
    });
    for kind in [AccountantKind::Prv, AccountantKind::Rdp] {
        let acc = Accountant::new(kind);
        c.bench_function(
            &format!("calibrate_{kind} eps=6 q=0.01 T=1000 delta=1e-5"),
            |b| b.iter(|| calibrate_noise(&acc, black_box(6.0), 0.01, 1000, 1e-5, 0.01).unwrap()),
        );
    }
}

/// The noise of one DP-SGD step on MiniLM's trainable B (r = 8 on query and
/// value: 36,864 values), drawn from ChaCha20 as training does.
fn noise(c: &mut Criterion) {
    let d = 36_864;
    let mechanism = GaussianNoise::new(2.0, 1.0, d).unwrap();
    let sum: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut out = vec![0.0f64; d];
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    c.bench_function("privatize d=36864 (MiniLM B, r=8 on q/v)", |b| {
        b.iter(|| {
            mechanism
                .privatize(black_box(&sum), &mut rng, &mut out)
                .unwrap()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = accounting, noise
}
criterion_main!(benches);
