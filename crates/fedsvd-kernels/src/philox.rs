//! Philox-4x32-10 (Salmon et al., SC'11) and the Gaussian transform built on
//! it, bit-for-bit the same algorithm as `kernels/clip_noise.cu`.
//!
//! Noise coordinate `j` (the stream position `offset + p` of output `p`) is
//! lane `j % 4` of the Philox block with counter `(j / 4) as u64` split into
//! two words, the upper two counter words zero, and the key the two halves of
//! the seed. Lanes 0 and 1 of a block form one Box–Muller pair, lanes 2 and 3
//! the other. Because every coordinate's value depends only on
//! `(seed, offset + p)`, the stream can be cut into pieces, computed on any
//! number of threads or on the GPU, and still be the same.

use rayon::prelude::*;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    ((p >> 32) as u32, p as u32)
}

/// One Philox-4x32 block with ten rounds: the published generator, checked
/// against the Random123 known-answer vectors in the tests.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The four standard normal draws of Philox block `block` under `seed`.
///
/// The radius uses all 32 bits of its word, so the smallest uniform is 2⁻³³
/// and the largest representable draw is about 6.8 standard deviations; the
/// angle uses the top 24 bits of its word. All arithmetic is f32, in the
/// order the CUDA kernel uses, so results agree with the GPU to a few ulp
/// (the libm `ln`/`sin`/`cos` of the two sides may differ in the last bit).
#[inline]
pub fn gaussian_block(seed: u64, block: u64) -> [f32; 4] {
    let key = [seed as u32, (seed >> 32) as u32];
    let x = philox4x32_10([block as u32, (block >> 32) as u32, 0, 0], key);
    let (z0, z1) = box_muller(x[0], x[1]);
    let (z2, z3) = box_muller(x[2], x[3]);
    [z0, z1, z2, z3]
}

const TWO_POW_M32: f32 = 1.0 / 4_294_967_296.0;
const TWO_POW_M33: f32 = 1.0 / 8_589_934_592.0;
const TWO_POW_M24: f32 = 1.0 / 16_777_216.0;
const TWO_PI: f32 = std::f32::consts::TAU;

#[inline(always)]
fn box_muller(a: u32, b: u32) -> (f32, f32) {
    // (a + 1/2) / 2^32 in (0, 1]: the product is exact (power of two), so this
    // equals the fused multiply-add the GPU may use.
    let u = (a as f32) * TWO_POW_M32 + TWO_POW_M33;
    let v = ((b >> 8) as f32) * TWO_POW_M24;
    let r = (-2.0f32 * u.ln()).sqrt();
    let theta = TWO_PI * v;
    let (s, c) = theta.sin_cos();
    (r * c, r * s)
}

/// The standard normal draw at stream position `position` under `seed`.
#[inline]
pub fn gaussian_at(seed: u64, position: u64) -> f32 {
    gaussian_block(seed, position / 4)[(position % 4) as usize]
}

/// Positions per parallel chunk; a multiple of 4 so chunks split on block
/// boundaries when `offset` is aligned.
const CHUNK: usize = 1 << 14;

/// Calls `f(p, z)` for `p` in `0..len` with `z` the draw at position
/// `offset + p`, in parallel over fixed chunks (the values do not depend on
/// the split).
pub(crate) fn for_each_gaussian<F>(seed: u64, offset: u64, out: &mut [f32], f: F)
where
    F: Fn(f32, f32) -> f32 + Sync,
{
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let start = offset.wrapping_add((chunk * CHUNK) as u64);
            let mut p = 0usize;
            while p < values.len() {
                let pos = start.wrapping_add(p as u64);
                let lane = (pos % 4) as usize;
                let z = gaussian_block(seed, pos / 4);
                let take = (4 - lane).min(values.len() - p);
                for (k, v) in values[p..p + take].iter_mut().enumerate() {
                    *v = f(*v, z[lane + k]);
                }
                p += take;
            }
        });
}

/// Fills `out` with the standard normal draws at positions
/// `offset..offset + out.len()` of the stream under `seed`.
pub fn fill_gaussian(seed: u64, offset: u64, out: &mut [f32]) {
    for_each_gaussian(seed, offset, out, |_, z| z);
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors for Philox-4x32-10 published with Random123
    // (kat_vectors): counter, key, expected output.
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn gaussian_stream_is_position_addressed() {
        // Any cut of the stream gives the same values as one long fill.
        let mut whole = vec![0.0f32; 40_003];
        fill_gaussian(7, 5, &mut whole);
        let mut tail = vec![0.0f32; 20_001];
        fill_gaussian(7, 5 + 20_002, &mut tail);
        assert_eq!(&whole[20_002..], &tail[..]);
        for p in [0usize, 1, 2, 3, 4, 17, 16_383, 16_384, 40_002] {
            assert_eq!(whole[p], gaussian_at(7, 5 + p as u64));
        }
        let mut other_seed = vec![0.0f32; 64];
        fill_gaussian(8, 5, &mut other_seed);
        assert_ne!(&whole[..64], &other_seed[..]);
    }

    #[test]
    fn gaussian_moments() {
        let n = 1 << 20;
        let mut z = vec![0.0f32; n];
        fill_gaussian(0x5eed, 123, &mut z);
        let mean = z.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let var = z
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / (n as f64 - 1.0);
        let m4 = z.iter().map(|&v| f64::from(v).powi(4)).sum::<f64>() / n as f64;
        // 5-sigma bands: sd(mean) = 1/1024, sd(var) ~ sqrt(2/n), sd(m4) ~ sqrt(96/n).
        assert!(mean.abs() < 5.0 / 1024.0, "mean {mean}");
        assert!(
            (var - 1.0).abs() < 5.0 * (2.0 / n as f64).sqrt(),
            "var {var}"
        );
        assert!((m4 - 3.0).abs() < 5.0 * (96.0 / n as f64).sqrt(), "m4 {m4}");
        // Tail mass beyond 2 and 3 sigma (two-sided): 0.0455 and 0.0027.
        let beyond2 = z.iter().filter(|v| v.abs() > 2.0).count() as f64 / n as f64;
        let beyond3 = z.iter().filter(|v| v.abs() > 3.0).count() as f64 / n as f64;
        assert!((beyond2 - 0.045_500).abs() < 5.0 * (0.0455f64 * 0.9545 / n as f64).sqrt());
        assert!((beyond3 - 0.002_700).abs() < 5.0 * (0.0027f64 * 0.9973 / n as f64).sqrt());
        assert!(z.iter().all(|v| v.is_finite()));
    }
}
