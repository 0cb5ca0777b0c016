//! Tokenization into padded batches.

use std::path::Path;

use tokenizers::{TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};

/// A padded batch of token sequences. Sequences are padded on the right to
/// the longest one in the batch; the attention mask is 1 on the first
/// `lengths[i]` positions of row `i` and 0 after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// `[batch, seq_len]` row-major token ids (padding positions hold the pad id).
    pub input_ids: Vec<u32>,
    /// `[batch, seq_len]` token types (segment ids).
    pub token_type_ids: Vec<u32>,
    /// `[batch, seq_len]` attention mask (1 real, 0 padding).
    pub attention_mask: Vec<u32>,
    /// Real length of each sequence.
    pub lengths: Vec<usize>,
    /// Padded length (the longest sequence).
    pub seq_len: usize,
}

impl Batch {
    /// Builds a batch from unpadded sequences (ids and token types of equal
    /// lengths), padding with `pad_id` to the longest.
    pub fn from_sequences(ids: &[Vec<u32>], type_ids: &[Vec<u32>], pad_id: u32) -> Result<Self> {
        if ids.len() != type_ids.len() {
            return Err(Error::InvalidBatch(format!(
                "{} id sequences but {} token-type sequences",
                ids.len(),
                type_ids.len()
            )));
        }
        let seq_len = ids.iter().map(Vec::len).max().unwrap_or(0);
        let n = ids.len();
        let mut batch = Batch {
            input_ids: vec![pad_id; n * seq_len],
            token_type_ids: vec![0; n * seq_len],
            attention_mask: vec![0; n * seq_len],
            lengths: Vec::with_capacity(n),
            seq_len,
        };
        for (i, (s, t)) in ids.iter().zip(type_ids).enumerate() {
            if s.len() != t.len() {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i} has {} ids but {} token types",
                    s.len(),
                    t.len()
                )));
            }
            if s.is_empty() {
                return Err(Error::InvalidBatch(format!("sequence {i} is empty")));
            }
            let row = i * seq_len;
            batch.input_ids[row..row + s.len()].copy_from_slice(s);
            batch.token_type_ids[row..row + s.len()].copy_from_slice(t);
            batch.attention_mask[row..row + s.len()].fill(1);
            batch.lengths.push(s.len());
        }
        Ok(batch)
    }

    /// Builds a batch from padded `[batch, seq_len]` arrays, checking that the
    /// mask is right-padding (ones then zeros, at least one 1 per row).
    pub fn from_padded(
        input_ids: Vec<u32>,
        token_type_ids: Vec<u32>,
        attention_mask: Vec<u32>,
        seq_len: usize,
    ) -> Result<Self> {
        let total = input_ids.len();
        if token_type_ids.len() != total || attention_mask.len() != total {
            return Err(Error::InvalidBatch(format!(
                "input_ids has {total} values, token_type_ids {}, attention_mask {}",
                token_type_ids.len(),
                attention_mask.len()
            )));
        }
        if seq_len == 0 || !total.is_multiple_of(seq_len) {
            return Err(Error::InvalidBatch(format!(
                "{total} values do not form rows of seq_len {seq_len}"
            )));
        }
        let mut lengths = Vec::with_capacity(total / seq_len);
        for (i, row) in attention_mask.chunks_exact(seq_len).enumerate() {
            let len = row.iter().take_while(|&&m| m == 1).count();
            if len == 0 || row[len..].iter().any(|&m| m != 0) {
                return Err(Error::InvalidBatch(format!(
                    "attention_mask row {i} is not right-padded ones-then-zeros with at least one token"
                )));
            }
            lengths.push(len);
        }
        Ok(Batch {
            input_ids,
            token_type_ids,
            attention_mask,
            lengths,
            seq_len,
        })
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    /// Whether the batch has no sequences.
    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Number of real (unpadded) tokens.
    pub fn num_tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// The real token ids of sequence `i`.
    pub fn ids(&self, i: usize) -> &[u32] {
        &self.input_ids[i * self.seq_len..i * self.seq_len + self.lengths[i]]
    }

    /// The real token types of sequence `i`.
    pub fn type_ids(&self, i: usize) -> &[u32] {
        &self.token_type_ids[i * self.seq_len..i * self.seq_len + self.lengths[i]]
    }

    /// The sub-batch of sequences `range` (re-padded to its own longest).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Result<Batch> {
        if range.end > self.len() || range.start > range.end {
            return Err(Error::InvalidBatch(format!(
                "range {range:?} outside a batch of {}",
                self.len()
            )));
        }
        // Padding ids are never read by the model; 0 is the BERT pad id.
        let pad = 0;
        let ids: Vec<Vec<u32>> = range.clone().map(|i| self.ids(i).to_vec()).collect();
        let tys: Vec<Vec<u32>> = range.map(|i| self.type_ids(i).to_vec()).collect();
        Batch::from_sequences(&ids, &tys, pad)
    }
}

/// A WordPiece (or any `tokenizer.json`) tokenizer with truncation to
/// `max_len` tokens (special tokens included) and dynamic padding. The fixed
/// truncation and padding stored in the file are overridden.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    max_len: usize,
    pad_id: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("max_len", &self.max_len)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`; sequences are truncated to `max_len` tokens.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        Self::from_tokenizer(inner, max_len)
    }

    /// Wraps an already loaded tokenizer.
    pub fn from_tokenizer(mut inner: tokenizers::Tokenizer, max_len: usize) -> Result<Self> {
        if max_len < 3 {
            return Err(Error::InvalidOption(format!(
                "max_len must be at least 3 (room for [CLS] x [SEP]), got {max_len}"
            )));
        }
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                ..Default::default()
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        let pad_id = inner.token_to_id("[PAD]").unwrap_or(0);
        Ok(Tokenizer {
            inner,
            max_len,
            pad_id,
        })
    }

    /// The truncation length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Tokenizes single texts (`[CLS] text [SEP]`).
    pub fn encode<S: AsRef<str>>(&self, texts: &[S]) -> Result<Batch> {
        let mut ids = Vec::with_capacity(texts.len());
        let mut tys = Vec::with_capacity(texts.len());
        for t in texts {
            let enc = self
                .inner
                .encode(t.as_ref(), true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            ids.push(enc.get_ids().to_vec());
            tys.push(enc.get_type_ids().to_vec());
        }
        Batch::from_sequences(&ids, &tys, self.pad_id)
    }

    /// Tokenizes text pairs (`[CLS] a [SEP] b [SEP]`, token types 0 then 1).
    pub fn encode_pairs<S: AsRef<str>, T: AsRef<str>>(&self, pairs: &[(S, T)]) -> Result<Batch> {
        let mut ids = Vec::with_capacity(pairs.len());
        let mut tys = Vec::with_capacity(pairs.len());
        for (a, b) in pairs {
            let enc = self
                .inner
                .encode((a.as_ref(), b.as_ref()), true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            ids.push(enc.get_ids().to_vec());
            tys.push(enc.get_type_ids().to_vec());
        }
        Batch::from_sequences(&ids, &tys, self.pad_id)
    }
}
