//! Shapes and parameters shared by both backends, with their validation.

use crate::{Error, Result};

/// Shape of a per-example LoRA gradient `out_i = G_iᵀ · H_i`.
///
/// `G` holds `batch` row-major `tokens × d_out` blocks (the gradient of the
/// layer output), `H` holds `batch` row-major `tokens × rank` blocks (the
/// adapter activation), and `out_i` is row-major `d_out × rank`: the gradient
/// of the LoRA up-projection. The LoRA down-projection's gradient has the
/// same form with `G` the layer input and `H` the back-propagated gradient at
/// the adapter bottleneck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GradShape {
    /// Examples in the batch.
    pub batch: usize,
    /// Rows per example (tokens, the contraction dimension).
    pub tokens: usize,
    /// Columns of `G` (rows of each output block).
    pub d_out: usize,
    /// Columns of `H` (columns of each output block).
    pub rank: usize,
}

impl GradShape {
    /// Elements of `G`.
    pub fn g_len(&self) -> usize {
        self.batch * self.tokens * self.d_out
    }
    /// Elements of `H`.
    pub fn h_len(&self) -> usize {
        self.batch * self.tokens * self.rank
    }
    /// Elements of one example's gradient block.
    pub fn block_len(&self) -> usize {
        self.d_out * self.rank
    }
    /// Multiply-add count times two: the FLOPs of the whole batch.
    pub fn flops(&self) -> f64 {
        2.0 * self.batch as f64 * self.tokens as f64 * self.d_out as f64 * self.rank as f64
    }

    pub(crate) fn validate(&self, op: &'static str) -> Result<()> {
        let dims = [
            ("batch", self.batch),
            ("tokens", self.tokens),
            ("d_out", self.d_out),
            ("rank", self.rank),
        ];
        for (name, v) in dims {
            if v == 0 {
                return Err(Error::Shape {
                    what: op,
                    detail: format!("{name} is 0"),
                });
            }
        }
        let total = self
            .batch
            .checked_mul(self.tokens)
            .and_then(|v| v.checked_mul(self.d_out.max(self.rank)));
        if total.is_none() {
            return Err(Error::Shape {
                what: op,
                detail: format!("{self:?} overflows usize"),
            });
        }
        Ok(())
    }
}

/// Where each example's gradient block goes in the output buffer: block `i`
/// starts at `i * row_stride + offset`. A stride larger than the block lets
/// several parameter tensors share one `batch × P` matrix of flattened
/// per-example gradients, which `row_sq_norms` and `clip_and_noise` then
/// treat as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutLayout {
    /// Elements between the starts of consecutive examples' rows.
    pub row_stride: usize,
    /// Column where this tensor's block starts inside a row.
    pub offset: usize,
}

impl OutLayout {
    /// Blocks packed back to back.
    pub fn packed(shape: &GradShape) -> Self {
        Self {
            row_stride: shape.block_len(),
            offset: 0,
        }
    }

    /// Elements the output buffer needs at least.
    pub fn required_len(&self, shape: &GradShape) -> usize {
        (shape.batch - 1) * self.row_stride + self.offset + shape.block_len()
    }

    pub(crate) fn validate(&self, shape: &GradShape, op: &'static str) -> Result<()> {
        let end = self.offset.checked_add(shape.block_len());
        match end {
            Some(end) if end <= self.row_stride => Ok(()),
            _ => Err(Error::Shape {
                what: op,
                detail: format!(
                    "block of {} elements at offset {} does not fit in row stride {}",
                    shape.block_len(),
                    self.offset,
                    self.row_stride
                ),
            }),
        }
    }
}

/// The Gaussian mechanism's parameters for one noisy sum:
/// `out = (sum + N(0, σ²C²)) · scale`, the noise at stream positions
/// `offset..offset + len` of the Philox stream keyed by `seed`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseSpec {
    /// Noise multiplier σ (0 disables noise).
    pub sigma: f32,
    /// Clipping bound C, also the sensitivity the noise is calibrated to.
    pub clip: f32,
    /// Factor applied after the noise, typically `1 / L` for lot size `L`.
    pub scale: f32,
    /// Philox key.
    pub seed: u64,
    /// First stream position; advance it by the length of each noisy tensor
    /// so that tensors sharing a seed never reuse noise.
    pub offset: u64,
}

impl NoiseSpec {
    /// The standard deviation σ·C of the added noise, before `scale`.
    pub fn std(&self) -> f32 {
        self.sigma * self.clip
    }

    pub(crate) fn validate(&self) -> Result<()> {
        check_clip(self.clip)?;
        if !(self.sigma.is_finite() && self.sigma >= 0.0) {
            return Err(Error::Parameter {
                name: "sigma",
                value: f64::from(self.sigma),
                reason: "the noise multiplier must be finite and >= 0",
            });
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(Error::Parameter {
                name: "scale",
                value: f64::from(self.scale),
                reason: "the scale must be finite and > 0",
            });
        }
        if !self.std().is_finite() {
            return Err(Error::Parameter {
                name: "sigma",
                value: f64::from(self.sigma),
                reason: "sigma * clip overflows f32",
            });
        }
        Ok(())
    }
}

pub(crate) fn check_clip(clip: f32) -> Result<()> {
    if clip.is_finite() && clip > 0.0 {
        Ok(())
    } else {
        Err(Error::Parameter {
            name: "clip",
            value: f64::from(clip),
            reason: "the clipping bound must be finite and > 0",
        })
    }
}

/// The factor `min(1, C / ‖g‖)` that scales an example's gradient of squared
/// norm `sq_norm` to norm at most `clip`. Both backends compute the factors
/// with this one function, so they clip identically.
pub fn clip_factors(sq_norms: &[f32], clip: f32) -> Result<Vec<f32>> {
    check_clip(clip)?;
    sq_norms
        .iter()
        .enumerate()
        .map(|(example, &sq)| {
            if !(sq.is_finite() && sq >= 0.0) {
                return Err(Error::NonFiniteNorm { example, value: sq });
            }
            let norm = sq.sqrt();
            Ok(if norm <= clip { 1.0 } else { clip / norm })
        })
        .collect()
}

pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::Length {
            what,
            expected,
            got,
        })
    }
}

pub(crate) fn check_at_least(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if got >= expected {
        Ok(())
    } else {
        Err(Error::Length {
            what,
            expected,
            got,
        })
    }
}

pub(crate) fn check_matrix(op: &'static str, rows: usize, cols: usize) -> Result<usize> {
    if rows == 0 || cols == 0 {
        return Err(Error::Shape {
            what: op,
            detail: format!("{rows} x {cols} matrix is empty"),
        });
    }
    rows.checked_mul(cols).ok_or_else(|| Error::Shape {
        what: op,
        detail: format!("{rows} x {cols} overflows usize"),
    })
}
