//! Device benchmarks behind the `fedsvd-kernels-bench` binary: each kernel's
//! achieved memory bandwidth and FLOP/s, next to a device-to-device copy and a
//! cuBLAS SGEMM measured in the same run on the same device, so the ratios
//! need no outside reference figures.

use cudarc::cublas::{Gemm, GemmConfig, sys::cublasOperation_t};
use cudarc::driver::sys;

use crate::cuda::{dev, dev_mut, drv};
use crate::{CudaBackend, Error, GradAlgo, GradShape, Kernels, NoiseSpec, OutLayout, Result};

/// One measured operation.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// What ran.
    pub kernel: String,
    /// The problem size in words.
    pub shape: String,
    /// Mean time per call in microseconds (CUDA events).
    pub micros: f64,
    /// Bytes that must cross DRAM at least once per call.
    pub bytes: f64,
    /// Floating-point operations per call (0 for pure data movement).
    pub flops: f64,
}

impl BenchRow {
    /// Achieved bandwidth in GB/s (10⁹ bytes per second).
    pub fn gb_per_s(&self) -> f64 {
        self.bytes / self.micros / 1e3
    }

    /// Achieved TFLOP/s.
    pub fn tflops(&self) -> f64 {
        self.flops / self.micros / 1e6
    }
}

/// Problem sizes of a benchmark run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Timed calls per measurement (after two warm-up calls).
    pub iters: usize,
    /// Examples in the clip-and-noise problem.
    pub clip_rows: usize,
    /// Parameters per example in the clip-and-noise problem.
    pub clip_cols: usize,
    /// Per-example gradient problems.
    pub grad_shapes: Vec<GradShape>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        let s = |batch, tokens, d_out, rank| GradShape {
            batch,
            tokens,
            d_out,
            rank,
        };
        Self {
            iters: 20,
            clip_rows: 64,
            clip_cols: 1 << 22,
            // MiniLM-sized LoRA factors (d = 384, FFN 1536) and a larger model.
            grad_shapes: vec![
                s(64, 128, 384, 8),
                s(64, 128, 384, 16),
                s(64, 128, 1536, 8),
                s(32, 512, 1024, 16),
                s(32, 512, 4096, 32),
            ],
        }
    }
}

fn time<F: FnMut() -> Result<()>>(be: &CudaBackend, iters: usize, mut f: F) -> Result<f64> {
    f()?;
    f()?;
    be.stream.synchronize().map_err(drv("synchronize"))?;
    let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = be.ctx.new_event(flags).map_err(drv("create event"))?;
    let end = be.ctx.new_event(flags).map_err(drv("create event"))?;
    start.record(&be.stream).map_err(drv("record event"))?;
    for _ in 0..iters {
        f()?;
    }
    end.record(&be.stream).map_err(drv("record event"))?;
    let ms = start.elapsed_ms(&end).map_err(drv("elapsed time"))?;
    Ok(f64::from(ms) * 1e3 / iters.max(1) as f64)
}

/// Deterministic pseudo-random fill (values in [-1, 1)).
fn fill(len: usize, salt: u64) -> Vec<f32> {
    let mut v = vec![0.0f32; len];
    crate::philox::fill_gaussian(salt, 0, &mut v);
    v.iter_mut().for_each(|x| *x = (*x * 0.3).clamp(-1.0, 1.0));
    v
}

/// Runs every measurement on `be` and returns the rows in print order.
pub fn run_cuda(be: &mut CudaBackend, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let iters = cfg.iters.max(1);
    let (r, c) = (cfg.clip_rows, cfg.clip_cols);
    let n = r * c;
    let shape_rc = format!("{r} x {c}");

    // Reference: device-to-device copy of the clip input.
    let x = be.upload(&fill(n, 1))?;
    let mut copy = be.alloc_zeros(n)?;
    let us = time(be, iters, || {
        let (src, dst) = (dev(&x)?, dev_mut(&mut copy)?);
        be.stream.memcpy_dtod(src, dst).map_err(drv("memcpy_dtod"))
    })?;
    rows.push(BenchRow {
        kernel: "memcpy device-to-device (reference)".into(),
        shape: format!("{n} floats"),
        micros: us,
        bytes: 2.0 * 4.0 * n as f64,
        flops: 0.0,
    });
    drop(copy);

    let mut sq = be.alloc_zeros(r)?;
    let us = time(be, iters, || be.row_sq_norms(&x, r, c, &mut sq))?;
    rows.push(BenchRow {
        kernel: "row_sq_norms".into(),
        shape: shape_rc.clone(),
        micros: us,
        bytes: 4.0 * (n + r) as f64,
        flops: 2.0 * n as f64,
    });

    let noise = NoiseSpec {
        sigma: 1.0,
        clip: 1.0,
        scale: 1.0 / r as f32,
        seed: 42,
        offset: 0,
    };
    let sq_host = be.download(&sq)?;
    let factors_host = crate::clip_factors(&sq_host, noise.clip)?;
    let factors = be.upload(&factors_host)?;
    let mut out = be.alloc_zeros(c)?;
    let clip_bytes = 4.0 * (n + c + r) as f64;
    let us = time(be, iters, || {
        let (xd, fd, od) = (dev(&x)?, dev(&factors)?, dev_mut(&mut out)?);
        be.launch_clip_sum(xd, fd, r, c, Some(&noise), od)
    })?;
    rows.push(BenchRow {
        kernel: "clip_and_noise kernel (clip, sum, Philox noise, scale)".into(),
        shape: shape_rc.clone(),
        micros: us,
        bytes: clip_bytes,
        flops: 2.0 * n as f64,
    });
    let us = time(be, iters, || {
        let (xd, fd, od) = (dev(&x)?, dev(&factors)?, dev_mut(&mut out)?);
        be.launch_clip_sum(xd, fd, r, c, None, od)
    })?;
    rows.push(BenchRow {
        kernel: "clip_scale_sum kernel (no noise)".into(),
        shape: shape_rc.clone(),
        micros: us,
        bytes: clip_bytes,
        flops: 2.0 * n as f64,
    });
    let us = time(be, iters, || {
        be.clip_and_noise(&x, r, c, &sq, &noise, &mut out)
    })?;
    rows.push(BenchRow {
        kernel: "clip_and_noise call (with norm download, factor upload)".into(),
        shape: shape_rc.clone(),
        micros: us,
        bytes: clip_bytes,
        flops: 2.0 * n as f64,
    });
    let us = time(be, iters, || be.add_noise(&mut out, &noise))?;
    rows.push(BenchRow {
        kernel: "add_noise".into(),
        shape: format!("{c} floats"),
        micros: us,
        bytes: 8.0 * c as f64,
        flops: 0.0,
    });
    drop((x, out, sq, factors));

    for shape in &cfg.grad_shapes {
        let g = be.upload(&fill(shape.g_len(), 2))?;
        let h = be.upload(&fill(shape.h_len(), 3))?;
        let mut out = be.alloc_zeros(shape.batch * shape.block_len())?;
        let mut sq = be.alloc_zeros(shape.batch)?;
        let layout = OutLayout::packed(shape);
        let desc = format!(
            "B={} T={} d_out={} r={}",
            shape.batch, shape.tokens, shape.d_out, shape.rank
        );
        let bytes = 4.0 * (shape.g_len() + shape.h_len() + shape.batch * shape.block_len()) as f64;
        let mut algos = vec![GradAlgo::Fused];
        if be.has_cublas() {
            algos.push(GradAlgo::Cublas);
        }
        for algo in algos {
            be.set_grad_algo(algo)?;
            let us = time(be, iters, || {
                be.per_example_grads(&g, &h, *shape, layout, &mut out, &mut sq)
            })?;
            rows.push(BenchRow {
                kernel: format!("per_example_grads {algo:?} (+ norms)"),
                shape: desc.clone(),
                micros: us,
                bytes,
                flops: shape.flops(),
            });
        }
        be.set_grad_algo(GradAlgo::Fused)?;
        if be.has_cublas() {
            // A square SGEMM with (about) the same FLOPs: what the device's
            // GEMM reaches on this much work.
            let side = ((shape.flops() / 2.0).cbrt() / 32.0).round().max(1.0) as usize * 32;
            rows.push(square_sgemm(be, side, iters)?);
        }
    }
    Ok(rows)
}

fn square_sgemm(be: &CudaBackend, side: usize, iters: usize) -> Result<BenchRow> {
    let blas = be.blas.as_ref().ok_or(Error::Cublas {
        op: "sgemm",
        message: "libcublas is not installed".into(),
    })?;
    let a = be.upload(&fill(side * side, 4))?;
    let b = be.upload(&fill(side * side, 5))?;
    let mut c = be.alloc_zeros(side * side)?;
    let s = side as i32;
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: s,
        n: s,
        k: s,
        alpha: 1.0f32,
        lda: s,
        ldb: s,
        beta: 0.0f32,
        ldc: s,
    };
    let us = time(be, iters, || {
        let (ad, bd, cd) = (dev(&a)?, dev(&b)?, dev_mut(&mut c)?);
        // SAFETY: all three matrices are side x side.
        unsafe { blas.gemm(cfg, ad, bd, cd) }.map_err(|e| Error::Cublas {
            op: "sgemm",
            message: e.to_string(),
        })
    })?;
    Ok(BenchRow {
        kernel: "cuBLAS SGEMM square, same FLOPs (reference)".into(),
        shape: format!("{side} x {side} x {side}"),
        micros: us,
        bytes: 4.0 * 3.0 * (side * side) as f64,
        flops: 2.0 * (side as f64).powi(3),
    })
}
