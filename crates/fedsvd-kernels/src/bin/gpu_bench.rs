//! `fedsvd-kernels-bench`: achieved bandwidth and FLOP/s of each CUDA kernel
//! next to a device-to-device copy and a cuBLAS SGEMM measured in the same
//! run. Without a device it says so and exits 0, or 1 when
//! `FEDSVD_REQUIRE_GPU=1`. `--quick` shrinks the problems and iterations.

use std::process::ExitCode;

use fedsvd_kernels::bench::{BenchConfig, BenchRow, run_cuda};
use fedsvd_kernels::{CudaBackend, DeviceProbe, Kernels, probe};

fn main() -> ExitCode {
    let required = std::env::var("FEDSVD_REQUIRE_GPU").as_deref() == Ok("1");
    let quick = std::env::args().any(|a| a == "--quick");
    match probe() {
        DeviceProbe::Devices(_) => {}
        other => {
            eprintln!("SKIP fedsvd-kernels-bench: no CUDA device ({other:?})");
            return if required {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    }
    let mut be = match CudaBackend::new(0) {
        Ok(be) => be,
        Err(e) => {
            eprintln!("fedsvd-kernels-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut cfg = BenchConfig::default();
    if quick {
        cfg.iters = 5;
        cfg.clip_cols = 1 << 18;
        cfg.grad_shapes.truncate(2);
    }
    println!("device: {}", be.name());
    println!("cuBLAS: {}", if be.has_cublas() { "yes" } else { "no" });
    let rows = match run_cuda(&mut be, &cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fedsvd-kernels-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    print_table(&rows);
    ExitCode::SUCCESS
}

fn print_table(rows: &[BenchRow]) {
    println!();
    println!("| kernel | shape | time (µs) | GB/s | TFLOP/s | vs reference |");
    println!("|---|---|---:|---:|---:|---:|");
    let copy = rows
        .iter()
        .find(|r| r.kernel.starts_with("memcpy"))
        .map(BenchRow::gb_per_s);
    let mut gemm = None;
    // Each gradient block is followed by its square SGEMM; look ahead.
    for (i, r) in rows.iter().enumerate() {
        if r.kernel.starts_with("per_example_grads") {
            gemm = rows[i..]
                .iter()
                .find(|x| x.kernel.starts_with("cuBLAS SGEMM"))
                .map(BenchRow::tflops);
        }
        let vs = if r.kernel.starts_with("per_example_grads") {
            gemm.map(|t| format!("{:.0} % of SGEMM FLOP/s", 100.0 * r.tflops() / t))
        } else if r.kernel.starts_with("memcpy") || r.kernel.starts_with("cuBLAS") {
            Some("reference".into())
        } else {
            copy.map(|c| format!("{:.0} % of copy GB/s", 100.0 * r.gb_per_s() / c))
        };
        println!(
            "| {} | {} | {:.1} | {:.0} | {:.2} | {} |",
            r.kernel,
            r.shape,
            r.micros,
            r.gb_per_s(),
            r.tflops(),
            vs.unwrap_or_else(|| "-".into())
        );
    }
}
