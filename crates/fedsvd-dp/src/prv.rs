//! PRV accountant (Gopi, Lee, Wutschitz 2021) for the Poisson-subsampled
//! Gaussian mechanism, following Opacus 1.6's `PRVAccountant`: the privacy
//! random variable of one step is discretized on a grid, self-composed by
//! FFT, and δ(ε) / ε(δ) are read off the composed distribution.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};

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
    // Plans are cached per length so repeated queries (calibration) reuse
    // them. Each length is planned by a fresh planner: a shared rustfft
    // planner reuses the sub-FFTs it planned for earlier lengths, so the
    // plan of a length (and the last bits of every ε) depended on which
    // queries the thread had answered before, and a resumed run reported
    // ε that differed from an uninterrupted one in the 11th digit.
    // A BTreeMap, not a HashMap: a hash map's per-process random seed would
    // make the instruction counts of the gate differ from run to run.
    static PLANS: RefCell<BTreeMap<usize, Arc<dyn RealToComplex<f64>>>> =
        RefCell::new(BTreeMap::new());
}

/// Plans kept per thread before the cache is emptied (each holds O(n)
/// twiddles).
const MAX_CACHED_PLANS: usize = 32;

thread_local! {
    // The spectrum and FFT scratch of the last composition, kept for the
    // next one on this thread: a calibration composes 3–5 times, and fresh
    // megabyte buffers each cost page faults comparable to an FFT.
    static WORK_BUFFERS: RefCell<WorkBuffers> = RefCell::new(WorkBuffers::default());
}

/// Buffers larger than this (in complex values, 16 bytes each) are not
/// kept between compositions, so an unusually large grid does not stay
/// resident.
const MAX_KEPT_BUFFER: usize = 1 << 20;

#[derive(Default)]
struct WorkBuffers {
    spectrum: Vec<Complex<f64>>,
    scratch: Vec<Complex<f64>>,
}

impl WorkBuffers {
    fn take() -> Self {
        WORK_BUFFERS.with(|w| std::mem::take(&mut *w.borrow_mut()))
    }

    fn keep(self) {
        if self.spectrum.capacity().max(self.scratch.capacity()) <= MAX_KEPT_BUFFER {
            WORK_BUFFERS.with(|w| *w.borrow_mut() = self);
        }
    }
}

/// `v` resized to `len`, reusing its allocation; the contents are
/// arbitrary (every user overwrites them).
fn resized(mut v: Vec<Complex<f64>>, len: usize) -> Vec<Complex<f64>> {
    v.resize(len, Complex::new(0.0, 0.0));
    v
}

/// The forward real FFT of length n. Only the forward transform is planned:
/// planning costs several times one transform, and the inverse is done
/// with the same plan (see [`inverse_by_forward`]).
fn plan(n: usize) -> Arc<dyn RealToComplex<f64>> {
    PLANS.with(|plans| {
        let mut plans = plans.borrow_mut();
        if let Some(plan) = plans.get(&n) {
            return Arc::clone(plan);
        }
        if plans.len() >= MAX_CACHED_PLANS {
            plans.clear();
        }
        let plan = RealFftPlanner::new().plan_fft_forward(n);
        plans.insert(n, Arc::clone(&plan));
        plan
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
        let r2c = plan(n);
        // One real buffer serves as the pmf, the inverse transform's input
        // and output, and finally the discounted tail sums: fewer fresh
        // pages to fault in.
        let mut buf = vec![0.0; n];
        let work = WorkBuffers::take();
        let mut scratch = resized(work.scratch, r2c.get_scratch_len());
        let mut spectrum = resized(work.spectrum, r2c.complex_len());
        let mut total: Option<Vec<Complex<f64>>> = None;
        let mut shift_total = 0.0;
        let mut composed_steps = 0u64;
        for entry in history {
            if entry.sample_rate() == 0.0 {
                // The loss is identically 0: composing it changes nothing.
                continue;
            }
            let shift = discretize(entry, &grid, &mut buf)?;
            shift_total += shift * entry.steps() as f64;
            composed_steps += entry.steps();
            if spectrum.is_empty() {
                // The first spectrum became the running product.
                spectrum = r2c.make_output_vec();
            }
            r2c.process_with_scratch(&mut buf, &mut spectrum, &mut scratch)
                .map_err(|e| fft_error(e.to_string()))?;
            let steps = entry.steps();
            match total.as_mut() {
                None => {
                    par_chunks(&mut spectrum, |_, part| raise(part, steps));
                    total = Some(std::mem::take(&mut spectrum));
                }
                Some(total) => {
                    let spectrum = &spectrum;
                    par_chunks(total, |start, part| {
                        multiply_by_power(part, &spectrum[start..], steps)
                    });
                }
            }
        }
        match total {
            None => {
                buf.iter_mut().for_each(|v| *v = 0.0);
                buf[grid.c] = 1.0;
                WorkBuffers { spectrum, scratch }.keep();
            }
            Some(mut total) => {
                inverse_by_forward(&*r2c, &mut total, &mut buf, &mut scratch)?;
                // The sum of N variables with grid indices i_k sits at index
                // Σ i_k − (N − 1)·c of the same grid (modulo n).
                let rotation = (((composed_steps - 1) % n as u64) as usize * grid.c) % n;
                buf.rotate_left(rotation);
                WorkBuffers {
                    spectrum: total,
                    scratch,
                }
                .keep();
            }
        }
        // Reverse cumulative sums for the δ(ε) formula; the discounted sums
        // overwrite the composed pmf as it is read.
        let discount = (-grid.dt).exp();
        let mut tail_mass = vec![0.0; n];
        let (mut m, mut d) = (0.0, 0.0);
        let mut finite = true;
        for i in (0..n).rev() {
            let p = buf[i];
            finite &= p.is_finite();
            m += p;
            d = p + discount * d;
            tail_mass[i] = m;
            buf[i] = d;
        }
        if !finite {
            return Err(Error::Numerical {
                context: "PRV composition",
                detail: "the composed distribution holds a non-finite value".to_string(),
            });
        }
        let tail_discounted = buf;
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

/// Inverse real FFT of the Hermitian half spectrum `spectrum` into `out`
/// (scaled by 1/n), done with the forward plan: for a real result y,
/// n·y_k = Re U_k + Im U_k where U is the forward transform of the real
/// sequence u_j = Re X_j + Im X_j (X extended Hermitian), a Hartley
/// transform in disguise. `spectrum` is used as the output buffer of the
/// forward transform and left holding garbage.
fn inverse_by_forward(
    r2c: &dyn RealToComplex<f64>,
    spectrum: &mut [Complex<f64>],
    out: &mut [f64],
    scratch: &mut [Complex<f64>],
) -> Result<()> {
    let n = out.len();
    let half = n / 2;
    // DC and Nyquist bins of a real signal's spectrum are real.
    out[0] = spectrum[0].re;
    out[half] = spectrum[half].re;
    for j in 1..half {
        let x = spectrum[j];
        out[j] = x.re + x.im;
        out[n - j] = x.re - x.im;
    }
    r2c.process_with_scratch(out, spectrum, scratch)
        .map_err(|e| fft_error(e.to_string()))?;
    let scale = 1.0 / n as f64;
    out[0] = (spectrum[0].re + spectrum[0].im) * scale;
    out[half] = (spectrum[half].re + spectrum[half].im) * scale;
    for k in 1..half {
        let u = spectrum[k];
        out[k] = (u.re + u.im) * scale;
        out[n - k] = (u.re - u.im) * scale;
    }
    Ok(())
}

/// Below this squared modulus a factor of the powering is set to 0: its
/// contribution is far below f64 resolution of the pmf, and letting it
/// decay into subnormals would slow every later multiply.
const POWER_FLUSH: f64 = 1e-200;

/// Bins powered together, so that the dependent multiply chains of
/// neighbouring bins overlap instead of each waiting on its own latency.
const POWER_BLOCK: usize = 32;

#[inline]
fn flushed(z: Complex<f64>) -> Complex<f64> {
    if z.norm_sqr() < POWER_FLUSH {
        Complex::new(0.0, 0.0)
    } else {
        z
    }
}

/// `out[j] = z[j]^k` by repeated squaring, bit by bit over a block of bins.
fn power_block(z: &[Complex<f64>], k: u64, out: &mut [Complex<f64>]) {
    let len = z.len();
    let mut base = [Complex::new(0.0, 0.0); POWER_BLOCK];
    base[..len].copy_from_slice(z);
    let out = &mut out[..len];
    out.iter_mut().for_each(|o| *o = Complex::new(1.0, 0.0));
    let mut k = k;
    while k > 0 {
        if k & 1 == 1 {
            for (o, b) in out.iter_mut().zip(&base) {
                *o = flushed(*o * *b);
            }
        }
        k >>= 1;
        if k > 0 {
            for b in base[..len].iter_mut() {
                *b = flushed(*b * *b);
            }
        }
    }
}

/// Replaces every value by its k-th power.
fn raise(values: &mut [Complex<f64>], k: u64) {
    let mut powered = [Complex::new(0.0, 0.0); POWER_BLOCK];
    for block in values.chunks_mut(POWER_BLOCK) {
        power_block(block, k, &mut powered);
        block.copy_from_slice(&powered[..block.len()]);
    }
}

/// Multiplies every value of `total` by the k-th power of `factors`.
fn multiply_by_power(total: &mut [Complex<f64>], factors: &[Complex<f64>], k: u64) {
    let mut powered = [Complex::new(0.0, 0.0); POWER_BLOCK];
    for (block, f) in total
        .chunks_mut(POWER_BLOCK)
        .zip(factors.chunks(POWER_BLOCK))
    {
        power_block(&f[..block.len()], k, &mut powered);
        for (t, p) in block.iter_mut().zip(&powered) {
            *t *= *p;
        }
    }
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

/// One edge t of a grid cell (t itself not kept), with what the cell series needs there.
#[derive(Debug, Clone, Copy)]
struct Edge {
    /// e^t − 1.
    expm1: f64,
    /// e^t − (1 − q); the loss never reaches t where this is ≤ 0.
    inner: f64,
    /// The argument a = (2zσ² − 1)/(2√2σ) of the q-component's erfc, with
    /// z = ln(inner / q) (meaningful only where inner > 0).
    a: f64,
}

/// The cell series is used where the cell is this narrow in the erfc
/// argument (h) and in the product h·|midpoint|; there the three terms
/// kept leave a relative error below 1e-17.
const SERIES_MAX: f64 = 0.02;

/// ln(1 + x), by its Taylor series where x is small enough that seven
/// terms reach full precision (|x| ≤ 1e-3: the omitted x⁸/8 is below
/// 1.3e-22 relative to x), else by `ln_1p`. Across most of the grid the
/// cell ratio is about the mesh (~1e-4), and the series is several times
/// cheaper than the library call.
#[inline]
fn ln_1p_fast(x: f64) -> f64 {
    if x.abs() <= 1e-3 {
        let p = 1.0 / 7.0;
        let p = 1.0 / 6.0 - x * p;
        let p = 1.0 / 5.0 - x * p;
        let p = 1.0 / 4.0 - x * p;
        let p = 1.0 / 3.0 - x * p;
        let p = 1.0 / 2.0 - x * p;
        x * (1.0 - x * p)
    } else {
        x.ln_1p()
    }
}

/// ∫ e^{−u²} du over [m − h/2, m + h/2], by the Taylor series of e^{−u²}
/// about m: e^{−m²} h Σ_j H_{2j}(m) (h/2)^{2j} / ((2j+1)(2j)!), with the
/// Hermite polynomials H_2, H_4, H_6. For h, |m|·h ≤ SERIES_MAX the first
/// omitted term is below 1e-18 of the sum.
#[inline]
fn gauss_cell(m: f64, h: f64) -> f64 {
    let s = m * m;
    let h2 = h * h;
    let h2_ = 4.0 * s - 2.0;
    let h4_ = (16.0 * s - 48.0) * s + 12.0;
    let h6_ = ((64.0 * s - 480.0) * s + 720.0) * s - 120.0;
    // Reciprocals as products: a division by a constant stays a division.
    let series = 1.0
        + h2 * (h2_ * (1.0 / 24.0) + h2 * (h4_ * (1.0 / 1920.0) + h2 * (h6_ * (1.0 / 322_560.0))));
    (-s).exp() * h * series
}

impl Edge {
    /// An edge known to lie below the support, standing in for its exact
    /// values (only `inner ≤ 0` is ever read from such an edge).
    const BELOW_SUPPORT: Edge = Edge {
        expm1: -1.0,
        inner: -1.0,
        a: f64::NEG_INFINITY,
    };
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

    fn edge(&self, t: f64) -> Edge {
        let expm1 = t.exp_m1();
        let inner = expm1 + self.q;
        let a = if inner > 0.0 {
            let s = self.sigma;
            let z = inner.ln() - self.ln_q;
            (2.0 * z * s * s - 1.0) / (2.0 * std::f64::consts::SQRT_2 * s)
        } else {
            f64::NEG_INFINITY
        };
        Edge { expm1, inner, a }
    }

    /// P(L < Y ≤ R) for the cell whose left edge is `left` and whose width
    /// w in t has e^w − 1 = `expm1_width`, by the cell series — or None
    /// where the cell is too wide in x for it (near the support's start),
    /// so that the caller takes the difference of the CDF instead.
    ///
    /// Why: with the two Gaussian components as erfc of a and of
    /// b = a + 1/(√2σ), the cell's mass is (q·I(a) + (1 − q)·I(b))/√π with
    /// I the integral of e^{−u²} over the cell's range of a. Away from the
    /// support's start that range is tiny, and the series costs two `exp`s
    /// where the CDF costs two `erfc`s per edge. It is also more accurate:
    /// the width comes from ln(1 + e^L (e^w − 1)/inner_L) without
    /// cancellation, where a CDF difference loses digits to the tail mass.
    ///
    /// With the mass it returns the cell's right edge, carried forward from
    /// the left one without a transcendental call: e^{t+w} − 1 =
    /// (e^t − 1) + e^t·(e^w − 1), and a moves by exactly h. The caller
    /// recomputes an exact edge every [`EDGE_RESYNC`] cells, which bounds
    /// the rounding the recurrence accumulates.
    fn series_cell(&self, left: &Edge, expm1_width: f64) -> Option<(f64, Edge)> {
        if left.inner <= 0.0 {
            return None;
        }
        let growth = (left.expm1 + 1.0) * expm1_width;
        let dz = ln_1p_fast(growth / left.inner);
        let h = dz * self.sigma * std::f64::consts::FRAC_1_SQRT_2;
        let m_a = left.a + 0.5 * h;
        let m_b = m_a + std::f64::consts::FRAC_1_SQRT_2 / self.sigma;
        if !(h <= SERIES_MAX && m_a.abs().max(m_b.abs()) * h <= SERIES_MAX) {
            return None;
        }
        let mass = self.q * gauss_cell(m_a, h) + (1.0 - self.q) * gauss_cell(m_b, h);
        let expm1 = left.expm1 + growth;
        let right = Edge {
            expm1,
            inner: expm1 + self.q,
            a: left.a + h,
        };
        Some((mass * (1.0 / std::f64::consts::PI.sqrt()), right))
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
    // e^w − 1 for the cell widths: dt inside, dt/2 for the two end cells.
    let (expm1_full, expm1_half) = (dt.exp_m1(), (0.5 * dt).exp_m1());
    let inv_mass = 1.0 / mass;
    // Edges this far below ln(1 − q) are below the support whatever the
    // rounding of e^t − (1 − q).
    let support_start = (-loss.q).ln_1p();
    let below_support = support_start - 1e-9 * (1.0 + support_start.abs());
    // Each fixed chunk fills its cells and returns its compensated part of
    // the discretized mean; parts are added in index order.
    let parts = par_chunks(&mut pmf[..n], |start, cells| {
        let mut left = loss.edge(edge(start));
        let mut acc = Neumaier::default();
        for (j, p) in cells.iter_mut().enumerate() {
            let i = start + j;
            let expm1_width = if i == 0 || i == n - 1 {
                expm1_half
            } else {
                expm1_full
            };
            let t_right = edge(i + 1);
            if t_right < below_support {
                // The cell lies below the loss's support (t ≤ ln(1 − q)),
                // typically half of the grid: no mass, and no need to
                // evaluate the edge. Near the support's start the exact
                // test on the edge decides, as before.
                *p = 0.0;
                left = Edge::BELOW_SUPPORT;
                continue;
            }
            let exact_right = || loss.edge(t_right);
            let (cell, right) = match loss.series_cell(&left, expm1_width) {
                Some((mass, carried)) if (i + 1) % EDGE_RESYNC != 0 => (mass, carried),
                Some((mass, _)) => (mass, exact_right()),
                None => {
                    let right = exact_right();
                    let cell = if right.inner <= 0.0 {
                        0.0 // below the support
                    } else {
                        StepLoss::probability(edge_cdf(i), edge_cdf(i + 1))
                    };
                    (cell, right)
                }
            };
            let prob = cell * inv_mass;
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

/// Cells between exact edge evaluations in [`discretize`]: the carried
/// edges gain at most a few ulps per cell, so after 64 cells they are still
/// within ~1e-14 relative, far below the accountant's error budget, while
/// the expm1 and ln of 63 edges in 64 are saved. A divisor of [`CHUNK`], so
/// every chunk starts on an exact edge and results do not depend on the
/// thread count.
const EDGE_RESYNC: usize = 64;

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

/// The threads the parallel loops may use: `available_parallelism`, read
/// once per process. Each read opens the cgroup files (several system
/// calls), and a calibration asks for it dozens of times.
fn machine_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |t| t.get()))
}

/// Runs `f(offset, chunk)` over fixed-size chunks of `data` on scoped
/// threads and returns the results in chunk order.
fn par_chunks<T: Send, R: Send>(data: &mut [T], f: impl Fn(usize, &mut [T]) -> R + Sync) -> Vec<R> {
    let chunks = data.len().div_ceil(CHUNK);
    let threads = machine_threads().min(chunks).max(1);
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
    fn fast_ln_1p_matches_the_library_on_both_sides_of_the_switch() {
        for &x in &[
            0.0, 1e-12, -1e-12, 3e-7, 1e-4, -1e-4, 9.99e-4, -9.99e-4, 1e-3, -1e-3, 1.001e-3, 0.5,
        ] {
            let (fast, lib) = (ln_1p_fast(x), f64::ln_1p(x));
            assert!(
                (fast - lib).abs() <= 2.0 * f64::EPSILON * lib.abs(),
                "x = {x}: {fast} vs {lib}"
            );
        }
    }

    #[test]
    fn complex_power_matches_polar_form() {
        // More values than one block, moduli from 1 down to where powers vanish.
        let z: Vec<Complex<f64>> = (0..77)
            .map(|j| Complex::from_polar(1.0 - j as f64 / 80.0, 0.3 * j as f64 - 2.0))
            .collect();
        for k in [0u64, 1, 2, 7, 1000] {
            let mut p = z.clone();
            raise(&mut p, k);
            let mut m = vec![Complex::new(2.0, -1.0); z.len()];
            multiply_by_power(&mut m, &z, k);
            for (j, z) in z.iter().enumerate() {
                let (r, th) = z.to_polar();
                let q = Complex::from_polar(r.powf(k as f64), th * k as f64);
                let tol = 1e-12 * q.norm() + 1e-99;
                assert!((p[j] - q).norm() <= tol, "k = {k}, j = {j}");
                let q2 = q * Complex::new(2.0, -1.0);
                assert!((m[j] - q2).norm() <= 3.0 * tol, "k = {k}, j = {j}");
            }
        }
    }

    #[test]
    fn inverse_by_forward_inverts_the_forward_transform() {
        let n = 360;
        let r2c = plan(n);
        let x: Vec<f64> = (0..n)
            .map(|i| ((i * 7919) % 101) as f64 / 101.0 - 0.3)
            .collect();
        let mut input = x.clone();
        let mut spectrum = r2c.make_output_vec();
        let mut scratch = r2c.make_scratch_vec();
        r2c.process_with_scratch(&mut input, &mut spectrum, &mut scratch)
            .unwrap();
        let mut out = vec![0.0; n];
        inverse_by_forward(&*r2c, &mut spectrum, &mut out, &mut scratch).unwrap();
        for (a, b) in x.iter().zip(&out) {
            assert!((a - b).abs() < 1e-14, "{a} vs {b}");
        }
    }

    #[test]
    fn series_cells_match_cdf_differences() {
        // Every cell of realistic grids, for several (σ, q): the series
        // (where it applies) against the difference of the accurate CDF tails.
        for (sigma, q, steps) in [(1.0, 0.01, 1000u64), (0.6, 0.2, 50), (3.0, 0.001, 10_000)] {
            let e = HistoryEntry::new(sigma, q, steps).unwrap();
            let grid = domain(&[e], steps, 0.01, 1e-8, DEFAULT_MAX_GRID_POINTS).unwrap();
            let loss = StepLoss::new(&e);
            let (em1_full, em1_half) = (grid.dt.exp_m1(), (0.5 * grid.dt).exp_m1());
            let edge = |k: usize| {
                if k == 0 {
                    grid.t_min()
                } else if k == grid.n {
                    grid.t_max()
                } else {
                    grid.t_min() + (k as f64 - 0.5) * grid.dt
                }
            };
            let mut series_cells = 0;
            for i in 0..grid.n {
                let (tl, tr) = (edge(i), edge(i + 1));
                let em1 = if i == 0 || i == grid.n - 1 {
                    em1_half
                } else {
                    em1_full
                };
                let (cl, cr) = (loss.cdf(tl), loss.cdf(tr));
                let direct = StepLoss::probability(cl, cr);
                let left = loss.edge(tl);
                if let Some((series, carried)) = loss.series_cell(&left, em1) {
                    series_cells += 1;
                    // The carried right edge is the exact one, to rounding.
                    let exact = loss.edge(tr);
                    let close = |x: f64, y: f64| (x - y).abs() <= 1e-13 * (1.0 + y.abs());
                    assert!(
                        close(carried.expm1, exact.expm1)
                            && close(carried.inner, exact.inner)
                            && close(carried.a, exact.a),
                        "sigma {sigma} q {q} cell {i}: carried edge {carried:?} vs {exact:?}"
                    );
                    // The CDF difference carries an absolute error of a few
                    // ulp of the smaller tail, times 2a² from the rounding
                    // of the erfc argument a at each edge, and the edges
                    // themselves sit ~ulp·|t_min| off, moving a share
                    // δt/width of the cell's mass; the series uses the exact
                    // width and is far more accurate.
                    let tail = cl.lower.min(cl.upper);
                    let conditioning = 1.0 + 2.0 * (left.a.abs() + 1.0).powi(2);
                    let width = if i == 0 || i == grid.n - 1 {
                        0.5 * grid.dt
                    } else {
                        grid.dt
                    };
                    let placement = 4.0 * f64::EPSILON * (grid.t_min().abs() + tl.abs()) / width;
                    let tol =
                        (1e-12 + placement) * series + 8.0 * f64::EPSILON * tail * conditioning;
                    assert!(
                        (series - direct).abs() <= tol,
                        "sigma {sigma} q {q} cell {i}: series {series} vs {direct}"
                    );
                }
            }
            // Most of the support is covered by the series.
            assert!(series_cells > grid.n / 3, "{series_cells} of {}", grid.n);
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
