//! Client sampling for a round.

use rand::Rng;

/// Samples `per_round` of `clients` indices uniformly without replacement
/// (a partial Fisher–Yates shuffle), returned in increasing order so that the
/// round's processing order does not depend on the draw order.
///
/// `per_round` larger than `clients` is capped at `clients`.
pub fn sample_clients<R: Rng + ?Sized>(
    clients: usize,
    per_round: usize,
    rng: &mut R,
) -> Vec<usize> {
    let take = per_round.min(clients);
    let mut pool: Vec<usize> = (0..clients).collect();
    for i in 0..take {
        let j = rng.random_range(i..clients);
        pool.swap(i, j);
    }
    let mut chosen = pool[..take].to_vec();
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn samples_distinct_sorted_and_uniform() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut counts = [0usize; 6];
        let trials = 6000;
        for _ in 0..trials {
            let s = sample_clients(6, 3, &mut rng);
            assert_eq!(s.len(), 3);
            assert!(s.windows(2).all(|w| w[0] < w[1]));
            for c in s {
                counts[c] += 1;
            }
        }
        // Each client is in a round with probability 1/2: 3000 ± 5σ (σ ≈ 39).
        for (client, &c) in counts.iter().enumerate() {
            assert!((c as f64 - 3000.0).abs() < 200.0, "client {client}: {c}");
        }
    }

    #[test]
    fn caps_at_the_number_of_clients_and_is_seeded() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert_eq!(sample_clients(4, 10, &mut rng), vec![0, 1, 2, 3]);
        let a = sample_clients(100, 5, &mut ChaCha20Rng::seed_from_u64(9));
        let b = sample_clients(100, 5, &mut ChaCha20Rng::seed_from_u64(9));
        assert_eq!(a, b);
    }
}
