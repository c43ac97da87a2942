//! model_type -> constructor. Adding an architecture is one line here.

use lmx_io::{IoError, WeightsPath};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::CausalLm;

/// The `model_type` values lmx can run.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

/// Why a model could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// config.json names an architecture lmx does not have.
    #[error("model_type `{0}` is not supported; supported model types: {supported}", supported = SUPPORTED_MODEL_TYPES.join(", "))]
    UnsupportedModelType(String),
    /// config.json lacks a key or has one of the wrong type.
    #[error("config.json for `{model_type}`: {msg}")]
    Config { model_type: String, msg: String },
    /// Reading weights failed (missing tensor, wrong shape, ...).
    #[error(transparent)]
    Io(#[from] IoError),
    /// A tensor operation failed while building the model.
    #[error(transparent)]
    Tensor(#[from] lmx_core::Error),
}

/// Parses config.json into a model file's `Config`.
pub fn parse_config<C: DeserializeOwned>(model_type: &str, config: &Value) -> Result<C, ModelError> {
    serde_json::from_value(config.clone()).map_err(|e| ModelError::Config { model_type: model_type.to_string(), msg: e.to_string() })
}

/// Builds the model `model_type` from its config.json and weights.
pub fn load_model(model_type: &str, config: &Value, vb: &WeightsPath) -> Result<Box<dyn CausalLm>, ModelError> {
    Ok(match model_type {
        "llama" => Box::new(crate::llama::Model::new(&parse_config(model_type, config)?, vb)?),
        "mistral" => Box::new(crate::mistral::Model::new(&parse_config(model_type, config)?, vb)?),
        "qwen2" => Box::new(crate::qwen2::Model::new(&parse_config(model_type, config)?, vb)?),
        "qwen3" => Box::new(crate::qwen3::Model::new(&parse_config(model_type, config)?, vb)?),
        other => return Err(ModelError::UnsupportedModelType(other.to_string())),
    })
}

/// Checkpoint keys that are not weights and are deliberately ignored (rotary buffers some
/// exporters save).
pub fn is_ignored_key(key: &str) -> bool {
    key.ends_with("rotary_emb.inv_freq")
}
