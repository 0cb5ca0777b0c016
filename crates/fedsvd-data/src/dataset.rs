//! Examples, data sets and what a loader reports about the rows it read.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

/// One classification example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Example {
    /// The (first) text segment.
    pub text: String,
    /// The second segment of a sentence-pair task.
    pub text_pair: Option<String>,
    /// Index into [`Dataset::label_names`].
    pub label: usize,
}

/// A record a loader skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The file it came from.
    pub path: PathBuf,
    /// The 1-based line where it starts, for line-oriented files.
    pub line: Option<u64>,
    /// Why it was skipped.
    pub reason: String,
}

/// Everything a loader left out or changed, so nothing is dropped silently.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    /// Rows dropped on purpose by the data set's definition, counted by
    /// reason (e.g. `plot` rows and duplicate texts of Rotten Tomatoes).
    pub dropped: BTreeMap<String, usize>,
    /// Malformed records that were skipped, each named.
    pub skipped: Vec<Skipped>,
    /// Files that were not valid UTF-8 and were decoded as Latin-1.
    pub decoded_as_latin1: Vec<PathBuf>,
}

impl LoadReport {
    pub(crate) fn drop_one(&mut self, reason: &str) {
        *self.dropped.entry(reason.to_owned()).or_default() += 1;
    }

    /// True when the loader kept every record as it was.
    pub fn is_clean(&self) -> bool {
        self.dropped.is_empty() && self.skipped.is_empty() && self.decoded_as_latin1.is_empty()
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (reason, count) in &self.dropped {
            writeln!(f, "dropped {count}: {reason}")?;
        }
        for s in &self.skipped {
            match s.line {
                Some(line) => writeln!(f, "skipped {}:{line}: {}", s.path.display(), s.reason)?,
                None => writeln!(f, "skipped {}: {}", s.path.display(), s.reason)?,
            }
        }
        for p in &self.decoded_as_latin1 {
            writeln!(f, "decoded as Latin-1 (not valid UTF-8): {}", p.display())?;
        }
        Ok(())
    }
}

/// A loaded classification data set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dataset {
    /// The data set's name (`rt`, `bbc-topic`, ..., or the user's file).
    pub name: String,
    /// Label names; an example's `label` indexes this.
    pub label_names: Vec<String>,
    /// The examples, in a deterministic order.
    pub examples: Vec<Example>,
    /// What the loader dropped, skipped or re-decoded.
    pub report: LoadReport,
}

impl Dataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Number of label classes.
    pub fn num_labels(&self) -> usize {
        self.label_names.len()
    }

    /// The label of every example, in order.
    pub fn labels(&self) -> Vec<usize> {
        self.examples.iter().map(|e| e.label).collect()
    }

    /// Examples per label, indexed like [`Dataset::label_names`].
    pub fn label_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.label_names.len()];
        for e in &self.examples {
            counts[e.label] += 1;
        }
        counts
    }

    /// The examples at `indices`, cloned, in that order; `None` when an
    /// index is out of range.
    pub fn select(&self, indices: &[usize]) -> Option<Vec<Example>> {
        indices
            .iter()
            .map(|&i| self.examples.get(i).cloned())
            .collect()
    }
}

/// Decodes file contents as UTF-8, or as Latin-1 when they are not valid
/// UTF-8 (every byte is then a character, so nothing is lost); the flag
/// says which happened.
pub(crate) fn decode_text(bytes: Vec<u8>) -> (String, bool) {
    match String::from_utf8(bytes) {
        Ok(s) => (s, false),
        Err(e) => (e.into_bytes().iter().map(|&b| b as char).collect(), true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin1_fallback_keeps_every_byte() {
        let (s, lossy) = decode_text(b"a \xa315".to_vec());
        assert!(lossy);
        assert_eq!(s, "a \u{a3}15");
        let (s, lossy) = decode_text("a £15".as_bytes().to_vec());
        assert!(!lossy);
        assert_eq!(s, "a £15");
    }
}
