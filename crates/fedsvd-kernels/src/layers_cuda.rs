//! The layer operations on the CUDA backend: the kernels of
//! `kernels/layers.cu` and cuBLAS `GemmEx` / `GemmStridedBatchedEx` with an
//! explicit compute type. Every length is checked on the host first (ids and
//! labels too), so no kernel indexes out of bounds.

use cudarc::cublas::result as blas;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};

use crate::cuda::{dev, dev_mut, drv};
use crate::layers::{
    AttnShape, BatchStrides, DropoutSpec, Embeddings, GemmSpec, LayerKernels, OperandGather,
    Precision, check_eps, check_labels, check_scale,
};
use crate::types::{check_len, check_matrix};
use crate::{Buffer, CudaBackend, Error, Result};

/// Threads of the one-warp-per-row kernels (four rows per block).
const ROW_THREADS: u32 = 128;
const ROWS_PER_BLOCK: usize = (ROW_THREADS / 32) as usize;
const EW_THREADS: u32 = 256;
const COL_THREADS: u32 = 256;
/// Rows per partial sum of the LayerNorm parameter gradients.
const PARAM_CHUNK: usize = 64;
const MAX_GRID_YZ: usize = 65_535;

/// The functions of `kernels/layers.cu`.
pub(crate) struct LayerFunctions {
    layer_norm_fwd: CudaFunction,
    embed_layer_norm: CudaFunction,
    layer_norm_bwd_dx: CudaFunction,
    layer_norm_bwd_params_partial: CudaFunction,
    sum_partial_columns: CudaFunction,
    bias_gelu_fwd: CudaFunction,
    bias_gelu_bwd: CudaFunction,
    masked_softmax_fwd: CudaFunction,
    masked_softmax_bwd: CudaFunction,
    dropout_mask: CudaFunction,
    cross_entropy: CudaFunction,
    f32_to_bf16_gather: CudaFunction,
}

impl LayerFunctions {
    pub(crate) fn load(func: impl Fn(&'static str) -> Result<CudaFunction>) -> Result<Self> {
        Ok(Self {
            layer_norm_fwd: func("layer_norm_fwd")?,
            embed_layer_norm: func("embed_layer_norm")?,
            layer_norm_bwd_dx: func("layer_norm_bwd_dx")?,
            layer_norm_bwd_params_partial: func("layer_norm_bwd_params_partial")?,
            sum_partial_columns: func("sum_partial_columns")?,
            bias_gelu_fwd: func("bias_gelu_fwd")?,
            bias_gelu_bwd: func("bias_gelu_bwd")?,
            masked_softmax_fwd: func("masked_softmax_fwd")?,
            masked_softmax_bwd: func("masked_softmax_bwd")?,
            dropout_mask: func("dropout_mask")?,
            cross_entropy: func("cross_entropy_fwd_bwd")?,
            f32_to_bf16_gather: func("f32_to_bf16_gather")?,
        })
    }
}

fn i32_of(what: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Shape {
        what,
        detail: format!("{v} exceeds the CUDA backend's 32-bit limit"),
    })
}

fn i64_of(what: &'static str, v: usize) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Shape {
        what,
        detail: format!("{v} exceeds i64"),
    })
}

/// One warp per row.
fn row_grid(what: &'static str, rows: usize) -> Result<LaunchConfig> {
    let blocks = u32::try_from(rows.div_ceil(ROWS_PER_BLOCK)).map_err(|_| Error::Shape {
        what,
        detail: format!("{rows} rows are too many"),
    })?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Grid-stride elementwise loop.
fn ew_grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(EW_THREADS as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (EW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn col_grid(cols: usize, parts: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (cols.div_ceil(COL_THREADS as usize) as u32, parts as u32, 1),
        block_dim: (COL_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The column-major cuBLAS call of a row-major [`GemmSpec`]: row-major
/// `C = op(A) op(B)` is column-major `Cᵀ = op(B)ᵀ op(A)ᵀ`, so `B` becomes the
/// first operand and `A` the second, `m` and `n` swap, and each matrix keeps
/// its leading dimension (a row-major matrix with row stride `ld` is its
/// transpose in column-major order with the same `ld`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ColMajor {
    trans_first: bool,
    trans_second: bool,
    m: i32,
    n: i32,
    k: i32,
    ld_first: i32,
    ld_second: i32,
    ldc: i32,
    stride_first: i64,
    stride_second: i64,
    stride_c: i64,
    count: i32,
}

impl ColMajor {
    pub(crate) fn of(spec: &GemmSpec, batch: &BatchStrides) -> Result<Self> {
        const OP: &str = "gemm";
        Ok(Self {
            trans_first: spec.trans_b,
            trans_second: spec.trans_a,
            m: i32_of(OP, spec.n)?,
            n: i32_of(OP, spec.m)?,
            k: i32_of(OP, spec.k)?,
            ld_first: i32_of(OP, spec.ldb)?,
            ld_second: i32_of(OP, spec.lda)?,
            ldc: i32_of(OP, spec.ldc)?,
            stride_first: i64_of(OP, batch.stride_b)?,
            stride_second: i64_of(OP, batch.stride_a)?,
            stride_c: i64_of(OP, batch.stride_c)?,
            count: i32_of(OP, batch.count)?,
        })
    }
}

impl CudaBackend {
    fn upload_u32(&self, what: &'static str, v: &[u32]) -> Result<CudaSlice<u32>> {
        self.stream.clone_htod(v).map_err(drv(what))
    }

    /// Rounds the elements of `x` that `g` names to bf16 on the device
    /// (round to nearest even), packed matrix after matrix.
    fn gather_bf16(&self, x: &CudaSlice<f32>, g: &OperandGather) -> Result<CudaSlice<u16>> {
        const OP: &str = "f32_to_bf16_gather";
        let n = g.packed_len();
        // SAFETY: the kernel writes every element before cuBLAS reads it.
        let mut y = unsafe { self.stream.alloc::<u16>(n.max(1)) }.map_err(drv("alloc bf16"))?;
        let args = [g.offset, g.ld, g.stride, g.rows, g.cols, g.count]
            .map(|v| i64_of(OP, v))
            .into_iter()
            .collect::<Result<Vec<i64>>>()?;
        let mut b = self.stream.launch_builder(&self.lf.f32_to_bf16_gather);
        b.arg(x);
        for v in &args {
            b.arg(v);
        }
        b.arg(&mut y);
        // SAFETY: `GemmSpec::validate` bounded every gathered index by
        // x.len(); y holds the n packed elements.
        unsafe { b.launch(ew_grid(n)) }.map_err(drv("launch f32_to_bf16_gather"))?;
        Ok(y)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_gemm(
        &self,
        spec: &GemmSpec,
        batch: &BatchStrides,
        a: (u64, cudaDataType_t),
        b: (u64, cudaDataType_t),
        c: u64,
        compute: cublasComputeType_t,
    ) -> Result<()> {
        const OP: &str = "gemm";
        let handle = self
            .blas
            .as_ref()
            .ok_or(Error::Cublas {
                op: OP,
                message: "libcublas is not installed".into(),
            })?
            .handle();
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let cm = ColMajor::of(spec, batch)?;
        let (m, n, k) = (cm.m, cm.n, cm.k);
        let (lda, ldb, ldc) = (cm.ld_first, cm.ld_second, cm.ldc);
        let alpha = spec.alpha;
        let beta = spec.beta;
        let alpha_p = (&alpha as *const f32).cast();
        let beta_p = (&beta as *const f32).cast();
        let algo = cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        let c_type = cudaDataType_t::CUDA_R_32F;
        let result = if batch.count == 1 {
            // SAFETY: the pointers address buffers whose lengths `validate`
            // checked against m, n, k, the leading dimensions and offsets;
            // alpha and beta are host f32 (the handle's default pointer mode).
            unsafe {
                blas::gemm_ex(
                    *handle,
                    op(cm.trans_first),
                    op(cm.trans_second),
                    m,
                    n,
                    k,
                    alpha_p,
                    b.0 as *const _,
                    b.1,
                    lda,
                    a.0 as *const _,
                    a.1,
                    ldb,
                    beta_p,
                    c as *mut _,
                    c_type,
                    ldc,
                    compute,
                    algo,
                )
            }
        } else {
            let (count, sa, sb, sc) = (cm.count, cm.stride_first, cm.stride_second, cm.stride_c);
            // SAFETY: as above, with every product's extent checked.
            unsafe {
                blas::gemm_strided_batched_ex(
                    *handle,
                    op(cm.trans_first),
                    op(cm.trans_second),
                    m,
                    n,
                    k,
                    alpha_p,
                    b.0 as *const _,
                    b.1,
                    lda,
                    sa,
                    a.0 as *const _,
                    a.1,
                    ldb,
                    sb,
                    beta_p,
                    c as *mut _,
                    c_type,
                    ldc,
                    sc,
                    count,
                    compute,
                    algo,
                )
            }
        };
        result.map_err(|e| Error::Cublas {
            op: if batch.count == 1 {
                "cublasGemmEx"
            } else {
                "cublasGemmStridedBatchedEx"
            },
            message: format!("{e} ({:?}, {compute:?})", spec.precision),
        })
    }
}

impl LayerKernels for CudaBackend {
    fn embed_layer_norm(
        &self,
        ids: &[u32],
        type_ids: &[u32],
        seq: usize,
        tables: &Embeddings<'_>,
        out: &mut Buffer,
        mean: &mut Buffer,
        rstd: &mut Buffer,
    ) -> Result<()> {
        const OP: &str = "embed_layer_norm";
        tables.validate(ids, type_ids, seq)?;
        let h = tables.hidden;
        let rows = ids.len();
        let (word, pos, ty) = (
            dev(tables.word)?,
            dev(tables.position)?,
            dev(tables.token_type)?,
        );
        let (gamma, beta) = (dev(tables.gamma)?, dev(tables.beta)?);
        let (out, mean, rstd) = (dev_mut(out)?, dev_mut(mean)?, dev_mut(rstd)?);
        check_len("embed_layer_norm: out", rows * h, out.len())?;
        check_len("embed_layer_norm: mean", rows, mean.len())?;
        check_len("embed_layer_norm: rstd", rows, rstd.len())?;
        let ids_d = self.upload_u32("upload ids", ids)?;
        let types_d = self.upload_u32("upload type ids", type_ids)?;
        let (rows_i, seq_i, h_i) = (i32_of(OP, rows)?, i32_of(OP, seq)?, i32_of(OP, h)?);
        let eps = tables.eps;
        let mut b = self.stream.launch_builder(&self.lf.embed_layer_norm);
        b.arg(&ids_d)
            .arg(&types_d)
            .arg(word)
            .arg(pos)
            .arg(ty)
            .arg(gamma)
            .arg(beta)
            .arg(&rows_i)
            .arg(&seq_i)
            .arg(&h_i)
            .arg(&eps)
            .arg(out)
            .arg(mean)
            .arg(rstd);
        // SAFETY: ids and type ids are below their tables' row counts and seq
        // is at most the position table's (checked by validate); outputs hold
        // rows x h and rows values.
        unsafe { b.launch(row_grid(OP, rows)?) }.map_err(drv("launch embed_layer_norm"))?;
        Ok(())
    }

    fn layer_norm(
        &self,
        x: &Buffer,
        gamma: &Buffer,
        beta: &Buffer,
        rows: usize,
        hidden: usize,
        eps: f32,
        y: &mut Buffer,
        mean: &mut Buffer,
        rstd: &mut Buffer,
    ) -> Result<()> {
        const OP: &str = "layer_norm";
        let n = check_matrix(OP, rows, hidden)?;
        check_eps(eps)?;
        let (x, gamma, beta) = (dev(x)?, dev(gamma)?, dev(beta)?);
        let (y, mean, rstd) = (dev_mut(y)?, dev_mut(mean)?, dev_mut(rstd)?);
        check_len("layer_norm: x", n, x.len())?;
        check_len("layer_norm: gamma", hidden, gamma.len())?;
        check_len("layer_norm: beta", hidden, beta.len())?;
        check_len("layer_norm: y", n, y.len())?;
        check_len("layer_norm: mean", rows, mean.len())?;
        check_len("layer_norm: rstd", rows, rstd.len())?;
        let (rows_i, h_i) = (i32_of(OP, rows)?, i32_of(OP, hidden)?);
        let mut b = self.stream.launch_builder(&self.lf.layer_norm_fwd);
        b.arg(x)
            .arg(gamma)
            .arg(beta)
            .arg(&rows_i)
            .arg(&h_i)
            .arg(&eps)
            .arg(y)
            .arg(mean)
            .arg(rstd);
        // SAFETY: lengths checked above.
        unsafe { b.launch(row_grid(OP, rows)?) }.map_err(drv("launch layer_norm_fwd"))?;
        Ok(())
    }

    fn layer_norm_backward(
        &self,
        dy: &Buffer,
        x: &Buffer,
        mean: &Buffer,
        rstd: &Buffer,
        gamma: &Buffer,
        rows: usize,
        hidden: usize,
        dx: &mut Buffer,
        dgamma: &mut Buffer,
        dbeta: &mut Buffer,
    ) -> Result<()> {
        const OP: &str = "layer_norm_backward";
        let n = check_matrix(OP, rows, hidden)?;
        let (dy, x, mean, rstd, gamma) = (dev(dy)?, dev(x)?, dev(mean)?, dev(rstd)?, dev(gamma)?);
        let (dx, dgamma, dbeta) = (dev_mut(dx)?, dev_mut(dgamma)?, dev_mut(dbeta)?);
        check_len("layer_norm_backward: dy", n, dy.len())?;
        check_len("layer_norm_backward: x", n, x.len())?;
        check_len("layer_norm_backward: mean", rows, mean.len())?;
        check_len("layer_norm_backward: rstd", rows, rstd.len())?;
        check_len("layer_norm_backward: gamma", hidden, gamma.len())?;
        check_len("layer_norm_backward: dx", n, dx.len())?;
        check_len("layer_norm_backward: dgamma", hidden, dgamma.len())?;
        check_len("layer_norm_backward: dbeta", hidden, dbeta.len())?;
        let (rows_i, h_i) = (i32_of(OP, rows)?, i32_of(OP, hidden)?);
        let mut b = self.stream.launch_builder(&self.lf.layer_norm_bwd_dx);
        b.arg(dy)
            .arg(x)
            .arg(mean)
            .arg(rstd)
            .arg(gamma)
            .arg(&rows_i)
            .arg(&h_i)
            .arg(dx);
        // SAFETY: lengths checked above.
        unsafe { b.launch(row_grid(OP, rows)?) }.map_err(drv("launch layer_norm_bwd_dx"))?;

        let parts = rows.div_ceil(PARAM_CHUNK);
        if parts > MAX_GRID_YZ {
            return Err(Error::Shape {
                what: OP,
                detail: format!("{rows} rows exceed the grid limit"),
            });
        }
        let mut pg = self.alloc("alloc dgamma partials", parts * hidden)?;
        let mut pb = self.alloc("alloc dbeta partials", parts * hidden)?;
        let chunk = PARAM_CHUNK as i32;
        let mut b = self
            .stream
            .launch_builder(&self.lf.layer_norm_bwd_params_partial);
        b.arg(dy)
            .arg(x)
            .arg(mean)
            .arg(rstd)
            .arg(&rows_i)
            .arg(&h_i)
            .arg(&chunk)
            .arg(&mut pg)
            .arg(&mut pb);
        // SAFETY: the partials hold parts x hidden values.
        unsafe { b.launch(col_grid(hidden, parts)) }
            .map_err(drv("launch layer_norm_bwd_params_partial"))?;
        let parts_i = parts as i32;
        for (partial, out) in [(&pg, dgamma), (&pb, dbeta)] {
            let mut b = self.stream.launch_builder(&self.lf.sum_partial_columns);
            b.arg(partial).arg(&parts_i).arg(&h_i).arg(out);
            // SAFETY: partial holds parts x hidden values, out hidden.
            unsafe { b.launch(col_grid(hidden, 1)) }.map_err(drv("launch sum_partial_columns"))?;
        }
        Ok(())
    }

    fn bias_gelu(
        &self,
        x: &Buffer,
        bias: &Buffer,
        rows: usize,
        cols: usize,
        y: &mut Buffer,
    ) -> Result<()> {
        const OP: &str = "bias_gelu";
        let n = check_matrix(OP, rows, cols)?;
        let (x, bias, y) = (dev(x)?, dev(bias)?, dev_mut(y)?);
        check_len("bias_gelu: x", n, x.len())?;
        check_len("bias_gelu: bias", cols, bias.len())?;
        check_len("bias_gelu: y", n, y.len())?;
        let (n_i, cols_i) = (i64_of(OP, n)?, i32_of(OP, cols)?);
        let mut b = self.stream.launch_builder(&self.lf.bias_gelu_fwd);
        b.arg(x).arg(bias).arg(&n_i).arg(&cols_i).arg(y);
        // SAFETY: lengths checked above.
        unsafe { b.launch(ew_grid(n)) }.map_err(drv("launch bias_gelu_fwd"))?;
        Ok(())
    }

    fn bias_gelu_backward(
        &self,
        dy: &Buffer,
        x: &Buffer,
        bias: &Buffer,
        rows: usize,
        cols: usize,
        dx: &mut Buffer,
    ) -> Result<()> {
        const OP: &str = "bias_gelu_backward";
        let n = check_matrix(OP, rows, cols)?;
        let (dy, x, bias, dx) = (dev(dy)?, dev(x)?, dev(bias)?, dev_mut(dx)?);
        check_len("bias_gelu_backward: dy", n, dy.len())?;
        check_len("bias_gelu_backward: x", n, x.len())?;
        check_len("bias_gelu_backward: bias", cols, bias.len())?;
        check_len("bias_gelu_backward: dx", n, dx.len())?;
        let (n_i, cols_i) = (i64_of(OP, n)?, i32_of(OP, cols)?);
        let mut b = self.stream.launch_builder(&self.lf.bias_gelu_bwd);
        b.arg(dy).arg(x).arg(bias).arg(&n_i).arg(&cols_i).arg(dx);
        // SAFETY: lengths checked above.
        unsafe { b.launch(ew_grid(n)) }.map_err(drv("launch bias_gelu_bwd"))?;
        Ok(())
    }

    fn masked_softmax(
        &self,
        scores: &Buffer,
        key_mask: &Buffer,
        shape: AttnShape,
        scale: f32,
        probs: &mut Buffer,
    ) -> Result<()> {
        const OP: &str = "masked_softmax";
        shape.validate(OP)?;
        check_scale(scale)?;
        let (s, m, p) = (dev(scores)?, dev(key_mask)?, dev_mut(probs)?);
        check_len("masked_softmax: scores", shape.len(), s.len())?;
        check_len(
            "masked_softmax: key_mask",
            shape.batch * shape.k_len,
            m.len(),
        )?;
        check_len("masked_softmax: probs", shape.len(), p.len())?;
        let rows = shape.rows();
        let rows_i = i32_of(OP, rows)?;
        let per_i = i32_of(OP, shape.heads * shape.q_len)?;
        let k_i = i32_of(OP, shape.k_len)?;
        let mut b = self.stream.launch_builder(&self.lf.masked_softmax_fwd);
        b.arg(s)
            .arg(m)
            .arg(&rows_i)
            .arg(&per_i)
            .arg(&k_i)
            .arg(&scale)
            .arg(p);
        // SAFETY: lengths checked above.
        unsafe { b.launch(row_grid(OP, rows)?) }.map_err(drv("launch masked_softmax_fwd"))?;
        Ok(())
    }

    fn masked_softmax_backward(
        &self,
        dprobs: &Buffer,
        probs: &Buffer,
        shape: AttnShape,
        scale: f32,
        dscores: &mut Buffer,
    ) -> Result<()> {
        const OP: &str = "masked_softmax_backward";
        shape.validate(OP)?;
        check_scale(scale)?;
        let (dp, p, ds) = (dev(dprobs)?, dev(probs)?, dev_mut(dscores)?);
        check_len("masked_softmax_backward: dprobs", shape.len(), dp.len())?;
        check_len("masked_softmax_backward: probs", shape.len(), p.len())?;
        check_len("masked_softmax_backward: dscores", shape.len(), ds.len())?;
        let rows = shape.rows();
        let (rows_i, k_i) = (i32_of(OP, rows)?, i32_of(OP, shape.k_len)?);
        let mut b = self.stream.launch_builder(&self.lf.masked_softmax_bwd);
        b.arg(dp).arg(p).arg(&rows_i).arg(&k_i).arg(&scale).arg(ds);
        // SAFETY: lengths checked above.
        unsafe { b.launch(row_grid(OP, rows)?) }.map_err(drv("launch masked_softmax_bwd"))?;
        Ok(())
    }

    fn dropout_mask(
        &self,
        spec: &DropoutSpec,
        batch: usize,
        per_example: usize,
        out: &mut Buffer,
    ) -> Result<()> {
        const OP: &str = "dropout_mask";
        spec.validate()?;
        let n = check_matrix(OP, batch, per_example)?;
        let out = dev_mut(out)?;
        check_len("dropout_mask: out", n, out.len())?;
        if batch > MAX_GRID_YZ {
            return Err(Error::Shape {
                what: OP,
                detail: format!("batch {batch} exceeds the CUDA grid limit of {MAX_GRID_YZ}"),
            });
        }
        let blocks = per_example.div_ceil(16).div_ceil(EW_THREADS as usize);
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(blocks).map_err(|_| Error::Shape {
                    what: OP,
                    detail: format!("{per_example} elements per example are too many"),
                })?,
                batch as u32,
                1,
            ),
            block_dim: (EW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let per_i = i64_of(OP, per_example)?;
        let (seed, stream, first) = (spec.seed, spec.stream, spec.first_example);
        let (p, keep) = (spec.p, spec.keep());
        let mut b = self.stream.launch_builder(&self.lf.dropout_mask);
        b.arg(out)
            .arg(&per_i)
            .arg(&seed)
            .arg(&stream)
            .arg(&first)
            .arg(&p)
            .arg(&keep);
        // SAFETY: out holds batch x per_example values; the grid covers them.
        unsafe { b.launch(cfg) }.map_err(drv("launch dropout_mask"))?;
        Ok(())
    }

    fn cross_entropy(
        &self,
        logits: &Buffer,
        labels: &[u32],
        classes: usize,
        losses: &mut Buffer,
        dlogits: &mut Buffer,
    ) -> Result<()> {
        const OP: &str = "cross_entropy";
        let n = check_matrix(OP, labels.len(), classes)?;
        check_labels(labels, classes)?;
        let (z, loss, dz) = (dev(logits)?, dev_mut(losses)?, dev_mut(dlogits)?);
        check_len("cross_entropy: logits", n, z.len())?;
        check_len("cross_entropy: losses", labels.len(), loss.len())?;
        check_len("cross_entropy: dlogits", n, dz.len())?;
        let labels_d = self.upload_u32("upload labels", labels)?;
        let (rows_i, k_i) = (i32_of(OP, labels.len())?, i32_of(OP, classes)?);
        let mut b = self.stream.launch_builder(&self.lf.cross_entropy);
        b.arg(z)
            .arg(&labels_d)
            .arg(&rows_i)
            .arg(&k_i)
            .arg(loss)
            .arg(dz);
        // SAFETY: labels are below `classes` (checked); lengths checked above.
        unsafe { b.launch(row_grid(OP, labels.len())?) }
            .map_err(drv("launch cross_entropy_fwd_bwd"))?;
        Ok(())
    }

    fn gemm_strided_batched(
        &self,
        spec: &GemmSpec,
        batch: &BatchStrides,
        a: &Buffer,
        b: &Buffer,
        c: &mut Buffer,
    ) -> Result<()> {
        let (a, b, c) = (dev(a)?, dev(b)?, dev_mut(c)?);
        spec.validate("gemm_strided_batched", batch, (a.len(), b.len(), c.len()))?;
        if self.blas.is_none() {
            return Err(Error::Cublas {
                op: "gemm",
                message: "libcublas is not installed".into(),
            });
        }
        const F4: u64 = 4;
        let f32_t = cudaDataType_t::CUDA_R_32F;
        let (pc, _gc) = c.device_ptr_mut(&self.stream);
        let pc = pc + spec.offset_c as u64 * F4;
        match spec.precision {
            Precision::F32 | Precision::Tf32 => {
                let (pa, _ga) = a.device_ptr(&self.stream);
                let (pb, _gb) = b.device_ptr(&self.stream);
                let pa = (pa + spec.offset_a as u64 * F4, f32_t);
                let pb = (pb + spec.offset_b as u64 * F4, f32_t);
                if spec.precision == Precision::Tf32 {
                    self.launch_gemm(
                        spec,
                        batch,
                        pa,
                        pb,
                        pc,
                        cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
                    )
                } else {
                    // Pedantic keeps every algorithm in plain IEEE f32; should a
                    // cuBLAS build refuse it, plain 32F (no tensor ops under the
                    // default math mode) computes the same thing.
                    self.launch_gemm(
                        spec,
                        batch,
                        pa,
                        pb,
                        pc,
                        cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC,
                    )
                    .or_else(|_| {
                        self.launch_gemm(
                            spec,
                            batch,
                            pa,
                            pb,
                            pc,
                            cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        )
                    })
                }
            }
            Precision::Bf16 => {
                // Only what the products read is rounded, into packed copies
                // (the old whole-buffer rounding repeated the full QKV matrix
                // for every head's product).
                let (ga, gb, packed, strides) = spec.packed(batch);
                let ah = self.gather_bf16(a, &ga)?;
                let bh = self.gather_bf16(b, &gb)?;
                let bf = cudaDataType_t::CUDA_R_16BF;
                let (pa, _ga) = ah.device_ptr(&self.stream);
                let (pb, _gb) = bh.device_ptr(&self.stream);
                self.launch_gemm(
                    &packed,
                    &strides,
                    (pa, bf),
                    (pb, bf),
                    pc,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers_cpu;

    /// cublasSgemmStridedBatched as its documentation defines it
    /// (column-major, `C[i + j·ldc]`), on host slices.
    #[allow(clippy::too_many_arguments)]
    fn cublas_model(
        cm: &ColMajor,
        alpha: f32,
        beta: f32,
        first: &[f32],
        second: &[f32],
        c: &mut [f32],
    ) {
        let at = |x: &[f32], t: bool, ld: i32, i: i32, l: i32| {
            if t {
                x[(l + i * ld) as usize]
            } else {
                x[(i + l * ld) as usize]
            }
        };
        for p in 0..cm.count {
            let f = &first[(i64::from(p) * cm.stride_first) as usize..];
            let s = &second[(i64::from(p) * cm.stride_second) as usize..];
            let cp = (i64::from(p) * cm.stride_c) as usize;
            for j in 0..cm.n {
                for i in 0..cm.m {
                    let mut acc = 0.0f64;
                    for l in 0..cm.k {
                        acc += f64::from(at(f, cm.trans_first, cm.ld_first, i, l))
                            * f64::from(at(s, cm.trans_second, cm.ld_second, l, j));
                    }
                    let o = cp + (i + j * cm.ldc) as usize;
                    let old = if beta == 0.0 { 0.0 } else { beta * c[o] };
                    c[o] = alpha * acc as f32 + old;
                }
            }
        }
    }

    /// `f32_to_bf16_gather` on the host, with the kernel's index arithmetic
    /// (the rounding itself is checked on a GPU, by the bf16 rows of
    /// `gpu_gemms_match_f64_in_every_precision`).
    fn gather_model(x: &[f32], g: &OperandGather) -> Vec<f32> {
        let per = g.rows * g.cols;
        (0..g.packed_len())
            .map(|i| {
                let p = i / per;
                let e = i - p * per;
                let r = e / g.cols;
                x[g.offset + p * g.stride + r * g.ld + (e - r * g.cols)]
            })
            .collect()
    }

    #[test]
    fn a_gemm_over_packed_gathers_computes_the_original_product() {
        let mut seed = 11u64;
        let mut next = move || {
            seed = layers_cpu::splitmix(seed);
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        // (heads, head width, seq): the attention products of one layer
        // read every head out of one packed QKV matrix (ld 3h, stride dh);
        // a shared weight (stride 0) beside per-example inputs; plain GEMMs.
        let (heads, dh, seq) = (3, 4, 5);
        let h = heads * dh;
        let mut cases: Vec<(GemmSpec, BatchStrides)> = Vec::new();
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut s = GemmSpec::new(seq, seq, dh);
            s.trans_a = trans_a;
            s.trans_b = trans_b;
            s.lda = 3 * h;
            s.ldb = 3 * h;
            s.offset_a = 2;
            s.offset_b = h + 1;
            s.ldc = seq;
            s.beta = 0.5;
            cases.push((
                s,
                BatchStrides {
                    count: heads,
                    stride_a: dh,
                    stride_b: dh,
                    stride_c: seq * seq,
                },
            ));
        }
        let mut shared = GemmSpec::new(seq, h, h);
        shared.trans_b = true;
        shared.ldb = h + 3;
        shared.offset_b = 7;
        cases.push((
            shared,
            BatchStrides {
                count: 4,
                stride_a: seq * h,
                stride_b: 0,
                stride_c: seq * h,
            },
        ));
        cases.push((GemmSpec::new(6, 7, 8), BatchStrides::single()));
        for (case, (spec, batch)) in cases.into_iter().enumerate() {
            spec.validate("test", &batch, (usize::MAX, usize::MAX, usize::MAX))
                .unwrap();
            let extent = |(rows, cols): (usize, usize), ld: usize, off: usize, stride: usize| {
                off + (batch.count - 1) * stride + (rows - 1) * ld + cols
            };
            let a: Vec<f32> = (0..extent(spec.a_dims(), spec.lda, spec.offset_a, batch.stride_a))
                .map(|_| next())
                .collect();
            let b: Vec<f32> = (0..extent(spec.b_dims(), spec.ldb, spec.offset_b, batch.stride_b))
                .map(|_| next())
                .collect();
            let c0: Vec<f32> = (0..extent((spec.m, spec.n), spec.ldc, 0, batch.stride_c))
                .map(|_| next())
                .collect();
            let mut want = c0.clone();
            layers_cpu::gemm_strided_batched(&spec, &batch, &a, &b, &mut want).unwrap();
            let (ga, gb, packed, strides) = spec.packed(&batch);
            let (pa, pb) = (gather_model(&a, &ga), gather_model(&b, &gb));
            packed
                .validate("packed", &strides, (pa.len(), pb.len(), c0.len()))
                .unwrap();
            // A shared matrix is gathered once, not once per product.
            assert_eq!(ga.count, if batch.stride_a == 0 { 1 } else { batch.count });
            assert_eq!(gb.count, if batch.stride_b == 0 { 1 } else { batch.count });
            assert_eq!(pa.len(), ga.count * spec.m * spec.k);
            let cm = ColMajor::of(&packed, &strides).unwrap();
            let mut got = c0.clone();
            cublas_model(&cm, packed.alpha, packed.beta, &pb, &pa, &mut got);
            for (o, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() < 1e-5, "case {case} element {o}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn the_column_major_call_computes_the_row_major_product() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = layers_cpu::splitmix(seed);
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let (m, n, k) = (5, 4, 3);
            let mut spec = GemmSpec::new(m, n, k);
            spec.trans_a = trans_a;
            spec.trans_b = trans_b;
            spec.alpha = 0.75;
            spec.beta = 0.5;
            spec.lda = spec.a_dims().1 + 1;
            spec.ldb = spec.b_dims().1 + 2;
            spec.ldc = n + 1;
            let batch = BatchStrides {
                count: 2,
                stride_a: spec.a_dims().0 * spec.lda,
                stride_b: spec.b_dims().0 * spec.ldb,
                stride_c: m * spec.ldc,
            };
            let a: Vec<f32> = (0..2 * batch.stride_a).map(|_| next()).collect();
            let b: Vec<f32> = (0..2 * batch.stride_b).map(|_| next()).collect();
            let c0: Vec<f32> = (0..2 * batch.stride_c).map(|_| next()).collect();
            let mut want = c0.clone();
            layers_cpu::gemm_strided_batched(&spec, &batch, &a, &b, &mut want).unwrap();
            let cm = ColMajor::of(&spec, &batch).unwrap();
            let mut got = c0.clone();
            cublas_model(&cm, spec.alpha, spec.beta, &b, &a, &mut got);
            for (o, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() < 1e-5,
                    "trans {trans_a}/{trans_b} element {o}: {g} vs {w}"
                );
            }
        }
    }
}
