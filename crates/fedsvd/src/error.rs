//! The error type of the orchestration crate.

/// Everything that can go wrong while running federated training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two pieces of adapter state that must agree in shape do not.
    #[error("shape mismatch in {context}: expected {expected:?}, got {actual:?}")]
    ShapeMismatch {
        /// Where the mismatch was found (module name, client index).
        context: String,
        /// The shape the server expected.
        expected: Vec<usize>,
        /// The shape it received.
        actual: Vec<usize>,
    },
    /// An update is missing a part its method must upload.
    #[error("client update {client} is missing {what}, which method {method} uploads")]
    MissingUpload {
        /// Position of the update in the round's list.
        client: usize,
        /// The missing part ("A factors", "classifier head").
        what: &'static str,
        /// The method that needs it.
        method: &'static str,
    },
    /// A value that must be finite is not.
    #[error("non-finite value in {context}")]
    NonFinite {
        /// Which tensor held it.
        context: String,
    },
    /// A configuration value is out of its allowed range.
    #[error("invalid configuration: {key} = {value}: {allowed}")]
    InvalidConfig {
        /// The configuration key.
        key: &'static str,
        /// The offending value, printed.
        value: String,
        /// What is allowed.
        allowed: &'static str,
    },
    /// The model rejected an input or failed.
    #[error("model: {0}")]
    Model(#[from] fedsvd_model::Error),
    /// Privacy accounting failed (or the target is impossible).
    #[error("privacy accounting: {0}")]
    Privacy(#[from] fedsvd_dp::Error),
    /// The server's factorization failed.
    #[error("refactorization failed: {0}")]
    Linalg(#[from] fedsvd_linalg::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
