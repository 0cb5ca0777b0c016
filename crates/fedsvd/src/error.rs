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
    /// The requested compute device cannot run this configuration.
    #[error("device {requested}: {reason}")]
    Device {
        /// The device asked for.
        requested: &'static str,
        /// Why it cannot be used.
        reason: String,
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
    /// Loading, splitting or partitioning the data failed.
    #[error("data: {0}")]
    Data(#[from] fedsvd_data::Error),
    /// A file could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("writing", "reading", ...).
        action: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSON file (or one line of a JSON Lines file) is malformed.
    #[error("{}{}: {source}", path.display(), if *line > 0 { format!(":{line}") } else { String::new() })]
    Json {
        /// The file.
        path: std::path::PathBuf,
        /// The line (0 when unknown).
        line: usize,
        /// The parser's message.
        source: serde_json::Error,
    },
    /// A new run was pointed at a folder that already holds one.
    #[error("{} already holds a run (config.json exists); resume it or choose another folder", dir.display())]
    RunExists {
        /// The folder.
        dir: std::path::PathBuf,
    },
    /// A resume was pointed at a folder without a run.
    #[error("{} holds no run (no config.json)", dir.display())]
    NotARun {
        /// The folder.
        dir: std::path::PathBuf,
    },
    /// A run folder's files contradict each other.
    #[error("corrupt run folder: {}: {reason}", path.display())]
    CorruptRun {
        /// The offending file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A resume whose configuration or data would train one client with
    /// privacy parameters other than those its ledger records.
    #[error(
        "cannot resume: client {client}'s privacy ledger no longer matches the run: {change}; \
         restore the original configuration and data, or start a new run"
    )]
    ResumeMismatch {
        /// The client.
        client: usize,
        /// What changed.
        change: String,
    },
    /// A client's own data file (a deployed node's, not the run's data
    /// set) cannot serve the run.
    #[error("{}: {reason}", path.display())]
    NodeData {
        /// The node's file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A summary was asked of a run that has rounds left.
    #[error("the run in {} has finished {done} of {rounds} rounds", dir.display())]
    Unfinished {
        /// The run folder.
        dir: std::path::PathBuf,
        /// Rounds finished.
        done: usize,
        /// Rounds configured.
        rounds: usize,
    },
}

impl Error {
    pub(crate) fn io(action: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn json(path: &std::path::Path, line: usize, source: serde_json::Error) -> Self {
        Error::Json {
            path: path.to_path_buf(),
            line,
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
