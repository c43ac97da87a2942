//! lmx-models: one file per Hugging Face `model_type` (its config, weight names and wiring of
//! the shared layers in `lmx-nn`), and the registry table that builds the right one from
//! config.json.

pub mod deepseek_v3;
pub mod gemma2;
pub mod gemma3;
pub mod gpt_oss;
pub mod llama;
pub mod mistral;
pub mod mixtral;
pub mod phi3;
pub mod qwen2;
pub mod qwen2_moe;
pub mod qwen3;
pub mod qwen3_moe;
pub mod registry;

pub use lmx_nn::{CausalLm, Logits};
pub use registry::{check_checkpoint, load_model, supported_model_types, Architecture, ModelError, ARCHITECTURES};

/// Shared by the tests: every architecture against its golden fixture, whole and sharded.
#[cfg(test)]
mod testing;
