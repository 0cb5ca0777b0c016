//! The CPU reference of the layer operations: finite-difference checks of
//! every backward pass, exact agreement of the dropout masks with
//! `rand_chacha` as fedsvd-model draws them, GEMMs against f64, and typed
//! errors.

#![allow(clippy::needless_range_loop)]

mod common;

use common::{gemm_f64, rng, uniform};
use fedsvd_kernels::layers_cpu as lc;
use fedsvd_kernels::{
    AttnShape, BatchStrides, CpuBackend, DropoutSpec, Embeddings, Error, GemmSpec, Kernels,
    LayerKernels, Precision,
};
use rand::{Rng, RngCore, SeedableRng};

/// Central difference of `f` at `x[i]` with step `h`.
fn fd(f: &dyn Fn(&[f32]) -> f64, x: &[f32], i: usize, h: f32) -> f64 {
    let mut xp = x.to_vec();
    xp[i] = x[i] + h;
    let up = f(&xp);
    xp[i] = x[i] - h;
    let down = f(&xp);
    (up - down) / (f64::from(2.0 * h))
}

fn dot(w: &[f32], y: &[f32]) -> f64 {
    w.iter()
        .zip(y)
        .map(|(&a, &b)| f64::from(a) * f64::from(b))
        .sum()
}

fn assert_close(what: &str, got: f32, want: f64, tol: f64) {
    let err = (f64::from(got) - want).abs() / want.abs().max(1.0);
    assert!(
        err <= tol,
        "{what}: analytic {got} vs numeric {want} ({err})"
    );
}

#[test]
fn layer_norm_forward_normalizes_and_backward_matches_finite_differences() {
    let mut r = rng("layer_norm_fd");
    let (rows, h, eps) = (3, 8, 1e-12f32);
    let x: Vec<f32> = uniform(&mut r, rows * h)
        .iter()
        .map(|v| 2.0 * v + 0.5)
        .collect();
    let gamma: Vec<f32> = uniform(&mut r, h).iter().map(|v| 1.0 + 0.5 * v).collect();
    let beta = uniform(&mut r, h);
    let w = uniform(&mut r, rows * h);
    let fwd = |x: &[f32], g: &[f32], b: &[f32]| {
        let mut y = vec![0.0; rows * h];
        let (mut m, mut s) = (vec![0.0; rows], vec![0.0; rows]);
        lc::layer_norm(x, g, b, rows, h, eps, &mut y, &mut m, &mut s).unwrap();
        (y, m, s)
    };
    let (y, mean, rstd) = fwd(&x, &gamma, &beta);
    for row in 0..rows {
        let z: Vec<f64> = (0..h)
            .map(|j| f64::from((y[row * h + j] - beta[j]) / gamma[j]))
            .collect();
        let m = z.iter().sum::<f64>() / h as f64;
        let v = z.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / h as f64;
        assert!(
            m.abs() < 1e-5 && (v - 1.0).abs() < 1e-4,
            "row {row}: {m} {v}"
        );
        let xm = x[row * h..(row + 1) * h]
            .iter()
            .map(|&v| f64::from(v))
            .sum::<f64>()
            / h as f64;
        assert!((f64::from(mean[row]) - xm).abs() < 1e-6);
        assert!(rstd[row] > 0.0);
    }
    let mut dx = vec![f32::NAN; rows * h];
    let (mut dg, mut db) = (vec![f32::NAN; h], vec![f32::NAN; h]);
    lc::layer_norm_backward(
        &w, &x, &mean, &rstd, &gamma, rows, h, &mut dx, &mut dg, &mut db,
    )
    .unwrap();
    let lx = |x: &[f32]| dot(&w, &fwd(x, &gamma, &beta).0);
    let lg = |g: &[f32]| dot(&w, &fwd(&x, g, &beta).0);
    let lb = |b: &[f32]| dot(&w, &fwd(&x, &gamma, b).0);
    for i in 0..rows * h {
        assert_close(&format!("dx[{i}]"), dx[i], fd(&lx, &x, i, 1e-2), 2e-3);
    }
    for j in 0..h {
        assert_close(
            &format!("dgamma[{j}]"),
            dg[j],
            fd(&lg, &gamma, j, 1e-2),
            2e-3,
        );
        assert_close(&format!("dbeta[{j}]"), db[j], fd(&lb, &beta, j, 1e-2), 2e-3);
    }
}

#[test]
fn embedding_gather_is_layer_norm_of_the_summed_rows() {
    let mut r = rng("embedding_gather");
    let be = CpuBackend;
    let (h, vocab, positions, types, seq, batch) = (16, 50, 10, 2, 6, 3);
    let word = be.upload(&uniform(&mut r, vocab * h)).unwrap();
    let pos = be.upload(&uniform(&mut r, positions * h)).unwrap();
    let ty = be.upload(&uniform(&mut r, types * h)).unwrap();
    let gamma_h: Vec<f32> = uniform(&mut r, h).iter().map(|v| 1.0 + 0.5 * v).collect();
    let beta_h = uniform(&mut r, h);
    let (gamma, beta) = (be.upload(&gamma_h).unwrap(), be.upload(&beta_h).unwrap());
    let tables = Embeddings {
        word: &word,
        position: &pos,
        token_type: &ty,
        gamma: &gamma,
        beta: &beta,
        hidden: h,
        eps: 1e-12,
    };
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| r.random_range(0..vocab as u32))
        .collect();
    let tids: Vec<u32> = (0..batch * seq)
        .map(|_| r.random_range(0..types as u32))
        .collect();
    let rows = batch * seq;
    let mut out = be.alloc_zeros(rows * h).unwrap();
    let mut mean = be.alloc_zeros(rows).unwrap();
    let mut rstd = be.alloc_zeros(rows).unwrap();
    be.embed_layer_norm(&ids, &tids, seq, &tables, &mut out, &mut mean, &mut rstd)
        .unwrap();
    let (w, p, t) = (
        word.as_host().unwrap(),
        pos.as_host().unwrap(),
        ty.as_host().unwrap(),
    );
    let mut sum = vec![0.0f32; rows * h];
    for row in 0..rows {
        for j in 0..h {
            sum[row * h + j] = (w[ids[row] as usize * h + j] + t[tids[row] as usize * h + j])
                + p[(row % seq) * h + j];
        }
    }
    let mut want = vec![0.0; rows * h];
    let (mut m2, mut s2) = (vec![0.0; rows], vec![0.0; rows]);
    lc::layer_norm(
        &sum, &gamma_h, &beta_h, rows, h, 1e-12, &mut want, &mut m2, &mut s2,
    )
    .unwrap();
    assert_eq!(out.as_host().unwrap(), &want[..]);
    assert_eq!(mean.as_host().unwrap(), &m2[..]);

    let mut bad = ids.clone();
    bad[4] = vocab as u32;
    assert!(matches!(
        be.embed_layer_norm(&bad, &tids, seq, &tables, &mut out, &mut mean, &mut rstd),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        be.embed_layer_norm(&ids, &tids, 11, &tables, &mut out, &mut mean, &mut rstd),
        Err(Error::Shape { .. })
    ));
    let mut short = be.alloc_zeros(rows - 1).unwrap();
    assert!(matches!(
        be.embed_layer_norm(&ids, &tids, seq, &tables, &mut out, &mut short, &mut rstd),
        Err(Error::Length { .. })
    ));
}

#[test]
fn gelu_matches_reference_values_and_its_derivative() {
    // gelu(x) = x Φ(x) to 7 digits.
    for (x, want) in [
        (1.0f32, 0.841_344_7f64),
        (-1.0, -0.158_655_3),
        (2.0, 1.954_499_7),
        (0.5, 0.345_731_4),
        (-3.0, -0.004_049_6),
    ] {
        let got = f64::from(lc::gelu(x));
        assert!((got - want).abs() < 2e-6, "gelu({x}) = {got}, want {want}");
    }
    let mut r = rng("gelu_fd");
    let (rows, cols) = (3, 7);
    let x: Vec<f32> = uniform(&mut r, rows * cols)
        .iter()
        .map(|v| 3.0 * v)
        .collect();
    let bias = uniform(&mut r, cols);
    let w = uniform(&mut r, rows * cols);
    let fwd = |x: &[f32]| {
        let mut y = vec![0.0; rows * cols];
        lc::bias_gelu(x, &bias, rows, cols, &mut y).unwrap();
        dot(&w, &y)
    };
    let mut dx = vec![f32::NAN; rows * cols];
    lc::bias_gelu_backward(&w, &x, &bias, rows, cols, &mut dx).unwrap();
    for i in 0..rows * cols {
        assert_close(&format!("dx[{i}]"), dx[i], fd(&fwd, &x, i, 1e-2), 1e-3);
    }
}

#[test]
fn masked_softmax_excludes_padding_and_backward_matches_finite_differences() {
    let mut r = rng("softmax_fd");
    let shape = AttnShape {
        batch: 3,
        heads: 2,
        q_len: 4,
        k_len: 5,
    };
    let scale = 0.7f32;
    let s: Vec<f32> = uniform(&mut r, shape.len())
        .iter()
        .map(|v| 3.0 * v)
        .collect();
    // Example 0 is full, example 1 has two padded keys, example 2 none kept.
    let mut mask = vec![1.0f32; shape.batch * shape.k_len];
    mask[5 + 3] = 0.0;
    mask[5 + 4] = 0.0;
    for v in &mut mask[10..15] {
        *v = 0.0;
    }
    let fwd = |s: &[f32]| {
        let mut p = vec![f32::NAN; shape.len()];
        lc::masked_softmax(s, &mask, shape, scale, &mut p).unwrap();
        p
    };
    let p = fwd(&s);
    let per_example = shape.heads * shape.q_len;
    for (row, pr) in p.chunks(shape.k_len).enumerate() {
        let ex = row / per_example;
        let total: f32 = pr.iter().sum();
        if ex == 2 {
            assert!(pr.iter().all(|&v| v == 0.0), "row {row}: {pr:?}");
            continue;
        }
        assert!((total - 1.0).abs() < 1e-6, "row {row} sums to {total}");
        for j in 0..shape.k_len {
            if mask[ex * shape.k_len + j] == 0.0 {
                assert_eq!(pr[j], 0.0);
            }
        }
    }
    let w = uniform(&mut r, shape.len());
    let mut ds = vec![f32::NAN; shape.len()];
    lc::masked_softmax_backward(&w, &p, shape, scale, &mut ds).unwrap();
    let loss = |s: &[f32]| dot(&w, &fwd(s));
    for i in 0..shape.len() {
        assert_close(&format!("ds[{i}]"), ds[i], fd(&loss, &s, i, 1e-2), 2e-3);
    }
}

#[test]
fn cross_entropy_is_the_negative_log_likelihood_and_its_gradient() {
    let mut r = rng("cross_entropy_fd");
    let (b, k) = (4, 5);
    let z: Vec<f32> = uniform(&mut r, b * k).iter().map(|v| 4.0 * v).collect();
    let labels: Vec<u32> = (0..b).map(|_| r.random_range(0..k as u32)).collect();
    let run = |z: &[f32]| {
        let mut l = vec![f32::NAN; b];
        let mut d = vec![f32::NAN; b * k];
        lc::cross_entropy(z, &labels, k, &mut l, &mut d).unwrap();
        (l, d)
    };
    let (loss, dz) = run(&z);
    for i in 0..b {
        let zi: Vec<f64> = z[i * k..(i + 1) * k]
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let lse = zi.iter().map(|v| v.exp()).sum::<f64>().ln();
        let want = lse - zi[labels[i] as usize];
        assert!(
            (f64::from(loss[i]) - want).abs() < 1e-5,
            "{} vs {want}",
            loss[i]
        );
        let row_sum: f32 = dz[i * k..(i + 1) * k].iter().sum();
        assert!(row_sum.abs() < 1e-6);
        for j in 0..k {
            let f = |z: &[f32]| f64::from(run(z).0[i]);
            assert_close(
                &format!("dz[{i},{j}]"),
                dz[i * k + j],
                fd(&f, &z, i * k + j, 1e-2),
                2e-3,
            );
        }
    }
    let mut l = vec![0.0; b];
    let mut d = vec![0.0; b * k];
    assert!(matches!(
        lc::cross_entropy(&z, &[0, 1, 2, k as u32], k, &mut l, &mut d),
        Err(Error::Shape { .. })
    ));
    assert!(matches!(
        lc::cross_entropy(&z, &labels, k, &mut l[..3], &mut d),
        Err(Error::Length { .. })
    ));
}

/// The mask fedsvd-model draws (model.rs `adapter_forward`), with rand_chacha.
fn model_mask(spec: &DropoutSpec, example: u64, len: usize) -> Vec<f32> {
    let seed = lc::splitmix(spec.seed ^ lc::splitmix((u64::from(spec.stream) << 32) | example));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let keep = 1.0 / (1.0 - spec.p);
    (0..len)
        .map(|_| {
            if rng.random::<f32>() < spec.p {
                0.0
            } else {
                keep
            }
        })
        .collect()
}

#[test]
fn dropout_masks_are_those_of_rand_chacha_bit_for_bit() {
    // The keystream itself, across the 4-block refills of rand_chacha.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x1234_5678_9abc_def0);
    let key = lc::chacha_key_from_u64(0x1234_5678_9abc_def0);
    for block in 0..9u64 {
        let words = lc::chacha8_block(&key, block);
        for (w, &got) in words.iter().enumerate() {
            assert_eq!(rng.next_u32(), got, "block {block} word {w}");
        }
    }
    for &(p, stream, first, per_example) in &[
        (0.1f32, 0u32, 0u64, 384usize),
        (0.5, 3, 17, 1000),
        (0.05, 11, 1 << 33, 7),
        (0.0, 1, 2, 33),
    ] {
        let spec = DropoutSpec {
            p,
            seed: 0xfeed_beef ^ u64::from(stream),
            stream,
            first_example: first,
        };
        let batch = 3;
        let mut out = vec![f32::NAN; batch * per_example];
        lc::dropout_mask(&spec, batch, per_example, &mut out).unwrap();
        for i in 0..batch {
            let want = model_mask(&spec, first + i as u64, per_example);
            let got = &out[i * per_example..(i + 1) * per_example];
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "p {p} stream {stream} example {}: masks differ",
                first + i as u64
            );
        }
        let dropped = out.iter().filter(|&&v| v == 0.0).count() as f64 / out.len() as f64;
        assert!(
            (dropped - f64::from(p)).abs() < 0.1,
            "dropped {dropped} at p {p}"
        );
    }
    let mut out = vec![0.0; 4];
    let bad = DropoutSpec {
        p: 1.0,
        seed: 0,
        stream: 0,
        first_example: 0,
    };
    assert!(matches!(
        lc::dropout_mask(&bad, 1, 4, &mut out),
        Err(Error::Parameter { name: "p", .. })
    ));
}

#[test]
fn gemm_reference_handles_transposes_strides_offsets_and_bf16() {
    let mut r = rng("gemm_reference");
    for &(trans_a, trans_b, beta, precision) in &[
        (false, false, 0.0f32, Precision::F32),
        (true, false, 0.5, Precision::F32),
        (false, true, 0.0, Precision::Tf32),
        (true, true, -1.0, Precision::Bf16),
    ] {
        let (m, n, k) = (5, 7, 9);
        let mut spec = GemmSpec::new(m, n, k);
        spec.trans_a = trans_a;
        spec.trans_b = trans_b;
        spec.alpha = 1.5;
        spec.beta = beta;
        spec.precision = precision;
        spec.lda = spec.a_dims().1 + 2;
        spec.ldb = spec.b_dims().1 + 1;
        spec.ldc = n + 3;
        spec.offset_a = 4;
        spec.offset_b = 1;
        spec.offset_c = 2;
        let batch = BatchStrides {
            count: 3,
            stride_a: spec.a_dims().0 * spec.lda + 5,
            stride_b: spec.b_dims().0 * spec.ldb,
            stride_c: m * spec.ldc + 1,
        };
        let a = uniform(&mut r, spec.offset_a + 3 * batch.stride_a);
        let b = uniform(&mut r, spec.offset_b + 3 * batch.stride_b);
        let c0: Vec<f32> = if beta == 0.0 {
            vec![f32::NAN; spec.offset_c + 3 * batch.stride_c]
        } else {
            uniform(&mut r, spec.offset_c + 3 * batch.stride_c)
        };
        let mut c = c0.clone();
        lc::gemm_strided_batched(&spec, &batch, &a, &b, &mut c).unwrap();
        let round = |x: &[f32]| -> Vec<f32> {
            if precision == Precision::Bf16 {
                x.iter()
                    .map(|&v| half::bf16::from_f32(v).to_f32())
                    .collect()
            } else {
                x.to_vec()
            }
        };
        let (want, bound) = gemm_f64(&spec, &batch, &round(&a), &round(&b), &c0);
        let mut written = 0;
        for (o, (&got, (&w, &bd))) in c.iter().zip(want.iter().zip(&bound)).enumerate() {
            if bd == 0.0 {
                // Outside every C block: untouched.
                assert!(got.to_bits() == c0[o].to_bits(), "element {o} was written");
                continue;
            }
            written += 1;
            let err = (f64::from(got) - w).abs() / bd;
            assert!(err < 1e-5, "{precision:?} element {o}: {got} vs {w}");
        }
        assert_eq!(written, 3 * m * n);
    }
    // A buffer one element short is a length error.
    let spec = GemmSpec::new(4, 4, 4);
    let (a, b) = (vec![1.0; 16], vec![1.0; 15]);
    let mut c = vec![0.0; 16];
    assert!(matches!(
        lc::gemm_strided_batched(&spec, &BatchStrides::single(), &a, &b, &mut c),
        Err(Error::Length {
            what: "gemm: b",
            ..
        })
    ));
    let mut bad = spec;
    bad.lda = 3;
    assert!(matches!(
        lc::gemm_strided_batched(&bad, &BatchStrides::single(), &a, &a, &mut c),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn layer_ops_reject_wrong_lengths() {
    let be = CpuBackend;
    let x = be.upload(&[1.0; 12]).unwrap();
    let g = be.upload(&[1.0; 4]).unwrap();
    let mut y = be.alloc_zeros(12).unwrap();
    let mut m = be.alloc_zeros(3).unwrap();
    let mut s = be.alloc_zeros(2).unwrap();
    assert!(matches!(
        be.layer_norm(&x, &g, &g, 3, 4, 1e-5, &mut y, &mut m, &mut s),
        Err(Error::Length {
            what: "layer_norm: rstd",
            ..
        })
    ));
    let mut s = be.alloc_zeros(3).unwrap();
    assert!(matches!(
        be.layer_norm(&x, &g, &g, 3, 4, 0.0, &mut y, &mut m, &mut s),
        Err(Error::Parameter { name: "eps", .. })
    ));
    let mut y_short = be.alloc_zeros(11).unwrap();
    assert!(matches!(
        be.bias_gelu(&x, &g, 3, 4, &mut y_short),
        Err(Error::Length { .. })
    ));
    let shape = AttnShape {
        batch: 1,
        heads: 1,
        q_len: 3,
        k_len: 4,
    };
    let short_mask = be.upload(&[1.0; 3]).unwrap();
    assert!(matches!(
        be.masked_softmax(&x, &short_mask, shape, 1.0, &mut y),
        Err(Error::Length { .. })
    ));
    assert!(matches!(
        be.dropout_mask(
            &DropoutSpec {
                p: 0.1,
                seed: 1,
                stream: 0,
                first_example: 0
            },
            2,
            5,
            &mut y
        ),
        Err(Error::Length { .. })
    ));
}
