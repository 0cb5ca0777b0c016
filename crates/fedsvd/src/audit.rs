//! An empirical lower bound on ε from one training run (Steinke, Nasr &
//! Jagielski 2023, "Privacy auditing with one (1) training run", arXiv
//! 2305.08846), of one client's DP-SGD as its ledger accounts it.
//!
//! m canaries are drawn, each included in the client's data independently
//! with probability ½. The client trains with the real DP-SGD path
//! ([`train_locally_instrumented`]), with the run's σ, q and step count.
//! Every canary then gets a score; the auditor guesses "included" for the
//! k highest and "excluded" for the k lowest scores and abstains on the
//! rest. If the mechanism is (ε, δ)-DP, the number of correct guesses is
//! stochastically dominated by a binomial with success probability
//! e^ε/(1 + e^ε), up to a δ term (the paper's Theorem 3.1). The largest ε
//! that the observed count rejects at the stated confidence is ε_lb: a
//! correct implementation can never be shown to exceed its accountant's
//! ε except with probability 1 − confidence.
//!
//! Two kinds of canaries:
//! - [`CanaryMode::Gradient`] (white box): canary j's per-example gradient
//!   is `norm·e_c` on its own coordinate c of the trainable vector, with a
//!   norm far above the clipping bound (so clipping must shorten it). Its
//!   score is how far training moved that coordinate against it.
//! - [`CanaryMode::Input`]: canaries are random token sequences with random
//!   labels, trained on like any example; the score is the drop in their
//!   loss.
//!
//! k is chosen from a fixed list after the scores are known; each choice is
//! tested at confidence `1 − (1 − confidence)/choices` (a union bound), so
//! the stated confidence holds for the reported maximum.

use fedsvd_dp::{Accountant, HistoryEntry};
use fedsvd_model::{Batch, LoraState, Model};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::client::{
    ClientData, ClientStreams, GradientCanaries, Instrumentation, LocalTraining, Privatization,
    train_locally_instrumented,
};
use crate::error::{Error, Result};

/// The kind of canary the audit inserts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CanaryMode {
    /// White-box canaries in the gradient of the trainable factors.
    Gradient,
    /// Random-text examples with random labels.
    Input,
}

impl CanaryMode {
    /// The mode's name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CanaryMode::Gradient => "gradient",
            CanaryMode::Input => "input",
        }
    }
}

/// How to audit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuditConfig {
    /// The kind of canary.
    pub mode: CanaryMode,
    /// Number of canaries m (at least 1,000 for a meaningful bound).
    pub canaries: usize,
    /// Confidence of the lower bound (0.95).
    pub confidence: f64,
    /// Seed of the canaries and of their inclusion. The training's own
    /// streams are passed separately.
    pub seed: u64,
    /// A gradient canary's norm, as a multiple of the clipping norm.
    pub gradient_norm_factor: f32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            mode: CanaryMode::Gradient,
            canaries: 1000,
            confidence: 0.95,
            seed: 0,
            gradient_norm_factor: 1000.0,
        }
    }
}

/// What an audit found (`audit.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    /// The kind of canary.
    pub mode: CanaryMode,
    /// Canaries drawn (m).
    pub canaries: usize,
    /// Canaries included in training.
    pub included: usize,
    /// Guesses made (2k) for the reported bound.
    pub guesses: usize,
    /// Correct guesses among them.
    pub correct: usize,
    /// The empirical lower bound on ε at `delta`, with `confidence`.
    pub epsilon_lower_bound: f64,
    /// The accountant's ε for the same σ, q and steps.
    pub epsilon_accountant: f64,
    /// δ of both.
    pub delta: f64,
    /// Confidence of the lower bound.
    pub confidence: f64,
    /// Noise multiplier σ trained with.
    pub noise_multiplier: f64,
    /// Poisson sampling rate q trained with.
    pub sample_rate: f64,
    /// DP-SGD steps taken.
    pub steps: u64,
}

/// Audits one client's DP-SGD: draws the canaries, trains from `init` on
/// `data` with `training` (which must be DP-SGD) and the given streams,
/// scores, guesses and bounds. `extra` carries a deliberate fault in test
/// builds; pass `Instrumentation::default()` otherwise (canaries are added
/// here).
#[allow(clippy::too_many_arguments)]
pub fn audit_client(
    model: &Model,
    init: &LoraState,
    data: &ClientData,
    training: &LocalTraining,
    accountant: &Accountant,
    delta: f64,
    config: &AuditConfig,
    streams: &mut ClientStreams,
    extra: Instrumentation<'_>,
) -> Result<AuditReport> {
    let Privatization::DpSgd {
        clip,
        noise_multiplier,
    } = training.privatization
    else {
        return Err(Error::InvalidConfig {
            key: "federation.privacy.epsilon",
            value: "null".into(),
            allowed: "a private run: the audit checks a DP guarantee",
        });
    };
    if config.canaries < 2 {
        return Err(Error::InvalidConfig {
            key: "audit.canaries",
            value: config.canaries.to_string(),
            allowed: "at least 2 canaries (1,000 or more for a meaningful bound)",
        });
    }
    if !(config.confidence > 0.0 && config.confidence < 1.0) {
        return Err(Error::InvalidConfig {
            key: "audit.confidence",
            value: config.confidence.to_string(),
            allowed: "a probability strictly between 0 and 1",
        });
    }
    let mut rng = ChaCha20Rng::seed_from_u64(config.seed);
    let included: Vec<bool> = (0..config.canaries).map(|_| rng.random::<bool>()).collect();
    let (scores, sample_rate): (Vec<f64>, f64) = match config.mode {
        CanaryMode::Gradient => {
            let layout = model.layout(init);
            if config.canaries > layout.len {
                return Err(Error::InvalidConfig {
                    key: "audit.canaries",
                    value: config.canaries.to_string(),
                    allowed: "at most one gradient canary per trainable value",
                });
            }
            // m distinct coordinates: a partial Fisher–Yates shuffle.
            let mut order: Vec<usize> = (0..layout.len).collect();
            for i in 0..config.canaries {
                let j = rng.random_range(i..layout.len);
                order.swap(i, j);
            }
            let coordinates = &order[..config.canaries];
            let canaries = GradientCanaries {
                coordinates: coordinates
                    .iter()
                    .zip(&included)
                    .filter(|(_, inc)| **inc)
                    .map(|(&c, _)| c)
                    .collect(),
                norm: clip * config.gradient_norm_factor,
            };
            let mut state = init.clone();
            let extra = extra.and_canaries(&canaries);
            train_locally_instrumented(model, &mut state, data, training, streams, &extra)?;
            let before = layout.flatten(init)?;
            let after = layout.flatten(&state)?;
            // An included canary's gradient is positive on its coordinate,
            // so SGD moves the coordinate down.
            let scores = coordinates
                .iter()
                .map(|&c| f64::from(before[c]) - f64::from(after[c]))
                .collect();
            (scores, training.sample_rate(data.len()))
        }
        CanaryMode::Input => {
            let vocab = model.weights().config.vocab_size as u32;
            let labels = model.head_config().num_labels;
            let len = data
                .ids
                .iter()
                .map(Vec::len)
                .max()
                .unwrap_or(8)
                .clamp(4, 32);
            let canaries = random_examples(&mut rng, config.canaries, vocab, labels, len, data);
            let mut augmented = data.clone();
            for (i, inc) in included.iter().enumerate() {
                if *inc {
                    augmented.ids.push(canaries.ids[i].clone());
                    augmented.type_ids.push(canaries.type_ids[i].clone());
                    augmented.labels.push(canaries.labels[i]);
                }
            }
            // Keep the run's sampling rate over the larger data set (rounded
            // up, so the accountant below sees at least the rate used).
            let q = training.sample_rate(data.len());
            let training = &LocalTraining {
                expected_batch: ((q * augmented.len() as f64).ceil() as usize).max(1),
                ..*training
            };
            let before = example_losses(model, init, &canaries, training.physical_batch)?;
            let mut state = init.clone();
            train_locally_instrumented(model, &mut state, &augmented, training, streams, &extra)?;
            let after = example_losses(model, &state, &canaries, training.physical_batch)?;
            let scores = before.iter().zip(&after).map(|(b, a)| b - a).collect();
            (scores, training.sample_rate(augmented.len()))
        }
    };
    if scores.iter().any(|s: &f64| !s.is_finite()) {
        return Err(Error::NonFinite {
            context: "audit: canary scores after training".into(),
        });
    }
    let steps = training.steps as u64;
    let epsilon_accountant = accountant
        .epsilon(
            &[HistoryEntry::new(noise_multiplier, sample_rate, steps)?],
            delta,
        )?
        .epsilon;
    let guess = best_guess(&scores, &included, delta, config.confidence)?;
    Ok(AuditReport {
        mode: config.mode,
        canaries: config.canaries,
        included: included.iter().filter(|&&i| i).count(),
        guesses: guess.guesses,
        correct: guess.correct,
        epsilon_lower_bound: guess.epsilon,
        epsilon_accountant,
        delta,
        confidence: config.confidence,
        noise_multiplier,
        sample_rate,
        steps,
    })
}

/// Audits client `client` of the run `config` describes: loads the model and
/// data as `fedsvd run` would, calibrates the client's σ for its q and the
/// ledger's step count (R·τ under the conservative rule), and runs
/// [`audit_client`] from the run's initial adapters for all those steps.
/// Seeded runs give identical audits; unseeded ones draw the training
/// noise from the operating system as a real run does.
pub fn audit_run(
    config: &crate::RunConfig,
    assets_dir: &std::path::Path,
    client: usize,
    audit: &AuditConfig,
) -> Result<AuditReport> {
    config.validate()?;
    let data = crate::run::prepare_data(config, assets_dir)?;
    let Some(client_data) = data.clients.get(client) else {
        return Err(Error::InvalidConfig {
            key: "audit.client",
            value: client.to_string(),
            allowed: "the index of one of the run's clients",
        });
    };
    let weights = crate::run::load_weights(config, assets_dir)?;
    let lora = config.adapters.lora()?;
    let head = config.adapters.head(data.label_names.len());
    let federation = crate::Federation::new(
        config.federation,
        weights,
        lora,
        head,
        data.clients.clone(),
        data.test.clone(),
    )?;
    let privacy = &federation.privacy()[client];
    let steps = config.federation.calibrated_steps(data.clients.len());
    let training = LocalTraining {
        steps: steps as usize,
        ..config.federation.local_training(privacy.noise_multiplier)
    };
    let mut streams = match config.federation.seed {
        Some(seed) => ClientStreams::from_seed(seed ^ 0xA0D1_7000),
        None => ClientStreams::from_os(),
    };
    audit_client(
        federation.model(),
        &federation.global_lora()?,
        client_data,
        &training,
        &Accountant::new(config.federation.privacy.accountant),
        config.federation.privacy.delta,
        audit,
        &mut streams,
        Instrumentation::default(),
    )
}

/// `count` random token sequences of `len` tokens ([CLS] … [SEP] with the
/// first and second ids of `data`'s examples when present) and labels.
fn random_examples(
    rng: &mut ChaCha20Rng,
    count: usize,
    vocab: u32,
    labels: usize,
    len: usize,
    data: &ClientData,
) -> ClientData {
    let first = data.ids.first();
    let cls = first.and_then(|v| v.first()).copied().unwrap_or(1);
    let sep = first.and_then(|v| v.last()).copied().unwrap_or(2);
    let low = (vocab / 20).max(3).min(vocab.saturating_sub(1));
    let mut out = ClientData {
        ids: Vec::with_capacity(count),
        type_ids: Vec::with_capacity(count),
        labels: Vec::with_capacity(count),
        pad_id: data.pad_id,
    };
    for _ in 0..count {
        let mut ids = vec![cls];
        ids.extend((0..len - 2).map(|_| rng.random_range(low..vocab.max(low + 1))));
        ids.push(sep);
        out.type_ids.push(vec![0; ids.len()]);
        out.ids.push(ids);
        out.labels.push(rng.random_range(0..labels.max(1)));
    }
    out
}

/// The cross-entropy of every example of `data` under `state`.
fn example_losses(
    model: &Model,
    state: &LoraState,
    data: &ClientData,
    physical_batch: usize,
) -> Result<Vec<f64>> {
    let classes = model.head_config().num_labels;
    let mut out = Vec::with_capacity(data.len());
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(physical_batch.max(1)) {
        let (batch, labels): (Batch, Vec<usize>) = data.batch(chunk)?;
        let logits = model.logits(state, &batch)?;
        for (row, &label) in logits.chunks(classes).zip(&labels) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let log_sum = row
                .iter()
                .map(|&v| f64::from(v - max).exp())
                .sum::<f64>()
                .ln()
                + f64::from(max);
            out.push(log_sum - f64::from(row[label]));
        }
    }
    Ok(out)
}

/// The outcome of the best guessing rule.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Guess {
    guesses: usize,
    correct: usize,
    epsilon: f64,
}

/// Guesses at each k of a fixed list (k highest scores "in", k lowest
/// "out"), bounds each at the union-bound confidence, keeps the largest ε.
fn best_guess(scores: &[f64], included: &[bool], delta: f64, confidence: f64) -> Result<Guess> {
    let m = scores.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let ks: Vec<usize> = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]
        .iter()
        .map(|f| ((m as f64 * f) as usize).clamp(1, m / 2))
        .collect();
    let failure = (1.0 - confidence) / ks.len() as f64;
    let mut best = Guess {
        guesses: 0,
        correct: 0,
        epsilon: 0.0,
    };
    for &k in &ks {
        let top = order[..k].iter().filter(|&&i| included[i]).count();
        let bottom = order[m - k..].iter().filter(|&&i| !included[i]).count();
        let (guesses, correct) = (2 * k, top + bottom);
        let epsilon = epsilon_lower_bound(m, guesses, correct, delta, failure)?;
        if epsilon > best.epsilon || best.guesses == 0 {
            best = Guess {
                guesses,
                correct,
                epsilon,
            };
        }
    }
    Ok(best)
}

/// The probability, under (ε, δ)-DP with m canaries, of at least `v`
/// correct among `r` guesses (Steinke, Nasr & Jagielski, Theorem 3.1):
/// `P[Bin(r, p) ≥ v] + 2mδ · max_{1≤i≤v} P[v > Bin(r, p) ≥ v − i] / i`
/// with `p = e^ε / (1 + e^ε)`.
pub fn audit_p_value(m: usize, r: usize, v: usize, epsilon: f64, delta: f64) -> f64 {
    let p = 1.0 / (1.0 + (-epsilon).exp());
    let pmf = binomial_pmf(r, p);
    let tail: f64 = pmf[v.min(r + 1)..].iter().sum();
    let mut alpha = 0.0f64;
    let mut window = 0.0;
    for i in 1..=v {
        window += pmf[v - i];
        alpha = alpha.max(window / i as f64);
    }
    (tail + 2.0 * m as f64 * delta * alpha).min(1.0)
}

/// The largest ε (to 1e-4) whose p-value for `v` correct of `r` guesses is
/// below `failure`: the empirical lower bound at confidence `1 − failure`.
/// 0 when even ε = 0 is not rejected.
pub fn epsilon_lower_bound(m: usize, r: usize, v: usize, delta: f64, failure: f64) -> Result<f64> {
    if v > r || r > m {
        return Err(Error::InvalidConfig {
            key: "audit",
            value: format!("{v} correct of {r} guesses among {m} canaries"),
            allowed: "correct <= guesses <= canaries",
        });
    }
    if audit_p_value(m, r, v, 0.0, delta) >= failure {
        return Ok(0.0);
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while audit_p_value(m, r, v, hi, delta) < failure {
        lo = hi;
        hi *= 2.0;
        if hi > 1e3 {
            return Ok(lo);
        }
    }
    while hi - lo > 1e-4 {
        let mid = 0.5 * (lo + hi);
        if audit_p_value(m, r, v, mid, delta) < failure {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// The pmf of Binomial(n, p) at 0..=n, in log space then exponentiated.
fn binomial_pmf(n: usize, p: f64) -> Vec<f64> {
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    let mut log_choose = 0.0f64;
    (0..=n)
        .map(|k| {
            if k > 0 {
                log_choose += ((n - k + 1) as f64).ln() - (k as f64).ln();
            }
            let term = log_choose
                + if k > 0 { k as f64 * lp } else { 0.0 }
                + if k < n { (n - k) as f64 * lq } else { 0.0 };
            term.exp()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p_values_match_direct_binomial_sums() {
        // r = 10 guesses, v = 9 correct, ε = 1, δ = 0: P[Bin(10, p) ≥ 9].
        let p = 1.0 / (1.0 + (-1.0f64).exp());
        let direct = 10.0 * p.powi(9) * (1.0 - p) + p.powi(10);
        assert!((audit_p_value(100, 10, 9, 1.0, 0.0) - direct).abs() < 1e-12);
        // The δ term only adds.
        assert!(audit_p_value(100, 10, 9, 1.0, 1e-3) > direct);
    }

    #[test]
    fn perfect_guesses_bound_epsilon_by_their_number() {
        // All r correct: p^r = failure gives ε = ln(p / (1 − p)).
        let r = 1000;
        let eps = epsilon_lower_bound(r, r, r, 0.0, 0.05).unwrap();
        let p = 0.05f64.powf(1.0 / r as f64);
        assert!((eps - (p / (1.0 - p)).ln()).abs() < 1e-3, "{eps}");
        // Half right is evidence of nothing.
        assert_eq!(epsilon_lower_bound(r, r, r / 2, 1e-5, 0.05).unwrap(), 0.0);
        // More correct guesses never lower the bound.
        let mut last = 0.0;
        for v in (500..=1000).step_by(50) {
            let e = epsilon_lower_bound(1000, 1000, v, 1e-5, 0.05).unwrap();
            assert!(e >= last);
            last = e;
        }
    }

    #[test]
    fn random_guesses_stay_below_a_true_epsilon() {
        // Scores from a mechanism that is exactly ε-DP randomized response:
        // the audit must not exceed ε (at its confidence, over many trials).
        let eps = 1.0f64;
        let p = eps.exp() / (1.0 + eps.exp());
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let mut over = 0;
        for _ in 0..40 {
            let m = 2000;
            let included: Vec<bool> = (0..m).map(|_| rng.random::<bool>()).collect();
            let scores: Vec<f64> = included
                .iter()
                .map(|&inc| {
                    let truthful = rng.random::<f64>() < p;
                    let says_in = if truthful { inc } else { !inc };
                    f64::from(u8::from(says_in)) + rng.random::<f64>() * 1e-3
                })
                .collect();
            let g = best_guess(&scores, &included, 0.0, 0.95).unwrap();
            if g.epsilon > eps {
                over += 1;
            }
        }
        assert!(over <= 4, "{over} of 40 audits exceeded the true epsilon");
    }
}
