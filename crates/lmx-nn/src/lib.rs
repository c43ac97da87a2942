//! lmx-nn: the layers every model file is assembled from, and the builder that makes them.
//!
//! A model file describes its architecture (config, weight names, wiring) and asks the
//! [`Builder`] for its layers by checkpoint key. The builder decides how each weight is built:
//! dense or quantized, on which device and in which dtype, with which adapter, trainable or
//! frozen, and which shard of it this rank holds; the shared layers ([`Attention`], [`Mlp`],
//! [`DecoderLayer`], [`Decoder`]) compute. So a model file never changes for a new weight
//! format, fine-tuning method, device or parallelism.

pub mod adapter;
pub mod attention;
pub mod builder;
pub mod checkpoint;
pub mod decoder;
pub mod error;
pub mod kv_cache;
pub mod linear;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod rope;
pub mod training;

pub use adapter::{Adapter, AdapterPlan};
pub use attention::{Attention, AttentionConfig, AttentionInput};
pub use builder::{Builder, Shard};
pub use decoder::{sliding_layers, CausalLm, Decoder, DecoderConfig, DecoderLayer, DecoderStyle, FeedForward, Layer, Logits, SandwichLayer, SelfAttention};
pub use error::BuildError;
pub use kv_cache::{KvCache, KvOptions, KvView, LayerState, StepRows};
pub use linear::{Bias, Embedding, Linear, RmsNorm};
pub use mla::{Mla, MlaConfig};
pub use mlp::{Activation, Mlp};
pub use moe::{Moe, MoeConfig, QwenMoeArgs, Routing};
pub use rope::{Rope, RopeConfig, RopeScaling};
pub use training::{Checkpointing, GradSink, Training};
