//! Calibration of the noise multiplier to a target (ε, δ).

use crate::history::{check_delta, check_sample_rate};
use crate::{Accountant, AccountantKind, Error, HistoryEntry, Result};

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
/// Opacus doubles σ from 20 until ε ≤ target (a target still missed at
/// σ = 10⁶ is impossible), then bisects. Here the search works on
/// ln ε against ln σ, which is nearly linear: secant steps until the
/// window is bracketed, then safeguarded false position (Illinois), aiming
/// at the middle of the window. The PRV search starts from the RDP answer
/// (cheap, and a few percent above the PRV σ). A handful of evaluations
/// replaces Opacus's dozen or more.
pub fn calibrate_noise(
    accountant: &Accountant,
    target_epsilon: f64,
    sample_rate: f64,
    steps: u64,
    delta: f64,
    tolerance: f64,
) -> Result<Calibration> {
    if !(target_epsilon.is_finite() && target_epsilon > 0.0) {
        return Err(Error::InvalidTargetEpsilon(target_epsilon));
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

    let (start, spent) = match accountant {
        Accountant::Prv(_) => {
            let rdp = Accountant::new(AccountantKind::Rdp);
            match calibrate_noise(&rdp, target_epsilon, sample_rate, steps, delta, tolerance) {
                Ok(c) => (c.noise_multiplier, c.evaluations),
                Err(_) => (20.0, 0),
            }
        }
        Accountant::Rdp(_) => (20.0, 0),
    };
    let mut evaluations = 0usize;
    let mut eval = |sigma: f64| -> Result<(f64, Option<f64>)> {
        evaluations += 1;
        let h = [HistoryEntry::new(sigma, sample_rate, steps)?];
        match accountant.epsilon(&h, delta) {
            Ok(s) => Ok((s.epsilon, s.order)),
            // A grid too large to build means a huge ε: far above any target.
            Err(Error::GridTooLarge { .. }) => Ok((f64::INFINITY, None)),
            Err(e) => Err(e),
        }
    };
    let found = search(&mut eval, start, target_epsilon, tolerance, delta)?;
    Ok(Calibration {
        noise_multiplier: found.0,
        epsilon: found.1,
        order: found.2,
        evaluations: evaluations + spent,
    })
}

/// A point of the search: ln σ and ln ε (+∞ when ε is).
#[derive(Clone, Copy)]
struct Point {
    x: f64,
    y: f64,
}

fn search(
    eval: &mut impl FnMut(f64) -> Result<(f64, Option<f64>)>,
    start: f64,
    target: f64,
    tolerance: f64,
    delta: f64,
) -> Result<(f64, f64, Option<f64>)> {
    let low_edge = target - tolerance;
    let goal = (target - tolerance / 2.0).ln();
    let max_x = MAX_NOISE_MULTIPLIER.ln();
    // `good`: ε below the window (σ too large); `bad`: ε above the target.
    let (mut good, mut bad): (Option<Point>, Option<Point>) = (None, None);
    let mut previous: Option<Point> = None;
    let mut sigma = start.min(MAX_NOISE_MULTIPLIER);
    let mut side = 0i8;
    for _ in 0..MAX_EVALUATIONS {
        let (eps, order) = eval(sigma)?;
        if eps <= target && eps >= low_edge {
            return Ok((sigma, eps, order));
        }
        let p = Point {
            x: sigma.ln(),
            y: if eps > 0.0 {
                eps.ln()
            } else {
                f64::NEG_INFINITY
            },
        };
        // Local slope of ln ε in ln σ from the last two finite points.
        let slope = match previous {
            Some(q) if p.y.is_finite() && q.y.is_finite() && p.x != q.x => {
                ((p.y - q.y) / (p.x - q.x)).clamp(-5.0, -0.3)
            }
            _ => -1.0,
        };
        if p.y.is_finite() {
            previous = Some(p);
        }
        if eps < low_edge {
            if side == -1
                && let Some(b) = bad.as_mut()
            {
                b.y = goal + (b.y - goal) / 2.0; // Illinois: halve the stale end
            }
            good = Some(p);
            side = -1;
        } else {
            if side == 1
                && let Some(g) = good.as_mut()
            {
                g.y = goal + (g.y - goal) / 2.0;
            }
            bad = Some(p);
            side = 1;
        }
        let next_x = match (good, bad) {
            (Some(g), Some(b)) => {
                let width = g.x - b.x;
                let x = if b.y.is_finite() && g.y.is_finite() {
                    b.x - (b.y - goal) * width / (g.y - b.y)
                } else {
                    f64::NAN
                };
                if x > b.x + 0.01 * width && x < g.x - 0.01 * width {
                    x
                } else {
                    0.5 * (b.x + g.x)
                }
            }
            (Some(g), None) => {
                // Too much noise: step down along the local slope.
                let step = if g.y.is_finite() {
                    (goal - g.y) / slope
                } else {
                    -4.0
                };
                g.x + step.clamp(-4.0, -0.001)
            }
            (None, Some(b)) => {
                if b.x >= max_x {
                    return Err(Error::ImpossibleTarget {
                        target_epsilon: target,
                        delta,
                        max_sigma: MAX_NOISE_MULTIPLIER,
                        epsilon_at_max: eps,
                    });
                }
                // Too little noise: step up (doubling when ε is unbounded).
                let step = if b.y.is_finite() {
                    (goal - b.y) / slope
                } else {
                    std::f64::consts::LN_2
                };
                (b.x + step.clamp(0.001, 4.0)).min(max_x)
            }
            (None, None) => unreachable!("every evaluation lands on one side"),
        };
        if let (Some(g), Some(b)) = (good, bad)
            && g.x - b.x <= 1e-14 * g.x.abs().max(1.0)
        {
            break;
        }
        sigma = next_x.exp();
    }
    Err(Error::CalibrationDidNotConverge {
        target_epsilon: target,
        tolerance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_meets_target_within_tolerance() {
        for kind in [AccountantKind::Rdp, AccountantKind::Prv] {
            let acc = Accountant::new(kind);
            let c = calibrate_noise(&acc, 4.0, 0.02, 800, 1e-5, 0.01).unwrap();
            assert!(c.epsilon <= 4.0 && c.epsilon >= 3.99, "{c:?}");
            let h = [HistoryEntry::new(c.noise_multiplier, 0.02, 800).unwrap()];
            assert_eq!(acc.epsilon(&h, 1e-5).unwrap().epsilon, c.epsilon);
            // A tighter tolerance gives a σ at least as small... or equal within it.
            let tight = calibrate_noise(&acc, 4.0, 0.02, 800, 1e-5, 0.001).unwrap();
            assert!(tight.epsilon <= 4.0 && tight.epsilon >= 3.999, "{tight:?}");
        }
    }

    #[test]
    fn impossible_and_invalid_targets_are_errors() {
        // PRV's upper bound is at least eps_error = 0.01.
        let prv = Accountant::new(AccountantKind::Prv);
        let err = calibrate_noise(&prv, 0.005, 0.01, 100, 1e-5, 0.001).unwrap_err();
        assert!(matches!(err, Error::ImpossibleTarget { .. }), "{err}");
        let rdp = Accountant::new(AccountantKind::Rdp);
        assert!(matches!(
            calibrate_noise(&rdp, f64::NAN, 0.01, 100, 1e-5, 0.01),
            Err(Error::InvalidTargetEpsilon(_))
        ));
        let zero = calibrate_noise(&rdp, 0.0, 0.01, 100, 1e-5, 0.01).unwrap_err();
        assert!(zero.to_string().contains("> 0"), "{zero}");
        assert!(matches!(
            calibrate_noise(&rdp, 1.0, 0.01, 100, 1e-5, 0.0),
            Err(Error::InvalidParameter { .. })
        ));
        assert!(matches!(
            calibrate_noise(&rdp, 1.0, 0.0, 100, 1e-5, 0.01),
            Err(Error::InvalidParameter { .. })
        ));
        assert_eq!(
            calibrate_noise(&rdp, 1.0, 0.01, 0, 1e-5, 0.01),
            Err(Error::ZeroSteps)
        );
        assert_eq!(
            calibrate_noise(&rdp, 1.0, 0.01, 10, 1.0, 0.01),
            Err(Error::InvalidDelta(1.0))
        );
    }
}
