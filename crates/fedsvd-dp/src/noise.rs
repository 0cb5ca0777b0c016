//! The Gaussian noise of DP-SGD, drawn so that floating-point arithmetic
//! cannot leak what it was meant to hide.
//!
//! Textbook samplers (a ziggurat or Box–Muller on floats, added in floating
//! point) release values whose low-order bits depend on the secret: the set
//! of floats reachable from `x + noise` differs with `x`, and the attacks of
//! Mironov (2012) and Jin et al. (2022, arXiv 2112.05307) read the secret
//! from it. Here the released value never touches a float sampler:
//!
//! 1. the clipped sum `S` is rounded to a fixed grid `γ` (`m = round(S/γ)`,
//!    an integer vector);
//! 2. an exact discrete Gaussian `k ~ N_Z(0, s²)` per coordinate is drawn
//!    from uniform integers alone (Canonne, Kamath & Steinke 2020,
//!    Algorithms 1–3), with `s = 2^28` grid cells;
//! 3. the release is the integer vector `m + k`; `γ·(m + k)` in f64 and
//!    anything after it is post-processing.
//!
//! Why the accountant's σ still holds (the argument in full is in
//! `docs/privacy.md`): adding or removing one example moves `S` by at most
//! `C` in ℓ2, so `m` moves by at most `C/γ + √d` (rounding adds at most one
//! cell per coordinate). `γ` is chosen so that `s / (C/γ + √d) ≥ σ`, with
//! a margin for the rounding of f64 arithmetic. `m + round(N(0, s²))` is
//! a post-processing of the continuous Gaussian mechanism with noise
//! multiplier at least σ, so the Poisson-subsampled accounting applies to
//! it; the discrete Gaussian's probabilities differ from those of the
//! rounded continuous Gaussian by a factor within `exp(±67/s²)` on
//! `|k| ≤ 40s` (and both put less than `e^-800` outside), which over `T`
//! steps and `d` coordinates adds at most `2·T·d·67/s²` to ε
//! ([`GaussianNoise::epsilon_slack`]: below 2·10⁻⁹ for a million
//! coordinate-steps).
//!
//! Every random draw goes through [`UniformSource`], so tests can feed the
//! sampler extreme inputs and reach the far tails that sampling alone never
//! shows.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rayon::prelude::*;

use crate::{Error, Result};

/// Coordinates per independently seeded block of a [`NoiseDraw`]: blocks
/// are drawn in parallel, each from its own ChaCha20 stream, so the noise
/// is the same whatever the number of threads.
pub const NOISE_BLOCK: usize = 4096;

/// Standard deviation of the discrete noise, in grid cells (`s`).
pub const NOISE_GRID_CELLS: u64 = 1 << 28;

/// Relative margin on the sensitivity that covers every f64 rounding
/// between the clipped sum and the integer release (each is below 2⁻⁵⁰;
/// f32 clipping of one example's gradient rounds below 2⁻²⁰ in practice).
const SENSITIVITY_MARGIN: f64 = 1.0 + 1.0 / 65_536.0;

/// A source of uniform integers: `below(n)` is uniform on `[0, n)`.
/// Implemented by [`RngSource`] over any CSPRNG; tests substitute scripted
/// sources.
pub trait UniformSource {
    /// A uniform integer in `[0, bound)`; `bound` is at least 1.
    fn below(&mut self, bound: u128) -> u128;
}

/// [`UniformSource`] over a random number generator (ChaCha20 in
/// training), by rejection sampling of the fewest whole bits, so every
/// value in range is exactly equally likely.
#[derive(Debug)]
pub struct RngSource<'a, R: RngCore + ?Sized>(pub &'a mut R);

impl<R: RngCore + ?Sized> UniformSource for RngSource<'_, R> {
    fn below(&mut self, bound: u128) -> u128 {
        if bound <= 1 {
            return 0;
        }
        let bits = 128 - (bound - 1).leading_zeros();
        let mask = if bits == 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        };
        loop {
            let word = if bits <= 64 {
                u128::from(self.0.next_u64())
            } else {
                (u128::from(self.0.next_u64()) << 64) | u128::from(self.0.next_u64())
            };
            let candidate = word & mask;
            if candidate < bound {
                return candidate;
            }
        }
    }
}

/// Bernoulli(n/d) for `n ≤ d`, `d ≥ 1`.
fn bernoulli<U: UniformSource + ?Sized>(src: &mut U, n: u128, d: u128) -> bool {
    src.below(d) < n
}

/// Bernoulli(exp(−n/d)) for `0 ≤ n/d ≤ 1` (CKS Algorithm 1, exact).
fn bernoulli_exp_unit<U: UniformSource + ?Sized>(src: &mut U, n: u128, d: u128) -> bool {
    let mut k: u128 = 1;
    // K grows past 2^13 with probability below 1/8192!, so stopping when
    // d·K would overflow never changes an outcome that can occur.
    while let Some(dk) = d.checked_mul(k) {
        if !bernoulli(src, n, dk) {
            break;
        }
        k += 1;
    }
    k % 2 == 1
}

/// Bernoulli(exp(−n/d)) for any `n/d ≥ 0` (CKS Algorithm 1, extended by
/// splitting off whole units).
fn bernoulli_exp<U: UniformSource + ?Sized>(src: &mut U, mut n: u128, d: u128) -> bool {
    while n > d {
        if !bernoulli_exp_unit(src, 1, 1) {
            return false;
        }
        n -= d;
    }
    bernoulli_exp_unit(src, n, d)
}

/// The discrete Laplace distribution with scale `t`: P(x) ∝ exp(−|x|/t)
/// (CKS Algorithm 2). Returns the magnitude and the sign (true: negative).
fn discrete_laplace<U: UniformSource + ?Sized>(src: &mut U, t: u128) -> (u128, bool) {
    loop {
        let u = src.below(t);
        if !bernoulli_exp(src, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp_unit(src, 1, 1) {
            v += 1;
        }
        let x = u + t * v;
        let negative = src.below(2) == 1;
        if negative && x == 0 {
            continue;
        }
        return (x, negative);
    }
}

/// One exact draw of the discrete Gaussian N_Z(0, s²) on the integers
/// (CKS Algorithm 3), for `1 ≤ s ≤ 2^28`. Values out to about 256·s are
/// reachable; beyond, the acceptance test's numerator would overflow 128
/// bits and the candidate is rejected (its true acceptance probability is
/// below exp(−32000)).
pub fn discrete_gaussian<U: UniformSource + ?Sized>(src: &mut U, s: u64) -> i64 {
    if s == 0 {
        return 0;
    }
    let s = u128::from(s.min(NOISE_GRID_CELLS));
    let t = s + 1;
    let s2 = s * s;
    // accept Y with probability exp(−(|Y| − s²/t)² / (2s²))
    //                         = exp(−(|Y|·t − s²)² / (2·s²·t²))
    let denominator = 2 * s2 * t * t;
    loop {
        let (magnitude, negative) = discrete_laplace(src, t);
        let Some(scaled) = magnitude.checked_mul(t) else {
            continue;
        };
        let gap = scaled.abs_diff(s2);
        let Some(numerator) = gap.checked_mul(gap) else {
            continue;
        };
        if bernoulli_exp(src, numerator, denominator) {
            // magnitude < 2^64 / t here, far inside i64.
            let value = magnitude as i64;
            return if negative { -value } else { value };
        }
    }
}

/// The Gaussian mechanism of one DP-SGD step: the clipped sum rounded to a
/// grid plus exact discrete Gaussian noise, with noise multiplier at least
/// σ against the sensitivity that clipping and rounding leave. The one
/// function every device calls: CPU and GPU training draw identical noise
/// from the same stream.
///
/// ```
/// use fedsvd_dp::GaussianNoise;
/// use rand::SeedableRng;
///
/// let noise = GaussianNoise::new(1.0, 0.8, 4)?;
/// let mut rng = rand::rngs::StdRng::seed_from_u64(7);
/// let mut released = [0.0f64; 4];
/// noise.privatize(&[0.5, -0.25, 0.0, 1.0], &mut rng, &mut released)?;
/// // The release sits on the grid, and the noise really was added.
/// for v in released {
///     assert_eq!((v / noise.grid()).round() * noise.grid(), v);
/// }
/// assert!(noise.applied_std() >= 0.8 * noise.sensitivity());
/// # Ok::<(), fedsvd_dp::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaussianNoise {
    noise_multiplier: f64,
    clip: f64,
    dim: usize,
    grid: f64,
}

impl GaussianNoise {
    /// The mechanism for clipping norm `clip`, noise multiplier σ
    /// (`noise_multiplier`, as the accountant calibrated it) and `dim`
    /// coordinates. σ = 0 adds no noise (and rounds nothing).
    pub fn new(clip: f64, noise_multiplier: f64, dim: usize) -> Result<Self> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(Error::InvalidParameter {
                name: "clip",
                value: clip,
                reason: "the clipping norm must be finite and > 0",
            });
        }
        if !(noise_multiplier.is_finite() && noise_multiplier >= 0.0) {
            return Err(Error::InvalidNoiseMultiplier(noise_multiplier));
        }
        let cells = NOISE_GRID_CELLS as f64;
        // s / (C'/γ + √d') ≥ σ with C' = C·margin and √d' = √d·margin:
        // γ = σ·C' / (s − σ·√d').
        let per_cell = noise_multiplier * (dim as f64).sqrt() * SENSITIVITY_MARGIN;
        if per_cell * 16.0 >= cells {
            return Err(Error::InvalidParameter {
                name: "noise dimension",
                value: dim as f64,
                reason: "sigma * sqrt(dimension) must stay below 2^24 for the noise grid",
            });
        }
        let grid = if noise_multiplier == 0.0 {
            0.0
        } else {
            // The last factor rounds the grid up past the f64 rounding of this
            // line, so the inequality holds for the computed grid too.
            noise_multiplier * clip * SENSITIVITY_MARGIN / (cells - per_cell)
                * (1.0 + f64::EPSILON * 16.0)
        };
        Ok(Self {
            noise_multiplier,
            clip,
            dim,
            grid,
        })
    }

    /// The grid step γ the release lies on (0 when σ = 0).
    pub fn grid(&self) -> f64 {
        self.grid
    }

    /// The noise multiplier σ the accountant was given.
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// Coordinates per release.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The ℓ2 sensitivity of the rounded sum, in the units of the sum:
    /// `C + γ·√d`, with the rounding margin.
    pub fn sensitivity(&self) -> f64 {
        (self.clip + self.grid * (self.dim as f64).sqrt()) * SENSITIVITY_MARGIN
    }

    /// The standard deviation of the noise as applied, `s·γ`. Never below
    /// σ times [`GaussianNoise::sensitivity`].
    pub fn applied_std(&self) -> f64 {
        NOISE_GRID_CELLS as f64 * self.grid
    }

    /// What the exact discrete noise adds to the ε of the continuous
    /// Gaussian the accountant models, over `steps` releases:
    /// `2·steps·d·67/s²` (see the module docs).
    pub fn epsilon_slack(&self, steps: u64) -> f64 {
        let s = NOISE_GRID_CELLS as f64;
        2.0 * steps as f64 * self.dim as f64 * 67.0 / (s * s)
    }

    /// Writes the private release of `sum` into `out`: `γ·(round(sum/γ) +
    /// k)` with `k` an exact discrete Gaussian per coordinate
    /// ([`GaussianNoise::draw`] from `rng`, then [`GaussianNoise::release`]).
    pub fn privatize<R: RngCore + ?Sized>(
        &self,
        sum: &[f32],
        rng: &mut R,
        out: &mut [f64],
    ) -> Result<()> {
        let draw = self.draw(rng);
        self.release(sum, &draw, out)
    }

    /// The noise of one release, drawn before the sum exists (so a device
    /// can compute the sum meanwhile): a 256-bit key from `rng`, then block
    /// b of [`NOISE_BLOCK`] coordinates from ChaCha20 with that key on
    /// stream b, blocks in parallel. The result depends on `rng` alone, not
    /// on the number of threads.
    pub fn draw<R: RngCore + ?Sized>(&self, rng: &mut R) -> NoiseDraw {
        if self.grid == 0.0 {
            return NoiseDraw { cells: Vec::new() };
        }
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        let mut cells = vec![0i64; self.dim];
        cells
            .par_chunks_mut(NOISE_BLOCK)
            .enumerate()
            .for_each(|(block, cells)| {
                let mut stream = ChaCha20Rng::from_seed(key);
                stream.set_stream(block as u64);
                let mut src = RngSource(&mut stream);
                for c in cells {
                    *c = discrete_gaussian(&mut src, NOISE_GRID_CELLS);
                }
            });
        NoiseDraw { cells }
    }

    /// The release of `sum` with the noise of `draw`: `γ·(round(sum/γ) + k)`.
    pub fn release(&self, sum: &[f32], draw: &NoiseDraw, out: &mut [f64]) -> Result<()> {
        self.check_release(sum, out)?;
        if self.grid == 0.0 {
            for (o, &s) in out.iter_mut().zip(sum) {
                *o = f64::from(s);
            }
            return Ok(());
        }
        if draw.cells.len() != self.dim {
            return Err(Error::InvalidParameter {
                name: "noise draw length",
                value: draw.cells.len() as f64,
                reason: "the draw must come from this mechanism (one value per coordinate)",
            });
        }
        for ((o, &s), &k) in out.iter_mut().zip(sum).zip(&draw.cells) {
            *o = self.grid * (self.cells_of(s) + k) as f64;
        }
        Ok(())
    }

    /// `round(s/γ)`, saturated far inside i64.
    fn cells_of(&self, s: f32) -> i64 {
        (f64::from(s) / self.grid)
            .round()
            .clamp(-(2f64.powi(62)), 2f64.powi(62)) as i64
    }

    fn check_release(&self, sum: &[f32], out: &[f64]) -> Result<()> {
        if sum.len() != self.dim || out.len() != self.dim {
            return Err(Error::InvalidParameter {
                name: "release length",
                value: sum.len().max(out.len()) as f64,
                reason: "the sum and the output must have the mechanism's dimension",
            });
        }
        if let Some(bad) = sum.iter().find(|v| !v.is_finite()) {
            return Err(Error::InvalidParameter {
                name: "clipped sum",
                value: f64::from(*bad),
                reason: "every coordinate of the clipped sum must be finite",
            });
        }
        Ok(())
    }

    /// [`GaussianNoise::privatize`] drawing coordinate by coordinate from
    /// any [`UniformSource`] (sequential; the seam through which tests feed
    /// chosen inputs).
    pub fn privatize_from<U: UniformSource + ?Sized>(
        &self,
        sum: &[f32],
        src: &mut U,
        out: &mut [f64],
    ) -> Result<()> {
        self.check_release(sum, out)?;
        if self.grid == 0.0 {
            for (o, &s) in out.iter_mut().zip(sum) {
                *o = f64::from(s);
            }
            return Ok(());
        }
        for (o, &s) in out.iter_mut().zip(sum) {
            let k = discrete_gaussian(src, NOISE_GRID_CELLS);
            *o = self.grid * (self.cells_of(s) + k) as f64;
        }
        Ok(())
    }
}

/// Noise drawn for one release ([`GaussianNoise::draw`]): one discrete
/// Gaussian per coordinate, in grid cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoiseDraw {
    cells: Vec<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// Returns scripted values (clamped into range), then uniform draws.
    struct Scripted {
        script: Vec<u128>,
        next: usize,
        rest: StdRng,
    }

    impl UniformSource for Scripted {
        fn below(&mut self, bound: u128) -> u128 {
            if let Some(&v) = self.script.get(self.next) {
                self.next += 1;
                return v.min(bound - 1);
            }
            RngSource(&mut self.rest).below(bound)
        }
    }

    fn normal_cdf(x: f64) -> f64 {
        0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
    }

    #[test]
    fn samples_of_the_full_scale_have_standard_normal_moments_and_pass_ks() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut src = RngSource(&mut rng);
        let n = 40_000;
        let s = NOISE_GRID_CELLS as f64;
        let mut z: Vec<f64> = (0..n)
            .map(|_| discrete_gaussian(&mut src, NOISE_GRID_CELLS) as f64 / s)
            .collect();
        let mean = z.iter().sum::<f64>() / n as f64;
        let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        let kurt = z.iter().map(|v| (v - mean).powi(4)).sum::<f64>() / n as f64 / (var * var);
        // Standard errors: mean 0.005, variance 0.007, kurtosis 0.025.
        assert!(mean.abs() < 0.025, "mean {mean}");
        assert!((var - 1.0).abs() < 0.035, "variance {var}");
        assert!((kurt - 3.0).abs() < 0.15, "kurtosis {kurt}");
        z.sort_by(f64::total_cmp);
        let ks = z
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let f = normal_cdf(v);
                (f - i as f64 / n as f64)
                    .abs()
                    .max(((i + 1) as f64 / n as f64 - f).abs())
            })
            .fold(0.0f64, f64::max);
        // The 99.9 % critical value of the KS statistic is 1.95/√n.
        assert!(ks < 1.95 / (n as f64).sqrt(), "KS statistic {ks}");
    }

    #[test]
    fn a_small_scale_matches_the_exact_discrete_gaussian_pmf() {
        // At s = 2 the discrete Gaussian differs visibly from a rounded
        // continuous one, so this checks the algorithm, not an approximation.
        let s = 2u64;
        let mut rng = StdRng::seed_from_u64(5);
        let mut src = RngSource(&mut rng);
        let n = 200_000usize;
        let mut counts = std::collections::BTreeMap::<i64, usize>::new();
        for _ in 0..n {
            *counts.entry(discrete_gaussian(&mut src, s)).or_default() += 1;
        }
        let weight = |k: i64| (-((k * k) as f64) / (2.0 * (s * s) as f64)).exp();
        let norm: f64 = (-60..=60).map(weight).sum();
        let mut chi2 = 0.0;
        let mut cells = 0;
        for k in -6..=6 {
            let expected = n as f64 * weight(k) / norm;
            let observed = *counts.get(&k).unwrap_or(&0) as f64;
            chi2 += (observed - expected).powi(2) / expected;
            cells += 1;
        }
        // 12 degrees of freedom: the 99.9 % quantile is 32.9.
        assert!(
            chi2 < 32.9,
            "chi-square {chi2} over {cells} cells: {counts:?}"
        );
    }

    /// The uniform draws that make the sampler return `±(s+1)·v`: the
    /// Laplace proposal's uniform part 0, `v` successes of the geometric
    /// part, the sign, then acceptance. A Bernoulli(exp(−1)) succeeds when
    /// its inner draws are 0, 0, then out of range; it fails on 0, then out
    /// of range.
    fn tail_script(s: u64, v: u128, negative: bool) -> Vec<u128> {
        const MISS: u128 = u128::MAX;
        let (s, t) = (u128::from(s), u128::from(s) + 1);
        let mut script = vec![0, 0];
        for _ in 0..v {
            script.extend([0, 0, MISS]);
        }
        script.extend([0, MISS]);
        script.push(u128::from(negative));
        let gap = (v * t * t).abs_diff(s * s);
        let (mut n, d) = (gap * gap, 2 * s * s * t * t);
        while n > d {
            script.extend([0, 0, MISS]);
            n -= d;
        }
        script.push(MISS);
        script
    }

    #[test]
    fn extreme_uniform_inputs_reach_the_far_tails_without_truncation() {
        let s = NOISE_GRID_CELLS;
        for (v, negative) in [
            (1u128, false),
            (8, true),
            (9, false),
            (12, true),
            (60, false),
        ] {
            let mut src = Scripted {
                script: tail_script(s, v, negative),
                next: 0,
                rest: StdRng::seed_from_u64(1),
            };
            let k = discrete_gaussian(&mut src, s);
            assert_eq!(src.next, src.script.len(), "the script was not used up");
            let expected = (v * u128::from(s + 1)) as i64;
            assert_eq!(k, if negative { -expected } else { expected });
            assert!((k as f64 / s as f64).abs() >= v as f64);
        }
    }

    #[test]
    fn applied_noise_is_never_below_sigma_times_the_sensitivity() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..2000 {
            let sigma = 10f64.powf(rng.next_u64() as f64 / u64::MAX as f64 * 4.0 - 2.0);
            let clip = 10f64.powf(rng.next_u64() as f64 / u64::MAX as f64 * 4.0 - 2.0);
            let dim = 1 + (rng.next_u64() % 500_000) as usize;
            let noise = GaussianNoise::new(clip, sigma, dim).unwrap();
            let s = NOISE_GRID_CELLS as f64;
            // in grid units: noise s, sensitivity C/γ + √d, both with margin
            let sensitivity_cells = clip / noise.grid() + (dim as f64).sqrt();
            assert!(
                s / (sensitivity_cells * SENSITIVITY_MARGIN) >= sigma,
                "sigma {sigma}, clip {clip}, dim {dim}"
            );
            assert!(noise.applied_std() >= sigma * noise.sensitivity() * (1.0 - 1e-12));
            assert!(noise.sensitivity() >= clip);
        }
    }

    #[test]
    fn releases_sit_on_the_grid_and_depend_on_the_stream_alone() {
        let noise = GaussianNoise::new(2.0, 1.1, 3).unwrap();
        let sum = [0.3f32, -7.0, 1e-9];
        let mut a = [0.0; 3];
        let mut b = [0.0; 3];
        noise
            .privatize(&sum, &mut StdRng::seed_from_u64(9), &mut a)
            .unwrap();
        noise
            .privatize(&sum, &mut StdRng::seed_from_u64(9), &mut b)
            .unwrap();
        assert_eq!(a, b);
        for (v, s) in a.iter().zip(sum) {
            let cells = v / noise.grid();
            assert!(
                (cells - cells.round()).abs() < 1e-6,
                "{cells} is off the grid"
            );
            // noise of std 2.2 on each coordinate: within 10 std
            assert!((v - f64::from(s)).abs() < 22.0);
        }
        assert!(a.iter().zip(sum).any(|(v, s)| *v != f64::from(s)));
    }

    #[test]
    fn a_draw_is_the_same_for_any_thread_count_and_is_standard_normal() {
        let noise = GaussianNoise::new(1.0, 1.0, 3 * NOISE_BLOCK + 17).unwrap();
        let draw_with = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| noise.draw(&mut StdRng::seed_from_u64(21)))
        };
        let one = draw_with(1);
        assert_eq!(one, draw_with(3));
        let s = NOISE_GRID_CELLS as f64;
        let z: Vec<f64> = one.cells.iter().map(|&k| k as f64 / s).collect();
        let n = z.len() as f64;
        let mean = z.iter().sum::<f64>() / n;
        let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        assert!(
            mean.abs() < 0.04 && (var - 1.0).abs() < 0.06,
            "{mean} {var}"
        );
        // Blocks are different streams, not copies of one.
        assert_ne!(one.cells[..64], one.cells[NOISE_BLOCK..NOISE_BLOCK + 64]);
        // release() adds exactly the drawn cells.
        let sum = vec![0.0f32; noise.dim()];
        let mut out = vec![0.0; noise.dim()];
        noise.release(&sum, &one, &mut out).unwrap();
        for (o, &k) in out.iter().zip(&one.cells) {
            assert_eq!(*o, noise.grid() * k as f64);
        }
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        assert!(GaussianNoise::new(0.0, 1.0, 3).is_err());
        assert!(GaussianNoise::new(1.0, f64::NAN, 3).is_err());
        assert!(GaussianNoise::new(1.0, -1.0, 3).is_err());
        assert!(GaussianNoise::new(1.0, 1e6, 1 << 20).is_err());
        let noise = GaussianNoise::new(1.0, 1.0, 2).unwrap();
        let mut out = [0.0; 2];
        let mut rng = StdRng::seed_from_u64(1);
        assert!(noise.privatize(&[1.0], &mut rng, &mut out).is_err());
        assert!(
            noise
                .privatize(&[1.0, f32::NAN], &mut rng, &mut out)
                .is_err()
        );
    }

    #[test]
    fn zero_sigma_adds_nothing() {
        let noise = GaussianNoise::new(1.0, 0.0, 2).unwrap();
        let mut out = [0.0; 2];
        noise
            .privatize(&[0.25, -3.0], &mut StdRng::seed_from_u64(1), &mut out)
            .unwrap();
        assert_eq!(out, [0.25, -3.0]);
    }
}
