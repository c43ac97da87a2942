//! lmx-nn: the layers every model file is assembled from.
//!
//! A model file asks these constructors for its layers by checkpoint key; they read the
//! weights (strictly, with shapes) from [`lmx_io::WeightsPath`]. Quantized weights and LoRA/DoRA
//! adapters come from the same constructor, so model files never change for a new weight
//! format or fine-tuning method.

pub mod adapter;
pub mod checkpoint;
pub mod kv_cache;
pub mod layers;
pub mod rope;

pub use adapter::Adapter;
pub use kv_cache::KvCache;
pub use layers::{Bias, Embedding, Linear, Mlp, RmsNorm};
pub use rope::{Rope, RopeScaling};
