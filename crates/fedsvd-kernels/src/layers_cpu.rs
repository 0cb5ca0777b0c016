//! CPU reference of the layer operations of [`crate::layers`], on host
//! slices. Row sums accumulate in f64 in index order, one row per rayon
//! task, so results do not depend on the thread count; the CUDA kernels
//! compute the same formulas in f32 with warp reductions.

use rayon::prelude::*;

use crate::layers::{
    AttnShape, BatchStrides, DropoutSpec, Embeddings, GemmSpec, LayerKernels, Precision, check_eps,
    check_labels, check_scale,
};
use crate::types::{check_len, check_matrix};
use crate::{Buffer, CpuBackend, Error, Result};

/// `1/√2` and `1/√(2π)` as the CUDA kernels write them.
const INV_SQRT2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, the
/// approximation of fedsvd-model), and `exp(-x²)`.
pub fn erf_as(x: f32) -> (f32, f32) {
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * ax);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let g = (-ax * ax).exp();
    ((1.0 - poly * g).copysign(x), g)
}

/// `gelu(v) = v · Φ(v)`, erf form.
pub fn gelu(v: f32) -> f32 {
    let (e, _) = erf_as(v * INV_SQRT2);
    v * (0.5 * (1.0 + e))
}

/// `gelu'(v) = Φ(v) + v · φ(v)`.
pub fn gelu_deriv(v: f32) -> f32 {
    let (e, g) = erf_as(v * INV_SQRT2);
    0.5 * (1.0 + e) + v * INV_SQRT_2PI * g
}

/// LayerNorm of one row; returns (mean, rstd).
fn layer_norm_row(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) -> (f32, f32) {
    let h = x.len() as f64;
    let mean = (x.iter().map(|&v| f64::from(v)).sum::<f64>() / h) as f32;
    let var = (x
        .iter()
        .map(|&v| {
            let d = f64::from(v - mean);
            d * d
        })
        .sum::<f64>()
        / h) as f32;
    let r = 1.0 / (var + eps).sqrt();
    for j in 0..x.len() {
        y[j] = (x[j] - mean) * r * gamma[j] + beta[j];
    }
    (mean, r)
}

fn check_rows(op: &'static str, rows: usize, hidden: usize) -> Result<usize> {
    check_matrix(op, rows, hidden)
}

/// Reference of [`LayerKernels::layer_norm`].
#[allow(clippy::too_many_arguments)]
pub fn layer_norm(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    rows: usize,
    hidden: usize,
    eps: f32,
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) -> Result<()> {
    let n = check_rows("layer_norm", rows, hidden)?;
    check_eps(eps)?;
    check_len("layer_norm: x", n, x.len())?;
    check_len("layer_norm: gamma", hidden, gamma.len())?;
    check_len("layer_norm: beta", hidden, beta.len())?;
    check_len("layer_norm: y", n, y.len())?;
    check_len("layer_norm: mean", rows, mean.len())?;
    check_len("layer_norm: rstd", rows, rstd.len())?;
    y.par_chunks_mut(hidden)
        .zip(x.par_chunks(hidden))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((yr, xr), (m, r))| {
            (*m, *r) = layer_norm_row(xr, gamma, beta, eps, yr);
        });
    Ok(())
}

/// Reference of [`LayerKernels::embed_layer_norm`].
#[allow(clippy::too_many_arguments)]
pub fn embed_layer_norm(
    ids: &[u32],
    type_ids: &[u32],
    seq: usize,
    tables: &Embeddings<'_>,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) -> Result<()> {
    tables.validate(ids, type_ids, seq)?;
    let (word, pos, ty) = (
        host(tables.word)?,
        host(tables.position)?,
        host(tables.token_type)?,
    );
    let (gamma, beta) = (host(tables.gamma)?, host(tables.beta)?);
    let h = tables.hidden;
    let rows = ids.len();
    check_len("embed_layer_norm: out", rows * h, out.len())?;
    check_len("embed_layer_norm: mean", rows, mean.len())?;
    check_len("embed_layer_norm: rstd", rows, rstd.len())?;
    out.par_chunks_mut(h)
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .enumerate()
        .for_each(|(r, (o, (m, s)))| {
            let we = &word[ids[r] as usize * h..][..h];
            let te = &ty[type_ids[r] as usize * h..][..h];
            let pe = &pos[(r % seq) * h..][..h];
            let sum: Vec<f32> = (0..h).map(|j| (we[j] + te[j]) + pe[j]).collect();
            (*m, *s) = layer_norm_row(&sum, gamma, beta, tables.eps, o);
        });
    Ok(())
}

/// Reference of [`LayerKernels::layer_norm_backward`].
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    rows: usize,
    hidden: usize,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Result<()> {
    let n = check_rows("layer_norm_backward", rows, hidden)?;
    check_len("layer_norm_backward: dy", n, dy.len())?;
    check_len("layer_norm_backward: x", n, x.len())?;
    check_len("layer_norm_backward: mean", rows, mean.len())?;
    check_len("layer_norm_backward: rstd", rows, rstd.len())?;
    check_len("layer_norm_backward: gamma", hidden, gamma.len())?;
    check_len("layer_norm_backward: dx", n, dx.len())?;
    check_len("layer_norm_backward: dgamma", hidden, dgamma.len())?;
    check_len("layer_norm_backward: dbeta", hidden, dbeta.len())?;
    let h = hidden as f64;
    dx.par_chunks_mut(hidden).enumerate().for_each(|(r, d)| {
        let (mu, rs) = (mean[r], rstd[r]);
        let dyr = &dy[r * hidden..(r + 1) * hidden];
        let xr = &x[r * hidden..(r + 1) * hidden];
        let (mut s1, mut s2) = (0.0f64, 0.0f64);
        for j in 0..hidden {
            let dg = f64::from(dyr[j] * gamma[j]);
            s1 += dg;
            s2 += dg * f64::from((xr[j] - mu) * rs);
        }
        let (m1, m2) = ((s1 / h) as f32, (s2 / h) as f32);
        for j in 0..hidden {
            let xh = (xr[j] - mu) * rs;
            d[j] = rs * (dyr[j] * gamma[j] - m1 - xh * m2);
        }
    });
    dgamma
        .par_iter_mut()
        .zip(dbeta.par_iter_mut())
        .enumerate()
        .for_each(|(j, (g, b))| {
            let (mut sg, mut sb) = (0.0f64, 0.0f64);
            for r in 0..rows {
                let d = f64::from(dy[r * hidden + j]);
                sg += d * f64::from((x[r * hidden + j] - mean[r]) * rstd[r]);
                sb += d;
            }
            *g = sg as f32;
            *b = sb as f32;
        });
    Ok(())
}

fn check_bias(op: &'static str, rows: usize, cols: usize, bias: &[f32]) -> Result<usize> {
    let n = check_matrix(op, rows, cols)?;
    check_len(op, cols, bias.len())?;
    Ok(n)
}

/// Reference of [`LayerKernels::bias_gelu`].
pub fn bias_gelu(x: &[f32], bias: &[f32], rows: usize, cols: usize, y: &mut [f32]) -> Result<()> {
    let n = check_bias("bias_gelu: bias", rows, cols, bias)?;
    check_len("bias_gelu: x", n, x.len())?;
    check_len("bias_gelu: y", n, y.len())?;
    y.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .for_each(|(yr, xr)| {
            for j in 0..cols {
                yr[j] = gelu(xr[j] + bias[j]);
            }
        });
    Ok(())
}

/// Reference of [`LayerKernels::bias_gelu_backward`].
pub fn bias_gelu_backward(
    dy: &[f32],
    x: &[f32],
    bias: &[f32],
    rows: usize,
    cols: usize,
    dx: &mut [f32],
) -> Result<()> {
    let n = check_bias("bias_gelu_backward: bias", rows, cols, bias)?;
    check_len("bias_gelu_backward: dy", n, dy.len())?;
    check_len("bias_gelu_backward: x", n, x.len())?;
    check_len("bias_gelu_backward: dx", n, dx.len())?;
    dx.par_chunks_mut(cols)
        .zip(x.par_chunks(cols).zip(dy.par_chunks(cols)))
        .for_each(|(d, (xr, dyr))| {
            for j in 0..cols {
                d[j] = dyr[j] * gelu_deriv(xr[j] + bias[j]);
            }
        });
    Ok(())
}

/// Reference of [`LayerKernels::masked_softmax`].
pub fn masked_softmax(
    scores: &[f32],
    key_mask: &[f32],
    shape: AttnShape,
    scale: f32,
    probs: &mut [f32],
) -> Result<()> {
    shape.validate("masked_softmax")?;
    check_scale(scale)?;
    check_len("masked_softmax: scores", shape.len(), scores.len())?;
    check_len(
        "masked_softmax: key_mask",
        shape.batch * shape.k_len,
        key_mask.len(),
    )?;
    check_len("masked_softmax: probs", shape.len(), probs.len())?;
    let per_example = shape.heads * shape.q_len;
    let k = shape.k_len;
    probs
        .par_chunks_mut(k)
        .zip(scores.par_chunks(k))
        .enumerate()
        .for_each(|(row, (p, s))| {
            let m = &key_mask[(row / per_example) * k..][..k];
            let mx = (0..k)
                .filter(|&j| m[j] != 0.0)
                .map(|j| s[j] * scale)
                .fold(f32::NEG_INFINITY, f32::max);
            if mx == f32::NEG_INFINITY {
                p.fill(0.0);
                return;
            }
            let mut sum = 0.0f64;
            for j in 0..k {
                p[j] = if m[j] != 0.0 {
                    (s[j] * scale - mx).exp()
                } else {
                    0.0
                };
                sum += f64::from(p[j]);
            }
            let inv = 1.0 / sum as f32;
            for v in p.iter_mut() {
                *v *= inv;
            }
        });
    Ok(())
}

/// Reference of [`LayerKernels::masked_softmax_backward`].
pub fn masked_softmax_backward(
    dprobs: &[f32],
    probs: &[f32],
    shape: AttnShape,
    scale: f32,
    dscores: &mut [f32],
) -> Result<()> {
    shape.validate("masked_softmax_backward")?;
    check_scale(scale)?;
    check_len("masked_softmax_backward: dprobs", shape.len(), dprobs.len())?;
    check_len("masked_softmax_backward: probs", shape.len(), probs.len())?;
    check_len(
        "masked_softmax_backward: dscores",
        shape.len(),
        dscores.len(),
    )?;
    let k = shape.k_len;
    dscores
        .par_chunks_mut(k)
        .zip(dprobs.par_chunks(k).zip(probs.par_chunks(k)))
        .for_each(|(ds, (dp, p))| {
            let dot = dp
                .iter()
                .zip(p)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum::<f64>() as f32;
            for j in 0..k {
                ds[j] = p[j] * (dp[j] - dot) * scale;
            }
        });
    Ok(())
}

/// The SplitMix64 finalizer fedsvd-model mixes dropout seeds with.
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The ChaCha8 key of `rand_core`'s `seed_from_u64(state)`: eight PCG32
/// outputs.
pub fn chacha_key_from_u64(mut state: u64) -> [u32; 8] {
    let mut key = [0u32; 8];
    for k in &mut key {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(11_634_580_027_462_260_723);
        let xs = (((state >> 18) ^ state) >> 27) as u32;
        *k = xs.rotate_right((state >> 59) as u32);
    }
    key
}

/// Block `counter` of the ChaCha8 keystream (nonce 0) as sixteen words: the
/// words `16·counter ..` of what `rand_chacha::ChaCha8Rng` returns from
/// `next_u32`.
pub fn chacha8_block(key: &[u32; 8], counter: u64) -> [u32; 16] {
    let input: [u32; 16] = [
        0x6170_7865,
        0x3320_646e,
        0x7962_2d32,
        0x6b20_6574,
        key[0],
        key[1],
        key[2],
        key[3],
        key[4],
        key[5],
        key[6],
        key[7],
        counter as u32,
        (counter >> 32) as u32,
        0,
        0,
    ];
    let mut x = input;
    fn qr(x: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
        x[a] = x[a].wrapping_add(x[b]);
        x[d] = (x[d] ^ x[a]).rotate_left(16);
        x[c] = x[c].wrapping_add(x[d]);
        x[b] = (x[b] ^ x[c]).rotate_left(12);
        x[a] = x[a].wrapping_add(x[b]);
        x[d] = (x[d] ^ x[a]).rotate_left(8);
        x[c] = x[c].wrapping_add(x[d]);
        x[b] = (x[b] ^ x[c]).rotate_left(7);
    }
    for _ in 0..4 {
        qr(&mut x, 0, 4, 8, 12);
        qr(&mut x, 1, 5, 9, 13);
        qr(&mut x, 2, 6, 10, 14);
        qr(&mut x, 3, 7, 11, 15);
        qr(&mut x, 0, 5, 10, 15);
        qr(&mut x, 1, 6, 11, 12);
        qr(&mut x, 2, 7, 8, 13);
        qr(&mut x, 3, 4, 9, 14);
    }
    for (o, i) in x.iter_mut().zip(input) {
        *o = o.wrapping_add(i);
    }
    x
}

/// Reference of [`LayerKernels::dropout_mask`].
pub fn dropout_mask(
    spec: &DropoutSpec,
    batch: usize,
    per_example: usize,
    out: &mut [f32],
) -> Result<()> {
    spec.validate()?;
    let n = check_matrix("dropout_mask", batch, per_example)?;
    check_len("dropout_mask: out", n, out.len())?;
    let keep = spec.keep();
    out.par_chunks_mut(per_example)
        .enumerate()
        .for_each(|(i, row)| {
            let example = spec.first_example.wrapping_add(i as u64);
            let state = splitmix(spec.seed ^ splitmix((u64::from(spec.stream) << 32) | example));
            let key = chacha_key_from_u64(state);
            for (b, chunk) in row.chunks_mut(16).enumerate() {
                let words = chacha8_block(&key, b as u64);
                for (v, w) in chunk.iter_mut().zip(words) {
                    let u = (w >> 8) as f32 * (1.0 / (1u32 << 24) as f32);
                    *v = if u < spec.p { 0.0 } else { keep };
                }
            }
        });
    Ok(())
}

/// Reference of [`LayerKernels::cross_entropy`].
pub fn cross_entropy(
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    losses: &mut [f32],
    dlogits: &mut [f32],
) -> Result<()> {
    let n = check_matrix("cross_entropy", labels.len(), classes)?;
    check_labels(labels, classes)?;
    check_len("cross_entropy: logits", n, logits.len())?;
    check_len("cross_entropy: losses", labels.len(), losses.len())?;
    check_len("cross_entropy: dlogits", n, dlogits.len())?;
    for (i, &label) in labels.iter().enumerate() {
        let z = &logits[i * classes..(i + 1) * classes];
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = z.iter().map(|v| (v - max).exp()).sum();
        let lse = max + sum.ln();
        losses[i] = lse - z[label as usize];
        for j in 0..classes {
            dlogits[i * classes + j] =
                (z[j] - lse).exp() - if j == label as usize { 1.0 } else { 0.0 };
        }
    }
    Ok(())
}

fn to_bf16_f32(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| half::bf16::from_f32(v).to_f32())
        .collect()
}

/// Reference of [`LayerKernels::gemm_strided_batched`]: f32 products
/// (matrixmultiply); [`Precision::Bf16`] first rounds `A` and `B` to bf16,
/// [`Precision::Tf32`] is computed in plain f32 (the CUDA result differs by
/// the TF32 rounding of the inputs).
pub fn gemm_strided_batched(
    spec: &GemmSpec,
    batch: &BatchStrides,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
) -> Result<()> {
    spec.validate("gemm_strided_batched", batch, (a.len(), b.len(), c.len()))?;
    let (ra, rb);
    let (a, b) = if spec.precision == Precision::Bf16 {
        ra = to_bf16_f32(a);
        rb = to_bf16_f32(b);
        (&ra[..], &rb[..])
    } else {
        (a, b)
    };
    let (rsa, csa) = if spec.trans_a {
        (1, spec.lda as isize)
    } else {
        (spec.lda as isize, 1)
    };
    let (rsb, csb) = if spec.trans_b {
        (1, spec.ldb as isize)
    } else {
        (spec.ldb as isize, 1)
    };
    for p in 0..batch.count {
        let oa = spec.offset_a + p * batch.stride_a;
        let ob = spec.offset_b + p * batch.stride_b;
        let oc = spec.offset_c + p * batch.stride_c;
        // SAFETY: `validate` checked that every element the strides reach,
        // offset + (batch-1)·stride + (rows-1)·ld + cols, lies inside each
        // slice; `c` is a unique borrow, so it aliases neither input. With
        // beta = 0 matrixmultiply does not read C.
        unsafe {
            matrixmultiply::sgemm(
                spec.m,
                spec.k,
                spec.n,
                spec.alpha,
                a.as_ptr().add(oa),
                rsa,
                csa,
                b.as_ptr().add(ob),
                rsb,
                csb,
                spec.beta,
                c.as_mut_ptr().add(oc),
                spec.ldc as isize,
                1,
            );
        }
    }
    Ok(())
}

fn host(b: &Buffer) -> Result<&[f32]> {
    b.as_host().ok_or(Error::WrongBackend {
        backend: "cpu",
        buffer: "a CUDA device",
    })
}

fn host_mut(b: &mut Buffer) -> Result<&mut [f32]> {
    b.as_host_mut().ok_or(Error::WrongBackend {
        backend: "cpu",
        buffer: "a CUDA device",
    })
}

impl LayerKernels for CpuBackend {
    fn embed_layer_norm(
        &self,
        ids: &[u32],
        type_ids: &[u32],
        seq: usize,
        tables: &Embeddings<'_>,
        out: &mut Buffer,
        mean: &mut Buffer,
        rstd: &mut Buffer,
    ) -> Result<()> {
        embed_layer_norm(
            ids,
            type_ids,
            seq,
            tables,
            host_mut(out)?,
            host_mut(mean)?,
            host_mut(rstd)?,
        )
    }

    fn layer_norm(
        &self,
        x: &Buffer,
        gamma: &Buffer,
        beta: &Buffer,
        rows: usize,
        hidden: usize,
        eps: f32,
        y: &mut Buffer,
        mean: &mut Buffer,
        rstd: &mut Buffer,
    ) -> Result<()> {
        layer_norm(
            host(x)?,
            host(gamma)?,
            host(beta)?,
            rows,
            hidden,
            eps,
            host_mut(y)?,
            host_mut(mean)?,
            host_mut(rstd)?,
        )
    }

    fn layer_norm_backward(
        &self,
        dy: &Buffer,
        x: &Buffer,
        mean: &Buffer,
        rstd: &Buffer,
        gamma: &Buffer,
        rows: usize,
        hidden: usize,
        dx: &mut Buffer,
        dgamma: &mut Buffer,
        dbeta: &mut Buffer,
    ) -> Result<()> {
        layer_norm_backward(
            host(dy)?,
            host(x)?,
            host(mean)?,
            host(rstd)?,
            host(gamma)?,
            rows,
            hidden,
            host_mut(dx)?,
            host_mut(dgamma)?,
            host_mut(dbeta)?,
        )
    }

    fn bias_gelu(
        &self,
        x: &Buffer,
        bias: &Buffer,
        rows: usize,
        cols: usize,
        y: &mut Buffer,
    ) -> Result<()> {
        bias_gelu(host(x)?, host(bias)?, rows, cols, host_mut(y)?)
    }

    fn bias_gelu_backward(
        &self,
        dy: &Buffer,
        x: &Buffer,
        bias: &Buffer,
        rows: usize,
        cols: usize,
        dx: &mut Buffer,
    ) -> Result<()> {
        bias_gelu_backward(host(dy)?, host(x)?, host(bias)?, rows, cols, host_mut(dx)?)
    }

    fn masked_softmax(
        &self,
        scores: &Buffer,
        key_mask: &Buffer,
        shape: AttnShape,
        scale: f32,
        probs: &mut Buffer,
    ) -> Result<()> {
        masked_softmax(
            host(scores)?,
            host(key_mask)?,
            shape,
            scale,
            host_mut(probs)?,
        )
    }

    fn masked_softmax_backward(
        &self,
        dprobs: &Buffer,
        probs: &Buffer,
        shape: AttnShape,
        scale: f32,
        dscores: &mut Buffer,
    ) -> Result<()> {
        masked_softmax_backward(
            host(dprobs)?,
            host(probs)?,
            shape,
            scale,
            host_mut(dscores)?,
        )
    }

    fn dropout_mask(
        &self,
        spec: &DropoutSpec,
        batch: usize,
        per_example: usize,
        out: &mut Buffer,
    ) -> Result<()> {
        dropout_mask(spec, batch, per_example, host_mut(out)?)
    }

    fn cross_entropy(
        &self,
        logits: &Buffer,
        labels: &[u32],
        classes: usize,
        losses: &mut Buffer,
        dlogits: &mut Buffer,
    ) -> Result<()> {
        cross_entropy(
            host(logits)?,
            labels,
            classes,
            host_mut(losses)?,
            host_mut(dlogits)?,
        )
    }

    fn gemm_strided_batched(
        &self,
        spec: &GemmSpec,
        batch: &BatchStrides,
        a: &Buffer,
        b: &Buffer,
        c: &mut Buffer,
    ) -> Result<()> {
        gemm_strided_batched(spec, batch, host(a)?, host(b)?, host_mut(c)?)
    }
}
