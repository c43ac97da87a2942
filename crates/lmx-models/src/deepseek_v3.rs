//! DeepSeek-V3 (`model_type: deepseek_v3`: DeepSeek-V3/R1, Kimi-K2). Ports transformers'
//! `models/deepseek_v3/modeling_deepseek_v3.py` (v5): multi-head latent attention
//! ([`lmx_nn::Mla`]: a compressed KV cache, YaRN on the rotated part, the softmax scale
//! multiplied by YaRN's `mscale_all_dim` factor squared), dense MLPs in the first
//! `first_k_dense_replace` layers, then mixtures of `n_routed_experts` experts with DeepSeek's
//! grouped sigmoid routing (`e_score_correction_bias`, `n_group`, `topk_group`,
//! `routed_scaling_factor`) plus `n_shared_experts` shared experts every token takes. Experts
//! as Hugging Face stores them (`mlp.experts.{e}.*`) or stacked (`mlp.switch_mlp.*`).
//! `num_nextn_predict_layers` (the multi-token-prediction head) is not part of the model
//! transformers runs, and is not read.

use lmx_nn::{Activation, Bias, Builder, CausalLm, Decoder, DecoderConfig, DecoderLayer, MlaConfig, Mlp, Moe, MoeConfig, Rope, RopeConfig, Routing};
use serde::Deserialize;

use crate::registry::{Architecture, ModelError};

/// config.json of a DeepSeek-V3 model.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// vocab_size, hidden_size, num_hidden_layers, rms_norm_eps, tie_word_embeddings, max_position_embeddings.
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    /// rope_theta, rope_scaling / rope_parameters (YaRN with mscale / mscale_all_dim).
    #[serde(flatten)]
    pub rope: RopeConfig,
    /// The dense layers' MLP width.
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Routed experts (transformers 5 may also write `num_local_experts`).
    pub n_routed_experts: Option<usize>,
    pub num_local_experts: Option<usize>,
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub n_shared_experts: usize,
    #[serde(default = "one")]
    pub n_group: usize,
    #[serde(default = "one")]
    pub topk_group: usize,
    #[serde(default = "one_f32")]
    pub routed_scaling_factor: f32,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    #[serde(default = "yes")]
    pub rope_interleave: bool,
    #[serde(default)]
    pub attention_bias: bool,
}

fn one() -> usize {
    1
}

fn one_f32() -> f32 {
    1.0
}

fn yes() -> bool {
    true
}

impl Architecture for Config {
    fn build(&self, vb: &Builder) -> Result<Box<dyn CausalLm>, ModelError> {
        let (h, eps) = (self.decoder.hidden_size, self.decoder.rms_norm_eps);
        let rope = Rope::from_config(&self.rope, 10_000.0, self.qk_rope_head_dim, vb.dtype(), vb.device())?;
        // transformers' `yarn_apply_mscale`: the softmax scale grows with YaRN's factor.
        let scaling = self.rope.rope_scaling.as_ref().or(self.rope.rope_parameters.as_ref()).filter(|s| s.rope_type == "yarn");
        let mscale = match scaling.and_then(|s| s.mscale_all_dim.map(|m| (s.factor, m))) {
            Some((factor, m)) if m != 0.0 && factor > 1.0 => 0.1 * m * factor.ln() + 1.0,
            _ => 1.0,
        };
        let attention = MlaConfig {
            hidden_size: h,
            num_heads: self.num_attention_heads,
            q_lora_rank: self.q_lora_rank,
            kv_lora_rank: self.kv_lora_rank,
            qk_nope_head_dim: self.qk_nope_head_dim,
            qk_rope_head_dim: self.qk_rope_head_dim,
            v_head_dim: self.v_head_dim,
            scale: ((self.qk_nope_head_dim + self.qk_rope_head_dim) as f64).powf(-0.5) * mscale * mscale,
            interleaved: self.rope_interleave,
            rms_norm_eps: eps,
            attention_bias: self.attention_bias,
        };
        let experts = self.n_routed_experts.or(self.num_local_experts).unwrap_or(0);
        let moe = MoeConfig {
            routing: Routing::GroupedSigmoid { groups: self.n_group, topk_group: self.topk_group, scaling: self.routed_scaling_factor },
            ..MoeConfig::new(h, self.moe_intermediate_size, experts, self.num_experts_per_tok, self.norm_topk_prob)
        };
        let model = Decoder::new(vb, &self.decoder, rope, |vb, i| {
            let mlp = vb.pp("mlp");
            if i < self.first_k_dense_replace || experts == 0 {
                return DecoderLayer::latent(vb, &attention, Mlp::new(&mlp, h, self.intermediate_size, Bias::No, Activation::Silu)?, eps);
            }
            let mut block = Moe::new(&mlp, "gate", ["gate_proj", "up_proj", "down_proj"], &moe)?;
            if self.n_shared_experts > 0 {
                block = block.with_shared_experts(&mlp, h, self.moe_intermediate_size * self.n_shared_experts)?;
            }
            DecoderLayer::latent(vb, &attention, block, eps)
        })?;
        Ok(Box::new(model))
    }
}
