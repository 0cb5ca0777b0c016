//! Server strategies: what clients train and upload, and what the server does
//! after aggregating (method.md §3).

use std::fmt;
use std::time::Instant;

use ndarray::{Array2, ArrayView2, Zip};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::adapters::{ClientUpdate, GlobalState, check_factors, kaiming_uniform};
use crate::error::{Error, Result};

/// How FedSVD computes the SVD of each `B·A`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SvdSolver {
    /// The exact thin SVD through QR of both factors, O((d_out + d_in)·r²).
    #[default]
    Factored,
    /// Halko–Martinsson–Tropp randomized SVD of the product, applied through
    /// the factors (oversampling 10, 2 power iterations, seeded per round).
    Randomized,
    /// The dense SVD of the d_out × d_in product (the reference code's way).
    Dense,
}

/// The federated method, as written in a run's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "name", deny_unknown_fields)]
pub enum Method {
    /// FedAvg-LoRA: clients train A and B; the server averages both.
    Fedavg,
    /// FFA-LoRA: clients train B only; A stays at its initialization forever.
    Ffa,
    /// FedSVD: clients train B only; the server averages B and refactorizes
    /// B·A by SVD on its schedule, so A gets orthonormal rows.
    Fedsvd {
        /// Refactorize after round i when (i + 1) is a multiple of this.
        svd_period: usize,
        /// ... and i + 1 > this.
        svd_warmup: usize,
        /// Which SVD computes the refactorization.
        solver: SvdSolver,
    },
    /// FLoRA: clients train A and B; the server folds Σ p_k s·B_k A_k into
    /// the base weights and restarts the adapters.
    Flora,
    /// FedEx-LoRA: like FedAvg, plus a base-weight correction that makes the
    /// global product exactly Σ p_k B_k A_k.
    Fedex,
}

impl Method {
    /// FedSVD with the paper's defaults: refactorize after every round with
    /// the exact factored SVD.
    pub fn fedsvd() -> Self {
        Method::Fedsvd {
            svd_period: 1,
            svd_warmup: 0,
            solver: SvdSolver::Factored,
        }
    }

    /// The method's short name as used on the command line and in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Fedavg => "fedavg",
            Method::Ffa => "ffa",
            Method::Fedsvd { .. } => "fedsvd",
            Method::Flora => "flora",
            Method::Fedex => "fedex",
        }
    }

    /// Parses a short name (`fedsvd`, `ffa`, `fedavg`, `flora`, `fedex`);
    /// FedSVD gets its defaults.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "fedavg" => Method::Fedavg,
            "ffa" => Method::Ffa,
            "fedsvd" => Method::fedsvd(),
            "flora" => Method::Flora,
            "fedex" => Method::Fedex,
            other => {
                return Err(Error::InvalidConfig {
                    key: "method",
                    value: other.to_string(),
                    allowed: "one of fedsvd, ffa, fedavg, flora, fedex",
                });
            }
        })
    }

    /// Checks the method's own options.
    pub fn validate(&self) -> Result<()> {
        if let Method::Fedsvd { svd_period, .. } = self
            && *svd_period == 0
        {
            return Err(Error::InvalidConfig {
                key: "method.svd_period",
                value: "0".to_string(),
                allowed: "a whole number of rounds, at least 1",
            });
        }
        Ok(())
    }

    /// The server rule of this method.
    pub fn strategy(&self) -> Box<dyn Strategy> {
        match *self {
            Method::Fedavg => Box::new(FedAvg),
            Method::Ffa => Box::new(Ffa),
            Method::Fedsvd {
                svd_period,
                svd_warmup,
                solver,
            } => Box::new(FedSvd {
                svd_period: svd_period.max(1),
                svd_warmup,
                solver,
            }),
            Method::Flora => Box::new(Flora),
            Method::Fedex => Box::new(FedEx),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the server did after aggregating one round.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ServerStep {
    /// Whether the adapters were refactorized (FedSVD) or restarted (FLoRA).
    pub refactorized: bool,
    /// Wall time of the refactorization / merge, in seconds.
    pub seconds: f64,
}

/// A federated method's contract: what its clients train and upload, and the
/// server's rule after aggregation. The server calls [`Strategy::apply`]
/// once per round with the round's updates in a fixed (client index) order.
pub trait Strategy: fmt::Debug + Send + Sync {
    /// The method's short name.
    fn name(&self) -> &'static str;

    /// Whether clients train (and upload) the `A` factors; `B` is always
    /// trained.
    fn trains_a(&self) -> bool;

    /// Whether the server merges updates into base weights that it must ship
    /// back to clients.
    fn merges_into_base(&self) -> bool {
        false
    }

    /// Parameters one client uploads per round.
    fn upload_parameters(&self, state: &GlobalState) -> usize {
        let a = if self.trains_a() {
            state.a_parameters()
        } else {
            0
        };
        state.b_parameters() + a + state.head_parameters()
    }

    /// Parameters the server sends one sampled client per round: the
    /// adapters, the head and, for merging methods, the base-weight deltas.
    fn download_parameters(&self, state: &GlobalState) -> usize {
        state.a_parameters()
            + state.b_parameters()
            + state.head_parameters()
            + state.base_delta_parameters()
    }

    /// Aggregates the round's updates into `state` (weights n_k / Σ n_j) and
    /// applies the method's post-aggregation rule. `round` counts from 0;
    /// `rng` is the server's stream (FLoRA re-draws A from it).
    fn apply(
        &self,
        state: &mut GlobalState,
        updates: &[ClientUpdate],
        round: usize,
        rng: &mut dyn RngCore,
    ) -> Result<ServerStep>;
}

/// Aggregation weights p_k = n_k / Σ n_j, checking the updates' shapes.
fn validate_updates(
    state: &GlobalState,
    updates: &[ClientUpdate],
    needs_a: bool,
    method: &'static str,
) -> Result<Vec<f64>> {
    let total: usize = updates.iter().map(|u| u.examples).sum();
    if updates.is_empty() || total == 0 {
        return Err(Error::InvalidConfig {
            key: "round updates",
            value: format!("{} updates with {total} examples", updates.len()),
            allowed: "at least one update from a client with at least one example",
        });
    }
    for (client, update) in updates.iter().enumerate() {
        check_factors(state, &update.b, "B", client, |m| (m.d_out(), m.rank()))?;
        if needs_a {
            let a = update.a.as_ref().ok_or(Error::MissingUpload {
                client,
                what: "A factors",
                method,
            })?;
            check_factors(state, a, "A", client, |m| (m.rank(), m.d_in()))?;
        }
        match (&state.head, &update.head) {
            (None, _) => {}
            (Some(_), None) => {
                return Err(Error::MissingUpload {
                    client,
                    what: "classifier head",
                    method,
                });
            }
            (Some(global), Some(local)) if global.len() != local.len() => {
                return Err(Error::ShapeMismatch {
                    context: format!("client update {client}: classifier head"),
                    expected: vec![global.len()],
                    actual: vec![local.len()],
                });
            }
            (Some(_), Some(local)) if local.iter().any(|x| !x.is_finite()) => {
                return Err(Error::NonFinite {
                    context: format!("client update {client}: classifier head"),
                });
            }
            _ => {}
        }
    }
    Ok(updates
        .iter()
        .map(|u| u.examples as f64 / total as f64)
        .collect())
}

/// Σ_k p_k X_k, accumulated in f64 in client order (deterministic).
fn weighted_mean<'a>(
    weights: &[f64],
    factors: impl Iterator<Item = ArrayView2<'a, f32>>,
) -> Array2<f32> {
    let mut acc: Option<Array2<f64>> = None;
    for (&w, x) in weights.iter().zip(factors) {
        let acc = acc.get_or_insert_with(|| Array2::zeros(x.dim()));
        Zip::from(acc)
            .and(&x)
            .for_each(|s, &v| *s += w * f64::from(v));
    }
    acc.map(|a| a.mapv(|v| v as f32)).unwrap_or_default()
}

fn average_b(state: &mut GlobalState, updates: &[ClientUpdate], weights: &[f64]) {
    for (index, module) in state.modules.iter_mut().enumerate() {
        module.b = weighted_mean(weights, updates.iter().map(|u| u.b[index].view()));
    }
}

/// Only called after `validate_updates(.., needs_a = true, ..)`.
fn average_a(state: &mut GlobalState, updates: &[ClientUpdate], weights: &[f64]) {
    for (index, module) in state.modules.iter_mut().enumerate() {
        module.a = weighted_mean(
            weights,
            updates
                .iter()
                .filter_map(|u| u.a.as_ref().map(|a| a[index].view())),
        );
    }
}

fn average_head(state: &mut GlobalState, updates: &[ClientUpdate], weights: &[f64]) {
    if let Some(head) = state.head.as_mut() {
        let mut acc = vec![0.0f64; head.len()];
        for (&w, update) in weights.iter().zip(updates) {
            if let Some(local) = &update.head {
                for (s, &v) in acc.iter_mut().zip(local) {
                    *s += w * f64::from(v);
                }
            }
        }
        for (h, s) in head.iter_mut().zip(acc) {
            *h = s as f32;
        }
    }
}

/// Σ_k p_k B_k A_k of one module, accumulated in f64.
fn mean_product(updates: &[ClientUpdate], weights: &[f64], index: usize) -> Array2<f64> {
    let mut acc: Option<Array2<f64>> = None;
    for (&w, update) in weights.iter().zip(updates) {
        let b = update.b[index].mapv(f64::from);
        let a = update
            .a
            .as_ref()
            .map(|a| a[index].mapv(f64::from))
            .unwrap_or_default();
        let product = b.dot(&a);
        match acc.as_mut() {
            None => acc = Some(product * w),
            Some(acc) => acc.scaled_add(w, &product),
        }
    }
    acc.unwrap_or_default()
}

fn add_to_base_delta(delta: &mut Option<Array2<f32>>, change: &Array2<f64>) {
    match delta {
        Some(d) => Zip::from(d).and(change).for_each(|d, &c| *d += c as f32),
        None => *delta = Some(change.mapv(|c| c as f32)),
    }
}

/// FedAvg-LoRA.
#[derive(Debug, Clone, Copy)]
pub struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }
    fn trains_a(&self) -> bool {
        true
    }
    fn apply(
        &self,
        state: &mut GlobalState,
        updates: &[ClientUpdate],
        _round: usize,
        _rng: &mut dyn RngCore,
    ) -> Result<ServerStep> {
        let weights = validate_updates(state, updates, true, self.name())?;
        average_a(state, updates, &weights);
        average_b(state, updates, &weights);
        average_head(state, updates, &weights);
        Ok(ServerStep::default())
    }
}

/// FFA-LoRA.
#[derive(Debug, Clone, Copy)]
pub struct Ffa;

impl Strategy for Ffa {
    fn name(&self) -> &'static str {
        "ffa"
    }
    fn trains_a(&self) -> bool {
        false
    }
    fn apply(
        &self,
        state: &mut GlobalState,
        updates: &[ClientUpdate],
        _round: usize,
        _rng: &mut dyn RngCore,
    ) -> Result<ServerStep> {
        let weights = validate_updates(state, updates, false, self.name())?;
        average_b(state, updates, &weights);
        average_head(state, updates, &weights);
        Ok(ServerStep::default())
    }
}

/// FedSVD: FFA-LoRA's aggregation plus the SVD refactorization on schedule.
#[derive(Debug, Clone, Copy)]
pub struct FedSvd {
    /// Refactorize after round i when (i + 1) % svd_period == 0 ...
    pub svd_period: usize,
    /// ... and i + 1 > svd_warmup.
    pub svd_warmup: usize,
    /// The SVD used.
    pub solver: SvdSolver,
}

impl FedSvd {
    /// Whether the server refactorizes after round `round` (from 0).
    pub fn refactorizes_after(&self, round: usize) -> bool {
        let done = round + 1;
        done.is_multiple_of(self.svd_period.max(1)) && done > self.svd_warmup
    }
}

/// Refactorizes every module of `state` in f64 (the server's precision) and
/// stores the f32 result. Modules run in parallel; each result depends only
/// on its module, so the thread count does not matter.
pub fn refactorize_state(state: &mut GlobalState, solver: SvdSolver, seed: u64) -> Result<()> {
    let widened = |state: &GlobalState| -> Vec<(Array2<f64>, Array2<f64>)> {
        state
            .modules
            .iter()
            .map(|m| (m.b.mapv(f64::from), m.a.mapv(f64::from)))
            .collect()
    };
    let results: Vec<(Array2<f64>, Array2<f64>)> = match solver {
        SvdSolver::Factored => {
            // In place on the f32 factors: widened to f64 inside, rounded
            // once, nothing allocated per module.
            let mut views: Vec<_> = state
                .modules
                .iter_mut()
                .map(|m| (m.b.view_mut(), m.a.view_mut()))
                .collect();
            fedsvd_linalg::refactorize_many_in_place(&mut views)?;
            return Ok(());
        }
        SvdSolver::Dense => widened(state)
            .iter()
            .map(|(b, a)| fedsvd_linalg::refactorize_dense(b.view(), a.view()))
            .collect::<std::result::Result<_, _>>()?,
        SvdSolver::Randomized => widened(state)
            .iter()
            .enumerate()
            .map(|(index, (b, a))| {
                let params = fedsvd_linalg::RsvdParams {
                    seed: seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    ..fedsvd_linalg::RsvdParams::new(a.nrows())
                };
                fedsvd_linalg::refactorize_randomized(b.view(), a.view(), &params)
            })
            .collect::<std::result::Result<_, _>>()?,
    };
    for (module, (b_new, a_new)) in state.modules.iter_mut().zip(results) {
        module.b = b_new.mapv(|v| v as f32);
        module.a = a_new.mapv(|v| v as f32);
    }
    Ok(())
}

impl Strategy for FedSvd {
    fn name(&self) -> &'static str {
        "fedsvd"
    }
    fn trains_a(&self) -> bool {
        false
    }
    fn apply(
        &self,
        state: &mut GlobalState,
        updates: &[ClientUpdate],
        round: usize,
        rng: &mut dyn RngCore,
    ) -> Result<ServerStep> {
        let weights = validate_updates(state, updates, false, self.name())?;
        average_b(state, updates, &weights);
        average_head(state, updates, &weights);
        if !self.refactorizes_after(round) {
            return Ok(ServerStep::default());
        }
        let started = Instant::now();
        refactorize_state(state, self.solver, rng.next_u64())?;
        Ok(ServerStep {
            refactorized: true,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// FLoRA.
#[derive(Debug, Clone, Copy)]
pub struct Flora;

impl Strategy for Flora {
    fn name(&self) -> &'static str {
        "flora"
    }
    fn trains_a(&self) -> bool {
        true
    }
    fn merges_into_base(&self) -> bool {
        true
    }
    fn apply(
        &self,
        state: &mut GlobalState,
        updates: &[ClientUpdate],
        _round: usize,
        rng: &mut dyn RngCore,
    ) -> Result<ServerStep> {
        let weights = validate_updates(state, updates, true, self.name())?;
        let started = Instant::now();
        let scale = f64::from(state.scale);
        for (index, module) in state.modules.iter_mut().enumerate() {
            let merged = mean_product(updates, &weights, index) * scale;
            add_to_base_delta(&mut module.base_delta, &merged);
            let (rank, d_in) = module.a.dim();
            module.a = kaiming_uniform(rank, d_in, rng);
            module.b.fill(0.0);
        }
        average_head(state, updates, &weights);
        Ok(ServerStep {
            refactorized: true,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// FedEx-LoRA.
#[derive(Debug, Clone, Copy)]
pub struct FedEx;

impl Strategy for FedEx {
    fn name(&self) -> &'static str {
        "fedex"
    }
    fn trains_a(&self) -> bool {
        true
    }
    fn merges_into_base(&self) -> bool {
        true
    }
    fn apply(
        &self,
        state: &mut GlobalState,
        updates: &[ClientUpdate],
        _round: usize,
        _rng: &mut dyn RngCore,
    ) -> Result<ServerStep> {
        let weights = validate_updates(state, updates, true, self.name())?;
        let started = Instant::now();
        let exact: Vec<Array2<f64>> = (0..state.modules.len())
            .map(|index| mean_product(updates, &weights, index))
            .collect();
        average_a(state, updates, &weights);
        average_b(state, updates, &weights);
        let scale = f64::from(state.scale);
        for (module, exact) in state.modules.iter_mut().zip(exact) {
            let averaged = module.b.mapv(f64::from).dot(&module.a.mapv(f64::from));
            let correction = (exact - averaged) * scale;
            add_to_base_delta(&mut module.base_delta, &correction);
        }
        average_head(state, updates, &weights);
        Ok(ServerStep {
            refactorized: false,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
