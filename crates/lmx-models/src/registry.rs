//! The architectures lmx runs: one row per `model_type` in [`ARCHITECTURES`]. The supported
//! list in error messages, the golden-fixture tests and the sharding tests all read this table,
//! so adding an architecture is its model file plus one row here (and its fixture).

use lmx_nn::{BuildError, Builder, CausalLm};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{deepseek_v3, gemma2, gemma3, gpt_oss, llama, mistral, mixtral, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe};

/// A model file's config: parsed from config.json, it builds the model.
pub trait Architecture: DeserializeOwned {
    /// Builds the model from the checkpoint under `vb` (the root).
    fn build(&self, vb: &Builder) -> Result<Box<dyn CausalLm>, ModelError>;
}

/// Parses config.json for `model_type` and builds the model.
type BuildFn = fn(&str, &Value, &Builder) -> Result<Box<dyn CausalLm>, ModelError>;

/// One supported architecture.
pub struct Entry {
    /// The config.json `model_type`.
    pub model_type: &'static str,
    build: BuildFn,
}

const fn entry<C: Architecture>(model_type: &'static str) -> Entry {
    Entry { model_type, build: build::<C> }
}

/// Every architecture lmx runs.
pub const ARCHITECTURES: &[Entry] = &[
    entry::<llama::Config>("llama"),
    entry::<mistral::Config>("mistral"),
    entry::<qwen2::Config>("qwen2"),
    entry::<qwen3::Config>("qwen3"),
    entry::<gemma2::Config>("gemma2"),
    entry::<gemma3::Config>("gemma3_text"),
    entry::<phi3::Config>("phi3"),
    entry::<qwen3_moe::Config>("qwen3_moe"),
    entry::<mixtral::Config>("mixtral"),
    entry::<qwen2_moe::Config>("qwen2_moe"),
    entry::<gpt_oss::Config>("gpt_oss"),
    entry::<deepseek_v3::Config>("deepseek_v3"),
];

/// The `model_type` values lmx can run, in table order.
pub fn supported_model_types() -> Vec<&'static str> {
    ARCHITECTURES.iter().map(|a| a.model_type).collect()
}

/// Why a model could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// config.json names an architecture lmx does not have.
    #[error("model_type `{0}` is not supported; supported model types: {supported}", supported = supported_model_types().join(", "))]
    UnsupportedModelType(String),
    /// config.json lacks a key or has one of the wrong type.
    #[error("config.json for `{model_type}`: {msg}")]
    Config { model_type: String, msg: String },
    /// A layer could not be built (missing tensor, wrong shape, unsupported option, ...).
    #[error(transparent)]
    Build(#[from] BuildError),
}

fn build<C: Architecture>(model_type: &str, config: &Value, vb: &Builder) -> Result<Box<dyn CausalLm>, ModelError> {
    let cfg: C = C::deserialize(config).map_err(|e| ModelError::Config { model_type: model_type.to_string(), msg: e.to_string() })?;
    cfg.build(vb)
}

/// Builds the model `model_type` from its config.json and the layer builder.
pub fn load_model(model_type: &str, config: &Value, vb: &Builder) -> Result<Box<dyn CausalLm>, ModelError> {
    match ARCHITECTURES.iter().find(|a| a.model_type == model_type) {
        Some(a) => (a.build)(model_type, config, vb),
        None => Err(ModelError::UnsupportedModelType(model_type.to_string())),
    }
}

/// Checks a checkpoint against the model its config.json describes without reading any
/// tensor data (the model is built over [`lmx_io::Weights::shapes_only`] and dropped): every
/// tensor the model needs is there with the shape the config implies, and nothing is left
/// over. `lmx convert` runs it before writing anything.
pub fn check_checkpoint(model_type: &str, config: &Value, weights: &lmx_io::Weights, quantization: Option<lmx_io::QuantConfig>) -> Result<(), ModelError> {
    let vb = Builder::new(weights.shapes_only(), lmx_core::DType::F32, &lmx_core::Device::Cpu).with_quantization(quantization);
    load_model(model_type, config, &vb)?;
    vb.finish(is_ignored_key)?;
    Ok(())
}

/// Checkpoint keys that are not weights and are deliberately ignored (rotary buffers some
/// exporters save).
pub fn is_ignored_key(key: &str) -> bool {
    key.ends_with("rotary_emb.inv_freq")
}
