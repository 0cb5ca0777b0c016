//! A client's local training: DP-SGD exactly as method.md §5, or plain SGD.

use fedsvd_dp::GaussianNoise;
use fedsvd_model::{Batch, ComputeEngine, CpuEngine, LoraState, Model};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
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
        /// Noise multiplier σ, exactly as the accountant calibrated it (f64:
        /// never rounded below what the ledger records).
        noise_multiplier: f64,
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

/// White-box gradient canaries (the privacy audit's): extra members of a
/// client's data set whose per-example gradient is fixed rather than
/// computed. Canary `j` has the gradient `norm · e_c` for coordinate `c =
/// coordinates[j]` of the flat trainable vector. Each is Poisson-sampled
/// with the same rate as a real example and clipped like one.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientCanaries {
    /// The coordinate each canary's gradient sits on.
    pub coordinates: Vec<usize>,
    /// The norm of every canary's gradient before clipping.
    pub norm: f32,
}

/// A deliberate break of the mechanism, for tests that must see the audit
/// catch it. Only builds with the `fault-injection` feature (the crate's
/// own tests) have it; release builds cannot reach it.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Per-example gradients are summed without clipping.
    DisableClipping,
    /// The noise standard deviation is divided by this factor.
    DivideNoise(f64),
}

/// What a local round carries besides the data: the audit's gradient
/// canaries and, in test builds, a deliberate fault. The default is
/// neither; [`train_locally`] uses it.
#[derive(Debug, Clone, Default)]
pub struct Instrumentation<'a> {
    pub(crate) canaries: Option<&'a GradientCanaries>,
    #[cfg(feature = "fault-injection")]
    pub(crate) fault: Option<Fault>,
}

impl<'a> Instrumentation<'a> {
    /// Trains with `canaries` among the client's examples.
    pub fn with_canaries(canaries: &'a GradientCanaries) -> Self {
        Self::default().and_canaries(canaries)
    }

    /// These instruments with `canaries` added (any fault is kept).
    pub fn and_canaries<'b>(self, canaries: &'b GradientCanaries) -> Instrumentation<'b>
    where
        'a: 'b,
    {
        let mut out: Instrumentation<'b> = self;
        out.canaries = Some(canaries);
        out
    }

    /// Breaks the mechanism as `fault` says (test builds only).
    #[cfg(feature = "fault-injection")]
    pub fn with_fault(mut self, fault: Fault) -> Self {
        self.fault = Some(fault);
        self
    }

    fn clipping_disabled(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        if self.fault == Some(Fault::DisableClipping) {
            return true;
        }
        false
    }

    fn noise_divisor(&self) -> f64 {
        #[cfg(feature = "fault-injection")]
        if let Some(Fault::DivideNoise(d)) = self.fault {
            return d;
        }
        1.0
    }
}

/// The DP-SGD step's release: `direction` holds the clipped sum on entry
/// and the private update direction on return, `(sum + noise) / L` with the
/// noise of `draw` (see [`GaussianNoise::release`]) and L the expected
/// batch. Every device's step ends here, so the mechanism is written once.
pub fn private_direction(
    noise: &GaussianNoise,
    draw: &fedsvd_dp::NoiseDraw,
    expected_batch: usize,
    released: &mut [f64],
    direction: &mut [f32],
) -> Result<()> {
    noise.release(direction, draw, released)?;
    let inv_l = 1.0 / expected_batch.max(1) as f64;
    for (d, r) in direction.iter_mut().zip(released.iter()) {
        *d = (r * inv_l) as f32;
    }
    Ok(())
}

/// Runs `training.steps` local steps on `state`. Per step: Poisson-sample a
/// logical batch with q = L / n_k; split it into physical batches; sum the
/// (clipped, under DP) per-example gradients of all trainable parameters
/// jointly; under DP release the sum through [`GaussianNoise`] (the sum on a
/// grid plus exact discrete Gaussian noise of standard deviation at least
/// σ·C, drawn from the noise stream) and divide by L (the expected batch
/// size, not the realized one), otherwise divide by the realized size;
/// take an SGD step. This is the only DP-SGD step in the workspace: `fedsvd
/// run`, the benchmarks and the audit all execute it.
pub fn train_locally(
    model: &Model,
    state: &mut LoraState,
    data: &ClientData,
    training: &LocalTraining,
    streams: &mut ClientStreams,
) -> Result<LocalReport> {
    train_locally_instrumented(
        model,
        state,
        data,
        training,
        streams,
        &Instrumentation::default(),
    )
}

/// [`train_locally`] with gradient canaries (the audit) or, in test builds,
/// a deliberate fault.
pub fn train_locally_instrumented(
    model: &Model,
    state: &mut LoraState,
    data: &ClientData,
    training: &LocalTraining,
    streams: &mut ClientStreams,
    extra: &Instrumentation<'_>,
) -> Result<LocalReport> {
    train_locally_on(&mut CpuEngine(model), state, data, training, streams, extra)
}

/// [`train_locally_instrumented`] on any compute device: the per-example
/// gradients, their norms and the clipped sum come from `engine` (the CPU
/// model, or the GPU step of `fedsvd-model`); sampling, canaries, the noise
/// release and the update are the same code for every device, on the host.
pub fn train_locally_on(
    engine: &mut dyn ComputeEngine,
    state: &mut LoraState,
    data: &ClientData,
    training: &LocalTraining,
    streams: &mut ClientStreams,
    extra: &Instrumentation<'_>,
) -> Result<LocalReport> {
    training.validate()?;
    let layout = engine.model().layout(state);
    let q = training.sample_rate(data.len());
    let canaries = extra.canaries;
    if let Some(c) = canaries {
        if let Some(&bad) = c.coordinates.iter().find(|&&i| i >= layout.len) {
            return Err(Error::InvalidConfig {
                key: "audit.canaries",
                value: format!("coordinate {bad} of {} trainable values", layout.len),
                allowed: "canary coordinates inside the trainable vector",
            });
        }
        if !(c.norm.is_finite() && c.norm > 0.0) {
            return Err(Error::InvalidConfig {
                key: "audit.canary_norm",
                value: c.norm.to_string(),
                allowed: "a positive finite gradient norm",
            });
        }
    }
    let noise = match training.privatization {
        Privatization::DpSgd {
            clip,
            noise_multiplier,
        } => Some(GaussianNoise::new(
            f64::from(clip),
            noise_multiplier / extra.noise_divisor(),
            layout.len,
        )?),
        Privatization::NonPrivate { .. } => None,
    };
    let mut report = LocalReport::default();
    let mut loss_sum = 0.0f64;
    let mut clipped = 0usize;
    let mut direction = vec![0.0f32; layout.len];
    let mut released = vec![0.0f64; layout.len];
    for _ in 0..training.steps {
        let chosen: Vec<usize> = (0..data.len())
            .filter(|_| streams.sampling.random::<f64>() < q)
            .collect();
        let chosen_canaries: Vec<usize> = match canaries {
            Some(c) => c
                .coordinates
                .iter()
                .copied()
                .filter(|_| streams.sampling.random::<f64>() < q)
                .collect(),
            None => Vec::new(),
        };
        direction.fill(0.0);
        let clip = match training.privatization {
            Privatization::DpSgd { clip, .. } if !extra.clipping_disabled() => Some(clip),
            _ => None,
        };
        // The noise does not depend on the gradients, so it is drawn (from
        // its own stream) on another core while the device computes them;
        // the values are the same as drawing it afterwards.
        let ClientStreams {
            sampling,
            noise: noise_rng,
        } = streams;
        let (summed, draw) = rayon::join(
            || -> Result<()> {
                for chunk in chosen.chunks(training.physical_batch) {
                    let (batch, labels) = data.batch(chunk)?;
                    let dropout_seed = sampling.random::<u64>();
                    let sums =
                        engine.step_sums(state, &batch, &labels, clip, Some(dropout_seed))?;
                    loss_sum += sums.losses.iter().map(|&l| f64::from(l)).sum::<f64>();
                    if let Some(c) = clip {
                        clipped += sums.norms.iter().filter(|&&n| n > c).count();
                    }
                    if sums.sum.len() != layout.len {
                        return Err(Error::Model(fedsvd_model::Error::LengthMismatch {
                            what: "gradient sum from the compute device".into(),
                            expected: layout.len,
                            found: sums.sum.len(),
                        }));
                    }
                    for (d, g) in direction.iter_mut().zip(sums.sum) {
                        *d += g;
                    }
                }
                Ok(())
            },
            || noise.as_ref().map(|n| n.draw(noise_rng)),
        );
        summed?;
        if let Some(c) = canaries {
            let weight = match training.privatization {
                Privatization::DpSgd { clip, .. } if !extra.clipping_disabled() => {
                    (clip / (c.norm + 1e-6)).min(1.0)
                }
                _ => 1.0,
            };
            for &i in &chosen_canaries {
                direction[i] += c.norm * weight;
            }
        }
        report.examples_seen += chosen.len();
        report.steps += 1;
        match (&noise, draw) {
            (Some(noise), Some(draw)) => {
                private_direction(
                    noise,
                    &draw,
                    training.expected_batch,
                    &mut released,
                    &mut direction,
                )?;
            }
            _ => {
                let max_grad_norm = match training.privatization {
                    Privatization::NonPrivate { max_grad_norm } => max_grad_norm,
                    Privatization::DpSgd { .. } => None,
                };
                let batch = chosen.len() + chosen_canaries.len();
                if batch == 0 {
                    continue;
                }
                let inv_b = 1.0 / batch as f32;
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
