//! lmx-models: one file per Hugging Face `model_type`, the [`CausalLm`] trait they implement,
//! and the registry that builds the right one from config.json.

pub mod llama;
pub mod mistral;
pub mod qwen2;
pub mod qwen3;
pub mod registry;

pub use registry::{load_model, ModelError, SUPPORTED_MODEL_TYPES};

use lmx_core::{Result, Tensor};
use lmx_nn::KvCache;

/// Which positions a forward pass returns logits for. candle is eager, so computing the
/// vocabulary projection only for the last position during generation must be explicit.
#[derive(Debug, Clone)]
pub enum Logits {
    /// Only the last position: (b, 1, vocab).
    Last,
    /// Every position: (b, seq_len, vocab).
    All,
    /// The positions with these indices into the flattened (b * seq_len) positions:
    /// (1, n, vocab). Training asks only for the positions its loss counts.
    Rows(Tensor),
}

impl Logits {
    /// The hidden states (b, seq_len, hidden) of the positions asked for.
    pub fn select(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Logits::Last => x.narrow(1, x.dim(1)? - 1, 1),
            Logits::All => Ok(x.clone()),
            Logits::Rows(idx) => {
                let (b, l, h) = x.dims3()?;
                x.reshape((b * l, h))?.index_select(idx, 0)?.unsqueeze(0)
            }
        }
    }
}

/// A decoder-only language model.
pub trait CausalLm: Send + Sync {
    /// Runs `input_ids` (b, seq_len) after the `cache.offset()` positions already cached,
    /// appends their keys and values to `cache`, and returns f32 logits.
    fn forward(&self, input_ids: &Tensor, cache: &mut KvCache, logits: Logits) -> Result<Tensor>;

    /// An empty cache sized for this model.
    fn new_cache(&self) -> KvCache;

    /// Vocabulary size (logits width).
    fn vocab_size(&self) -> usize;

    /// The longest context the model was trained for (`max_position_embeddings`).
    fn max_position_embeddings(&self) -> usize;

    /// The device the weights live on (inputs go there).
    fn device(&self) -> &lmx_core::Device;
}

/// Shared by the model files' tests: the smoke checks every architecture must pass.
#[cfg(test)]
pub(crate) mod testing;
