//! The DP-SGD gradient step on a [`fedsvd_kernels::Backend`]: the frozen
//! encoder uploaded once, then for a batch the embeddings, every layer's
//! forward and backward pass, LoRA (`A`, `B` or both trainable, as the CPU
//! model allows), the head, the per-example cross-entropy, the per-example
//! gradients of every trainable factor, their joint norms and the clipped
//! sum, all on the backend; the host receives the sum, the norms, the losses
//! and the logits.
//!
//! The same code runs on the CPU backend of the kernels crate, which is how
//! its agreement with [`Model::gradients`] is tested on machines without a
//! GPU; on the CUDA backend it is the GPU step.
//!
//! Layout: a batch is kept padded (`[batch · seq, width]` row-major). Padded
//! keys are masked out of attention, so padded rows never influence a real
//! row and receive exactly zero gradient; the per-example gradient of a `B`
//! is `Σ_t dY_tᵀ H_t` and that of an `A` is `Σ_t dH_tᵀ x̃_t` (`x̃` the
//! adapter's input after LoRA dropout, `dH = s · dY B`) over the example's
//! rows (padded rows add zero). Both land in the slots of the CPU model's
//! [`ParamLayout`], so norms, clipping, noise and the update see the same
//! vector on either device.
//! Dropout masks come from the kernels' `dropout_mask`, keyed as the CPU
//! model keys them (adapter index, example index in the batch), so the real
//! rows see the same masks as on the CPU.

use std::sync::Arc;

use fedsvd_kernels::{
    AttnShape, Backend, BatchStrides, Buffer, DeviceProbe, DropoutSpec, Elementwise, Embeddings,
    GemmSpec, Kernels, LayerKernels,
};

pub use fedsvd_kernels::Precision;

use crate::error::{Error, Result};
use crate::lora::{HeadConfig, LoraConfig, LoraState, ParamKind, ParamLayout, Pooling, Target};
use crate::model::Model;
use crate::tokenizer::Batch;
use crate::weights::BertWeights;

/// Whether a CUDA device is usable (never panics, also without a driver).
pub fn cuda_available() -> bool {
    matches!(fedsvd_kernels::probe(), DeviceProbe::Devices(_))
}

fn kerr(e: fedsvd_kernels::Error) -> Error {
    Error::Device(e.to_string())
}

/// What one gradient step returns to the host.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuGradients {
    /// `Σ_i w_i g_i` in [`ParamLayout`] order: `w_i = min(1, C/(‖g_i‖ +
    /// 1e-6))` for a clipped sum, 1 for a plain sum.
    pub sum: Vec<f32>,
    /// `‖g_i‖₂` of every example's whole trainable gradient.
    pub norms: Vec<f32>,
    /// Per-example cross-entropy.
    pub losses: Vec<f32>,
    /// `[batch, num_labels]` logits of the training pass.
    pub logits: Vec<f32>,
}

/// A row-major matrix view of a buffer for one GEMM operand.
#[derive(Clone, Copy)]
struct Mat<'a> {
    buf: &'a Buffer,
    ld: usize,
    off: usize,
    trans: bool,
    stride: usize,
}

fn mat(buf: &Buffer, ld: usize) -> Mat<'_> {
    Mat {
        buf,
        ld,
        off: 0,
        trans: false,
        stride: 0,
    }
}

impl Mat<'_> {
    fn t(self) -> Self {
        Self {
            trans: true,
            ..self
        }
    }
    fn at(self, off: usize) -> Self {
        Self { off, ..self }
    }
    fn every(self, stride: usize) -> Self {
        Self { stride, ..self }
    }
}

/// The output of a GEMM: buffer, leading dimension, offset, and the stride
/// between products of a batched call.
struct Out<'a> {
    buf: &'a mut Buffer,
    ld: usize,
    off: usize,
    stride: usize,
}

fn out(buf: &mut Buffer, ld: usize) -> Out<'_> {
    Out {
        buf,
        ld,
        off: 0,
        stride: 0,
    }
}

impl Out<'_> {
    fn at(self, off: usize) -> Self {
        Self { off, ..self }
    }
    fn every(self, stride: usize) -> Self {
        Self { stride, ..self }
    }
}

/// `C = alpha · op(A) op(B) + beta · C`, `count` products (1: a plain GEMM).
#[allow(clippy::too_many_arguments)]
fn gemm(
    be: &Backend,
    precision: Precision,
    (m, n, k): (usize, usize, usize),
    count: usize,
    alpha: f32,
    a: Mat<'_>,
    b: Mat<'_>,
    beta: f32,
    c: Out<'_>,
) -> Result<()> {
    let spec = GemmSpec {
        m,
        n,
        k,
        trans_a: a.trans,
        trans_b: b.trans,
        alpha,
        beta,
        lda: a.ld,
        ldb: b.ld,
        ldc: c.ld,
        offset_a: a.off,
        offset_b: b.off,
        offset_c: c.off,
        precision,
    };
    if count == 1 {
        be.gemm(&spec, a.buf, b.buf, c.buf).map_err(kerr)
    } else {
        let strides = BatchStrides {
            count,
            stride_a: a.stride,
            stride_b: b.stride,
            stride_c: c.stride,
        };
        be.gemm_strided_batched(&spec, &strides, a.buf, b.buf, c.buf)
            .map_err(kerr)
    }
}

struct DevLinear {
    w: Buffer,
    b: Buffer,
}

struct DevLayer {
    qkv: DevLinear,
    attn_out: DevLinear,
    ln1: (Buffer, Buffer),
    inter: DevLinear,
    output: DevLinear,
    ln2: (Buffer, Buffer),
}

struct Frozen {
    word: Buffer,
    position: Buffer,
    token_type: Buffer,
    emb_ln: (Buffer, Buffer),
    layers: Vec<DevLayer>,
    pooler: Option<DevLinear>,
}

/// One adapter on the device.
struct DevAdapter {
    layer: usize,
    target: Target,
    d_in: usize,
    d_out: usize,
    a: Buffer,
    b: Buffer,
    /// Offset of its `A` in the flat layout, when `A` trains.
    a_slot: Option<usize>,
    /// Offset of its `B` in the flat layout, when `B` trains.
    b_slot: Option<usize>,
}

struct DevState {
    adapters: Vec<DevAdapter>,
    head_w: Buffer,
    head_b: Buffer,
    /// Offsets of the classifier's weight and bias in the layout, when the
    /// head trains.
    head_slots: Option<(usize, usize)>,
    layout: ParamLayout,
}

/// Scratch for adapters whose input is `width` wide.
struct Scratch {
    width: usize,
    mask: Buffer,
    tmp: Buffer,
    tmp2: Buffer,
    /// All ones, `[N, width]`, when some `A` trains: without dropout the
    /// adapter's input is copied into its `xa` as `x ⊙ 1` (the backends have
    /// no copy, and the product is exact).
    ones: Option<Buffer>,
}

/// What one layer keeps for the backward pass.
struct Tape {
    qkv: Buffer,
    probs: Buffer,
    r1: Buffer,
    mean1: Buffer,
    rstd1: Buffer,
    inter: Buffer,
    r2: Buffer,
    mean2: Buffer,
    rstd2: Buffer,
}

/// The gradients flowing between layers: `dhead` from the head into the
/// last layer (only the rows the head reads are ever written, the others
/// stay zero from the allocation), then `d[0]` and `d[1]` alternately.
struct DIo {
    dhead: Buffer,
    d: [Buffer; 2],
}

/// Every device buffer of a step for one `(batch, seq)` shape.
struct Workspace {
    batch: usize,
    seq: usize,
    tapes: Vec<Tape>,
    /// `s · dropout(x) Aᵀ` of every adapter, `[N, r]`.
    hs: Vec<Buffer>,
    /// `dropout(x)` of every adapter whose `A` trains, `[N, d_in]`: kept
    /// from the forward pass because `x` itself is overwritten by later
    /// layers before the backward pass reaches the adapter.
    xa: Vec<Option<Buffer>>,
    hid: [Buffer; 2],
    emb_mean: Buffer,
    emb_rstd: Buffer,
    ones: Buffer,
    key_mask: Buffer,
    scores: Buffer,
    ctx: Buffer,
    y1: Buffer,
    g: Buffer,
    scratch: Vec<Scratch>,
    // Backward.
    dio: Option<DIo>,
    dr2: Buffer,
    dg: Buffer,
    dinter: Buffer,
    dy1: Buffer,
    dr1: Buffer,
    dctx: Buffer,
    dqkv: Buffer,
    dprobs: Buffer,
    dh: Buffer,
    dgamma: Buffer,
    dbeta: Buffer,
    // Head.
    pool_w: Buffer,
    z: Buffer,
    pooled: Buffer,
    deriv: Buffer,
    logits: Buffer,
    losses: Buffer,
    dlogits: Buffer,
    dpooled: Buffer,
    dz: Buffer,
    // Per-example gradients.
    grads: Buffer,
    sq_norms: Buffer,
    sum: Buffer,
    bytes: usize,
}

/// The model's dimensions.
#[derive(Clone, Copy)]
struct Dims {
    h: usize,
    ff: usize,
    heads: usize,
    dh: usize,
    rank: usize,
    eps: f32,
}

/// The frozen encoder and the trainable state on a backend, and the
/// buffers of the last batch shape (reused while the shape repeats).
pub struct GpuModel {
    be: Backend,
    model: Model,
    precision: Precision,
    frozen: Frozen,
    frozen_bytes: usize,
    state: Option<DevState>,
    state_bytes: usize,
    ws: Option<Workspace>,
    /// Device memory in use when the model started uploading (the CUDA
    /// context, cuBLAS and anything else already there).
    mem_base: Option<usize>,
    /// The host copy of the state on the device, so an unchanged state is
    /// not uploaded again.
    uploaded: Option<LoraState>,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("backend", &self.be.name())
            .field("precision", &self.precision)
            .field("device_bytes", &self.device_bytes())
            .finish()
    }
}

fn up(be: &Backend, v: &[f32], bytes: &mut usize) -> Result<Buffer> {
    *bytes += v.len() * 4;
    be.upload(v).map_err(kerr)
}

fn linear(be: &Backend, l: &crate::weights::Linear, bytes: &mut usize) -> Result<DevLinear> {
    Ok(DevLinear {
        w: up(be, &l.weight, bytes)?,
        b: up(be, &l.bias, bytes)?,
    })
}

fn dropout_spec(p: f32, seed: u64, stream: usize) -> DropoutSpec {
    DropoutSpec {
        p,
        seed,
        stream: stream as u32,
        first_example: 0,
    }
}

/// Uploads the frozen tensors of `w` (the pooler only where the head uses
/// it); returns them with their size in bytes.
fn upload_frozen(be: &Backend, w: &BertWeights, pooling: Pooling) -> Result<(Frozen, usize)> {
    let mut bytes = 0;
    let mut layers = Vec::with_capacity(w.layers.len());
    for lw in &w.layers {
        layers.push(DevLayer {
            qkv: linear(be, &lw.qkv, &mut bytes)?,
            attn_out: linear(be, &lw.attn_out, &mut bytes)?,
            ln1: (
                up(be, &lw.attn_ln.gamma, &mut bytes)?,
                up(be, &lw.attn_ln.beta, &mut bytes)?,
            ),
            inter: linear(be, &lw.intermediate, &mut bytes)?,
            output: linear(be, &lw.output, &mut bytes)?,
            ln2: (
                up(be, &lw.output_ln.gamma, &mut bytes)?,
                up(be, &lw.output_ln.beta, &mut bytes)?,
            ),
        });
    }
    let pooler = match (&w.pooler, pooling) {
        (Some(p), Pooling::ClsPooler) => Some(linear(be, p, &mut bytes)?),
        _ => None,
    };
    let frozen = Frozen {
        word: up(be, &w.word_embeddings, &mut bytes)?,
        position: up(be, &w.position_embeddings, &mut bytes)?,
        token_type: up(be, &w.token_type_embeddings, &mut bytes)?,
        emb_ln: (
            up(be, &w.embeddings_ln.gamma, &mut bytes)?,
            up(be, &w.embeddings_ln.beta, &mut bytes)?,
        ),
        layers,
        pooler,
    };
    Ok((frozen, bytes))
}

impl GpuModel {
    /// Uploads the frozen encoder of `weights` to `backend`. Whatever
    /// `lora` makes trainable trains, as on the CPU [`Model`]: the `A`
    /// factors, the `B` factors or both, and the classifier head when
    /// `train_head` is on; a configuration that trains nothing is an
    /// [`Error::UnsupportedConfig`].
    /// GEMMs of the encoder run at `precision`; the LoRA products, the
    /// head and the per-example gradients always in f32.
    pub fn new(
        backend: Backend,
        weights: Arc<BertWeights>,
        lora: LoraConfig,
        head: HeadConfig,
        precision: Precision,
    ) -> Result<Self> {
        if !(lora.train_a || lora.train_b || lora.train_head) {
            return Err(Error::UnsupportedConfig(
                "the GPU step needs something to train: the LoRA A or B factors or the head".into(),
            ));
        }
        if lora.targets.is_empty() {
            return Err(Error::InvalidOption(
                "the GPU step needs at least one LoRA target".into(),
            ));
        }
        let model = Model::new(weights, lora, head)?;
        let w = model.weights().clone();
        let c = &w.config;
        if c.hidden_size % c.num_attention_heads != 0 {
            return Err(Error::UnsupportedConfig(format!(
                "hidden size {} is not a multiple of {} heads",
                c.hidden_size, c.num_attention_heads
            )));
        }
        let be = backend;
        let mem_base = match &be {
            Backend::Cuda(c) => c.memory_info().ok().map(|(free, total)| total - free),
            Backend::Cpu(_) => None,
        };
        let (frozen, bytes) = upload_frozen(&be, &w, head.pooling)?;
        if let Backend::Cuda(c) = &be {
            // The peak of `peak_allocated_bytes` starts with the weights in
            // place, where the peer resets PyTorch's.
            c.reset_peak_allocated().map_err(kerr)?;
        }
        Ok(Self {
            be,
            model,
            precision,
            frozen,
            frozen_bytes: bytes,
            state: None,
            state_bytes: 0,
            ws: None,
            mem_base,
            uploaded: None,
        })
    }

    /// Replaces the frozen encoder by `weights` (a model of the same
    /// configuration, e.g. the base plus the deltas FLoRA and FedEx-LoRA
    /// merge each round); nothing is uploaded when they are the weights in
    /// use. The new tensors are uploaded before the old ones are released,
    /// so on an error the engine keeps computing with the old weights.
    pub fn set_weights(&mut self, weights: Arc<BertWeights>) -> Result<()> {
        if Arc::ptr_eq(&weights, self.model.weights()) {
            return Ok(());
        }
        if weights.config != self.model.weights().config {
            return Err(Error::UnsupportedConfig(
                "new frozen weights must have the configuration of the uploaded ones".into(),
            ));
        }
        let model = Model::new(
            weights,
            self.model.lora_config().clone(),
            *self.model.head_config(),
        )?;
        let (frozen, bytes) =
            upload_frozen(&self.be, model.weights(), self.model.head_config().pooling)?;
        self.frozen = frozen;
        self.frozen_bytes = bytes;
        self.model = model;
        Ok(())
    }

    /// [`GpuModel::new`] on CUDA device 0; an error (never a panic) when
    /// there is none.
    pub fn cuda(
        weights: Arc<BertWeights>,
        lora: LoraConfig,
        head: HeadConfig,
        precision: Precision,
    ) -> Result<Self> {
        fedsvd_kernels::CudaEnvironment::observe()
            .check_training(0)
            .map_err(kerr)?;
        let be = Backend::cuda(0).map_err(kerr)?;
        Self::new(be, weights, lora, head, precision)
    }

    /// [`GpuModel::new`] on the kernels' CPU reference backend: the same
    /// code path as on CUDA, for tests and dry runs on machines without one.
    pub fn cpu_reference(
        weights: Arc<BertWeights>,
        lora: LoraConfig,
        head: HeadConfig,
        precision: Precision,
    ) -> Result<Self> {
        Self::new(Backend::cpu(), weights, lora, head, precision)
    }

    /// Whether the backend is a CUDA device (not the CPU reference).
    pub fn is_cuda(&self) -> bool {
        matches!(self.be, Backend::Cuda(_))
    }

    /// Uploads `state` unless it is the state uploaded last.
    pub fn sync_state(&mut self, state: &LoraState) -> Result<()> {
        if self.uploaded.as_ref() == Some(state) {
            return Ok(());
        }
        self.set_state(state)
    }

    /// The backend's name.
    pub fn backend_name(&self) -> String {
        self.be.name()
    }

    /// The CPU model with the same weights and options (for layouts and
    /// state initialization).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// GEMM precision of the encoder.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Bytes of backend memory this model allocated itself: the frozen
    /// weights, the trainable state and the buffers of the current batch
    /// shape (cuBLAS workspaces, bf16 copies of GEMM inputs and the CUDA
    /// context are not counted).
    pub fn device_bytes(&self) -> usize {
        self.frozen_bytes + self.state_bytes + self.ws.as_ref().map_or(0, |w| w.bytes)
    }

    /// The most device memory this model's buffers held at once since it
    /// was created, its weights included: the stream-ordered pool's
    /// used-memory high watermark, which counts what PyTorch's
    /// `max_memory_allocated` counts (live allocations; not the CUDA
    /// context, not cuBLAS's workspace, not freed blocks kept for reuse).
    /// `None` on the CPU backend, or where the driver allocates without a
    /// pool.
    pub fn peak_allocated_bytes(&self) -> Option<usize> {
        match &self.be {
            Backend::Cuda(c) => c.peak_allocated().ok().flatten(),
            Backend::Cpu(_) => None,
        }
    }

    /// Device memory in use now beyond what was in use when this model was
    /// created (`total − free` from the driver, so the CUDA context and
    /// other processes' memory are excluded, while cuBLAS workspaces and the
    /// stream-ordered allocator's cached blocks are included); `None` on the
    /// CPU backend.
    pub fn device_memory_allocated(&self) -> Option<usize> {
        match &self.be {
            Backend::Cuda(c) => c
                .memory_info()
                .ok()
                .map(|(free, total)| (total - free).saturating_sub(self.mem_base.unwrap_or(0))),
            Backend::Cpu(_) => None,
        }
    }

    /// Uploads the adapters and the head of `state` (call again after every
    /// update of the host copy).
    pub fn set_state(&mut self, state: &LoraState) -> Result<()> {
        self.model.check_state(state)?;
        let layout = self.model.layout(state);
        let mut bytes = 0;
        let slot = |kind: ParamKind| {
            layout
                .slots
                .iter()
                .find(|s| s.kind == kind)
                .map(|s| s.offset)
        };
        let mut adapters = Vec::with_capacity(state.adapters.len());
        for (i, ad) in state.adapters.iter().enumerate() {
            adapters.push(DevAdapter {
                layer: ad.layer,
                target: ad.target,
                d_in: ad.d_in,
                d_out: ad.d_out,
                a: up(&self.be, &ad.a, &mut bytes)?,
                b: up(&self.be, &ad.b, &mut bytes)?,
                a_slot: slot(ParamKind::A(i)),
                b_slot: slot(ParamKind::B(i)),
            });
        }
        let head_w = up(&self.be, &state.head_weight, &mut bytes)?;
        let head_b = up(&self.be, &state.head_bias, &mut bytes)?;
        let head_slots = slot(ParamKind::HeadWeight).zip(slot(ParamKind::HeadBias));
        self.state = Some(DevState {
            adapters,
            head_w,
            head_b,
            head_slots,
            layout,
        });
        self.state_bytes = bytes;
        self.uploaded = Some(state.clone());
        Ok(())
    }

    /// The flat layout of the trainable parameters of the uploaded state.
    pub fn layout(&self) -> Option<&ParamLayout> {
        self.state.as_ref().map(|s| &s.layout)
    }

    fn dims(&self) -> Dims {
        let c = &self.model.weights().config;
        Dims {
            h: c.hidden_size,
            ff: c.intermediate_size,
            heads: c.num_attention_heads,
            dh: c.head_dim(),
            rank: self.model.lora_config().rank,
            eps: c.layer_norm_eps as f32,
        }
    }

    fn check_batch(&self, batch: &Batch) -> Result<()> {
        let c = &self.model.weights().config;
        let n = batch.len();
        let total = n * batch.seq_len;
        if batch.input_ids.len() != total
            || batch.token_type_ids.len() != total
            || batch.lengths.len() != n
        {
            return Err(Error::InvalidBatch(format!(
                "arrays must hold {n} x {} values",
                batch.seq_len
            )));
        }
        if batch.seq_len > c.max_position_embeddings {
            return Err(Error::InvalidBatch(format!(
                "sequence length {} exceeds max_position_embeddings {}",
                batch.seq_len, c.max_position_embeddings
            )));
        }
        for i in 0..n {
            let l = batch.lengths[i];
            if l == 0 || l > batch.seq_len {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i} has length {l} (seq_len {})",
                    batch.seq_len
                )));
            }
            if let Some(&id) = batch.ids(i).iter().find(|&&id| id as usize >= c.vocab_size) {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i} has token id {id} >= vocab_size {}",
                    c.vocab_size
                )));
            }
            if let Some(&t) = batch
                .type_ids(i)
                .iter()
                .find(|&&t| t as usize >= c.type_vocab_size)
            {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i} has token type {t} >= type_vocab_size {}",
                    c.type_vocab_size
                )));
            }
        }
        Ok(())
    }

    fn ensure_workspace(&mut self, batch: usize, seq: usize) -> Result<()> {
        if self
            .ws
            .as_ref()
            .is_some_and(|w| w.batch == batch && w.seq == seq)
        {
            return Ok(());
        }
        // Free the old buffers before allocating the new ones.
        self.ws = None;
        let d = self.dims();
        let st = self.state.as_ref().ok_or_else(no_state)?;
        let be = &self.be;
        let n = batch * seq;
        let att = batch * d.heads * seq * seq;
        let classes = self.model.head_config().num_labels;
        let p = st.layout.len;
        let mut bytes = 0usize;
        let mut z = |len: usize| -> Result<Buffer> {
            bytes += len.max(1) * 4;
            be.alloc_zeros(len.max(1)).map_err(kerr)
        };
        let mut tapes = Vec::new();
        for _ in 0..self.frozen.layers.len() {
            tapes.push(Tape {
                qkv: z(n * 3 * d.h)?,
                probs: z(att)?,
                r1: z(n * d.h)?,
                mean1: z(n)?,
                rstd1: z(n)?,
                inter: z(n * d.ff)?,
                r2: z(n * d.h)?,
                mean2: z(n)?,
                rstd2: z(n)?,
            });
        }
        let mut hs = Vec::new();
        let mut xa = Vec::new();
        for ad in &st.adapters {
            hs.push(z(n * d.rank)?);
            xa.push(match ad.a_slot {
                Some(_) => Some(z(n * ad.d_in)?),
                None => None,
            });
        }
        let trains_a = st.adapters.iter().any(|a| a.a_slot.is_some());
        let mut widths: Vec<usize> = st.adapters.iter().map(|a| a.d_in).collect();
        widths.sort_unstable();
        widths.dedup();
        let mut scratch = Vec::new();
        for width in widths {
            scratch.push(Scratch {
                width,
                mask: z(n * width)?,
                tmp: z(n * width)?,
                tmp2: z(n * width)?,
                ones: None,
            });
        }

        let mut ws = Workspace {
            batch,
            seq,
            tapes,
            hs,
            xa,
            hid: [z(n * d.h)?, z(n * d.h)?],
            emb_mean: z(n)?,
            emb_rstd: z(n)?,
            ones: be.upload(&vec![1.0; n]).map_err(kerr)?,
            key_mask: z(n)?,
            scores: z(att)?,
            ctx: z(n * d.h)?,
            y1: z(n * d.h)?,
            g: z(n * d.ff)?,
            scratch,
            dio: Some(DIo {
                dhead: z(n * d.h)?,
                d: [z(n * d.h)?, z(n * d.h)?],
            }),
            dr2: z(n * d.h)?,
            dg: z(n * d.ff)?,
            dinter: z(n * d.ff)?,
            dy1: z(n * d.h)?,
            dr1: z(n * d.h)?,
            dctx: z(n * d.h)?,
            dqkv: z(n * 3 * d.h)?,
            dprobs: z(att)?,
            dh: z(n * d.rank)?,
            dgamma: z(d.h)?,
            dbeta: z(d.h)?,
            pool_w: z(n)?,
            z: z(batch * d.h)?,
            pooled: z(batch * d.h)?,
            deriv: z(batch * d.h)?,
            logits: z(batch * classes)?,
            losses: z(batch)?,
            dlogits: z(batch * classes)?,
            dpooled: z(batch * d.h)?,
            dz: z(batch * d.h)?,
            grads: z(batch * p)?,
            sq_norms: z(batch)?,
            sum: z(p)?,
            bytes: 0,
        };
        if trains_a {
            for sc in &mut ws.scratch {
                bytes += n * sc.width * 4;
                sc.ones = Some(be.upload(&vec![1.0; n * sc.width]).map_err(kerr)?);
            }
        }
        self.ws = Some(Workspace {
            bytes: bytes + n * 4,
            ..ws
        });
        Ok(())
    }

    /// Logits `[batch, num_labels]` in evaluation mode (no dropout) for the
    /// uploaded state.
    pub fn logits(&mut self, batch: &Batch) -> Result<Vec<f32>> {
        self.check_batch(batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.ensure_workspace(batch.len(), batch.seq_len)?;
        let mut ws = self.ws.take().ok_or_else(no_state)?;
        let r = self.forward(&mut ws, batch, None, false);
        let r = r.and_then(|()| self.be.download(&ws.logits).map_err(kerr));
        self.ws = Some(ws);
        r
    }

    /// The DP-SGD clipped sum `Σ_i min(1, C/(‖g_i‖ + 1e-6)) g_i` of the
    /// per-example gradients of every trainable tensor (`B`, `A` where it
    /// trains, the head) in [`ParamLayout`] order (as [`crate::Gradients::clipped_sum`]),
    /// with the norms, losses and logits. `dropout_seed` draws the LoRA
    /// dropout masks as [`Model::gradients`] does (`None`: no dropout).
    pub fn clipped_sum(
        &mut self,
        batch: &Batch,
        labels: &[usize],
        clip: f32,
        dropout_seed: Option<u64>,
    ) -> Result<GpuGradients> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(Error::InvalidOption(format!(
                "clipping norm must be positive, got {clip}"
            )));
        }
        self.step(batch, labels, Some(clip), dropout_seed)
    }

    /// The plain sum `Σ_i g_i` (no clipping), with the norms, losses and
    /// logits: the non-private step.
    pub fn sum(
        &mut self,
        batch: &Batch,
        labels: &[usize],
        dropout_seed: Option<u64>,
    ) -> Result<GpuGradients> {
        self.step(batch, labels, None, dropout_seed)
    }

    /// Every example's gradient, `[batch, P]` row-major in [`ParamLayout`]
    /// order (as [`Model::per_example_gradients`]): the matrix the norms and
    /// the clipped sum are computed from, downloaded whole, for checks of
    /// each slot against the CPU model.
    pub fn per_example_gradients(
        &mut self,
        batch: &Batch,
        labels: &[usize],
        dropout_seed: Option<u64>,
    ) -> Result<Vec<f32>> {
        self.step(batch, labels, None, dropout_seed)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let p = self.state.as_ref().ok_or_else(no_state)?.layout.len;
        let ws = self.ws.as_ref().ok_or_else(no_state)?;
        let mut g = self.be.download(&ws.grads).map_err(kerr)?;
        // The buffer holds at least one value even when P is 0.
        g.truncate(batch.len() * p);
        Ok(g)
    }

    fn step(
        &mut self,
        batch: &Batch,
        labels: &[usize],
        clip: Option<f32>,
        dropout_seed: Option<u64>,
    ) -> Result<GpuGradients> {
        self.check_batch(batch)?;
        let classes = self.model.head_config().num_labels;
        if labels.len() != batch.len() {
            return Err(Error::LengthMismatch {
                what: "labels".into(),
                expected: batch.len(),
                found: labels.len(),
            });
        }
        if let Some(&y) = labels.iter().find(|&&y| y >= classes) {
            return Err(Error::InvalidBatch(format!(
                "label {y} out of range for {classes} classes"
            )));
        }
        let p = self.state.as_ref().ok_or_else(no_state)?.layout.len;
        if batch.is_empty() {
            return Ok(GpuGradients {
                sum: vec![0.0; p],
                norms: Vec::new(),
                losses: Vec::new(),
                logits: Vec::new(),
            });
        }
        self.ensure_workspace(batch.len(), batch.seq_len)?;
        let mut ws = self.ws.take().ok_or_else(no_state)?;
        let dropout = dropout_seed
            .filter(|_| self.model.lora_config().dropout > 0.0)
            .map(|s| (self.model.lora_config().dropout, s));
        let r = self.train_pass(&mut ws, batch, labels, clip, dropout);
        self.ws = Some(ws);
        r
    }

    fn train_pass(
        &self,
        ws: &mut Workspace,
        batch: &Batch,
        labels: &[usize],
        clip: Option<f32>,
        dropout: Option<(f32, u64)>,
    ) -> Result<GpuGradients> {
        let be = &self.be;
        let st = self.state.as_ref().ok_or_else(no_state)?;
        let (bsz, seq) = (batch.len(), batch.seq_len);
        self.forward(ws, batch, dropout, true)?;
        let labels32: Vec<u32> = labels.iter().map(|&y| y as u32).collect();
        let classes = self.model.head_config().num_labels;
        be.cross_entropy(
            &ws.logits,
            &labels32,
            classes,
            &mut ws.losses,
            &mut ws.dlogits,
        )
        .map_err(kerr)?;
        // The head's gradient feeds the last layer; then the two buffers of
        // `d` alternate. They live outside the workspace so a layer can
        // borrow the rest of it mutably.
        let mut dio = ws.dio.take().ok_or_else(no_state)?;
        let r = self.backward(ws, &mut dio, bsz, seq, dropout);
        ws.dio = Some(dio);
        r?;
        let p = st.layout.len;
        be.row_sq_norms(&ws.grads, bsz, p, &mut ws.sq_norms)
            .map_err(kerr)?;
        let sq = be.download(&ws.sq_norms).map_err(kerr)?;
        let norms: Vec<f32> = sq.iter().map(|v| v.max(0.0).sqrt()).collect();
        let weights: Vec<f32> = match clip {
            Some(c) => norms.iter().map(|&v| (c / (v + 1e-6)).min(1.0)).collect(),
            None => vec![1.0; bsz],
        };
        let w = be.upload(&weights).map_err(kerr)?;
        gemm(
            be,
            Precision::F32,
            (1, p, bsz),
            1,
            1.0,
            mat(&w, bsz),
            mat(&ws.grads, p),
            0.0,
            out(&mut ws.sum, p),
        )?;
        let sum = be.download(&ws.sum).map_err(kerr)?;
        let losses = be.download(&ws.losses).map_err(kerr)?;
        let logits = be.download(&ws.logits).map_err(kerr)?;
        Ok(GpuGradients {
            sum,
            norms,
            losses,
            logits,
        })
    }

    fn backward(
        &self,
        ws: &mut Workspace,
        dio: &mut DIo,
        bsz: usize,
        seq: usize,
        dropout: Option<(f32, u64)>,
    ) -> Result<()> {
        self.head_backward(ws, &mut dio.dhead, bsz, seq)?;
        let st = self.state.as_ref().ok_or_else(no_state)?;
        if st
            .adapters
            .iter()
            .all(|a| a.a_slot.is_none() && a.b_slot.is_none())
        {
            // Only the head trains: nothing below it has a gradient to keep.
            return Ok(());
        }
        let layers = self.frozen.layers.len();
        for l in (0..layers).rev() {
            let (a, b) = dio.d.split_at_mut(1);
            let (dout, dx): (&Buffer, &mut Buffer) = if l + 1 == layers {
                (&dio.dhead, if l % 2 == 0 { &mut a[0] } else { &mut b[0] })
            } else if l % 2 == 0 {
                (&b[0], &mut a[0])
            } else {
                (&a[0], &mut b[0])
            };
            self.layer_backward(l, ws, dout, dx, l > 0, dropout)?;
        }
        Ok(())
    }

    /// Embeddings, every layer and the head up to the logits. `train`:
    /// keep what the backward pass needs beyond the tapes (the inputs of
    /// the adapters whose `A` trains).
    fn forward(
        &self,
        ws: &mut Workspace,
        batch: &Batch,
        dropout: Option<(f32, u64)>,
        train: bool,
    ) -> Result<()> {
        let be = &self.be;
        let d = self.dims();
        let (bsz, seq) = (batch.len(), batch.seq_len);
        let n = bsz * seq;
        // Padded positions get id 0 and type 0 (always valid rows); the key
        // mask keeps them out of every real row.
        let mut ids = vec![0u32; n];
        let mut types = vec![0u32; n];
        let mut key = vec![0f32; n];
        let mut pool = vec![0f32; n];
        for i in 0..bsz {
            let l = batch.lengths[i];
            ids[i * seq..i * seq + l].copy_from_slice(batch.ids(i));
            types[i * seq..i * seq + l].copy_from_slice(batch.type_ids(i));
            key[i * seq..i * seq + l].iter_mut().for_each(|v| *v = 1.0);
            let inv = 1.0 / l as f32;
            pool[i * seq..i * seq + l].iter_mut().for_each(|v| *v = inv);
        }
        ws.key_mask = be.upload(&key).map_err(kerr)?;
        ws.pool_w = be.upload(&pool).map_err(kerr)?;
        let f = &self.frozen;
        let tables = Embeddings {
            word: &f.word,
            position: &f.position,
            token_type: &f.token_type,
            gamma: &f.emb_ln.0,
            beta: &f.emb_ln.1,
            hidden: d.h,
            eps: d.eps,
        };
        be.embed_layer_norm(
            &ids,
            &types,
            seq,
            &tables,
            &mut ws.hid[0],
            &mut ws.emb_mean,
            &mut ws.emb_rstd,
        )
        .map_err(kerr)?;
        for l in 0..f.layers.len() {
            self.layer_forward(l, ws, bsz, seq, dropout, train)?;
        }
        self.head_forward(ws, bsz, seq)
    }

    #[allow(clippy::too_many_arguments)]
    fn adapter_forward(
        &self,
        ai: usize,
        x: &Buffer,
        y: Out<'_>,
        hs: &mut Buffer,
        xa: Option<&mut Buffer>,
        scratch: &mut [Scratch],
        n: usize,
        bsz: usize,
        dropout: Option<(f32, u64)>,
    ) -> Result<()> {
        let be = &self.be;
        let st = self.state.as_ref().ok_or_else(no_state)?;
        let ad = &st.adapters[ai];
        let r = self.model.lora_config().rank;
        let s = self.model.lora_config().scale();
        let sc = scratch
            .iter_mut()
            .find(|sc| sc.width == ad.d_in)
            .ok_or_else(no_state)?;
        // `xa` (when A trains) receives dropout(x), which A's per-example
        // gradient reads in the backward pass.
        let input: &Buffer = match (dropout, xa) {
            (Some((p, seed)), xa) => {
                be.dropout_mask(
                    &dropout_spec(p, seed, ai),
                    bsz,
                    (n / bsz) * ad.d_in,
                    &mut sc.mask,
                )
                .map_err(kerr)?;
                let dst = match xa {
                    Some(xa) => xa,
                    None => &mut sc.tmp,
                };
                be.mul(x, &sc.mask, dst).map_err(kerr)?;
                &*dst
            }
            (None, Some(xa)) => {
                let ones = sc.ones.as_ref().ok_or_else(no_state)?;
                be.mul(x, ones, xa).map_err(kerr)?;
                x
            }
            (None, None) => x,
        };
        // Hs = s · dropout(x) Aᵀ, [n, r]
        gemm(
            be,
            Precision::F32,
            (n, r, ad.d_in),
            1,
            s,
            mat(input, ad.d_in),
            mat(&ad.a, ad.d_in).t(),
            0.0,
            out(hs, r),
        )?;
        // y[:, col0..col0 + d_out] += Hs Bᵀ
        gemm(
            be,
            Precision::F32,
            (n, ad.d_out, r),
            1,
            1.0,
            mat(hs, r),
            mat(&ad.b, r).t(),
            1.0,
            y,
        )
    }

    /// Per-example gradients of adapter `ai`'s trainable factors from the
    /// gradient of its projection output (`dy`, columns from `col0`, row
    /// stride `ld`), and its contribution to the input gradient `dx` when
    /// given. `xa` holds the adapter's input after dropout when `A` trains.
    #[allow(clippy::too_many_arguments)]
    fn adapter_backward(
        &self,
        ai: usize,
        dy: &Buffer,
        ld: usize,
        col0: usize,
        dx: Option<&mut Buffer>,
        ws_hs: &Buffer,
        xa: Option<&Buffer>,
        dh: &mut Buffer,
        grads: &mut Buffer,
        scratch: &mut [Scratch],
        (bsz, seq): (usize, usize),
        dropout: Option<(f32, u64)>,
    ) -> Result<()> {
        let be = &self.be;
        let st = self.state.as_ref().ok_or_else(no_state)?;
        let ad = &st.adapters[ai];
        let r = self.model.lora_config().rank;
        let s = self.model.lora_config().scale();
        let n = bsz * seq;
        let p = st.layout.len;
        if let Some(slot) = ad.b_slot {
            // g_i = Σ_t dY_tᵀ Hs_t: one [d_out, r] block per example in row
            // i of the [batch, P] gradient matrix.
            gemm(
                be,
                Precision::F32,
                (ad.d_out, r, seq),
                bsz,
                1.0,
                mat(dy, ld).at(col0).t().every(seq * ld),
                mat(ws_hs, r).every(seq * r),
                0.0,
                Out {
                    buf: grads,
                    ld: r,
                    off: slot,
                    stride: p,
                },
            )?;
        }
        // dH is needed for A's gradient even where no input gradient is
        // (the first layer's query, key and value).
        let a_grad = match (ad.a_slot, xa) {
            (Some(slot), Some(xa)) => Some((slot, xa)),
            (None, _) => None,
            (Some(_), None) => {
                return Err(Error::Device(format!(
                    "the input of adapter {ai}, whose A trains, was not kept by the forward pass"
                )));
            }
        };
        if dx.is_none() && a_grad.is_none() {
            return Ok(());
        }
        // dH = s · dY B, [n, r]
        gemm(
            be,
            Precision::F32,
            (n, r, ad.d_out),
            1,
            s,
            mat(dy, ld).at(col0),
            mat(&ad.b, r),
            0.0,
            out(dh, r),
        )?;
        if let Some((slot, xa)) = a_grad {
            // g_i = Σ_t dH_tᵀ dropout(x)_t: one [r, d_in] block per example.
            gemm(
                be,
                Precision::F32,
                (r, ad.d_in, seq),
                bsz,
                1.0,
                mat(dh, r).t().every(seq * r),
                mat(xa, ad.d_in).every(seq * ad.d_in),
                0.0,
                Out {
                    buf: grads,
                    ld: ad.d_in,
                    off: slot,
                    stride: p,
                },
            )?;
        }
        let Some(dx) = dx else {
            return Ok(());
        };
        match dropout {
            None => gemm(
                be,
                Precision::F32,
                (n, ad.d_in, r),
                1,
                1.0,
                mat(dh, r),
                mat(&ad.a, ad.d_in),
                1.0,
                out(dx, ad.d_in),
            ),
            Some((p, seed)) => {
                let sc = scratch
                    .iter_mut()
                    .find(|sc| sc.width == ad.d_in)
                    .ok_or_else(no_state)?;
                gemm(
                    be,
                    Precision::F32,
                    (n, ad.d_in, r),
                    1,
                    1.0,
                    mat(dh, r),
                    mat(&ad.a, ad.d_in),
                    0.0,
                    out(&mut sc.tmp, ad.d_in),
                )?;
                // The same mask as the forward pass, drawn again.
                be.dropout_mask(&dropout_spec(p, seed, ai), bsz, seq * ad.d_in, &mut sc.mask)
                    .map_err(kerr)?;
                be.mul(&sc.tmp, &sc.mask, &mut sc.tmp2).map_err(kerr)?;
                be.axpy(1.0, &sc.tmp2, dx).map_err(kerr)
            }
        }
    }

    fn adapters_of(&self, l: usize, targets: &[Target]) -> Vec<(usize, Target)> {
        self.state.as_ref().map_or_else(Vec::new, |st| {
            st.adapters
                .iter()
                .enumerate()
                .filter(|(_, a)| a.layer == l && targets.contains(&a.target))
                .map(|(i, a)| (i, a.target))
                .collect()
        })
    }

    /// `y = x Wᵀ + b` into `y` (`[n, d_out]`).
    fn dense(
        &self,
        lin: &DevLinear,
        x: &Buffer,
        (n, d_in, d_out): (usize, usize, usize),
        ones: &Buffer,
        y: &mut Buffer,
        with_bias: bool,
    ) -> Result<()> {
        let be = &self.be;
        let beta = if with_bias {
            gemm(
                be,
                Precision::F32,
                (n, d_out, 1),
                1,
                1.0,
                mat(ones, 1),
                mat(&lin.b, d_out),
                0.0,
                out(y, d_out),
            )?;
            1.0
        } else {
            0.0
        };
        gemm(
            be,
            self.precision,
            (n, d_out, d_in),
            1,
            1.0,
            mat(x, d_in),
            mat(&lin.w, d_in).t(),
            beta,
            out(y, d_out),
        )
    }

    fn layer_forward(
        &self,
        l: usize,
        ws: &mut Workspace,
        bsz: usize,
        seq: usize,
        dropout: Option<(f32, u64)>,
        train: bool,
    ) -> Result<()> {
        let be = &self.be;
        let d = self.dims();
        let (h, ff) = (d.h, d.ff);
        let n = bsz * seq;
        let lw = &self.frozen.layers[l];
        let cur = l % 2;
        let (x, next) = {
            let (a, b) = ws.hid.split_at_mut(1);
            if cur == 0 {
                (&a[0], &mut b[0])
            } else {
                (&b[0], &mut a[0])
            }
        };
        let tape = &mut ws.tapes[l];
        self.dense(&lw.qkv, x, (n, h, 3 * h), &ws.ones, &mut tape.qkv, true)?;
        for (ai, target) in self.adapters_of(l, &[Target::Query, Target::Key, Target::Value]) {
            let col0 = match target {
                Target::Query => 0,
                Target::Key => h,
                _ => 2 * h,
            };
            self.adapter_forward(
                ai,
                x,
                out(&mut tape.qkv, 3 * h).at(col0),
                &mut ws.hs[ai],
                if train { ws.xa[ai].as_mut() } else { None },
                &mut ws.scratch,
                n,
                bsz,
                dropout,
            )?;
        }
        // Attention, one head of every example per batched GEMM.
        let tt = seq * seq;
        let shape = AttnShape {
            batch: bsz,
            heads: d.heads,
            q_len: seq,
            k_len: seq,
        };
        for hd in 0..d.heads {
            gemm(
                be,
                self.precision,
                (seq, seq, d.dh),
                bsz,
                1.0,
                mat(&tape.qkv, 3 * h).at(hd * d.dh).every(seq * 3 * h),
                mat(&tape.qkv, 3 * h)
                    .at(h + hd * d.dh)
                    .t()
                    .every(seq * 3 * h),
                0.0,
                out(&mut ws.scores, seq).at(hd * tt).every(d.heads * tt),
            )?;
        }
        let scale = 1.0 / (d.dh as f32).sqrt();
        be.masked_softmax(&ws.scores, &ws.key_mask, shape, scale, &mut tape.probs)
            .map_err(kerr)?;
        for hd in 0..d.heads {
            gemm(
                be,
                self.precision,
                (seq, d.dh, seq),
                bsz,
                1.0,
                mat(&tape.probs, seq).at(hd * tt).every(d.heads * tt),
                mat(&tape.qkv, 3 * h)
                    .at(2 * h + hd * d.dh)
                    .every(seq * 3 * h),
                0.0,
                out(&mut ws.ctx, h).at(hd * d.dh).every(seq * h),
            )?;
        }
        self.dense(
            &lw.attn_out,
            &ws.ctx,
            (n, h, h),
            &ws.ones,
            &mut tape.r1,
            true,
        )?;
        for (ai, _) in self.adapters_of(l, &[Target::AttentionOutput]) {
            self.adapter_forward(
                ai,
                &ws.ctx,
                out(&mut tape.r1, h),
                &mut ws.hs[ai],
                if train { ws.xa[ai].as_mut() } else { None },
                &mut ws.scratch,
                n,
                bsz,
                dropout,
            )?;
        }
        be.axpy(1.0, x, &mut tape.r1).map_err(kerr)?;
        be.layer_norm(
            &tape.r1,
            &lw.ln1.0,
            &lw.ln1.1,
            n,
            h,
            d.eps,
            &mut ws.y1,
            &mut tape.mean1,
            &mut tape.rstd1,
        )
        .map_err(kerr)?;
        // The intermediate bias is added inside bias_gelu.
        self.dense(
            &lw.inter,
            &ws.y1,
            (n, h, ff),
            &ws.ones,
            &mut tape.inter,
            false,
        )?;
        for (ai, _) in self.adapters_of(l, &[Target::Intermediate]) {
            self.adapter_forward(
                ai,
                &ws.y1,
                out(&mut tape.inter, ff),
                &mut ws.hs[ai],
                if train { ws.xa[ai].as_mut() } else { None },
                &mut ws.scratch,
                n,
                bsz,
                dropout,
            )?;
        }
        be.bias_gelu(&tape.inter, &lw.inter.b, n, ff, &mut ws.g)
            .map_err(kerr)?;
        self.dense(&lw.output, &ws.g, (n, ff, h), &ws.ones, &mut tape.r2, true)?;
        for (ai, _) in self.adapters_of(l, &[Target::Output]) {
            self.adapter_forward(
                ai,
                &ws.g,
                out(&mut tape.r2, h),
                &mut ws.hs[ai],
                if train { ws.xa[ai].as_mut() } else { None },
                &mut ws.scratch,
                n,
                bsz,
                dropout,
            )?;
        }
        be.axpy(1.0, &ws.y1, &mut tape.r2).map_err(kerr)?;
        be.layer_norm(
            &tape.r2,
            &lw.ln2.0,
            &lw.ln2.1,
            n,
            h,
            d.eps,
            next,
            &mut tape.mean2,
            &mut tape.rstd2,
        )
        .map_err(kerr)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        ws: &mut Workspace,
        dout: &Buffer,
        dx: &mut Buffer,
        need_dx: bool,
        dropout: Option<(f32, u64)>,
    ) -> Result<()> {
        let be = &self.be;
        let d = self.dims();
        let (h, ff) = (d.h, d.ff);
        let (bsz, seq) = (ws.batch, ws.seq);
        let n = bsz * seq;
        let lw = &self.frozen.layers[l];
        let tape = &ws.tapes[l];
        let prec = self.precision;
        be.layer_norm_backward(
            dout,
            &tape.r2,
            &tape.mean2,
            &tape.rstd2,
            &lw.ln2.0,
            n,
            h,
            &mut ws.dr2,
            &mut ws.dgamma,
            &mut ws.dbeta,
        )
        .map_err(kerr)?;
        // dG = dR2 W_out ([h, ff])
        gemm(
            be,
            prec,
            (n, ff, h),
            1,
            1.0,
            mat(&ws.dr2, h),
            mat(&lw.output.w, ff),
            0.0,
            out(&mut ws.dg, ff),
        )?;
        for (ai, _) in self.adapters_of(l, &[Target::Output]) {
            self.adapter_backward(
                ai,
                &ws.dr2,
                h,
                0,
                Some(&mut ws.dg),
                &ws.hs[ai],
                ws.xa[ai].as_ref(),
                &mut ws.dh,
                &mut ws.grads,
                &mut ws.scratch,
                (bsz, seq),
                dropout,
            )?;
        }
        be.bias_gelu_backward(&ws.dg, &tape.inter, &lw.inter.b, n, ff, &mut ws.dinter)
            .map_err(kerr)?;
        // dY1 = dInter W_inter ([ff, h]) + adapters + dR2
        gemm(
            be,
            prec,
            (n, h, ff),
            1,
            1.0,
            mat(&ws.dinter, ff),
            mat(&lw.inter.w, h),
            0.0,
            out(&mut ws.dy1, h),
        )?;
        for (ai, _) in self.adapters_of(l, &[Target::Intermediate]) {
            self.adapter_backward(
                ai,
                &ws.dinter,
                ff,
                0,
                Some(&mut ws.dy1),
                &ws.hs[ai],
                ws.xa[ai].as_ref(),
                &mut ws.dh,
                &mut ws.grads,
                &mut ws.scratch,
                (bsz, seq),
                dropout,
            )?;
        }
        be.axpy(1.0, &ws.dr2, &mut ws.dy1).map_err(kerr)?;
        be.layer_norm_backward(
            &ws.dy1,
            &tape.r1,
            &tape.mean1,
            &tape.rstd1,
            &lw.ln1.0,
            n,
            h,
            &mut ws.dr1,
            &mut ws.dgamma,
            &mut ws.dbeta,
        )
        .map_err(kerr)?;
        // dCtx = dR1 W_o ([h, h]) + adapter
        gemm(
            be,
            prec,
            (n, h, h),
            1,
            1.0,
            mat(&ws.dr1, h),
            mat(&lw.attn_out.w, h),
            0.0,
            out(&mut ws.dctx, h),
        )?;
        for (ai, _) in self.adapters_of(l, &[Target::AttentionOutput]) {
            self.adapter_backward(
                ai,
                &ws.dr1,
                h,
                0,
                Some(&mut ws.dctx),
                &ws.hs[ai],
                ws.xa[ai].as_ref(),
                &mut ws.dh,
                &mut ws.grads,
                &mut ws.scratch,
                (bsz, seq),
                dropout,
            )?;
        }
        // Attention backward.
        let tt = seq * seq;
        let shape = AttnShape {
            batch: bsz,
            heads: d.heads,
            q_len: seq,
            k_len: seq,
        };
        for hd in 0..d.heads {
            // dP = dCtx_h V_hᵀ
            gemm(
                be,
                prec,
                (seq, seq, d.dh),
                bsz,
                1.0,
                mat(&ws.dctx, h).at(hd * d.dh).every(seq * h),
                mat(&tape.qkv, 3 * h)
                    .at(2 * h + hd * d.dh)
                    .t()
                    .every(seq * 3 * h),
                0.0,
                out(&mut ws.dprobs, seq).at(hd * tt).every(d.heads * tt),
            )?;
            // dV_h = P_hᵀ dCtx_h
            gemm(
                be,
                prec,
                (seq, d.dh, seq),
                bsz,
                1.0,
                mat(&tape.probs, seq).at(hd * tt).t().every(d.heads * tt),
                mat(&ws.dctx, h).at(hd * d.dh).every(seq * h),
                0.0,
                out(&mut ws.dqkv, 3 * h)
                    .at(2 * h + hd * d.dh)
                    .every(seq * 3 * h),
            )?;
        }
        let scale = 1.0 / (d.dh as f32).sqrt();
        be.masked_softmax_backward(&ws.dprobs, &tape.probs, shape, scale, &mut ws.scores)
            .map_err(kerr)?;
        let ds = &ws.scores;
        for hd in 0..d.heads {
            // dQ_h = dS_h K_h
            gemm(
                be,
                prec,
                (seq, d.dh, seq),
                bsz,
                1.0,
                mat(ds, seq).at(hd * tt).every(d.heads * tt),
                mat(&tape.qkv, 3 * h).at(h + hd * d.dh).every(seq * 3 * h),
                0.0,
                out(&mut ws.dqkv, 3 * h).at(hd * d.dh).every(seq * 3 * h),
            )?;
            // dK_h = dS_hᵀ Q_h
            gemm(
                be,
                prec,
                (seq, d.dh, seq),
                bsz,
                1.0,
                mat(ds, seq).at(hd * tt).t().every(d.heads * tt),
                mat(&tape.qkv, 3 * h).at(hd * d.dh).every(seq * 3 * h),
                0.0,
                out(&mut ws.dqkv, 3 * h)
                    .at(h + hd * d.dh)
                    .every(seq * 3 * h),
            )?;
        }
        if need_dx {
            // dX = dQKV W_qkv ([3h, h]) + adapters + dR1
            gemm(
                be,
                prec,
                (n, h, 3 * h),
                1,
                1.0,
                mat(&ws.dqkv, 3 * h),
                mat(&lw.qkv.w, h),
                0.0,
                out(dx, h),
            )?;
        }
        for (ai, target) in self.adapters_of(l, &[Target::Query, Target::Key, Target::Value]) {
            let col0 = match target {
                Target::Query => 0,
                Target::Key => h,
                _ => 2 * h,
            };
            self.adapter_backward(
                ai,
                &ws.dqkv,
                3 * h,
                col0,
                if need_dx { Some(&mut *dx) } else { None },
                &ws.hs[ai],
                ws.xa[ai].as_ref(),
                &mut ws.dh,
                &mut ws.grads,
                &mut ws.scratch,
                (bsz, seq),
                dropout,
            )?;
        }
        if need_dx {
            be.axpy(1.0, &ws.dr1, dx).map_err(kerr)?;
        }
        Ok(())
    }

    /// Pooling, the pooler (its tanh on the host: `[batch, h]` values) and
    /// the classifier, into `ws.logits`.
    fn head_forward(&self, ws: &mut Workspace, bsz: usize, seq: usize) -> Result<()> {
        let be = &self.be;
        let st = self.state.as_ref().ok_or_else(no_state)?;
        let d = self.dims();
        let h = d.h;
        let classes = self.model.head_config().num_labels;
        let last = self.frozen.layers.len() % 2;
        let hidden = &ws.hid[last];
        match &self.frozen.pooler {
            Some(pooler) => {
                // z = h_[CLS] W_pᵀ + b_p; the [CLS] rows are `seq · h` apart.
                let ones = &ws.ones;
                gemm(
                    be,
                    Precision::F32,
                    (bsz, h, 1),
                    1,
                    1.0,
                    mat(ones, 1),
                    mat(&pooler.b, h),
                    0.0,
                    out(&mut ws.z, h),
                )?;
                gemm(
                    be,
                    Precision::F32,
                    (bsz, h, h),
                    1,
                    1.0,
                    mat(hidden, seq * h),
                    mat(&pooler.w, h).t(),
                    1.0,
                    out(&mut ws.z, h),
                )?;
                let z = be.download(&ws.z).map_err(kerr)?;
                let pooled: Vec<f32> = z.iter().map(|v| v.tanh()).collect();
                let deriv: Vec<f32> = pooled.iter().map(|t| 1.0 - t * t).collect();
                ws.pooled = be.upload(&pooled).map_err(kerr)?;
                ws.deriv = be.upload(&deriv).map_err(kerr)?;
            }
            None => {
                // pooled_i = Σ_t w_it h_it, w = 1/len on real tokens.
                gemm(
                    be,
                    Precision::F32,
                    (1, h, seq),
                    bsz,
                    1.0,
                    mat(&ws.pool_w, seq).every(seq),
                    mat(hidden, h).every(seq * h),
                    0.0,
                    out(&mut ws.pooled, h).every(h),
                )?;
            }
        }
        gemm(
            be,
            Precision::F32,
            (bsz, classes, 1),
            1,
            1.0,
            mat(&ws.ones, 1),
            mat(&st.head_b, classes),
            0.0,
            out(&mut ws.logits, classes),
        )?;
        gemm(
            be,
            Precision::F32,
            (bsz, classes, h),
            1,
            1.0,
            mat(&ws.pooled, h),
            mat(&st.head_w, h).t(),
            1.0,
            out(&mut ws.logits, classes),
        )
    }

    /// From `ws.dlogits` to the gradient of the final hidden states in
    /// `ws.dhead` (zero on every row the head does not read).
    fn head_backward(
        &self,
        ws: &mut Workspace,
        dhead: &mut Buffer,
        bsz: usize,
        seq: usize,
    ) -> Result<()> {
        let be = &self.be;
        let st = self.state.as_ref().ok_or_else(no_state)?;
        let h = self.dims().h;
        let classes = self.model.head_config().num_labels;
        if let Some((w_slot, b_slot)) = st.head_slots {
            let p = st.layout.len;
            // Per example: dW_i = dlogits_iᵀ pooled_i ([classes, h]) and
            // db_i = dlogits_i, into example i's row of the gradients.
            gemm(
                be,
                Precision::F32,
                (classes, h, 1),
                bsz,
                1.0,
                mat(&ws.dlogits, 1).every(classes),
                mat(&ws.pooled, h).every(h),
                0.0,
                Out {
                    buf: &mut ws.grads,
                    ld: h,
                    off: w_slot,
                    stride: p,
                },
            )?;
            gemm(
                be,
                Precision::F32,
                (1, classes, 1),
                bsz,
                1.0,
                mat(&ws.ones, 1),
                mat(&ws.dlogits, classes).every(classes),
                0.0,
                Out {
                    buf: &mut ws.grads,
                    ld: classes,
                    off: b_slot,
                    stride: p,
                },
            )?;
        }
        gemm(
            be,
            Precision::F32,
            (bsz, h, classes),
            1,
            1.0,
            mat(&ws.dlogits, classes),
            mat(&st.head_w, h),
            0.0,
            out(&mut ws.dpooled, h),
        )?;
        match &self.frozen.pooler {
            Some(pooler) => {
                be.mul(&ws.dpooled, &ws.deriv, &mut ws.dz).map_err(kerr)?;
                // Only the [CLS] rows are written; the others stay zero from
                // the allocation (nothing else writes this buffer).
                gemm(
                    be,
                    Precision::F32,
                    (bsz, h, h),
                    1,
                    1.0,
                    mat(&ws.dz, h),
                    mat(&pooler.w, h),
                    0.0,
                    Out {
                        buf: dhead,
                        ld: seq * h,
                        off: 0,
                        stride: 0,
                    },
                )
            }
            None => gemm(
                be,
                Precision::F32,
                (seq, h, 1),
                bsz,
                1.0,
                mat(&ws.pool_w, 1).every(seq),
                mat(&ws.dpooled, h).every(h),
                0.0,
                out(dhead, h).every(seq * h),
            ),
        }
    }
}

fn no_state() -> Error {
    Error::InvalidOption("no trainable state uploaded: call GpuModel::set_state first".into())
}
