//! Deterministic, label-stratified train/test splits.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::{Error, Result};

/// Random stream of the train/test split; partitions use other streams, so
/// the same seed gives independent draws.
pub(crate) const SPLIT_STREAM: u64 = 1;

/// Indices of the training and the held-out test examples, each ascending.
/// The test indices are disjoint from the training ones, and partitions are
/// made of training indices only, so no client sees a test example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Split {
    /// Training indices.
    pub train: Vec<usize>,
    /// Held-out test indices.
    pub test: Vec<usize>,
}

/// Splits examples with `labels` into train and test, holding out
/// `test_fraction` of them (rounded), stratified by label and deterministic
/// for `seed`.
pub fn train_test_split(labels: &[usize], test_fraction: f64, seed: u64) -> Result<Split> {
    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        return Err(Error::invalid(
            "test fraction",
            format!("{test_fraction} is not strictly between 0 and 1"),
        ));
    }
    let n = labels.len();
    let test = ((n as f64) * test_fraction).round() as usize;
    train_test_split_sizes(labels, n.saturating_sub(test), test, seed)
}

/// Draws `train_size` training and `test_size` test examples (disjoint),
/// stratified by label: each label gets its share of both by largest
/// remainder. Deterministic for `seed`. Useful for the paper's small-scale
/// runs (e.g. 3,000 train / 1,000 test).
pub fn train_test_split_sizes(
    labels: &[usize],
    train_size: usize,
    test_size: usize,
    seed: u64,
) -> Result<Split> {
    let n = labels.len();
    if train_size == 0 || test_size == 0 {
        return Err(Error::invalid(
            "split sizes",
            format!("train {train_size} and test {test_size} must both be at least 1"),
        ));
    }
    if train_size + test_size > n {
        return Err(Error::invalid(
            "split sizes",
            format!("train {train_size} + test {test_size} exceeds the {n} examples"),
        ));
    }
    let mut by_label: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &label) in labels.iter().enumerate() {
        by_label.entry(label).or_default().push(i);
    }
    let class_sizes: Vec<usize> = by_label.values().map(Vec::len).collect();
    let test_counts = apportion(&class_sizes, test_size);
    let remaining: Vec<usize> = class_sizes
        .iter()
        .zip(&test_counts)
        .map(|(s, t)| s - t)
        .collect();
    let train_counts = apportion(&remaining, train_size);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(SPLIT_STREAM);
    let mut split = Split {
        train: Vec::with_capacity(train_size),
        test: Vec::with_capacity(test_size),
    };
    for ((members, &t), &r) in by_label.values().zip(&test_counts).zip(&train_counts) {
        let mut members = members.clone();
        members.shuffle(&mut rng);
        split.test.extend_from_slice(&members[..t]);
        split.train.extend_from_slice(&members[t..t + r]);
    }
    split.train.sort_unstable();
    split.test.sort_unstable();
    Ok(split)
}

/// Splits `total` among buckets in proportion to `sizes` by largest
/// remainder, never giving a bucket more than its size (ties go to the lower
/// index). Requires `total <= sum(sizes)`.
pub(crate) fn apportion(sizes: &[usize], total: usize) -> Vec<usize> {
    let weights: Vec<f64> = sizes.iter().map(|&s| s as f64).collect();
    apportion_weights(&weights, total, Some(sizes))
}

/// Largest-remainder rounding of `total · w_k / Σw`, with optional caps.
pub(crate) fn apportion_weights(
    weights: &[f64],
    total: usize,
    caps: Option<&[usize]>,
) -> Vec<usize> {
    let sum: f64 = weights.iter().sum();
    if weights.is_empty() || sum <= 0.0 {
        return vec![0; weights.len()];
    }
    let exact: Vec<f64> = weights.iter().map(|w| w / sum * total as f64).collect();
    let cap = |k: usize| caps.map_or(usize::MAX, |c| c[k]);
    let mut counts: Vec<usize> = exact
        .iter()
        .enumerate()
        .map(|(k, e)| (e.floor() as usize).min(cap(k)))
        .collect();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    let mut assigned: usize = counts.iter().sum();
    // Hand out the remainder one at a time; with caps a second pass may be
    // needed when a bucket with a large remainder is full.
    while assigned < total {
        let before = assigned;
        for &k in &order {
            if assigned == total {
                break;
            }
            if counts[k] < cap(k) {
                counts[k] += 1;
                assigned += 1;
            }
        }
        if assigned == before {
            break;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n0: usize, n1: usize) -> Vec<usize> {
        let mut l = vec![0; n0];
        l.extend(vec![1; n1]);
        l
    }

    #[test]
    fn split_is_disjoint_complete_stratified_and_seeded() {
        let l = labels(700, 300);
        let s = train_test_split(&l, 0.2, 7).unwrap();
        assert_eq!(s.test.len(), 200);
        assert_eq!(s.train.len(), 800);
        let mut all: Vec<usize> = s.train.iter().chain(&s.test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert_eq!(s.test.iter().filter(|&&i| l[i] == 1).count(), 60);
        assert_eq!(s, train_test_split(&l, 0.2, 7).unwrap());
        assert_ne!(s, train_test_split(&l, 0.2, 8).unwrap());
    }

    #[test]
    fn sized_split_takes_exact_sizes() {
        let l = labels(572, 428);
        let s = train_test_split_sizes(&l, 300, 100, 1).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (300, 100));
        assert!(s.train.iter().all(|i| !s.test.contains(i)));
        assert_eq!(s.test.iter().filter(|&&i| l[i] == 0).count(), 57);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let l = labels(5, 5);
        assert!(train_test_split(&l, 0.0, 1).is_err());
        assert!(train_test_split(&l, 1.0, 1).is_err());
        assert!(train_test_split(&l, f64::NAN, 1).is_err());
        assert!(train_test_split_sizes(&l, 8, 3, 1).is_err());
        assert!(train_test_split(&[], 0.5, 1).is_err());
    }

    #[test]
    fn apportion_respects_caps_and_total() {
        assert_eq!(apportion(&[1, 1, 1], 2), vec![1, 1, 0]);
        assert_eq!(apportion_weights(&[0.9, 0.1], 5, Some(&[3, 5])), vec![3, 2]);
        assert_eq!(apportion(&[10, 0], 4), vec![4, 0]);
    }
}
