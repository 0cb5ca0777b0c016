//! Histories of the Poisson-subsampled Gaussian mechanism.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `steps` consecutive DP-SGD steps with noise multiplier σ and Poisson
/// sampling rate q. A history is a slice of these, composed together.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawEntry", into = "RawEntry")]
pub struct HistoryEntry {
    noise_multiplier: f64,
    sample_rate: f64,
    steps: u64,
}

#[derive(Serialize, Deserialize)]
struct RawEntry {
    noise_multiplier: f64,
    sample_rate: f64,
    steps: u64,
}

impl TryFrom<RawEntry> for HistoryEntry {
    type Error = Error;
    fn try_from(raw: RawEntry) -> Result<Self> {
        HistoryEntry::new(raw.noise_multiplier, raw.sample_rate, raw.steps)
    }
}

impl From<HistoryEntry> for RawEntry {
    fn from(e: HistoryEntry) -> Self {
        RawEntry {
            noise_multiplier: e.noise_multiplier,
            sample_rate: e.sample_rate,
            steps: e.steps,
        }
    }
}

impl HistoryEntry {
    /// A validated entry: σ finite and > 0, q in [0, 1], steps ≥ 1.
    pub fn new(noise_multiplier: f64, sample_rate: f64, steps: u64) -> Result<Self> {
        check_noise_multiplier(noise_multiplier)?;
        check_sample_rate(sample_rate)?;
        if steps == 0 {
            return Err(Error::ZeroSteps);
        }
        Ok(Self {
            noise_multiplier,
            sample_rate,
            steps,
        })
    }

    /// Noise multiplier σ (noise std divided by the clipping norm).
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// Poisson sampling rate q.
    pub fn sample_rate(&self) -> f64 {
        self.sample_rate
    }

    /// Number of steps.
    pub fn steps(&self) -> u64 {
        self.steps
    }
}

/// Total number of steps of a history.
pub fn total_steps(history: &[HistoryEntry]) -> u64 {
    history.iter().map(|e| e.steps).sum()
}

pub(crate) fn check_noise_multiplier(sigma: f64) -> Result<()> {
    if sigma.is_finite() && sigma > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidNoiseMultiplier(sigma))
    }
}

pub(crate) fn check_sample_rate(q: f64) -> Result<()> {
    if (0.0..=1.0).contains(&q) {
        Ok(())
    } else {
        Err(Error::InvalidSampleRate(q))
    }
}

pub(crate) fn check_delta(delta: f64) -> Result<()> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(Error::InvalidDelta(delta))
    }
}

pub(crate) fn check_epsilon(epsilon: f64) -> Result<()> {
    if epsilon.is_finite() && epsilon >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidEpsilon(epsilon))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_entries_are_typed_errors() {
        assert_eq!(
            HistoryEntry::new(0.0, 0.1, 1),
            Err(Error::InvalidNoiseMultiplier(0.0))
        );
        assert!(matches!(
            HistoryEntry::new(f64::NAN, 0.1, 1),
            Err(Error::InvalidNoiseMultiplier(_))
        ));
        assert_eq!(
            HistoryEntry::new(f64::INFINITY, 0.1, 1),
            Err(Error::InvalidNoiseMultiplier(f64::INFINITY))
        );
        assert_eq!(
            HistoryEntry::new(1.0, 1.5, 1),
            Err(Error::InvalidSampleRate(1.5))
        );
        assert_eq!(
            HistoryEntry::new(1.0, -0.1, 1),
            Err(Error::InvalidSampleRate(-0.1))
        );
        assert!(matches!(
            HistoryEntry::new(1.0, f64::NAN, 1),
            Err(Error::InvalidSampleRate(_))
        ));
        assert_eq!(HistoryEntry::new(1.0, 0.1, 0), Err(Error::ZeroSteps));
        assert!(HistoryEntry::new(1.0, 0.0, 1).is_ok());
        assert!(HistoryEntry::new(1.0, 1.0, 1).is_ok());
    }

    #[test]
    fn deserialization_validates() {
        let good: HistoryEntry =
            serde_json::from_str(r#"{"noise_multiplier":1.0,"sample_rate":0.1,"steps":3}"#)
                .unwrap();
        assert_eq!(good, HistoryEntry::new(1.0, 0.1, 3).unwrap());
        let bad: std::result::Result<HistoryEntry, _> =
            serde_json::from_str(r#"{"noise_multiplier":1.0,"sample_rate":2.0,"steps":3}"#);
        assert!(bad.is_err());
    }
}
