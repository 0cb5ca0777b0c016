//! The CPU reference backend against f64 references, its determinism
//! across thread counts, and its typed errors.

mod common;

use common::{grads_f64, max_rel, rel, rng, uniform};
use fedsvd_kernels::{
    Backend, Buffer, CpuBackend, Error, GradShape, Kernels, NoiseSpec, OutLayout, clip_factors,
    cpu, philox,
};
use ndarray::{Array3, Axis};

#[test]
fn per_example_grads_match_f64_reference() {
    let mut r = rng("per_example_grads_match_f64_reference");
    for &(batch, tokens, d_out, rank) in &[
        (1, 1, 1, 1),
        (3, 17, 33, 5),
        (8, 64, 96, 8),
        (2, 130, 40, 19),
    ] {
        let shape = GradShape {
            batch,
            tokens,
            d_out,
            rank,
        };
        let g = uniform(&mut r, shape.g_len());
        let h = uniform(&mut r, shape.h_len());
        let mut out = vec![f32::NAN; batch * shape.block_len()];
        let mut sq = vec![f32::NAN; batch];
        cpu::per_example_grads(&g, &h, shape, OutLayout::packed(&shape), &mut out, &mut sq)
            .unwrap();
        let (want, bound) = grads_f64(&g, &h, batch, tokens, d_out, rank);
        let err = max_rel(&out, &want, &bound);
        assert!(err < 1e-5, "{shape:?}: max relative error {err}");
        for i in 0..batch {
            let block = &want[i * shape.block_len()..(i + 1) * shape.block_len()];
            let sq_want: f64 = block.iter().map(|v| v * v).sum();
            let e = (f64::from(sq[i]) - sq_want).abs() / sq_want;
            assert!(e < 1e-5, "{shape:?} example {i}: norm error {e}");
        }
    }
}

#[test]
fn strided_layout_writes_only_its_blocks() {
    let mut r = rng("strided_layout_writes_only_its_blocks");
    let shape = GradShape {
        batch: 4,
        tokens: 9,
        d_out: 7,
        rank: 3,
    };
    let layout = OutLayout {
        row_stride: 50,
        offset: 11,
    };
    let g = uniform(&mut r, shape.g_len());
    let h = uniform(&mut r, shape.h_len());
    let mut out = vec![f32::NAN; layout.required_len(&shape) + 5];
    let mut sq = vec![0.0; 4];
    cpu::per_example_grads(&g, &h, shape, layout, &mut out, &mut sq).unwrap();
    let mut packed = vec![0.0; 4 * 21];
    let mut sq2 = vec![0.0; 4];
    cpu::per_example_grads(
        &g,
        &h,
        shape,
        OutLayout::packed(&shape),
        &mut packed,
        &mut sq2,
    )
    .unwrap();
    for (p, v) in out.iter().enumerate() {
        let (i, c) = (p / 50, p % 50);
        if i < 4 && (11..32).contains(&c) {
            assert_eq!(*v, packed[i * 21 + c - 11]);
        } else {
            assert!(v.is_nan(), "element {p} outside the blocks was written");
        }
    }
    assert_eq!(sq, sq2);
    let overlapping = OutLayout {
        row_stride: 20,
        offset: 0,
    };
    assert!(matches!(
        cpu::per_example_grads(&g, &h, shape, overlapping, &mut out, &mut sq),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn ndarray_views_in_any_layout() {
    let mut r = rng("ndarray_views_in_any_layout");
    let g = Array3::from_shape_vec((3, 10, 6), uniform(&mut r, 180)).unwrap();
    let h = Array3::from_shape_vec((3, 10, 4), uniform(&mut r, 120)).unwrap();
    let (out, sq) = cpu::per_example_grads_view(g.view(), h.view()).unwrap();
    assert_eq!(out.dim(), (3, 6, 4));
    for i in 0..3 {
        let gi = g.index_axis(Axis(0), i);
        let hi = h.index_axis(Axis(0), i);
        let want = gi.t().dot(&hi);
        for (a, b) in out.index_axis(Axis(0), i).iter().zip(want.iter()) {
            assert!((a - b).abs() < 1e-5);
        }
        let n2: f32 = want.iter().map(|v| v * v).sum();
        assert!(rel(sq[i], n2) < 1e-5);
    }
    // A permuted (non-contiguous) view gives the same result.
    let gt = g.clone().permuted_axes([1, 0, 2]);
    let g_back = gt.view().permuted_axes([1, 0, 2]);
    let (out2, _) = cpu::per_example_grads_view(g_back, h.view()).unwrap();
    assert_eq!(out, out2);
    let bad = Array3::<f32>::zeros((2, 10, 4));
    assert!(cpu::per_example_grads_view(g.view(), bad.view()).is_err());
}

#[test]
fn row_norms_match_f64() {
    let mut r = rng("row_norms_match_f64");
    let (rows, cols) = (5, 100_003);
    let x = uniform(&mut r, rows * cols);
    let mut out = vec![f32::NAN; rows];
    cpu::row_sq_norms(&x, rows, cols, &mut out).unwrap();
    for i in 0..rows {
        let want: f64 = x[i * cols..(i + 1) * cols]
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum();
        assert!((f64::from(out[i]) - want).abs() / want < 1e-6);
    }
}

#[test]
fn clipping_bounds_each_contribution() {
    let mut r = rng("clipping_bounds_each_contribution");
    let (rows, cols) = (6, 1000);
    let mut x = uniform(&mut r, rows * cols);
    // Row 0 is tiny (kept as is), row 1 is zero.
    x[..cols].iter_mut().for_each(|v| *v *= 1e-3);
    x[cols..2 * cols].fill(0.0);
    let mut sq = vec![0.0; rows];
    cpu::row_sq_norms(&x, rows, cols, &mut sq).unwrap();
    let clip = 2.0;
    let f = clip_factors(&sq, clip).unwrap();
    assert_eq!(f[0], 1.0);
    assert_eq!(f[1], 1.0);
    for i in 0..rows {
        let clipped = f64::from(sq[i]).sqrt() * f64::from(f[i]);
        assert!(
            clipped <= f64::from(clip) * (1.0 + 1e-6),
            "row {i} norm {clipped}"
        );
        if sq[i].sqrt() > clip {
            assert!((clipped - f64::from(clip)).abs() < 1e-5);
        }
    }
    let mut out = vec![f32::NAN; cols];
    cpu::clip_scale_sum(&x, rows, cols, &sq, clip, &mut out).unwrap();
    for p in 0..cols {
        let want: f64 = (0..rows)
            .map(|i| f64::from(f[i]) * f64::from(x[i * cols + p]))
            .sum();
        let scale: f64 = (0..rows)
            .map(|i| (f64::from(f[i]) * f64::from(x[i * cols + p])).abs())
            .sum();
        assert!((f64::from(out[p]) - want).abs() <= 1e-5 * scale.max(1e-30));
    }
}

#[test]
fn clip_and_noise_is_sum_plus_scaled_philox_noise() {
    let mut r = rng("clip_and_noise_is_sum_plus_scaled_philox_noise");
    let (rows, cols) = (4, 50_001);
    let x = uniform(&mut r, rows * cols);
    let mut sq = vec![0.0; rows];
    cpu::row_sq_norms(&x, rows, cols, &mut sq).unwrap();
    let noise = NoiseSpec {
        sigma: 1.3,
        clip: 5.0,
        scale: 0.25,
        seed: 99,
        offset: 7,
    };
    let mut sum = vec![0.0; cols];
    cpu::clip_scale_sum(&x, rows, cols, &sq, noise.clip, &mut sum).unwrap();
    let mut out = vec![0.0; cols];
    cpu::clip_and_noise(&x, rows, cols, &sq, &noise, &mut out).unwrap();
    let mut z = vec![0.0; cols];
    philox::fill_gaussian(noise.seed, noise.offset, &mut z);
    for p in 0..cols {
        assert_eq!(out[p], (sum[p] + noise.std() * z[p]) * noise.scale);
    }
    // The residual has standard deviation σC·scale.
    let resid: Vec<f64> = (0..cols)
        .map(|p| f64::from(out[p]) - f64::from(sum[p]) * 0.25)
        .collect();
    let mean = resid.iter().sum::<f64>() / cols as f64;
    let sd = (resid.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (cols as f64 - 1.0)).sqrt();
    let want = 1.3 * 5.0 * 0.25;
    assert!(
        (sd - want).abs() < 5.0 * want / (2.0 * cols as f64).sqrt(),
        "sd {sd}"
    );
    assert!(
        mean.abs() < 5.0 * want / (cols as f64).sqrt(),
        "mean {mean}"
    );
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut r = rng("results_do_not_depend_on_thread_count");
    let shape = GradShape {
        batch: 7,
        tokens: 33,
        d_out: 45,
        rank: 6,
    };
    let g = uniform(&mut r, shape.g_len());
    let h = uniform(&mut r, shape.h_len());
    let (rows, cols) = (7, 70_001);
    let x = uniform(&mut r, rows * cols);
    let noise = NoiseSpec {
        sigma: 0.8,
        clip: 3.0,
        scale: 1.0 / 7.0,
        seed: 5,
        offset: 3,
    };
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut out = vec![0.0; shape.batch * shape.block_len()];
            let mut sq = vec![0.0; shape.batch];
            cpu::per_example_grads(&g, &h, shape, OutLayout::packed(&shape), &mut out, &mut sq)
                .unwrap();
            let mut n = vec![0.0; rows];
            cpu::row_sq_norms(&x, rows, cols, &mut n).unwrap();
            let mut noisy = vec![0.0; cols];
            cpu::clip_and_noise(&x, rows, cols, &n, &noise, &mut noisy).unwrap();
            (out, sq, n, noisy)
        })
    };
    let one = run(1);
    let three = run(3);
    assert!(one == three, "outputs differ between 1 and 3 threads");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let x = vec![1.0f32; 12];
    let mut out = vec![0.0; 4];
    assert!(matches!(
        cpu::clip_scale_sum(&x, 3, 4, &[1.0, 1.0], 1.0, &mut out),
        Err(Error::Length { .. })
    ));
    assert!(matches!(
        cpu::clip_scale_sum(&x, 3, 4, &[1.0, f32::NAN, 1.0], 1.0, &mut out),
        Err(Error::NonFiniteNorm { example: 1, .. })
    ));
    assert!(matches!(
        cpu::clip_scale_sum(&x, 3, 4, &[1.0, -1.0, 1.0], 1.0, &mut out),
        Err(Error::NonFiniteNorm { example: 1, .. })
    ));
    for clip in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            cpu::clip_scale_sum(&x, 3, 4, &[1.0; 3], clip, &mut out),
            Err(Error::Parameter { name: "clip", .. })
        ));
    }
    let base = NoiseSpec {
        sigma: 1.0,
        clip: 1.0,
        scale: 1.0,
        seed: 0,
        offset: 0,
    };
    for bad in [
        NoiseSpec {
            sigma: -1.0,
            ..base
        },
        NoiseSpec {
            sigma: f32::NAN,
            ..base
        },
        NoiseSpec { scale: 0.0, ..base },
        NoiseSpec {
            sigma: 1e30,
            clip: 1e30,
            ..base
        },
    ] {
        assert!(matches!(
            cpu::add_noise(&mut out, &bad),
            Err(Error::Parameter { .. })
        ));
    }
    assert!(matches!(
        cpu::row_sq_norms(&x, 0, 4, &mut out),
        Err(Error::Shape { .. })
    ));
    let zero = GradShape {
        batch: 2,
        tokens: 0,
        d_out: 2,
        rank: 2,
    };
    assert!(matches!(
        cpu::per_example_grads(
            &[],
            &[],
            zero,
            OutLayout::packed(&zero),
            &mut out,
            &mut [0.0; 2]
        ),
        Err(Error::Shape { .. })
    ));
    let huge = GradShape {
        batch: usize::MAX / 2,
        tokens: 4,
        d_out: 2,
        rank: 2,
    };
    assert!(matches!(
        cpu::per_example_grads(
            &[],
            &[],
            huge,
            OutLayout::packed(&huge),
            &mut out,
            &mut [0.0; 2]
        ),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn backend_trait_round_trip_and_auto_never_panics() {
    let be = CpuBackend;
    let b = be.upload(&[1.0, 2.0, 3.0]).unwrap();
    assert_eq!(be.download(&b).unwrap(), vec![1.0, 2.0, 3.0]);
    assert_eq!(b.location(), "host");
    let mut wrong = vec![0.0; 2];
    assert!(matches!(
        be.download_into(&b, &mut wrong),
        Err(Error::Length { .. })
    ));
    // On a machine without CUDA this is the CPU; with CUDA it is the GPU.
    let auto = Backend::auto();
    assert!(!auto.name().is_empty());
    let probe = fedsvd_kernels::probe();
    match (&auto, &probe) {
        (Backend::Cpu(_), fedsvd_kernels::DeviceProbe::Devices(_)) => {
            panic!("a device was found ({probe:?}) but auto chose the CPU")
        }
        (Backend::Cuda(_), p) if !matches!(p, fedsvd_kernels::DeviceProbe::Devices(_)) => {
            panic!("auto chose CUDA without a device")
        }
        _ => {}
    }
    let _: &Buffer = &b;
}
