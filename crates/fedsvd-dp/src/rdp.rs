//! Rényi-DP accountant of the Poisson-subsampled Gaussian mechanism
//! (Mironov, Talwar, Zhang 2019), numerically as Opacus 1.6 computes it.

use crate::history::{HistoryEntry, check_delta, check_epsilon};
use crate::special::{log_add, log_erfc, log_sub};
use crate::{Error, Result};

/// The most terms the fractional-order series may take before it is
/// declared divergent (it normally stops after tens to hundreds).
const MAX_SERIES_TERMS: u64 = 1_000_000;

/// Opacus's default orders: 1.1, 1.2, …, 10.9, then 12, 13, …, 63
/// (computed as `1 + x/10` so that 2.0, 3.0, … take the integer path).
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + x as f64 / 10.0).collect();
    orders.extend((12..64).map(|a| a as f64));
    orders
}

/// Checks a list of orders: non-empty, each finite and > 1.
pub fn check_orders(orders: &[f64]) -> Result<()> {
    if orders.is_empty() {
        return Err(Error::EmptyOrders);
    }
    for &a in orders {
        if !(a.is_finite() && a > 1.0) {
            return Err(Error::InvalidOrder(a));
        }
    }
    Ok(())
}

/// ε_RDP(α) of ONE step of the Poisson-subsampled Gaussian mechanism with
/// noise multiplier σ and sampling rate q.
///
/// Special cases: q = 0 gives 0 and q = 1 gives α / (2σ²). Integer orders
/// sum the binomial expansion in log space; fractional orders sum the
/// two-sided erfc series with signed generalized binomials.
pub fn rdp_per_step(noise_multiplier: f64, sample_rate: f64, order: f64) -> Result<f64> {
    HistoryEntry::new(noise_multiplier, sample_rate, 1)?;
    check_orders(&[order])?;
    step_rdp(sample_rate, noise_multiplier, order)
}

/// Per-step RDP for validated inputs.
pub(crate) fn step_rdp(q: f64, sigma: f64, alpha: f64) -> Result<f64> {
    if q == 0.0 {
        return Ok(0.0);
    }
    if q == 1.0 {
        return Ok(alpha / (2.0 * sigma * sigma));
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_integer(q, sigma, alpha)
    } else {
        log_a_fractional(q, sigma, alpha)?
    };
    let value = log_a / (alpha - 1.0);
    if value.is_nan() {
        return Err(Error::Numerical {
            context: "RDP of the subsampled Gaussian",
            detail: format!("NaN for sigma = {sigma}, q = {q}, alpha = {alpha}"),
        });
    }
    // RDP is non-negative; rounding can leave −1e-15 for very large σ.
    Ok(value.max(0.0))
}

/// log A_α for integer α: Σ_i C(α, i) (1−q)^{α−i} q^i exp((i² − i)/(2σ²)).
fn log_a_integer(q: f64, sigma: f64, alpha: f64) -> f64 {
    let n = alpha as u64;
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let two_s2 = 2.0 * sigma * sigma;
    let mut log_a = f64::NEG_INFINITY;
    let mut ln_binom = 0.0;
    for i in 0..=n {
        let fi = i as f64;
        if i > 0 {
            ln_binom += ((alpha - fi + 1.0) / fi).ln();
        }
        let s = ln_binom + fi * ln_q + (alpha - fi) * ln_1mq + (fi * fi - fi) / two_s2;
        log_a = log_add(log_a, s);
    }
    log_a
}

/// log A_α for fractional α: the two series split at
/// z0 = σ² ln(1/q − 1) + 1/2, accumulated with the sign of C(α, i).
fn log_a_fractional(q: f64, sigma: f64, alpha: f64) -> Result<f64> {
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let two_s2 = 2.0 * sigma * sigma;
    let sqrt2_sigma = std::f64::consts::SQRT_2 * sigma;
    let ln_half = 0.5f64.ln();
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    // ln |C(α, i)| and its sign, by the recurrence C(α, i) = C(α, i−1)(α−i+1)/i.
    let (mut ln_coef, mut sign) = (0.0f64, 1.0f64);
    let mut i = 0u64;
    loop {
        let fi = i as f64;
        if i > 0 {
            let factor = (alpha - fi + 1.0) / fi;
            ln_coef += factor.abs().ln();
            if factor < 0.0 {
                sign = -sign;
            }
        }
        let j = alpha - fi;
        let log_t0 = ln_coef + fi * ln_q + j * ln_1mq;
        let log_t1 = ln_coef + j * ln_q + fi * ln_1mq;
        let log_e0 = ln_half + log_erfc((fi - z0) / sqrt2_sigma);
        let log_e1 = ln_half + log_erfc((z0 - j) / sqrt2_sigma);
        let log_s0 = log_t0 + (fi * fi - fi) / two_s2 + log_e0;
        let log_s1 = log_t1 + (j * j - j) / two_s2 + log_e1;
        if sign > 0.0 {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            let fail = || Error::Numerical {
                context: "fractional-order RDP series",
                detail: format!(
                    "a partial sum became negative at term {i} (sigma = {sigma}, q = {q}, alpha = {alpha})"
                ),
            };
            log_a0 = log_sub(log_a0, log_s0).ok_or_else(fail)?;
            log_a1 = log_sub(log_a1, log_s1).ok_or_else(fail)?;
        }
        i += 1;
        if log_s0.max(log_s1) < -30.0 {
            break;
        }
        if i > MAX_SERIES_TERMS || log_s0.is_nan() || log_s1.is_nan() {
            return Err(Error::Numerical {
                context: "fractional-order RDP series",
                detail: format!(
                    "no convergence after {i} terms (sigma = {sigma}, q = {q}, alpha = {alpha})"
                ),
            });
        }
    }
    Ok(log_add(log_a0, log_a1))
}

/// ε at δ read off an RDP curve, and the order that attains it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RdpEpsilon {
    /// The smallest ε over the orders (may be +∞ when there is no privacy).
    pub epsilon: f64,
    /// The order α attaining it.
    pub order: f64,
}

/// δ at ε read off an RDP curve, and the order that attains it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RdpDelta {
    /// The smallest δ over the orders, capped at 1.
    pub delta: f64,
    /// The order α attaining it.
    pub order: f64,
}

/// The RDP accountant: a list of Rényi orders.
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self {
            orders: default_orders(),
        }
    }
}

impl RdpAccountant {
    /// An accountant over the given orders (each finite and > 1).
    pub fn with_orders(orders: Vec<f64>) -> Result<Self> {
        check_orders(&orders)?;
        Ok(Self { orders })
    }

    /// The orders in use.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The composed RDP ε_RDP(α) of a history at each order (steps add up).
    pub fn curve(&self, history: &[HistoryEntry]) -> Result<Vec<f64>> {
        let mut total = vec![0.0; self.orders.len()];
        for entry in history {
            for (t, &alpha) in total.iter_mut().zip(&self.orders) {
                let per_step = step_rdp(entry.sample_rate(), entry.noise_multiplier(), alpha)?;
                *t += per_step * entry.steps() as f64;
            }
        }
        Ok(total)
    }

    /// ε of a history at δ (0 for an empty history), with the best order.
    pub fn epsilon(&self, history: &[HistoryEntry], delta: f64) -> Result<RdpEpsilon> {
        check_delta(delta)?;
        if history.is_empty() {
            return Ok(RdpEpsilon {
                epsilon: 0.0,
                order: self.orders[0],
            });
        }
        let curve = self.curve(history)?;
        epsilon_from_curve(&self.orders, &curve, delta)
    }

    /// δ of a history at ε (0 for an empty history), with the best order.
    pub fn delta(&self, history: &[HistoryEntry], epsilon: f64) -> Result<RdpDelta> {
        check_epsilon(epsilon)?;
        if history.is_empty() {
            return Ok(RdpDelta {
                delta: 0.0,
                order: self.orders[0],
            });
        }
        let curve = self.curve(history)?;
        delta_from_curve(&self.orders, &curve, epsilon)
    }
}

/// ε = min_α [ rdp(α) − (ln δ + ln α)/(α − 1) + ln((α − 1)/α) ]; the first
/// minimizing order wins ties, as in Opacus.
pub fn epsilon_from_curve(orders: &[f64], rdp: &[f64], delta: f64) -> Result<RdpEpsilon> {
    check_orders(orders)?;
    check_delta(delta)?;
    check_curve(orders, rdp)?;
    let ln_delta = delta.ln();
    let mut best = RdpEpsilon {
        epsilon: f64::INFINITY,
        order: orders[0],
    };
    for (&alpha, &r) in orders.iter().zip(rdp) {
        let eps = r - (ln_delta + alpha.ln()) / (alpha - 1.0) + ((alpha - 1.0) / alpha).ln();
        if eps < best.epsilon {
            best = RdpEpsilon {
                epsilon: eps,
                order: alpha,
            };
        }
    }
    Ok(best)
}

/// The inverse of [`epsilon_from_curve`]:
/// δ = min(1, min_α exp((α − 1)(rdp(α) − ε + ln((α − 1)/α)) − ln α)).
pub fn delta_from_curve(orders: &[f64], rdp: &[f64], epsilon: f64) -> Result<RdpDelta> {
    check_orders(orders)?;
    check_epsilon(epsilon)?;
    check_curve(orders, rdp)?;
    let mut best_ln = f64::INFINITY;
    let mut order = orders[0];
    for (&alpha, &r) in orders.iter().zip(rdp) {
        let ln_delta = (alpha - 1.0) * (r - epsilon + ((alpha - 1.0) / alpha).ln()) - alpha.ln();
        if ln_delta < best_ln {
            best_ln = ln_delta;
            order = alpha;
        }
    }
    Ok(RdpDelta {
        delta: best_ln.exp().min(1.0),
        order,
    })
}

fn check_curve(orders: &[f64], rdp: &[f64]) -> Result<()> {
    if orders.len() != rdp.len() {
        return Err(Error::Numerical {
            context: "RDP curve",
            detail: format!("{} orders but {} RDP values", orders.len(), rdp.len()),
        });
    }
    if let Some(bad) = rdp.iter().find(|r| r.is_nan() || **r < 0.0) {
        return Err(Error::Numerical {
            context: "RDP curve",
            detail: format!("RDP value {bad} is not a non-negative number"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::special::ln_abs_binomial;

    #[test]
    fn default_orders_are_opacus_orders() {
        let o = default_orders();
        assert_eq!(o.len(), 99 + 52);
        assert_eq!(o[0], 1.1);
        assert_eq!(o[98], 10.9);
        assert_eq!(o[99], 12.0);
        assert_eq!(*o.last().unwrap(), 63.0);
        assert_eq!(o[9], 2.0);
    }

    #[test]
    fn special_cases() {
        assert_eq!(rdp_per_step(1.3, 0.0, 5.5).unwrap(), 0.0);
        assert_eq!(rdp_per_step(2.0, 1.0, 4.0).unwrap(), 4.0 / 8.0);
        assert_eq!(rdp_per_step(2.0, 1.0, 4.5).unwrap(), 4.5 / 8.0);
    }

    #[test]
    fn full_batch_agrees_with_gaussian_limit() {
        // q → 1 approaches the Gaussian mechanism α/(2σ²) on both paths.
        for &alpha in &[3.0, 3.5] {
            let near = rdp_per_step(2.0, 1.0 - 1e-9, alpha).unwrap();
            assert!((near - alpha / 8.0).abs() < 1e-6, "{alpha}: {near}");
        }
    }

    #[test]
    fn fractional_orders_interpolate_integer_orders() {
        // RDP is continuous (and increasing) in α: a fractional order just
        // above an integer gives nearly the integer value.
        for &(sigma, q) in &[(1.0, 0.01), (0.8, 0.1), (3.0, 0.25)] {
            for &a in &[2.0, 5.0, 9.0] {
                let at = rdp_per_step(sigma, q, a).unwrap();
                let just = rdp_per_step(sigma, q, a + 1e-7).unwrap();
                assert!(
                    (at - just).abs() < 1e-5 * at.max(1e-12),
                    "{sigma} {q} {a}: {at} {just}"
                );
                let below = rdp_per_step(sigma, q, a - 0.5).unwrap();
                let above = rdp_per_step(sigma, q, a + 0.5).unwrap();
                assert!(below < at && at < above);
            }
        }
    }

    #[test]
    fn recurrence_binomials_match_log_gamma() {
        // The series uses a product recurrence; check it against lgamma with sign.
        for &alpha in &[1.1, 2.5, 7.3, 10.9] {
            let (mut ln_coef, mut sign) = (0.0f64, 1.0f64);
            for i in 0..200u64 {
                if i > 0 {
                    let f = (alpha - i as f64 + 1.0) / i as f64;
                    ln_coef += f.abs().ln();
                    if f < 0.0 {
                        sign = -sign;
                    }
                }
                let (l, s) = ln_abs_binomial(alpha, i);
                assert_eq!(s, sign, "alpha {alpha} i {i}");
                assert!(
                    (l - ln_coef).abs() < 1e-11 * l.abs().max(1.0),
                    "alpha {alpha} i {i}"
                );
            }
        }
    }

    #[test]
    fn delta_inverts_epsilon() {
        let acc = RdpAccountant::default();
        let h = [HistoryEntry::new(1.1, 0.01, 1000).unwrap()];
        let e = acc.epsilon(&h, 1e-5).unwrap();
        let d = acc.delta(&h, e.epsilon).unwrap();
        assert!((d.delta - 1e-5).abs() < 1e-12, "{d:?}");
        assert_eq!(d.order, e.order);
    }

    #[test]
    fn invalid_orders_rejected() {
        assert_eq!(RdpAccountant::with_orders(vec![]), Err(Error::EmptyOrders));
        assert_eq!(
            RdpAccountant::with_orders(vec![2.0, 1.0]),
            Err(Error::InvalidOrder(1.0))
        );
        assert!(matches!(
            RdpAccountant::with_orders(vec![f64::NAN]),
            Err(Error::InvalidOrder(_))
        ));
        assert_eq!(
            rdp_per_step(1.0, 0.1, f64::INFINITY),
            Err(Error::InvalidOrder(f64::INFINITY))
        );
    }

    #[test]
    fn empty_history_spends_nothing() {
        let acc = RdpAccountant::default();
        assert_eq!(acc.epsilon(&[], 1e-5).unwrap().epsilon, 0.0);
        assert_eq!(acc.delta(&[], 1.0).unwrap().delta, 0.0);
    }
}
