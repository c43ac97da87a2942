//! lmx-nn: the layers every model file is assembled from.
//!
//! A model file asks these constructors for its layers by checkpoint key; they read the
//! weights (strictly, with shapes) from [`lmx_io::WeightsPath`]. Quantized, LoRA and sharded
//! variants of [`Linear`] will come from the same constructor, so model files never change for
//! a new weight format.

pub mod kv_cache;
pub mod layers;
pub mod rope;

pub use kv_cache::KvCache;
pub use layers::{Bias, Embedding, Linear, Mlp, RmsNorm};
pub use rope::{Rope, RopeScaling};
