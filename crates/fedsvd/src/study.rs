//! What a study reads from a run: the steadier endpoint.
//!
//! One round's held-out accuracy swings with which clients that round
//! sampled (with Dirichlet α = 0.5 some clients hold almost one label). The
//! endpoint a run reports next to its last round is therefore the mean
//! accuracy over its last [`ENDPOINT_WINDOW`] evaluated rounds, or over all
//! of them when fewer were evaluated; the rounds that went into it are
//! reported with it, so "the mean of 5 rounds" and "the mean of 2" are never
//! confused.

use serde::{Deserialize, Serialize};

use crate::federation::RoundMetrics;

/// How many of the last evaluated rounds the endpoint averages.
pub const ENDPOINT_WINDOW: usize = 5;

/// The mean held-out accuracy over a run's last evaluated rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Mean accuracy over `rounds`.
    pub accuracy: f64,
    /// The evaluated rounds averaged (ascending; at most the window).
    pub rounds: Vec<usize>,
}

/// The endpoint of an accuracy curve: the mean over the last `window`
/// evaluated rounds (fewer when fewer exist). `curve` holds
/// `(round, accuracy)` for evaluated rounds; it is sorted by round here, and
/// a round given twice keeps its last value (a resumed run that redid it).
/// `None` when nothing was evaluated, `window` is zero or an accuracy is not
/// finite.
pub fn endpoint(curve: impl IntoIterator<Item = (usize, f64)>, window: usize) -> Option<Endpoint> {
    let mut by_round = std::collections::BTreeMap::new();
    for (round, accuracy) in curve {
        by_round.insert(round, accuracy);
    }
    let take = window.min(by_round.len());
    if take == 0 {
        return None;
    }
    let tail: Vec<(usize, f64)> = by_round.into_iter().rev().take(take).collect();
    if tail.iter().any(|(_, a)| !a.is_finite()) {
        return None;
    }
    let accuracy = tail.iter().map(|(_, a)| a).sum::<f64>() / take as f64;
    let mut rounds: Vec<usize> = tail.into_iter().map(|(r, _)| r).collect();
    rounds.reverse();
    Some(Endpoint { accuracy, rounds })
}

/// The endpoint of a run's history ([`ENDPOINT_WINDOW`] evaluated rounds).
pub fn run_endpoint(history: &[RoundMetrics]) -> Option<Endpoint> {
    endpoint(
        history
            .iter()
            .filter_map(|m| m.eval_accuracy.map(|a| (m.round, a))),
        ENDPOINT_WINDOW,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn averages_the_last_five_evaluated_rounds() {
        let curve = (1..=8).map(|r| (r, r as f64 / 10.0));
        let e = endpoint(curve, 5).unwrap();
        assert_eq!(e.rounds, [4, 5, 6, 7, 8]);
        assert!((e.accuracy - 0.6).abs() < 1e-12, "{}", e.accuracy);
    }

    #[test]
    fn uses_every_round_when_fewer_were_evaluated() {
        let e = endpoint([(5, 0.5), (10, 0.7)], 5).unwrap();
        assert_eq!(e.rounds, [5, 10]);
        assert!((e.accuracy - 0.6).abs() < 1e-12);
    }

    #[test]
    fn sorts_rounds_and_keeps_the_last_value_of_a_repeated_one() {
        let e = endpoint([(3, 0.9), (1, 0.1), (2, 0.2), (3, 0.3)], 2).unwrap();
        assert_eq!(e.rounds, [2, 3]);
        assert!((e.accuracy - 0.25).abs() < 1e-12);
    }

    #[test]
    fn nothing_to_average_gives_none() {
        assert!(endpoint([], 5).is_none());
        assert!(endpoint([(1, 0.5)], 0).is_none());
        assert!(endpoint([(1, f64::NAN)], 5).is_none());
    }

    #[test]
    fn a_history_skips_rounds_without_evaluation() {
        let metrics = |round: usize, acc: Option<f64>| RoundMetrics {
            round,
            method: "fedsvd".into(),
            sampled_clients: vec![0],
            trained_clients: vec![0],
            budget_exhausted_clients: vec![],
            train_loss: None,
            eval_accuracy: acc,
            eval_loss: acc,
            max_epsilon: None,
            client_epsilon: vec![],
            bytes_uploaded: 0,
            refactorized: false,
            server_seconds: 0.0,
            round_seconds: None,
        };
        let history: Vec<_> = (1..=30)
            .map(|r| metrics(r, (r % 5 == 0).then_some(r as f64 / 100.0)))
            .collect();
        let e = run_endpoint(&history).unwrap();
        assert_eq!(e.rounds, [10, 15, 20, 25, 30]);
        assert!((e.accuracy - 0.2).abs() < 1e-12);
    }
}
