//! Helpers shared by the integration tests of this crate.

use fedsvd::ClientData;

/// `n` synthetic examples over the tiny model's vocabulary: [CLS] … [SEP]
/// with 2–8 random tokens between; label 1 examples carry token 7 at a
/// random position, so the task is learnable. Deterministic in `seed`.
pub fn synthetic(n: usize, seed: u64) -> ClientData {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = |m: u64| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s % m
    };
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..n {
        let len = 4 + next(6) as usize;
        let mut seq = vec![2u32];
        seq.extend((1..len - 1).map(|_| 8 + next(40) as u32));
        let label = next(2) as usize;
        if label == 1 {
            let at = 1 + next(len as u64 - 2) as usize;
            seq[at] = 7;
        }
        seq.push(3);
        ids.push(seq);
        labels.push(label);
    }
    ClientData {
        type_ids: ids.iter().map(|s| vec![0; s.len()]).collect(),
        ids,
        labels,
        pad_id: 0,
    }
}
