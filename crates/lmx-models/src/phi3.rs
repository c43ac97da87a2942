//! Phi-3, Phi-3.5 and Phi-4 (`model_type: phi3`). Ports transformers'
//! `models/phi3/modeling_phi3.py` (v5) and mlx-lm's `mlx_lm/models/phi3.py`. Llama's layer with
//! q, k and v stored as one `qkv_proj` and gate and up as one `gate_up_proj` (read as row
//! slices, so they shard and quantize as separate projections), LongRoPE (`rope_scaling`
//! `longrope`: per-frequency divisors and an attention factor on cos and sin; the long
//! factors at every length, as MLX LM does, where transformers switches from the short ones
//! past `original_max_position_embeddings`), `partial_rotary_factor` (Phi-4-mini rotates the
//! first 3/4 of each head) and an optional sliding window. Not supported yet: LoRA adapters on
//! the fused projections.

use lmx_nn::{Activation, AttentionConfig, Bias, BuildError, Builder, CausalLm, Decoder, DecoderConfig, DecoderLayer, Mlp, Rope, RopeConfig};
use serde::Deserialize;

use crate::registry::{Architecture, ModelError};

/// config.json of a Phi-3 model.
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
    pub sliding_window: Option<usize>,
    pub partial_rotary_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

impl Architecture for Config {
    fn build(&self, vb: &Builder) -> std::result::Result<Box<dyn CausalLm>, ModelError> {
        let (h, eps) = (self.decoder.hidden_size, self.decoder.rms_norm_eps);
        let heads = AttentionConfig::from_heads(h, self.num_attention_heads, self.num_key_value_heads, None)?;
        let scaling = self.rope.rope_scaling.as_ref().or(self.rope.rope_parameters.as_ref());
        let partial = self.partial_rotary_factor.or(scaling.and_then(|s| s.partial_rotary_factor)).unwrap_or(1.0);
        let rotary_dim = ((heads.head_dim as f64 * partial) as usize) & !1;
        if !(partial > 0.0 && partial <= 1.0) || rotary_dim == 0 {
            return Err(BuildError::ConfigValue { key: "partial_rotary_factor", value: partial.to_string(), allowed: "a fraction in (0, 1] of the head width" }.into());
        }
        let mut rope = Rope::from_config(&self.rope, 10_000.0, rotary_dim, vb.dtype(), vb.device())?;
        if let Some(s) = scaling.filter(|s| s.rope_type == "longrope" || s.rope_type == "su") {
            let original = s.original_max_position_embeddings.or(self.original_max_position_embeddings.map(|o| o as f64)).unwrap_or(4096.0);
            let factor = if s.factor != 1.0 { s.factor } else { self.decoder.max_position_embeddings as f64 / original };
            let mscale = s.attention_factor.unwrap_or(if factor <= 1.0 { 1.0 } else { (1.0 + factor.ln() / original.ln()).sqrt() });
            rope = rope.with_mscale(mscale);
        }
        let attention = AttentionConfig { fused_qkv: true, rotary_dim: Some(rotary_dim), sliding_window: self.sliding_window, ..heads };
        let model = Decoder::new(vb, &self.decoder, rope, |vb, _| {
            let mlp = Mlp::with_fused_gate_up(&vb.pp("mlp"), h, self.intermediate_size, Bias::No, Activation::Silu)?;
            DecoderLayer::with_mlp(vb, &attention, mlp, eps)
        })?;
        Ok(Box::new(model))
    }
}
