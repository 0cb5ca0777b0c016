//! The crate's one error type.

/// Everything that can go wrong in `fedsvd-linalg`; every variant names the
/// input at fault so a caller can report it without guessing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Two inputs whose shapes must agree do not.
    #[error("shape mismatch in {context}: {detail}")]
    ShapeMismatch {
        /// The operation or input that was checked (e.g. "factored_svd: B·A").
        context: String,
        /// What was expected and what was found.
        detail: String,
    },
    /// A matrix has no rows or no columns where at least one is needed.
    #[error("{what} is empty ({rows} × {cols})")]
    Empty {
        /// Which input.
        what: String,
        /// Its number of rows.
        rows: usize,
        /// Its number of columns.
        cols: usize,
    },
    /// An input holds NaN or ±∞.
    #[error("{what} has a non-finite entry {value} at ({row}, {col})")]
    NonFinite {
        /// Which input.
        what: String,
        /// Row of the first offending entry.
        row: usize,
        /// Column of the first offending entry.
        col: usize,
        /// The entry, as f64.
        value: f64,
    },
    /// The inner rank r of a product B·A exceeds one of its outer dimensions,
    /// so r orthonormal rows (or columns) cannot exist.
    #[error(
        "rank {rank} exceeds a dimension of the {rows} × {cols} product; r orthonormal vectors do not fit"
    )]
    RankTooLarge {
        /// The inner rank r.
        rank: usize,
        /// d_out.
        rows: usize,
        /// d_in.
        cols: usize,
    },
    /// A parameter is out of its valid range.
    #[error("invalid parameter {name} = {value}: {reason}")]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// Its value, printed.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// One module of a batch failed; `source` says why.
    #[error("module {index}: {source}")]
    InModule {
        /// Index of the module in the batch.
        index: usize,
        /// The module's own error.
        source: Box<Error>,
    },
    /// An iterative SVD did not converge (only on pathological input).
    #[error("SVD of a {rows} × {cols} matrix did not converge ({detail})")]
    NoConvergence {
        /// Rows of the matrix.
        rows: usize,
        /// Columns of the matrix.
        cols: usize,
        /// Which algorithm gave up and why.
        detail: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
