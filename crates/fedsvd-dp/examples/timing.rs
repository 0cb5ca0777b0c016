use fedsvd_dp::*;
use std::time::Instant;
fn main() {
    for &(s, q, t) in &[
        (1.0, 0.01, 1000u64),
        (0.643, 0.01, 1000),
        (20.0, 0.01, 1000),
    ] {
        let h = [HistoryEntry::new(s, q, t).unwrap()];
        let acc = PrvAccountant::default();
        let t0 = Instant::now();
        let c = acc.compose(&h, 1e-8).unwrap();
        let t1 = t0.elapsed();
        let e = c.epsilon(1e-5).unwrap();
        println!(
            "sigma {s}: n = {}, compose {:?}, eps {:?}",
            c.grid_points(),
            t1,
            e
        );
    }
}
