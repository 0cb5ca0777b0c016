//! The crate's one error type.

/// Everything that can go wrong in a kernel call, with the context a user needs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A buffer or slice has the wrong number of elements for the shape given.
    #[error("{what}: expected {expected} elements, got {got}")]
    Length {
        /// Which argument (for example `"per_example_grads: g"`).
        what: &'static str,
        /// The length the shape implies.
        expected: usize,
        /// The length passed.
        got: usize,
    },
    /// A shape is empty, or too large for the backend's index types.
    #[error("{what}: {detail}")]
    Shape {
        /// Which operation and dimension.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A scalar parameter is out of its domain (negative, zero, NaN, infinite).
    #[error("{name} = {value} is invalid: {reason}")]
    Parameter {
        /// The parameter's name (`clip`, `sigma`, `scale`).
        name: &'static str,
        /// The value passed.
        value: f64,
        /// Which values are allowed.
        reason: &'static str,
    },
    /// A per-example squared norm is NaN, infinite or negative, so no clip
    /// factor exists for that example.
    #[error("squared norm of example {example} is {value}: gradients contain NaN or infinity")]
    NonFiniteNorm {
        /// Index of the example in the batch.
        example: usize,
        /// The offending squared norm.
        value: f32,
    },
    /// A buffer made by one backend was handed to another.
    #[error("buffer lives on {buffer}, but the {backend} backend was asked to use it")]
    WrongBackend {
        /// The backend that was called.
        backend: &'static str,
        /// Where the buffer lives.
        buffer: &'static str,
    },
    /// No CUDA device can be used (no driver, no device, or it failed to start).
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {op}: {message}")]
    Cuda {
        /// The operation that failed.
        op: &'static str,
        /// The driver's message.
        message: String,
    },
    /// A cuBLAS call failed, or cuBLAS is not installed.
    #[error("cuBLAS error in {op}: {message}")]
    Cublas {
        /// The operation that failed.
        op: &'static str,
        /// The library's message.
        message: String,
    },
    /// NVRTC could not be loaded or refused a kernel source.
    #[error("NVRTC could not compile {kernel}: {log}")]
    Nvrtc {
        /// The kernel file or name.
        kernel: String,
        /// The compiler log or load failure.
        log: String,
    },
    /// A committed PTX file does not match its source.
    #[error("PTX for {kernel} is stale or malformed: {detail}")]
    StalePtx {
        /// The kernel file name.
        kernel: String,
        /// What does not match.
        detail: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
