//! Summary statistics of a data set.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::dataset::{Dataset, Example};

fn segments(e: &Example) -> impl Iterator<Item = &str> {
    std::iter::once(e.text.as_str()).chain(e.text_pair.as_deref())
}

/// Percentiles of a length distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Mean.
    pub mean: f64,
    /// Median (nearest rank).
    pub p50: usize,
    /// 90th percentile (nearest rank).
    pub p90: usize,
    /// 95th percentile (nearest rank).
    pub p95: usize,
    /// 99th percentile (nearest rank).
    pub p99: usize,
    /// Maximum.
    pub max: usize,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values`; `None` when it is empty.
    pub fn of(values: &[usize]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_unstable();
        let rank = |p: f64| v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Percentiles {
            mean: v.iter().sum::<usize>() as f64 / v.len() as f64,
            p50: rank(50.0),
            p90: rank(90.0),
            p95: rank(95.0),
            p99: rank(99.0),
            max: v[v.len() - 1],
        })
    }
}

/// Examples of one label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabelCount {
    /// The label's name.
    pub label: String,
    /// Its number of examples.
    pub count: usize,
}

/// Token lengths under a model's tokenizer (computed by the caller, so this
/// crate stays model-agnostic).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenStats {
    /// The tokenizer's truncation length: lengths are capped there.
    pub truncated_at: usize,
    /// Percentiles of the (capped) token count, special tokens included.
    pub lengths: Percentiles,
    /// Fraction of examples longer than 64 tokens.
    pub over_64: f64,
    /// Fraction of examples longer than 128 tokens (the paper's maximum
    /// length).
    pub over_128: f64,
}

impl TokenStats {
    /// Summarizes token `lengths` produced with truncation at
    /// `truncated_at`; `None` when there are none.
    pub fn of(lengths: &[usize], truncated_at: usize) -> Option<Self> {
        let n = lengths.len() as f64;
        let over = |k: usize| lengths.iter().filter(|&&l| l > k).count() as f64 / n;
        Some(TokenStats {
            truncated_at,
            lengths: Percentiles::of(lengths)?,
            over_64: over(64),
            over_128: over(128),
        })
    }
}

/// Size, label counts and length distribution of a data set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetStats {
    /// The data set's name.
    pub name: String,
    /// Number of examples.
    pub size: usize,
    /// Examples with a second text segment.
    pub with_pair: usize,
    /// Examples per label, in label order.
    pub label_counts: Vec<LabelCount>,
    /// Whitespace-separated words per example (both segments).
    pub words: Option<Percentiles>,
    /// Characters per example (both segments).
    pub chars: Option<Percentiles>,
    /// Token lengths, when the caller has a tokenizer
    /// ([`DatasetStats::with_tokens`]).
    pub tokens: Option<TokenStats>,
    /// Rows dropped by the data set's definition, by reason.
    pub dropped: BTreeMap<String, usize>,
    /// Malformed records skipped.
    pub skipped: usize,
    /// Files decoded as Latin-1.
    pub decoded_as_latin1: usize,
}

impl DatasetStats {
    /// Computes the statistics of `data`.
    pub fn of(data: &Dataset) -> Self {
        let words: Vec<usize> = data
            .examples
            .iter()
            .map(|e| segments(e).map(|s| s.split_whitespace().count()).sum())
            .collect();
        let chars: Vec<usize> = data
            .examples
            .iter()
            .map(|e| segments(e).map(|s| s.chars().count()).sum())
            .collect();
        DatasetStats {
            name: data.name.clone(),
            size: data.len(),
            with_pair: data
                .examples
                .iter()
                .filter(|e| e.text_pair.is_some())
                .count(),
            label_counts: data
                .label_names
                .iter()
                .cloned()
                .zip(data.label_counts())
                .map(|(label, count)| LabelCount { label, count })
                .collect(),
            words: Percentiles::of(&words),
            chars: Percentiles::of(&chars),
            tokens: None,
            dropped: data.report.dropped.clone(),
            skipped: data.report.skipped.len(),
            decoded_as_latin1: data.report.decoded_as_latin1.len(),
        }
    }

    /// Adds token-length statistics.
    pub fn with_tokens(mut self, tokens: Option<TokenStats>) -> Self {
        self.tokens = tokens;
        self
    }
}

impl std::fmt::Display for DatasetStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "data set: {}", self.name)?;
        writeln!(f, "examples: {}", self.size)?;
        if self.with_pair > 0 {
            writeln!(f, "with a text pair: {}", self.with_pair)?;
        }
        writeln!(f, "labels:")?;
        for LabelCount { label: name, count } in &self.label_counts {
            let share = if self.size == 0 {
                0.0
            } else {
                *count as f64 / self.size as f64 * 100.0
            };
            writeln!(f, "  {name:<16} {count:>7}  ({share:.1}%)")?;
        }
        for (what, p) in [("words", self.words), ("characters", self.chars)] {
            if let Some(p) = p {
                writeln!(
                    f,
                    "{what}: mean {:.1}, p50 {}, p90 {}, p95 {}, p99 {}, max {}",
                    p.mean, p.p50, p.p90, p.p95, p.p99, p.max
                )?;
            }
        }
        if let Some(t) = &self.tokens {
            let p = &t.lengths;
            writeln!(
                f,
                "tokens (capped at {}): mean {:.1}, p50 {}, p90 {}, p95 {}, p99 {}, max {}; over 64: {:.1}%, over 128: {:.1}%",
                t.truncated_at,
                p.mean,
                p.p50,
                p.p90,
                p.p95,
                p.p99,
                p.max,
                t.over_64 * 100.0,
                t.over_128 * 100.0
            )?;
        }
        for (reason, n) in &self.dropped {
            writeln!(f, "dropped {n}: {reason}")?;
        }
        if self.skipped > 0 {
            writeln!(f, "skipped malformed: {}", self.skipped)?;
        }
        if self.decoded_as_latin1 > 0 {
            writeln!(f, "files decoded as Latin-1: {}", self.decoded_as_latin1)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<usize> = (1..=100).collect();
        let p = Percentiles::of(&v).unwrap();
        assert_eq!((p.p50, p.p90, p.p95, p.p99, p.max), (50, 90, 95, 99, 100));
        assert_eq!(p.mean, 50.5);
        assert!(Percentiles::of(&[]).is_none());
        assert_eq!(Percentiles::of(&[7]).unwrap().p50, 7);
        let t = TokenStats::of(&[10, 70, 130, 512], 512).unwrap();
        assert_eq!((t.over_64, t.over_128), (0.75, 0.5));
        assert!(TokenStats::of(&[], 512).is_none());
    }
}
