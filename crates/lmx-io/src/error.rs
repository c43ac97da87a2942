//! The typed error of lmx-io: every variant names the file, key or flag involved and says
//! what to do about it.

use std::path::PathBuf;

/// Result alias for lmx-io.
pub type Result<T> = std::result::Result<T, IoError>;

/// Everything that can go wrong reading or writing model files.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A file or folder the user pointed at does not exist.
    #[error("{path}: not found{hint}")]
    NotFound { path: PathBuf, hint: String },
    /// An `org/name` id that is not in the local Hugging Face cache.
    #[error("model `{id}` is not in the Hugging Face cache ({cache}); download it first, e.g. `huggingface-cli download {id}`, or use a local model folder or .gguf file")]
    NotCached { id: String, cache: PathBuf },
    /// Downloading from the Hugging Face Hub (or `HF_ENDPOINT`) failed.
    #[error("downloading `{id}` from {url}: {msg}")]
    Download { id: String, url: String, msg: String },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be parsed or lacks a required key.
    #[error("{path}: {msg}")]
    Json { path: PathBuf, msg: String },
    /// A safetensors file is truncated or malformed.
    #[error("{path}: not a valid safetensors file ({msg}); the file may be truncated: download or convert it again")]
    Safetensors { path: PathBuf, msg: String },
    /// A GGUF file is truncated, malformed or uses something lmx cannot read.
    #[error("{path}: {msg}")]
    Gguf { path: PathBuf, msg: String },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{key}` is missing from the checkpoint ({source_name})")]
    MissingTensor { key: String, source_name: String },
    /// A tensor exists with the wrong shape.
    #[error("tensor `{key}` has shape {found:?} in the checkpoint ({source_name}), but the config expects {expected:?}")]
    ShapeMismatch { key: String, expected: Vec<usize>, found: Vec<usize>, source_name: String },
    /// Checkpoint tensors that no layer used: the config and the weights disagree.
    #[error("{count} checkpoint tensor(s) were not used by the model ({source_name}), e.g. `{first}`; the config.json may not match these weights")]
    UnusedTensors { count: usize, first: String, source_name: String },
    /// A tensor holds NaN or infinite values (a corrupt file, or a diverged training run).
    #[error("{path}: tensor `{key}` holds NaN or infinite values, which would make every output NaN; the file is corrupt or comes from a diverged run: download, convert or train it again")]
    NonFinite { path: PathBuf, key: String },
    /// The tokenizer could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A text (a prompt or a rendered chat) that cannot fit in the model's context.
    #[error("the prompt is {bytes} bytes, more than {tokens} tokens (the model's context, max_position_embeddings) can hold with this tokenizer (at most {limit} bytes); shorten it")]
    TextTooLong { bytes: usize, tokens: usize, limit: usize },
    /// A chat template failed to compile or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A tensor operation failed while loading or saving.
    #[error(transparent)]
    Tensor(#[from] lmx_core::Error),
}

impl IoError {
    /// Wraps a std::io::Error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IoError::Io { path: path.into(), source }
    }
}
