//! The package's one error type, and how it becomes a Python exception.

use pyo3::PyErr;
use pyo3::create_exception;
use pyo3::exceptions::PyException;

create_exception!(
    fedsvd,
    FedsvdError,
    PyException,
    "An error of the fedsvd core; its message is the Rust error's."
);
create_exception!(
    fedsvd,
    BudgetExhaustedError,
    FedsvdError,
    "A client refused to train because one more round would exceed its privacy budget."
);

/// Everything the package can fail with. Each variant becomes a
/// `fedsvd.FedsvdError` (a `BudgetExhaustedError` for
/// [`Error::BudgetExhausted`]) carrying this message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The orchestration crate failed (configuration, data, training, the
    /// server step, files).
    #[error("{0}")]
    Fedsvd(#[from] fedsvd::Error),
    /// The model failed to load or export.
    #[error("model: {0}")]
    Model(#[from] fedsvd_model::Error),
    /// An accountant failed or a target is impossible.
    #[error("privacy accounting: {0}")]
    Privacy(#[from] fedsvd_dp::Error),
    /// A JSON text (a configuration, a ledger, a checkpoint) is malformed.
    #[error("{what} is not valid: {source}")]
    Json {
        /// What the text was meant to be.
        what: &'static str,
        /// The parser's message (it names the key and line).
        source: serde_json::Error,
    },
    /// An argument from Python is out of its allowed range or shape.
    #[error("{what}: {reason}")]
    Argument {
        /// The argument.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A client at its budget was asked to train.
    #[error(
        "client {client} refuses to train round {round}: it has spent epsilon {spent:.4} of its \
         budget {budget}, and the round would bring it to {would_reach:.4}"
    )]
    BudgetExhausted {
        /// The client's partition id.
        client: usize,
        /// The round asked for (from 1).
        round: usize,
        /// ε spent so far.
        spent: f64,
        /// ε after the round.
        would_reach: f64,
        /// The client's ε budget.
        budget: f64,
    },
}

impl Error {
    /// An argument error.
    pub fn argument(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Argument {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::BudgetExhausted { .. } => BudgetExhaustedError::new_err(e.to_string()),
            other => FedsvdError::new_err(other.to_string()),
        }
    }
}

/// The package's result type.
pub type Result<T> = std::result::Result<T, Error>;
