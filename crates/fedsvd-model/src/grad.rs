//! Per-example gradients in factored form.
//!
//! The gradient of every trainable tensor for example `i` is a sum of outer
//! products over that example's rows: `G_i = Σ_{t ∈ i} u_t v_tᵀ` (for `B`:
//! `u` = scaled output gradient, `v = dropout(x) Aᵀ`; for `A`: `u = dH`,
//! `v = dropout(x)`; for the head: `u` = logit gradient, `v` = pooled
//! features). Keeping `U` and `V` instead of the `G_i` costs memory linear in
//! the number of tokens, and the clipped sum `Σ c_i G_i = (C U)ᵀ V` is one GEMM.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::lora::ParamLayout;
use crate::ops::{self, View};

/// The factors of one trainable tensor's per-example gradients.
pub(crate) struct Factor {
    /// Index of the slot in the layout.
    pub slot: usize,
    /// `[rows, du]`.
    pub u: Vec<f32>,
    pub du: usize,
    /// `[rows, dv]`.
    pub v: Vec<f32>,
    pub dv: usize,
    /// Rows are tokens (true) or examples (false).
    pub per_token: bool,
}

/// The result of a training forward/backward pass: logits, per-example
/// losses and the per-example gradients of all trainable tensors (in
/// factored form; see the module docs).
pub struct Gradients {
    layout: ParamLayout,
    factors: Vec<Factor>,
    offsets: Vec<usize>,
    logits: Vec<f32>,
    losses: Vec<f32>,
}

impl std::fmt::Debug for Gradients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gradients")
            .field("examples", &self.losses.len())
            .field("params", &self.layout.len)
            .finish_non_exhaustive()
    }
}

impl Gradients {
    pub(crate) fn new(
        layout: ParamLayout,
        factors: Vec<Factor>,
        offsets: Vec<usize>,
        logits: Vec<f32>,
        losses: Vec<f32>,
    ) -> Self {
        Gradients {
            layout,
            factors,
            offsets,
            logits,
            losses,
        }
    }

    /// The layout of the flat gradient vectors.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// Number of examples.
    pub fn batch_size(&self) -> usize {
        self.losses.len()
    }

    /// Logits of the training pass, `[batch, num_labels]`.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Cross-entropy of every example.
    pub fn losses(&self) -> &[f32] {
        &self.losses
    }

    /// Mean cross-entropy over the batch.
    pub fn mean_loss(&self) -> f32 {
        if self.losses.is_empty() {
            return 0.0;
        }
        (self.losses.iter().map(|&l| l as f64).sum::<f64>() / self.losses.len() as f64) as f32
    }

    fn rows(&self, f: &Factor, i: usize) -> (usize, usize) {
        if f.per_token {
            (self.offsets[i], self.offsets[i + 1])
        } else {
            (i, i + 1)
        }
    }

    /// `G_i` of factor `f` into `out` (`[du, dv]` row-major).
    fn example_grad(&self, f: &Factor, i: usize, out: &mut [f32]) {
        let (r0, r1) = self.rows(f, i);
        ops::gemm(
            f.du,
            r1 - r0,
            f.dv,
            1.0,
            View::rm_t(&f.u[r0 * f.du..r1 * f.du], f.du),
            View::rm(&f.v[r0 * f.dv..r1 * f.dv], f.dv),
            0.0,
            out,
            f.dv,
            1,
        );
    }

    /// Writes example `i`'s gradient into `out` (length P), zero where no factor.
    fn example_into(&self, i: usize, out: &mut [f32]) {
        out.fill(0.0);
        for f in &self.factors {
            let s = &self.layout.slots[f.slot];
            self.example_grad(f, i, &mut out[s.offset..s.offset + s.len()]);
        }
    }

    /// All per-example gradients, `[batch, P]` row-major in layout order.
    pub fn per_example(&self) -> Vec<f32> {
        let p = self.layout.len;
        let mut out = vec![0.0f32; self.batch_size() * p];
        if p > 0 {
            out.par_chunks_mut(p)
                .enumerate()
                .for_each(|(i, row)| self.example_into(i, row));
        }
        out
    }

    /// The gradient of example `i` alone (length P).
    pub fn example(&self, i: usize) -> Result<Vec<f32>> {
        if i >= self.batch_size() {
            return Err(Error::InvalidOption(format!(
                "example {i} outside a batch of {}",
                self.batch_size()
            )));
        }
        let mut out = vec![0.0f32; self.layout.len];
        self.example_into(i, &mut out);
        Ok(out)
    }

    /// `‖g_i‖₂` of every example's full trainable gradient.
    pub fn norms(&self) -> Vec<f32> {
        let max = self.factors.iter().map(|f| f.du * f.dv).max().unwrap_or(0);
        (0..self.batch_size())
            .into_par_iter()
            .map_init(
                || vec![0.0f32; max],
                |buf, i| {
                    let mut sq = 0.0f64;
                    for f in &self.factors {
                        let g = &mut buf[..f.du * f.dv];
                        self.example_grad(f, i, g);
                        sq += g.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
                    }
                    sq.sqrt() as f32
                },
            )
            .collect()
    }

    /// `Σ_i w_i g_i` for per-example weights `w`: one GEMM per tensor over
    /// the row-scaled factors, tensors in parallel. The narrower factor is
    /// the one scaled (a copy of `V`, eight wide for a rank-8 `B`, instead of
    /// `U`, as wide as the layer), so the copy is small.
    fn weighted_sum(&self, w: &[f32]) -> Vec<f32> {
        let parts: Vec<(usize, Vec<f32>)> = self
            .factors
            .par_iter()
            .map(|f| {
                let rows = f.u.len() / f.du.max(1);
                let scale_u = f.du <= f.dv;
                let (width, src) = if scale_u { (f.du, &f.u) } else { (f.dv, &f.v) };
                let mut scaled = src.clone();
                for (i, &wi) in w.iter().enumerate() {
                    let (r0, r1) = self.rows(f, i);
                    if wi != 1.0 {
                        scaled[r0 * width..r1 * width]
                            .iter_mut()
                            .for_each(|v| *v *= wi);
                    }
                }
                let (u, v) = if scale_u {
                    (&scaled, &f.v)
                } else {
                    (&f.u, &scaled)
                };
                let mut g = vec![0.0f32; f.du * f.dv];
                ops::gemm(
                    f.du,
                    rows,
                    f.dv,
                    1.0,
                    View::rm_t(u, f.du),
                    View::rm(v, f.dv),
                    0.0,
                    &mut g,
                    f.dv,
                    1,
                );
                (f.slot, g)
            })
            .collect();
        let mut out = vec![0.0f32; self.layout.len];
        for (slot, g) in parts {
            let s = &self.layout.slots[slot];
            out[s.offset..s.offset + s.len()].copy_from_slice(&g);
        }
        out
    }

    /// The batch gradient `Σ_i g_i` (gradient of the summed loss).
    pub fn sum(&self) -> Vec<f32> {
        self.weighted_sum(&vec![1.0; self.batch_size()])
    }

    /// The DP-SGD clipped sum `Σ_i min(1, C/(‖g_i‖ + 1e-6)) g_i`, and the
    /// unclipped norms `‖g_i‖`. Per-example gradients are never all held at
    /// once: norms come from one example at a time and the sum is one
    /// product of the row-scaled factors.
    pub fn clipped_sum(&self, clip: f32) -> Result<(Vec<f32>, Vec<f32>)> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(Error::InvalidOption(format!(
                "clipping norm must be positive, got {clip}"
            )));
        }
        let norms = self.norms();
        let w: Vec<f32> = norms
            .iter()
            .map(|&n| (clip / (n + 1e-6)).min(1.0))
            .collect();
        Ok((self.weighted_sum(&w), norms))
    }
}
