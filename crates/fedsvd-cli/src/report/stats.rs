//! Means and Student-t confidence intervals across seeds.
//!
//! The sample sizes here are a handful of seeds, so the normal 1.96 would
//! understate the interval badly (for 3 seeds the t quantile is 4.30); the
//! quantile is computed exactly for the integer degrees of freedom we meet.

use std::f64::consts::PI;

/// Mean, spread and 95 % confidence interval of one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Number of values.
    pub n: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (n − 1 in the denominator); `None` for n = 1.
    pub std: Option<f64>,
    /// Half-width of the two-sided 95 % Student-t interval of the mean;
    /// `None` for n = 1, where no interval exists.
    pub ci95_half_width: Option<f64>,
}

impl Summary {
    /// Summarizes `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Self> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        if n == 1 {
            return Some(Self {
                n,
                mean,
                std: None,
                ci95_half_width: None,
            });
        }
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64;
        let std = var.sqrt();
        let half = t_quantile_two_sided(0.95, (n - 1) as u32) * std / (n as f64).sqrt();
        Some(Self {
            n,
            mean,
            std: Some(std),
            ci95_half_width: Some(half),
        })
    }

    /// Lower end of the 95 % interval (`None` for n = 1).
    pub fn ci95_low(&self) -> Option<f64> {
        self.ci95_half_width.map(|h| self.mean - h)
    }

    /// Upper end of the 95 % interval (`None` for n = 1).
    pub fn ci95_high(&self) -> Option<f64> {
        self.ci95_half_width.map(|h| self.mean + h)
    }
}

/// P(|T| ≤ t) for Student's t with `df` ≥ 1 degrees of freedom.
///
/// Uses the finite trigonometric series for integer degrees of freedom
/// (Abramowitz & Stegun 26.7.3), which needs no incomplete beta function and
/// is exact up to rounding.
fn t_central_probability(t: f64, df: u32) -> f64 {
    let theta = (t / f64::from(df).sqrt()).atan();
    let (s, c) = theta.sin_cos();
    let c2 = c * c;
    if df % 2 == 1 {
        // θ + sinθ·(cosθ + (2/3)cos³θ + … + (2·4…(ν−3))/(1·3…(ν−2))·cos^{ν−2}θ)
        let mut sum = 0.0;
        if df > 1 {
            let mut term = c;
            sum = term;
            let mut k = 1;
            while k + 2 < df {
                term *= c2 * f64::from(k + 1) / f64::from(k + 2);
                sum += term;
                k += 2;
            }
        }
        2.0 / PI * (theta + s * sum)
    } else {
        // sinθ·(1 + (1/2)cos²θ + (1·3)/(2·4)cos⁴θ + … up to cos^{ν−2}θ)
        let mut term = 1.0;
        let mut sum = 1.0;
        let mut k = 1;
        while k + 1 < df {
            term *= c2 * f64::from(k) / f64::from(k + 1);
            sum += term;
            k += 2;
        }
        s * sum
    }
}

/// The t such that P(|T| ≤ t) = `coverage` for Student's t with `df` ≥ 1
/// degrees of freedom (e.g. 4.3027 for coverage 0.95 and df 2).
///
/// Bisection on the monotone central probability: 200 halvings of a
/// bracket that starts below 1e7 reach the resolution of f64.
pub fn t_quantile_two_sided(coverage: f64, df: u32) -> f64 {
    debug_assert!(coverage > 0.0 && coverage < 1.0 && df >= 1);
    let mut lo = 0.0_f64;
    let mut hi = 1.0_f64;
    while t_central_probability(hi, df) < coverage && hi < 1e12 {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if t_central_probability(mid, df) < coverage {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_matches_closed_forms_for_one_and_two_degrees_of_freedom() {
        for p in [0.5, 0.8, 0.9, 0.95, 0.99] {
            // df = 1 is the Cauchy distribution: t = tan(π·p/2).
            let cauchy = (PI * p / 2.0).tan();
            let got = t_quantile_two_sided(p, 1);
            assert!(
                (got - cauchy).abs() < 1e-9 * cauchy,
                "{p}: {got} vs {cauchy}"
            );
            // df = 2: P(|T| ≤ t) = t / √(2 + t²), so t = p·√2 / √(1 − p²).
            let two = p * 2f64.sqrt() / (1.0 - p * p).sqrt();
            let got = t_quantile_two_sided(p, 2);
            assert!((got - two).abs() < 1e-9 * two, "{p}: {got} vs {two}");
        }
    }

    #[test]
    fn quantile_matches_published_table_values() {
        // Two-sided 95 % critical values of Student's t (any statistics table).
        let table = [
            (3, 3.182_446_305),
            (4, 2.776_445_105),
            (5, 2.570_581_836),
            (9, 2.262_157_163),
            (19, 2.093_024_054),
            (30, 2.042_272_456),
        ];
        for (df, want) in table {
            let got = t_quantile_two_sided(0.95, df);
            assert!((got - want).abs() < 1e-8, "df {df}: {got} vs {want}");
        }
    }

    #[test]
    fn quantile_tends_to_the_normal_one() {
        let got = t_quantile_two_sided(0.95, 100_000);
        assert!((got - 1.959_963_985).abs() < 1e-4, "{got}");
    }

    #[test]
    fn summary_of_three_values() {
        let s = Summary::of(&[0.70, 0.72, 0.77]).unwrap();
        assert_eq!(s.n, 3);
        assert!((s.mean - 0.73).abs() < 1e-12);
        // deviations −0.03, −0.01, 0.04: sum of squares 0.0026, variance 0.0013
        let std = 0.0013f64.sqrt();
        assert!((s.std.unwrap() - std).abs() < 1e-12);
        let half = t_quantile_two_sided(0.95, 2) * std / 3f64.sqrt();
        assert!((s.ci95_half_width.unwrap() - half).abs() < 1e-12);
        assert!((s.ci95_low().unwrap() - (0.73 - half)).abs() < 1e-12);
    }

    #[test]
    fn single_value_has_no_interval() {
        let s = Summary::of(&[0.5]).unwrap();
        assert_eq!(
            (s.n, s.mean, s.std, s.ci95_half_width),
            (1, 0.5, None, None)
        );
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn identical_values_give_a_zero_width_interval() {
        let s = Summary::of(&[0.6, 0.6, 0.6, 0.6]).unwrap();
        assert_eq!(s.ci95_half_width, Some(0.0));
    }
}
