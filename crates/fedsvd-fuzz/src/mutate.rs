//! Byte mutations of corpus entries, deterministic for a seed.
//!
//! Coverage-less: every input is one corpus entry with a few stacked
//! mutations, drawn from a generator seeded by (run seed, target, input
//! index), so any input of a run can be rebuilt from those three numbers.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How a target's files are built, which decides the structure-aware
/// mutations on top of the byte mutations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Plain bytes (JSON, CSV, JSON Lines, text).
    Text,
    /// A safetensors file: an 8-byte little-endian header length, a JSON
    /// header, the tensor data. Half of the inputs mutate the header alone
    /// and fix the length prefix (and sometimes the data length) so that
    /// the parser gets past its first checks.
    Safetensors,
}

/// Integers at the edges of the types a size field is read into.
pub const INTERESTING_U64: [u64; 16] = [
    0,
    1,
    2,
    7,
    8,
    255,
    256,
    65_535,
    65_536,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    1 << 60,
    (1 << 63) - 1,
    u64::MAX,
];

/// Numbers written as text in place of a number of a JSON or CSV file.
pub const INTERESTING_TEXT_NUMBERS: [&str; 18] = [
    "0",
    "-1",
    "1",
    "2",
    "-0",
    "0.5",
    "1e309",
    "-1e309",
    "1e-320",
    "NaN",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "1152921504606846976",
    "100000000000",
    "3.4e38",
    "99999999999999999999999999999",
];

/// Bytes that matter to the formats under test.
const INTERESTING_BYTES: [u8; 16] = [
    0, 0xff, 0x7f, 0x80, b'"', b'{', b'}', b'[', b']', b',', b':', b'\\', b'\n', b'\r', b'.', 0xc3,
];

/// The mutator of one target: its corpus and dictionary.
#[derive(Debug, Clone)]
pub struct Mutator {
    corpus: Vec<Vec<u8>>,
    dictionary: Vec<Vec<u8>>,
    format: Format,
    max_len: usize,
}

/// Mixes the run seed, a target name and an input index into the seed of
/// that input's generator (SplitMix64 finalizer over FNV-1a of the name).
pub fn input_seed(seed: u64, target: &str, index: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in target.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = seed ^ h.rotate_left(17) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Mutator {
    /// A mutator over `corpus` (must not be empty for [`Mutator::input`] to
    /// produce anything but mutations of the empty input), inserting
    /// `dictionary` tokens; inputs never grow past `max_len` bytes.
    pub fn new(
        corpus: Vec<Vec<u8>>,
        dictionary: Vec<Vec<u8>>,
        format: Format,
        max_len: usize,
    ) -> Self {
        Mutator {
            corpus,
            dictionary,
            format,
            max_len: max_len.max(16),
        }
    }

    /// The corpus entries.
    pub fn corpus(&self) -> &[Vec<u8>] {
        &self.corpus
    }

    /// Input number `index` of the run with `seed` for `target`: the corpus
    /// entries unchanged first, then mutated entries.
    pub fn input(&self, seed: u64, target: &str, index: u64) -> Vec<u8> {
        if let Some(entry) = usize::try_from(index).ok().and_then(|i| self.corpus.get(i)) {
            return entry.clone();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(input_seed(seed, target, index));
        let mut data = if self.corpus.is_empty() {
            Vec::new()
        } else {
            self.corpus[rng.random_range(0..self.corpus.len())].clone()
        };
        let stacked = 1 << rng.random_range(0..4u32);
        match self.format {
            Format::Safetensors if rng.random_bool(0.6) => {
                self.mutate_safetensors(&mut rng, &mut data, stacked)
            }
            _ => {
                for _ in 0..stacked {
                    self.mutate(&mut rng, &mut data);
                }
            }
        }
        data.truncate(self.max_len);
        data
    }

    /// Mutates the JSON header of a safetensors file and rewrites its length
    /// prefix; sometimes also resizes the data to the largest end offset the
    /// new header names, so the header's consistency checks pass and the
    /// loader's own checks run.
    fn mutate_safetensors(&self, rng: &mut ChaCha8Rng, data: &mut Vec<u8>, stacked: usize) {
        let Some((header, body)) = split_safetensors(data) else {
            for _ in 0..stacked {
                self.mutate(rng, data);
            }
            return;
        };
        let mut header = header.to_vec();
        let mut body = body.to_vec();
        for _ in 0..stacked {
            self.mutate(rng, &mut header);
        }
        if rng.random_bool(0.7)
            && let Some(end) = largest_data_end(&header)
            && end <= self.max_len
        {
            body.resize(end, 0);
        }
        if rng.random_bool(0.1) {
            self.mutate(rng, &mut body);
        }
        data.clear();
        data.extend_from_slice(&(header.len() as u64).to_le_bytes());
        data.extend_from_slice(&header);
        data.extend_from_slice(&body);
    }

    /// One byte-level mutation.
    pub fn mutate(&self, rng: &mut ChaCha8Rng, data: &mut Vec<u8>) {
        let len = data.len();
        match rng.random_range(0..12u32) {
            // Flip one bit.
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                data[i] ^= 1 << rng.random_range(0..8u32);
            }
            // Overwrite a byte with a random or an interesting one.
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                data[i] = if rng.random_bool(0.5) {
                    rng.random()
                } else {
                    INTERESTING_BYTES[rng.random_range(0..INTERESTING_BYTES.len())]
                };
            }
            // Insert a few random bytes.
            2 => {
                let at = rng.random_range(0..=len);
                let n = rng.random_range(1..=8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                data.splice(at..at, bytes);
            }
            // Delete a range.
            3 if len > 0 => {
                let start = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - start).min(64));
                data.drain(start..start + n);
            }
            // Duplicate a range somewhere else (sometimes many times).
            4 if len > 0 => {
                let start = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - start).min(256));
                let piece = data[start..start + n].to_vec();
                let times = if rng.random_bool(0.1) {
                    rng.random_range(2..64)
                } else {
                    1
                };
                let at = rng.random_range(0..=len);
                let repeated: Vec<u8> = piece.iter().copied().cycle().take(n * times).collect();
                data.splice(at..at, repeated);
            }
            // Splice: a prefix of this input and a suffix of another entry.
            5 if !self.corpus.is_empty() => {
                let other = &self.corpus[rng.random_range(0..self.corpus.len())];
                let cut = rng.random_range(0..=len);
                let from = rng.random_range(0..=other.len());
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            // An interesting integer into an 8-byte little-endian field.
            6 if len >= 8 => {
                let v = INTERESTING_U64[rng.random_range(0..INTERESTING_U64.len())];
                let at = if rng.random_bool(0.5) {
                    0
                } else {
                    rng.random_range(0..=len - 8) & !7
                };
                data[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            // An interesting number in place of a decimal number in the text.
            7 => replace_number(rng, data),
            // Insert or overwrite with a dictionary token.
            8 | 9 if !self.dictionary.is_empty() => {
                let token = &self.dictionary[rng.random_range(0..self.dictionary.len())];
                let at = rng.random_range(0..=len);
                if rng.random_bool(0.5) || at == len {
                    data.splice(at..at, token.iter().copied());
                } else {
                    let end = (at + token.len()).min(len);
                    data.splice(at..end, token.iter().copied());
                }
            }
            // Swap two ranges' bytes (reorders keys, fields, rows).
            10 if len > 2 => {
                let a = rng.random_range(0..len);
                let b = rng.random_range(0..len);
                data.swap(a, b);
            }
            // Truncate.
            11 if len > 0 => {
                let at = rng.random_range(0..len);
                data.truncate(at);
            }
            _ => {
                let at = rng.random_range(0..=len);
                data.insert(at, rng.random());
            }
        }
        data.truncate(self.max_len);
    }
}

/// Replaces one run of ASCII digits (with an optional sign, fraction and
/// exponent) by an interesting number; inserts one when there is none.
fn replace_number(rng: &mut ChaCha8Rng, data: &mut Vec<u8>) {
    let text =
        INTERESTING_TEXT_NUMBERS[rng.random_range(0..INTERESTING_TEXT_NUMBERS.len())].as_bytes();
    let starts: Vec<usize> = (0..data.len())
        .filter(|&i| data[i].is_ascii_digit() && (i == 0 || !data[i - 1].is_ascii_digit()))
        .collect();
    if starts.is_empty() {
        let at = rng.random_range(0..=data.len());
        data.splice(at..at, text.iter().copied());
        return;
    }
    let start = starts[rng.random_range(0..starts.len())];
    let mut end = start;
    while end < data.len() && matches!(data[end], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-') {
        end += 1;
    }
    let start = if start > 0 && data[start - 1] == b'-' {
        start - 1
    } else {
        start
    };
    data.splice(start..end, text.iter().copied());
}

/// `(header, body)` of safetensors bytes whose length prefix fits.
pub fn split_safetensors(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u64::from_le_bytes(data.get(..8)?.try_into().ok()?);
    let n = usize::try_from(n).ok()?;
    let end = n.checked_add(8)?;
    Some((data.get(8..end)?, &data[end..]))
}

/// The largest `data_offsets` end named in a safetensors JSON header.
fn largest_data_end(header: &[u8]) -> Option<usize> {
    let value: serde_json::Value = serde_json::from_slice(header).ok()?;
    value
        .as_object()?
        .values()
        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
        .filter_map(|e| usize::try_from(e).ok())
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mutator() -> Mutator {
        Mutator::new(
            vec![
                b"{\"a\": 12, \"b\": [1, 2]}".to_vec(),
                b"x,y\n1,2\n".to_vec(),
            ],
            vec![b"\"key\"".to_vec()],
            Format::Text,
            1 << 16,
        )
    }

    #[test]
    fn inputs_are_reproducible_and_vary() {
        let m = mutator();
        assert_eq!(m.input(7, "t", 0), m.corpus()[0]);
        assert_eq!(m.input(7, "t", 1), m.corpus()[1]);
        let a: Vec<Vec<u8>> = (2..200).map(|i| m.input(7, "t", i)).collect();
        let b: Vec<Vec<u8>> = (2..200).map(|i| m.input(7, "t", i)).collect();
        assert_eq!(a, b, "same seed, same inputs");
        let c: Vec<Vec<u8>> = (2..200).map(|i| m.input(8, "t", i)).collect();
        assert_ne!(a, c, "another seed, other inputs");
        let distinct: std::collections::HashSet<&Vec<u8>> = a.iter().collect();
        assert!(distinct.len() > 150, "{} distinct of 198", distinct.len());
    }

    #[test]
    fn safetensors_header_mutations_keep_the_length_prefix_consistent() {
        let header = br#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.extend_from_slice(&[0; 8]);
        let m = Mutator::new(vec![file], Vec::new(), Format::Safetensors, 1 << 16);
        let consistent = (1..300)
            .map(|i| m.input(1, "st", i))
            .filter(|d| split_safetensors(d).is_some())
            .count();
        assert!(consistent > 150, "{consistent} of 299 keep a valid prefix");
    }

    #[test]
    fn numbers_are_replaced_whole() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut data = b"{\"r\": -12.5e3}".to_vec();
        replace_number(&mut rng, &mut data);
        let text = String::from_utf8(data).unwrap();
        assert!(
            text.starts_with("{\"r\": ") && text.ends_with('}'),
            "{text}"
        );
        assert!(!text.contains("12.5e3"), "{text}");
    }
}
