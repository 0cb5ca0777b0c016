//! Privacy accounting for DP-SGD.
//!
//! Job: the Rényi-DP and PRV accountants of the Poisson-subsampled Gaussian
//! mechanism, calibration of the noise multiplier to a target (ε, δ), and a
//! serializable per-party ledger of the privacy spent.
//!
//! Boundary: pure computation, no IO, no other fedsvd crate.
