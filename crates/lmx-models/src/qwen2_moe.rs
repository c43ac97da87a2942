//! Qwen2-MoE (`model_type: qwen2_moe`: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B). Ports transformers'
//! `models/qwen2_moe/modeling_qwen2_moe.py` (v5) and mlx-lm's `mlx_lm/models/qwen2_moe.py`:
//! Qwen2's attention (q/k/v biases) with a mixture of experts plus a shared expert every token
//! takes, weighted by the sigmoid of its own gate; the routed weights are not renormalized
//! unless `norm_topk_prob`.

use lmx_nn::{Activation, AttentionConfig, Bias, Builder, CausalLm, Decoder, DecoderConfig, DecoderLayer, Mlp, Moe, QwenMoeArgs, Rope, RopeConfig};
use serde::Deserialize;

use crate::registry::{Architecture, ModelError};

/// config.json of a Qwen2-MoE model.
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
    pub shared_expert_intermediate_size: usize,
    /// moe_intermediate_size, num_experts / num_local_experts, num_experts_per_tok,
    /// norm_topk_prob, decoder_sparse_step, mlp_only_layers.
    #[serde(flatten)]
    pub moe: QwenMoeArgs,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
}

impl Architecture for Config {
    fn build(&self, vb: &Builder) -> Result<Box<dyn CausalLm>, ModelError> {
        let (h, eps) = (self.decoder.hidden_size, self.decoder.rms_norm_eps);
        let heads = AttentionConfig::from_heads(h, self.num_attention_heads, self.num_key_value_heads, None)?;
        let attention = AttentionConfig { qkv_bias: true, ..heads };
        let rope = Rope::from_config(&self.rope, 1_000_000.0, heads.head_dim, vb.dtype(), vb.device())?;
        let moe = self.moe.config(h);
        let model = Decoder::new(vb, &self.decoder, rope, |vb, i| {
            let mlp = vb.pp("mlp");
            if self.moe.sparse(i) {
                let block = Moe::new(&mlp, "gate", ["gate_proj", "up_proj", "down_proj"], &moe)?.with_shared_expert(&mlp, h, self.shared_expert_intermediate_size)?;
                DecoderLayer::with_mlp(vb, &attention, block, eps)
            } else {
                DecoderLayer::with_mlp(vb, &attention, Mlp::new(&mlp, h, self.intermediate_size, Bias::No, Activation::Silu)?, eps)
            }
        })?;
        Ok(Box::new(model))
    }
}
