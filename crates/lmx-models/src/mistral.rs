//! Mistral (`model_type: mistral`): Mistral 7B v0.1-v0.3 and Ministral-style dense models.
//! Ports transformers' `models/mistral/modeling_mistral.py` (v5) and mlx-lm's
//! `mlx_lm/models/mistral.py` (which reuses llama). Differs from Llama by the optional
//! `sliding_window`, which limits how far back each token attends, and no biases.

use lmx_nn::{AttentionConfig, Builder, CausalLm, Decoder, DecoderConfig, DecoderLayer, Rope, RopeConfig};
use serde::Deserialize;

use crate::registry::{Architecture, ModelError};

/// config.json of a Mistral model.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// vocab_size, hidden_size, num_hidden_layers, rms_norm_eps, tie_word_embeddings, max_position_embeddings.
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    /// rope_theta, rope_scaling / rope_parameters.
    #[serde(flatten)]
    pub rope: RopeConfig,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub sliding_window: Option<usize>,
}

impl Architecture for Config {
    fn build(&self, vb: &Builder) -> Result<Box<dyn CausalLm>, ModelError> {
        let (h, eps) = (self.decoder.hidden_size, self.decoder.rms_norm_eps);
        let heads = AttentionConfig::from_heads(h, self.num_attention_heads, self.num_key_value_heads, self.head_dim)?;
        let attention = AttentionConfig { sliding_window: self.sliding_window, ..heads };
        let rope = Rope::from_config(&self.rope, 10_000.0, heads.head_dim, vb.dtype(), vb.device())?;
        let model = Decoder::new(vb, &self.decoder, rope, |vb, _| DecoderLayer::new(vb, &attention, self.intermediate_size, false, eps))?;
        Ok(Box::new(model))
    }
}
