//! Transformer layer operations of a training step, on both backends: the
//! embedding gather fused with LayerNorm, LayerNorm forward and backward,
//! bias + GELU, the masked scaled softmax of attention, LoRA dropout masks,
//! per-example cross-entropy, and GEMMs with an explicit [`Precision`].
//!
//! [`crate::layers_cpu`] is the reference of every operation; the CUDA
//! backend runs the kernels of `kernels/layers.cu` and cuBLAS. Shapes and
//! lengths are checked before anything runs; a wrong one is an
//! [`Error::Length`] or [`Error::Shape`].

use crate::types::{check_at_least, check_len, check_matrix};
use crate::{Backend, Buffer, Error, Result};

/// How a GEMM multiplies: the cuBLAS compute type on the CUDA backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Plain f32 (`CUBLAS_COMPUTE_32F_PEDANTIC`: no tensor-op shortcuts).
    #[default]
    F32,
    /// f32 data, TF32 tensor cores (`CUBLAS_COMPUTE_32F_FAST_TF32`): inputs
    /// rounded to a 10-bit mantissa, products accumulated in f32.
    Tf32,
    /// Inputs rounded to bf16 (round to nearest even, as
    /// `half::bf16::from_f32`), products accumulated in f32, f32 output
    /// (`CUDA_R_16BF` inputs, `CUBLAS_COMPUTE_32F`).
    Bf16,
}

/// One row-major GEMM `C = alpha · op(A) · op(B) + beta · C`, `op(A)` being
/// `m × k` and `op(B)` `k × n`.
///
/// Each matrix is addressed as a row-major view: element `(i, j)` of the
/// stored `A` is `a[offset_a + i * lda + j]`, where stored `A` is `m × k`, or
/// `k × m` when `trans_a`; likewise `B` (`k × n`, or `n × k` when
/// `trans_b`) and `C` (`m × n`). With `beta = 0` the old values of `C` are
/// never read (NaN there is harmless).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmSpec {
    /// Rows of `op(A)` and `C`.
    pub m: usize,
    /// Columns of `op(B)` and `C`.
    pub n: usize,
    /// The contraction dimension.
    pub k: usize,
    /// Whether `A` is stored transposed (`k × m`).
    pub trans_a: bool,
    /// Whether `B` is stored transposed (`n × k`).
    pub trans_b: bool,
    /// Factor of the product.
    pub alpha: f32,
    /// Factor of the old `C` (0: overwrite).
    pub beta: f32,
    /// Row stride of stored `A`.
    pub lda: usize,
    /// Row stride of stored `B`.
    pub ldb: usize,
    /// Row stride of `C`.
    pub ldc: usize,
    /// First element of `A` in its buffer.
    pub offset_a: usize,
    /// First element of `B` in its buffer.
    pub offset_b: usize,
    /// First element of `C` in its buffer.
    pub offset_c: usize,
    /// Compute type.
    pub precision: Precision,
}

impl GemmSpec {
    /// Dense `C = A · B` (no transposes, packed rows, offsets 0, f32).
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Self {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
            lda: k,
            ldb: n,
            ldc: n,
            offset_a: 0,
            offset_b: 0,
            offset_c: 0,
            precision: Precision::F32,
        }
    }

    /// Rows and columns of stored `A`.
    pub fn a_dims(&self) -> (usize, usize) {
        if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }

    /// Rows and columns of stored `B`.
    pub fn b_dims(&self) -> (usize, usize) {
        if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }

    /// Checks the dimensions, leading dimensions and buffer lengths for
    /// `batch` products whose matrices start `stride_*` elements apart.
    pub(crate) fn validate(
        &self,
        op: &'static str,
        batch: &BatchStrides,
        lens: (usize, usize, usize),
    ) -> Result<()> {
        let shape = |detail: String| Error::Shape { what: op, detail };
        if self.m == 0 || self.n == 0 || self.k == 0 || batch.count == 0 {
            return Err(shape(format!(
                "m = {}, n = {}, k = {}, batch = {}: every dimension must be > 0",
                self.m, self.n, self.k, batch.count
            )));
        }
        if !(self.alpha.is_finite() && self.beta.is_finite()) {
            return Err(Error::Parameter {
                name: "alpha/beta",
                value: f64::from(if self.alpha.is_finite() {
                    self.beta
                } else {
                    self.alpha
                }),
                reason: "GEMM factors must be finite",
            });
        }
        let parts = [
            (
                "gemm: a",
                self.a_dims(),
                self.lda,
                self.offset_a,
                batch.stride_a,
                lens.0,
            ),
            (
                "gemm: b",
                self.b_dims(),
                self.ldb,
                self.offset_b,
                batch.stride_b,
                lens.1,
            ),
            (
                "gemm: c",
                (self.m, self.n),
                self.ldc,
                self.offset_c,
                batch.stride_c,
                lens.2,
            ),
        ];
        for (what, (rows, cols), ld, offset, stride, len) in parts {
            if ld < cols {
                return Err(shape(format!(
                    "{what}: leading dimension {ld} is below the {cols} columns"
                )));
            }
            let need = (batch.count - 1)
                .checked_mul(stride)
                .and_then(|v| v.checked_add((rows - 1).checked_mul(ld)?))
                .and_then(|v| v.checked_add(offset))
                .and_then(|v| v.checked_add(cols))
                .ok_or_else(|| shape(format!("{what}: extent overflows usize")))?;
            check_at_least(what, need, len)?;
        }
        Ok(())
    }
}

/// Where one GEMM input lies in its buffer, and how to gather exactly the
/// elements the products read into a dense copy: `count` matrices of `rows
/// × cols`, matrix `p` starting at `offset + p · stride`, row `r` at `+ r ·
/// ld`. The bf16 GEMMs of the CUDA backend round this gather into a packed
/// buffer (matrix after matrix, rows `cols` apart), so a product that reads
/// one head's columns out of a packed QKV matrix converts those columns,
/// not the whole buffer (per head, that was `heads` times the matrix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OperandGather {
    pub(crate) offset: usize,
    pub(crate) ld: usize,
    pub(crate) stride: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// 1 when every product reads the same matrix (stride 0).
    pub(crate) count: usize,
}

impl OperandGather {
    /// Elements of the packed copy.
    pub(crate) fn packed_len(&self) -> usize {
        self.count * self.rows * self.cols
    }

    /// The stride between packed matrices (0: one matrix shared by all).
    fn packed_stride(&self) -> usize {
        if self.count == 1 {
            0
        } else {
            self.rows * self.cols
        }
    }
}

impl GemmSpec {
    /// The gathers of `A` and `B` and the same GEMM over their packed
    /// copies (offsets 0, leading dimensions equal to the stored widths).
    /// Call after [`GemmSpec::validate`], which bounds every product used
    /// here.
    pub(crate) fn packed(
        &self,
        batch: &BatchStrides,
    ) -> (OperandGather, OperandGather, GemmSpec, BatchStrides) {
        let gather = |(rows, cols): (usize, usize), offset, ld, stride: usize| OperandGather {
            offset,
            ld,
            stride,
            rows,
            cols,
            count: if stride == 0 { 1 } else { batch.count },
        };
        let ga = gather(self.a_dims(), self.offset_a, self.lda, batch.stride_a);
        let gb = gather(self.b_dims(), self.offset_b, self.ldb, batch.stride_b);
        let spec = GemmSpec {
            lda: ga.cols,
            ldb: gb.cols,
            offset_a: 0,
            offset_b: 0,
            ..*self
        };
        let strides = BatchStrides {
            stride_a: ga.packed_stride(),
            stride_b: gb.packed_stride(),
            ..*batch
        };
        (ga, gb, spec, strides)
    }
}

/// How the matrices of a strided-batched GEMM follow one another: product
/// `b` uses `A` at `offset_a + b * stride_a`, and so on. Inputs may overlap
/// (heads interleaved in a packed QKV matrix: stride `head_dim`, leading
/// dimension `3 · hidden`); the `C` blocks of different products must not
/// share elements (interleaved columns are fine), as cuBLAS requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStrides {
    /// Number of products.
    pub count: usize,
    /// Elements between consecutive `A` matrices.
    pub stride_a: usize,
    /// Elements between consecutive `B` matrices.
    pub stride_b: usize,
    /// Elements between consecutive `C` matrices.
    pub stride_c: usize,
}

impl BatchStrides {
    /// A single product.
    pub fn single() -> Self {
        Self {
            count: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }
}

/// Shape of attention probabilities: `batch · heads` blocks of `q_len ×
/// k_len` rows, row-major, example-major (`[batch, heads, q_len, k_len]`),
/// with a key mask of `batch × k_len` values (nonzero: the key is a real
/// token; zero: padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Examples.
    pub batch: usize,
    /// Attention heads.
    pub heads: usize,
    /// Query rows per head.
    pub q_len: usize,
    /// Keys per row.
    pub k_len: usize,
}

impl AttnShape {
    /// Elements of the score or probability tensor.
    pub fn len(&self) -> usize {
        self.batch * self.heads * self.q_len * self.k_len
    }

    /// Whether the tensor is empty (never true for a validated shape).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of the score tensor (`batch · heads · q_len`).
    pub fn rows(&self) -> usize {
        self.batch * self.heads * self.q_len
    }

    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        let dims = [
            ("batch", self.batch),
            ("heads", self.heads),
            ("q_len", self.q_len),
            ("k_len", self.k_len),
        ];
        for (name, v) in dims {
            if v == 0 {
                return Err(Error::Shape {
                    what: op,
                    detail: format!("{name} is 0"),
                });
            }
        }
        self.batch
            .checked_mul(self.heads)
            .and_then(|v| v.checked_mul(self.q_len))
            .and_then(|v| v.checked_mul(self.k_len))
            .map(|_| ())
            .ok_or_else(|| Error::Shape {
                what: op,
                detail: format!("{self:?} overflows usize"),
            })
    }
}

/// LoRA dropout of one adapter's input, drawn as fedsvd-model draws it: the
/// mask of example `first_example + i` comes from
/// `ChaCha8Rng::seed_from_u64(mix(seed ^ mix((stream << 32) | example)))`
/// (`mix` the SplitMix64 finalizer), one `f32` draw `u` per element in
/// row-major order, 0 when `u < p` and `1 / (1 - p)` otherwise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutSpec {
    /// Drop probability, in `[0, 1)`.
    pub p: f32,
    /// The training step's dropout seed.
    pub seed: u64,
    /// The adapter's index (fedsvd-model's `index`), so adapters draw
    /// independent masks.
    pub stream: u32,
    /// Index in the whole batch of the first example of this call.
    pub first_example: u64,
}

impl DropoutSpec {
    /// The multiplier of a kept element, `1 / (1 - p)` in f32.
    pub fn keep(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.p.is_finite() && (0.0..1.0).contains(&self.p) {
            Ok(())
        } else {
            Err(Error::Parameter {
                name: "p",
                value: f64::from(self.p),
                reason: "the dropout probability must be in [0, 1)",
            })
        }
    }
}

/// The frozen embedding tables and the embedding LayerNorm of a BERT-family
/// encoder, all row-major: `word` is `vocab × hidden`, `position`
/// `max_positions × hidden`, `token_type` `type_vocab × hidden`, `gamma` and
/// `beta` `hidden`.
#[derive(Debug, Clone, Copy)]
pub struct Embeddings<'a> {
    /// Word embeddings.
    pub word: &'a Buffer,
    /// Position embeddings; token `t` of an example uses row `t`.
    pub position: &'a Buffer,
    /// Token-type embeddings.
    pub token_type: &'a Buffer,
    /// LayerNorm scale.
    pub gamma: &'a Buffer,
    /// LayerNorm shift.
    pub beta: &'a Buffer,
    /// Width of every table.
    pub hidden: usize,
    /// LayerNorm epsilon (`layer_norm_eps` of the config).
    pub eps: f32,
}

impl Embeddings<'_> {
    /// Checks the tables and the ids; returns (vocab, positions, types).
    pub(crate) fn validate(
        &self,
        ids: &[u32],
        type_ids: &[u32],
        seq: usize,
    ) -> Result<(usize, usize, usize)> {
        const OP: &str = "embed_layer_norm";
        check_eps(self.eps)?;
        let h = self.hidden;
        let rows = check_matrix(OP, ids.len().max(1), h).map(|_| ids.len())?;
        if seq == 0 || rows == 0 || rows % seq != 0 {
            return Err(Error::Shape {
                what: OP,
                detail: format!("{rows} token ids are not a positive multiple of seq = {seq}"),
            });
        }
        check_len("embed_layer_norm: type_ids", rows, type_ids.len())?;
        check_len("embed_layer_norm: gamma", h, self.gamma.len())?;
        check_len("embed_layer_norm: beta", h, self.beta.len())?;
        let table = |what: &'static str, b: &Buffer| -> Result<usize> {
            if b.is_empty() || !b.len().is_multiple_of(h) {
                return Err(Error::Shape {
                    what,
                    detail: format!("{} elements are not whole rows of {h}", b.len()),
                });
            }
            Ok(b.len() / h)
        };
        let vocab = table("embed_layer_norm: word", self.word)?;
        let positions = table("embed_layer_norm: position", self.position)?;
        let types = table("embed_layer_norm: token_type", self.token_type)?;
        if seq > positions {
            return Err(Error::Shape {
                what: OP,
                detail: format!("seq = {seq} exceeds the {positions} position embeddings"),
            });
        }
        let bad = |what: &'static str, ids: &[u32], n: usize| -> Result<()> {
            match ids.iter().position(|&v| v as usize >= n) {
                Some(at) => Err(Error::Shape {
                    what,
                    detail: format!("id {} at position {at} is not below {n}", ids[at]),
                }),
                None => Ok(()),
            }
        };
        bad("embed_layer_norm: ids", ids, vocab)?;
        bad("embed_layer_norm: type_ids", type_ids, types)?;
        Ok((vocab, positions, types))
    }
}

pub(crate) fn check_eps(eps: f32) -> Result<()> {
    if eps.is_finite() && eps > 0.0 {
        Ok(())
    } else {
        Err(Error::Parameter {
            name: "eps",
            value: f64::from(eps),
            reason: "the LayerNorm epsilon must be finite and > 0",
        })
    }
}

pub(crate) fn check_scale(scale: f32) -> Result<()> {
    if scale.is_finite() {
        Ok(())
    } else {
        Err(Error::Parameter {
            name: "scale",
            value: f64::from(scale),
            reason: "the softmax scale must be finite",
        })
    }
}

pub(crate) fn check_labels(labels: &[u32], classes: usize) -> Result<()> {
    match labels.iter().position(|&l| l as usize >= classes) {
        Some(at) => Err(Error::Shape {
            what: "cross_entropy: labels",
            detail: format!(
                "label {} of example {at} is not below {classes} classes",
                labels[at]
            ),
        }),
        None => Ok(()),
    }
}

/// The layer operations of a training step. Buffers hold row-major f32;
/// integer inputs (token ids, labels) are host slices. Outputs are fully
/// overwritten; every length is checked first.
pub trait LayerKernels {
    /// `out[r] = LayerNorm(word[ids[r]] + token_type[type_ids[r]] +
    /// position[r % seq])` for the `ids.len()` tokens of `ids.len() / seq`
    /// examples of `seq` tokens; `mean` and `rstd` receive each row's
    /// statistics.
    #[allow(clippy::too_many_arguments)]
    fn embed_layer_norm(
        &self,
        ids: &[u32],
        type_ids: &[u32],
        seq: usize,
        tables: &Embeddings<'_>,
        out: &mut Buffer,
        mean: &mut Buffer,
        rstd: &mut Buffer,
    ) -> Result<()>;

    /// `y = (x - mean) · rstd · gamma + beta` per row of `rows × hidden`,
    /// `rstd = 1 / sqrt(var + eps)` with the biased variance; saves `mean`
    /// and `rstd` for the backward pass.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;

    /// Gradients of a LayerNorm: `dx` (`rows × hidden`), and
    /// `dgamma = Σ_rows dy · xhat`, `dbeta = Σ_rows dy` (reduced in a fixed
    /// order, no atomics).
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;

    /// `y = gelu(x + bias)` (erf form) over `rows × cols`, `bias` per column.
    fn bias_gelu(
        &self,
        x: &Buffer,
        bias: &Buffer,
        rows: usize,
        cols: usize,
        y: &mut Buffer,
    ) -> Result<()>;

    /// `dx = dy · gelu'(x + bias)`.
    fn bias_gelu_backward(
        &self,
        dy: &Buffer,
        x: &Buffer,
        bias: &Buffer,
        rows: usize,
        cols: usize,
        dx: &mut Buffer,
    ) -> Result<()>;

    /// `p = softmax(scale · s)` over each row of keys, masked keys excluded
    /// (probability exactly 0; a row with every key masked is all 0).
    fn masked_softmax(
        &self,
        scores: &Buffer,
        key_mask: &Buffer,
        shape: AttnShape,
        scale: f32,
        probs: &mut Buffer,
    ) -> Result<()>;

    /// Gradient of the scores: `ds = scale · p · (dp - Σ_j dp_j p_j)`.
    fn masked_softmax_backward(
        &self,
        dprobs: &Buffer,
        probs: &Buffer,
        shape: AttnShape,
        scale: f32,
        dscores: &mut Buffer,
    ) -> Result<()>;

    /// Dropout multipliers for `batch` examples of `per_example` elements
    /// each (see [`DropoutSpec`]).
    fn dropout_mask(
        &self,
        spec: &DropoutSpec,
        batch: usize,
        per_example: usize,
        out: &mut Buffer,
    ) -> Result<()>;

    /// Per-example cross-entropy of `labels.len() × classes` logits:
    /// `losses[i] = logsumexp(z_i) - z_i[label_i]` and
    /// `dlogits_i = softmax(z_i) - onehot(label_i)` (the gradient of
    /// `losses[i]`, not of their mean).
    fn cross_entropy(
        &self,
        logits: &Buffer,
        labels: &[u32],
        classes: usize,
        losses: &mut Buffer,
        dlogits: &mut Buffer,
    ) -> Result<()>;

    /// One GEMM (see [`GemmSpec`]).
    fn gemm(&self, spec: &GemmSpec, a: &Buffer, b: &Buffer, c: &mut Buffer) -> Result<()> {
        self.gemm_strided_batched(spec, &BatchStrides::single(), a, b, c)
    }

    /// `batch.count` GEMMs whose matrices lie `stride_*` elements apart.
    fn gemm_strided_batched(
        &self,
        spec: &GemmSpec,
        batch: &BatchStrides,
        a: &Buffer,
        b: &Buffer,
        c: &mut Buffer,
    ) -> Result<()>;
}

impl Backend {
    fn layers(&self) -> &dyn LayerKernels {
        match self {
            Backend::Cpu(b) => b,
            Backend::Cuda(b) => b,
        }
    }
}

impl LayerKernels for Backend {
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
        self.layers()
            .embed_layer_norm(ids, type_ids, seq, tables, out, mean, rstd)
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
        self.layers()
            .layer_norm(x, gamma, beta, rows, hidden, eps, y, mean, rstd)
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
        self.layers()
            .layer_norm_backward(dy, x, mean, rstd, gamma, rows, hidden, dx, dgamma, dbeta)
    }
    fn bias_gelu(
        &self,
        x: &Buffer,
        bias: &Buffer,
        rows: usize,
        cols: usize,
        y: &mut Buffer,
    ) -> Result<()> {
        self.layers().bias_gelu(x, bias, rows, cols, y)
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
        self.layers()
            .bias_gelu_backward(dy, x, bias, rows, cols, dx)
    }
    fn masked_softmax(
        &self,
        scores: &Buffer,
        key_mask: &Buffer,
        shape: AttnShape,
        scale: f32,
        probs: &mut Buffer,
    ) -> Result<()> {
        self.layers()
            .masked_softmax(scores, key_mask, shape, scale, probs)
    }
    fn masked_softmax_backward(
        &self,
        dprobs: &Buffer,
        probs: &Buffer,
        shape: AttnShape,
        scale: f32,
        dscores: &mut Buffer,
    ) -> Result<()> {
        self.layers()
            .masked_softmax_backward(dprobs, probs, shape, scale, dscores)
    }
    fn dropout_mask(
        &self,
        spec: &DropoutSpec,
        batch: usize,
        per_example: usize,
        out: &mut Buffer,
    ) -> Result<()> {
        self.layers().dropout_mask(spec, batch, per_example, out)
    }
    fn cross_entropy(
        &self,
        logits: &Buffer,
        labels: &[u32],
        classes: usize,
        losses: &mut Buffer,
        dlogits: &mut Buffer,
    ) -> Result<()> {
        self.layers()
            .cross_entropy(logits, labels, classes, losses, dlogits)
    }
    fn gemm_strided_batched(
        &self,
        spec: &GemmSpec,
        batch: &BatchStrides,
        a: &Buffer,
        b: &Buffer,
        c: &mut Buffer,
    ) -> Result<()> {
        self.layers().gemm_strided_batched(spec, batch, a, b, c)
    }
}
