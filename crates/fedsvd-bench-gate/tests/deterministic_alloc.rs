//! Every workload under the gate's allocator (as `benches/gate.rs` installs
//! it): the same results as with the system allocator, within a memory
//! budget a CI machine has.

use fedsvd_bench_gate::{DeterministicAlloc, WORKLOADS, prepare};

#[global_allocator]
static ALLOCATOR: DeterministicAlloc = DeterministicAlloc::new();

/// What one gate process does (prepare, which runs the job once, then the
/// measured run), for every workload in one process: the reservation is an
/// upper bound of any single gate process's.
#[test]
fn every_workload_runs_twice_within_four_gib() {
    for w in WORKLOADS {
        // Jobs that train change their state, so each run is compared with
        // the same run of freshly prepared inputs.
        let first = prepare(w.name).unwrap().run().unwrap();
        let second = prepare(w.name).unwrap().run().unwrap();
        assert!(first.is_finite(), "{}: {first}", w.name);
        assert_eq!(
            first.to_bits(),
            second.to_bits(),
            "{} is not reproducible",
            w.name
        );
    }
    let reserved = ALLOCATOR.reserved_bytes();
    eprintln!("reserved {} MiB", reserved >> 20);
    assert!(reserved < 4 << 30, "reserved {reserved} bytes");
}
