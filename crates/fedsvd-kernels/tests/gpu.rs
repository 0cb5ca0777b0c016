//! CUDA against the CPU reference on fresh random inputs. Each test prints
//! SKIP and passes when no CUDA device is present, and fails when
//! `FEDSVD_REQUIRE_GPU=1` (the GPU machine's run sets it). Output buffers are
//! poisoned with NaN first, so an element a kernel forgets to write fails the
//! comparison.

mod common;

use std::io::Write;

use common::{gemm_f64, grads_f64, max_rel, rel, rng, uniform};
use fedsvd_kernels::layers_cpu as lc;
use fedsvd_kernels::{
    AttnShape, BatchStrides, Buffer, CudaBackend, DeviceProbe, DropoutSpec, Embeddings, Error,
    GemmSpec, GradAlgo, GradShape, Kernels, LayerKernels, NoiseSpec, OutLayout, Precision, cpu,
    philox, probe,
};
use rand::Rng;

fn cuda_or_skip(test: &str) -> Option<CudaBackend> {
    let required = std::env::var("FEDSVD_REQUIRE_GPU").as_deref() == Ok("1");
    match probe() {
        DeviceProbe::Devices(_) => match CudaBackend::new(0) {
            Ok(be) => Some(be),
            Err(e) => panic!("{test}: a CUDA device is present but the backend failed: {e}"),
        },
        other => {
            if required {
                panic!("{test}: FEDSVD_REQUIRE_GPU=1 but no usable CUDA device ({other:?})");
            }
            // Written to the stderr handle, not through eprintln!, so the
            // test harness does not capture it and the SKIP stays visible.
            let _ = writeln!(std::io::stderr(), "SKIP {test}: no CUDA device ({other:?})");
            None
        }
    }
}

fn algos(be: &CudaBackend) -> Vec<GradAlgo> {
    let mut v = vec![GradAlgo::Fused];
    if be.has_cublas() {
        v.push(GradAlgo::Cublas);
    }
    v
}

#[test]
fn gpu_per_example_grads_match_cpu() {
    let Some(mut be) = cuda_or_skip("gpu_per_example_grads_match_cpu") else {
        return;
    };
    let mut r = rng("gpu_per_example_grads_match_cpu");
    let shapes = [
        (1, 1, 1, 1),
        (3, 17, 33, 5),
        (16, 128, 384, 8),
        (5, 100, 200, 16),
        (4, 70, 129, 12),
        (2, 33, 65, 24),
        (3, 40, 50, 40),
    ];
    for algo in algos(&be) {
        be.set_grad_algo(algo).unwrap();
        for &(batch, tokens, d_out, rank) in &shapes {
            let shape = GradShape {
                batch,
                tokens,
                d_out,
                rank,
            };
            let g = uniform(&mut r, shape.g_len());
            let h = uniform(&mut r, shape.h_len());
            // A strided layout with poisoned gaps: blocks must be written
            // completely and nothing else touched.
            let layout = OutLayout {
                row_stride: shape.block_len() + 13,
                offset: 5,
            };
            let len = layout.required_len(&shape) + 3;
            let (gd, hd) = (be.upload(&g).unwrap(), be.upload(&h).unwrap());
            let mut out = be.upload(&vec![f32::NAN; len]).unwrap();
            let mut sq = be.upload(&vec![f32::NAN; batch]).unwrap();
            be.per_example_grads(&gd, &hd, shape, layout, &mut out, &mut sq)
                .unwrap();
            let out = be.download(&out).unwrap();
            let sq = be.download(&sq).unwrap();

            let (want, bound) = grads_f64(&g, &h, batch, tokens, d_out, rank);
            let mut packed = Vec::with_capacity(want.len());
            for (p, v) in out.iter().enumerate() {
                let (i, c) = (p / layout.row_stride, p % layout.row_stride);
                if i < batch && c >= 5 && c < 5 + shape.block_len() {
                    packed.push(*v);
                } else {
                    assert!(
                        v.is_nan(),
                        "{algo:?} {shape:?}: element {p} outside the blocks written"
                    );
                }
            }
            let err = max_rel(&packed, &want, &bound);
            assert!(err <= 1e-5, "{algo:?} {shape:?}: max relative error {err}");
            let mut cpu_out = vec![0.0; want.len()];
            let mut cpu_sq = vec![0.0; batch];
            cpu::per_example_grads(
                &g,
                &h,
                shape,
                OutLayout::packed(&shape),
                &mut cpu_out,
                &mut cpu_sq,
            )
            .unwrap();
            for i in 0..batch {
                let e = rel(sq[i], cpu_sq[i]);
                assert!(
                    e <= 1e-5,
                    "{algo:?} {shape:?} example {i}: norm {} vs cpu {} ({e})",
                    sq[i],
                    cpu_sq[i]
                );
            }
        }
    }
}

#[test]
fn gpu_row_norms_match_cpu() {
    let Some(be) = cuda_or_skip("gpu_row_norms_match_cpu") else {
        return;
    };
    let mut r = rng("gpu_row_norms_match_cpu");
    for &(rows, cols) in &[(1, 1), (3, 8191), (7, 8193), (64, 100_003), (2, 1 << 20)] {
        let x = uniform(&mut r, rows * cols);
        let xd = be.upload(&x).unwrap();
        let mut out = be.upload(&vec![f32::NAN; rows]).unwrap();
        be.row_sq_norms(&xd, rows, cols, &mut out).unwrap();
        let got = be.download(&out).unwrap();
        let mut want = vec![0.0; rows];
        cpu::row_sq_norms(&x, rows, cols, &mut want).unwrap();
        for i in 0..rows {
            let e = rel(got[i], want[i]);
            assert!(
                e <= 1e-5,
                "{rows}x{cols} row {i}: {} vs {} ({e})",
                got[i],
                want[i]
            );
        }
    }
}

#[test]
fn gpu_clip_scale_sum_matches_cpu() {
    let Some(be) = cuda_or_skip("gpu_clip_scale_sum_matches_cpu") else {
        return;
    };
    let mut r = rng("gpu_clip_scale_sum_matches_cpu");
    // cols % 4 != 0 takes the scalar path, the rest the vector path.
    for &(rows, cols) in &[(1, 1), (5, 4097), (32, 65_536), (9, 100_002)] {
        let x = uniform(&mut r, rows * cols);
        let mut sq = vec![0.0; rows];
        cpu::row_sq_norms(&x, rows, cols, &mut sq).unwrap();
        let clip = 0.5 * sq.iter().map(|v| v.sqrt()).fold(0.0, f32::max);
        let mut want = vec![0.0; cols];
        cpu::clip_scale_sum(&x, rows, cols, &sq, clip, &mut want).unwrap();
        let xd = be.upload(&x).unwrap();
        let sqd = be.upload(&sq).unwrap();
        let mut out = be.upload(&vec![f32::NAN; cols]).unwrap();
        be.clip_scale_sum(&xd, rows, cols, &sqd, clip, &mut out)
            .unwrap();
        let got = be.download(&out).unwrap();
        let f = fedsvd_kernels::clip_factors(&sq, clip).unwrap();
        for p in 0..cols {
            let scale: f64 = (0..rows)
                .map(|i| (f64::from(f[i]) * f64::from(x[i * cols + p])).abs())
                .sum();
            let e = (f64::from(got[p]) - f64::from(want[p])).abs() / scale.max(1e-30);
            assert!(
                e <= 1e-5,
                "{rows}x{cols} column {p}: {} vs {} ({e})",
                got[p],
                want[p]
            );
        }
    }
}

#[test]
fn gpu_noise_reproduces_the_cpu_stream() {
    let Some(be) = cuda_or_skip("gpu_noise_reproduces_the_cpu_stream") else {
        return;
    };
    let mut r = rng("gpu_noise_reproduces_the_cpu_stream");
    use rand::Rng;
    for &(len, offset) in &[
        (1usize, 0u64),
        (7, 1),
        (4096, 2),
        (100_001, 3),
        (1 << 20, (1u64 << 35) + 1),
    ] {
        let seed: u64 = r.random();
        let noise = NoiseSpec {
            sigma: 1.0,
            clip: 1.0,
            scale: 1.0,
            seed,
            offset,
        };
        let mut xd = be.alloc_zeros(len).unwrap();
        be.add_noise(&mut xd, &noise).unwrap();
        let got = be.download(&xd).unwrap();
        let mut want = vec![0.0; len];
        philox::fill_gaussian(seed, offset, &mut want);
        for p in 0..len {
            let e = (got[p] - want[p]).abs();
            assert!(
                e <= 1e-5 * want[p].abs().max(1.0),
                "len {len} offset {offset} position {p}: {} vs {}",
                got[p],
                want[p]
            );
        }
    }
}

#[test]
fn gpu_noise_has_the_requested_moments() {
    let Some(be) = cuda_or_skip("gpu_noise_has_the_requested_moments") else {
        return;
    };
    let n = 1usize << 22;
    let noise = NoiseSpec {
        sigma: 1.7,
        clip: 0.6,
        scale: 0.125,
        seed: rand::random(),
        offset: 11,
    };
    let mut xd = be.alloc_zeros(n).unwrap();
    be.add_noise(&mut xd, &noise).unwrap();
    let z = be.download(&xd).unwrap();
    let mean = z.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
    let sd = (z
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / (n as f64 - 1.0))
        .sqrt();
    let want = f64::from(noise.std() * noise.scale);
    assert!(mean.abs() < 5.0 * want / (n as f64).sqrt(), "mean {mean}");
    assert!(
        (sd - want).abs() < 5.0 * want / (2.0 * n as f64).sqrt(),
        "sd {sd} want {want}"
    );
}

#[test]
fn gpu_clip_and_noise_matches_cpu() {
    let Some(be) = cuda_or_skip("gpu_clip_and_noise_matches_cpu") else {
        return;
    };
    let mut r = rng("gpu_clip_and_noise_matches_cpu");
    for &(rows, cols, offset) in &[
        (8usize, 4096usize, 0u64),
        (13, 10_001, 6),
        (64, 262_144, 1 << 40),
    ] {
        let x = uniform(&mut r, rows * cols);
        let mut sq = vec![0.0; rows];
        cpu::row_sq_norms(&x, rows, cols, &mut sq).unwrap();
        let noise = NoiseSpec {
            sigma: 0.9,
            clip: 1.5,
            scale: 1.0 / rows as f32,
            seed: 0xdead_beef_0000_0001,
            offset,
        };
        let mut want = vec![0.0; cols];
        cpu::clip_and_noise(&x, rows, cols, &sq, &noise, &mut want).unwrap();
        let xd = be.upload(&x).unwrap();
        let mut sqd = be.upload(&vec![f32::NAN; rows]).unwrap();
        be.row_sq_norms(&xd, rows, cols, &mut sqd).unwrap();
        let mut out = be.upload(&vec![f32::NAN; cols]).unwrap();
        be.clip_and_noise(&xd, rows, cols, &sqd, &noise, &mut out)
            .unwrap();
        let got = be.download(&out).unwrap();
        for p in 0..cols {
            let mag: f32 =
                (0..rows).map(|i| x[i * cols + p].abs()).sum::<f32>() + noise.std() * 7.0;
            let e = (got[p] - want[p]).abs() / (mag * noise.scale);
            assert!(
                e <= 1e-5,
                "{rows}x{cols} column {p}: {} vs {} ({e})",
                got[p],
                want[p]
            );
        }
    }
}

#[test]
fn gpu_rejects_bad_inputs_with_typed_errors() {
    let Some(be) = cuda_or_skip("gpu_rejects_bad_inputs_with_typed_errors") else {
        return;
    };
    let x = be.upload(&[1.0; 12]).unwrap();
    let nan_norms = be.upload(&[1.0, f32::NAN, 1.0]).unwrap();
    let mut out = be.alloc_zeros(4).unwrap();
    assert!(matches!(
        be.clip_scale_sum(&x, 3, 4, &nan_norms, 1.0, &mut out),
        Err(Error::NonFiniteNorm { example: 1, .. })
    ));
    let host = fedsvd_kernels::CpuBackend.upload(&[1.0; 3]).unwrap();
    assert!(matches!(
        be.clip_scale_sum(&x, 3, 4, &host, 1.0, &mut out),
        Err(Error::WrongBackend { .. })
    ));
    // Three rows need three norms: two is a length error.
    let mut short = be.alloc_zeros(2).unwrap();
    assert!(matches!(
        be.row_sq_norms(&x, 3, 4, &mut short),
        Err(Error::Length { .. })
    ));
}

// ---------------------------------------------------------------------------
// Layer operations of a training step, at MiniLM shapes: hidden 384, 12 heads,
// 4 examples of 64 tokens, one of them padded.

const HIDDEN: usize = 384;
const HEADS: usize = 12;
const SEQ: usize = 64;
const BATCH: usize = 4;
/// Real tokens per example: full, padded, nearly empty, full.
const LENGTHS: [usize; BATCH] = [64, 37, 5, 64];

fn poisoned(be: &CudaBackend, len: usize) -> Buffer {
    be.upload(&vec![f32::NAN; len]).unwrap()
}

fn check_abs(what: &str, got: &[f32], want: &[f32], tol: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for i in 0..got.len() {
        let err = (f64::from(got[i]) - f64::from(want[i])).abs();
        assert!(
            err <= tol(i),
            "{what}[{i}]: cuda {} vs cpu {} (|diff| {err}, tolerance {})",
            got[i],
            want[i],
            tol(i)
        );
    }
}

#[test]
fn gpu_layer_norm_and_embeddings_match_cpu() {
    let Some(be) = cuda_or_skip("gpu_layer_norm_and_embeddings_match_cpu") else {
        return;
    };
    let mut r = rng("gpu_layer_norm_and_embeddings_match_cpu");
    let (rows, h, eps) = (BATCH * SEQ, HIDDEN, 1e-12f32);
    let x: Vec<f32> = uniform(&mut r, rows * h)
        .iter()
        .map(|v| 2.0 * v + 0.3)
        .collect();
    let gamma: Vec<f32> = uniform(&mut r, h).iter().map(|v| 1.0 + 0.5 * v).collect();
    let beta = uniform(&mut r, h);
    let dy = uniform(&mut r, rows * h);

    let (mut y, mut mean, mut rstd) = (vec![0.0; rows * h], vec![0.0; rows], vec![0.0; rows]);
    lc::layer_norm(
        &x, &gamma, &beta, rows, h, eps, &mut y, &mut mean, &mut rstd,
    )
    .unwrap();
    let (xd, gd, bd) = (
        be.upload(&x).unwrap(),
        be.upload(&gamma).unwrap(),
        be.upload(&beta).unwrap(),
    );
    let mut yd = poisoned(&be, rows * h);
    let mut md = poisoned(&be, rows);
    let mut sd = poisoned(&be, rows);
    be.layer_norm(&xd, &gd, &bd, rows, h, eps, &mut yd, &mut md, &mut sd)
        .unwrap();
    let yg = be.download(&yd).unwrap();
    check_abs("layer_norm y", &yg, &y, |i| {
        2e-5 * f64::from(y[i].abs()).max(1.0)
    });
    check_abs("layer_norm mean", &be.download(&md).unwrap(), &mean, |_| {
        1e-6
    });
    check_abs("layer_norm rstd", &be.download(&sd).unwrap(), &rstd, |i| {
        2e-6 * f64::from(rstd[i])
    });

    // Backward from the CPU's saved statistics on both sides.
    let (mut dx, mut dg, mut db) = (vec![0.0; rows * h], vec![0.0; h], vec![0.0; h]);
    lc::layer_norm_backward(
        &dy, &x, &mean, &rstd, &gamma, rows, h, &mut dx, &mut dg, &mut db,
    )
    .unwrap();
    let dyd = be.upload(&dy).unwrap();
    let (mh, sh) = (be.upload(&mean).unwrap(), be.upload(&rstd).unwrap());
    let mut results = Vec::new();
    for _ in 0..2 {
        let mut dxd = poisoned(&be, rows * h);
        let mut dgd = poisoned(&be, h);
        let mut dbd = poisoned(&be, h);
        be.layer_norm_backward(
            &dyd, &xd, &mh, &sh, &gd, rows, h, &mut dxd, &mut dgd, &mut dbd,
        )
        .unwrap();
        results.push((
            be.download(&dxd).unwrap(),
            be.download(&dgd).unwrap(),
            be.download(&dbd).unwrap(),
        ));
    }
    let (dxg, dgg, dbg) = &results[0];
    check_abs("layer_norm dx", dxg, &dx, |i| {
        1e-4 * f64::from(dx[i].abs()).max(1.0)
    });
    // Parameter sums: relative to the sum of absolute terms.
    let mut bound_g = vec![0.0f64; h];
    let mut bound_b = vec![0.0f64; h];
    for row in 0..rows {
        for j in 0..h {
            let d = f64::from(dy[row * h + j]);
            let xh = (f64::from(x[row * h + j]) - f64::from(mean[row])) * f64::from(rstd[row]);
            bound_g[j] += (d * xh).abs();
            bound_b[j] += d.abs();
        }
    }
    check_abs("layer_norm dgamma", dgg, &dg, |j| 1e-5 * bound_g[j]);
    check_abs("layer_norm dbeta", dbg, &db, |j| 1e-5 * bound_b[j]);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&results[0].0),
        bits(&results[1].0),
        "dx is not reproducible"
    );
    assert_eq!(
        bits(&results[0].1),
        bits(&results[1].1),
        "dgamma is not reproducible"
    );
    assert_eq!(
        bits(&results[0].2),
        bits(&results[1].2),
        "dbeta is not reproducible"
    );

    // Embedding gather + LayerNorm.
    let (vocab, positions, types) = (1000, 128, 2);
    let word = uniform(&mut r, vocab * h);
    let pos = uniform(&mut r, positions * h);
    let ty = uniform(&mut r, types * h);
    let ids: Vec<u32> = (0..rows).map(|_| r.random_range(0..vocab as u32)).collect();
    let tids: Vec<u32> = (0..rows).map(|_| r.random_range(0..types as u32)).collect();
    let cpu = fedsvd_kernels::CpuBackend;
    let host = |v: &[f32]| cpu.upload(v).unwrap();
    let (wh, ph, th, gh, bh) = (
        host(&word),
        host(&pos),
        host(&ty),
        host(&gamma),
        host(&beta),
    );
    let tables_h = Embeddings {
        word: &wh,
        position: &ph,
        token_type: &th,
        gamma: &gh,
        beta: &bh,
        hidden: h,
        eps,
    };
    let (mut out, mut m, mut s) = (vec![0.0; rows * h], vec![0.0; rows], vec![0.0; rows]);
    lc::embed_layer_norm(&ids, &tids, SEQ, &tables_h, &mut out, &mut m, &mut s).unwrap();
    let dev = |v: &[f32]| be.upload(v).unwrap();
    let (wd, pd, td) = (dev(&word), dev(&pos), dev(&ty));
    let tables_d = Embeddings {
        word: &wd,
        position: &pd,
        token_type: &td,
        gamma: &gd,
        beta: &bd,
        hidden: h,
        eps,
    };
    let mut od = poisoned(&be, rows * h);
    let mut md = poisoned(&be, rows);
    let mut sd = poisoned(&be, rows);
    be.embed_layer_norm(&ids, &tids, SEQ, &tables_d, &mut od, &mut md, &mut sd)
        .unwrap();
    check_abs("embed out", &be.download(&od).unwrap(), &out, |i| {
        2e-5 * f64::from(out[i].abs()).max(1.0)
    });
    check_abs("embed mean", &be.download(&md).unwrap(), &m, |_| 1e-6);
    let mut bad = ids.clone();
    bad[7] = vocab as u32;
    assert!(matches!(
        be.embed_layer_norm(&bad, &tids, SEQ, &tables_d, &mut od, &mut md, &mut sd),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn gpu_bias_gelu_matches_cpu() {
    let Some(be) = cuda_or_skip("gpu_bias_gelu_matches_cpu") else {
        return;
    };
    let mut r = rng("gpu_bias_gelu_matches_cpu");
    let (rows, cols) = (BATCH * SEQ, 4 * HIDDEN);
    let x: Vec<f32> = uniform(&mut r, rows * cols)
        .iter()
        .map(|v| 4.0 * v)
        .collect();
    let bias = uniform(&mut r, cols);
    let dy = uniform(&mut r, rows * cols);
    let (mut y, mut dx) = (vec![0.0; rows * cols], vec![0.0; rows * cols]);
    lc::bias_gelu(&x, &bias, rows, cols, &mut y).unwrap();
    lc::bias_gelu_backward(&dy, &x, &bias, rows, cols, &mut dx).unwrap();
    let (xd, bd, dyd) = (
        be.upload(&x).unwrap(),
        be.upload(&bias).unwrap(),
        be.upload(&dy).unwrap(),
    );
    let mut yd = poisoned(&be, rows * cols);
    let mut dxd = poisoned(&be, rows * cols);
    be.bias_gelu(&xd, &bd, rows, cols, &mut yd).unwrap();
    be.bias_gelu_backward(&dyd, &xd, &bd, rows, cols, &mut dxd)
        .unwrap();
    check_abs("gelu y", &be.download(&yd).unwrap(), &y, |i| {
        5e-6 * f64::from(y[i].abs()).max(1.0)
    });
    check_abs("gelu dx", &be.download(&dxd).unwrap(), &dx, |_| 5e-6);
}

fn key_mask() -> Vec<f32> {
    let mut m = vec![0.0f32; BATCH * SEQ];
    for (i, &len) in LENGTHS.iter().enumerate() {
        for v in &mut m[i * SEQ..i * SEQ + len] {
            *v = 1.0;
        }
    }
    m
}

#[test]
fn gpu_masked_softmax_matches_cpu() {
    let Some(be) = cuda_or_skip("gpu_masked_softmax_matches_cpu") else {
        return;
    };
    let mut r = rng("gpu_masked_softmax_matches_cpu");
    let scale = 1.0 / ((HIDDEN / HEADS) as f32).sqrt();
    for (q_len, fully_masked) in [(SEQ, false), (1, true)] {
        let shape = AttnShape {
            batch: BATCH,
            heads: HEADS,
            q_len,
            k_len: SEQ,
        };
        let s: Vec<f32> = uniform(&mut r, shape.len())
            .iter()
            .map(|v| 20.0 * v)
            .collect();
        let mut mask = key_mask();
        if fully_masked {
            // An example without keys gives rows of zeros, not NaN.
            mask[2 * SEQ..3 * SEQ].fill(0.0);
        }
        let dp = uniform(&mut r, shape.len());
        let mut p = vec![0.0; shape.len()];
        lc::masked_softmax(&s, &mask, shape, scale, &mut p).unwrap();
        let mut ds = vec![0.0; shape.len()];
        lc::masked_softmax_backward(&dp, &p, shape, scale, &mut ds).unwrap();
        let (sd, md, dpd) = (
            be.upload(&s).unwrap(),
            be.upload(&mask).unwrap(),
            be.upload(&dp).unwrap(),
        );
        let mut pd = poisoned(&be, shape.len());
        be.masked_softmax(&sd, &md, shape, scale, &mut pd).unwrap();
        let pg = be.download(&pd).unwrap();
        check_abs("softmax p", &pg, &p, |i| 1e-5 * f64::from(p[i]) + 1e-12);
        for i in 0..p.len() {
            if p[i] == 0.0 {
                assert_eq!(pg[i], 0.0, "softmax p[{i}]: a masked key got weight");
            }
        }
        // Backward from the CPU's probabilities on both sides.
        let ph = be.upload(&p).unwrap();
        let mut dsd = poisoned(&be, shape.len());
        be.masked_softmax_backward(&dpd, &ph, shape, scale, &mut dsd)
            .unwrap();
        let k = shape.k_len;
        let bound: Vec<f64> = (0..shape.len())
            .map(|i| {
                let row = i / k;
                let dot: f64 = (0..k)
                    .map(|j| (f64::from(dp[row * k + j]) * f64::from(p[row * k + j])).abs())
                    .sum();
                f64::from(p[i]) * (f64::from(dp[i].abs()) + dot) * f64::from(scale)
            })
            .collect();
        check_abs("softmax ds", &be.download(&dsd).unwrap(), &ds, |i| {
            1e-5 * bound[i] + 1e-12
        });
    }
}

#[test]
fn gpu_dropout_masks_equal_the_cpu_bit_for_bit() {
    let Some(be) = cuda_or_skip("gpu_dropout_masks_equal_the_cpu_bit_for_bit") else {
        return;
    };
    for &(p, stream, first, per_example) in &[
        (0.1f32, 0u32, 0u64, SEQ * HIDDEN),
        (0.05, 7, 29, 37 * HIDDEN + 3),
        (0.5, 11, (1u64 << 32) + 5, 17),
        (0.0, 2, 3, 1000),
    ] {
        let spec = DropoutSpec {
            p,
            seed: 0x5eed_0000_0000_0001 ^ u64::from(stream),
            stream,
            first_example: first,
        };
        let mut want = vec![0.0; BATCH * per_example];
        lc::dropout_mask(&spec, BATCH, per_example, &mut want).unwrap();
        let mut d = poisoned(&be, BATCH * per_example);
        be.dropout_mask(&spec, BATCH, per_example, &mut d).unwrap();
        let got = be.download(&d).unwrap();
        for i in 0..got.len() {
            assert!(
                got[i].to_bits() == want[i].to_bits(),
                "p {p} stream {stream} first {first}: element {i} is {} on cuda, {} on cpu",
                got[i],
                want[i]
            );
        }
    }
}

#[test]
fn gpu_cross_entropy_matches_cpu() {
    let Some(be) = cuda_or_skip("gpu_cross_entropy_matches_cpu") else {
        return;
    };
    let mut r = rng("gpu_cross_entropy_matches_cpu");
    for &(b, k) in &[(32usize, 2usize), (7, 5), (64, 50)] {
        let z: Vec<f32> = uniform(&mut r, b * k).iter().map(|v| 8.0 * v).collect();
        let labels: Vec<u32> = (0..b).map(|_| r.random_range(0..k as u32)).collect();
        let (mut l, mut d) = (vec![0.0; b], vec![0.0; b * k]);
        lc::cross_entropy(&z, &labels, k, &mut l, &mut d).unwrap();
        let zd = be.upload(&z).unwrap();
        let mut ld = poisoned(&be, b);
        let mut dd = poisoned(&be, b * k);
        be.cross_entropy(&zd, &labels, k, &mut ld, &mut dd).unwrap();
        check_abs("cross-entropy loss", &be.download(&ld).unwrap(), &l, |i| {
            1e-5 * f64::from(l[i].abs()).max(1.0)
        });
        check_abs(
            "cross-entropy dlogits",
            &be.download(&dd).unwrap(),
            &d,
            |_| 1e-5,
        );
        let mut bad = labels.clone();
        bad[0] = k as u32;
        assert!(matches!(
            be.cross_entropy(&zd, &bad, k, &mut ld, &mut dd),
            Err(Error::Shape { .. })
        ));
    }
}

/// A named GEMM with its inputs and the initial C.
type GemmCase = (
    &'static str,
    GemmSpec,
    BatchStrides,
    Vec<f32>,
    Vec<f32>,
    Vec<f32>,
);

/// The GEMMs of a layer: a projection, the attention scores of every head
/// (strided-batched over heads, reading Q and K inside a packed QKV matrix)
/// and per-example weight gradients (strided-batched over examples,
/// accumulating into C).
fn layer_gemms(r: &mut rand::rngs::StdRng) -> Vec<GemmCase> {
    let (h, t, dh) = (HIDDEN, SEQ, HIDDEN / HEADS);
    let rows = BATCH * t;
    let mut out = Vec::new();
    // X [rows, h] · Wᵀ, W [3h, h].
    let mut proj = GemmSpec::new(rows, 3 * h, h);
    proj.trans_b = true;
    proj.ldb = h;
    out.push((
        "qkv projection",
        proj,
        BatchStrides::single(),
        uniform(r, rows * h),
        uniform(r, 3 * h * h),
        vec![f32::NAN; rows * 3 * h],
    ));
    // Scores of example 2, every head: Q_h K_hᵀ / √dh.
    let qkv = uniform(r, rows * 3 * h);
    let ex = 2;
    let mut scores = GemmSpec::new(t, t, dh);
    scores.trans_b = true;
    scores.alpha = 1.0 / (dh as f32).sqrt();
    scores.lda = 3 * h;
    scores.ldb = 3 * h;
    scores.ldc = t;
    scores.offset_a = ex * t * 3 * h;
    scores.offset_b = ex * t * 3 * h + h;
    scores.offset_c = ex * HEADS * t * t;
    out.push((
        "attention scores",
        scores,
        BatchStrides {
            count: HEADS,
            stride_a: dh,
            stride_b: dh,
            stride_c: t * t,
        },
        qkv.clone(),
        qkv,
        vec![f32::NAN; BATCH * HEADS * t * t],
    ));
    // dW_i += dY_iᵀ X_i for every example.
    let mut grads = GemmSpec::new(h, h, t);
    grads.trans_a = true;
    // Aᵀ is stored [t, h]: its rows are h wide (the H200 run of 2026-12-04
    // refused the default lda = k = t, correctly).
    grads.lda = h;
    grads.beta = 1.0;
    out.push((
        "per-example gradients",
        grads,
        BatchStrides {
            count: BATCH,
            stride_a: t * h,
            stride_b: t * h,
            stride_c: h * h,
        },
        uniform(r, rows * h),
        uniform(r, rows * h),
        uniform(r, BATCH * h * h),
    ));
    out
}

#[test]
fn gpu_gemms_match_f64_in_every_precision() {
    let Some(be) = cuda_or_skip("gpu_gemms_match_f64_in_every_precision") else {
        return;
    };
    assert!(
        be.has_cublas(),
        "libcublas was not found (LD_LIBRARY_PATH needs the CUDA toolkit's lib64)"
    );
    let mut r = rng("gpu_gemms_match_f64_in_every_precision");
    for (precision, tol) in [
        (Precision::F32, 2e-5),
        (Precision::Tf32, 5e-3),
        (Precision::Bf16, 1e-4),
    ] {
        for (name, mut spec, batch, a, b, c0) in layer_gemms(&mut r) {
            spec.precision = precision;
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
            let (ad, bd) = (be.upload(&a).unwrap(), be.upload(&b).unwrap());
            let mut runs = Vec::new();
            for _ in 0..2 {
                let mut cd = be.upload(&c0).unwrap();
                if batch.count == 1 {
                    be.gemm(&spec, &ad, &bd, &mut cd).unwrap();
                } else {
                    be.gemm_strided_batched(&spec, &batch, &ad, &bd, &mut cd)
                        .unwrap();
                }
                runs.push(be.download(&cd).unwrap());
            }
            let got = &runs[0];
            let mut worst = 0.0f64;
            for i in 0..got.len() {
                if bound[i] == 0.0 {
                    assert!(
                        got[i].to_bits() == c0[i].to_bits(),
                        "{precision:?} {name}: element {i} outside C was written"
                    );
                    continue;
                }
                let err = (f64::from(got[i]) - want[i]).abs() / bound[i];
                worst = worst.max(err);
                assert!(
                    err <= tol,
                    "{precision:?} {name}: element {i} is {} vs {} (relative {err})",
                    got[i],
                    want[i]
                );
            }
            assert!(
                runs[0]
                    .iter()
                    .zip(&runs[1])
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{precision:?} {name}: two identical calls differ"
            );
            let _ = writeln!(
                std::io::stderr(),
                "{precision:?} {name}: worst error {worst:.2e} of the absolute bound"
            );
        }
    }
    // Typed errors before anything runs.
    let spec = GemmSpec::new(4, 4, 4);
    let (a, b) = (
        be.upload(&[1.0; 16]).unwrap(),
        be.upload(&[1.0; 15]).unwrap(),
    );
    let mut c = be.alloc_zeros(16).unwrap();
    assert!(matches!(
        be.gemm(&spec, &a, &b, &mut c),
        Err(Error::Length {
            what: "gemm: b",
            ..
        })
    ));
    let host = fedsvd_kernels::CpuBackend.upload(&[1.0; 16]).unwrap();
    assert!(matches!(
        be.gemm(&spec, &a, &host, &mut c),
        Err(Error::WrongBackend { .. })
    ));
}
