//! Instruction-count benchmarks of the hot paths (gungraun under callgrind).
//! Run through `cargo xtask bench-gate`, which installs the matching
//! gungraun-runner and compares the counts with `baseline.json`.
//!
//! Each `#[bench::NAME]` line is one workload of
//! `fedsvd_bench_gate::WORKLOADS`; the setup (building inputs, not measured)
//! also makes the thread single-threaded, see `fedsvd_bench_gate::prepare`.

use std::hint::black_box;

use fedsvd_bench_gate::{DeterministicAlloc, Prepared, prepare_or_exit};
use gungraun::{
    Callgrind, EventKind, LibraryBenchmarkConfig, library_benchmark, library_benchmark_group, main,
};

// glibc's malloc made the counts depend on the heap's history and the
// blocks' alignment (see `fedsvd_bench_gate::DeterministicAlloc`).
#[global_allocator]
static ALLOCATOR: DeterministicAlloc = DeterministicAlloc::new();

#[library_benchmark]
#[bench::dp_prv_epsilon(args = ("dp_prv_epsilon"), setup = prepare_or_exit)]
#[bench::dp_rdp_epsilon(args = ("dp_rdp_epsilon"), setup = prepare_or_exit)]
#[bench::dp_prv_calibrate(args = ("dp_prv_calibrate"), setup = prepare_or_exit)]
#[bench::dp_rdp_calibrate(args = ("dp_rdp_calibrate"), setup = prepare_or_exit)]
#[bench::linalg_refactorize_minilm(args = ("linalg_refactorize_minilm"), setup = prepare_or_exit)]
#[bench::linalg_randomized_minilm(args = ("linalg_randomized_minilm"), setup = prepare_or_exit)]
#[bench::kernels_per_example_grads(args = ("kernels_per_example_grads"), setup = prepare_or_exit)]
#[bench::kernels_clip_and_noise(args = ("kernels_clip_and_noise"), setup = prepare_or_exit)]
#[bench::model_tiny_forward(args = ("model_tiny_forward"), setup = prepare_or_exit)]
#[bench::model_tiny_gradients(args = ("model_tiny_gradients"), setup = prepare_or_exit)]
#[bench::model_tiny_dp_step(args = ("model_tiny_dp_step"), setup = prepare_or_exit)]
#[bench::model_minilm_layer_dp_step(args = ("model_minilm_layer_dp_step"), setup = prepare_or_exit)]
fn hot_path(mut job: Prepared) -> f64 {
    match job.run() {
        Ok(v) => black_box(v),
        Err(e) => {
            eprintln!("fedsvd-bench-gate: `{}` failed: {e}", job.name());
            std::process::exit(2)
        }
    }
}

library_benchmark_group!(name = hot_paths, benchmarks = hot_path);

main!(
    config = LibraryBenchmarkConfig::default()
        // Read once by matrixmultiply: keep its GEMMs on the measured thread.
        .env("MATMUL_NUM_THREADS", "1")
        // Only instruction counts are gated; the cache simulation would slow
        // callgrind down for figures nobody reads.
        .tool(Callgrind::with_args(["--cache-sim=no"]).format([EventKind::Ir])),
    library_benchmark_groups = hot_paths
);
