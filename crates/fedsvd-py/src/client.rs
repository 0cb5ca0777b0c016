//! `fedsvd.BaseModel` and `fedsvd.Client`: the frozen encoder, and one
//! client of a federation running where its data lives.

use std::path::PathBuf;
use std::sync::Arc;

use fedsvd::server::{Participant, RoundOutcome};
use fedsvd::{RunConfig, load_node_data, prepare_data};
use fedsvd_model::BertWeights;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{dict_to_state, state_to_dict, update_to_dict};
use crate::error::{Error, Result};
use crate::server::round_index;
use crate::{assets_dir, parse_config};

/// A frozen base encoder (BERT family: `config.json`, `model.safetensors`,
/// `tokenizer.json`), loaded once and shared read-only by every client or
/// server built from it.
#[pyclass(module = "fedsvd", frozen)]
pub struct BaseModel {
    pub(crate) weights: Arc<BertWeights>,
    pub(crate) dir: PathBuf,
}

#[pymethods]
impl BaseModel {
    /// Loads the base model `path`: a model folder, or a Hugging Face Hub id
    /// such as `sentence-transformers/all-MiniLM-L6-v2` read from its local
    /// copy under `<assets>/models/` (nothing is downloaded); without one,
    /// the fetched all-MiniLM-L6-v2 in the assets folder (`assets`, default
    /// `fedsvd.default_assets_dir()`).
    #[staticmethod]
    #[pyo3(signature = (path = None, assets = None))]
    fn load(py: Python<'_>, path: Option<PathBuf>, assets: Option<PathBuf>) -> PyResult<Self> {
        let assets = assets_dir(assets);
        let dir = match path {
            Some(p) => fedsvd_model::resolve_base_model(&p.to_string_lossy(), &assets)
                .map_err(Error::from)?,
            None => assets.join("models").join(fedsvd_model::MINILM_DIR),
        };
        Self::from_dir(py, dir)
    }

    /// Loads the base model the PEFT adapter in the folder `adapter`
    /// applies to: the folder fedsvd recorded when it exported the adapter,
    /// else the adapter's `base_model_name_or_path` (a folder, or a Hub id
    /// read from its local copy under `<assets>/models/`), else the fetched
    /// all-MiniLM-L6-v2.
    #[staticmethod]
    #[pyo3(signature = (adapter, assets = None))]
    fn for_adapter(py: Python<'_>, adapter: PathBuf, assets: Option<PathBuf>) -> PyResult<Self> {
        let assets = assets_dir(assets);
        let dir = py
            .detach(|| {
                fedsvd_model::load_peft_adapter(&adapter)
                    .and_then(|a| a.base_model_dir(&adapter, &assets))
            })
            .map_err(Error::from)?;
        Self::from_dir(py, dir)
    }

    /// The model folder.
    #[getter]
    fn path(&self) -> String {
        self.dir.display().to_string()
    }

    /// Hidden size of the encoder.
    #[getter]
    fn hidden_size(&self) -> usize {
        self.weights.config.hidden_size
    }

    /// Number of transformer layers.
    #[getter]
    fn num_layers(&self) -> usize {
        self.weights.config.num_hidden_layers
    }

    /// Vocabulary size.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.weights.config.vocab_size
    }

    fn __repr__(&self) -> String {
        format!(
            "BaseModel(path={:?}, hidden_size={}, num_layers={})",
            self.dir.display().to_string(),
            self.weights.config.hidden_size,
            self.weights.config.num_hidden_layers
        )
    }
}

impl BaseModel {
    fn from_dir(py: Python<'_>, dir: PathBuf) -> PyResult<Self> {
        let weights = py
            .detach(|| BertWeights::from_dir(&dir))
            .map_err(Error::from)?;
        Ok(Self { weights, dir })
    }
}

/// The weights of a run: the given model (whose folder then becomes the
/// configuration's `model.dir`, so its tokenizer is used) or the
/// configured one.
pub(crate) fn resolve_model(
    py: Python<'_>,
    config: &mut RunConfig,
    model: Option<&BaseModel>,
    assets: &std::path::Path,
) -> Result<(Arc<BertWeights>, PathBuf)> {
    match model {
        Some(m) => {
            config.model.dir = Some(m.dir.clone());
            Ok((Arc::clone(&m.weights), m.dir.clone()))
        }
        None => {
            let dir = config.model_dir(assets);
            let weights = py.detach(|| BertWeights::from_dir(&dir))?;
            Ok((weights, dir))
        }
    }
}

/// One client of a federation: its data partition, its LoRA configuration,
/// its noise multiplier σ (calibrated here, from its own data, for the
/// run's (ε, δ)) and its privacy ledger. `train_round` runs the same
/// `fedsvd::train_locally` as `fedsvd run`, with the noise stream the
/// simulation gives the client whose index is `partition_id`.
#[pyclass(module = "fedsvd")]
pub struct Client {
    inner: Participant,
    label_names: Vec<String>,
    method: String,
    budget: Option<f64>,
}

#[pymethods]
impl Client {
    /// Client `partition_id` of the run `config` (its complete JSON, as
    /// `fedsvd run --print-config` prints it): its data is partition
    /// `partition_id` of the configured data set (a built-in one, or the
    /// user's CSV/JSONL in `data.file`), split and partitioned exactly as
    /// `fedsvd run` does. With `data_file`, its data is instead every row
    /// of that file of its own (a real deployment: each node holds its own
    /// data), read with the run's columns, its labels matched to
    /// `label_names` (the server's `Server.label_names`; by default the
    /// configured data set's); `partition_id` then only numbers the client
    /// (sampling, noise stream). `init_seed` is the server's adapter seed
    /// (`Server.init_seed`); a seeded run may omit it.
    #[new]
    #[pyo3(signature = (
        config, partition_id, *, model = None, assets = None, init_seed = None,
        data_file = None, label_names = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        config: &Bound<'_, PyAny>,
        partition_id: usize,
        model: Option<PyRef<'_, BaseModel>>,
        assets: Option<PathBuf>,
        init_seed: Option<u64>,
        data_file: Option<PathBuf>,
        label_names: Option<Vec<String>>,
    ) -> PyResult<Self> {
        let mut config = parse_config(config)?;
        let assets = assets_dir(assets);
        let (weights, _) = resolve_model(py, &mut config, model.as_deref(), &assets)?;
        let clients = config.data.clients;
        if partition_id >= clients {
            return Err(Error::argument(
                "partition_id",
                format!("{partition_id} is not below data.clients = {clients}"),
            )
            .into());
        }
        let Some(init_seed) = init_seed.or(config.federation.seed) else {
            return Err(Error::argument(
                "init_seed",
                "an unseeded run (federation.seed = null) needs the server's init_seed",
            )
            .into());
        };
        let inner = py.detach(|| -> Result<(Participant, Vec<String>)> {
            let (local, label_names) = match (data_file, label_names) {
                (None, _) => {
                    let mut data = prepare_data(&config, &assets)?;
                    (data.clients.swap_remove(partition_id), data.label_names)
                }
                (Some(file), Some(names)) => {
                    (load_node_data(&config, &assets, &file, &names)?.0, names)
                }
                (Some(file), None) => {
                    let names = prepare_data(&config, &assets)?.label_names;
                    (load_node_data(&config, &assets, &file, &names)?.0, names)
                }
            };
            let lora = config.adapters.lora()?;
            let head = config.adapters.head(label_names.len());
            let participant = Participant::new(
                config.federation,
                weights,
                lora,
                head,
                clients,
                partition_id,
                local,
                init_seed,
            )?;
            Ok((participant, label_names))
        })?;
        Ok(Self {
            inner: inner.0,
            label_names: inner.1,
            method: config.federation.method.name().to_string(),
            budget: config.federation.privacy.epsilon,
        })
    }

    /// Trains round `round` (from 1) from the server's `global_state` (a
    /// dict of float32 arrays, as `Server.state()` returns) and charges the
    /// ledger. Returns `(update, report)`: the update holds what the method
    /// shares (`<module>.b`, plus `<module>.a` for FedAvg-LoRA, FLoRA and
    /// FedEx-LoRA, and `head` when it trains); the report holds
    /// `examples` (n_k, the aggregation weight), `steps`, `examples_seen`,
    /// `mean_loss`, `clipped_fraction` and `epsilon_spent`. Raises
    /// `BudgetExhaustedError` (and does not train) when one more round
    /// would exceed the budget.
    fn train_round<'py>(
        &mut self,
        py: Python<'py>,
        global_state: &Bound<'py, PyDict>,
        round: usize,
    ) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyDict>)> {
        let index = round_index(round)?;
        let template = self.inner.initial_state();
        let state = dict_to_state(global_state, &template)?;
        let inner = &mut self.inner;
        let outcome = py
            .detach(|| inner.train_round(&state, index))
            .map_err(Error::from)?;
        match outcome {
            RoundOutcome::Trained { update, report } => {
                let examples = update.examples;
                let update = update_to_dict(py, &state, update)?;
                let out = PyDict::new(py);
                out.set_item("examples", examples)?;
                out.set_item("steps", report.steps)?;
                out.set_item("examples_seen", report.examples_seen)?;
                out.set_item("mean_loss", report.mean_loss)?;
                out.set_item("clipped_fraction", report.clipped_fraction)?;
                out.set_item(
                    "epsilon_spent",
                    self.inner.spent_epsilon().map_err(Error::from)?,
                )?;
                Ok((update, out))
            }
            RoundOutcome::BudgetExhausted { spent, would_reach } => Err(Error::BudgetExhausted {
                client: self.inner.index(),
                round,
                spent,
                would_reach,
                budget: self.budget.unwrap_or(f64::INFINITY),
            }
            .into()),
        }
    }

    /// The initial global state (the adapters of the server's seed), as a
    /// dict of float32 arrays.
    fn initial_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        state_to_dict(py, &self.inner.initial_state())
    }

    /// The ledger (sampling rate, σ and the steps taken) as JSON text, to
    /// keep in a file of the client's own.
    fn ledger_json(&self) -> PyResult<String> {
        Ok(
            serde_json::to_string(self.inner.privacy()).map_err(|source| Error::Json {
                what: "the ledger",
                source,
            })?,
        )
    }

    /// Replaces the ledger with one saved by `ledger_json` (a restarted
    /// client), refusing one whose q, σ, budget or accountant differ from
    /// this client's.
    fn restore_ledger(&mut self, text: &str) -> PyResult<()> {
        let saved = serde_json::from_str(text).map_err(|source| Error::Json {
            what: "the ledger",
            source,
        })?;
        Ok(self.inner.restore_privacy(saved).map_err(Error::from)?)
    }

    /// The client's partition id (its index k).
    #[getter]
    fn partition_id(&self) -> usize {
        self.inner.index()
    }

    /// Its number of local training examples n_k.
    #[getter]
    fn num_examples(&self) -> usize {
        self.inner.examples()
    }

    /// Its calibrated noise multiplier σ_k (0 without DP).
    #[getter]
    fn noise_multiplier(&self) -> f64 {
        self.inner.privacy().noise_multiplier
    }

    /// Its Poisson sampling rate q_k = batch_size / n_k.
    #[getter]
    fn sample_rate(&self) -> f64 {
        self.inner.privacy().sample_rate
    }

    /// ε spent so far (`None` without DP).
    #[getter]
    fn epsilon_spent(&self) -> PyResult<Option<f64>> {
        Ok(self.inner.spent_epsilon().map_err(Error::from)?)
    }

    /// Its ε budget (`None` without DP).
    #[getter]
    fn epsilon_budget(&self) -> Option<f64> {
        self.budget
    }

    /// The method's short name.
    #[getter]
    fn method(&self) -> String {
        self.method.clone()
    }

    /// Label names, indexing the classifier's outputs.
    #[getter]
    fn label_names(&self) -> Vec<String> {
        self.label_names.clone()
    }

    fn __repr__(&self) -> String {
        format!(
            "Client(partition_id={}, num_examples={}, method={:?}, noise_multiplier={})",
            self.inner.index(),
            self.inner.examples(),
            self.method,
            self.inner.privacy().noise_multiplier
        )
    }
}
