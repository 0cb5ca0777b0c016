//! Elementwise helpers a training step needs between the layer operations:
//! `y += alpha · x` (residual connections) and `out = a ⊙ b` (dropout masks,
//! the pooler's tanh derivative). On the CUDA backend both are cuBLAS level-1
//! style calls (`cublasSaxpy`, and `cublasSdgmm` on an `n × 1` matrix), so
//! no kernel source or PTX is added; device memory use is also reported here.

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::sys as driver_sys;
use cudarc::driver::{DevicePtr, DevicePtrMut};

use crate::cuda::{dev, dev_mut, drv};
use crate::types::check_len;
use crate::{Backend, Buffer, CpuBackend, CudaBackend, Error, Result};

fn host(b: &Buffer) -> Result<&[f32]> {
    b.as_host().ok_or(Error::WrongBackend {
        backend: "cpu",
        buffer: "a CUDA device",
    })
}

fn host_mut(b: &mut Buffer) -> Result<&mut [f32]> {
    b.as_host_mut().ok_or(Error::WrongBackend {
        backend: "cpu",
        buffer: "a CUDA device",
    })
}

fn n_i32(what: &'static str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::Shape {
        what,
        detail: format!("{n} elements exceed the 32-bit limit of cuBLAS"),
    })
}

fn check_alpha(alpha: f32) -> Result<()> {
    if alpha.is_finite() {
        Ok(())
    } else {
        Err(Error::Parameter {
            name: "alpha",
            value: f64::from(alpha),
            reason: "the axpy factor must be finite",
        })
    }
}

/// Elementwise operations on whole buffers of one backend.
pub trait Elementwise {
    /// `y += alpha · x` over equal-length buffers.
    fn axpy(&self, alpha: f32, x: &Buffer, y: &mut Buffer) -> Result<()>;
    /// `out = a ⊙ b` over equal-length buffers.
    fn mul(&self, a: &Buffer, b: &Buffer, out: &mut Buffer) -> Result<()>;
}

impl Elementwise for CpuBackend {
    fn axpy(&self, alpha: f32, x: &Buffer, y: &mut Buffer) -> Result<()> {
        check_alpha(alpha)?;
        let x = host(x)?;
        let y = host_mut(y)?;
        check_len("axpy: y", x.len(), y.len())?;
        y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
        Ok(())
    }

    fn mul(&self, a: &Buffer, b: &Buffer, out: &mut Buffer) -> Result<()> {
        let (a, b) = (host(a)?, host(b)?);
        let out = host_mut(out)?;
        check_len("mul: b", a.len(), b.len())?;
        check_len("mul: out", a.len(), out.len())?;
        out.iter_mut()
            .zip(a.iter().zip(b))
            .for_each(|(o, (a, b))| *o = a * b);
        Ok(())
    }
}

impl CudaBackend {
    fn blas_handle(&self, op: &'static str) -> Result<blas_sys::cublasHandle_t> {
        self.blas
            .as_ref()
            .map(|b| *b.handle())
            .ok_or(Error::Cublas {
                op,
                message: "libcublas is not installed".into(),
            })
    }

    /// `(free, total)` bytes of device memory as the driver reports them
    /// (all processes and the CUDA context included); the difference of
    /// two readings is what this process allocated in between.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(drv("mem_get_info"))
    }

    /// The memory pool this backend's stream-ordered allocations come from
    /// (the device's current pool); `None` when the context allocates
    /// synchronously, without a pool.
    fn memory_pool(&self) -> Result<Option<driver_sys::CUmemoryPool>> {
        if !self.ctx.has_async_alloc() {
            return Ok(None);
        }
        self.ctx.bind_to_thread().map_err(drv("bind context"))?;
        let mut pool: driver_sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: `pool` is a valid out-pointer; the device is this context's.
        unsafe { driver_sys::cuDeviceGetMemPool(&mut pool, self.ctx.cu_device()) }
            .result()
            .map_err(drv("cuDeviceGetMemPool"))?;
        Ok(Some(pool))
    }

    fn pool_attribute(
        pool: driver_sys::CUmemoryPool,
        attr: driver_sys::CUmemPool_attribute,
    ) -> Result<usize> {
        let mut v: u64 = 0;
        // SAFETY: the used/reserved memory attributes are cuuint64_t.
        unsafe { driver_sys::cuMemPoolGetAttribute(pool, attr, (&raw mut v).cast()) }
            .result()
            .map_err(drv("cuMemPoolGetAttribute"))?;
        usize::try_from(v).map_err(|_| Error::Shape {
            what: "memory pool",
            detail: format!("{v} bytes exceed usize"),
        })
    }

    /// Starts a new peak for [`CudaBackend::peak_allocated`] (the memory
    /// held now still counts), as `torch.cuda.reset_peak_memory_stats`.
    pub fn reset_peak_allocated(&self) -> Result<()> {
        let Some(pool) = self.memory_pool()? else {
            return Ok(());
        };
        let mut zero: u64 = 0;
        // SAFETY: USED_MEM_HIGH takes a cuuint64_t, and only 0.
        unsafe {
            driver_sys::cuMemPoolSetAttribute(
                pool,
                driver_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&raw mut zero).cast(),
            )
        }
        .result()
        .map_err(drv("cuMemPoolSetAttribute"))
    }

    /// The most bytes this process's buffers held at once since the last
    /// [`CudaBackend::reset_peak_allocated`]: the pool's used-memory high
    /// watermark, which counts live allocations only, as PyTorch's
    /// `max_memory_allocated` does (the CUDA context, cuBLAS's own
    /// workspace and freed blocks the pool keeps for reuse are excluded).
    /// `None` without a stream-ordered pool.
    pub fn peak_allocated(&self) -> Result<Option<usize>> {
        let Some(pool) = self.memory_pool()? else {
            return Ok(None);
        };
        use driver_sys::CUmemPool_attribute::{
            CU_MEMPOOL_ATTR_USED_MEM_CURRENT, CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        };
        let high = Self::pool_attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
        let now = Self::pool_attribute(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
        Ok(Some(high.max(now)))
    }
}

impl Elementwise for CudaBackend {
    fn axpy(&self, alpha: f32, x: &Buffer, y: &mut Buffer) -> Result<()> {
        check_alpha(alpha)?;
        let (x, y) = (dev(x)?, dev_mut(y)?);
        check_len("axpy: y", x.len(), y.len())?;
        let n = n_i32("axpy", x.len())?;
        let handle = self.blas_handle("cublasSaxpy")?;
        let (px, _gx) = x.device_ptr(&self.stream);
        let (py, _gy) = y.device_ptr_mut(&self.stream);
        // SAFETY: x and y hold n f32 each on this backend's stream (the
        // handle's stream); alpha is a host f32 (default pointer mode).
        unsafe {
            blas_sys::cublasSaxpy_v2(handle, n, &alpha, px as *const f32, 1, py as *mut f32, 1)
        }
        .result()
        .map_err(|e| Error::Cublas {
            op: "cublasSaxpy",
            message: e.to_string(),
        })
    }

    fn mul(&self, a: &Buffer, b: &Buffer, out: &mut Buffer) -> Result<()> {
        let (a, b, out) = (dev(a)?, dev(b)?, dev_mut(out)?);
        check_len("mul: b", a.len(), b.len())?;
        check_len("mul: out", a.len(), out.len())?;
        let n = n_i32("mul", a.len())?;
        let handle = self.blas_handle("cublasSdgmm")?;
        let (pa, _ga) = a.device_ptr(&self.stream);
        let (pb, _gb) = b.device_ptr(&self.stream);
        let (po, _go) = out.device_ptr_mut(&self.stream);
        // SAFETY: `a` is an n × 1 column-major matrix (lda = n), `b` the
        // diagonal (n values), `out` n × 1; diag(b) · a is the elementwise
        // product. All three hold n f32 on the handle's stream.
        unsafe {
            blas_sys::cublasSdgmm(
                handle,
                blas_sys::cublasSideMode_t::CUBLAS_SIDE_LEFT,
                n,
                1,
                pa as *const f32,
                n,
                pb as *const f32,
                1,
                po as *mut f32,
                n,
            )
        }
        .result()
        .map_err(|e| Error::Cublas {
            op: "cublasSdgmm",
            message: e.to_string(),
        })
    }
}

impl Elementwise for Backend {
    fn axpy(&self, alpha: f32, x: &Buffer, y: &mut Buffer) -> Result<()> {
        match self {
            Backend::Cpu(b) => b.axpy(alpha, x, y),
            Backend::Cuda(b) => b.axpy(alpha, x, y),
        }
    }

    fn mul(&self, a: &Buffer, b: &Buffer, out: &mut Buffer) -> Result<()> {
        match self {
            Backend::Cpu(be) => be.mul(a, b, out),
            Backend::Cuda(be) => be.mul(a, b, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Kernels;

    #[test]
    fn cpu_axpy_and_mul() {
        let be = CpuBackend;
        let x = be.upload(&[1.0, 2.0, 3.0]).unwrap();
        let mut y = be.upload(&[10.0, 20.0, 30.0]).unwrap();
        be.axpy(2.0, &x, &mut y).unwrap();
        assert_eq!(be.download(&y).unwrap(), vec![12.0, 24.0, 36.0]);
        let mut out = be.alloc_zeros(3).unwrap();
        be.mul(&x, &y, &mut out).unwrap();
        assert_eq!(be.download(&out).unwrap(), vec![12.0, 48.0, 108.0]);
        let short = be.alloc_zeros(2).unwrap();
        assert!(matches!(
            be.mul(&x, &short, &mut out),
            Err(Error::Length { .. })
        ));
    }
}
