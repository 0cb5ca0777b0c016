//! PRV accountant (Gopi, Lee, Wutschitz 2021) for the Poisson-subsampled
//! Gaussian mechanism, following Opacus 1.6's `PRVAccountant`: the privacy
//! random variable of one step is discretized on a grid, self-composed by
//! FFT, and δ(ε) / ε(δ) are read off the composed distribution.

use std::cell::RefCell;
use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};

use crate::history::{HistoryEntry, check_delta, check_epsilon, total_steps};
use crate::rdp::{RdpAccountant, epsilon_from_curve};
use crate::special::gauss_legendre;
use crate::{Error, Result};

/// Default ε error of the PRV accountant (as Opacus).
pub const DEFAULT_EPS_ERROR: f64 = 0.01;

/// Default limit on grid points (each array of the grid is 8 bytes a point;
/// a few such arrays are alive at once).
pub const DEFAULT_MAX_GRID_POINTS: usize = 1 << 26;

thread_local! {
    // Plans are cached per length so repeated queries (calibration) reuse them.
    static PLANNER: RefCell<RealFftPlanner<f64>> = RefCell::new(RealFftPlanner::new());
}

fn plans(n: usize) -> (Arc<dyn RealToComplex<f64>>, Arc<dyn ComplexToReal<f64>>) {
    PLANNER.with(|p| {
        let mut p = p.borrow_mut();
        (p.plan_fft_forward(n), p.plan_fft_inverse(n))
    })
}

/// Lower bound, estimate and upper bound of ε at a δ. The upper bound is
/// the one to report: ε(δ − δ_error) + eps_error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrvEpsilon {
    /// ε(δ + δ_error) − eps_error, at least 0.
    pub lower: f64,
    /// ε(δ) of the discretized composition, at least 0.
    pub estimate: f64,
    /// ε(δ − δ_error) + eps_error: a valid ε for the mechanism.
    pub upper: f64,
}

/// Lower bound, estimate and upper bound of δ at an ε. The upper bound is
/// the one to report: δ(ε − eps_error) + δ_error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrvDelta {
    /// δ(ε + eps_error) − δ_error, at least 0.
    pub lower: f64,
    /// δ(ε) of the discretized composition.
    pub estimate: f64,
    /// δ(ε − eps_error) + δ_error, at most 1.
    pub upper: f64,
}

/// The PRV accountant's accuracy parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrvAccountant {
    eps_error: f64,
    delta_error: Option<f64>,
    max_grid_points: usize,
}

impl Default for PrvAccountant {
    fn default() -> Self {
        Self {
            eps_error: DEFAULT_EPS_ERROR,
            delta_error: None,
            max_grid_points: DEFAULT_MAX_GRID_POINTS,
        }
    }
}

impl PrvAccountant {
    /// The default accountant: eps_error 0.01, delta_error δ/1000.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets eps_error (finite, > 0).
    pub fn with_eps_error(mut self, eps_error: f64) -> Result<Self> {
        if !(eps_error.is_finite() && eps_error > 0.0) {
            return Err(Error::InvalidParameter {
                name: "eps_error",
                value: eps_error,
                reason: "it must be finite and > 0",
            });
        }
        self.eps_error = eps_error;
        Ok(self)
    }

    /// Fixes delta_error (in (0, 1)) instead of the default δ/1000. It is
    /// required for δ(ε) queries, where no δ is known up front.
    pub fn with_delta_error(mut self, delta_error: f64) -> Result<Self> {
        check_delta_error(delta_error)?;
        self.delta_error = Some(delta_error);
        Ok(self)
    }

    /// Sets the largest grid the accountant may allocate.
    pub fn with_max_grid_points(mut self, max_grid_points: usize) -> Self {
        self.max_grid_points = max_grid_points;
        self
    }

    /// eps_error in use.
    pub fn eps_error(&self) -> f64 {
        self.eps_error
    }

    /// ε of a history at δ (all zero for an empty history).
    pub fn epsilon(&self, history: &[HistoryEntry], delta: f64) -> Result<PrvEpsilon> {
        check_delta(delta)?;
        if history.is_empty() {
            return Ok(PrvEpsilon {
                lower: 0.0,
                estimate: 0.0,
                upper: 0.0,
            });
        }
        let delta_error = self.delta_error.unwrap_or(delta / 1000.0);
        if delta_error >= delta {
            return Err(Error::InvalidParameter {
                name: "delta_error",
                value: delta_error,
                reason: "it must be smaller than delta",
            });
        }
        let composed = self.compose(history, delta_error)?;
        composed.epsilon(delta)
    }

    /// δ of a history at ε; needs an explicit delta_error
    /// ([`PrvAccountant::with_delta_error`]).
    pub fn delta(&self, history: &[HistoryEntry], epsilon: f64) -> Result<PrvDelta> {
        check_epsilon(epsilon)?;
        let delta_error = self.delta_error.ok_or(Error::InvalidParameter {
            name: "delta_error",
            value: f64::NAN,
            reason: "it must be set with with_delta_error for delta(epsilon) queries",
        })?;
        if history.is_empty() {
            return Ok(PrvDelta {
                lower: 0.0,
                estimate: 0.0,
                upper: 0.0,
            });
        }
        self.compose(history, delta_error)?.delta(epsilon)
    }

    /// Discretizes and composes a history for the given delta_error.
    pub fn compose(&self, history: &[HistoryEntry], delta_error: f64) -> Result<ComposedPrv> {
        check_delta_error(delta_error)?;
        ComposedPrv::new(history, self.eps_error, delta_error, self.max_grid_points)
    }
}

fn check_delta_error(delta_error: f64) -> Result<()> {
    if delta_error > 0.0 && delta_error < 1.0 {
        Ok(())
    } else {
        Err(Error::InvalidParameter {
            name: "delta_error",
            value: delta_error,
            reason: "it must lie in (0, 1)",
        })
    }
}

/// The discretized privacy loss distribution of a whole history, ready for
/// δ(ε) and ε(δ) queries.
#[derive(Debug, Clone)]
pub struct ComposedPrv {
    /// Position of grid point 0 (after the mean-shift corrections).
    t0: f64,
    /// Mesh size.
    dt: f64,
    /// Σ_{j ≥ i} p_j.
    tail_mass: Vec<f64>,
    /// Σ_{j ≥ i} p_j e^{t_i − t_j}, kept relative to t_i so nothing overflows.
    tail_discounted: Vec<f64>,
    eps_error: f64,
    delta_error: f64,
}

/// The grid shared by every entry of a history: points t_min + i·dt,
/// i = 0..n, with t_min = −c·dt and n = 2c + 2 (so t = 0 is point c, as
/// in Opacus's aligned domain).
#[derive(Debug, Clone, Copy)]
struct Grid {
    c: usize,
    n: usize,
    dt: f64,
}

impl Grid {
    fn t_min(&self) -> f64 {
        -(self.c as f64) * self.dt
    }
    fn t_max(&self) -> f64 {
        self.t_min() + (self.n - 1) as f64 * self.dt
    }
    fn t(&self, i: usize) -> f64 {
        self.t_min() + i as f64 * self.dt
    }
}

/// Smallest 5-smooth number ≥ m (FFT lengths with small prime factors are fast).
fn next_smooth(m: usize) -> usize {
    let mut best = usize::MAX;
    let mut p5 = 1usize;
    while p5 < best {
        let mut p35 = p5;
        while p35 < best {
            let mut v = p35;
            while v < m {
                v *= 2;
            }
            best = best.min(v);
            match p35.checked_mul(3) {
                Some(x) => p35 = x,
                None => break,
            }
        }
        match p5.checked_mul(5) {
            Some(x) => p5 = x,
            None => break,
        }
    }
    best
}

impl ComposedPrv {
    fn new(
        history: &[HistoryEntry],
        eps_error: f64,
        delta_error: f64,
        max_grid_points: usize,
    ) -> Result<Self> {
        let n_total = total_steps(history);
        let grid = domain(history, n_total, eps_error, delta_error, max_grid_points)?;
        let n = grid.n;
        let (r2c, c2r) = plans(n);
        let mut pmf = vec![0.0; n];
        let mut spectrum = r2c.make_output_vec();
        let mut total = vec![Complex::new(1.0, 0.0); n / 2 + 1];
        let mut scratch = r2c.make_scratch_vec();
        let mut shift_total = 0.0;
        let mut composed_steps = 0u64;
        for entry in history {
            if entry.sample_rate() == 0.0 {
                // The loss is identically 0: composing it changes nothing.
                continue;
            }
            let shift = discretize(entry, &grid, &mut pmf)?;
            shift_total += shift * entry.steps() as f64;
            composed_steps += entry.steps();
            r2c.process_with_scratch(&mut pmf, &mut spectrum, &mut scratch)
                .map_err(|e| fft_error(e.to_string()))?;
            let spectrum = &spectrum;
            par_chunks(&mut total, |start, part| {
                for (t, s) in part.iter_mut().zip(&spectrum[start..]) {
                    *t *= complex_pow(*s, entry.steps());
                }
            });
        }
        // DC and Nyquist bins of a real signal's spectrum are real.
        let last = total.len() - 1;
        total[0].im = 0.0;
        total[last].im = 0.0;
        let mut circular = c2r.make_output_vec();
        let mut scratch = c2r.make_scratch_vec();
        if composed_steps == 0 {
            circular.iter_mut().for_each(|v| *v = 0.0);
            circular[grid.c] = 1.0;
        } else {
            c2r.process_with_scratch(&mut total, &mut circular, &mut scratch)
                .map_err(|e| fft_error(e.to_string()))?;
            let scale = 1.0 / n as f64;
            circular.iter_mut().for_each(|v| *v *= scale);
        }
        // The sum of N variables with grid indices i_k sits at index
        // Σ i_k − (N − 1)·c of the same grid (modulo n).
        let rotation = if composed_steps == 0 {
            0
        } else {
            (((composed_steps - 1) % n as u64) as usize * grid.c) % n
        };
        circular.rotate_left(rotation);
        let composed = circular;
        if let Some(bad) = composed.iter().find(|v| !v.is_finite()) {
            return Err(Error::Numerical {
                context: "PRV composition",
                detail: format!("the composed distribution holds {bad}"),
            });
        }
        // Reverse cumulative sums for the δ(ε) formula.
        let discount = (-grid.dt).exp();
        let mut tail_mass = vec![0.0; n];
        let mut tail_discounted = vec![0.0; n];
        let (mut m, mut d) = (0.0, 0.0);
        for i in (0..n).rev() {
            m += composed[i];
            d = composed[i] + discount * d;
            tail_mass[i] = m;
            tail_discounted[i] = d;
        }
        Ok(Self {
            t0: grid.t_min() + shift_total,
            dt: grid.dt,
            tail_mass,
            tail_discounted,
            eps_error,
            delta_error,
        })
    }

    /// Number of grid points.
    pub fn grid_points(&self) -> usize {
        self.tail_mass.len()
    }

    /// The mesh size Δ.
    pub fn mesh(&self) -> f64 {
        self.dt
    }

    fn t(&self, i: usize) -> f64 {
        self.t0 + i as f64 * self.dt
    }

    /// δ(ε) = E[(1 − e^{ε − Y})₊] of the discretized composition.
    pub fn delta_estimate(&self, epsilon: f64) -> f64 {
        let n = self.grid_points();
        // First grid point at or above ε.
        let i = if epsilon <= self.t0 {
            0
        } else {
            let k = ((epsilon - self.t0) / self.dt).ceil();
            if k >= n as f64 {
                return 0.0;
            }
            k as usize
        };
        let value = self.tail_mass[i] - (epsilon - self.t(i)).exp() * self.tail_discounted[i];
        value.clamp(0.0, 1.0)
    }

    /// ε with δ(ε) = δ, solved exactly on the grid cell where δ(t) crosses δ.
    fn epsilon_at(&self, delta: f64) -> Result<f64> {
        // −δ(t_i) = tail_discounted − tail_mass is non-decreasing in i.
        let n = self.grid_points();
        let i = partition_point(n, |i| self.tail_discounted[i] - self.tail_mass[i] < -delta);
        if i == 0 || i >= n {
            return Err(Error::EpsilonOutOfDomain(delta));
        }
        let ratio = (self.tail_mass[i] - delta) / self.tail_discounted[i];
        let (lo, hi) = (self.t(i - 1), self.t(i));
        let eps = if ratio > 0.0 && ratio.is_finite() {
            (hi + ratio.ln()).clamp(lo, hi)
        } else {
            lo
        };
        Ok(eps.max(0.0))
    }

    /// ε at δ: lower bound, estimate and the upper bound to report.
    pub fn epsilon(&self, delta: f64) -> Result<PrvEpsilon> {
        check_delta(delta)?;
        if delta <= self.delta_error {
            return Err(Error::InvalidParameter {
                name: "delta_error",
                value: self.delta_error,
                reason: "it must be smaller than delta",
            });
        }
        let budget = delta - self.delta_error;
        if f64::EPSILON * self.grid_points() as f64 > budget {
            return Err(Error::RoundingDominates {
                grid_points: self.grid_points(),
                budget,
            });
        }
        let upper = self.epsilon_at(delta - self.delta_error)? + self.eps_error;
        let estimate = self.epsilon_at(delta)?;
        let lower = (self.epsilon_at((delta + self.delta_error).min(1.0 - f64::EPSILON))?
            - self.eps_error)
            .max(0.0);
        Ok(PrvEpsilon {
            lower,
            estimate,
            upper,
        })
    }

    /// δ at ε: lower bound, estimate and the upper bound to report.
    pub fn delta(&self, epsilon: f64) -> Result<PrvDelta> {
        check_epsilon(epsilon)?;
        Ok(PrvDelta {
            lower: (self.delta_estimate(epsilon + self.eps_error) - self.delta_error).max(0.0),
            estimate: self.delta_estimate(epsilon),
            upper: (self.delta_estimate(epsilon - self.eps_error) + self.delta_error).min(1.0),
        })
    }
}

fn partition_point(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

fn fft_error(detail: String) -> Error {
    Error::Numerical {
        context: "PRV FFT",
        detail,
    }
}

/// z^k by repeated squaring (relative error ~k ulp, like the polar form,
/// but with no transcendental functions).
#[inline]
fn complex_pow(z: Complex<f64>, mut k: u64) -> Complex<f64> {
    let mut base = z;
    let mut acc = Complex::new(1.0, 0.0);
    while k > 0 {
        if k & 1 == 1 {
            acc *= base;
        }
        k >>= 1;
        if k > 0 {
            base = base * base;
            if base.re == 0.0 && base.im == 0.0 {
                return Complex::new(0.0, 0.0);
            }
        }
    }
    acc
}

/// The grid of Gopi et al. §5.3 as Opacus builds it: half-width
/// L = max(ε_RDP(δ_err/4) of the history, ε_RDP(δ_err/(8N)) of one step of
/// each entry, eps_error) + 3, mesh eps_error / sqrt(N log(12/δ_err) / 2).
/// The number of points is rounded up to a 5-smooth length (which only
/// widens the domain) so that the FFTs are fast.
fn domain(
    history: &[HistoryEntry],
    n_total: u64,
    eps_error: f64,
    delta_error: f64,
    max_grid_points: usize,
) -> Result<Grid> {
    let rdp = RdpAccountant::default();
    let orders = rdp.orders();
    let mut composed = vec![0.0; orders.len()];
    let mut l_max = eps_error;
    let single_delta = delta_error / (8.0 * n_total as f64);
    for entry in history {
        let one = HistoryEntry::new(entry.noise_multiplier(), entry.sample_rate(), 1)?;
        let curve = rdp.curve(&[one])?;
        for (c, r) in composed.iter_mut().zip(&curve) {
            *c += r * entry.steps() as f64;
        }
        l_max = l_max.max(epsilon_from_curve(orders, &curve, single_delta)?.epsilon);
    }
    l_max = l_max.max(epsilon_from_curve(orders, &composed, delta_error / 4.0)?.epsilon);
    let half_width = l_max + 3.0;
    let mesh = eps_error / (n_total as f64 * (12.0 / delta_error).ln() / 2.0).sqrt();
    let cells = (half_width / mesh).ceil();
    let needed = 2.0 * cells + 2.0;
    if !needed.is_finite() || needed > max_grid_points as f64 {
        return Err(Error::GridTooLarge {
            points: if needed.is_finite() {
                needed as u64
            } else {
                u64::MAX
            },
            max: max_grid_points as u64,
        });
    }
    let half = next_smooth(cells as usize + 1);
    let n = 2 * half;
    if n > max_grid_points {
        return Err(Error::GridTooLarge {
            points: n as u64,
            max: max_grid_points as u64,
        });
    }
    Ok(Grid {
        c: half - 1,
        n,
        dt: mesh,
    })
}

/// F(t) = P(Y ≤ t) and S(t) = 1 − F(t) of one step's privacy loss; the
/// smaller of the two is computed directly so that both tails keep their
/// relative accuracy.
#[derive(Debug, Clone, Copy)]
struct Cdf {
    lower: f64,
    upper: f64,
}

/// The loss of one step: Y = ln(1 − q + q·e^{(2X − 1)/(2σ²)}) with
/// X ~ (1 − q)·N(0, σ²) + q·N(1, σ²).
struct StepLoss {
    q: f64,
    sigma: f64,
    ln_q: f64,
}

impl StepLoss {
    fn new(entry: &HistoryEntry) -> Self {
        let q = entry.sample_rate();
        Self {
            q,
            sigma: entry.noise_multiplier(),
            ln_q: q.ln(),
        }
    }

    fn cdf(&self, t: f64) -> Cdf {
        let (q, s) = (self.q, self.sigma);
        let inner = t.exp_m1() + q; // e^t − (1 − q)
        if inner <= 0.0 {
            return Cdf {
                lower: 0.0,
                upper: 1.0,
            };
        }
        let z = inner.ln() - self.ln_q;
        let denom = 2.0 * std::f64::consts::SQRT_2 * s;
        let a = (2.0 * z * s * s - 1.0) / denom;
        let b = (2.0 * z * s * s + 1.0) / denom;
        if z < 0.0 {
            let lower = 0.5 * q * libm::erfc(-a) + 0.5 * (1.0 - q) * libm::erfc(-b);
            Cdf {
                lower,
                upper: 1.0 - lower,
            }
        } else {
            let upper = 0.5 * q * libm::erfc(a) + 0.5 * (1.0 - q) * libm::erfc(b);
            Cdf {
                lower: 1.0 - upper,
                upper,
            }
        }
    }

    /// P(L < Y ≤ R) from the CDF at both edges, using the accurate tail.
    fn probability(left: Cdf, right: Cdf) -> f64 {
        if left.lower >= 0.5 {
            left.upper - right.upper
        } else {
            right.lower - left.lower
        }
    }

    /// The loss as a function of x.
    fn loss(&self, x: f64) -> f64 {
        let z = (x - 0.5) / (self.sigma * self.sigma);
        if z <= 30.0 {
            (self.q * z.exp_m1()).ln_1p()
        } else {
            self.ln_q + z + ((1.0 - self.q) / self.q * (-z).exp()).ln_1p()
        }
    }

    /// x(t): the X at which the loss equals t (−∞ below the support).
    fn x_of(&self, t: f64) -> f64 {
        let inner = t.exp_m1() + self.q;
        if inner <= 0.0 {
            return f64::NEG_INFINITY;
        }
        self.sigma * self.sigma * (inner.ln() - self.ln_q) + 0.5
    }

    fn density_x(&self, x: f64) -> f64 {
        let s2 = 2.0 * self.sigma * self.sigma;
        let norm = 1.0 / (self.sigma * (2.0 * std::f64::consts::PI).sqrt());
        norm * ((1.0 - self.q) * (-x * x / s2).exp() + self.q * (-(x - 1.0) * (x - 1.0) / s2).exp())
    }

    /// E[Y; t_min < Y ≤ t_max] by Gauss–Legendre quadrature in x, where the
    /// integrand is smooth and Gaussian-weighted.
    fn partial_mean(&self, t_min: f64, t_max: f64) -> f64 {
        const REACH: f64 = 14.0; // φ(14) ≈ 1e-43: nothing beyond matters
        let lo = self.x_of(t_min).max(-REACH * self.sigma);
        let hi = self.x_of(t_max).min(1.0 + REACH * self.sigma);
        if hi <= lo {
            return 0.0;
        }
        let (nodes, weights) = gauss_legendre(12);
        let panels = ((hi - lo) / (0.25 * self.sigma)).ceil().clamp(1.0, 1e5) as usize;
        let h = (hi - lo) / panels as f64;
        let mut sum = 0.0;
        for p in 0..panels {
            let mid = lo + (p as f64 + 0.5) * h;
            let mut panel = 0.0;
            for (x, w) in nodes.iter().zip(&weights) {
                let xx = mid + 0.5 * h * x;
                panel += w * self.loss(xx) * self.density_x(xx);
            }
            sum += 0.5 * h * panel;
        }
        sum
    }
}

/// Writes the discretized pmf of one step (truncated to the grid, each
/// cell's mass at its centre) into `pmf` and returns the mean-shift
/// correction that makes its mean equal the truncated variable's mean.
fn discretize(entry: &HistoryEntry, grid: &Grid, pmf: &mut [f64]) -> Result<f64> {
    let loss = StepLoss::new(entry);
    let (t_min, t_max, dt, n) = (grid.t_min(), grid.t_max(), grid.dt, grid.n);
    let first = loss.cdf(t_min);
    let last = loss.cdf(t_max);
    let mass = StepLoss::probability(first, last);
    if mass.is_nan() || mass <= 0.0 {
        return Err(Error::Numerical {
            context: "PRV discretization",
            detail: format!(
                "no probability mass on the grid [{t_min}, {t_max}] for sigma = {}, q = {}",
                entry.noise_multiplier(),
                entry.sample_rate()
            ),
        });
    }
    // Cell i spans edges i and i + 1: the grid ends, and half-way points between.
    let edge = |k: usize| {
        if k == 0 {
            t_min
        } else if k == n {
            t_max
        } else {
            t_min + (k as f64 - 0.5) * dt
        }
    };
    let edge_cdf = |k: usize| match k {
        0 => first,
        k if k == n => last,
        k => loss.cdf(edge(k)),
    };
    // Each fixed chunk fills its cells and returns its compensated part of
    // the discretized mean; parts are added in index order.
    let parts = par_chunks(&mut pmf[..n], |start, cells| {
        let mut left = edge_cdf(start);
        let mut acc = Neumaier::default();
        for (j, p) in cells.iter_mut().enumerate() {
            let i = start + j;
            let right = edge_cdf(i + 1);
            let prob = StepLoss::probability(left, right) / mass;
            *p = prob;
            acc.add(grid.t(i) * prob);
            left = right;
        }
        acc
    });
    let mut total = Neumaier::default();
    for part in parts {
        total.add(part.sum);
        total.add(part.comp);
    }
    let mean_d = total.value();
    let mean_c = loss.partial_mean(t_min, t_max) / mass;
    let shift = mean_c - mean_d;
    if shift.is_nan() || shift.abs() >= dt / 2.0 {
        return Err(Error::MeanShiftTooLarge {
            shift,
            half_cell: dt / 2.0,
            noise_multiplier: entry.noise_multiplier(),
            sample_rate: entry.sample_rate(),
        });
    }
    Ok(shift)
}

/// Compensated (Neumaier) summation.
#[derive(Debug, Default, Clone, Copy)]
struct Neumaier {
    sum: f64,
    comp: f64,
}

impl Neumaier {
    fn add(&mut self, term: f64) {
        let s = self.sum + term;
        self.comp += if self.sum.abs() >= term.abs() {
            (self.sum - s) + term
        } else {
            (term - s) + self.sum
        };
        self.sum = s;
    }
    fn value(&self) -> f64 {
        self.sum + self.comp
    }
}

/// Work unit of the parallel loops. It is fixed, so results (including the
/// order of every sum) do not depend on the number of threads.
const CHUNK: usize = 1 << 14;

/// Runs `f(offset, chunk)` over fixed-size chunks of `data` on scoped
/// threads and returns the results in chunk order.
fn par_chunks<T: Send, R: Send>(data: &mut [T], f: impl Fn(usize, &mut [T]) -> R + Sync) -> Vec<R> {
    let chunks = data.len().div_ceil(CHUNK);
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(chunks)
        .max(1);
    let mut buckets: Vec<Vec<(usize, &mut [T])>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, c) in data.chunks_mut(CHUNK).enumerate() {
        // Interleaved so that cheap and expensive regions of the grid spread evenly.
        buckets[i % threads].push((i, c));
    }
    let run = |bucket: Vec<(usize, &mut [T])>| -> Vec<(usize, R)> {
        bucket
            .into_iter()
            .map(|(i, c)| (i, f(i * CHUNK, c)))
            .collect()
    };
    let mut out: Vec<(usize, R)> = if threads == 1 {
        buckets.into_iter().flat_map(&run).collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = buckets
                .into_iter()
                .map(|b| {
                    let run = &run;
                    scope.spawn(move || run(b))
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    };
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_lengths() {
        assert_eq!(next_smooth(1), 1);
        assert_eq!(next_smooth(7), 8);
        assert_eq!(next_smooth(11), 12);
        assert_eq!(next_smooth(1001), 1024);
        for m in [97usize, 12345, 999_983] {
            let s = next_smooth(m);
            assert!(s >= m && s < m + m / 10 + 2);
            let mut r = s;
            for p in [2, 3, 5] {
                while r.is_multiple_of(p) {
                    r /= p;
                }
            }
            assert_eq!(r, 1);
        }
    }

    #[test]
    fn complex_power_matches_polar_form() {
        let z = Complex::new(0.6, -0.7);
        for k in [0u64, 1, 2, 7, 1000] {
            let p = complex_pow(z, k);
            let (r, th) = z.to_polar();
            let q = Complex::from_polar(r.powf(k as f64), th * k as f64);
            assert!((p - q).norm() <= 1e-12 * q.norm().max(1e-300), "k = {k}");
        }
    }

    #[test]
    fn cdf_tails_are_consistent_and_monotone() {
        let loss = StepLoss::new(&HistoryEntry::new(1.0, 0.01, 1).unwrap());
        let mut prev = 0.0;
        for i in -200..400 {
            let t = i as f64 * 0.05;
            let c = loss.cdf(t);
            assert!((c.lower + c.upper - 1.0).abs() < 1e-15);
            assert!(c.lower >= prev, "t = {t}");
            prev = c.lower;
        }
        // Support starts at ln(1 − q).
        assert_eq!(loss.cdf((0.99f64).ln() - 1e-9).lower, 0.0);
    }

    #[test]
    fn truncated_mean_matches_direct_integration_in_t() {
        // Midpoint rule on the CDF in t (slow but independent).
        let loss = StepLoss::new(&HistoryEntry::new(0.9, 0.05, 1).unwrap());
        let (a, b) = (-2.0, 6.0);
        let quad = loss.partial_mean(a, b);
        // E[Y; a<Y≤b] = b F(b) − a F(a) − ∫_a^b F(t) dt.
        let m = 400_000;
        let h = (b - a) / m as f64;
        let integral: f64 = (0..m)
            .map(|k| loss.cdf(a + (k as f64 + 0.5) * h).lower)
            .sum::<f64>()
            * h;
        let by_parts = b * loss.cdf(b).lower - a * loss.cdf(a).lower - integral;
        assert!((quad - by_parts).abs() < 1e-9, "{quad} vs {by_parts}");
    }

    #[test]
    fn pmf_sums_to_one_and_shift_is_small() {
        let e = HistoryEntry::new(1.0, 0.01, 1000).unwrap();
        let grid = domain(&[e], 1000, 0.01, 1e-8, DEFAULT_MAX_GRID_POINTS).unwrap();
        let mut pmf = vec![0.0; grid.n];
        let shift = discretize(&e, &grid, &mut pmf).unwrap();
        let total: f64 = pmf.iter().sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!(pmf.iter().all(|p| *p >= 0.0));
        assert!(shift.abs() < grid.dt / 2.0);
        assert_eq!(grid.n % 2, 0);
        assert!((grid.t(grid.c)).abs() < 1e-12);
    }

    #[test]
    fn single_gaussian_step_matches_closed_form() {
        // q = 1, one step: the Gaussian mechanism, whose exact δ(ε) is
        // Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) with μ = 1/σ.
        let sigma = 1.5;
        let e = HistoryEntry::new(sigma, 1.0, 1).unwrap();
        let acc = PrvAccountant::new().with_delta_error(1e-9).unwrap();
        let composed = acc.compose(&[e], 1e-9).unwrap();
        let phi = |x: f64| 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
        let mu = 1.0 / sigma;
        for eps in [0.1, 0.5, 1.0, 2.0] {
            let exact = phi(-eps / mu + mu / 2.0) - eps.exp() * phi(-eps / mu - mu / 2.0);
            let ours = composed.delta_estimate(eps);
            assert!(
                (ours - exact).abs() < 1e-4 * exact + 1e-9,
                "eps {eps}: {ours} vs {exact}"
            );
        }
        // And many steps: T Gaussian steps are one Gaussian with σ/√T.
        let steps = 16u64;
        let e = HistoryEntry::new(sigma, 1.0, steps).unwrap();
        let composed = acc.compose(&[e], 1e-9).unwrap();
        let mu = (steps as f64).sqrt() / sigma;
        for eps in [1.0, 3.0, 6.0] {
            let exact = phi(-eps / mu + mu / 2.0) - eps.exp() * phi(-eps / mu - mu / 2.0);
            let ours = composed.delta_estimate(eps);
            assert!(
                (ours - exact).abs() < 2e-3 * exact + 1e-9,
                "eps {eps}: {ours} vs {exact}"
            );
        }
    }
}
