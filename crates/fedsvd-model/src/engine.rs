//! The typed interface between training and a compute device: what one
//! DP-SGD step and an evaluation need from it. [`CpuEngine`] (the model's own
//! per-example gradients) and [`GpuModel`] (the same step on a
//! `fedsvd-kernels` backend) implement it; `fedsvd::train_locally` is the one
//! step written against it, so each mechanism (per-example gradients, norms,
//! clipped sum) has one implementation per device and the release of the sum
//! (noise, update) has one implementation for all.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gpu::{GpuModel, Precision};
use crate::lora::LoraState;
use crate::model::{EvalMetrics, Model};
use crate::tokenizer::Batch;

/// What one physical batch of a step returns to the host.
#[derive(Debug, Clone, PartialEq)]
pub struct StepSums {
    /// `Σ_i w_i g_i` over the batch's examples in [`crate::ParamLayout`]
    /// order: `w_i = min(1, C/(‖g_i‖ + 1e-6))` when clipping at `C`, else 1.
    pub sum: Vec<f32>,
    /// `‖g_i‖₂` of each example's whole trainable gradient (empty when not
    /// clipping and the device did not compute them).
    pub norms: Vec<f32>,
    /// Per-example cross-entropy.
    pub losses: Vec<f32>,
}

/// Which device computed, as written to a run's summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `cpu` or `cuda`.
    pub kind: String,
    /// The device's name (`cuda:0 NVIDIA H200 (sm_90)`, or the CPU's thread
    /// count).
    pub name: String,
    /// The CUDA driver's version (`13.0`), for CUDA devices.
    pub driver: Option<String>,
    /// GEMM precision of the frozen encoder (`f32` on the CPU).
    pub precision: String,
}

/// A compute device for training and evaluation (`Send`: the DP step
/// draws its noise on another core while the engine computes).
pub trait ComputeEngine: Send {
    /// The model (weights on the host, options, layouts).
    fn model(&self) -> &Model;

    /// Which device this is.
    fn device(&self) -> DeviceInfo;

    /// Per-example gradients of every trainable tensor of `state` on
    /// `batch`, their norms, and their sum, each clipped to `clip` when
    /// given. `dropout_seed` keys the LoRA dropout masks (`None`: no
    /// dropout).
    fn step_sums(
        &mut self,
        state: &LoraState,
        batch: &Batch,
        labels: &[usize],
        clip: Option<f32>,
        dropout_seed: Option<u64>,
    ) -> Result<StepSums>;

    /// `[batch, num_labels]` logits in evaluation mode.
    fn logits(&mut self, state: &LoraState, batch: &Batch) -> Result<Vec<f32>>;

    /// Mean cross-entropy and accuracy of `state` over `batches`.
    fn evaluate<'a>(
        &mut self,
        state: &LoraState,
        batches: &mut dyn Iterator<Item = (&'a Batch, &'a [usize])>,
    ) -> Result<EvalMetrics> {
        let classes = self.model().head_config().num_labels;
        let mut score = Scores::default();
        for (batch, labels) in batches {
            if labels.len() != batch.len() {
                return Err(Error::LengthMismatch {
                    what: "labels".into(),
                    expected: batch.len(),
                    found: labels.len(),
                });
            }
            let logits = self.logits(state, batch)?;
            score.add(&logits, labels, classes)?;
        }
        score.finish()
    }
}

/// Running totals of an evaluation.
#[derive(Debug, Default)]
pub(crate) struct Scores {
    loss: f64,
    correct: usize,
    seen: usize,
}

impl Scores {
    /// Adds a batch's logits (`[labels.len(), classes]`).
    pub(crate) fn add(&mut self, logits: &[f32], labels: &[usize], classes: usize) -> Result<()> {
        if logits.len() != labels.len() * classes {
            return Err(Error::LengthMismatch {
                what: "logits".into(),
                expected: labels.len() * classes,
                found: logits.len(),
            });
        }
        for (z, &y) in logits.chunks_exact(classes).zip(labels) {
            if y >= classes {
                return Err(Error::InvalidBatch(format!(
                    "label {y} out of range for {classes} classes"
                )));
            }
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max as f64 + z.iter().map(|v| ((v - max) as f64).exp()).sum::<f64>().ln();
            self.loss += lse - z[y] as f64;
            let arg = z
                .iter()
                .enumerate()
                .fold(0, |best, (j, v)| if *v > z[best] { j } else { best });
            self.correct += usize::from(arg == y);
            self.seen += 1;
        }
        Ok(())
    }

    /// The means; an error when nothing was scored.
    pub(crate) fn finish(&self) -> Result<EvalMetrics> {
        if self.seen == 0 {
            return Err(Error::InvalidBatch("evaluation set is empty".into()));
        }
        Ok(EvalMetrics {
            loss: self.loss / self.seen as f64,
            accuracy: self.correct as f64 / self.seen as f64,
            examples: self.seen,
        })
    }
}

/// The CPU: [`Model::gradients`] and [`Model::logits`] on the host's cores.
#[derive(Debug, Clone, Copy)]
pub struct CpuEngine<'a>(pub &'a Model);

impl ComputeEngine for CpuEngine<'_> {
    fn model(&self) -> &Model {
        self.0
    }

    fn device(&self) -> DeviceInfo {
        DeviceInfo {
            kind: "cpu".into(),
            name: format!("cpu ({} threads)", rayon::current_num_threads()),
            driver: None,
            precision: "f32".into(),
        }
    }

    fn step_sums(
        &mut self,
        state: &LoraState,
        batch: &Batch,
        labels: &[usize],
        clip: Option<f32>,
        dropout_seed: Option<u64>,
    ) -> Result<StepSums> {
        let grads = self.0.gradients(state, batch, labels, dropout_seed)?;
        let losses = grads.losses().to_vec();
        let (sum, norms) = match clip {
            Some(c) => grads.clipped_sum(c)?,
            None => (grads.sum(), Vec::new()),
        };
        Ok(StepSums { sum, norms, losses })
    }

    fn logits(&mut self, state: &LoraState, batch: &Batch) -> Result<Vec<f32>> {
        self.0.logits(state, batch)
    }
}

impl ComputeEngine for GpuModel {
    fn model(&self) -> &Model {
        GpuModel::model(self)
    }

    fn device(&self) -> DeviceInfo {
        let driver = fedsvd_kernels::CudaEnvironment::observe()
            .driver_version
            .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10));
        let cuda = self.is_cuda();
        DeviceInfo {
            kind: if cuda { "cuda" } else { "cpu-reference" }.into(),
            name: self.backend_name(),
            driver: if cuda { driver } else { None },
            precision: precision_name(self.precision()).into(),
        }
    }

    fn step_sums(
        &mut self,
        state: &LoraState,
        batch: &Batch,
        labels: &[usize],
        clip: Option<f32>,
        dropout_seed: Option<u64>,
    ) -> Result<StepSums> {
        self.sync_state(state)?;
        let g = match clip {
            Some(c) => self.clipped_sum(batch, labels, c, dropout_seed)?,
            None => self.sum(batch, labels, dropout_seed)?,
        };
        Ok(StepSums {
            sum: g.sum,
            norms: g.norms,
            losses: g.losses,
        })
    }

    fn logits(&mut self, state: &LoraState, batch: &Batch) -> Result<Vec<f32>> {
        self.sync_state(state)?;
        GpuModel::logits(self, batch)
    }
}

/// The name of a precision in configs and summaries.
pub fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::F32 => "f32",
        Precision::Tf32 => "tf32",
        Precision::Bf16 => "bf16",
    }
}
