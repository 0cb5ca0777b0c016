//! The speed goals: PRV ε for σ = 1, q = 0.01, 1000 steps, and
//! calibration to ε = 6 for q = 0.01, 1000 steps (δ = 1e-5), for both
//! accountants. Opacus's times for the same are in
//! `../shared/reference/opacus-accountant-dev.json` (`python_seconds`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use fedsvd_dp::{
    Accountant, AccountantKind, HistoryEntry, PrvAccountant, RdpAccountant, calibrate_noise,
};

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

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = accounting
}
criterion_main!(benches);
