//! Criterion benchmarks of the refactorization paths on LoRA-shaped factors.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use fedsvd_linalg::{
    RsvdParams, refactorize, refactorize_dense, refactorize_many, refactorize_many_in_place,
    refactorize_randomized,
};
use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

fn gaussian(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f64) -> Array2<f64> {
    Array2::from_shape_simple_fn((rows, cols), || {
        scale * rng.sample::<f64, _>(StandardNormal)
    })
}

fn modules(count: usize, d: usize, r: usize) -> Vec<(Array2<f64>, Array2<f64>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    (0..count)
        .map(|_| {
            let b = gaussian(&mut rng, d, r, 0.01);
            let a = gaussian(&mut rng, r, d, 1.0 / (d as f64).sqrt());
            (b, a)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    for (d, r) in [(384usize, 8usize), (1024, 8), (1024, 64)] {
        let mods = modules(1, d, r);
        let (b, a) = &mods[0];
        c.bench_function(&format!("refactorize {d}x{d} r={r}"), |bench| {
            bench.iter(|| refactorize(black_box(b.view()), black_box(a.view())).unwrap())
        });
        let params = RsvdParams {
            rank: r,
            oversampling: 8,
            power_iterations: 1,
            seed: 1,
        };
        c.bench_function(&format!("refactorize_randomized {d}x{d} r={r}"), |bench| {
            bench.iter(|| {
                refactorize_randomized(black_box(b.view()), black_box(a.view()), &params).unwrap()
            })
        });
    }
    let mods = modules(48, 1024, 8);
    let views: Vec<_> = mods.iter().map(|(b, a)| (b.view(), a.view())).collect();
    c.bench_function("refactorize_many 48 x 1024x1024 r=8", |bench| {
        bench.iter(|| refactorize_many(black_box(&views)).unwrap())
    });
    // What the server runs: in place, on fresh copies (made outside the
    // timed region; a refactorized pair would make the next Jacobi sweep
    // trivially short).
    c.bench_function("refactorize_many_in_place 48 x 1024x1024 r=8", |bench| {
        bench.iter_batched_ref(
            || mods.clone(),
            |fresh| {
                let mut views: Vec<_> = fresh
                    .iter_mut()
                    .map(|(b, a)| (b.view_mut(), a.view_mut()))
                    .collect();
                refactorize_many_in_place(black_box(&mut views)).unwrap()
            },
            BatchSize::LargeInput,
        )
    });

    let mut group = c.benchmark_group("dense");
    group.sample_size(10);
    let mods = modules(1, 384, 8);
    let (b, a) = &mods[0];
    group.bench_function("refactorize_dense 384x384 r=8", |bench| {
        bench.iter(|| refactorize_dense(black_box(b.view()), black_box(a.view())).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
