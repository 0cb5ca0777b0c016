//! CPU backend speed: per-example gradients (throughput in FLOPs, shown as
//! elements/s), norms, clip-and-sum and Philox noise (throughput in bytes
//! read and written).

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fedsvd_kernels::{GradShape, NoiseSpec, OutLayout, cpu, philox};

fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut v = vec![0.0; len];
    philox::fill_gaussian(seed, 0, &mut v);
    v
}

fn grads(c: &mut Criterion) {
    let mut group = c.benchmark_group("per_example_grads");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    for (batch, tokens, d_out, rank) in [(32, 128, 384, 8), (32, 128, 384, 16), (32, 128, 1536, 8)]
    {
        let shape = GradShape {
            batch,
            tokens,
            d_out,
            rank,
        };
        let g = data(shape.g_len(), 1);
        let h = data(shape.h_len(), 2);
        let mut out = vec![0.0; batch * shape.block_len()];
        let mut sq = vec![0.0; batch];
        group.throughput(Throughput::Elements(shape.flops() as u64));
        group.bench_function(format!("B{batch}_T{tokens}_d{d_out}_r{rank}"), |b| {
            b.iter(|| {
                cpu::per_example_grads(&g, &h, shape, OutLayout::packed(&shape), &mut out, &mut sq)
                    .unwrap()
            })
        });
    }
    group.finish();
}

fn clip_noise(c: &mut Criterion) {
    let (rows, cols) = (32usize, 1usize << 18);
    let x = data(rows * cols, 3);
    let mut sq = vec![0.0; rows];
    cpu::row_sq_norms(&x, rows, cols, &mut sq).unwrap();
    let mut out = vec![0.0; cols];
    let noise = NoiseSpec {
        sigma: 1.0,
        clip: 1.0,
        scale: 1.0 / rows as f32,
        seed: 42,
        offset: 0,
    };
    let mut group = c.benchmark_group("clip_noise");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    let matrix_bytes = (4 * rows * cols) as u64;
    group.throughput(Throughput::Bytes(matrix_bytes));
    group.bench_function("row_sq_norms_32x262144", |b| {
        b.iter(|| cpu::row_sq_norms(&x, rows, cols, &mut sq).unwrap())
    });
    group.throughput(Throughput::Bytes(matrix_bytes + 4 * cols as u64));
    group.bench_function("clip_scale_sum_32x262144", |b| {
        b.iter(|| cpu::clip_scale_sum(&x, rows, cols, &sq, 1.0, &mut out).unwrap())
    });
    group.bench_function("clip_and_noise_32x262144", |b| {
        b.iter(|| cpu::clip_and_noise(&x, rows, cols, &sq, &noise, &mut out).unwrap())
    });
    group.throughput(Throughput::Bytes(8 * cols as u64));
    group.bench_function("add_noise_262144", |b| {
        b.iter(|| cpu::add_noise(&mut out, &noise).unwrap())
    });
    let mut copy = vec![0.0f32; rows * cols];
    group.throughput(Throughput::Bytes(2 * matrix_bytes));
    group.bench_function("memcpy_reference_32x262144", |b| {
        b.iter(|| copy.copy_from_slice(std::hint::black_box(&x)))
    });
    group.finish();
}

criterion_group!(benches, grads, clip_noise);
criterion_main!(benches);
