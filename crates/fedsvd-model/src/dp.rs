//! A minimal DP-SGD client step on top of [`Model::gradients`]: clip every
//! example's gradient, add Gaussian noise to the sum, average, and take an
//! SGD step. The federated crate owns privacy accounting; this is the
//! per-step mechanism only.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};
use crate::lora::LoraState;
use crate::model::Model;
use crate::tokenizer::Batch;

/// Parameters of one DP-SGD step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSgdConfig {
    /// Per-example clipping norm `C`.
    pub clip: f32,
    /// Noise multiplier `σ`: the noise on the clipped sum has standard deviation `σ·C`.
    pub noise_multiplier: f32,
    /// Learning rate.
    pub lr: f32,
}

/// What one step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy of the batch before the update.
    pub loss: f32,
    /// Unclipped per-example gradient norms.
    pub norms: Vec<f32>,
    /// Fraction of examples whose gradient was clipped.
    pub clipped_fraction: f32,
}

/// `θ ← θ − lr · (Σ_i clip_C(g_i) + N(0, σ²C²·I)) / batch`, with LoRA dropout
/// masks drawn from `seed` and the noise from a ChaCha20 stream of `seed`.
pub fn dp_sgd_step(
    model: &Model,
    state: &mut LoraState,
    batch: &Batch,
    labels: &[usize],
    config: &DpSgdConfig,
    seed: u64,
) -> Result<StepStats> {
    if !(config.noise_multiplier.is_finite() && config.noise_multiplier >= 0.0) {
        return Err(Error::InvalidOption(format!(
            "noise multiplier must be >= 0, got {}",
            config.noise_multiplier
        )));
    }
    if batch.is_empty() {
        return Err(Error::InvalidBatch(
            "a DP-SGD step needs at least one example".into(),
        ));
    }
    let grads = model.gradients(state, batch, labels, Some(seed))?;
    let (mut sum, norms) = grads.clipped_sum(config.clip)?;
    let std = config.noise_multiplier * config.clip;
    let mut rng = ChaCha20Rng::seed_from_u64(seed ^ 0x6E6F_6973_6521_0001);
    let inv_b = 1.0 / batch.len() as f32;
    for g in sum.iter_mut() {
        let z: f32 = StandardNormal.sample(&mut rng);
        *g = (*g + std * z) * inv_b;
    }
    grads.layout().apply_update(state, &sum, config.lr)?;
    let clipped = norms.iter().filter(|&&n| n > config.clip).count();
    Ok(StepStats {
        loss: grads.mean_loss(),
        clipped_fraction: clipped as f32 / norms.len() as f32,
        norms,
    })
}
