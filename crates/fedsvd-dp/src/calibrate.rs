//! Calibration of the noise multiplier to a target (ε, δ).

use crate::history::{check_delta, check_sample_rate};
use crate::{Accountant, Error, HistoryEntry, Result};

/// Opacus's default: the calibrated σ has ε within 0.01 below the target.
pub const DEFAULT_EPSILON_TOLERANCE: f64 = 0.01;

/// Beyond this noise multiplier a target is declared impossible (as Opacus).
pub const MAX_NOISE_MULTIPLIER: f64 = 1e6;

const MAX_EVALUATIONS: usize = 200;

/// A calibrated noise multiplier and the ε it achieves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// The noise multiplier σ.
    pub noise_multiplier: f64,
    /// ε at σ: target − tolerance ≤ ε ≤ target.
    pub epsilon: f64,
    /// The optimal Rényi order at σ (RDP only).
    pub order: Option<f64>,
    /// How many accountant evaluations the search took.
    pub evaluations: usize,
}

/// The noise multiplier for `steps` steps at sampling rate q whose ε at δ
/// lies in [target − tolerance, target] (so ε ≤ target always holds).
///
/// Like Opacus it brackets from σ = 20 upwards by doubling (an error past
/// σ = 10⁶: the target is impossible), then searches downwards; instead of
/// plain bisection it uses safeguarded false position on ε against 1/σ
/// (ε is close to linear in 1/σ), aiming at the middle of the window, so
/// it needs a handful of evaluations rather than a dozen or more.
pub fn calibrate_noise(
    accountant: &Accountant,
    target_epsilon: f64,
    sample_rate: f64,
    steps: u64,
    delta: f64,
    tolerance: f64,
) -> Result<Calibration> {
    if !(target_epsilon.is_finite() && target_epsilon > 0.0) {
        return Err(Error::InvalidEpsilon(target_epsilon));
    }
    if !(tolerance.is_finite() && tolerance > 0.0) {
        return Err(Error::InvalidParameter {
            name: "epsilon tolerance",
            value: tolerance,
            reason: "it must be finite and > 0",
        });
    }
    check_sample_rate(sample_rate)?;
    if sample_rate == 0.0 {
        return Err(Error::InvalidParameter {
            name: "sample_rate",
            value: 0.0,
            reason: "it must be > 0 to calibrate: with q = 0 no step touches the data",
        });
    }
    check_delta(delta)?;
    HistoryEntry::new(1.0, sample_rate, steps)?;

    let evaluations = std::cell::Cell::new(0usize);
    let eval = |sigma: f64| -> Result<(f64, Option<f64>)> {
        evaluations.set(evaluations.get() + 1);
        let h = [HistoryEntry::new(sigma, sample_rate, steps)?];
        match accountant.epsilon(&h, delta) {
            Ok(s) => Ok((s.epsilon, s.order)),
            // A grid too large to build means a huge ε: far above any target.
            Err(Error::GridTooLarge { .. }) => Ok((f64::INFINITY, None)),
            Err(e) => Err(e),
        }
    };
    let low_edge = target_epsilon - tolerance;
    let goal = target_epsilon - tolerance / 2.0;
    let accept = |e: f64| e <= target_epsilon && e >= low_edge;

    // Bracket from above: a σ whose ε is at most the target.
    let mut sigma_good = 20.0;
    let (mut eps_good, mut order_good) = eval(sigma_good)?;
    while eps_good > target_epsilon {
        if sigma_good >= MAX_NOISE_MULTIPLIER {
            return Err(Error::ImpossibleTarget {
                target_epsilon,
                delta,
                max_sigma: sigma_good,
                epsilon_at_max: eps_good,
            });
        }
        sigma_good *= 2.0;
        (eps_good, order_good) = eval(sigma_good)?;
    }
    let done = |sigma: f64, epsilon: f64, order: Option<f64>, evaluations: usize| Calibration {
        noise_multiplier: sigma,
        epsilon,
        order,
        evaluations,
    };
    if accept(eps_good) {
        return Ok(done(sigma_good, eps_good, order_good, evaluations.get()));
    }
    // Work in x = 1/σ, where ε is close to linear (and 0 at x = 0).
    let mut x_good = 1.0 / sigma_good;
    let mut f_good = eps_good - goal;
    // Find a σ with ε above the target, extrapolating along ε ∝ 1/σ.
    let (mut x_bad, mut f_bad);
    loop {
        let factor = if eps_good > 0.0 {
            (goal / eps_good).clamp(1.01, 64.0)
        } else {
            64.0
        };
        let x = x_good * factor;
        let (e, o) = eval(1.0 / x)?;
        if accept(e) {
            return Ok(done(1.0 / x, e, o, evaluations.get()));
        }
        if e < low_edge {
            (x_good, eps_good, f_good) = (x, e, e - goal);
        } else {
            (x_bad, f_bad) = (x, e - goal);
            break;
        }
        if evaluations.get() >= MAX_EVALUATIONS {
            return Err(Error::CalibrationDidNotConverge {
                target_epsilon,
                tolerance,
            });
        }
    }
    // Illinois false position between the two, bisection as a fallback.
    let mut side = 0i8;
    while evaluations.get() < MAX_EVALUATIONS {
        let width = x_bad - x_good;
        let mut x = if f_bad.is_finite() {
            x_bad - f_bad * width / (f_bad - f_good)
        } else {
            f64::NAN
        };
        // Keep the step well inside the bracket, else bisect.
        if !(x > x_good + 0.01 * width && x < x_bad - 0.01 * width) {
            x = 0.5 * (x_good + x_bad);
        }
        let (e, o) = eval(1.0 / x)?;
        if accept(e) {
            return Ok(done(1.0 / x, e, o, evaluations.get()));
        }
        let f = e - goal;
        if e < low_edge {
            x_good = x;
            f_good = f;
            if side == -1 {
                f_bad /= 2.0;
            }
            side = -1;
        } else {
            x_bad = x;
            f_bad = f;
            if side == 1 {
                f_good /= 2.0;
            }
            side = 1;
        }
        if (x_bad - x_good) <= 1e-15 * x_bad {
            break;
        }
    }
    Err(Error::CalibrationDidNotConverge {
        target_epsilon,
        tolerance,
    })
}
