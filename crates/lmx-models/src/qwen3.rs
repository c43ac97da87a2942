//! Qwen3 (`model_type: qwen3`): Qwen3 dense models. Ports transformers'
//! `models/qwen3/modeling_qwen3.py` (v5) and mlx-lm's `mlx_lm/models/qwen3.py`. Differs from
//! Llama by RMS norms on each query and key head (`q_norm`, `k_norm`) before the rotation, and
//! an explicit `head_dim`. Not supported yet: `use_sliding_window: true`.

use lmx_nn::{AttentionConfig, Builder, CausalLm, Decoder, DecoderConfig, DecoderLayer, Rope, RopeConfig};
use serde::Deserialize;

use crate::registry::{Architecture, ModelError};

/// config.json of a Qwen3 model.
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
    #[serde(default)]
    pub attention_bias: bool,
}

impl Architecture for Config {
    fn build(&self, vb: &Builder) -> Result<Box<dyn CausalLm>, ModelError> {
        let (h, eps) = (self.decoder.hidden_size, self.decoder.rms_norm_eps);
        let heads = AttentionConfig::from_heads(h, self.num_attention_heads, self.num_key_value_heads, self.head_dim)?;
        let attention = AttentionConfig { qkv_bias: self.attention_bias, o_bias: self.attention_bias, qk_norm_eps: Some(eps), ..heads };
        let rope = Rope::from_config(&self.rope, 10_000.0, heads.head_dim, vb.dtype(), vb.device())?;
        let model = Decoder::new(vb, &self.decoder, rope, |vb, _| DecoderLayer::new(vb, &attention, self.intermediate_size, false, eps))?;
        Ok(Box::new(model))
    }
}
