//! A client's local training: DP-SGD exactly as method.md §5, or plain SGD.

use fedsvd_model::{Batch, LoraState, Model};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One client's tokenized local training data. Tokenized once, before the
/// first round, so rounds never re-tokenize.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientData {
    /// Token ids of every example (unpadded).
    pub ids: Vec<Vec<u32>>,
    /// Token types of every example (same lengths as `ids`).
    pub type_ids: Vec<Vec<u32>>,
    /// Label of every example.
    pub labels: Vec<usize>,
    /// The tokenizer's padding id.
    pub pad_id: u32,
}

impl ClientData {
    /// Number of local examples n_k.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the client has no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The examples at `indices` as one padded batch and their labels.
    pub fn batch(&self, indices: &[usize]) -> Result<(Batch, Vec<usize>)> {
        let ids: Vec<Vec<u32>> = indices.iter().map(|&i| self.ids[i].clone()).collect();
        let types: Vec<Vec<u32>> = indices.iter().map(|&i| self.type_ids[i].clone()).collect();
        let labels = indices.iter().map(|&i| self.labels[i]).collect();
        Ok((Batch::from_sequences(&ids, &types, self.pad_id)?, labels))
    }
}

/// How a client privatizes its updates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum Privatization {
    /// DP-SGD: per-example clipping to `clip` and Gaussian noise of standard
    /// deviation `noise_multiplier · clip` on the clipped sum.
    DpSgd {
        /// Per-example clipping norm C.
        clip: f32,
        /// Noise multiplier σ.
        noise_multiplier: f32,
    },
    /// Plain mini-batch SGD on the mean gradient, optionally with its global
    /// norm clipped to `max_grad_norm`.
    NonPrivate {
        /// Global gradient-norm clipping (`None`: none).
        max_grad_norm: Option<f32>,
    },
}

/// Local training hyper-parameters of one round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LocalTraining {
    /// Local optimizer steps τ per round.
    pub steps: usize,
    /// Expected logical batch size L (Poisson sampling rate q = L / n_k).
    pub expected_batch: usize,
    /// Largest physical batch one forward/backward pass takes.
    pub physical_batch: usize,
    /// SGD learning rate η.
    pub lr: f32,
    /// DP-SGD or plain SGD.
    pub privatization: Privatization,
}

impl LocalTraining {
    /// Checks the hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        let invalid = |key, value: String, allowed| Error::InvalidConfig {
            key,
            value,
            allowed,
        };
        if self.expected_batch == 0 {
            return Err(invalid(
                "training.batch_size",
                "0".into(),
                "a whole number of examples, at least 1",
            ));
        }
        if self.physical_batch == 0 {
            return Err(invalid(
                "training.physical_batch_size",
                "0".into(),
                "a whole number of examples, at least 1",
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(invalid(
                "training.lr",
                self.lr.to_string(),
                "a positive finite number",
            ));
        }
        match self.privatization {
            Privatization::DpSgd {
                clip,
                noise_multiplier,
            } => {
                if !(clip.is_finite() && clip > 0.0) {
                    return Err(invalid(
                        "privacy.clip",
                        clip.to_string(),
                        "a positive finite norm",
                    ));
                }
                if !(noise_multiplier.is_finite() && noise_multiplier >= 0.0) {
                    return Err(invalid(
                        "privacy.noise_multiplier",
                        noise_multiplier.to_string(),
                        "a finite number ≥ 0",
                    ));
                }
            }
            Privatization::NonPrivate {
                max_grad_norm: Some(norm),
            } if !(norm.is_finite() && norm > 0.0) => {
                return Err(invalid(
                    "training.max_grad_norm",
                    norm.to_string(),
                    "a positive finite norm",
                ));
            }
            Privatization::NonPrivate { .. } => {}
        }
        Ok(())
    }

    /// The Poisson sampling rate q = min(1, L / n) of a client with `n`
    /// examples.
    pub fn sample_rate(&self, n: usize) -> f64 {
        if n == 0 {
            0.0
        } else {
            (self.expected_batch as f64 / n as f64).min(1.0)
        }
    }
}

/// The random streams of one client's round. `sampling` draws the Poisson
/// batches and the dropout seeds; `noise` draws the Gaussian noise. They are
/// separate so that tests can change the noise alone, and both are ChaCha20,
/// a CSPRNG.
#[derive(Debug, Clone)]
pub struct ClientStreams {
    /// Batch sampling and dropout masks.
    pub sampling: ChaCha20Rng,
    /// DP noise.
    pub noise: ChaCha20Rng,
}

impl ClientStreams {
    /// Both streams seeded from the operating system (the default for a real
    /// release: nobody can reproduce the noise).
    pub fn from_os() -> Self {
        Self {
            sampling: ChaCha20Rng::from_os_rng(),
            noise: ChaCha20Rng::from_os_rng(),
        }
    }

    /// Both streams derived from a seed (reproducible runs; not for a real
    /// release, since whoever knows the seed can subtract the noise).
    pub fn from_seed(seed: u64) -> Self {
        let mut root = ChaCha20Rng::seed_from_u64(seed);
        Self {
            sampling: ChaCha20Rng::seed_from_u64(root.random()),
            noise: ChaCha20Rng::seed_from_u64(root.random()),
        }
    }
}

/// What one client's local round did.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LocalReport {
    /// Optimizer steps taken (τ, including steps on empty batches).
    pub steps: usize,
    /// Examples processed over all steps.
    pub examples_seen: usize,
    /// Mean training loss over the examples processed.
    pub mean_loss: f64,
    /// Fraction of per-example gradients that clipping shortened (DP only).
    pub clipped_fraction: f64,
}

/// Runs `training.steps` local steps on `state`. Per step: Poisson-sample a
/// logical batch with q = L / n_k; split it into physical batches; sum the
/// (clipped, under DP) per-example gradients of all trainable parameters
/// jointly; under DP add one N(0, σ²C²) draw per coordinate and divide by L
/// (the expected batch size, not the realized one), otherwise divide by the
/// realized size; take an SGD step.
pub fn train_locally(
    model: &Model,
    state: &mut LoraState,
    data: &ClientData,
    training: &LocalTraining,
    streams: &mut ClientStreams,
) -> Result<LocalReport> {
    training.validate()?;
    let layout = model.layout(state);
    let q = training.sample_rate(data.len());
    let mut report = LocalReport::default();
    let mut loss_sum = 0.0f64;
    let mut clipped = 0usize;
    let mut direction = vec![0.0f32; layout.len];
    for _ in 0..training.steps {
        let chosen: Vec<usize> = (0..data.len())
            .filter(|_| streams.sampling.random::<f64>() < q)
            .collect();
        direction.fill(0.0);
        for chunk in chosen.chunks(training.physical_batch) {
            let (batch, labels) = data.batch(chunk)?;
            let dropout_seed = streams.sampling.random::<u64>();
            let grads = model.gradients(state, &batch, &labels, Some(dropout_seed))?;
            loss_sum += grads.losses().iter().map(|&l| f64::from(l)).sum::<f64>();
            let sum = match training.privatization {
                Privatization::DpSgd { clip, .. } => {
                    let (sum, norms) = grads.clipped_sum(clip)?;
                    clipped += norms.iter().filter(|&&n| n > clip).count();
                    sum
                }
                Privatization::NonPrivate { .. } => grads.sum(),
            };
            for (d, g) in direction.iter_mut().zip(sum) {
                *d += g;
            }
        }
        report.examples_seen += chosen.len();
        report.steps += 1;
        match training.privatization {
            Privatization::DpSgd {
                clip,
                noise_multiplier,
            } => {
                let std = f64::from(noise_multiplier) * f64::from(clip);
                let inv_l = 1.0 / training.expected_batch as f64;
                for d in direction.iter_mut() {
                    let z: f64 = StandardNormal.sample(&mut streams.noise);
                    *d = ((f64::from(*d) + std * z) * inv_l) as f32;
                }
            }
            Privatization::NonPrivate { max_grad_norm } => {
                if chosen.is_empty() {
                    continue;
                }
                let inv_b = 1.0 / chosen.len() as f32;
                direction.iter_mut().for_each(|d| *d *= inv_b);
                if let Some(max) = max_grad_norm {
                    let norm = direction
                        .iter()
                        .map(|&d| f64::from(d) * f64::from(d))
                        .sum::<f64>()
                        .sqrt() as f32;
                    if norm > max {
                        let s = max / (norm + 1e-6);
                        direction.iter_mut().for_each(|d| *d *= s);
                    }
                }
            }
        }
        layout.apply_update(state, &direction, training.lr)?;
    }
    if report.examples_seen > 0 {
        report.mean_loss = loss_sum / report.examples_seen as f64;
        report.clipped_fraction = clipped as f64 / report.examples_seen as f64;
    }
    Ok(report)
}
