//! Mixtral (`model_type: mixtral`: Mixtral 8x7B, 8x22B). Ports transformers'
//! `models/mixtral/modeling_mixtral.py` (v5) and mlx-lm's `mlx_lm/models/mixtral.py`:
//! Mistral's attention (an optional `sliding_window`) with a mixture of experts in every layer
//! (`block_sparse_moe`: the router `gate`, experts `w1` (gate), `w3` (up), `w2` (down) in
//! Hugging Face's checkpoints, stacked into `switch_mlp` by `mlx_lm.convert`). The kept
//! experts' softmax weights are renormalized (MLX LM: a softmax over the top k logits, the
//! same thing).

use lmx_nn::{AttentionConfig, Builder, CausalLm, Decoder, DecoderConfig, DecoderLayer, Moe, MoeConfig, Rope, RopeConfig};
use serde::Deserialize;

use crate::registry::{Architecture, ModelError};

/// config.json of a Mixtral model.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// vocab_size, hidden_size, num_hidden_layers, rms_norm_eps, tie_word_embeddings, max_position_embeddings.
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    /// rope_theta, rope_scaling / rope_parameters.
    #[serde(flatten)]
    pub rope: RopeConfig,
    /// Each expert's intermediate size.
    pub intermediate_size: usize,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
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
        let rope = Rope::from_config(&self.rope, 1_000_000.0, heads.head_dim, vb.dtype(), vb.device())?;
        let moe = MoeConfig::new(h, self.intermediate_size, self.num_local_experts, self.num_experts_per_tok, true);
        let model = Decoder::new(vb, &self.decoder, rope, |vb, _| DecoderLayer::with_mlp(vb, &attention, Moe::new(&vb.pp("block_sparse_moe"), "gate", ["w1", "w3", "w2"], &moe)?, eps))?;
        Ok(Box::new(model))
    }
}
