//! Qwen3-MoE (`model_type: qwen3_moe`: Qwen3-30B-A3B, Qwen3-235B-A22B). Ports transformers'
//! `models/qwen3_moe/modeling_qwen3_moe.py` (v5) and mlx-lm's `mlx_lm/models/qwen3_moe.py`:
//! Qwen3's attention (per-head q/k norms) with a mixture of experts in place of the MLP on
//! every `decoder_sparse_step`-th layer not listed in `mlp_only_layers`. Experts as
//! `mlx_lm.convert` writes them (`mlp.switch_mlp.*`, dense or quantized) or as Hugging Face
//! does (`mlp.experts.{e}.*`).

use lmx_nn::{Activation, AttentionConfig, Bias, Builder, CausalLm, Decoder, DecoderConfig, DecoderLayer, Mlp, Moe, MoeConfig, Rope, RopeConfig};
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
    /// Each expert's intermediate size.
    pub moe_intermediate_size: usize,
    /// Experts per MoE layer: `num_experts` in Qwen's checkpoints, `num_local_experts` as
    /// transformers 5 writes it (a file may hold both).
    pub num_experts: Option<usize>,
    pub num_local_experts: Option<usize>,
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub attention_bias: bool,
}

fn one() -> usize {
    1
}

impl Config {
    fn experts(&self) -> usize {
        self.num_experts.or(self.num_local_experts).unwrap_or(0)
    }

    /// Whether layer `i` holds experts (transformers' rule).
    fn sparse(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i) && self.experts() > 0 && (i + 1) % self.decoder_sparse_step.max(1) == 0
    }
}

impl Architecture for Config {
    fn build(&self, vb: &Builder) -> Result<Box<dyn CausalLm>, ModelError> {
        let (h, eps) = (self.decoder.hidden_size, self.decoder.rms_norm_eps);
        let heads = AttentionConfig::from_heads(h, self.num_attention_heads, self.num_key_value_heads, self.head_dim)?;
        let attention = AttentionConfig { qkv_bias: self.attention_bias, o_bias: self.attention_bias, qk_norm_eps: Some(eps), ..heads };
        let rope = Rope::from_config(&self.rope, 10_000.0, heads.head_dim, vb.dtype(), vb.device())?;
        let moe = MoeConfig { hidden_size: h, intermediate_size: self.moe_intermediate_size, num_experts: self.experts(), top_k: self.num_experts_per_tok, normalize: self.norm_topk_prob };
        let model = Decoder::new(vb, &self.decoder, rope, |vb, i| {
            if self.sparse(i) {
                DecoderLayer::with_mlp(vb, &attention, Moe::new(&vb.pp("mlp"), "gate", ["gate_proj", "up_proj", "down_proj"], &moe)?, eps)
            } else {
                DecoderLayer::with_mlp(vb, &attention, Mlp::new(&vb.pp("mlp"), h, self.intermediate_size, Bias::No, Activation::Silu)?, eps)
            }
        })?;
        Ok(Box::new(model))
    }
}
