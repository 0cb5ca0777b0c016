//! A federated round split into the halves that run in separate processes
//! (a deployment on Flower, issue 22): the server's sampling, step and
//! evaluation ([`Server`]), and one client's local round with its own
//! privacy ledger ([`Participant`]).
//!
//! Both halves derive every random stream exactly as [`Federation`] does:
//! the server's stream of round `i` samples the clients and then feeds the
//! strategy (FLoRA redraws `A` from it), and client `k` trains round `i`
//! with the stream the simulation gives client `k` in round `i`. A seeded
//! deployment whose client `k` holds the simulation's partition `k`
//! therefore computes what `fedsvd run` computes, bit for bit
//! (`the_split_round_is_the_simulated_round` below).
//!
//! [`Federation`]: crate::Federation

use std::sync::Arc;
use std::time::Instant;

use fedsvd_dp::{
    Accountant, DEFAULT_EPSILON_TOLERANCE, HistoryEntry, PrivacyLedger, calibrate_noise,
};
use fedsvd_model::{Batch, BertWeights, EvalMetrics, HeadConfig, LoraConfig, LoraState, Model};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::adapters::{ClientUpdate, GlobalState};
use crate::client::{ClientData, ClientStreams, LocalReport, train_locally};
use crate::error::{Error, Result};
use crate::federation::{
    ClientPrivacy, FederationCheckpoint, FederationConfig, StreamKind, derive_seed,
    global_from_lora, load_global, update_from_lora, weights_with_deltas,
};
use crate::sampling::sample_clients;
use crate::strategy::{ServerStep, Strategy};

/// The clients the simulation samples in `round` (from 0) among `clients`,
/// `per_round` of them, for the run seed `seed`; `None` draws from the
/// operating system. The same draw as [`crate::Federation::run_round`].
pub fn sampled_clients(
    clients: usize,
    per_round: usize,
    seed: Option<u64>,
    round: usize,
) -> Vec<usize> {
    sample_clients(clients, per_round, &mut server_stream(seed, round))
}

/// The nodes that serve the sampled client indices: `nodes` lists every
/// connected node as `(node id, partition id)`, and client `k` is the node
/// whose partition id is `k` (so its noise stream is the simulation's
/// client `k`'s). Fails naming a sampled partition that no node serves, or
/// a partition that two nodes claim.
pub fn nodes_for_clients(sampled: &[usize], nodes: &[(u64, usize)]) -> Result<Vec<u64>> {
    for (i, &(node, partition)) in nodes.iter().enumerate() {
        if let Some(&(other, _)) = nodes[..i].iter().find(|(_, p)| *p == partition) {
            return Err(Error::InvalidConfig {
                key: "partition-id",
                value: format!("{partition}, claimed by nodes {other} and {node}"),
                allowed: "each partition id served by exactly one node",
            });
        }
    }
    sampled
        .iter()
        .map(|&k| {
            nodes
                .iter()
                .find(|(_, p)| *p == k)
                .map(|&(node, _)| node)
                .ok_or_else(|| Error::InvalidConfig {
                    key: "partition-id",
                    value: format!("{k} was sampled, but no connected node serves it"),
                    allowed: "one node for every partition id 0..data.clients",
                })
        })
        .collect()
}

fn server_stream(seed: Option<u64>, round: usize) -> ChaCha20Rng {
    match seed {
        Some(seed) => ChaCha20Rng::seed_from_u64(derive_seed(seed, StreamKind::Server, round, 0)),
        None => ChaCha20Rng::from_os_rng(),
    }
}

/// The model of a method over `W0 + Δ` of `state` (the base weights when
/// nothing is merged).
fn model_over(
    base: &Arc<BertWeights>,
    model: &Model,
    template: &LoraState,
    state: &GlobalState,
) -> Result<Model> {
    if state.base_delta_parameters() == 0 {
        if Arc::ptr_eq(base, model.weights()) {
            return Ok(model.clone());
        }
        return Ok(Model::new(
            Arc::clone(base),
            model.lora_config().clone(),
            *model.head_config(),
        )?);
    }
    let weights = Arc::new(weights_with_deltas(base, template, state)?);
    Ok(Model::new(
        weights,
        model.lora_config().clone(),
        *model.head_config(),
    )?)
}

/// The method's model and the initial adapters for a seed, as
/// [`crate::Federation::new`] builds them.
fn method_model(
    config: &FederationConfig,
    weights: &Arc<BertWeights>,
    lora: LoraConfig,
    head: HeadConfig,
    init_seed: u64,
) -> Result<(Box<dyn Strategy>, Model, LoraState)> {
    let strategy = config.method.strategy();
    let lora = LoraConfig {
        train_a: strategy.trains_a(),
        train_b: true,
        ..lora
    };
    let model = Model::new(Arc::clone(weights), lora, head)?;
    let template = model.init_state(init_seed)?;
    Ok((strategy, model, template))
}

/// The server half of a federation: the global state, the strategy, the
/// held-out split and the merged weights. It holds no client data and no
/// ledger; clients train elsewhere and send their [`ClientUpdate`]s.
#[derive(Debug)]
pub struct Server {
    config: FederationConfig,
    clients: usize,
    base_weights: Arc<BertWeights>,
    model: Model,
    strategy: Box<dyn Strategy>,
    template: LoraState,
    init_seed: u64,
    state: GlobalState,
    test: ClientData,
    next_round: usize,
}

impl Server {
    /// Sets up the server of a federation of `clients` clients: checks the
    /// configuration and initializes the adapters from the run seed (or
    /// from `init_seed`, which an unseeded run draws once and sends its
    /// clients; `None` with an unseeded run draws it here).
    pub fn new(
        config: FederationConfig,
        weights: Arc<BertWeights>,
        lora: LoraConfig,
        head: HeadConfig,
        clients: usize,
        test: ClientData,
        init_seed: Option<u64>,
    ) -> Result<Self> {
        config.validate(clients)?;
        if test.is_empty() {
            return Err(Error::InvalidConfig {
                key: "data.test_fraction",
                value: "0 test examples".into(),
                allowed: "a held-out split with at least one example",
            });
        }
        let init_seed = init_seed
            .or(config.seed)
            .unwrap_or_else(rand::random::<u64>);
        let (strategy, model, template) = method_model(&config, &weights, lora, head, init_seed)?;
        let state = global_from_lora(&template, model.lora_config());
        Ok(Self {
            config,
            clients,
            base_weights: weights,
            model,
            strategy,
            template,
            init_seed,
            state,
            test,
            next_round: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FederationConfig {
        &self.config
    }

    /// The number of held-out examples `evaluate` scores.
    pub fn test_examples(&self) -> usize {
        self.test.len()
    }

    /// The number of clients K.
    pub fn clients(&self) -> usize {
        self.clients
    }

    /// The seed of the adapters' and the frozen head's initialization; every
    /// client must build its model from the same one.
    pub fn init_seed(&self) -> u64 {
        self.init_seed
    }

    /// The global adapter state (what the server broadcasts).
    pub fn state(&self) -> &GlobalState {
        &self.state
    }

    /// The next round to run (rounds done so far).
    pub fn next_round(&self) -> usize {
        self.next_round
    }

    /// Whether every round has run.
    pub fn finished(&self) -> bool {
        self.next_round >= self.config.rounds
    }

    /// The model over the current frozen weights (merged deltas included).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The global model as a [`LoraState`] (for evaluation and export).
    pub fn global_lora(&self) -> Result<LoraState> {
        let mut lora = self.template.clone();
        load_global(&self.state, &mut lora)?;
        Ok(lora)
    }

    /// The clients sampled in `round` (from 0), as the simulation samples
    /// them.
    pub fn sample(&self, round: usize) -> Vec<usize> {
        sampled_clients(
            self.clients,
            self.config.clients_per_round,
            self.config.seed,
            round,
        )
    }

    /// Whether the simulation evaluates after `round` (from 0).
    pub fn evaluates_after(&self, round: usize) -> bool {
        self.config.evaluates_after_round(round + 1)
    }

    /// Parameters one client uploads per round under this method.
    pub fn upload_parameters(&self) -> usize {
        self.strategy.upload_parameters(&self.state)
    }

    /// The server step of `round` (from 0, the next round): aggregates the
    /// updates (`(client index, update)`, in any order; processed in client
    /// order as the simulation does) with weights n_k / Σ n_j and applies
    /// the method's rule, drawing from the round's server stream after the
    /// sampling as the simulation does. All or nothing: on error the global
    /// state is unchanged. A round without updates (every sampled client at
    /// its budget) changes nothing but still counts.
    pub fn step(
        &mut self,
        round: usize,
        updates: Vec<(usize, ClientUpdate)>,
    ) -> Result<ServerStep> {
        if round != self.next_round || self.finished() {
            return Err(Error::InvalidConfig {
                key: "round",
                value: round.to_string(),
                allowed: "the server's next round, within federation.rounds",
            });
        }
        let mut rng = server_stream(self.config.seed, round);
        let sampled = sample_clients(self.clients, self.config.clients_per_round, &mut rng);
        let mut updates = updates;
        updates.sort_by_key(|(k, _)| *k);
        for (i, (k, _)) in updates.iter().enumerate() {
            if !sampled.contains(k) || (i > 0 && updates[i - 1].0 == *k) {
                return Err(Error::InvalidConfig {
                    key: "update",
                    value: format!("an update from client {k} in round {}", round + 1),
                    allowed: "one update from each client sampled this round",
                });
            }
        }
        let updates: Vec<ClientUpdate> = updates.into_iter().map(|(_, u)| u).collect();
        let mut step = ServerStep::default();
        if !updates.is_empty() {
            let mut next = self.state.clone();
            step = self.strategy.apply(&mut next, &updates, round, &mut rng)?;
            if let Some(module) = next.modules.iter().find(|m| {
                m.a.iter()
                    .chain(m.b.iter())
                    .chain(m.base_delta.iter().flatten())
                    .any(|v| !v.is_finite())
            }) {
                return Err(Error::NonFinite {
                    context: format!(
                        "the server step of round {} left {} non-finite; its result is discarded",
                        round + 1,
                        module.name
                    ),
                });
            }
            if self.strategy.merges_into_base() {
                let started = Instant::now();
                self.model = model_over(&self.base_weights, &self.model, &self.template, &next)?;
                step.seconds += started.elapsed().as_secs_f64();
            }
            self.state = next;
        }
        self.next_round = round + 1;
        Ok(step)
    }

    /// Evaluates the global model on the held-out split, as the simulation
    /// does.
    pub fn evaluate(&self) -> Result<EvalMetrics> {
        let lora = self.global_lora()?;
        let indices: Vec<usize> = (0..self.test.len()).collect();
        let batches = indices
            .chunks(self.config.training.physical_batch_size.max(1))
            .map(|chunk| self.test.batch(chunk))
            .collect::<Result<Vec<(Batch, Vec<usize>)>>>()?;
        Ok(self
            .model
            .evaluate(&lora, batches.iter().map(|(b, l)| (b, l.as_slice())))?)
    }

    /// A resumable snapshot (the ledgers live on the clients: `privacy` is
    /// empty).
    pub fn checkpoint(&self) -> FederationCheckpoint {
        FederationCheckpoint {
            next_round: self.next_round,
            init_seed: self.init_seed,
            state: self.state.clone(),
            privacy: Vec::new(),
        }
    }

    /// Continues from a snapshot of a server with the same configuration.
    pub fn restore(&mut self, checkpoint: FederationCheckpoint) -> Result<()> {
        let same_shape = checkpoint.state.modules.len() == self.state.modules.len()
            && checkpoint
                .state
                .modules
                .iter()
                .zip(&self.state.modules)
                .all(|(a, b)| a.a.dim() == b.a.dim() && a.b.dim() == b.b.dim());
        if !same_shape || checkpoint.next_round > self.config.rounds {
            return Err(Error::InvalidConfig {
                key: "resume",
                value: "checkpoint".into(),
                allowed: "a checkpoint of a run with the same model, adapters and rounds",
            });
        }
        if checkpoint.init_seed != self.init_seed {
            self.template = self.model.init_state(checkpoint.init_seed)?;
            self.init_seed = checkpoint.init_seed;
        }
        self.model = model_over(
            &self.base_weights,
            &self.model,
            &self.template,
            &checkpoint.state,
        )?;
        self.state = checkpoint.state;
        self.next_round = checkpoint.next_round;
        Ok(())
    }
}

/// What a client's round came to.
#[derive(Debug, Clone, PartialEq)]
pub enum RoundOutcome {
    /// The client trained and its ledger is charged; the update is what it
    /// sends.
    Trained {
        /// What the method shares (B only for FedSVD and FFA-LoRA).
        update: ClientUpdate,
        /// The local round's report (its loss is not covered by DP).
        report: LocalReport,
    },
    /// One more round would exceed the client's budget: it did not train.
    BudgetExhausted {
        /// ε spent so far.
        spent: f64,
        /// ε the round would have brought it to.
        would_reach: f64,
    },
}

/// One client of a federation, running where its data lives: its data, its
/// calibrated σ and its ledger, and the method's model. It trains exactly
/// as the simulation trains client `index`.
#[derive(Debug)]
pub struct Participant {
    config: FederationConfig,
    index: usize,
    data: ClientData,
    base_weights: Arc<BertWeights>,
    model: Model,
    template: LoraState,
    trains_a: bool,
    privacy: ClientPrivacy,
}

impl Participant {
    /// Sets up client `index` of `clients`: checks the configuration,
    /// builds the method's model with the server's `init_seed` and
    /// calibrates σ for the target (ε, δ) from its own n_k, as the
    /// simulation calibrates every client.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: FederationConfig,
        weights: Arc<BertWeights>,
        lora: LoraConfig,
        head: HeadConfig,
        clients: usize,
        index: usize,
        data: ClientData,
        init_seed: u64,
    ) -> Result<Self> {
        config.validate(clients)?;
        if index >= clients {
            return Err(Error::InvalidConfig {
                key: "partition-id",
                value: index.to_string(),
                allowed: "a client index below data.clients",
            });
        }
        if data.is_empty() {
            return Err(Error::InvalidConfig {
                key: "partition",
                value: format!("client {index} has no examples"),
                allowed: "every client needs at least one example",
            });
        }
        let (strategy, model, template) = method_model(&config, &weights, lora, head, init_seed)?;
        let privacy = calibrate(&config, clients, index, data.len())?;
        Ok(Self {
            config,
            index,
            data,
            base_weights: weights,
            model,
            template,
            trains_a: strategy.trains_a(),
            privacy,
        })
    }

    /// The client's index k (its partition id).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The number of local examples n_k.
    pub fn examples(&self) -> usize {
        self.data.len()
    }

    /// The client's sampling rate, σ and ledger.
    pub fn privacy(&self) -> &ClientPrivacy {
        &self.privacy
    }

    /// ε spent so far (`None` without DP).
    pub fn spent_epsilon(&self) -> Result<Option<f64>> {
        Ok(self
            .privacy
            .ledger
            .as_ref()
            .map(PrivacyLedger::spent_epsilon)
            .transpose()?)
    }

    /// The global state this client's model starts from (the initial
    /// adapters of the server's seed).
    pub fn initial_state(&self) -> GlobalState {
        global_from_lora(&self.template, self.model.lora_config())
    }

    /// Replaces the ledger with a saved one (a restarted client process),
    /// refusing one whose sampling rate, σ, budget or accountant differ
    /// from what this client calibrated.
    pub fn restore_privacy(&mut self, saved: ClientPrivacy) -> Result<()> {
        let now = &self.privacy;
        let change = if saved.sample_rate != now.sample_rate {
            Some(format!(
                "its sampling rate was {} and is {} now",
                saved.sample_rate, now.sample_rate
            ))
        } else if saved.noise_multiplier != now.noise_multiplier {
            Some(format!(
                "its noise multiplier was {} and is {} now",
                saved.noise_multiplier, now.noise_multiplier
            ))
        } else {
            match (&saved.ledger, &now.ledger) {
                (Some(a), Some(b))
                    if a.budget_epsilon() != b.budget_epsilon()
                        || a.delta() != b.delta()
                        || a.accountant() != b.accountant() =>
                {
                    Some(format!(
                        "its budget was (epsilon {}, delta {}, {:?}) and is (epsilon {}, delta \
                         {}, {:?}) now",
                        a.budget_epsilon(),
                        a.delta(),
                        a.accountant(),
                        b.budget_epsilon(),
                        b.delta(),
                        b.accountant()
                    ))
                }
                (Some(_), None) | (None, Some(_)) => {
                    Some("the run's privacy setting (DP or not) changed".into())
                }
                _ => None,
            }
        };
        if let Some(change) = change {
            return Err(Error::ResumeMismatch {
                client: self.index,
                change,
            });
        }
        self.privacy = saved;
        Ok(())
    }

    /// Trains round `round` (from 0) from the server's `state`, unless one
    /// more round would exceed the budget. The ledger is charged before the
    /// update is returned.
    pub fn train_round(&mut self, state: &GlobalState, round: usize) -> Result<RoundOutcome> {
        let steps = self.config.training.local_steps as u64;
        let p = &self.privacy;
        if let Some(ledger) = &p.ledger {
            let entry = HistoryEntry::new(p.noise_multiplier, p.sample_rate, steps)?;
            if ledger.would_exceed(std::slice::from_ref(&entry))? {
                return Ok(RoundOutcome::BudgetExhausted {
                    spent: ledger.spent_epsilon()?,
                    would_reach: ledger.epsilon_after(&[entry])?,
                });
            }
        }
        let mut lora = self.template.clone();
        load_global(state, &mut lora)?;
        let model = model_over(&self.base_weights, &self.model, &self.template, state)?;
        let mut streams = match self.config.seed {
            Some(seed) => {
                ClientStreams::from_seed(derive_seed(seed, StreamKind::Client, round, self.index))
            }
            None => ClientStreams::from_os(),
        };
        let training = self.config.local_training(self.privacy.noise_multiplier);
        let report = train_locally(&model, &mut lora, &self.data, &training, &mut streams)?;
        let p = &mut self.privacy;
        if let Some(ledger) = p.ledger.as_mut() {
            ledger.record(HistoryEntry::new(p.noise_multiplier, p.sample_rate, steps)?);
        }
        let update = update_from_lora(&lora, self.data.len(), self.trains_a, state.head.is_some())?;
        Ok(RoundOutcome::Trained { update, report })
    }
}

/// Client `index`'s sampling rate, σ and fresh ledger, exactly as the
/// simulation calibrates it.
fn calibrate(
    config: &FederationConfig,
    clients: usize,
    index: usize,
    examples: usize,
) -> Result<ClientPrivacy> {
    let sample_rate = config.local_training(0.0).sample_rate(examples);
    let Some(epsilon) = config.privacy.epsilon else {
        return Ok(ClientPrivacy {
            sample_rate,
            noise_multiplier: 0.0,
            ledger: None,
        });
    };
    let calibration = calibrate_noise(
        &Accountant::new(config.privacy.accountant),
        epsilon,
        sample_rate,
        config.calibrated_steps(clients),
        config.privacy.delta,
        DEFAULT_EPSILON_TOLERANCE,
    )?;
    Ok(ClientPrivacy {
        sample_rate,
        noise_multiplier: calibration.noise_multiplier,
        ledger: Some(PrivacyLedger::new(
            format!("client {index}"),
            epsilon,
            config.privacy.delta,
            config.privacy.accountant,
        )?),
    })
}
