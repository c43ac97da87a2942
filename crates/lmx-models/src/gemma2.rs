//! Gemma 2 (`model_type: gemma2`). Ports transformers' `models/gemma2/modeling_gemma2.py` (v5)
//! and mlx-lm's `mlx_lm/models/gemma2.py`. Differs from Llama by: four norms per layer (before
//! and after attention, before and after the MLP: `lmx_nn::SandwichLayer`), every norm multiplying by `1 + weight`,
//! GeGLU (`gelu_pytorch_tanh`), embeddings scaled by `sqrt(hidden_size)`, attention logits
//! scaled by `query_pre_attn_scalar^-0.5` and capped (`attn_logit_softcapping`), sliding-window
//! attention on every other layer (`layer_types`, else layers 0, 2, 4, ...), and capped final
//! logits (`final_logit_softcapping`). Not supported yet: the rotating cache for the sliding
//! layers (they keep every key and mask by the window).

use lmx_nn::{sliding_layers, Activation, AttentionConfig, Builder, CausalLm, Decoder, DecoderConfig, DecoderStyle, Rope, RopeConfig, SandwichLayer};
use serde::Deserialize;

use crate::registry::{Architecture, ModelError};

/// config.json of a Gemma 2 model.
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
    pub query_pre_attn_scalar: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub sliding_window: Option<usize>,
    /// `sliding_attention` or `full_attention` per layer.
    pub layer_types: Option<Vec<String>>,
}

impl Architecture for Config {
    fn build(&self, vb: &Builder) -> std::result::Result<Box<dyn CausalLm>, ModelError> {
        let (h, eps) = (self.decoder.hidden_size, self.decoder.rms_norm_eps);
        let sliding = sliding_layers(self.layer_types.as_deref(), self.decoder.num_hidden_layers, |i| i % 2 == 0)?;
        let heads = AttentionConfig::from_heads(h, self.num_attention_heads, self.num_key_value_heads, self.head_dim)?;
        let scale = self.query_pre_attn_scalar.unwrap_or(heads.head_dim as f64).powf(-0.5);
        let attention = AttentionConfig { qkv_bias: self.attention_bias, o_bias: self.attention_bias, softcap: self.attn_logit_softcapping, scale: Some(scale), ..heads };
        let rope = Rope::from_config(&self.rope, 10_000.0, heads.head_dim, vb.dtype(), vb.device())?;
        let style = DecoderStyle { embed_scale: Some((h as f64).sqrt()), norm_one_plus: true, logit_softcap: self.final_logit_softcapping };
        let model = Decoder::with_style(vb, &self.decoder, vec![rope], style, |vb, i| {
            let attention = AttentionConfig { sliding_window: if sliding[i] { self.sliding_window } else { None }, ..attention };
            SandwichLayer::new(vb, &attention, self.intermediate_size, Activation::GeluTanh, eps)
        })?;
        Ok(Box::new(model))
    }
}
