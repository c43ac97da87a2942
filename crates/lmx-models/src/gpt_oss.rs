//! gpt-oss (`model_type: gpt_oss`: gpt-oss-20b, gpt-oss-120b). Ports transformers'
//! `models/gpt_oss/modeling_gpt_oss.py` (v5) and mlx-lm's `mlx_lm/models/gpt_oss.py`:
//! attention with biases and a learned sink logit per head, sliding-window layers (128) and
//! full ones alternating (`layer_types`), YaRN rotary scaling, and a mixture of experts in
//! every layer: the `router` (with a bias) keeps the top k logits and softmaxes over them;
//! each expert is a clamped SwiGLU (`swiglu_limit`, alpha 1.702) with biases. Experts as
//! `mlx_lm` stores them (`mlp.experts.{gate,up,down}_proj`, stacked, dense or quantized) or as
//! transformers does (`mlp.experts.gate_up_proj` with gate and up interleaved, inputs first).
//!
//! YaRN: transformers honours the config's `truncate: false` (gpt-oss's), MLX LM always
//! rounds the ramp's ends; lmx follows the config, so its logits equal transformers' and
//! differ slightly from MLX LM's (cos and sin of the ramp's edge frequencies).

use lmx_nn::{sliding_layers, Activation, AttentionConfig, Builder, CausalLm, Decoder, DecoderConfig, DecoderLayer, Moe, MoeConfig, Rope, RopeConfig, Routing};
use serde::Deserialize;

use crate::registry::{Architecture, ModelError};

/// config.json of a gpt-oss model.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// vocab_size, hidden_size, num_hidden_layers, rms_norm_eps, tie_word_embeddings, max_position_embeddings.
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    /// rope_theta, rope_scaling / rope_parameters (YaRN).
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
    /// `sliding_attention` / `full_attention` per layer (default: alternating, sliding first).
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "yes")]
    pub attention_bias: bool,
    #[serde(default = "swiglu_limit")]
    pub swiglu_limit: f32,
    #[serde(default = "swiglu_alpha")]
    pub swiglu_alpha: f32,
}

fn yes() -> bool {
    true
}

fn swiglu_limit() -> f32 {
    7.0
}

fn swiglu_alpha() -> f32 {
    1.702
}

impl Architecture for Config {
    fn build(&self, vb: &Builder) -> Result<Box<dyn CausalLm>, ModelError> {
        let (h, eps) = (self.decoder.hidden_size, self.decoder.rms_norm_eps);
        let sliding = sliding_layers(self.layer_types.as_deref(), self.decoder.num_hidden_layers, |i| i % 2 == 0)?;
        let heads = AttentionConfig::from_heads(h, self.num_attention_heads, self.num_key_value_heads, self.head_dim.or(Some(64)))?;
        let attention = AttentionConfig { qkv_bias: self.attention_bias, o_bias: self.attention_bias, sinks: true, ..heads };
        let rope = Rope::from_config(&self.rope, 150_000.0, heads.head_dim, vb.dtype(), vb.device())?;
        let moe = MoeConfig {
            routing: Routing::TopKSoftmax,
            bias: true,
            activation: Activation::ClampedSwiglu { alpha: self.swiglu_alpha, limit: self.swiglu_limit },
            ..MoeConfig::new(h, self.intermediate_size, self.num_local_experts, self.num_experts_per_tok, false)
        };
        let model = Decoder::new(vb, &self.decoder, rope, |vb, i| {
            let attention = AttentionConfig { sliding_window: if sliding[i] { self.sliding_window } else { None }, ..attention };
            DecoderLayer::with_mlp(vb, &attention, Moe::new(&vb.pp("mlp"), "router", ["gate_proj", "up_proj", "down_proj"], &moe)?, eps)
        })?;
        Ok(Box::new(model))
    }
}
