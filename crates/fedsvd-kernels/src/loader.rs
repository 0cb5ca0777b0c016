//! What the machine offers the CUDA backend, observed before anything is
//! loaded, and the one decision (with its messages) of whether training can
//! run on it.
//!
//! The decision is a pure function of a [`CudaEnvironment`], so each way a
//! machine can lack CUDA (no libcuda, no device, a driver too old for our
//! PTX, no libcublas) is tested by constructing the environment, on machines
//! that cannot produce the failure themselves.

use std::panic::catch_unwind;

use cudarc::driver::{CudaContext, sys};

use crate::{Error, Result};

/// The oldest driver API version (`cuDriverGetVersion`: 1000 × major + 10 ×
/// minor) that loads our PTX: its ISA ([`crate::ptx::MAX_PTX_ISA`], 9.0)
/// came with CUDA 13.0.
pub const REQUIRED_DRIVER_VERSION: i32 = 13000;

/// What a machine offers the CUDA backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaEnvironment {
    /// Whether the driver library (libcuda) can be opened.
    pub driver_library: bool,
    /// The driver's CUDA version, when the library answers.
    pub driver_version: Option<i32>,
    /// How many devices the driver reports, or why it cannot tell.
    pub devices: std::result::Result<usize, String>,
    /// Whether libcublas can be opened.
    pub cublas_library: bool,
}

impl CudaEnvironment {
    /// Asks this machine (never panics, also without a driver).
    pub fn observe() -> Self {
        // SAFETY: only tries to open the shared library.
        let driver_library = unsafe { sys::is_culib_present() };
        // SAFETY: only tries to open the shared library.
        let cublas_library = unsafe { cudarc::cublas::sys::is_culib_present() };
        if !driver_library {
            return Self {
                driver_library,
                driver_version: None,
                devices: Ok(0),
                cublas_library,
            };
        }
        let driver_version = catch_unwind(|| {
            let mut v = 0i32;
            // SAFETY: the library is present; the pointer is to a local.
            let status = unsafe { sys::cuDriverGetVersion(&mut v) };
            (status == sys::cudaError_enum::CUDA_SUCCESS).then_some(v)
        })
        .ok()
        .flatten();
        let devices = match catch_unwind(CudaContext::device_count) {
            Ok(Ok(n)) => Ok(n.max(0) as usize),
            Ok(Err(e)) if e.0 == sys::cudaError_enum::CUDA_ERROR_NO_DEVICE => Ok(0),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the CUDA driver library lacks a required entry point".into()),
        };
        Self {
            driver_library,
            driver_version,
            devices,
            cublas_library,
        }
    }

    /// Whether device `ordinal` can run our kernels; the error says what is
    /// missing and what to do.
    pub fn check_kernels(&self, ordinal: usize) -> Result<()> {
        if !self.driver_library {
            return Err(Error::NoDevice(
                "the NVIDIA driver library (libcuda.so.1) is not installed or not on the \
                 loader path"
                    .into(),
            ));
        }
        if let Some(v) = self.driver_version
            && v < REQUIRED_DRIVER_VERSION
        {
            return Err(Error::NoDevice(format!(
                "the NVIDIA driver supports CUDA {}.{}, but the kernels' PTX (ISA {}.{}) needs \
                 CUDA {}.{} or newer: update the driver",
                v / 1000,
                (v % 1000) / 10,
                crate::ptx::MAX_PTX_ISA.0,
                crate::ptx::MAX_PTX_ISA.1,
                REQUIRED_DRIVER_VERSION / 1000,
                (REQUIRED_DRIVER_VERSION % 1000) / 10
            )));
        }
        match &self.devices {
            Err(m) => Err(Error::NoDevice(format!(
                "the CUDA driver failed to start: {m}"
            ))),
            Ok(0) => Err(Error::NoDevice("the driver reports no CUDA device".into())),
            Ok(n) if ordinal >= *n => Err(Error::NoDevice(format!(
                "device {ordinal} requested, {n} present"
            ))),
            Ok(_) => Ok(()),
        }
    }

    /// [`CudaEnvironment::check_kernels`], and cuBLAS, which the training
    /// step's GEMMs need.
    pub fn check_training(&self, ordinal: usize) -> Result<()> {
        self.check_kernels(ordinal)?;
        if !self.cublas_library {
            return Err(Error::NoDevice(
                "libcublas (CUDA 13) is not installed or not on the loader path; the GPU \
                 training step runs its GEMMs through cuBLAS"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> CudaEnvironment {
        CudaEnvironment {
            driver_library: true,
            driver_version: Some(13000),
            devices: Ok(1),
            cublas_library: true,
        }
    }

    fn message(r: Result<()>) -> String {
        match r {
            Err(Error::NoDevice(m)) => m,
            other => panic!("expected NoDevice, got {other:?}"),
        }
    }

    #[test]
    fn a_complete_machine_passes() {
        machine().check_training(0).unwrap();
    }

    #[test]
    fn a_missing_driver_library_is_named() {
        let env = CudaEnvironment {
            driver_library: false,
            driver_version: None,
            devices: Ok(0),
            ..machine()
        };
        assert!(message(env.check_training(0)).contains("libcuda.so.1"));
    }

    #[test]
    fn a_driver_too_old_for_the_ptx_says_which_versions() {
        let env = CudaEnvironment {
            driver_version: Some(12040),
            ..machine()
        };
        let m = message(env.check_kernels(0));
        assert!(m.contains("CUDA 12.4") && m.contains("13.0"), "{m}");
        assert!(m.contains("update the driver"), "{m}");
    }

    #[test]
    fn a_missing_cublas_stops_training_but_not_the_kernels() {
        let env = CudaEnvironment {
            cublas_library: false,
            ..machine()
        };
        env.check_kernels(0).unwrap();
        assert!(message(env.check_training(0)).contains("libcublas"));
    }

    #[test]
    fn no_device_and_a_failed_driver_are_distinguished() {
        let none = CudaEnvironment {
            devices: Ok(0),
            ..machine()
        };
        assert!(message(none.check_kernels(0)).contains("no CUDA device"));
        let failed = CudaEnvironment {
            devices: Err("CUDA_ERROR_NOT_INITIALIZED".into()),
            ..machine()
        };
        assert!(message(failed.check_kernels(0)).contains("CUDA_ERROR_NOT_INITIALIZED"));
        assert!(message(machine().check_kernels(1)).contains("device 1 requested, 1 present"));
    }

    /// This machine's own answer never panics and agrees with `probe`.
    #[test]
    fn observing_this_machine_agrees_with_probe() {
        let env = CudaEnvironment::observe();
        match crate::probe() {
            crate::DeviceProbe::NoDriver => assert!(!env.driver_library),
            crate::DeviceProbe::Devices(n) => assert_eq!(env.devices, Ok(n)),
            _ => assert!(env.check_kernels(0).is_err()),
        }
    }
}
