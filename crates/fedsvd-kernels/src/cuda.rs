//! The CUDA backend: cudarc with the driver, cuBLAS and the kernels loaded at
//! run time, so the crate builds and runs on machines without CUDA.
//!
//! cudarc panics when libcuda is absent, so [`probe`] checks for the library
//! and the device count first and catches any panic of the driver layer;
//! nothing here panics on a machine without a GPU.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig, sys::cublasOperation_t};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg, sys,
};
use cudarc::nvrtc::Ptx;

use crate::types::{check_at_least, check_len, check_matrix};
use crate::{
    Buffer, BufferInner, Error, GradShape, Kernels, NoiseSpec, OutLayout, Result, clip_factors, ptx,
};

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceProbe {
    /// The CUDA driver library (libcuda) is not installed.
    NoDriver,
    /// The driver is installed but reports no device.
    NoDevice,
    /// The driver failed to initialise; the message says why.
    Failed(String),
    /// This many devices are usable.
    Devices(usize),
}

/// Looks for CUDA devices without ever panicking.
pub fn probe() -> DeviceProbe {
    // SAFETY: only tries to open the shared library.
    if !unsafe { sys::is_culib_present() } {
        return DeviceProbe::NoDriver;
    }
    match catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) if n > 0 => DeviceProbe::Devices(n as usize),
        Ok(Ok(_)) => DeviceProbe::NoDevice,
        Ok(Err(e)) if e.0 == sys::cudaError_enum::CUDA_ERROR_NO_DEVICE => DeviceProbe::NoDevice,
        Ok(Err(e)) => DeviceProbe::Failed(e.to_string()),
        Err(_) => DeviceProbe::Failed(
            "the CUDA driver library lacks a required entry point (older than CUDA 13.0?)".into(),
        ),
    }
}

/// How [`CudaBackend`] computes per-example gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GradAlgo {
    /// Our kernel with the squared norms fused in (one pass over the inputs).
    #[default]
    Fused,
    /// cuBLAS strided-batched SGEMM, then a norms kernel over the outputs.
    Cublas,
}

/// Device memory of a [`Buffer`].
#[derive(Debug)]
pub(crate) struct DeviceSlice(pub(crate) CudaSlice<f32>);

impl DeviceSlice {
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// Kernels of one module.
struct Functions {
    grads_n8: CudaFunction,
    grads_n16: CudaFunction,
    grads_n32: CudaFunction,
    row_partial: CudaFunction,
    reduce_partials: CudaFunction,
    clip_sum_noise: CudaFunction,
    add_noise: CudaFunction,
}

/// The CUDA backend on one device, with one stream.
pub struct CudaBackend {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: Option<CudaBlas>,
    f: Functions,
    pub(crate) lf: Box<crate::layers_cuda::LayerFunctions>,
    grad_algo: GradAlgo,
    name: String,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("name", &self.name)
            .field("grad_algo", &self.grad_algo)
            .field("cublas", &self.blas.is_some())
            .finish()
    }
}

pub(crate) fn drv(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda {
        op,
        message: e.to_string(),
    }
}

fn blas_err(op: &'static str) -> impl Fn(cudarc::cublas::result::CublasError) -> Error {
    move |e| Error::Cublas {
        op,
        message: e.to_string(),
    }
}

const GRAD_THREADS: u32 = 128;
const NORM_THREADS: u32 = 256;
const NORM_CHUNK: usize = 8192;
const NOISE_THREADS: u32 = 256;
/// Largest grid y/z dimension.
const MAX_GRID_YZ: usize = 65_535;

fn to_i32(what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Shape {
        what,
        detail: format!("{v} exceeds the CUDA backend's 32-bit limit"),
    })
}

fn to_i64(what: &'static str, v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Shape {
        what,
        detail: format!("{v} exceeds i64"),
    })
}

fn grid_limit(what: &'static str, v: usize) -> Result<u32> {
    if v <= MAX_GRID_YZ {
        Ok(v as u32)
    } else {
        Err(Error::Shape {
            what,
            detail: format!("{v} exceeds the CUDA grid limit of {MAX_GRID_YZ}"),
        })
    }
}

impl CudaBackend {
    /// Opens device `ordinal`, loads the kernels and, when libcublas is
    /// installed, cuBLAS. Returns [`Error::NoDevice`] instead of panicking
    /// when there is no usable device.
    pub fn new(ordinal: usize) -> Result<Self> {
        crate::loader::CudaEnvironment::observe().check_kernels(ordinal)?;
        let ctx = catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| Error::NoDevice("creating the CUDA context panicked".into()))?
            .map_err(drv("create context"))?;
        // One stream orders all work; per-buffer events would only add cost.
        // SAFETY: every buffer of this backend is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv("create stream"))?;
        let load = |file: &ptx::KernelFile| {
            ctx.load_module(Ptx::from_src(file.ptx))
                .map_err(|e| Error::Cuda {
                    op: "load PTX module",
                    message: format!("{}: {e}", file.name),
                })
        };
        let mut modules = Vec::new();
        for file in ptx::KERNELS {
            modules.push((file.name, load(file)?));
        }
        let func = |module: &str, name: &'static str| -> Result<CudaFunction> {
            let m = modules
                .iter()
                .find(|(n, _)| *n == module)
                .map(|(_, m)| m)
                .ok_or_else(|| Error::Cuda {
                    op: "load function",
                    message: format!("module {module} missing"),
                })?;
            m.load_function(name).map_err(|e| Error::Cuda {
                op: "load function",
                message: format!("{name}: {e}"),
            })
        };
        let f = Functions {
            grads_n8: func("grads", "per_example_grads_n8")?,
            grads_n16: func("grads", "per_example_grads_n16")?,
            grads_n32: func("grads", "per_example_grads_n32")?,
            row_partial: func("norms", "row_sq_norms_partial")?,
            reduce_partials: func("norms", "reduce_partials")?,
            clip_sum_noise: func("clip_noise", "clip_sum_noise")?,
            add_noise: func("clip_noise", "add_noise")?,
        };
        let lf = Box::new(crate::layers_cuda::LayerFunctions::load(|name| {
            func("layers", name)
        })?);
        // SAFETY: only tries to open the shared library.
        let blas = if unsafe { cudarc::cublas::sys::is_culib_present() } {
            catch_unwind(AssertUnwindSafe(|| CudaBlas::new(stream.clone())))
                .ok()
                .and_then(|r| r.ok())
        } else {
            None
        };
        let device = ctx.name().unwrap_or_else(|_| "unknown device".into());
        let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
        Ok(Self {
            ctx,
            stream,
            blas,
            f,
            lf,
            grad_algo: GradAlgo::default(),
            name: format!("cuda:{ordinal} {device} (sm_{major}{minor})"),
        })
    }

    /// Chooses how per-example gradients are computed; [`GradAlgo::Cublas`]
    /// needs libcublas.
    pub fn set_grad_algo(&mut self, algo: GradAlgo) -> Result<()> {
        if algo == GradAlgo::Cublas && self.blas.is_none() {
            return Err(Error::Cublas {
                op: "set_grad_algo",
                message: "libcublas is not installed".into(),
            });
        }
        self.grad_algo = algo;
        Ok(())
    }

    /// The current per-example gradient algorithm.
    pub fn grad_algo(&self) -> GradAlgo {
        self.grad_algo
    }

    /// Whether cuBLAS was loaded.
    pub fn has_cublas(&self) -> bool {
        self.blas.is_some()
    }

    pub(crate) fn alloc(&self, what: &'static str, len: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: every caller overwrites the whole allocation before reading it.
        unsafe { self.stream.alloc::<f32>(len.max(1)) }.map_err(drv(what))
    }

    /// Launches the fused gradient kernel. `out` starts at the layout offset.
    fn grads_fused(
        &self,
        g: &CudaSlice<f32>,
        h: &CudaSlice<f32>,
        shape: GradShape,
        layout: OutLayout,
        out: &mut CudaSlice<f32>,
        sq_norms: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "per_example_grads";
        let (func, tn, tm) = match shape.rank {
            0..=8 => (&self.f.grads_n8, 8usize, 128usize),
            9..=16 => (&self.f.grads_n16, 16, 64),
            _ => (&self.f.grads_n32, 32, 32),
        };
        let tiles_n = shape.rank.div_ceil(tn);
        let tiles_m = shape.d_out.div_ceil(tm);
        let grid = (
            u32::try_from(tiles_n).map_err(|_| Error::Shape {
                what: OP,
                detail: format!("rank {} too large", shape.rank),
            })?,
            grid_limit("per_example_grads: d_out tiles", tiles_m)?,
            grid_limit("per_example_grads: batch", shape.batch)?,
        );
        let tiles = tiles_n * tiles_m;
        let mut partial = self.alloc("alloc norm partials", shape.batch * tiles)?;
        let tokens = to_i32(OP, shape.tokens)?;
        let m = to_i32(OP, shape.d_out)?;
        let n = to_i32(OP, shape.rank)?;
        let stride = to_i64(OP, layout.row_stride)?;
        let offset = to_i64(OP, layout.offset)?;
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (GRAD_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(func);
        b.arg(g)
            .arg(h)
            .arg(&tokens)
            .arg(&m)
            .arg(&n)
            .arg(&mut *out)
            .arg(&stride)
            .arg(&offset)
            .arg(&mut partial);
        // SAFETY: argument types and counts match the kernel signature; all
        // indices stay inside the lengths checked by the caller.
        unsafe { b.launch(cfg) }.map_err(drv("launch per_example_grads"))?;
        self.reduce_partials(&partial, shape.batch, tiles, sq_norms)
    }

    fn reduce_partials(
        &self,
        partial: &CudaSlice<f32>,
        rows: usize,
        parts: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let rows_i = to_i32("reduce_partials", rows)?;
        let parts_i = to_i32("reduce_partials", parts)?;
        let cfg = LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(128), 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.f.reduce_partials);
        b.arg(partial).arg(&rows_i).arg(&parts_i).arg(out);
        // SAFETY: partial holds rows * parts values, out holds rows.
        unsafe { b.launch(cfg) }.map_err(drv("launch reduce_partials"))?;
        Ok(())
    }

    /// Squared norms of `rows` rows of `cols` elements, row `r` starting at
    /// `x[offset + r * row_stride]`.
    fn strided_sq_norms(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        row_stride: usize,
        offset: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "row_sq_norms";
        let parts = cols.div_ceil(NORM_CHUNK);
        let grid = (
            u32::try_from(parts).map_err(|_| Error::Shape {
                what: OP,
                detail: format!("{cols} columns too many"),
            })?,
            grid_limit("row_sq_norms: rows", rows)?,
            1,
        );
        let mut partial = self.alloc("alloc norm partials", rows * parts)?;
        let cols_i = to_i64(OP, cols)?;
        let stride_i = to_i64(OP, row_stride)?;
        let chunk_i = NORM_CHUNK as i64;
        let view = x.slice(offset..);
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (NORM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.f.row_partial);
        b.arg(&view)
            .arg(&cols_i)
            .arg(&stride_i)
            .arg(&chunk_i)
            .arg(&mut partial);
        // SAFETY: the caller checked offset + (rows-1)*row_stride + cols <= len.
        unsafe { b.launch(cfg) }.map_err(drv("launch row_sq_norms_partial"))?;
        self.reduce_partials(&partial, rows, parts, out)
    }

    fn grads_cublas(
        &self,
        g: &CudaSlice<f32>,
        h: &CudaSlice<f32>,
        shape: GradShape,
        layout: OutLayout,
        out: &mut CudaSlice<f32>,
        sq_norms: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "per_example_grads (cuBLAS)";
        let blas = self.blas.as_ref().ok_or(Error::Cublas {
            op: OP,
            message: "libcublas is not installed".into(),
        })?;
        // Row-major out_i (d_out x rank) is column-major rank x d_out:
        // C = H_iᵀ-as-stored (rank x T) · G_i-as-stored transposed (T x d_out).
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_T,
                m: to_i32(OP, shape.rank)?,
                n: to_i32(OP, shape.d_out)?,
                k: to_i32(OP, shape.tokens)?,
                alpha: 1.0f32,
                lda: to_i32(OP, shape.rank)?,
                ldb: to_i32(OP, shape.d_out)?,
                beta: 0.0f32,
                ldc: to_i32(OP, shape.rank)?,
            },
            batch_size: to_i32(OP, shape.batch)?,
            stride_a: to_i64(OP, shape.tokens * shape.rank)?,
            stride_b: to_i64(OP, shape.tokens * shape.d_out)?,
            stride_c: to_i64(OP, layout.row_stride)?,
        };
        {
            let mut c = out.slice_mut(layout.offset..);
            // SAFETY: the strides and leading dimensions describe exactly the
            // checked input lengths and the layout's blocks inside `out`.
            unsafe { blas.gemm_strided_batched(cfg, h, g, &mut c) }
                .map_err(blas_err("sgemm_strided_batched"))?;
        }
        self.strided_sq_norms(
            out,
            shape.batch,
            shape.block_len(),
            layout.row_stride,
            layout.offset,
            sq_norms,
        )
    }

    /// Uploads the clip factors computed on the host from `sq_norms`.
    fn factors(&self, sq_norms: &CudaSlice<f32>, clip: f32) -> Result<CudaSlice<f32>> {
        let mut host = vec![0.0f32; sq_norms.len()];
        self.stream
            .memcpy_dtoh(sq_norms, &mut host)
            .map_err(drv("download norms"))?;
        self.stream.synchronize().map_err(drv("synchronize"))?;
        let f = clip_factors(&host, clip)?;
        self.stream
            .clone_htod(&f)
            .map_err(drv("upload clip factors"))
    }

    /// Launches `clip_sum_noise`; `noise` None means a plain weighted sum.
    pub(crate) fn launch_clip_sum(
        &self,
        x: &CudaSlice<f32>,
        factors: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        noise: Option<&NoiseSpec>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        const OP: &str = "clip_sum_noise";
        let rows_i = to_i32(OP, rows)?;
        let cols_i = to_i64(OP, cols)?;
        let (std, scale, seed, offset, with) = match noise {
            Some(n) => (n.std(), n.scale, n.seed, n.offset, 1i32),
            None => (0.0f32, 1.0f32, 0u64, 0u64, 0i32),
        };
        let seed_lo = seed as u32;
        let seed_hi = (seed >> 32) as u32;
        let groups = ((offset % 4) as usize + cols).div_ceil(4);
        let cfg = noise_grid(groups);
        let mut b = self.stream.launch_builder(&self.f.clip_sum_noise);
        b.arg(x)
            .arg(factors)
            .arg(&rows_i)
            .arg(&cols_i)
            .arg(out)
            .arg(&std)
            .arg(&scale)
            .arg(&seed_lo)
            .arg(&seed_hi)
            .arg(&offset)
            .arg(&with);
        // SAFETY: x holds rows * cols, factors rows, out cols elements.
        unsafe { b.launch(cfg) }.map_err(drv("launch clip_sum_noise"))?;
        Ok(())
    }

    fn launch_add_noise(&self, x: &mut CudaSlice<f32>, noise: &NoiseSpec) -> Result<()> {
        let cols = to_i64("add_noise", x.len())?;
        let std = noise.std();
        let scale = noise.scale;
        let seed_lo = noise.seed as u32;
        let seed_hi = (noise.seed >> 32) as u32;
        let offset = noise.offset;
        let cfg = noise_grid(((offset % 4) as usize + x.len()).div_ceil(4));
        let mut b = self.stream.launch_builder(&self.f.add_noise);
        b.arg(&mut *x)
            .arg(&cols)
            .arg(&std)
            .arg(&scale)
            .arg(&seed_lo)
            .arg(&seed_hi)
            .arg(&offset);
        // SAFETY: the kernel touches x[0..cols] only.
        unsafe { b.launch(cfg) }.map_err(drv("launch add_noise"))?;
        Ok(())
    }
}

fn noise_grid(groups: usize) -> LaunchConfig {
    // Grid-stride loop inside the kernel; cap the grid at a size that fills
    // any current GPU many times over.
    let blocks = groups.div_ceil(NOISE_THREADS as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (NOISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn dev(b: &Buffer) -> Result<&CudaSlice<f32>> {
    match &b.inner {
        BufferInner::Cuda(d) => Ok(&d.0),
        BufferInner::Host(_) => Err(Error::WrongBackend {
            backend: "cuda",
            buffer: "the host",
        }),
    }
}

pub(crate) fn dev_mut(b: &mut Buffer) -> Result<&mut CudaSlice<f32>> {
    match &mut b.inner {
        BufferInner::Cuda(d) => Ok(&mut d.0),
        BufferInner::Host(_) => Err(Error::WrongBackend {
            backend: "cuda",
            buffer: "the host",
        }),
    }
}

pub(crate) fn wrap(s: CudaSlice<f32>) -> Buffer {
    Buffer {
        inner: BufferInner::Cuda(DeviceSlice(s)),
    }
}

impl Kernels for CudaBackend {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn upload(&self, data: &[f32]) -> Result<Buffer> {
        self.stream
            .clone_htod(data)
            .map(wrap)
            .map_err(drv("upload"))
    }

    fn alloc_zeros(&self, len: usize) -> Result<Buffer> {
        self.stream
            .alloc_zeros::<f32>(len)
            .map(wrap)
            .map_err(drv("alloc_zeros"))
    }

    fn download_into(&self, buf: &Buffer, out: &mut [f32]) -> Result<()> {
        let src = dev(buf)?;
        check_len("download: out", src.len(), out.len())?;
        self.stream.memcpy_dtoh(src, out).map_err(drv("download"))?;
        self.stream.synchronize().map_err(drv("synchronize"))
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(drv("synchronize"))
    }

    fn per_example_grads(
        &self,
        g: &Buffer,
        h: &Buffer,
        shape: GradShape,
        layout: OutLayout,
        out: &mut Buffer,
        sq_norms: &mut Buffer,
    ) -> Result<()> {
        const OP: &str = "per_example_grads";
        shape.validate(OP)?;
        layout.validate(&shape, OP)?;
        let (g, h) = (dev(g)?, dev(h)?);
        let out = dev_mut(out)?;
        let sq = dev_mut(sq_norms)?;
        check_len("per_example_grads: g", shape.g_len(), g.len())?;
        check_len("per_example_grads: h", shape.h_len(), h.len())?;
        check_at_least(
            "per_example_grads: out",
            layout.required_len(&shape),
            out.len(),
        )?;
        check_len("per_example_grads: sq_norms", shape.batch, sq.len())?;
        match self.grad_algo {
            GradAlgo::Fused => self.grads_fused(g, h, shape, layout, out, sq),
            GradAlgo::Cublas => self.grads_cublas(g, h, shape, layout, out, sq),
        }
    }

    fn row_sq_norms(&self, x: &Buffer, rows: usize, cols: usize, out: &mut Buffer) -> Result<()> {
        let n = check_matrix("row_sq_norms", rows, cols)?;
        let x = dev(x)?;
        let out = dev_mut(out)?;
        check_len("row_sq_norms: x", n, x.len())?;
        check_len("row_sq_norms: out", rows, out.len())?;
        self.strided_sq_norms(x, rows, cols, cols, 0, out)
    }

    fn clip_scale_sum(
        &self,
        x: &Buffer,
        rows: usize,
        cols: usize,
        sq_norms: &Buffer,
        clip: f32,
        out: &mut Buffer,
    ) -> Result<()> {
        let n = check_matrix("clip_scale_sum", rows, cols)?;
        let (x, sq) = (dev(x)?, dev(sq_norms)?);
        let out = dev_mut(out)?;
        check_len("clip_scale_sum: x", n, x.len())?;
        check_len("clip_scale_sum: sq_norms", rows, sq.len())?;
        check_len("clip_scale_sum: out", cols, out.len())?;
        let factors = self.factors(sq, clip)?;
        self.launch_clip_sum(x, &factors, rows, cols, None, out)
    }

    fn add_noise(&self, x: &mut Buffer, noise: &NoiseSpec) -> Result<()> {
        noise.validate()?;
        let x = dev_mut(x)?;
        if x.is_empty() {
            return Ok(());
        }
        self.launch_add_noise(x, noise)
    }

    fn clip_and_noise(
        &self,
        x: &Buffer,
        rows: usize,
        cols: usize,
        sq_norms: &Buffer,
        noise: &NoiseSpec,
        out: &mut Buffer,
    ) -> Result<()> {
        noise.validate()?;
        let n = check_matrix("clip_and_noise", rows, cols)?;
        let (x, sq) = (dev(x)?, dev(sq_norms)?);
        let out = dev_mut(out)?;
        check_len("clip_and_noise: x", n, x.len())?;
        check_len("clip_and_noise: sq_norms", rows, sq.len())?;
        check_len("clip_and_noise: out", cols, out.len())?;
        let factors = self.factors(sq, noise.clip)?;
        self.launch_clip_sum(x, &factors, rows, cols, Some(noise), out)
    }
}
