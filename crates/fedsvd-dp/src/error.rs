//! The crate's one error type.

/// Everything that can go wrong in `fedsvd-dp`. Every variant names the
/// offending value so a caller can report it without guessing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A sampling rate outside [0, 1] (or NaN).
    #[error("sample rate q = {0} is invalid: it must lie in [0, 1]")]
    InvalidSampleRate(f64),
    /// A noise multiplier that is not a finite positive number.
    #[error("noise multiplier sigma = {0} is invalid: it must be finite and > 0")]
    InvalidNoiseMultiplier(f64),
    /// A δ outside the open interval (0, 1).
    #[error("delta = {0} is invalid: it must lie in the open interval (0, 1)")]
    InvalidDelta(f64),
    /// An ε that is negative or not finite.
    #[error("epsilon = {0} is invalid: it must be finite and >= 0")]
    InvalidEpsilon(f64),
    /// A target ε for calibration that is not a finite positive number
    /// (no noise reaches ε = 0).
    #[error("target epsilon = {0} is invalid: it must be finite and > 0")]
    InvalidTargetEpsilon(f64),
    /// A history entry with zero steps.
    #[error("a history entry has 0 steps; every entry must have at least one step")]
    ZeroSteps,
    /// An empty list of Rényi orders.
    #[error("the list of Renyi orders is empty")]
    EmptyOrders,
    /// A Rényi order that is not a finite number > 1.
    #[error("Renyi order alpha = {0} is invalid: it must be finite and > 1")]
    InvalidOrder(f64),
    /// An accuracy parameter (eps_error, delta_error, tolerance, ...) out of range.
    #[error("{name} = {value} is invalid: {reason}")]
    InvalidParameter {
        /// Which parameter.
        name: &'static str,
        /// Its value.
        value: f64,
        /// What it must satisfy.
        reason: &'static str,
    },
    /// The PRV grid would need more points than allowed.
    #[error(
        "the PRV grid would need {points} points (more than the limit {max}); increase eps_error or delta_error, or shorten the history"
    )]
    GridTooLarge {
        /// Points the grid would need.
        points: u64,
        /// The configured limit.
        max: u64,
    },
    /// Rounding error over the grid would exceed the δ that is asked for.
    #[error(
        "floating-point error ({grid_points} grid points x machine epsilon) dominates delta - delta_error = {budget}; increase delta or reduce the grid"
    )]
    RoundingDominates {
        /// Points of the grid.
        grid_points: usize,
        /// δ − δ_error.
        budget: f64,
    },
    /// The discretized PRV's mean differs from the true mean by half a cell or more.
    #[error(
        "discretized PRV mean differs from the continuous mean by {shift} (half a grid cell is {half_cell}); the mesh is too coarse for sigma = {noise_multiplier}, q = {sample_rate}"
    )]
    MeanShiftTooLarge {
        /// The mean-shift correction.
        shift: f64,
        /// Half the mesh size.
        half_cell: f64,
        /// σ of the entry.
        noise_multiplier: f64,
        /// q of the entry.
        sample_rate: f64,
    },
    /// δ is so large that ε would be below the grid (only for δ close to 1).
    #[error("cannot compute epsilon for delta = {0}: it lies outside the discretized domain")]
    EpsilonOutOfDomain(f64),
    /// No noise multiplier up to the limit reaches the target ε.
    #[error(
        "target epsilon = {target_epsilon} at delta = {delta} is impossible: even noise multiplier {max_sigma} gives epsilon = {epsilon_at_max}"
    )]
    ImpossibleTarget {
        /// The target.
        target_epsilon: f64,
        /// δ of the target.
        delta: f64,
        /// The largest σ tried.
        max_sigma: f64,
        /// ε at that σ.
        epsilon_at_max: f64,
    },
    /// Calibration did not converge within its iteration limit.
    #[error(
        "noise calibration did not converge to within {tolerance} below epsilon = {target_epsilon}"
    )]
    CalibrationDidNotConverge {
        /// The target.
        target_epsilon: f64,
        /// The tolerance.
        tolerance: f64,
    },
    /// Recording further steps would spend more than the ledger's budget.
    #[error(
        "party {party}: recording this history would spend epsilon = {would_spend} > budget {budget} at delta = {delta}"
    )]
    BudgetExceeded {
        /// The party.
        party: String,
        /// ε after the further history.
        would_spend: f64,
        /// The budget.
        budget: f64,
        /// δ of the budget.
        delta: f64,
    },
    /// A numerical step produced a value that is not a number or left its valid range.
    #[error("numerical failure in {context}: {detail}")]
    Numerical {
        /// Which computation.
        context: &'static str,
        /// What happened.
        detail: String,
    },
    /// An unknown accountant name.
    #[error("unknown accountant {0:?}: expected \"rdp\" or \"prv\"")]
    UnknownAccountant(String),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
