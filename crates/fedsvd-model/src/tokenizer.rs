//! Tokenization into padded batches.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

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
///
/// The `tokenizers` crate can panic on a hostile file (a post-processor
/// naming a special token that is not in its table, a decoder that does not
/// parse, ...); every call into it runs under `catch_unwind`, so such a
/// file is an [`Error::Tokenizer`] naming it, never a panic.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    max_len: usize,
    pad_id: u32,
    /// The file it was loaded from, named in errors.
    source: Option<PathBuf>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("max_len", &self.max_len)
            .field("pad_id", &self.pad_id)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The message of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "unknown panic"
    }
}

/// Runs `f` (a call into the `tokenizers` crate), turning a panic into an
/// error that says what was being done.
fn guarded<T>(what: impl FnOnce() -> String, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => Err(Error::Tokenizer(format!(
            "{}: the tokenizers library panicked: {}",
            what(),
            panic_message(&*payload)
        ))),
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`; sequences are truncated to `max_len` tokens.
    /// Every error, including one found only when encoding, names the file.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let what = || format!("cannot load {}", path.display());
        let inner = guarded(what, || {
            tokenizers::Tokenizer::from_file(path)
                .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", path.display())))
        })?;
        let mut tokenizer =
            guarded(what, || Self::from_tokenizer(inner, max_len)).map_err(|e| match e {
                Error::Tokenizer(m) if !m.starts_with("cannot load") => {
                    Error::Tokenizer(format!("cannot load {}: {m}", path.display()))
                }
                other => other,
            })?;
        tokenizer.source = Some(path.to_owned());
        Ok(tokenizer)
    }

    /// Wraps an already loaded tokenizer.
    pub fn from_tokenizer(mut inner: tokenizers::Tokenizer, max_len: usize) -> Result<Self> {
        if max_len < 3 {
            return Err(Error::InvalidOption(format!(
                "max_len must be at least 3 (room for [CLS] x [SEP]), got {max_len}"
            )));
        }
        guarded(
            || "setting truncation".to_owned(),
            || {
                inner
                    .with_truncation(Some(TruncationParams {
                        max_length: max_len,
                        strategy: TruncationStrategy::LongestFirst,
                        stride: 0,
                        ..Default::default()
                    }))
                    .map(|_| ())
                    .map_err(|e| Error::Tokenizer(e.to_string()))
            },
        )?;
        inner.with_padding(None);
        let pad_id = inner.token_to_id("[PAD]").unwrap_or(0);
        Ok(Tokenizer {
            inner,
            max_len,
            pad_id,
            source: None,
        })
    }

    /// An encoding error, naming the file the tokenizer came from.
    fn encode_error(&self, message: String) -> Error {
        match &self.source {
            Some(path) => Error::Tokenizer(format!("{}: {message}", path.display())),
            None => Error::Tokenizer(message),
        }
    }

    /// One encoding, with a panic inside `tokenizers` turned into an error.
    fn encode_one<'s>(
        &self,
        input: impl Into<tokenizers::EncodeInput<'s>>,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        let input = input.into();
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.encode(input, true))) {
            Ok(Ok(enc)) if enc.get_ids().is_empty() => {
                Err(self.encode_error("a text encodes to no token at all".to_owned()))
            }
            Ok(Ok(enc)) => Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec())),
            Ok(Err(e)) => Err(self.encode_error(e.to_string())),
            Err(payload) => Err(self.encode_error(format!(
                "the tokenizers library panicked while encoding: {}",
                panic_message(&*payload)
            ))),
        }
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
            let (i, ty) = self.encode_one(t.as_ref())?;
            ids.push(i);
            tys.push(ty);
        }
        Batch::from_sequences(&ids, &tys, self.pad_id)
    }

    /// Tokenizes text pairs (`[CLS] a [SEP] b [SEP]`, token types 0 then 1).
    pub fn encode_pairs<S: AsRef<str>, T: AsRef<str>>(&self, pairs: &[(S, T)]) -> Result<Batch> {
        let mut ids = Vec::with_capacity(pairs.len());
        let mut tys = Vec::with_capacity(pairs.len());
        for (a, b) in pairs {
            let (i, ty) = self.encode_one((a.as_ref(), b.as_ref()))?;
            ids.push(i);
            tys.push(ty);
        }
        Batch::from_sequences(&ids, &tys, self.pad_id)
    }
}
