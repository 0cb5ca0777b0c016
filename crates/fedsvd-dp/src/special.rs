//! Special functions in log space: `log erfc` accurate far into the tail,
//! `log |C(α, k)|` with the sign of the generalized binomial, and signed
//! log-sum-exp helpers.

/// Above this argument `erfc` underflows towards subnormals in f64, so
/// `log_erfc` switches to the asymptotic expansion.
pub const LOG_ERFC_ASYMPTOTIC_FROM: f64 = 26.0;

/// `ln(erfc(x))`, accurate (relative error ~1e-15) for all finite `x`,
/// including large `x` where `erfc(x)` itself underflows.
///
/// For `x ≥ 26` it uses `−x² − ln(x√π) + ln(1 − 1/(2x²) + 3/(4x⁴) − …)`,
/// whose truncation error at `x = 26` is below 1e-16.
pub fn log_erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x < LOG_ERFC_ASYMPTOTIC_FROM {
        return libm::erfc(x).ln();
    }
    if x == f64::INFINITY {
        return f64::NEG_INFINITY;
    }
    // Asymptotic series in 1/(2x²): Σ (−1)^k (2k−1)!! / (2x²)^k.
    let u = 1.0 / (2.0 * x * x);
    let mut term = 1.0;
    let mut sum = 1.0;
    for k in 1..=8 {
        term *= -((2 * k - 1) as f64) * u;
        sum += term;
    }
    -x * x - (x * std::f64::consts::PI.sqrt()).ln() + sum.ln()
}

/// `ln Γ(x)` and the sign of `Γ(x)` (+1 or −1), also for negative
/// non-integer `x`.
pub fn ln_gamma_signed(x: f64) -> (f64, f64) {
    let (value, sign) = libm::lgamma_r(x);
    (value, if sign < 0 { -1.0 } else { 1.0 })
}

/// `ln |C(α, k)|` and the sign of the generalized binomial coefficient
/// `C(α, k) = Γ(α+1) / (Γ(k+1) Γ(α−k+1))` for real `α > −1` and integer
/// `k ≥ 0`. Returns `(−∞, 0)` when the coefficient is exactly zero (integer
/// `α` and `k > α`).
pub fn ln_abs_binomial(alpha: f64, k: u64) -> (f64, f64) {
    let kf = k as f64;
    let rest = alpha - kf + 1.0;
    if rest <= 0.0 && rest == rest.floor() {
        // Γ has a pole at a non-positive integer: the coefficient is 0.
        return (f64::NEG_INFINITY, 0.0);
    }
    let (ga, sa) = ln_gamma_signed(alpha + 1.0);
    let (gk, _) = ln_gamma_signed(kf + 1.0);
    let (gr, sr) = ln_gamma_signed(rest);
    (ga - gk - gr, sa * sr)
}

/// `ln(eˣ + eʸ)` without overflow; `−∞` is the additive identity.
#[inline]
pub fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// `ln(eˣ − eʸ)` for `x ≥ y`; `None` when the difference would be negative.
#[inline]
pub fn log_sub(x: f64, y: f64) -> Option<f64> {
    if x < y {
        return None;
    }
    if y == f64::NEG_INFINITY {
        return Some(x);
    }
    if x == y {
        return Some(f64::NEG_INFINITY);
    }
    let d = x - y;
    if d > 40.0 {
        // e^d − 1 equals e^d to double precision.
        return Some(x);
    }
    Some(d.exp_m1().ln() + y)
}

/// Nodes and weights of the n-point Gauss–Legendre rule on [−1, 1]
/// (Newton iteration on the Legendre polynomial; exact to rounding).
pub fn gauss_legendre(n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut nodes = vec![0.0; n];
    let mut weights = vec![0.0; n];
    let nf = n as f64;
    for i in 0..n.div_ceil(2) {
        // Chebyshev-like initial guess for the i-th largest root.
        let mut x = (std::f64::consts::PI * (i as f64 + 0.75) / (nf + 0.5)).cos();
        let mut derivative = 1.0;
        for _ in 0..100 {
            let (mut p0, mut p1) = (1.0, x);
            for k in 2..=n {
                let kf = k as f64;
                let p2 = ((2.0 * kf - 1.0) * x * p1 - (kf - 1.0) * p0) / kf;
                p0 = p1;
                p1 = p2;
            }
            if n == 1 {
                p0 = 1.0;
                p1 = x;
            }
            derivative = nf * (x * p1 - p0) / (x * x - 1.0);
            let step = p1 / derivative;
            x -= step;
            if step.abs() < 1e-16 {
                break;
            }
        }
        let w = 2.0 / ((1.0 - x * x) * derivative * derivative);
        nodes[i] = -x;
        weights[i] = w;
        nodes[n - 1 - i] = x;
        weights[n - 1 - i] = w;
    }
    (nodes, weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_erfc_matches_erfc_where_erfc_is_representable() {
        for &x in &[-5.0, -1.0, 0.0, 0.3, 1.0, 3.0, 10.0, 20.0, 25.9] {
            let direct = libm::erfc(x).ln();
            assert!(
                (log_erfc(x) - direct).abs() <= 1e-14 * direct.abs().max(1.0),
                "x = {x}"
            );
        }
    }

    #[test]
    fn log_erfc_is_continuous_at_the_switch() {
        let below = libm::erfc(LOG_ERFC_ASYMPTOTIC_FROM).ln();
        let above = log_erfc(LOG_ERFC_ASYMPTOTIC_FROM);
        assert!(
            (below - above).abs() < 1e-12 * below.abs(),
            "{below} vs {above}"
        );
        let eps = 1e-9;
        let left = log_erfc(LOG_ERFC_ASYMPTOTIC_FROM - eps);
        let slope = -2.0 * LOG_ERFC_ASYMPTOTIC_FROM; // d/dx ln erfc ≈ −2x − 1/x
        assert!(((above - left) / eps - slope).abs() < 1.0);
    }

    #[test]
    fn log_erfc_far_tail_is_finite_and_decreasing() {
        let mut previous = log_erfc(26.0);
        for i in 1..100 {
            let x = 26.0 + i as f64 * 10.0;
            let v = log_erfc(x);
            assert!(v.is_finite() && v < previous);
            // Leading behaviour −x² dominates.
            assert!((v + x * x).abs() < 2.0 * x.ln() + 2.0);
            previous = v;
        }
        assert_eq!(log_erfc(f64::INFINITY), f64::NEG_INFINITY);
    }

    #[test]
    fn binomial_signs_and_values() {
        // C(2.5, 3) = 2.5·1.5·0.5/6 = 0.3125 > 0; C(2.5, 4) = 0.3125·(−0.5)/4 < 0.
        let (l3, s3) = ln_abs_binomial(2.5, 3);
        assert_eq!(s3, 1.0);
        assert!((l3.exp() - 0.3125).abs() < 1e-14);
        let (l4, s4) = ln_abs_binomial(2.5, 4);
        assert_eq!(s4, -1.0);
        assert!((l4.exp() - 0.3125 * 0.5 / 4.0).abs() < 1e-14);
        let (l, s) = ln_abs_binomial(10.0, 4);
        assert_eq!(s, 1.0);
        assert!((l.exp() - 210.0).abs() < 1e-10);
        assert_eq!(ln_abs_binomial(5.0, 6), (f64::NEG_INFINITY, 0.0));
    }

    #[test]
    fn log_add_and_sub_invert_each_other() {
        let s = log_add(1.0, 0.5);
        assert!((s - (1f64.exp() + 0.5f64.exp()).ln()).abs() < 1e-15);
        let back = log_sub(s, 0.5).unwrap();
        assert!((back - 1.0).abs() < 1e-14);
        assert_eq!(log_sub(0.0, 1.0), None);
        assert_eq!(log_sub(2.0, 2.0), Some(f64::NEG_INFINITY));
        assert_eq!(log_add(f64::NEG_INFINITY, 3.0), 3.0);
    }

    #[test]
    fn gauss_legendre_integrates_polynomials_exactly() {
        let (x, w) = gauss_legendre(10);
        // Degree 19 is integrated exactly: ∫ x^18 = 2/19.
        let integral: f64 = x.iter().zip(&w).map(|(x, w)| w * x.powi(18)).sum();
        assert!((integral - 2.0 / 19.0).abs() < 1e-14);
        let total: f64 = w.iter().sum();
        assert!((total - 2.0).abs() < 1e-14);
    }
}
