//! The Python package of fedsvd (`import fedsvd`), built by maturin into the
//! `fedsvd` wheel (`cargo xtask wheel`).
//!
//! Job: expose the Rust core to Python for deployments where clients and
//! the server run in separate processes (the Flower app in `flower/`):
//! loading the frozen base model, a client ([`client::Client`]: its data
//! partition, calibrated σ, ledger and `train_round`, which calls the same
//! `fedsvd::train_locally` as `fedsvd run`), the server
//! ([`server::Server`]: the simulation's sampling, server step,
//! evaluation, checkpoints and export), and the accountants.
//!
//! Boundary: no algorithm lives here; every computation is a call into the
//! library crates (`fedsvd::server` holds the split round). Errors become
//! `fedsvd.FedsvdError` carrying the Rust message; nothing panics on user
//! input.
#![warn(missing_docs)]

mod arrays;
mod client;
mod error;
mod server;

use std::path::PathBuf;

use fedsvd::RunConfig;
use fedsvd_dp::{Accountant, AccountantKind, HistoryEntry, calibrate_noise};
use pyo3::prelude::*;

pub use error::{Error, Result};

/// The assets folder: the given one, or the default resolution
/// (`$FEDSVD_ASSETS`, the workspace's `assets/`, `./assets`).
pub(crate) fn assets_dir(assets: Option<PathBuf>) -> PathBuf {
    assets.unwrap_or_else(fedsvd_data::assets::default_dir)
}

/// A complete run configuration from its JSON text or a dict (serialized by
/// Python's `json`), checked key by key.
pub(crate) fn parse_config(config: &Bound<'_, PyAny>) -> PyResult<RunConfig> {
    let text: String = match config.extract::<String>() {
        Ok(text) => text,
        Err(_) => config
            .py()
            .import("json")?
            .call_method1("dumps", (config,))?
            .extract()?,
    };
    Ok(parse_config_text(&text)?)
}

/// A complete run configuration from its JSON text, checked key by key.
pub(crate) fn parse_config_text(text: &str) -> Result<RunConfig> {
    let config: RunConfig = serde_json::from_str(text).map_err(|source| Error::Json {
        what: "the run configuration",
        source,
    })?;
    config.validate()?;
    Ok(config)
}

fn accountant_kind(name: &str) -> Result<AccountantKind> {
    match name {
        "prv" => Ok(AccountantKind::Prv),
        "rdp" => Ok(AccountantKind::Rdp),
        other => Err(Error::argument(
            "accountant",
            format!("{other:?} is not one of \"prv\", \"rdp\""),
        )),
    }
}

/// ε spent by `steps` DP-SGD steps with noise multiplier σ and Poisson
/// sampling rate q, at δ (what `fedsvd privacy epsilon` prints).
#[pyfunction]
#[pyo3(signature = (noise_multiplier, sample_rate, steps, delta, accountant = "prv"))]
fn epsilon(
    py: Python<'_>,
    noise_multiplier: f64,
    sample_rate: f64,
    steps: u64,
    delta: f64,
    accountant: &str,
) -> PyResult<f64> {
    let kind = accountant_kind(accountant)?;
    let entry = HistoryEntry::new(noise_multiplier, sample_rate, steps).map_err(Error::from)?;
    let spent = py
        .detach(|| Accountant::new(kind).epsilon(&[entry], delta))
        .map_err(Error::from)?;
    Ok(spent.epsilon)
}

/// The smallest noise multiplier σ whose ε at δ is at most the target
/// (within `epsilon_tolerance` below it), as `fedsvd privacy noise` and
/// every client's calibration compute it.
#[pyfunction]
#[pyo3(signature = (epsilon, sample_rate, steps, delta, accountant = "prv", epsilon_tolerance = fedsvd_dp::DEFAULT_EPSILON_TOLERANCE))]
fn noise_multiplier(
    py: Python<'_>,
    epsilon: f64,
    sample_rate: f64,
    steps: u64,
    delta: f64,
    accountant: &str,
    epsilon_tolerance: f64,
) -> PyResult<f64> {
    let kind = accountant_kind(accountant)?;
    let calibration = py
        .detach(|| {
            calibrate_noise(
                &Accountant::new(kind),
                epsilon,
                sample_rate,
                steps,
                delta,
                epsilon_tolerance,
            )
        })
        .map_err(Error::from)?;
    Ok(calibration.noise_multiplier)
}

/// The clients the simulation samples in `round` (from 1): `per_round` of
/// `num_clients` indices, sorted, for the run `seed` (`None`: fresh
/// randomness from the operating system).
#[pyfunction]
#[pyo3(signature = (num_clients, per_round, seed, round))]
fn sample_clients(
    num_clients: usize,
    per_round: usize,
    seed: Option<u64>,
    round: usize,
) -> PyResult<Vec<usize>> {
    let round = server::round_index(round)?;
    Ok(fedsvd::server::sampled_clients(
        num_clients,
        per_round,
        seed,
        round,
    ))
}

/// The run's endpoint, as `fedsvd run` reports it: the mean held-out
/// accuracy over the last 5 evaluated rounds of `curve` (`(round,
/// accuracy)` pairs, any order), with those rounds; `None` when nothing was
/// evaluated or one of them is not finite.
#[pyfunction]
fn endpoint(curve: Vec<(usize, f64)>) -> Option<(f64, Vec<usize>)> {
    fedsvd::study::endpoint(curve, fedsvd::study::ENDPOINT_WINDOW).map(|e| (e.accuracy, e.rounds))
}

/// The node ids serving the sampled client indices: `nodes` maps every
/// connected node id to its partition id; client k is the node whose
/// partition id is k. Raises `FedsvdError` naming a sampled partition no
/// node serves, or a partition two nodes claim.
#[pyfunction]
fn nodes_for_clients(clients: Vec<usize>, nodes: Vec<(u64, usize)>) -> PyResult<Vec<u64>> {
    Ok(fedsvd::server::nodes_for_clients(&clients, &nodes).map_err(Error::from)?)
}

/// The complete configuration of an embedded preset (`quick`, `default`,
/// `paper`) as JSON text, exactly what `fedsvd run --preset P
/// --print-config` starts from.
#[pyfunction]
fn preset(name: &str) -> PyResult<String> {
    let text = match name {
        "quick" => include_str!("../../fedsvd-cli/presets/quick.json"),
        "default" => include_str!("../../fedsvd-cli/presets/default.json"),
        "paper" => include_str!("../../fedsvd-cli/presets/paper.json"),
        other => {
            return Err(Error::argument(
                "preset",
                format!("{other:?} is not one of \"quick\", \"default\", \"paper\""),
            )
            .into());
        }
    };
    parse_config_text(text)?;
    Ok(text.to_string())
}

/// Re-serializes a record of a run folder exactly as `fedsvd run` writes
/// it, checking every key: `kind` is `"round"` (one `metrics.jsonl`
/// line, compact), `"summary"` (`summary.json`) or `"config"`
/// (`config.json`), both pretty-printed.
#[pyfunction]
fn canonical_json(kind: &str, text: &str) -> PyResult<String> {
    fn redo<T: serde::Serialize + for<'de> serde::Deserialize<'de>>(
        text: &str,
        what: &'static str,
        pretty: bool,
    ) -> Result<String> {
        let value: T = serde_json::from_str(text).map_err(|source| Error::Json { what, source })?;
        let out = if pretty {
            serde_json::to_string_pretty(&value)
        } else {
            serde_json::to_string(&value)
        };
        out.map_err(|source| Error::Json { what, source })
    }
    Ok(match kind {
        "round" => redo::<fedsvd::RoundMetrics>(text, "a round's metrics", false)?,
        "summary" => redo::<fedsvd::RunSummary>(text, "a run summary", true)?,
        "config" => redo::<RunConfig>(text, "the run configuration", true)?,
        other => {
            return Err(Error::argument(
                "kind",
                format!("{other:?} is not one of \"round\", \"summary\", \"config\""),
            )
            .into());
        }
    })
}

/// The default assets folder (`$FEDSVD_ASSETS`, else the enclosing cargo
/// workspace's `assets/`, else `./assets`).
#[pyfunction]
fn default_assets_dir() -> String {
    assets_dir(None).display().to_string()
}

/// The extension module `fedsvd._core`.
#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("FedsvdError", py.get_type::<error::FedsvdError>())?;
    m.add(
        "BudgetExhaustedError",
        py.get_type::<error::BudgetExhaustedError>(),
    )?;
    m.add_class::<client::BaseModel>()?;
    m.add_class::<client::Client>()?;
    m.add_class::<server::Server>()?;
    m.add_function(wrap_pyfunction!(epsilon, m)?)?;
    m.add_function(wrap_pyfunction!(noise_multiplier, m)?)?;
    m.add_function(wrap_pyfunction!(sample_clients, m)?)?;
    m.add_function(wrap_pyfunction!(endpoint, m)?)?;
    m.add_function(wrap_pyfunction!(nodes_for_clients, m)?)?;
    m.add_function(wrap_pyfunction!(preset, m)?)?;
    m.add_function(wrap_pyfunction!(canonical_json, m)?)?;
    m.add_function(wrap_pyfunction!(default_assets_dir, m)?)?;
    Ok(())
}
