//! Per-example gradients of a tiny random BERT against central finite
//! differences, the sum identity, clipping, and thread-count invariance.

mod common;

use fedsvd_model::{Batch, HeadConfig, LoraConfig, LoraState, Model, Pooling, Target};

fn batch() -> Batch {
    // Three sequences of different lengths, one a two-segment pair.
    Batch::from_sequences(
        &[
            vec![1, 7, 12, 33, 4, 2],
            vec![1, 40, 2],
            vec![1, 9, 18, 27, 2, 11, 22, 2, 5],
        ],
        &[vec![0; 6], vec![0; 3], vec![0, 0, 0, 0, 0, 1, 1, 1, 1]],
        0,
    )
    .unwrap()
}

fn model(pooling: Pooling) -> (Model, LoraState) {
    let lora = LoraConfig {
        rank: 3,
        alpha: 6.0,
        dropout: 0.1,
        targets: Target::ALL.to_vec(),
        train_a: true,
        train_b: true,
        train_head: true,
    };
    let head = HeadConfig {
        num_labels: 3,
        pooling,
    };
    let model = Model::new(common::tiny_weights(), lora, head).unwrap();
    let mut state = model.init_state(11).unwrap();
    // Non-zero B so that the A gradients are not all zero; larger head so
    // that gradients are well above f32 round-off.
    for (k, ad) in state.adapters.iter_mut().enumerate() {
        ad.b = common::values(ad.b.len(), 100 + k as u64, 0.3);
    }
    state.head_weight = common::values(state.head_weight.len(), 99, 0.5);
    state.head_bias = common::values(state.head_bias.len(), 98, 0.2);
    (model, state)
}

/// Loss of every example (f64 from the f32 logits) in evaluation mode.
fn losses(model: &Model, state: &LoraState, batch: &Batch, labels: &[usize]) -> Vec<f64> {
    let logits = model.logits(state, batch).unwrap();
    let k = model.head_config().num_labels;
    logits
        .chunks_exact(k)
        .zip(labels)
        .map(|(z, &y)| {
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            lse - z[y] as f64
        })
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// For every example and every trainable tensor, the directional derivative
/// of the example's loss along (a) its own gradient and (b) a random
/// direction must match central differences.
fn check_against_finite_differences(pooling: Pooling) {
    let (model, state) = model(pooling);
    let batch = batch();
    let labels = [2usize, 0, 1];
    let grads = model.gradients(&state, &batch, &labels, None).unwrap();
    let per = grads.per_example();
    let layout = model.layout(&state);
    let p = layout.len;
    let theta = layout.flatten(&state).unwrap();
    let eps = 1e-2f32;
    let mut worst = 0.0f64;
    let mut checked = 0;
    for slot in &layout.slots {
        let random = common::values(slot.len(), slot.offset as u64 + 5, 1.0);
        for i in 0..batch.len() {
            let g = &per[i * p + slot.offset..i * p + slot.offset + slot.len()];
            for dir in [g.to_vec(), random.clone()] {
                let norm = dot(&dir, &dir).sqrt();
                if norm == 0.0 {
                    continue;
                }
                let d: Vec<f32> = dir.iter().map(|v| (*v as f64 / norm) as f32).collect();
                let analytic = dot(g, &d);
                let shifted = |step: f32| {
                    let mut t = theta.clone();
                    for (k, v) in d.iter().enumerate() {
                        t[slot.offset + k] += step * v;
                    }
                    let mut s = state.clone();
                    layout.unflatten(&mut s, &t).unwrap();
                    losses(&model, &s, &batch, &labels)[i]
                };
                let central = |e: f32| (shifted(e) - shifted(-e)) / (2.0 * e as f64);
                // Richardson extrapolation cancels the O(eps²) term.
                let numeric = (4.0 * central(eps) - central(2.0 * eps)) / 3.0;
                let gnorm = dot(g, g).sqrt();
                // Relative to the gradient norm (the largest possible
                // directional derivative), with a floor for tiny tensors.
                let err = (numeric - analytic).abs() / gnorm.max(1e-3);
                assert!(
                    err < 1e-3,
                    "{} example {i}: analytic {analytic:.6e} numeric {numeric:.6e} (|g| {gnorm:.3e}, rel err {err:.2e})",
                    slot.name
                );
                worst = worst.max(err);
                checked += 1;
            }
        }
    }
    assert!(
        checked > 4 * layout.slots.len(),
        "only {checked} checks ran"
    );
    eprintln!("{pooling:?}: {checked} directional checks, worst relative error {worst:.2e}");
}

#[test]
fn per_example_gradients_match_finite_differences_mean_pooling() {
    check_against_finite_differences(Pooling::Mean);
}

#[test]
fn per_example_gradients_match_finite_differences_cls_pooler() {
    check_against_finite_differences(Pooling::ClsPooler);
}

#[test]
fn every_trainable_tensor_gets_a_nonzero_gradient() {
    let (model, state) = model(Pooling::ClsPooler);
    let grads = model.gradients(&state, &batch(), &[2, 0, 1], None).unwrap();
    let sum = grads.sum();
    for slot in &model.layout(&state).slots {
        let g = &sum[slot.offset..slot.offset + slot.len()];
        assert!(
            g.iter().any(|v| *v != 0.0),
            "{} has zero gradient",
            slot.name
        );
    }
}

#[test]
fn sum_of_per_example_gradients_is_the_batch_gradient() {
    let (model, state) = model(Pooling::Mean);
    let batch = batch();
    let grads = model
        .gradients(&state, &batch, &[2, 0, 1], Some(3))
        .unwrap();
    let per = grads.per_example();
    let p = grads.layout().len;
    let sum = grads.sum();
    let scale = sum.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for j in 0..p {
        let s: f32 = (0..batch.len()).map(|i| per[i * p + j]).sum();
        assert!(
            (s - sum[j]).abs() <= 1e-5 * scale,
            "coordinate {j}: {s} vs {}",
            sum[j]
        );
    }
    // The batch gradient is also the gradient of the summed loss: compare
    // with the gradients of each example computed alone.
    for i in 0..batch.len() {
        let alone = batch.slice(i..i + 1).unwrap();
        let labels = [[2usize, 0, 1][i]];
        let g = model
            .gradients(&state, &alone, &labels, None)
            .unwrap()
            .sum();
        let batched = model
            .gradients(&state, &batch, &[2, 0, 1], None)
            .unwrap()
            .per_example();
        for j in 0..p {
            assert!((g[j] - batched[i * p + j]).abs() <= 1e-5 * scale.max(1e-3));
        }
    }
}

#[test]
fn clipping_caps_every_example_norm() {
    let (model, state) = model(Pooling::Mean);
    let batch = batch();
    let labels = [2usize, 0, 1];
    let grads = model.gradients(&state, &batch, &labels, Some(8)).unwrap();
    let per = grads.per_example();
    let p = grads.layout().len;
    let norms: Vec<f64> = (0..3)
        .map(|i| dot(&per[i * p..(i + 1) * p], &per[i * p..(i + 1) * p]).sqrt())
        .collect();
    let clip = (norms[0].min(norms[1]).min(norms[2]) * 0.5) as f32;
    let (clipped, reported) = grads.clipped_sum(clip).unwrap();
    for i in 0..3 {
        assert!((reported[i] as f64 - norms[i]).abs() <= 1e-5 * norms[i]);
    }
    // Every example is clipped, so the sum is Σ C g_i/‖g_i‖ and each term has norm C.
    let mut want = vec![0.0f64; p];
    for i in 0..3 {
        let c = (clip as f64 / (norms[i] + 1e-6)).min(1.0);
        let term: Vec<f64> = per[i * p..(i + 1) * p]
            .iter()
            .map(|v| *v as f64 * c)
            .collect();
        let tn = term.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!(
            tn <= clip as f64 * (1.0 + 1e-6),
            "clipped norm {tn} > {clip}"
        );
        want.iter_mut().zip(&term).for_each(|(w, t)| *w += t);
    }
    for j in 0..p {
        assert!(
            (clipped[j] as f64 - want[j]).abs() <= 1e-5 * clip as f64,
            "coordinate {j}"
        );
    }
    // A single example's clipped sum has norm at most C.
    let one = model
        .gradients(&state, &batch.slice(2..3).unwrap(), &[1], None)
        .unwrap();
    let (s, n) = one.clipped_sum(clip).unwrap();
    assert!(n[0] > clip);
    let sn = dot(&s, &s).sqrt();
    assert!(
        sn <= clip as f64 * (1.0 + 1e-5) && sn >= clip as f64 * 0.999,
        "{sn} vs {clip}"
    );
    // A large C leaves the gradients unchanged.
    let (s, _) = grads.clipped_sum(1e6).unwrap();
    assert_eq!(s, grads.sum());
    assert!(grads.clipped_sum(0.0).is_err());
    assert!(grads.clipped_sum(f32::NAN).is_err());
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let (model, state) = model(Pooling::ClsPooler);
    let batch = batch();
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                let g = model
                    .gradients(&state, &batch, &[2, 0, 1], Some(42))
                    .unwrap();
                (
                    g.per_example(),
                    g.clipped_sum(0.5).unwrap(),
                    g.logits().to_vec(),
                )
            })
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}

#[test]
fn dropout_is_training_only_and_seeded() {
    let (model, state) = model(Pooling::Mean);
    let batch = batch();
    let labels = [2usize, 0, 1];
    let a = model.gradients(&state, &batch, &labels, Some(1)).unwrap();
    let b = model.gradients(&state, &batch, &labels, Some(1)).unwrap();
    let c = model.gradients(&state, &batch, &labels, Some(2)).unwrap();
    let none = model.gradients(&state, &batch, &labels, None).unwrap();
    assert_eq!(a.per_example(), b.per_example());
    assert_ne!(a.per_example(), c.per_example());
    assert_ne!(a.logits(), none.logits());
    // Evaluation logits equal the dropout-free training logits.
    assert_eq!(model.logits(&state, &batch).unwrap(), none.logits());
}

#[test]
fn padding_does_not_change_an_example() {
    let (model, state) = model(Pooling::ClsPooler);
    let batch = batch();
    let all = model.logits(&state, &batch).unwrap();
    for i in 0..batch.len() {
        let alone = model
            .logits(&state, &batch.slice(i..i + 1).unwrap())
            .unwrap();
        for j in 0..3 {
            assert!((alone[j] - all[i * 3 + j]).abs() < 1e-5, "example {i}");
        }
    }
}

#[test]
fn zero_b_leaves_the_base_model_unchanged() {
    let (model, mut state) = model(Pooling::Mean);
    for ad in &mut state.adapters {
        ad.b.iter_mut().for_each(|v| *v = 0.0);
    }
    let batch = batch();
    assert_eq!(
        model.hidden_states(Some(&state), &batch).unwrap(),
        model.hidden_states(None, &batch).unwrap()
    );
}

#[test]
fn frozen_factors_and_head_are_left_out() {
    let weights = common::tiny_weights();
    let lora = LoraConfig {
        train_a: false,
        ..LoraConfig::default()
    };
    let model = Model::new(weights, lora, HeadConfig::default()).unwrap();
    let state = model.init_state(0).unwrap();
    let layout = model.layout(&state);
    // 2 layers x {query, value} x B [32, 8].
    assert_eq!(layout.len, 2 * 2 * 32 * 8);
    assert!(layout.slots.iter().all(|s| s.name.ends_with("lora_B")));
    let mut s2 = state.clone();
    let flat: Vec<f32> = (0..layout.len).map(|i| i as f32 * 1e-3).collect();
    layout.unflatten(&mut s2, &flat).unwrap();
    assert_eq!(layout.flatten(&s2).unwrap(), flat);
    assert_eq!(
        s2.adapter(1, Target::Value).unwrap().b[..],
        flat[3 * 256..4 * 256]
    );
    assert!(layout.unflatten(&mut s2, &flat[1..]).is_err());
    layout.apply_update(&mut s2, &flat, 1.0).unwrap();
    assert!(layout.flatten(&s2).unwrap().iter().all(|v| *v == 0.0));
}

#[test]
fn bad_inputs_are_typed_errors() {
    let (model, state) = model(Pooling::Mean);
    let bad_id = Batch::from_sequences(&[vec![1, 50, 2]], &[vec![0; 3]], 0).unwrap();
    assert!(matches!(
        model.logits(&state, &bad_id),
        Err(fedsvd_model::Error::InvalidBatch(_))
    ));
    let bad_type = Batch::from_sequences(&[vec![1, 5, 2]], &[vec![0, 2, 0]], 0).unwrap();
    assert!(model.logits(&state, &bad_type).is_err());
    let too_long = Batch::from_sequences(&[vec![1; 33]], &[vec![0; 33]], 0).unwrap();
    assert!(model.logits(&state, &too_long).is_err());
    assert!(model.gradients(&state, &batch(), &[0, 1], None).is_err());
    assert!(model.gradients(&state, &batch(), &[0, 1, 3], None).is_err());
    let mut wrong = state.clone();
    wrong.adapters.pop();
    assert!(model.logits(&wrong, &batch()).is_err());
    let mut nan = state.clone();
    nan.adapters[0].b[0] = f32::NAN;
    assert!(model.logits(&nan, &batch()).is_err());
    assert!(Batch::from_padded(vec![1, 2, 3, 4], vec![0; 4], vec![0, 1, 1, 1], 2).is_err());
    assert!(Batch::from_padded(vec![1, 2, 3, 4], vec![0; 4], vec![0, 0, 1, 1], 2).is_err());
    assert!(Batch::from_padded(vec![1, 2, 3], vec![0; 3], vec![1, 1, 1], 2).is_err());
    let ok = Batch::from_padded(vec![1, 0, 3, 4], vec![0; 4], vec![1, 0, 1, 1], 2).unwrap();
    assert_eq!(ok.lengths, vec![1, 2]);
}

/// `lengths.len()` sequences of the given lengths, with ids from a fixed LCG
/// (`[CLS]`-like 1 first), enough tokens to be split into several chunks.
fn long_batch(lengths: &[usize], salt: u64) -> Batch {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ salt;
    let ids: Vec<Vec<u32>> = lengths
        .iter()
        .map(|&l| {
            let mut v = vec![1u32];
            v.extend((1..l).map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                3 + ((s >> 33) % 47) as u32
            }));
            v
        })
        .collect();
    let types: Vec<Vec<u32>> = lengths.iter().map(|&l| vec![0; l]).collect();
    Batch::from_sequences(&ids, &types, 0).unwrap()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
    for (j, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 * scale,
            "{what}: entry {j}: {x} vs {y}"
        );
    }
}

#[test]
fn a_batch_split_into_chunks_gives_every_example_its_own_gradient() {
    // 24 x 30 = 720 tokens: more than one chunk.
    let (model, state) = model(Pooling::Mean);
    let batch = long_batch(&[30; 24], 0);
    let labels: Vec<usize> = (0..24).map(|i| i % 3).collect();
    let grads = model.gradients(&state, &batch, &labels, None).unwrap();
    let all = grads.per_example();
    let p = grads.layout().len;
    assert_eq!(all.len(), 24 * p);
    for i in 0..24 {
        let alone = model
            .gradients(
                &state,
                &batch.slice(i..i + 1).unwrap(),
                &labels[i..=i],
                None,
            )
            .unwrap();
        assert_close(&all[i * p..(i + 1) * p], &alone.per_example(), "gradient");
        assert_close(
            &grads.logits()[i * 3..(i + 1) * 3],
            alone.logits(),
            "logits",
        );
    }
    assert_eq!(model.logits(&state, &batch).unwrap(), grads.logits());
}

#[test]
fn dropout_masks_follow_the_example_not_the_chunk() {
    // Shortening the first six examples moves the chunk boundaries, so
    // example 20 sits at a different place in its chunk; its mask, and so
    // its gradient, must not change.
    let (model, state) = model(Pooling::ClsPooler);
    let long = long_batch(&[30; 24], 5);
    let mut lengths = vec![30; 24];
    lengths[..6].iter_mut().for_each(|l| *l = 6);
    let mut short = long_batch(&lengths, 5);
    // Same tokens for every example from 6 on.
    for i in 6..24 {
        let (a, b) = (i * short.seq_len, i * long.seq_len);
        short.input_ids[a..a + 30].copy_from_slice(&long.input_ids[b..b + 30]);
    }
    let labels: Vec<usize> = (0..24).map(|i| i % 3).collect();
    let g_long = model.gradients(&state, &long, &labels, Some(9)).unwrap();
    let g_short = model.gradients(&state, &short, &labels, Some(9)).unwrap();
    let p = g_long.layout().len;
    let (a, b) = (g_long.per_example(), g_short.per_example());
    for i in [6, 17, 20, 23] {
        assert_close(&a[i * p..(i + 1) * p], &b[i * p..(i + 1) * p], "example");
    }
    // And the masks do differ between examples and seeds.
    let other = model.gradients(&state, &long, &labels, Some(10)).unwrap();
    assert_ne!(other.per_example()[20 * p..21 * p], a[20 * p..21 * p]);
}

#[test]
fn chunked_results_do_not_depend_on_the_thread_count() {
    let (model, state) = model(Pooling::Mean);
    let batch = long_batch(&[28; 40], 3);
    let labels: Vec<usize> = (0..40).map(|i| (i * 7) % 3).collect();
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                let g = model.gradients(&state, &batch, &labels, Some(4)).unwrap();
                (g.clipped_sum(0.5).unwrap(), g.logits().to_vec())
            })
    };
    let one = run(1);
    for threads in [2, 3, 5] {
        assert_eq!(one, run(threads), "{threads} threads");
    }
}
