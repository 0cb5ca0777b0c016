//! The encoder forward pass, the classification head and the backward pass
//! that yields per-example gradients of the trainable parameters only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::grad::{Factor, Gradients};
use crate::lora::{HeadConfig, LoraConfig, LoraState, ParamKind, ParamLayout, Pooling, Target};
use crate::ops::{self, View};
use crate::tokenizer::Batch;
use crate::weights::BertWeights;

/// Accuracy and mean loss over an evaluation set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalMetrics {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction of examples whose arg-max logit is the label.
    pub accuracy: f64,
    /// Number of examples seen.
    pub examples: usize,
}

/// A BERT sequence classifier with LoRA adapters: the frozen encoder (shared),
/// the LoRA and head options. The trainable values live in a separate
/// [`LoraState`] so one `Model` serves any number of clients.
#[derive(Debug, Clone)]
pub struct Model {
    weights: Arc<BertWeights>,
    lora: LoraConfig,
    head: HeadConfig,
}

/// Token layout of a batch packed without padding: example `i` owns rows
/// `offsets[i]..offsets[i + 1]` of every `[tokens, width]` matrix.
struct Packing {
    offsets: Vec<usize>,
}

impl Packing {
    /// One row per example (the [CLS] rows of a last layer computed for the
    /// pooler only).
    fn one_per_example(examples: usize) -> Self {
        Packing {
            offsets: (0..=examples).collect(),
        }
    }
    fn new(batch: &Batch) -> Self {
        let mut offsets = Vec::with_capacity(batch.len() + 1);
        offsets.push(0);
        let mut t = 0;
        for &l in &batch.lengths {
            t += l;
            offsets.push(t);
        }
        Packing { offsets }
    }
    fn tokens(&self) -> usize {
        *self.offsets.last().unwrap_or(&0)
    }
    fn len(&self, i: usize) -> usize {
        self.offsets[i + 1] - self.offsets[i]
    }
    fn examples(&self) -> usize {
        self.offsets.len() - 1
    }
    /// `[examples, width]`: the first `width` values of every example's
    /// first row (its [CLS] token) in a packed matrix whose rows are
    /// `stride` values apart.
    fn first_rows(&self, m: &[f32], stride: usize, width: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.examples() * width);
        for &o in &self.offsets[..self.examples()] {
            out.extend_from_slice(&m[o * stride..o * stride + width]);
        }
        out
    }
    /// The way back of [`Packing::first_rows`]: `combine(target, value)`
    /// for every value of `rows` (`[examples, width]`) and its place in `m`.
    fn update_first_rows(
        &self,
        m: &mut [f32],
        stride: usize,
        rows: &[f32],
        width: usize,
        combine: impl Fn(&mut f32, f32),
    ) {
        for (&o, row) in self.offsets.iter().zip(rows.chunks_exact(width.max(1))) {
            let target = &mut m[o * stride..o * stride + width];
            target.iter_mut().zip(row).for_each(|(t, &v)| combine(t, v));
        }
    }
}

/// Splits a `[rows, width]` buffer into one mutable slice per example.
fn split_rows<'a>(mut buf: &'a mut [f32], offsets: &[usize], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(offsets.len() - 1);
    for w in offsets.windows(2) {
        let (head, tail) = buf.split_at_mut((w[1] - w[0]) * width);
        out.push(head);
        buf = tail;
    }
    out
}

/// What one adapter keeps for the backward pass.
struct AdapterTape {
    /// The dropout multipliers (0 or 1/(1-p)) of its input, in training.
    mask: Option<Vec<f32>>,
    /// `H = dropout(x) Aᵀ`, `[tokens, r]`.
    h: Vec<f32>,
    /// Rows are tokens (false: one row per example, see `Packing::one_per_example`).
    per_token: bool,
}

/// What one layer keeps for the backward pass.
struct LayerTape {
    x: Vec<f32>,
    qkv: Vec<f32>,
    probs: Vec<f32>,
    ctx: Vec<f32>,
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    y1: Vec<f32>,
    gelu_d: Vec<f32>,
    gelu_out: Option<Vec<f32>>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
    adapters: Vec<(usize, AdapterTape)>,
    /// The rows kept after attention: every token, or only each example's
    /// [CLS] row in a last layer that feeds the [CLS] pooler.
    qpack: Packing,
}

/// Dropout of the adapters in a training pass.
#[derive(Clone, Copy)]
struct Dropout {
    p: f32,
    seed: u64,
    /// Index in the whole batch of the first example of the chunk being
    /// run, so that every example draws the same mask however the batch is
    /// split.
    first: usize,
}

/// Tokens per chunk when a batch is split over threads (see
/// [`chunk_ranges`]).
const CHUNK_TOKENS: usize = 512;

/// Splits a batch into runs of consecutive examples of at least
/// [`CHUNK_TOKENS`] tokens (the last may be shorter).
///
/// Why chunks: every operation of the encoder is independent across
/// examples, so chunks run on separate threads with no synchronisation
/// inside a layer, instead of every GEMM, LayerNorm and attention being
/// split over the threads and joined again (measured on the 2-core build
/// machine: one thread on half the batch ran at more than half the speed of
/// two threads on all of it). The split depends on the lengths only, never
/// on the number of threads, so results stay bit-identical across thread
/// counts.
fn chunk_ranges(lengths: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, &l) in lengths.iter().enumerate() {
        tokens += l;
        if tokens >= CHUNK_TOKENS {
            out.push(start..i + 1);
            start = i + 1;
            tokens = 0;
        }
    }
    if start < lengths.len() {
        out.push(start..lengths.len());
    }
    out
}

/// The per-example results of one chunk of a training pass.
struct ChunkGradients {
    factors: Vec<Factor>,
    logits: Vec<f32>,
    losses: Vec<f32>,
}

fn mix(mut z: u64) -> u64 {
    // SplitMix64 finalizer: decorrelates the seeds of neighbouring streams.
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Model {
    /// A classifier over `weights` with the given adapters and head.
    pub fn new(weights: Arc<BertWeights>, lora: LoraConfig, head: HeadConfig) -> Result<Self> {
        lora.validate()?;
        if head.num_labels == 0 {
            return Err(Error::InvalidOption("num_labels must be at least 1".into()));
        }
        if head.pooling == Pooling::ClsPooler && weights.pooler.is_none() {
            return Err(Error::MissingTensor {
                name: "pooler.dense.weight (needed by the [CLS] pooler head; use mean pooling)"
                    .into(),
            });
        }
        let lora = LoraConfig {
            targets: lora.sorted_targets(),
            ..lora
        };
        Ok(Model {
            weights,
            lora,
            head,
        })
    }

    /// The frozen encoder.
    pub fn weights(&self) -> &Arc<BertWeights> {
        &self.weights
    }

    /// The LoRA options (targets sorted in canonical order).
    pub fn lora_config(&self) -> &LoraConfig {
        &self.lora
    }

    /// The head options.
    pub fn head_config(&self) -> &HeadConfig {
        &self.head
    }

    /// A fresh trainable state drawn from `seed` (see [`LoraState::init`]).
    pub fn init_state(&self, seed: u64) -> Result<LoraState> {
        LoraState::init(&self.weights.config, &self.lora, &self.head, seed)
    }

    /// The flat layout of the trainable parameters.
    pub fn layout(&self, state: &LoraState) -> ParamLayout {
        ParamLayout::new(
            state,
            &self.lora,
            self.head.num_labels,
            self.weights.config.hidden_size,
        )
    }

    /// Checks that `state` has exactly the adapters and head this model expects.
    pub fn check_state(&self, state: &LoraState) -> Result<()> {
        let c = &self.weights.config;
        let t = self.lora.targets.len();
        if state.rank != self.lora.rank {
            return Err(Error::InvalidOption(format!(
                "state has rank {}, model expects {}",
                state.rank, self.lora.rank
            )));
        }
        if state.adapters.len() != c.num_hidden_layers * t {
            return Err(Error::InvalidOption(format!(
                "state has {} adapters, model expects {} ({} layers x {} targets)",
                state.adapters.len(),
                c.num_hidden_layers * t,
                c.num_hidden_layers,
                t
            )));
        }
        for (i, ad) in state.adapters.iter().enumerate() {
            let (layer, target) = (i / t, self.lora.targets[i % t]);
            let (d_in, d_out) = target.dims(c);
            if ad.layer != layer
                || ad.target != target
                || ad.d_in != d_in
                || ad.d_out != d_out
                || ad.a.len() != state.rank * d_in
                || ad.b.len() != d_out * state.rank
            {
                return Err(Error::InvalidOption(format!(
                    "adapter {i} should be layer {layer} `{}` with A [{}, {d_in}] and B [{d_out}, {}]",
                    target.name(),
                    state.rank,
                    state.rank
                )));
            }
            if ad.a.iter().chain(&ad.b).any(|v| !v.is_finite()) {
                return Err(Error::NonFinite(format!(
                    "adapter of layer {layer} `{}`",
                    target.name()
                )));
            }
        }
        let want = self.head.num_labels * c.hidden_size;
        if state.head_weight.len() != want || state.head_bias.len() != self.head.num_labels {
            return Err(Error::LengthMismatch {
                what: "classifier weight and bias".into(),
                expected: want + self.head.num_labels,
                found: state.head_weight.len() + state.head_bias.len(),
            });
        }
        if state
            .head_weight
            .iter()
            .chain(&state.head_bias)
            .any(|v| !v.is_finite())
        {
            return Err(Error::NonFinite("classifier head".into()));
        }
        Ok(())
    }

    fn check_batch(&self, batch: &Batch) -> Result<()> {
        let c = &self.weights.config;
        let n = batch.len();
        let total = n * batch.seq_len;
        if batch.input_ids.len() != total
            || batch.token_type_ids.len() != total
            || batch.attention_mask.len() != total
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

    /// Embeddings + LayerNorm of the packed tokens, `[tokens, h]`.
    fn embed_tokens(&self, batch: &Batch, pack: &Packing) -> Vec<f32> {
        let w = &self.weights;
        let h = w.config.hidden_size;
        let mut sum = ops::overwritten_buffer(pack.tokens() * h);
        let mut rows = split_rows(&mut sum, &pack.offsets, h);
        rows.par_iter_mut().enumerate().for_each(|(i, rows)| {
            for (p, (&id, &ty)) in batch.ids(i).iter().zip(batch.type_ids(i)).enumerate() {
                let out = &mut rows[p * h..(p + 1) * h];
                let we = &w.word_embeddings[id as usize * h..(id as usize + 1) * h];
                let pe = &w.position_embeddings[p * h..(p + 1) * h];
                let te = &w.token_type_embeddings[ty as usize * h..(ty as usize + 1) * h];
                for j in 0..h {
                    out[j] = we[j] + te[j] + pe[j];
                }
            }
        });
        let mut y = ops::overwritten_buffer(sum.len());
        ops::layer_norm(
            &sum,
            &w.embeddings_ln.gamma,
            &w.embeddings_ln.beta,
            w.config.layer_norm_eps as f32,
            &mut y,
            None,
        );
        ops::recycle(sum);
        y
    }

    /// Applies the adapter `ad` to input `x` and adds its output to columns
    /// `col0..col0 + d_out` of `y` (row stride `rsy`).
    #[allow(clippy::too_many_arguments)]
    fn adapter_forward(
        &self,
        state: &LoraState,
        index: usize,
        x: &[f32],
        y: &mut [f32],
        rsy: usize,
        col0: usize,
        pack: &Packing,
        dropout: Option<Dropout>,
    ) -> AdapterTape {
        let ad = &state.adapters[index];
        let r = state.rank;
        let n = pack.tokens();
        let mask = dropout.filter(|d| d.p > 0.0).map(|d| {
            let mut m = ops::overwritten_buffer(n * ad.d_in);
            let keep = 1.0 / (1.0 - d.p);
            let mut rows = split_rows(&mut m, &pack.offsets, ad.d_in);
            rows.par_iter_mut().enumerate().for_each(|(i, rows)| {
                let example = (d.first + i) as u64;
                let seed = mix(d.seed ^ mix(((index as u64) << 32) | example));
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                for v in rows.iter_mut() {
                    *v = if rng.random::<f32>() < d.p { 0.0 } else { keep };
                }
            });
            m
        });
        let mut hbuf = vec![0.0f32; n * r];
        ops::low_rank_project(x, ad.d_in, mask.as_deref(), &ad.a, ad.d_in, 1.0, &mut hbuf);
        let bt = ops::transpose(&ad.b, ad.d_out, r);
        ops::low_rank_expand(
            &hbuf,
            &bt,
            ad.d_out,
            self.lora.scale(),
            None,
            &mut y[col0..],
            rsy,
            0,
        );
        AdapterTape {
            mask,
            h: hbuf,
            per_token: true,
        }
    }

    /// Backward of one adapter: records its gradient factors and adds its
    /// contribution to the input gradient `dx` (if wanted). `dy` holds the
    /// gradient of the projection output in columns `col0..col0 + d_out`
    /// with row stride `rsy`.
    #[allow(clippy::too_many_arguments)]
    fn adapter_backward(
        &self,
        state: &LoraState,
        index: usize,
        tape: AdapterTape,
        x: &[f32],
        dy: &[f32],
        rsy: usize,
        col0: usize,
        dx: Option<&mut [f32]>,
        factors: &mut Vec<Factor>,
        slots: &SlotIndex,
    ) {
        let ad = &state.adapters[index];
        let r = state.rank;
        let s = self.lora.scale();
        let n = tape.h.len() / r;
        // dH = s · dY B
        let bt = ops::transpose(&ad.b, ad.d_out, r);
        let mut dh = vec![0.0f32; n * r];
        ops::low_rank_project(&dy[col0..], rsy, None, &bt, ad.d_out, s, &mut dh);
        if let Some(dx) = dx {
            // dX += (dH A) ⊙ dropout mask
            ops::low_rank_expand(
                &dh,
                &ad.a,
                ad.d_in,
                1.0,
                tape.mask.as_deref(),
                dx,
                ad.d_in,
                0,
            );
        }
        if let Some(slot) = slots.a[index] {
            let v = match &tape.mask {
                Some(m) => x.iter().zip(m).map(|(a, b)| a * b).collect(),
                None => x.to_vec(),
            };
            factors.push(Factor {
                slot,
                u: dh,
                du: r,
                v,
                dv: ad.d_in,
                per_token: tape.per_token,
            });
        }
        if let Some(slot) = slots.b[index] {
            let mut dyc = ops::overwritten_buffer(n * ad.d_out);
            dyc.par_chunks_mut(ad.d_out)
                .zip(dy.par_chunks(rsy))
                .for_each(|(d, src)| {
                    for (d, v) in d.iter_mut().zip(&src[col0..col0 + ad.d_out]) {
                        *d = s * v;
                    }
                });
            factors.push(Factor {
                slot,
                u: dyc,
                du: ad.d_out,
                v: tape.h,
                dv: r,
                per_token: tape.per_token,
            });
        }
        if let Some(mask) = tape.mask {
            ops::recycle(mask);
        }
    }

    /// The fused query/key/value projection of a layer in which only the
    /// [CLS] rows are queried: keys and values for every token, queries for
    /// each example's first row alone. The other rows' query columns hold
    /// the bias and are never read (attention and its backward read the
    /// query of the [CLS] row only). Saves a third of the projection.
    fn qkv_for_cls_queries(&self, x: &[f32], l: usize, pack: &Packing) -> Vec<f32> {
        let h = self.weights.config.hidden_size;
        let lin = &self.weights.layers[l].qkv;
        let n = pack.tokens();
        let (wq, wkv) = lin.weight.split_at(h * h);
        let (bq, bkv) = lin.bias.split_at(h);
        let kv = ops::linear(x, wkv, bkv, h, 2 * h);
        let mut qkv = Vec::with_capacity(n * 3 * h);
        for row in kv.chunks_exact(2 * h) {
            qkv.extend_from_slice(bq);
            qkv.extend_from_slice(row);
        }
        ops::recycle(kv);
        let x_cls = pack.first_rows(x, h, h);
        let q_cls = ops::linear(&x_cls, wq, bq, h, h);
        pack.update_first_rows(&mut qkv, 3 * h, &q_cls, h, |t, v| *t = v);
        qkv
    }

    /// One encoder layer. Returns the layer output and, when `keep`, what the
    /// backward pass needs. With `cls_only` everything after attention runs
    /// on each example's [CLS] row alone (the output is `[batch, h]`).
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: usize,
        x: Vec<f32>,
        state: Option<&LoraState>,
        pack: &Packing,
        dropout: Option<Dropout>,
        keep: bool,
        cls_only: bool,
    ) -> (Vec<f32>, Option<LayerTape>) {
        let c = &self.weights.config;
        let lw = &self.weights.layers[l];
        let (h, ff) = (c.hidden_size, c.intermediate_size);
        let eps = c.layer_norm_eps as f32;
        let t = self.lora.targets.len();
        let mut adapter_tapes = Vec::new();
        let adapters_here: Vec<(usize, Target)> = match state {
            Some(_) => (0..t).map(|j| (l * t + j, self.lora.targets[j])).collect(),
            None => Vec::new(),
        };

        let mut qkv = if cls_only {
            self.qkv_for_cls_queries(&x, l, pack)
        } else {
            ops::linear(&x, &lw.qkv.weight, &lw.qkv.bias, h, 3 * h)
        };
        for &(ai, target) in &adapters_here {
            let col0 = match target {
                Target::Query => 0,
                Target::Key => h,
                Target::Value => 2 * h,
                _ => continue,
            };
            let tp = self.adapter_forward(
                state.expect("adapters only with a state"),
                ai,
                &x,
                &mut qkv,
                3 * h,
                col0,
                pack,
                dropout,
            );
            adapter_tapes.push((ai, tp));
        }

        // Scaled dot-product attention, one example at a time (no padding).
        // When only the [CLS] rows feed the head, only they are queried and
        // everything after attention runs on those rows alone.
        let qpack = if cls_only {
            Packing::one_per_example(pack.examples())
        } else {
            Packing {
                offsets: pack.offsets.clone(),
            }
        };
        let nq = qpack.tokens();
        let nh = c.num_attention_heads;
        let dh = c.head_dim();
        let scale = 1.0 / (dh as f32).sqrt();
        let poffs: Vec<usize> = {
            let mut o = vec![0usize];
            for i in 0..pack.examples() {
                o.push(o[i] + nh * qpack.len(i) * pack.len(i));
            }
            o
        };
        let mut probs = ops::overwritten_buffer(*poffs.last().unwrap_or(&0));
        let mut ctx = ops::overwritten_buffer(nq * h);
        {
            let ctx_rows = split_rows(&mut ctx, &qpack.offsets, h);
            let prob_rows = split_rows(&mut probs, &poffs, 1);
            ctx_rows
                .into_par_iter()
                .zip(prob_rows)
                .enumerate()
                .for_each(|(i, (cr, pr))| {
                    let li = pack.len(i);
                    let lq = qpack.len(i);
                    let q = &qkv[pack.offsets[i] * 3 * h..pack.offsets[i + 1] * 3 * h];
                    for hd in 0..nh {
                        let p = &mut pr[hd * lq * li..(hd + 1) * lq * li];
                        ops::gemm(
                            lq,
                            dh,
                            li,
                            scale,
                            View {
                                data: &q[hd * dh..],
                                rs: 3 * h,
                                cs: 1,
                            },
                            View {
                                data: &q[h + hd * dh..],
                                rs: 1,
                                cs: 3 * h,
                            },
                            0.0,
                            p,
                            li,
                            1,
                        );
                        for row in p.chunks_exact_mut(li) {
                            ops::softmax_row(row);
                        }
                        ops::gemm(
                            lq,
                            li,
                            dh,
                            1.0,
                            View::rm(p, li),
                            View {
                                data: &q[2 * h + hd * dh..],
                                rs: 3 * h,
                                cs: 1,
                            },
                            0.0,
                            &mut cr[hd * dh..],
                            h,
                            1,
                        );
                    }
                });
        }

        let mut r1 = ops::linear(&ctx, &lw.attn_out.weight, &lw.attn_out.bias, h, h);
        for &(ai, target) in &adapters_here {
            if target == Target::AttentionOutput {
                let mut tp = self.adapter_forward(
                    state.expect("adapters only with a state"),
                    ai,
                    &ctx,
                    &mut r1,
                    h,
                    0,
                    &qpack,
                    dropout,
                );
                tp.per_token = !cls_only;
                adapter_tapes.push((ai, tp));
            }
        }
        if cls_only {
            for (i, row) in r1.chunks_exact_mut(h).enumerate() {
                let o = pack.offsets[i];
                row.iter_mut()
                    .zip(&x[o * h..(o + 1) * h])
                    .for_each(|(a, b)| *a += b);
            }
        } else {
            r1.par_chunks_mut(4096)
                .zip(x.par_chunks(4096))
                .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
        }
        let mut y1 = ops::overwritten_buffer(nq * h);
        let (mut xhat1, mut rstd1) = if keep {
            (ops::overwritten_buffer(nq * h), vec![0.0f32; nq])
        } else {
            (Vec::new(), Vec::new())
        };
        ops::layer_norm(
            &r1,
            &lw.attn_ln.gamma,
            &lw.attn_ln.beta,
            eps,
            &mut y1,
            keep.then_some((&mut xhat1[..], &mut rstd1[..])),
        );
        ops::recycle(r1);

        let mut inter = ops::linear(&y1, &lw.intermediate.weight, &lw.intermediate.bias, h, ff);
        for &(ai, target) in &adapters_here {
            if target == Target::Intermediate {
                let mut tp = self.adapter_forward(
                    state.expect("adapters only with a state"),
                    ai,
                    &y1,
                    &mut inter,
                    ff,
                    0,
                    &qpack,
                    dropout,
                );
                tp.per_token = !cls_only;
                adapter_tapes.push((ai, tp));
            }
        }
        let mut gelu_d = if keep {
            ops::overwritten_buffer(nq * ff)
        } else {
            Vec::new()
        };
        ops::gelu(&mut inter, keep.then_some(&mut gelu_d[..]));

        let mut r2 = ops::linear(&inter, &lw.output.weight, &lw.output.bias, ff, h);
        let mut output_adapter = false;
        for &(ai, target) in &adapters_here {
            if target == Target::Output {
                output_adapter = true;
                let mut tp = self.adapter_forward(
                    state.expect("adapters only with a state"),
                    ai,
                    &inter,
                    &mut r2,
                    h,
                    0,
                    &qpack,
                    dropout,
                );
                tp.per_token = !cls_only;
                adapter_tapes.push((ai, tp));
            }
        }
        r2.par_chunks_mut(4096)
            .zip(y1.par_chunks(4096))
            .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
        let mut out = ops::overwritten_buffer(nq * h);
        let (mut xhat2, mut rstd2) = if keep {
            (ops::overwritten_buffer(nq * h), vec![0.0f32; nq])
        } else {
            (Vec::new(), Vec::new())
        };
        ops::layer_norm(
            &r2,
            &lw.output_ln.gamma,
            &lw.output_ln.beta,
            eps,
            &mut out,
            keep.then_some((&mut xhat2[..], &mut rstd2[..])),
        );
        ops::recycle(r2);
        if !keep {
            for buffer in [x, qkv, probs, ctx, y1, inter] {
                ops::recycle(buffer);
            }
            return (out, None);
        }
        let gelu_out = if output_adapter {
            Some(inter)
        } else {
            ops::recycle(inter);
            None
        };
        let tape = LayerTape {
            x,
            qkv,
            probs,
            ctx,
            xhat1,
            rstd1,
            y1,
            gelu_d,
            gelu_out,
            xhat2,
            rstd2,
            adapters: adapter_tapes,
            qpack,
        };
        (out, Some(tape))
    }

    /// Backward of one layer: takes the gradient of its output, returns the
    /// gradient of its input when `need_dx`.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        tape: LayerTape,
        mut dy: Vec<f32>,
        state: &LoraState,
        pack: &Packing,
        need_dx: bool,
        factors: &mut Vec<Factor>,
        slots: &SlotIndex,
    ) -> Option<Vec<f32>> {
        let c = &self.weights.config;
        let lw = &self.weights.layers[l];
        let (h, ff) = (c.hidden_size, c.intermediate_size);
        let n = pack.tokens();
        let LayerTape {
            x,
            qkv,
            probs,
            ctx,
            xhat1,
            rstd1,
            y1,
            gelu_d,
            gelu_out,
            xhat2,
            rstd2,
            adapters,
            qpack,
        } = tape;
        let nq = qpack.tokens();
        let mut tapes: Vec<Option<(usize, AdapterTape)>> = adapters.into_iter().map(Some).collect();
        let mut take = |target: Target| -> Option<(usize, AdapterTape)> {
            let pos = tapes.iter().position(|t| {
                t.as_ref()
                    .is_some_and(|(ai, _)| state.adapters[*ai].target == target)
            })?;
            tapes[pos].take()
        };

        // Output LayerNorm and output.dense.
        ops::layer_norm_backward(&mut dy, &xhat2, &rstd2, &lw.output_ln.gamma);
        ops::recycle(xhat2);
        let dr2 = dy;
        let mut dg = ops::overwritten_buffer(nq * ff);
        ops::linear_backward(&dr2, &lw.output.weight, ff, h, &mut dg, false);
        if let Some((ai, tp)) = take(Target::Output) {
            let g = gelu_out.as_deref().unwrap_or(&[]);
            self.adapter_backward(state, ai, tp, g, &dr2, h, 0, Some(&mut dg), factors, slots);
        }
        ops::recycle(gelu_out.unwrap_or_default());
        dg.par_chunks_mut(4096)
            .zip(gelu_d.par_chunks(4096))
            .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a *= b));
        ops::recycle(gelu_d);
        let di = dg;

        // intermediate.dense and the residual around the feed-forward block.
        let mut dy1 = dr2;
        ops::linear_backward(&di, &lw.intermediate.weight, h, ff, &mut dy1, true);
        if let Some((ai, tp)) = take(Target::Intermediate) {
            self.adapter_backward(
                state,
                ai,
                tp,
                &y1,
                &di,
                ff,
                0,
                Some(&mut dy1),
                factors,
                slots,
            );
        }
        ops::recycle(di);
        ops::recycle(y1);
        ops::layer_norm_backward(&mut dy1, &xhat1, &rstd1, &lw.attn_ln.gamma);
        ops::recycle(xhat1);
        let dr1 = dy1;

        // attention.output.dense.
        let mut dctx = ops::overwritten_buffer(nq * h);
        ops::linear_backward(&dr1, &lw.attn_out.weight, h, h, &mut dctx, false);
        if let Some((ai, tp)) = take(Target::AttentionOutput) {
            self.adapter_backward(
                state,
                ai,
                tp,
                &ctx,
                &dr1,
                h,
                0,
                Some(&mut dctx),
                factors,
                slots,
            );
        }
        ops::recycle(ctx);

        // Attention.
        let nh = c.num_attention_heads;
        let dh = c.head_dim();
        let scale = 1.0 / (dh as f32).sqrt();
        let mut poffs = vec![0usize];
        for i in 0..pack.examples() {
            poffs.push(poffs[i] + nh * qpack.len(i) * pack.len(i));
        }
        // Keys get no gradient below the lowest layer that passes one on,
        // unless a key adapter trains.
        let need_dk = need_dx || slots_train_key(state, l, &self.lora);
        // Every value of dqkv is written below unless keys get no gradient
        // or only the [CLS] rows are queried (the other rows' query
        // gradients stay zero).
        let mut dqkv = if need_dk && nq == n {
            ops::overwritten_buffer(n * 3 * h)
        } else {
            vec![0.0f32; n * 3 * h]
        };
        {
            let rows = split_rows(&mut dqkv, &pack.offsets, 3 * h);
            rows.into_par_iter().enumerate().for_each(|(i, dq)| {
                let li = pack.len(i);
                let lq = qpack.len(i);
                let o = pack.offsets[i];
                let q = &qkv[o * 3 * h..(o + li) * 3 * h];
                let dc = &dctx[qpack.offsets[i] * h..qpack.offsets[i + 1] * h];
                let mut dp = vec![0.0f32; lq * li];
                for hd in 0..nh {
                    let p = &probs[poffs[i] + hd * lq * li..poffs[i] + (hd + 1) * lq * li];
                    // dP = dC_h V_hᵀ
                    ops::gemm(
                        lq,
                        dh,
                        li,
                        1.0,
                        View {
                            data: &dc[hd * dh..],
                            rs: h,
                            cs: 1,
                        },
                        View {
                            data: &q[2 * h + hd * dh..],
                            rs: 1,
                            cs: 3 * h,
                        },
                        0.0,
                        &mut dp,
                        li,
                        1,
                    );
                    // dV_h = Pᵀ dC_h
                    ops::gemm(
                        li,
                        lq,
                        dh,
                        1.0,
                        View::rm_t(p, li),
                        View {
                            data: &dc[hd * dh..],
                            rs: h,
                            cs: 1,
                        },
                        0.0,
                        &mut dq[2 * h + hd * dh..],
                        3 * h,
                        1,
                    );
                    // dS = P ⊙ (dP − rowsum(dP ⊙ P)), times the score scale.
                    for (dpr, pr) in dp.chunks_exact_mut(li).zip(p.chunks_exact(li)) {
                        let dot: f32 = dpr.iter().zip(pr).map(|(a, b)| a * b).sum();
                        for (d, pv) in dpr.iter_mut().zip(pr) {
                            *d = pv * (*d - dot) * scale;
                        }
                    }
                    // dQ_h = dS K_h ; dK_h = dSᵀ Q_h
                    ops::gemm(
                        lq,
                        li,
                        dh,
                        1.0,
                        View::rm(&dp, li),
                        View {
                            data: &q[h + hd * dh..],
                            rs: 3 * h,
                            cs: 1,
                        },
                        0.0,
                        &mut dq[hd * dh..],
                        3 * h,
                        1,
                    );
                    if need_dk {
                        ops::gemm(
                            li,
                            lq,
                            dh,
                            1.0,
                            View::rm_t(&dp, li),
                            View {
                                data: &q[hd * dh..],
                                rs: 3 * h,
                                cs: 1,
                            },
                            0.0,
                            &mut dq[h + hd * dh..],
                            3 * h,
                            1,
                        );
                    }
                }
            });
        }
        ops::recycle(dctx);
        ops::recycle(probs);

        // Query/key/value projections and the residual around attention.
        let mut dx = if need_dx {
            let mut dx = if nq == n {
                dr1
            } else {
                // Only the [CLS] rows passed through the residual.
                let mut dx = vec![0.0f32; n * h];
                pack.update_first_rows(&mut dx, h, &dr1, h, |t, v| *t = v);
                ops::recycle(dr1);
                dx
            };
            if nq == n {
                ops::linear_backward(&dqkv, &lw.qkv.weight, h, 3 * h, &mut dx, true);
            } else {
                // Keys and values have gradients on every row, queries on
                // the [CLS] rows only (see `qkv_for_cls_queries`).
                let (wq, wkv) = lw.qkv.weight.split_at(h * h);
                let mut dkv = Vec::with_capacity(n * 2 * h);
                for row in dqkv.chunks_exact(3 * h) {
                    dkv.extend_from_slice(&row[h..]);
                }
                ops::linear_backward(&dkv, wkv, h, 2 * h, &mut dx, true);
                ops::recycle(dkv);
                let dq_cls = pack.first_rows(&dqkv, 3 * h, h);
                let mut dx_cls = vec![0.0f32; nq * h];
                ops::linear_backward(&dq_cls, wq, h, h, &mut dx_cls, false);
                pack.update_first_rows(&mut dx, h, &dx_cls, h, |t, v| *t += v);
            }
            Some(dx)
        } else {
            ops::recycle(dr1);
            None
        };
        for (target, col0) in [(Target::Query, 0), (Target::Key, h), (Target::Value, 2 * h)] {
            if let Some((ai, tp)) = take(target) {
                self.adapter_backward(
                    state,
                    ai,
                    tp,
                    &x,
                    &dqkv,
                    3 * h,
                    col0,
                    dx.as_deref_mut(),
                    factors,
                    slots,
                );
            }
        }
        for buffer in [dqkv, qkv, x] {
            ops::recycle(buffer);
        }
        dx
    }

    /// Final hidden states of the packed batch, and the tapes of the layers
    /// from `keep_from` on. With `cls_last` the last layer computes only
    /// each example's [CLS] row (all the [CLS] pooler reads), so the result
    /// is `[batch, h]` instead of `[tokens, h]`; see [`Model::cls_rows_only`].
    fn encode(
        &self,
        state: Option<&LoraState>,
        batch: &Batch,
        pack: &Packing,
        dropout: Option<Dropout>,
        keep_from: Option<usize>,
        cls_last: bool,
    ) -> (Vec<f32>, Vec<LayerTape>) {
        let mut x = self.embed_tokens(batch, pack);
        let mut tapes = Vec::new();
        let layers = self.weights.layers.len();
        for l in 0..layers {
            let keep = keep_from.is_some_and(|k| l >= k);
            let cls_only = cls_last && l + 1 == layers;
            let (y, tape) = self.layer_forward(l, x, state, pack, dropout, keep, cls_only);
            if let Some(t) = tape {
                tapes.push(t);
            }
            x = y;
        }
        (x, tapes)
    }

    /// Whether the head reads only the [CLS] rows of the last layer, so the
    /// last layer's feed-forward block (after attention) can skip every
    /// other token. The packing of the final hidden states is then one row
    /// per example.
    fn cls_rows_only(&self) -> bool {
        self.head.pooling == Pooling::ClsPooler && !self.weights.layers.is_empty()
    }

    /// The packing of the final hidden states returned by `encode` with
    /// `cls_last = self.cls_rows_only()`.
    fn hidden_packing(&self, pack: &Packing) -> Packing {
        if self.cls_rows_only() {
            Packing::one_per_example(pack.examples())
        } else {
            Packing {
                offsets: pack.offsets.clone(),
            }
        }
    }

    /// `[batch, h]` pooled features (after the pooler's tanh for
    /// [`Pooling::ClsPooler`]).
    fn pool(&self, hidden: &[f32], pack: &Packing) -> Vec<f32> {
        let h = self.weights.config.hidden_size;
        match self.head.pooling {
            Pooling::Mean => mean_pool(hidden, pack, h),
            Pooling::ClsPooler => {
                let pooler = self
                    .weights
                    .pooler
                    .as_ref()
                    .expect("Model::new checks the pooler exists");
                let cls = pack.first_rows(hidden, h, h);
                let mut p = ops::linear(&cls, &pooler.weight, &pooler.bias, h, h);
                p.iter_mut().for_each(|v| *v = v.tanh());
                p
            }
        }
    }

    fn classify(&self, state: &LoraState, pooled: &[f32]) -> Vec<f32> {
        let h = self.weights.config.hidden_size;
        ops::linear(
            pooled,
            &state.head_weight,
            &state.head_bias,
            h,
            self.head.num_labels,
        )
    }

    /// Logits `[batch, num_labels]` in evaluation mode (no dropout).
    pub fn logits(&self, state: &LoraState, batch: &Batch) -> Result<Vec<f32>> {
        self.check_state(state)?;
        self.check_batch(batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let parts = self.over_chunks(batch, |chunk, _| {
            let pack = Packing::new(chunk);
            let (hidden, _) =
                self.encode(Some(state), chunk, &pack, None, None, self.cls_rows_only());
            let pooled = self.pool(&hidden, &self.hidden_packing(&pack));
            self.classify(state, &pooled)
        })?;
        Ok(parts.concat())
    }

    /// Final hidden states of the real tokens, packed `[tokens, h]` (example
    /// `i`'s rows follow example `i − 1`'s), with the adapters of `state` if given.
    pub fn hidden_states(&self, state: Option<&LoraState>, batch: &Batch) -> Result<Vec<f32>> {
        if let Some(s) = state {
            self.check_state(s)?;
        }
        self.check_batch(batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let parts = self.over_chunks(batch, |chunk, _| {
            self.encode(state, chunk, &Packing::new(chunk), None, None, false)
                .0
        })?;
        Ok(parts.concat())
    }

    /// Sentence embeddings `[batch, h]`: mean of the final hidden states over
    /// the real tokens, L2-normalized (sentence-transformers' recipe).
    pub fn embed(&self, state: Option<&LoraState>, batch: &Batch) -> Result<Vec<f32>> {
        let hidden = self.hidden_states(state, batch)?;
        let h = self.weights.config.hidden_size;
        let mut e = mean_pool(&hidden, &Packing::new(batch), h);
        for row in e.chunks_exact_mut(h) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|v| *v /= norm);
        }
        Ok(e)
    }

    fn check_labels(&self, batch: &Batch, labels: &[usize]) -> Result<()> {
        if labels.len() != batch.len() {
            return Err(Error::LengthMismatch {
                what: "labels".into(),
                expected: batch.len(),
                found: labels.len(),
            });
        }
        if let Some(&y) = labels.iter().find(|&&y| y >= self.head.num_labels) {
            return Err(Error::InvalidBatch(format!(
                "label {y} out of range for {} classes",
                self.head.num_labels
            )));
        }
        Ok(())
    }

    /// Forward and backward pass in training mode. The loss of example `i` is
    /// its cross-entropy; the returned [`Gradients`] gives the gradient of
    /// every trainable tensor for every example separately (and their sum,
    /// which is the gradient of the summed loss). Frozen weights get no
    /// gradient. `dropout_seed` draws the LoRA dropout masks (`None`: no
    /// dropout, e.g. for gradient checks).
    pub fn gradients(
        &self,
        state: &LoraState,
        batch: &Batch,
        labels: &[usize],
        dropout_seed: Option<u64>,
    ) -> Result<Gradients> {
        self.check_state(state)?;
        self.check_batch(batch)?;
        self.check_labels(batch, labels)?;
        let layout = self.layout(state);
        let slots = SlotIndex::new(&layout, state.adapters.len());
        let parts = self.over_chunks(batch, |chunk, first| {
            let dropout = dropout_seed.map(|seed| Dropout {
                p: self.lora.dropout,
                seed,
                first,
            });
            let labels = &labels[first..first + chunk.len()];
            self.chunk_gradients(state, chunk, labels, dropout, &slots)
        })?;
        let (mut logits, mut losses) = (Vec::new(), Vec::new());
        // Factor j of every chunk, in batch order.
        let mut per_factor: Vec<Vec<Factor>> = Vec::new();
        for part in parts {
            logits.extend_from_slice(&part.logits);
            losses.extend_from_slice(&part.losses);
            per_factor.resize_with(part.factors.len(), Vec::new);
            for (j, f) in part.factors.into_iter().enumerate() {
                per_factor[j].push(f);
            }
        }
        // Every chunk records the same tensors in the same order; rows of
        // consecutive chunks follow each other as in the whole batch.
        let factors: Vec<Factor> = per_factor
            .into_par_iter()
            .filter_map(|list| {
                let mut list = list.into_iter();
                let mut all = list.next()?;
                let rest: Vec<Factor> = list.collect();
                all.u.reserve(rest.iter().map(|f| f.u.len()).sum());
                all.v.reserve(rest.iter().map(|f| f.v.len()).sum());
                for f in rest {
                    debug_assert_eq!(f.slot, all.slot);
                    all.u.extend_from_slice(&f.u);
                    all.v.extend_from_slice(&f.v);
                }
                Some(all)
            })
            .collect();
        Ok(Gradients::new(
            layout,
            factors,
            Packing::new(batch).offsets,
            logits,
            losses,
        ))
    }

    /// Runs `f(chunk, first)` on every chunk of `batch` (see
    /// [`chunk_ranges`]; `first` is the index of the chunk's first example),
    /// in parallel, and returns the results in batch order. With at least as
    /// many chunks as threads each chunk runs on one thread
    /// ([`ops::serial_until_idle`]) until a thread runs out of chunks.
    fn over_chunks<T: Send>(
        &self,
        batch: &Batch,
        f: impl Fn(&Batch, usize) -> T + Sync,
    ) -> Result<Vec<T>> {
        let ranges = chunk_ranges(&batch.lengths);
        if ranges.len() <= 1 {
            return Ok(vec![f(batch, 0)]);
        }
        let threads = rayon::current_num_threads();
        let serial = ranges.len() >= threads;
        // Once fewer chunks are unfinished than there are threads, a thread
        // is idle: the chunks still running hand their GEMMs to the pool.
        let unfinished = AtomicUsize::new(ranges.len());
        let idle = Arc::new(AtomicBool::new(false));
        ranges
            .into_par_iter()
            .map(|r| {
                let chunk = batch.slice(r.clone())?;
                let out = if serial {
                    ops::serial_until_idle(&idle, || f(&chunk, r.start))
                } else {
                    f(&chunk, r.start)
                };
                if unfinished.fetch_sub(1, Ordering::Relaxed) - 1 < threads {
                    idle.store(true, Ordering::Relaxed);
                }
                Ok(out)
            })
            .collect()
    }

    /// The training pass of one chunk (checked by [`Model::gradients`]).
    fn chunk_gradients(
        &self,
        state: &LoraState,
        batch: &Batch,
        labels: &[usize],
        dropout: Option<Dropout>,
        slots: &SlotIndex,
    ) -> ChunkGradients {
        let pack = Packing::new(batch);
        let b = batch.len();
        let h = self.weights.config.hidden_size;
        let k = self.head.num_labels;
        // Layers below the lowest trainable adapter need no backward pass.
        let adapters_train = self.lora.train_a || self.lora.train_b;
        let lowest = if adapters_train && !self.lora.targets.is_empty() {
            Some(0)
        } else {
            None
        };
        let (hidden, tapes) = if b == 0 {
            (Vec::new(), Vec::new())
        } else {
            self.encode(
                Some(state),
                batch,
                &pack,
                dropout,
                lowest,
                self.cls_rows_only(),
            )
        };
        let hpack = self.hidden_packing(&pack);
        let pooled = if b == 0 {
            Vec::new()
        } else {
            self.pool(&hidden, &hpack)
        };
        let logits = self.classify(state, &pooled);

        let mut losses = vec![0.0f32; b];
        let mut dlogits = vec![0.0f32; b * k];
        for i in 0..b {
            let z = &logits[i * k..(i + 1) * k];
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = z.iter().map(|v| (v - max).exp()).sum();
            let lse = max + sum.ln();
            losses[i] = lse - z[labels[i]];
            for j in 0..k {
                dlogits[i * k + j] = (z[j] - lse).exp() - if j == labels[i] { 1.0 } else { 0.0 };
            }
        }

        let mut factors = Vec::new();
        if let Some(slot) = slots.head_weight {
            factors.push(Factor {
                slot,
                u: dlogits.clone(),
                du: k,
                v: pooled.clone(),
                dv: h,
                per_token: false,
            });
        }
        if let Some(slot) = slots.head_bias {
            factors.push(Factor {
                slot,
                u: dlogits.clone(),
                du: k,
                v: vec![1.0; b],
                dv: 1,
                per_token: false,
            });
        }

        if lowest.is_some() && b > 0 {
            // Gradient of the pooled features, then of the final hidden states.
            let mut dp = vec![0.0f32; b * h];
            ops::gemm(
                b,
                k,
                h,
                1.0,
                View::rm(&dlogits, k),
                View::rm(&state.head_weight, h),
                0.0,
                &mut dp,
                h,
                1,
            );
            let n = hpack.tokens();
            let mut dy = vec![0.0f32; n * h];
            match self.head.pooling {
                Pooling::Mean => {
                    for i in 0..b {
                        let inv = 1.0 / pack.len(i) as f32;
                        for t in pack.offsets[i]..pack.offsets[i + 1] {
                            for j in 0..h {
                                dy[t * h + j] = dp[i * h + j] * inv;
                            }
                        }
                    }
                }
                Pooling::ClsPooler => {
                    let pooler = self
                        .weights
                        .pooler
                        .as_ref()
                        .expect("Model::new checks the pooler exists");
                    for (d, p) in dp.iter_mut().zip(&pooled) {
                        *d *= 1.0 - p * p;
                    }
                    let mut dcls = vec![0.0f32; b * h];
                    ops::linear_backward(&dp, &pooler.weight, h, h, &mut dcls, false);
                    for i in 0..b {
                        let o = hpack.offsets[i];
                        dy[o * h..(o + 1) * h].copy_from_slice(&dcls[i * h..(i + 1) * h]);
                    }
                }
            }
            let first = lowest.unwrap_or(0);
            let mut tapes = tapes;
            let mut l = self.weights.layers.len();
            while let Some(tape) = tapes.pop() {
                l -= 1;
                let need_dx = l > first;
                match self.layer_backward(l, tape, dy, state, &pack, need_dx, &mut factors, slots) {
                    Some(d) => dy = d,
                    None => break,
                }
            }
        }
        ChunkGradients {
            factors,
            logits,
            losses,
        }
    }

    /// Per-example gradients, `[batch, P]` in the [`ParamLayout`] order.
    pub fn per_example_gradients(
        &self,
        state: &LoraState,
        batch: &Batch,
        labels: &[usize],
        dropout_seed: Option<u64>,
    ) -> Result<Vec<f32>> {
        Ok(self
            .gradients(state, batch, labels, dropout_seed)?
            .per_example())
    }

    /// `Σ_i min(1, C/(‖g_i‖ + 1e-6)) g_i` and the per-example norms `‖g_i‖`,
    /// without materializing all per-example gradients.
    pub fn clipped_gradient_sum(
        &self,
        state: &LoraState,
        batch: &Batch,
        labels: &[usize],
        clip: f32,
        dropout_seed: Option<u64>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        self.gradients(state, batch, labels, dropout_seed)?
            .clipped_sum(clip)
    }

    /// Mean loss and accuracy over labelled batches, in evaluation mode.
    pub fn evaluate<'a, I>(&self, state: &LoraState, batches: I) -> Result<EvalMetrics>
    where
        I: IntoIterator<Item = (&'a Batch, &'a [usize])>,
    {
        let mut scores = crate::engine::Scores::default();
        for (batch, labels) in batches {
            self.check_labels(batch, labels)?;
            let logits = self.logits(state, batch)?;
            scores.add(&logits, labels, self.head.num_labels)?;
        }
        scores.finish()
    }
}

fn mean_pool(hidden: &[f32], pack: &Packing, h: usize) -> Vec<f32> {
    let b = pack.examples();
    let mut out = vec![0.0f32; b * h];
    for i in 0..b {
        let row = &mut out[i * h..(i + 1) * h];
        for t in pack.offsets[i]..pack.offsets[i + 1] {
            for j in 0..h {
                row[j] += hidden[t * h + j];
            }
        }
        let inv = 1.0 / pack.len(i) as f32;
        row.iter_mut().for_each(|v| *v *= inv);
    }
    out
}

/// Maps adapters to their slots in the layout.
pub(crate) struct SlotIndex {
    a: Vec<Option<usize>>,
    b: Vec<Option<usize>>,
    head_weight: Option<usize>,
    head_bias: Option<usize>,
}

impl SlotIndex {
    fn new(layout: &ParamLayout, adapters: usize) -> Self {
        let mut s = SlotIndex {
            a: vec![None; adapters],
            b: vec![None; adapters],
            head_weight: None,
            head_bias: None,
        };
        for (i, slot) in layout.slots.iter().enumerate() {
            match slot.kind {
                ParamKind::A(j) => s.a[j] = Some(i),
                ParamKind::B(j) => s.b[j] = Some(i),
                ParamKind::HeadWeight => s.head_weight = Some(i),
                ParamKind::HeadBias => s.head_bias = Some(i),
            }
        }
        s
    }
}

/// Whether layer `l` has a key adapter with a trainable factor (its factors
/// need the key gradient even where no input gradient is passed on).
fn slots_train_key(state: &LoraState, l: usize, lora: &LoraConfig) -> bool {
    (lora.train_a || lora.train_b)
        && state
            .adapters
            .iter()
            .any(|a| a.layer == l && a.target == Target::Key)
}
