#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
//! Job: per-example gradients of LoRA factors (a batched matmul), their
//! norms, clip-scale-and-sum and Gaussian noise, and the transformer layer
//! operations of a training step ([`LayerKernels`]), on a CPU reference
//! backend and a CUDA backend loaded at run time.
//!
//! Boundary: the only fedsvd crate that names cudarc; its public API takes and
//! returns plain slices, ndarray views and opaque device buffers. No other
//! fedsvd crate.

pub mod bench;
pub mod cpu;
pub mod cuda;
pub mod elementwise;
mod error;
pub mod layers;
pub mod layers_cpu;
mod layers_cuda;
pub mod loader;
pub mod philox;
pub mod ptx;
mod types;

pub use cpu::CpuBackend;
pub use cuda::{CudaBackend, DeviceProbe, GradAlgo, probe};
pub use elementwise::Elementwise;
pub use error::{Error, Result};
pub use layers::{
    AttnShape, BatchStrides, DropoutSpec, Embeddings, GemmSpec, LayerKernels, Precision,
};
pub use loader::{CudaEnvironment, REQUIRED_DRIVER_VERSION};
pub use types::{GradShape, NoiseSpec, OutLayout, clip_factors};

/// An opaque buffer of f32 owned by one backend: host memory for
/// [`CpuBackend`], device memory for [`CudaBackend`]. Make it with
/// [`Kernels::upload`] or [`Kernels::alloc_zeros`] and read it back with
/// [`Kernels::download`].
#[derive(Debug)]
pub struct Buffer {
    pub(crate) inner: BufferInner,
}

#[derive(Debug)]
pub(crate) enum BufferInner {
    Host(Vec<f32>),
    Cuda(cuda::DeviceSlice),
}

impl Buffer {
    pub(crate) fn from_host(v: Vec<f32>) -> Self {
        Self {
            inner: BufferInner::Host(v),
        }
    }

    /// Number of f32 elements.
    pub fn len(&self) -> usize {
        match &self.inner {
            BufferInner::Host(v) => v.len(),
            BufferInner::Cuda(d) => d.len(),
        }
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the buffer lives: `"host"` or `"cuda"`.
    pub fn location(&self) -> &'static str {
        match &self.inner {
            BufferInner::Host(_) => "host",
            BufferInner::Cuda(_) => "cuda",
        }
    }

    /// The elements, when the buffer is in host memory (no copy).
    pub fn as_host(&self) -> Option<&[f32]> {
        match &self.inner {
            BufferInner::Host(v) => Some(v),
            BufferInner::Cuda(_) => None,
        }
    }

    /// The elements, mutably, when the buffer is in host memory.
    pub fn as_host_mut(&mut self) -> Option<&mut [f32]> {
        match &mut self.inner {
            BufferInner::Host(v) => Some(v),
            BufferInner::Cuda(_) => None,
        }
    }
}

/// The operations of a DP-SGD step that each backend implements. All
/// matrices are row-major f32. Output buffers are fully overwritten (except
/// outside the blocks of an [`OutLayout`]); shapes are checked and a wrong
/// length is an [`Error::Length`].
pub trait Kernels: Send + Sync {
    /// Human-readable backend and device name.
    fn name(&self) -> String;
    /// Copies host data into a new buffer of this backend.
    fn upload(&self, data: &[f32]) -> Result<Buffer>;
    /// A new zero-filled buffer of `len` elements.
    fn alloc_zeros(&self, len: usize) -> Result<Buffer>;
    /// Copies a buffer into `out` (same length), waiting for pending work.
    fn download_into(&self, buf: &Buffer, out: &mut [f32]) -> Result<()>;
    /// Copies a buffer into a new vector, waiting for pending work.
    fn download(&self, buf: &Buffer) -> Result<Vec<f32>> {
        let mut out = vec![0.0; buf.len()];
        self.download_into(buf, &mut out)?;
        Ok(out)
    }
    /// Waits until all submitted work is done.
    fn synchronize(&self) -> Result<()>;

    /// `out_i = G_iᵀ H_i` for every example, and `sq_norms[i] = ‖out_i‖²_F`.
    fn per_example_grads(
        &self,
        g: &Buffer,
        h: &Buffer,
        shape: GradShape,
        layout: OutLayout,
        out: &mut Buffer,
        sq_norms: &mut Buffer,
    ) -> Result<()>;

    /// Squared L2 norm of each row of a `rows × cols` matrix.
    fn row_sq_norms(&self, x: &Buffer, rows: usize, cols: usize, out: &mut Buffer) -> Result<()>;

    /// `out = Σ_i min(1, clip/‖x_i‖) x_i` with the norms given as squares.
    fn clip_scale_sum(
        &self,
        x: &Buffer,
        rows: usize,
        cols: usize,
        sq_norms: &Buffer,
        clip: f32,
        out: &mut Buffer,
    ) -> Result<()>;

    /// In place: `x = (x + N(0, σ²C²)) · scale`, noise from the Philox stream.
    fn add_noise(&self, x: &mut Buffer, noise: &NoiseSpec) -> Result<()>;

    /// Fused clip, sum, noise and scale:
    /// `out = (Σ_i min(1, C/‖x_i‖) x_i + N(0, σ²C²)) · scale`.
    fn clip_and_noise(
        &self,
        x: &Buffer,
        rows: usize,
        cols: usize,
        sq_norms: &Buffer,
        noise: &NoiseSpec,
        out: &mut Buffer,
    ) -> Result<()>;
}

/// The backend a run uses: CPU by default, CUDA when asked for or when
/// [`Backend::auto`] finds a device.
#[derive(Debug)]
pub enum Backend {
    /// The rayon reference backend.
    Cpu(CpuBackend),
    /// The CUDA backend.
    Cuda(CudaBackend),
}

impl Default for Backend {
    fn default() -> Self {
        Backend::Cpu(CpuBackend)
    }
}

impl Backend {
    /// The CPU backend.
    pub fn cpu() -> Self {
        Backend::Cpu(CpuBackend)
    }

    /// The CUDA backend on device `ordinal`, or the reason there is none.
    pub fn cuda(ordinal: usize) -> Result<Self> {
        CudaBackend::new(ordinal).map(Backend::Cuda)
    }

    /// CUDA device 0 when one is usable, otherwise the CPU. Never panics,
    /// also on machines without a CUDA driver.
    pub fn auto() -> Self {
        match probe() {
            DeviceProbe::Devices(_) => Backend::cuda(0).unwrap_or_else(|_| Backend::cpu()),
            _ => Backend::cpu(),
        }
    }

    fn inner(&self) -> &dyn Kernels {
        match self {
            Backend::Cpu(b) => b,
            Backend::Cuda(b) => b,
        }
    }
}

impl Kernels for Backend {
    fn name(&self) -> String {
        self.inner().name()
    }
    fn upload(&self, data: &[f32]) -> Result<Buffer> {
        self.inner().upload(data)
    }
    fn alloc_zeros(&self, len: usize) -> Result<Buffer> {
        self.inner().alloc_zeros(len)
    }
    fn download_into(&self, buf: &Buffer, out: &mut [f32]) -> Result<()> {
        self.inner().download_into(buf, out)
    }
    fn synchronize(&self) -> Result<()> {
        self.inner().synchronize()
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
        self.inner()
            .per_example_grads(g, h, shape, layout, out, sq_norms)
    }
    fn row_sq_norms(&self, x: &Buffer, rows: usize, cols: usize, out: &mut Buffer) -> Result<()> {
        self.inner().row_sq_norms(x, rows, cols, out)
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
        self.inner()
            .clip_scale_sum(x, rows, cols, sq_norms, clip, out)
    }
    fn add_noise(&self, x: &mut Buffer, noise: &NoiseSpec) -> Result<()> {
        self.inner().add_noise(x, noise)
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
        self.inner()
            .clip_and_noise(x, rows, cols, sq_norms, noise, out)
    }
}
