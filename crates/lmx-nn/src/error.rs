//! The typed error of lmx-nn: why a layer could not be built.

use lmx_io::IoError;

/// Result alias for building layers.
pub type Result<T> = std::result::Result<T, BuildError>;

/// Why a layer (and so a model) could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Reading a tensor failed (missing, wrong shape, unreadable file).
    #[error(transparent)]
    Io(#[from] IoError),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] lmx_core::Error),
    /// A feature or value lmx does not support (yet).
    #[error("{what} is not supported{hint}")]
    Unsupported {
        /// What was asked for.
        what: String,
        /// What to do instead (starts with "; " when present).
        hint: String,
    },
    /// A config.json number outside the range lmx can build a model with.
    #[error("config.json: `{key}` is {value}; {allowed}")]
    ConfigValue { key: &'static str, value: String, allowed: &'static str },
    /// config.json's quantization block does not fit a layer's tensors.
    #[error("config.json: layer `{layer}`: {msg}")]
    Quantization { layer: String, msg: String },
    /// A weight cannot be split over the ranks of a tensor-parallel group as asked.
    #[error("cannot shard `{layer}` over {ranks} ranks: {msg}")]
    Shard { layer: String, ranks: usize, msg: String },
    /// `num_layers` asks for more layers than the model has.
    #[error("adapters: num_layers asks for {asked} layers but the model has {available}")]
    TooManyLayers { asked: usize, available: usize },
    /// Adapter settings that cannot work (rank 0, ...).
    #[error("adapters: {0}")]
    AdapterSettings(String),
    /// A `lora_parameters.keys` entry that matched no linear layer.
    #[error("adapters: lora_parameters.keys entry `{0}` names no linear layer of the adapted layers (keys are paths inside a layer, e.g. `self_attn.q_proj`, `mlp.down_proj`)")]
    UnmatchedKey(String),
    /// Saved adapter tensors that no module of this model took.
    #[error("{source_name}: {count} adapter tensor(s) match no {what} module of this model, e.g. `{first}`: was the adapter trained on another base model?")]
    UnusedAdapterTensors { count: usize, first: String, what: &'static str, source_name: String },
}

impl BuildError {
    /// An [`BuildError::Unsupported`] without a hint.
    pub fn unsupported(what: impl Into<String>) -> Self {
        BuildError::Unsupported { what: what.into(), hint: String::new() }
    }

    /// An [`BuildError::Unsupported`] with what to do instead.
    pub fn unsupported_with(what: impl Into<String>, hint: impl std::fmt::Display) -> Self {
        BuildError::Unsupported { what: what.into(), hint: format!("; {hint}") }
    }
}
