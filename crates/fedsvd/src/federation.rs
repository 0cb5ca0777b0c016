//! The server loop: sampling, local training, aggregation, the strategy's
//! rule, privacy ledgers and evaluation (method.md §2).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use fedsvd_dp::{Accountant, AccountantKind, HistoryEntry, PrivacyLedger, calibrate_noise};
use fedsvd_model::{
    Batch, BertWeights, ComputeEngine, CpuEngine, DeviceInfo, GpuModel, HeadConfig, LoraConfig,
    LoraState, Model, Target,
};
use ndarray::Array2;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::adapters::{ClientUpdate, GlobalState, ModuleAdapter};
use crate::client::{
    ClientData, ClientStreams, Instrumentation, LocalReport, LocalTraining, Privatization,
    train_locally_on,
};
use crate::error::{Error, Result};
use crate::sampling::sample_clients;
use crate::strategy::{Method, Strategy};

/// Which number of steps a client's noise is calibrated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BudgetRule {
    /// T_k = R·τ: the client could be sampled every round. Its ε can never
    /// exceed the target.
    #[default]
    Conservative,
    /// T_k = ⌈R·τ·K'/K⌉, the expected participation (what the reference code
    /// used). An unlucky client can reach its budget early; it then stops
    /// training and the metrics say so.
    Expected,
}

/// The privacy target of every client.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// Target ε per client; `None` trains without DP.
    pub epsilon: Option<f64>,
    /// δ of the guarantee.
    pub delta: f64,
    /// Per-example clipping norm C (DP only).
    pub clip: f32,
    /// Accountant used to calibrate σ and to keep the ledgers.
    pub accountant: AccountantKind,
    /// Which step count σ is calibrated for.
    pub budget_rule: BudgetRule,
    /// Global gradient-norm clipping without DP (`None`: none).
    pub max_grad_norm: Option<f32>,
    /// Whether the run reports the statistics DP does not cover (the
    /// unnoised training loss, round timings, per-client example and label
    /// counts, per-client σ and ε, a majority baseline from training
    /// labels; `docs/privacy.md` lists them). `true` for research runs;
    /// `false` withholds every one of them from `metrics.jsonl`,
    /// `summary.json`, `data.json` and the console.
    #[serde(default = "report_unprotected_default")]
    pub report_unprotected: bool,
}

fn report_unprotected_default() -> bool {
    true
}

/// Local training hyper-parameters shared by every client.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Local steps τ per round.
    pub local_steps: usize,
    /// Expected logical batch size L.
    pub batch_size: usize,
    /// Physical batch cap.
    pub physical_batch_size: usize,
    /// SGD learning rate.
    pub lr: f32,
}

/// Everything that defines the federated schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// The method.
    pub method: Method,
    /// Rounds R.
    pub rounds: usize,
    /// Clients sampled per round K'.
    pub clients_per_round: usize,
    /// Evaluate every this many rounds, and after each of the last
    /// [`ENDPOINT_WINDOW`](crate::study::ENDPOINT_WINDOW) rounds (see
    /// [`FederationConfig::evaluates_after_round`]).
    pub eval_every: usize,
    /// Local training.
    pub training: TrainingConfig,
    /// Privacy target.
    pub privacy: PrivacyConfig,
    /// Seed of every random stream (`None`: the operating system's entropy,
    /// required for a real release).
    pub seed: Option<u64>,
}

impl FederationConfig {
    /// Whether the held-out set is evaluated after round `round` (counted
    /// from 1): every `eval_every` rounds, and after each of the last
    /// [`ENDPOINT_WINDOW`](crate::study::ENDPOINT_WINDOW) rounds, so that the
    /// endpoint a run reports is the mean over its last rounds rather than
    /// over rounds `eval_every` apart.
    pub fn evaluates_after_round(&self, round: usize) -> bool {
        round.is_multiple_of(self.eval_every) || round + crate::study::ENDPOINT_WINDOW > self.rounds
    }

    /// Checks every value, naming the offending key.
    pub fn validate(&self, clients: usize) -> Result<()> {
        self.method.validate()?;
        let positive = |key, value: usize| {
            if value == 0 {
                Err(Error::InvalidConfig {
                    key,
                    value: "0".into(),
                    allowed: "a whole number, at least 1",
                })
            } else {
                Ok(())
            }
        };
        positive("federation.rounds", self.rounds)?;
        positive("federation.clients_per_round", self.clients_per_round)?;
        positive("federation.eval_every", self.eval_every)?;
        positive("training.local_steps", self.training.local_steps)?;
        if self.clients_per_round > clients {
            return Err(Error::InvalidConfig {
                key: "federation.clients_per_round",
                value: self.clients_per_round.to_string(),
                allowed: "at most the number of clients",
            });
        }
        let p = &self.privacy;
        if let Some(eps) = p.epsilon
            && !(eps.is_finite() && eps > 0.0)
        {
            return Err(Error::InvalidConfig {
                key: "privacy.epsilon",
                value: eps.to_string(),
                allowed: "a positive finite ε, or null for no DP",
            });
        }
        if !(p.delta > 0.0 && p.delta < 1.0) {
            return Err(Error::InvalidConfig {
                key: "privacy.delta",
                value: p.delta.to_string(),
                allowed: "a probability strictly between 0 and 1",
            });
        }
        self.local_training(0.0).validate()
    }

    /// The local training of a client whose calibrated σ is `noise_multiplier`.
    pub fn local_training(&self, noise_multiplier: f64) -> LocalTraining {
        let privatization = match self.privacy.epsilon {
            Some(_) => Privatization::DpSgd {
                clip: self.privacy.clip,
                noise_multiplier,
            },
            None => Privatization::NonPrivate {
                max_grad_norm: self.privacy.max_grad_norm,
            },
        };
        LocalTraining {
            steps: self.training.local_steps,
            expected_batch: self.training.batch_size,
            physical_batch: self.training.physical_batch_size,
            lr: self.training.lr,
            privatization,
        }
    }

    /// Steps a client's noise is calibrated for under the budget rule.
    pub fn calibrated_steps(&self, clients: usize) -> u64 {
        let all = (self.rounds * self.training.local_steps) as u64;
        match self.privacy.budget_rule {
            BudgetRule::Conservative => all,
            BudgetRule::Expected => {
                let k = self.clients_per_round.min(clients) as u64;
                (all * k).div_ceil(clients.max(1) as u64).max(1)
            }
        }
    }
}

/// One client's privacy parameters and ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientPrivacy {
    /// Poisson sampling rate q_k = L / n_k.
    pub sample_rate: f64,
    /// Calibrated noise multiplier σ_k (0 without DP).
    pub noise_multiplier: f64,
    /// The ledger of steps really taken (`None` without DP).
    pub ledger: Option<PrivacyLedger>,
}

/// What one round did (one line of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    /// Rounds completed, counting this one (the first round is 1).
    pub round: usize,
    /// Method name.
    pub method: String,
    /// Clients the server sampled.
    pub sampled_clients: Vec<usize>,
    /// Sampled clients that trained and uploaded.
    pub trained_clients: Vec<usize>,
    /// Sampled clients that sat the round out because one more round would
    /// exceed their privacy budget.
    pub budget_exhausted_clients: Vec<usize>,
    /// Mean training loss over the examples the clients processed (not
    /// covered by DP: `None` unless `report_unprotected`).
    pub train_loss: Option<f64>,
    /// Held-out accuracy, when evaluated this round.
    pub eval_accuracy: Option<f64>,
    /// Held-out mean loss, when evaluated this round.
    pub eval_loss: Option<f64>,
    /// The largest ε any client has spent so far (`None` without DP).
    pub max_epsilon: Option<f64>,
    /// ε spent so far by every client (`None` entries without DP; empty
    /// unless `report_unprotected`, since it follows from n_k).
    #[serde(default)]
    pub client_epsilon: Vec<Option<f64>>,
    /// Bytes all clients uploaded this round (f32 parameters).
    pub bytes_uploaded: usize,
    /// Whether the server refactorized (FedSVD) or restarted (FLoRA) the
    /// adapters this round.
    pub refactorized: bool,
    /// Wall time of the server's refactorization or merge, seconds.
    pub server_seconds: f64,
    /// Wall time of the whole round, seconds (it reveals realized batch
    /// sizes: `None` unless `report_unprotected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_seconds: Option<f64>,
}

/// A federation in progress: the frozen model, the clients' data, the global
/// state and the ledgers. Advance it with [`Federation::run_round`].
#[derive(Debug)]
pub struct Federation {
    config: FederationConfig,
    base_weights: Arc<BertWeights>,
    model: Model,
    strategy: Box<dyn Strategy>,
    clients: Vec<ClientData>,
    test: ClientData,
    init_seed: u64,
    template: LoraState,
    state: GlobalState,
    privacy: Vec<ClientPrivacy>,
    next_round: usize,
    os_entropy: bool,
    /// The GPU engine when the run computes on one (`None`: the CPU). It
    /// holds the frozen weights uploaded once and serves every client in
    /// turn.
    gpu: Option<Mutex<GpuModel>>,
}

/// The state that makes a federation resumable: everything that changes
/// between rounds. Seeded runs derive every random stream from the seed and
/// the round, so no generator state needs saving; runs on operating-system
/// entropy draw fresh streams after a resume, as they would have anyway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FederationCheckpoint {
    /// The next round to run.
    pub next_round: usize,
    /// Seed of the adapters' and the frozen head's initialization (drawn from
    /// the operating system when the run has no seed).
    pub init_seed: u64,
    /// The global adapters.
    pub state: GlobalState,
    /// Every client's privacy parameters and ledger.
    pub privacy: Vec<ClientPrivacy>,
}

impl Federation {
    /// Sets up a federation: checks the configuration, calibrates every
    /// client's σ for the target (ε, δ) and initializes the adapters from the
    /// seed. `lora` decides the rank, targets, dropout and whether the head
    /// trains; which factors train follows the method.
    pub fn new(
        config: FederationConfig,
        weights: Arc<BertWeights>,
        lora: LoraConfig,
        head: HeadConfig,
        clients: Vec<ClientData>,
        test: ClientData,
    ) -> Result<Self> {
        config.validate(clients.len())?;
        if let Some(empty) = clients.iter().position(ClientData::is_empty) {
            return Err(Error::InvalidConfig {
                key: "partition",
                value: format!("client {empty} has no examples"),
                allowed: "every client needs at least one example",
            });
        }
        if test.is_empty() {
            return Err(Error::InvalidConfig {
                key: "data.test_fraction",
                value: "0 test examples".into(),
                allowed: "a held-out split with at least one example",
            });
        }
        let strategy = config.method.strategy();
        let lora = LoraConfig {
            train_a: strategy.trains_a(),
            train_b: true,
            ..lora
        };
        let model = Model::new(Arc::clone(&weights), lora.clone(), head)?;
        let os_entropy = config.seed.is_none();
        let init_seed = config.seed.unwrap_or_else(rand::random);
        let template = model.init_state(init_seed)?;
        let state = global_from_lora(&template, &lora);
        let privacy = calibrate_clients(&config, &clients)?;
        Ok(Self {
            config,
            base_weights: weights,
            model,
            strategy,
            clients,
            test,
            init_seed,
            template,
            state,
            privacy,
            next_round: 0,
            os_entropy,
            gpu: None,
        })
    }

    /// Moves training and evaluation to `choice` (see
    /// [`crate::DeviceChoice`]); returns what computes and, when `auto`
    /// chose the CPU, why. `precision` applies on a GPU.
    pub fn set_device(
        &mut self,
        choice: crate::DeviceChoice,
        precision: crate::PrecisionChoice,
    ) -> Result<crate::ResolvedDevice> {
        let (gpu, fallback_reason) = crate::device::resolve_gpu(choice, || {
            GpuModel::cuda(
                Arc::clone(self.model.weights()),
                self.model.lora_config().clone(),
                *self.model.head_config(),
                precision.precision(),
            )
        })?;
        self.gpu = gpu.map(Mutex::new);
        Ok(crate::ResolvedDevice {
            requested: choice,
            device: self.device(),
            fallback_reason,
        })
    }

    /// Trains and evaluates on `gpu` from now on: a CUDA engine, or one on
    /// the kernels' CPU reference backend (the same code path, which is how
    /// the device path is tested on machines without a GPU). Its model must
    /// have this federation's current frozen weights (the merged ones, for
    /// FLoRA and FedEx-LoRA: [`Federation::merged_weights`]), adapters and
    /// head; every method runs on it, those that train `A` included, and
    /// the federation hands it the new frozen weights after each merge.
    pub fn compute_on(&mut self, gpu: GpuModel) -> Result<DeviceInfo> {
        let m = gpu.model();
        if !Arc::ptr_eq(m.weights(), self.model.weights())
            || m.lora_config() != self.model.lora_config()
            || m.head_config() != self.model.head_config()
        {
            return Err(Error::Device {
                requested: "gpu engine",
                reason: "its model is not this federation's (weights, adapters or head differ)"
                    .into(),
            });
        }
        self.gpu = Some(Mutex::new(gpu));
        Ok(self.device())
    }

    /// The device that trains and evaluates.
    pub fn device(&self) -> DeviceInfo {
        match &self.gpu {
            Some(gpu) => match gpu.lock() {
                Ok(g) => g.device(),
                Err(p) => p.into_inner().device(),
            },
            None => CpuEngine(&self.model).device(),
        }
    }

    /// Runs `f` on the run's compute engine.
    fn with_engine<T>(&self, f: impl FnOnce(&mut dyn ComputeEngine) -> Result<T>) -> Result<T> {
        match &self.gpu {
            Some(gpu) => {
                // A panic while holding the lock leaves nothing half-written
                // on the host: the engine's state is re-uploaded per call.
                let mut g = gpu.lock().unwrap_or_else(|p| p.into_inner());
                f(&mut *g)
            }
            None => f(&mut CpuEngine(&self.model)),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &FederationConfig {
        &self.config
    }

    /// The global adapter state.
    pub fn state(&self) -> &GlobalState {
        &self.state
    }

    /// Every client's privacy parameters and ledger.
    pub fn privacy(&self) -> &[ClientPrivacy] {
        &self.privacy
    }

    /// The next round to run (rounds done so far).
    pub fn next_round(&self) -> usize {
        self.next_round
    }

    /// Whether every round has run.
    pub fn finished(&self) -> bool {
        self.next_round >= self.config.rounds
    }

    /// Whether the random streams come from the operating system (a run
    /// fit for release) rather than from a seed.
    pub fn uses_os_entropy(&self) -> bool {
        self.os_entropy
    }

    /// The global model as a [`LoraState`] (for evaluation and export).
    pub fn global_lora(&self) -> Result<LoraState> {
        let mut lora = self.template.clone();
        load_global(&self.state, &mut lora)?;
        Ok(lora)
    }

    /// A resumable snapshot of everything that changes between rounds.
    pub fn checkpoint(&self) -> FederationCheckpoint {
        FederationCheckpoint {
            next_round: self.next_round,
            init_seed: self.init_seed,
            state: self.state.clone(),
            privacy: self.privacy.clone(),
        }
    }

    /// Continues from a snapshot of a federation built with the same
    /// configuration and data.
    pub fn restore(&mut self, checkpoint: FederationCheckpoint) -> Result<()> {
        let same_shape = checkpoint.state.modules.len() == self.state.modules.len()
            && checkpoint
                .state
                .modules
                .iter()
                .zip(&self.state.modules)
                .all(|(a, b)| a.a.dim() == b.a.dim() && a.b.dim() == b.b.dim());
        if !same_shape || checkpoint.privacy.len() != self.clients.len() {
            return Err(Error::InvalidConfig {
                key: "resume",
                value: "checkpoint".into(),
                allowed: "a checkpoint of a run with the same model, adapters and clients",
            });
        }
        // The checkpoint's σ, q and budget are what the ledgers account; the
        // configuration and data of this process decide what training does.
        // They must agree, or the run would spend one privacy and report
        // another.
        for (k, (saved, now)) in checkpoint.privacy.iter().zip(&self.privacy).enumerate() {
            if let Some(change) = privacy_change(saved, now) {
                return Err(Error::ResumeMismatch { client: k, change });
            }
        }
        if checkpoint.init_seed != self.init_seed {
            self.template = self.model.init_state(checkpoint.init_seed)?;
            self.init_seed = checkpoint.init_seed;
        }
        self.next_round = checkpoint.next_round;
        self.state = checkpoint.state;
        self.privacy = checkpoint.privacy;
        self.refresh_base()?;
        Ok(())
    }

    /// Every client's local data, in client order.
    pub fn client_data(&self) -> &[ClientData] {
        &self.clients
    }

    /// The held-out split the federation evaluates on.
    pub fn test_data(&self) -> &ClientData {
        &self.test
    }

    /// Evaluates the global model on the held-out split.
    pub fn evaluate(&self) -> Result<fedsvd_model::EvalMetrics> {
        let lora = self.global_lora()?;
        let indices: Vec<usize> = (0..self.test.len()).collect();
        let batches = indices
            .chunks(self.config.training.physical_batch_size.max(1))
            .map(|chunk| self.test.batch(chunk))
            .collect::<Result<Vec<(Batch, Vec<usize>)>>>()?;
        self.with_engine(|engine| {
            Ok(engine.evaluate(&lora, &mut batches.iter().map(|(b, l)| (b, l.as_slice())))?)
        })
    }

    /// Runs the next round and returns its metrics.
    pub fn run_round(&mut self) -> Result<RoundMetrics> {
        let started = Instant::now();
        let round = self.next_round;
        if self.finished() {
            return Err(Error::InvalidConfig {
                key: "federation.rounds",
                value: self.config.rounds.to_string(),
                allowed: "no round beyond the configured number",
            });
        }
        let mut server_rng = self.stream(StreamKind::Server, round, 0);
        let sampled = sample_clients(
            self.clients.len(),
            self.config.clients_per_round,
            &mut server_rng,
        );
        let steps = self.config.training.local_steps as u64;
        let mut eligible = Vec::new();
        let mut skipped = Vec::new();
        for &k in &sampled {
            let p = &self.privacy[k];
            let exceeds = match &p.ledger {
                Some(ledger) => ledger.would_exceed(&[HistoryEntry::new(
                    p.noise_multiplier,
                    p.sample_rate,
                    steps,
                )?])?,
                None => false,
            };
            if exceeds {
                skipped.push(k);
            } else {
                eligible.push(k);
            }
        }

        let global = self.global_lora()?;
        // On the CPU, clients train in parallel; one GPU serves them in turn.
        let results: Vec<Result<(ClientUpdate, LocalReport)>> = if self.gpu.is_some() {
            eligible
                .iter()
                .map(|&k| self.train_client(k, round, &global))
                .collect()
        } else {
            eligible
                .par_iter()
                .map(|&k| self.train_client(k, round, &global))
                .collect()
        };
        let mut updates = Vec::with_capacity(results.len());
        let mut reports = Vec::with_capacity(results.len());
        for result in results {
            let (update, report) = result?;
            updates.push(update);
            reports.push(report);
        }

        // Charge before anything is published: the updates exist, so their
        // privacy is spent whatever the server step does with them.
        for &k in &eligible {
            let p = &mut self.privacy[k];
            if let Some(ledger) = p.ledger.as_mut() {
                ledger.record(HistoryEntry::new(p.noise_multiplier, p.sample_rate, steps)?);
            }
        }

        // The server step is all or nothing: it works on a copy, and the
        // global state (and the merged weights) change only when every part
        // of it succeeded. A failed round still leaves its charge recorded.
        let mut server_seconds = 0.0;
        let mut refactorized = false;
        if !updates.is_empty() {
            let mut next = self.state.clone();
            let step = self
                .strategy
                .apply(&mut next, &updates, round, &mut server_rng)?;
            server_seconds = step.seconds;
            refactorized = step.refactorized;
            if let Some(module) = next.modules.iter().find(|m| {
                m.a.iter()
                    .chain(m.b.iter())
                    .chain(m.base_delta.iter().flatten())
                    .any(|v| !v.is_finite())
            }) {
                return Err(Error::NonFinite {
                    context: format!(
                        "the server step of round {} left {} non-finite; the round is charged \
                         to its clients and its result is discarded",
                        round + 1,
                        module.name
                    ),
                });
            }
            if self.strategy.merges_into_base() {
                let started = Instant::now();
                let model = self.model_for(&next)?;
                // Before anything of the round is committed: a failed upload
                // leaves the engine on the old weights with the old state.
                self.engine_weights(model.weights())?;
                server_seconds += started.elapsed().as_secs_f64();
                self.model = model;
            }
            self.state = next;
        }
        self.next_round += 1;

        let seen: usize = reports.iter().map(|r| r.examples_seen).sum();
        let report = self.config.privacy.report_unprotected;
        let train_loss = (report && seen > 0).then(|| {
            reports
                .iter()
                .map(|r| r.mean_loss * r.examples_seen as f64)
                .sum::<f64>()
                / seen as f64
        });
        let evaluate = self.config.evaluates_after_round(self.next_round);
        let eval = if evaluate {
            Some(self.evaluate()?)
        } else {
            None
        };
        let client_epsilon = self
            .privacy
            .iter()
            .map(|p| {
                p.ledger
                    .as_ref()
                    .map(PrivacyLedger::spent_epsilon)
                    .transpose()
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let max_epsilon = client_epsilon
            .iter()
            .flatten()
            .copied()
            .fold(None, |m: Option<f64>, e| Some(m.map_or(e, |m| m.max(e))));
        Ok(RoundMetrics {
            round: round + 1,
            method: self.strategy.name().to_string(),
            sampled_clients: sampled,
            trained_clients: eligible,
            budget_exhausted_clients: skipped,
            train_loss,
            eval_accuracy: eval.map(|e| e.accuracy),
            eval_loss: eval.map(|e| e.loss),
            max_epsilon,
            client_epsilon: if report { client_epsilon } else { Vec::new() },
            bytes_uploaded: updates.len() * self.strategy.upload_parameters(&self.state) * 4,
            refactorized,
            server_seconds,
            round_seconds: report.then(|| started.elapsed().as_secs_f64()),
        })
    }

    /// The frozen weights clients train on: the base weights plus every
    /// merged delta (FLoRA, FedEx-LoRA); the base weights themselves for the
    /// other methods. One copy, shared by every client.
    pub fn merged_weights(&self) -> &Arc<BertWeights> {
        self.model.weights()
    }

    /// The model over the current frozen weights, with the method's adapters.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Rebuilds the shared frozen weights as W0 + Δ from the global state.
    /// Recomputed from the base (not accumulated in place) so a resumed run
    /// holds exactly the weights of an uninterrupted one.
    fn refresh_base(&mut self) -> Result<()> {
        let model = self.model_for(&self.state)?;
        self.engine_weights(model.weights())?;
        self.model = model;
        Ok(())
    }

    /// Hands `weights` (new merged frozen weights) to the GPU engine, if
    /// one computes; nothing is uploaded when they are the ones it holds.
    fn engine_weights(&self, weights: &Arc<BertWeights>) -> Result<()> {
        if let Some(gpu) = &self.gpu {
            let mut g = gpu.lock().unwrap_or_else(|p| p.into_inner());
            g.set_weights(Arc::clone(weights))?;
        }
        Ok(())
    }

    /// The model over `W0 + Δ` of `state` (the current one when nothing
    /// changes), built without touching `self`.
    fn model_for(&self, state: &GlobalState) -> Result<Model> {
        let weights = if state.base_delta_parameters() == 0 {
            Arc::clone(&self.base_weights)
        } else {
            Arc::new(weights_with_deltas(
                &self.base_weights,
                &self.template,
                state,
            )?)
        };
        if Arc::ptr_eq(&weights, self.model.weights()) {
            return Ok(self.model.clone());
        }
        Ok(Model::new(
            weights,
            self.model.lora_config().clone(),
            *self.model.head_config(),
        )?)
    }

    fn train_client(
        &self,
        k: usize,
        round: usize,
        global: &LoraState,
    ) -> Result<(ClientUpdate, LocalReport)> {
        let mut lora = global.clone();
        let mut streams = if self.os_entropy {
            ClientStreams::from_os()
        } else {
            let seed = derive_seed(self.config.seed.unwrap_or(0), StreamKind::Client, round, k);
            ClientStreams::from_seed(seed)
        };
        let training = self.config.local_training(self.privacy[k].noise_multiplier);
        let report = self.with_engine(|engine| {
            train_locally_on(
                engine,
                &mut lora,
                &self.clients[k],
                &training,
                &mut streams,
                &Instrumentation::default(),
            )
        })?;
        let update = update_from_lora(
            &lora,
            self.clients[k].len(),
            self.strategy.trains_a(),
            self.state.head.is_some(),
        )?;
        Ok((update, report))
    }

    fn stream(&self, kind: StreamKind, round: usize, index: usize) -> ChaCha20Rng {
        match self.config.seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(derive_seed(seed, kind, round, index)),
            None => ChaCha20Rng::from_os_rng(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum StreamKind {
    Server = 1,
    Client = 2,
}

/// A seed for one purpose, round and index, from the run seed (SplitMix64
/// finalizer over the combined words: distinct inputs give unrelated seeds).
pub(crate) fn derive_seed(seed: u64, kind: StreamKind, round: usize, index: usize) -> u64 {
    let mut z = seed;
    for word in [kind as u64, round as u64, index as u64] {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(word);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}

fn calibrate_clients(
    config: &FederationConfig,
    clients: &[ClientData],
) -> Result<Vec<ClientPrivacy>> {
    let steps = config.calibrated_steps(clients.len());
    let training = config.local_training(0.0);
    let accountant = Accountant::new(config.privacy.accountant);
    clients
        .iter()
        .enumerate()
        .map(|(k, data)| {
            let sample_rate = training.sample_rate(data.len());
            let Some(epsilon) = config.privacy.epsilon else {
                return Ok(ClientPrivacy {
                    sample_rate,
                    noise_multiplier: 0.0,
                    ledger: None,
                });
            };
            let calibration = calibrate_noise(
                &accountant,
                epsilon,
                sample_rate,
                steps,
                config.privacy.delta,
                fedsvd_dp::DEFAULT_EPSILON_TOLERANCE,
            )?;
            Ok(ClientPrivacy {
                sample_rate,
                noise_multiplier: calibration.noise_multiplier,
                ledger: Some(PrivacyLedger::new(
                    format!("client {k}"),
                    epsilon,
                    config.privacy.delta,
                    config.privacy.accountant,
                )?),
            })
        })
        .collect()
}

/// What differs between a client's privacy parameters in a checkpoint and
/// those this process calibrated from its configuration and data, if
/// anything that the ledger accounts for does.
fn privacy_change(saved: &ClientPrivacy, now: &ClientPrivacy) -> Option<String> {
    if saved.sample_rate != now.sample_rate {
        return Some(format!(
            "its sampling rate q = batch_size / n_k was {} when the ledger started and is {} now \
             (federation.training.batch_size or the client's data changed)",
            saved.sample_rate, now.sample_rate
        ));
    }
    match (&saved.ledger, &now.ledger) {
        (Some(_), None) => {
            return Some("the run was private and the configuration now trains without DP".into());
        }
        (None, Some(_)) => {
            return Some("the run was non-private and the configuration now asks for DP".into());
        }
        (Some(a), Some(b)) => {
            if a.budget_epsilon() != b.budget_epsilon() || a.delta() != b.delta() {
                return Some(format!(
                    "its budget was (epsilon {}, delta {}) and is (epsilon {}, delta {}) now",
                    a.budget_epsilon(),
                    a.delta(),
                    b.budget_epsilon(),
                    b.delta()
                ));
            }
            if a.accountant() != b.accountant() {
                return Some(format!(
                    "its accountant was {:?} and is {:?} now",
                    a.accountant(),
                    b.accountant()
                ));
            }
        }
        (None, None) => {}
    }
    if saved.noise_multiplier != now.noise_multiplier {
        return Some(format!(
            "its calibrated noise multiplier was {} and is {} now (rounds, local_steps, \
             budget_rule, clients_per_round or the privacy target changed)",
            saved.noise_multiplier, now.noise_multiplier
        ));
    }
    None
}

/// `W0 + Δ` for every module of `state` that carries a merged delta. The
/// modules follow the adapters of `template` (the model's fixed order).
pub fn weights_with_deltas(
    base: &BertWeights,
    template: &LoraState,
    state: &GlobalState,
) -> Result<BertWeights> {
    if state.modules.len() != template.adapters.len() {
        return Err(Error::ShapeMismatch {
            context: "global state: number of adapted modules".into(),
            expected: vec![template.adapters.len()],
            actual: vec![state.modules.len()],
        });
    }
    let mut weights = base.clone();
    let hidden = base.config.hidden_size;
    for (module, adapter) in state.modules.iter().zip(&template.adapters) {
        let Some(delta) = &module.base_delta else {
            continue;
        };
        let layer = weights
            .layers
            .get_mut(adapter.layer)
            .ok_or_else(|| Error::ShapeMismatch {
                context: format!("base delta of {}: layer index", module.name),
                expected: vec![base.layers.len()],
                actual: vec![adapter.layer],
            })?;
        // q, k and v are stored fused as rows [q; k; v] of one [3h, h] matrix.
        let (linear, first_row) = match adapter.target {
            Target::Query => (&mut layer.qkv, 0),
            Target::Key => (&mut layer.qkv, hidden),
            Target::Value => (&mut layer.qkv, 2 * hidden),
            Target::AttentionOutput => (&mut layer.attn_out, 0),
            Target::Intermediate => (&mut layer.intermediate, 0),
            Target::Output => (&mut layer.output, 0),
        };
        let (rows, cols) = delta.dim();
        if cols != linear.d_in || first_row + rows > linear.d_out || rows != adapter.d_out {
            return Err(Error::ShapeMismatch {
                context: format!("base delta of {}", module.name),
                expected: vec![adapter.d_out, linear.d_in],
                actual: vec![rows, cols],
            });
        }
        let block = &mut linear.weight[first_row * cols..(first_row + rows) * cols];
        for (w, d) in block.iter_mut().zip(delta.iter()) {
            *w += *d;
        }
    }
    Ok(weights)
}

/// The module name of adapter `i` of a state, as in reports and exports.
fn module_name(lora: &LoraState, i: usize) -> String {
    let ad = &lora.adapters[i];
    format!("layer.{}.{}", ad.layer, ad.target.name())
}

fn matrix(rows: usize, cols: usize, values: &[f32], what: &str) -> Result<Array2<f32>> {
    Array2::from_shape_vec((rows, cols), values.to_vec()).map_err(|_| Error::ShapeMismatch {
        context: what.to_string(),
        expected: vec![rows, cols],
        actual: vec![values.len()],
    })
}

/// The server's view of a model state.
pub fn global_from_lora(lora: &LoraState, config: &LoraConfig) -> GlobalState {
    let modules = lora
        .adapters
        .iter()
        .enumerate()
        .map(|(i, ad)| ModuleAdapter {
            name: module_name(lora, i),
            a: Array2::from_shape_vec((lora.rank, ad.d_in), ad.a.clone())
                .unwrap_or_else(|_| Array2::zeros((lora.rank, ad.d_in))),
            b: Array2::from_shape_vec((ad.d_out, lora.rank), ad.b.clone())
                .unwrap_or_else(|_| Array2::zeros((ad.d_out, lora.rank))),
            base_delta: None,
        })
        .collect();
    let head = config.train_head.then(|| {
        let mut h = lora.head_weight.clone();
        h.extend_from_slice(&lora.head_bias);
        h
    });
    GlobalState {
        modules,
        scale: config.scale(),
        head,
    }
}

/// Writes the global adapters (and trainable head) into a model state.
pub fn load_global(state: &GlobalState, lora: &mut LoraState) -> Result<()> {
    if state.modules.len() != lora.adapters.len() {
        return Err(Error::ShapeMismatch {
            context: "global state: number of adapted modules".into(),
            expected: vec![lora.adapters.len()],
            actual: vec![state.modules.len()],
        });
    }
    for (module, ad) in state.modules.iter().zip(lora.adapters.iter_mut()) {
        if module.a.dim() != (lora.rank, ad.d_in) || module.b.dim() != (ad.d_out, lora.rank) {
            return Err(Error::ShapeMismatch {
                context: format!("global state: {}", module.name),
                expected: vec![ad.d_out, lora.rank, ad.d_in],
                actual: vec![module.b.nrows(), module.a.nrows(), module.a.ncols()],
            });
        }
        ad.a.clear();
        ad.a.extend(module.a.iter().copied());
        ad.b.clear();
        ad.b.extend(module.b.iter().copied());
    }
    if let Some(head) = &state.head {
        let w = lora.head_weight.len();
        if head.len() != w + lora.head_bias.len() {
            return Err(Error::ShapeMismatch {
                context: "global state: classifier head".into(),
                expected: vec![w + lora.head_bias.len()],
                actual: vec![head.len()],
            });
        }
        lora.head_weight.copy_from_slice(&head[..w]);
        lora.head_bias.copy_from_slice(&head[w..]);
    }
    Ok(())
}

/// What a client uploads after training.
pub(crate) fn update_from_lora(
    lora: &LoraState,
    examples: usize,
    with_a: bool,
    with_head: bool,
) -> Result<ClientUpdate> {
    let mut b = Vec::with_capacity(lora.adapters.len());
    let mut a = Vec::with_capacity(lora.adapters.len());
    for (i, ad) in lora.adapters.iter().enumerate() {
        let name = module_name(lora, i);
        b.push(matrix(ad.d_out, lora.rank, &ad.b, &format!("B of {name}"))?);
        if with_a {
            a.push(matrix(lora.rank, ad.d_in, &ad.a, &format!("A of {name}"))?);
        }
    }
    let head = with_head.then(|| {
        let mut h = lora.head_weight.clone();
        h.extend_from_slice(&lora.head_bias);
        h
    });
    Ok(ClientUpdate {
        examples,
        b,
        a: with_a.then_some(a),
        head,
    })
}
