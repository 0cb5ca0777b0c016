//! The crate's single error type.

use std::path::PathBuf;

/// Everything that can go wrong while fetching assets, loading data or
/// partitioning it. Each variant names the file, package or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a named path failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("reading", "creating", ...).
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A client program the fetch needs (python3 with pip, npm) is missing.
    #[error(
        "`{program}` is needed to download {package} but could not be run ({detail}); install it or put it on PATH"
    )]
    ToolMissing {
        /// The program (or module) that is missing.
        program: String,
        /// The package that needed it.
        package: String,
        /// What the operating system or the program said.
        detail: String,
    },

    /// The registry client ran but did not deliver the package.
    #[error("downloading {package} with `{command}` failed (exit status {status}):\n{stderr}")]
    Download {
        /// The package being downloaded.
        package: String,
        /// The command line that was run.
        command: String,
        /// The exit status, as text.
        status: String,
        /// The tail of the client's error output.
        stderr: String,
    },

    /// A downloaded archive or an unpacked file does not have the expected
    /// sha256.
    #[error("sha256 mismatch for {}: expected {expected}, got {actual}", path.display())]
    HashMismatch {
        /// The file whose hash differs.
        path: PathBuf,
        /// The hash the package list expects.
        expected: String,
        /// The hash of the bytes on disk.
        actual: String,
    },

    /// An archive could not be read or lacks what the package list expects.
    #[error("archive {}: {reason}", path.display())]
    Archive {
        /// The archive.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// Assets a loader needs are not installed.
    #[error(
        "asset {} is missing; run `fedsvd assets fetch` (dev build: `cargo run -p fedsvd-cli -- assets fetch`) or set FEDSVD_ASSETS to a folder that has it",
        path.display()
    )]
    AssetsMissing {
        /// The file or folder that was looked for.
        path: PathBuf,
    },

    /// A row or record of a data file is malformed.
    #[error("{}:{line}: {reason}", path.display())]
    Malformed {
        /// The data file.
        path: PathBuf,
        /// The 1-based line number where the record starts.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// A data set name that is not one of the known loaders.
    #[error("unknown data set `{0}`; known: rt, bbc-topic, bbc-pairs, spam, csv, jsonl")]
    UnknownDataset(String),

    /// An argument is out of its valid range.
    #[error("invalid {name}: {reason}")]
    InvalidArgument {
        /// The argument's name.
        name: &'static str,
        /// Why the value is rejected.
        reason: String,
    },

    /// No partition satisfied the constraints.
    #[error("{0}")]
    Infeasible(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name,
            reason: reason.into(),
        }
    }
}
