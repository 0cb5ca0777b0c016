//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong when loading, tokenizing, running or
/// differentiating the model. Variants name the file, tensor or value at
/// fault so that the message alone says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON or lacks a field.
    #[error("invalid model config {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A config value the model cannot work with.
    #[error("unsupported model config: {0}")]
    UnsupportedConfig(String),
    /// The safetensors file itself is corrupt.
    #[error("invalid safetensors file {path}: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A tensor of a named checkpoint file is missing, mis-shaped, of an
    /// unsupported dtype or not finite (`source` says which and how).
    #[error("{}: {source}", path.display())]
    TensorInFile {
        /// The file.
        path: PathBuf,
        /// The tensor-level error.
        source: Box<Error>,
    },
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor {
        /// Its name (without any `bert.` prefix).
        name: String,
    },
    /// A tensor has a different shape than the config implies.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?} from the config")]
    ShapeMismatch {
        /// Its name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape stored in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype we do not read.
    #[error("tensor `{name}` has dtype {dtype}, only F32 is supported")]
    UnsupportedDtype {
        /// Its name.
        name: String,
        /// The stored dtype.
        dtype: String,
    },
    /// A tensor contains NaN or infinity.
    #[error("tensor `{name}` contains a non-finite value")]
    NonFiniteWeight {
        /// Its name.
        name: String,
    },
    /// The tokenizer file could not be loaded or applied.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// A batch is malformed (inconsistent lengths, ids out of range, ...).
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// The compute device (CUDA driver, cuBLAS, kernels) failed or is
    /// missing; the message names the operation and the reason.
    #[error("compute device: {0}")]
    Device(String),
    /// An invalid LoRA, head or training option.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// A parameter vector or tensor of the wrong length was supplied.
    #[error("{what}: expected {expected} values, got {found}")]
    LengthMismatch {
        /// Which parameter.
        what: String,
        /// Expected length.
        expected: usize,
        /// Supplied length.
        found: usize,
    },
    /// A parameter supplied by the caller contains NaN or infinity.
    #[error("{0} contains a non-finite value")]
    NonFinite(String),
    /// An exported adapter or checkpoint folder is malformed or uses a PEFT
    /// feature fedsvd cannot represent.
    #[error("invalid adapter {path}: {message}")]
    Adapter {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The trained state has no equivalent in the Hugging Face format asked
    /// for (e.g. a merged [CLS]-pooler checkpoint from a base model that has
    /// no pooler).
    #[error("cannot export: {0}")]
    NotExportable(String),
    /// A base model named by an adapter (PEFT's `base_model_name_or_path`)
    /// is neither a model folder nor a Hugging Face Hub id with a local copy.
    #[error(
        "base model `{reference}` not found: it is not a folder holding config.json, \
         and {local} holds no config.json either (pass the model folder, e.g. `--model DIR`)"
    )]
    BaseModelNotFound {
        /// The name or path as the adapter gives it.
        reference: String,
        /// Where the local copy of a Hub id was looked for.
        local: PathBuf,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
