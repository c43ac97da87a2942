//! Qwen2 / Qwen2.5 (`model_type: qwen2`). Ports transformers' `models/qwen2/modeling_qwen2.py`
//! (v5) and mlx-lm's `mlx_lm/models/qwen2.py`. Differs from Llama by biases on the query, key
//! and value projections (none on the output projection). Not supported yet:
//! `use_sliding_window: true` (no released Qwen2 checkpoint enables it).

use lmx_nn::{AttentionConfig, Builder, CausalLm, Decoder, DecoderConfig, DecoderLayer, Rope, RopeConfig};
use serde::Deserialize;

use crate::registry::{Architecture, ModelError};

/// config.json of a Qwen2 model.
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
}

impl Architecture for Config {
    fn build(&self, vb: &Builder) -> Result<Box<dyn CausalLm>, ModelError> {
        let (h, eps) = (self.decoder.hidden_size, self.decoder.rms_norm_eps);
        let heads = AttentionConfig::from_heads(h, self.num_attention_heads, self.num_key_value_heads, self.head_dim)?;
        let attention = AttentionConfig { qkv_bias: true, ..heads };
        let rope = Rope::from_config(&self.rope, 10_000.0, heads.head_dim, vb.dtype(), vb.device())?;
        let model = Decoder::new(vb, &self.decoder, rope, |vb, _| DecoderLayer::new(vb, &attention, self.intermediate_size, false, eps))?;
        Ok(Box::new(model))
    }
}
