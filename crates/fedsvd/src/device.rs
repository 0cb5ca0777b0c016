//! Which compute device trains and evaluates: the `model.device` and
//! `model.precision` keys, and how `auto` resolves.

use std::fmt;

use fedsvd_model::gpu::Precision;
use fedsvd_model::{DeviceInfo, GpuModel};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The device a run asks for (`model.device`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The first CUDA device when one is present, usable and supports the
    /// run's configuration; otherwise the CPU.
    #[default]
    Auto,
    /// The host's cores.
    Cpu,
    /// CUDA device 0; an error when there is none or the configuration
    /// cannot run on it.
    Cuda,
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        })
    }
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            other => Err(Error::InvalidConfig {
                key: "model.device",
                value: other.to_string(),
                allowed: "auto, cpu or cuda",
            }),
        }
    }
}

/// GEMM precision of the frozen encoder on a GPU (`model.precision`); the
/// CPU always computes in f32. Norms, clipping, noise and sums are f32 or
/// wider in every mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionChoice {
    /// f32 throughout: the reference, within 1e-4 of the CPU.
    #[default]
    F32,
    /// TF32 tensor cores for the frozen encoder's GEMMs.
    Tf32,
    /// bf16 inputs, f32 accumulation, for the frozen encoder's GEMMs.
    Bf16,
}

impl PrecisionChoice {
    /// The kernels' precision.
    pub fn precision(self) -> Precision {
        match self {
            PrecisionChoice::F32 => Precision::F32,
            PrecisionChoice::Tf32 => Precision::Tf32,
            PrecisionChoice::Bf16 => Precision::Bf16,
        }
    }
}

impl std::str::FromStr for PrecisionChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(PrecisionChoice::F32),
            "tf32" => Ok(PrecisionChoice::Tf32),
            "bf16" => Ok(PrecisionChoice::Bf16),
            other => Err(Error::InvalidConfig {
                key: "model.precision",
                value: other.to_string(),
                allowed: "f32, tf32 or bf16",
            }),
        }
    }
}

/// The device a run got, and why, when it is not what was asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedDevice {
    /// What was asked for.
    pub requested: DeviceChoice,
    /// What computes.
    pub device: DeviceInfo,
    /// Why `auto` chose the CPU (`null` when it chose CUDA or the device was
    /// named).
    pub fallback_reason: Option<String>,
}

/// Builds the GPU engine for `choice`, or says why the CPU computes.
///
/// Every method runs on a GPU: the engine trains whatever the method's
/// LoRA configuration makes trainable (`A`, `B`, the head). Whatever the
/// engine cannot run is an error of `build` (no device, a configuration it
/// refuses), which `cuda` reports and `auto` gives as its reason for the
/// CPU. `build` makes the engine (in tests, an injected failure).
pub fn resolve_gpu(
    choice: DeviceChoice,
    build: impl FnOnce() -> fedsvd_model::Result<GpuModel>,
) -> Result<(Option<GpuModel>, Option<String>)> {
    match choice {
        DeviceChoice::Cpu => Ok((None, None)),
        DeviceChoice::Cuda => {
            let gpu = build().map_err(|e| Error::Device {
                requested: "cuda",
                reason: e.to_string(),
            })?;
            Ok((Some(gpu), None))
        }
        DeviceChoice::Auto => match build() {
            Ok(gpu) => Ok((Some(gpu), None)),
            Err(e) => Ok((None, Some(e.to_string()))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_driver() -> fedsvd_model::Result<GpuModel> {
        Err(fedsvd_model::Error::Device(
            "no CUDA device: the NVIDIA driver library (libcuda.so.1) is not installed".into(),
        ))
    }

    #[test]
    fn choices_parse_and_print() {
        for c in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda] {
            assert_eq!(c.to_string().parse::<DeviceChoice>().unwrap(), c);
        }
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert_eq!(
            "bf16".parse::<PrecisionChoice>().unwrap(),
            PrecisionChoice::Bf16
        );
        assert!("fp16".parse::<PrecisionChoice>().is_err());
    }

    fn refused() -> fedsvd_model::Result<GpuModel> {
        Err(fedsvd_model::Error::UnsupportedConfig(
            "the GPU step needs something to train".into(),
        ))
    }

    #[test]
    fn cuda_without_a_device_is_an_error_naming_the_reason() {
        let err = resolve_gpu(DeviceChoice::Cuda, no_driver).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("cuda") && text.contains("libcuda.so.1"),
            "{text}"
        );
    }

    #[test]
    fn auto_falls_back_to_the_cpu_and_says_why() {
        let (gpu, why) = resolve_gpu(DeviceChoice::Auto, no_driver).unwrap();
        assert!(gpu.is_none());
        assert!(why.unwrap().contains("libcuda.so.1"));
    }

    #[test]
    fn a_configuration_the_engine_refuses_is_a_clear_error_or_the_reason_for_the_cpu() {
        let err = resolve_gpu(DeviceChoice::Cuda, refused).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("cuda") && text.contains("needs something to train"),
            "{text}"
        );
        let (gpu, why) = resolve_gpu(DeviceChoice::Auto, refused).unwrap();
        assert!(gpu.is_none());
        assert!(why.unwrap().contains("needs something to train"));
    }

    #[test]
    fn cpu_never_builds_a_gpu_engine() {
        let (gpu, why) = resolve_gpu(DeviceChoice::Cpu, || unreachable!()).unwrap();
        assert!(gpu.is_none() && why.is_none());
    }
}
