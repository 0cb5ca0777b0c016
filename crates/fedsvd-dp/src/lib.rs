#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
// Job: the Rényi-DP and PRV accountants of the Poisson-subsampled Gaussian
// mechanism, calibration of the noise multiplier to a target (ε, δ), and a
// serializable per-party ledger of the privacy spent, and the exact
// discrete Gaussian noise that DP-SGD adds (the only IO-free randomness the
// crate touches: callers pass their CSPRNG in).
// Boundary: pure computation, no IO, no other fedsvd crate.

mod accountant;
mod calibrate;
mod error;
mod history;
mod ledger;
pub mod noise;
pub mod prv;
pub mod rdp;
pub mod special;

pub use accountant::{Accountant, AccountantKind, Spent};
pub use calibrate::{
    Calibration, DEFAULT_EPSILON_TOLERANCE, MAX_NOISE_MULTIPLIER, calibrate_noise,
};
pub use error::{Error, Result};
pub use history::{HistoryEntry, total_steps};
pub use ledger::PrivacyLedger;
pub use noise::{
    GaussianNoise, NOISE_BLOCK, NOISE_GRID_CELLS, NoiseDraw, RngSource, UniformSource,
    discrete_gaussian,
};
pub use prv::{ComposedPrv, PrvAccountant, PrvDelta, PrvEpsilon};
pub use rdp::{RdpAccountant, RdpDelta, RdpEpsilon, default_orders};
