//! Gemma 3, text only (`model_type: gemma3_text`). Ports transformers'
//! `models/gemma3/modeling_gemma3.py` (v5, `Gemma3ForCausalLM`) and mlx-lm's
//! `mlx_lm/models/gemma3_text.py`. Gemma 2's layer (`lmx_nn::SandwichLayer`: four `1 + w`
//! norms, GeGLU, scaled embeddings, `query_pre_attn_scalar`), plus `1 + w` norms on each query
//! and key head, and two rotary tables: sliding layers rotate by a local base
//! (`rope_local_base_freq`, 10000), full layers by the global one (`rope_theta`, 1e6, with
//! `rope_scaling`); transformers v5 writes both under `rope_parameters.sliding_attention` /
//! `.full_attention`. Five sliding layers to one full by default (`layer_types`,
//! `sliding_window_pattern`). Not supported yet: the vision tower of `gemma3`
//! (image-text-to-text) checkpoints, and the rotating cache for the sliding layers.

use lmx_nn::{sliding_layers, Activation, AttentionConfig, BuildError, Builder, CausalLm, Decoder, DecoderConfig, DecoderStyle, Rope, RopeScaling, SandwichLayer};
use serde::Deserialize;
use serde_json::Value;

use crate::registry::{Architecture, ModelError};

/// config.json of a Gemma 3 text model.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// vocab_size, hidden_size, num_hidden_layers, rms_norm_eps, tie_word_embeddings, max_position_embeddings.
    #[serde(flatten)]
    pub decoder: DecoderConfig,
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
    /// Every this many layers one is full (older configs), else `layer_types`.
    pub sliding_window_pattern: Option<usize>,
    /// transformers v5: `{"sliding_attention": {...}, "full_attention": {...}}`.
    pub rope_parameters: Option<Value>,
    /// Older spellings: the global base, its scaling, and the local base.
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RopeScaling>,
    pub rope_local_base_freq: Option<f64>,
}

/// A rotary table's base and scaling.
type RopeParams = (f64, Option<RopeScaling>);

impl Config {
    /// The global and local rotary parameters.
    fn ropes(&self) -> Result<(RopeParams, RopeParams), BuildError> {
        let parse = |key: &'static str, v: &Value| -> Result<RopeScaling, BuildError> {
            serde_json::from_value(v.clone()).map_err(|e| BuildError::ConfigValue {
                key,
                value: v.to_string(),
                allowed: if e.is_data() { "a rope_parameters entry: {\"rope_type\", \"rope_theta\", \"factor\"}" } else { "a JSON object" },
            })
        };
        let nested = self.rope_parameters.as_ref().filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
        if let Some(p) = nested {
            let global = p.get("full_attention").map(|v| parse("rope_parameters.full_attention", v)).transpose()?;
            let local = p.get("sliding_attention").map(|v| parse("rope_parameters.sliding_attention", v)).transpose()?;
            let theta = |s: &Option<RopeScaling>, default| s.as_ref().and_then(|s| s.rope_theta).unwrap_or(default);
            return Ok(((theta(&global, 1_000_000.0), global), (theta(&local, 10_000.0), local)));
        }
        Ok(((self.rope_theta.unwrap_or(1_000_000.0), self.rope_scaling.clone()), (self.rope_local_base_freq.unwrap_or(10_000.0), None)))
    }
}

impl Architecture for Config {
    fn build(&self, vb: &Builder) -> std::result::Result<Box<dyn CausalLm>, ModelError> {
        let (h, eps) = (self.decoder.hidden_size, self.decoder.rms_norm_eps);
        let sliding = sliding_layers(self.layer_types.as_deref(), self.decoder.num_hidden_layers, |i| (i + 1) % self.sliding_window_pattern.unwrap_or(6).max(1) != 0)?;
        let heads = AttentionConfig::from_heads(h, self.num_attention_heads, self.num_key_value_heads, self.head_dim)?;
        let scale = self.query_pre_attn_scalar.unwrap_or(heads.head_dim as f64).powf(-0.5);
        let attention = AttentionConfig {
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            qk_norm_eps: Some(eps),
            qk_norm_one_plus: true,
            softcap: self.attn_logit_softcapping,
            scale: Some(scale),
            ..heads
        };
        let ((global_theta, global_scaling), (local_theta, local_scaling)) = self.ropes()?;
        // Table 0 rotates the full layers, table 1 the sliding ones.
        let global = Rope::new(global_theta, heads.head_dim, global_scaling.as_ref(), vb.dtype(), vb.device())?;
        let local = Rope::new(local_theta, heads.head_dim, local_scaling.as_ref(), vb.dtype(), vb.device())?;
        let style = DecoderStyle { embed_scale: Some((h as f64).sqrt()), norm_one_plus: true, logit_softcap: self.final_logit_softcapping };
        let model = Decoder::with_style(vb, &self.decoder, vec![global, local], style, |vb, i| {
            let attention = AttentionConfig { sliding_window: if sliding[i] { self.sliding_window } else { None }, rope_table: usize::from(sliding[i]), ..attention };
            SandwichLayer::new(vb, &attention, self.intermediate_size, Activation::GeluTanh, eps)
        })?;
        Ok(Box::new(model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: Value) -> Config {
        let mut v = serde_json::json!({"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 7, "rms_norm_eps": 1e-6, "intermediate_size": 8, "num_attention_heads": 2});
        for (k, x) in extra.as_object().into_iter().flatten() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).expect("a config")
    }

    #[test]
    fn both_rope_spellings_and_the_default_layer_pattern() {
        let old = config(serde_json::json!({"rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}));
        let new = config(
            serde_json::json!({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
        );
        for c in [&old, &new] {
            let ((gt, gs), (lt, ls)) = c.ropes().expect("ropes");
            assert_eq!((gt, lt), (1e6, 1e4));
            assert_eq!(gs.map(|s| (s.rope_type, s.factor)), Some(("linear".to_string(), 8.0)));
            assert!(ls.is_none_or(|s| s.rope_type == "default"));
        }
        // Five sliding layers, then a full one.
        let pattern = old.sliding_window_pattern.unwrap_or(6);
        let sliding = sliding_layers(None, 7, |i| (i + 1) % pattern != 0).expect("layers");
        assert_eq!(sliding, [true, true, true, true, true, false, true]);
        assert!(sliding_layers(Some(&["sliding_attention".to_string()]), 2, |_| true).is_err());
    }
}
