//! lmx-io: everything that turns bytes on disk into tensors, configs and tokenizers.
//!
//! A model comes from a Hugging Face folder (safetensors, single or sharded), a GGUF file
//! (renamed to Hugging Face names here, never inside a model file), or an `org/name` id found
//! in the local Hugging Face cache. Whatever the source, the rest of lmx sees one
//! [`ModelFiles`]: a config.json value, a strict [`Weights`] store, a tokenizer and a chat
//! template.

pub mod adapters;
pub mod chat_template;
pub mod config;
pub mod error;
pub mod gguf;
pub mod hub;
pub mod model_files;
pub mod quant_config;
pub mod safetensors_io;
pub mod temp;
pub mod tokenizer;
pub mod weights;

pub use adapters::{AdapterConfig, FineTuneType, LoraParameters};
pub use chat_template::{ChatTemplate, Message};
pub use error::{IoError, Result};
pub use model_files::{ModelFiles, ModelSource};
pub use quant_config::{QuantConfig, QuantSpec};
pub use tokenizer::{StreamDecoder, Tokenizer};
pub use weights::Weights;
