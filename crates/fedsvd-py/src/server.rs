//! `fedsvd.Server`: the server half of a federation (the simulation's
//! sampling, server step, evaluation, checkpoints and export).

use std::path::PathBuf;

use fedsvd::RunConfig;
use fedsvd_model::peft::{ExportMeta, save_merged_checkpoint, save_peft_adapter};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{dict_to_update, state_to_dict};
use crate::client::{BaseModel, resolve_model};
use crate::error::{Error, Result};
use crate::{assets_dir, parse_config};

/// The round index (from 0) of a round number from 1.
pub(crate) fn round_index(round: usize) -> Result<usize> {
    round
        .checked_sub(1)
        .ok_or_else(|| Error::argument("round", "rounds count from 1"))
}

/// The server of a federation: the global adapters, the method's strategy
/// (FedSVD refactorizes by SVD), the held-out split and, for FLoRA and
/// FedEx-LoRA, the merged base weights. It holds no ledger: clients keep
/// their own. Rounds count from 1 as in `metrics.jsonl`.
#[pyclass(module = "fedsvd")]
pub struct Server {
    inner: fedsvd::server::Server,
    config: RunConfig,
    label_names: Vec<String>,
    majority_accuracy: f64,
    model_dir: PathBuf,
    trains_a: bool,
}

#[pymethods]
impl Server {
    /// The server of the run `config` (its complete JSON). It loads the
    /// data set to hold the held-out split (the server's, as in `fedsvd
    /// run`). `init_seed` fixes the adapters' initialization of an
    /// unseeded run (a seeded run uses its seed; without either one is
    /// drawn).
    #[new]
    #[pyo3(signature = (config, *, model = None, assets = None, init_seed = None))]
    fn new(
        py: Python<'_>,
        config: &Bound<'_, PyAny>,
        model: Option<PyRef<'_, BaseModel>>,
        assets: Option<PathBuf>,
        init_seed: Option<u64>,
    ) -> PyResult<Self> {
        let mut config = parse_config(config)?;
        let assets = assets_dir(assets);
        let (weights, model_dir) = resolve_model(py, &mut config, model.as_deref(), &assets)?;
        let built = py.detach(|| -> Result<_> {
            let data = fedsvd::prepare_data(&config, &assets)?;
            let lora = config.adapters.lora()?;
            let head = config.adapters.head(data.label_names.len());
            let server = fedsvd::server::Server::new(
                config.federation,
                weights,
                lora,
                head,
                config.data.clients,
                data.test,
                init_seed,
            )?;
            let majority = if config.federation.privacy.report_unprotected {
                data.majority_accuracy
            } else {
                data.test_majority_accuracy
            };
            Ok((server, data.label_names, majority))
        })?;
        let trains_a = config.federation.method.strategy().trains_a();
        Ok(Self {
            inner: built.0,
            label_names: built.1,
            majority_accuracy: built.2,
            model_dir,
            trains_a,
            config,
        })
    }

    /// The clients sampled in `round` (from 1), as `fedsvd run` samples
    /// them.
    fn sample(&self, round: usize) -> PyResult<Vec<usize>> {
        Ok(self.inner.sample(round_index(round)?))
    }

    /// Whether `fedsvd run` evaluates after `round` (from 1).
    fn evaluates_after(&self, round: usize) -> PyResult<bool> {
        Ok(self.inner.evaluates_after(round_index(round)?))
    }

    /// A copy of the global state as a dict of float32 arrays (what the
    /// server sends each sampled client).
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        state_to_dict(py, self.inner.state())
    }

    /// The server step of `round` (from 1, the next round): `updates` is a
    /// list of `(partition_id, update, examples)` from the clients that
    /// trained, in any order. Aggregates with weights n_k / Σ n_j and
    /// applies the method's rule (FedSVD: SVD refactorization on its
    /// schedule; FLoRA: merge and a fresh A from the round's stream). All
    /// or nothing. Returns `{"refactorized": bool, "seconds": float}`.
    fn step<'py>(
        &mut self,
        py: Python<'py>,
        round: usize,
        updates: Vec<(usize, Bound<'py, PyDict>, usize)>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let index = round_index(round)?;
        let mut parsed = Vec::with_capacity(updates.len());
        for (k, dict, examples) in &updates {
            let update = dict_to_update(dict, *examples, self.inner.state(), self.trains_a)
                .map_err(|e| Error::argument(format!("the update of client {k}"), e.to_string()))?;
            parsed.push((*k, update));
        }
        let inner = &mut self.inner;
        let step = py
            .detach(|| inner.step(index, parsed))
            .map_err(Error::from)?;
        let out = PyDict::new(py);
        out.set_item("refactorized", step.refactorized)?;
        out.set_item("seconds", step.seconds)?;
        Ok(out)
    }

    /// Evaluates the global model on the held-out split: `{"accuracy",
    /// "loss", "examples"}`.
    fn evaluate<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let inner = &self.inner;
        let metrics = py.detach(|| inner.evaluate()).map_err(Error::from)?;
        let out = PyDict::new(py);
        out.set_item("accuracy", metrics.accuracy)?;
        out.set_item("loss", metrics.loss)?;
        out.set_item("examples", metrics.examples)?;
        Ok(out)
    }

    /// Writes `checkpoint.json` (sealed with its SHA-256, atomically) to
    /// `path`.
    fn save_checkpoint(&self, path: PathBuf) -> PyResult<()> {
        Ok(
            fedsvd::runner::write_checkpoint(&path, &self.inner.checkpoint())
                .map_err(Error::from)?,
        )
    }

    /// Continues from a checkpoint written by `save_checkpoint` (refused,
    /// naming the file, when torn or edited).
    fn load_checkpoint(&mut self, path: PathBuf) -> PyResult<()> {
        let checkpoint = fedsvd::runner::read_checkpoint(&path).map_err(Error::from)?;
        Ok(self.inner.restore(checkpoint).map_err(Error::from)?)
    }

    /// Exports the global model into `dir` as `fedsvd run` does: a PEFT
    /// LoRA adapter, or a merged checkpoint for FLoRA and FedEx-LoRA once
    /// they merged. Returns the folder, or `None` when the run has no
    /// Hugging Face equivalent.
    fn export(&self, dir: PathBuf) -> PyResult<Option<String>> {
        let model = self.inner.model();
        let state = self.inner.global_lora().map_err(Error::from)?;
        let model_dir = self
            .model_dir
            .canonicalize()
            .unwrap_or_else(|_| self.model_dir.clone());
        let meta = ExportMeta {
            base_model: model_dir.display().to_string(),
            tokenizer: model_dir.join("tokenizer.json").display().to_string(),
            max_len: self.config.model.max_len,
            labels: Some(self.label_names.clone()),
            method: Some(self.config.federation.method.name().to_string()),
        };
        let result = if self.inner.state().base_delta_parameters() > 0 {
            save_merged_checkpoint(
                &dir,
                model.weights(),
                model.lora_config(),
                model.head_config(),
                &state,
                &meta,
            )
        } else {
            save_peft_adapter(
                &dir,
                &model.weights().config,
                model.lora_config(),
                model.head_config(),
                &state,
                &meta,
            )
        };
        match result {
            Ok(()) => Ok(Some(dir.display().to_string())),
            Err(fedsvd_model::Error::NotExportable(_)) => Ok(None),
            Err(e) => Err(Error::from(e).into()),
        }
    }

    /// The run configuration as pretty JSON, as `config.json` holds it.
    fn config_json(&self) -> PyResult<String> {
        Ok(
            serde_json::to_string_pretty(&self.config).map_err(|source| Error::Json {
                what: "the run configuration",
                source,
            })?,
        )
    }

    /// The number of clients K (`data.clients`).
    #[getter]
    fn num_clients(&self) -> usize {
        self.inner.clients()
    }

    /// Clients sampled per round K'.
    #[getter]
    fn clients_per_round(&self) -> usize {
        self.config.federation.clients_per_round
    }

    /// Rounds R.
    #[getter]
    fn rounds(&self) -> usize {
        self.config.federation.rounds
    }

    /// Rounds done so far.
    #[getter]
    fn rounds_done(&self) -> usize {
        self.inner.next_round()
    }

    /// Whether every round has run.
    #[getter]
    fn finished(&self) -> bool {
        self.inner.finished()
    }

    /// The method's short name.
    #[getter]
    fn method(&self) -> String {
        self.config.federation.method.name().to_string()
    }

    /// Whether clients upload A as well as B.
    #[getter]
    fn trains_a(&self) -> bool {
        self.trains_a
    }

    /// The run seed (`None`: operating-system entropy).
    #[getter]
    fn seed(&self) -> Option<u64> {
        self.config.federation.seed
    }

    /// The adapters' initialization seed every client must use.
    #[getter]
    fn init_seed(&self) -> u64 {
        self.inner.init_seed()
    }

    /// Bytes one client uploads per round (f32 parameters).
    #[getter]
    fn upload_bytes(&self) -> usize {
        self.inner.upload_parameters() * 4
    }

    /// Label names, indexing the classifier's outputs.
    #[getter]
    fn label_names(&self) -> Vec<String> {
        self.label_names.clone()
    }

    /// The majority-class bar the run reports (from the training labels
    /// when unprotected statistics are reported, else from the held-out
    /// split).
    #[getter]
    fn majority_accuracy(&self) -> f64 {
        self.majority_accuracy
    }

    /// The number of held-out examples `evaluate` scores.
    #[getter]
    fn test_examples(&self) -> usize {
        self.inner.test_examples()
    }

    fn __repr__(&self) -> String {
        format!(
            "Server(method={:?}, clients={}, per_round={}, rounds={}, rounds_done={})",
            self.config.federation.method.name(),
            self.inner.clients(),
            self.config.federation.clients_per_round,
            self.config.federation.rounds,
            self.inner.next_round()
        )
    }
}
