//! Qwen3-MoE (`model_type: qwen3_moe`: Qwen3-30B-A3B, Qwen3-235B-A22B). Ports transformers'
//! `models/qwen3_moe/modeling_qwen3_moe.py` (v5) and mlx-lm's `mlx_lm/models/qwen3_moe.py`:
//! Qwen3's attention (per-head q/k norms) with a mixture of experts in place of the MLP on
//! every `decoder_sparse_step`-th layer not listed in `mlp_only_layers`. Experts as
//! `mlx_lm.convert` writes them (`mlp.switch_mlp.*`, dense or quantized) or as Hugging Face
//! does (`mlp.experts.{e}.*`).

use lmx_nn::{Activation, AttentionConfig, Bias, Builder, CausalLm, Decoder, DecoderConfig, DecoderLayer, Mlp, Moe, QwenMoeArgs, Rope, RopeConfig};
use serde::Deserialize;

use crate::registry::{Architecture, ModelError};

/// config.json of a Qwen3-MoE model.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// vocab_size, hidden_size, num_hidden_layers, rms_norm_eps, tie_word_embeddings, max_position_embeddings.
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    /// rope_theta, rope_scaling / rope_parameters.
    #[serde(flatten)]
    pub rope: RopeConfig,
    /// The dense MLP's intermediate size (layers in `mlp_only_layers`).
    pub intermediate_size: usize,
    /// moe_intermediate_size, num_experts / num_local_experts, num_experts_per_tok,
    /// norm_topk_prob, decoder_sparse_step, mlp_only_layers.
    #[serde(flatten)]
    pub moe: QwenMoeArgs,
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
        let moe = self.moe.config(h);
        let model = Decoder::new(vb, &self.decoder, rope, |vb, i| {
            if self.moe.sparse(i) {
                DecoderLayer::with_mlp(vb, &attention, Moe::new(&vb.pp("mlp"), "gate", ["gate_proj", "up_proj", "down_proj"], &moe)?, eps)
            } else {
                DecoderLayer::with_mlp(vb, &attention, Mlp::new(&vb.pp("mlp"), h, self.intermediate_size, Bias::No, Activation::Silu)?, eps)
            }
        })?;
        Ok(Box::new(model))
    }
}
