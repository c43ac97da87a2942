//! Qwen3 (`model_type: qwen3`): Qwen3 dense models. Ports transformers'
//! `models/qwen3/modeling_qwen3.py` (v5) and mlx-lm's `mlx_lm/models/qwen3.py`. Differs from
//! Llama by RMS norms on each query and key head (`q_norm`, `k_norm`) before the rotation, and
//! an explicit `head_dim`. Not supported yet: `use_sliding_window: true`.

use std::sync::Arc;

use lmx_core::{ops, DType, Module, Result, Tensor};
use lmx_io::WeightsPath;
use lmx_nn::{Bias, Embedding, KvCache, Linear, Mlp, RmsNorm, Rope, RopeScaling};
use serde::Deserialize;

use crate::registry::ModelError;
use crate::{CausalLm, Logits};

/// config.json of a Qwen3 model.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<RopeScaling>,
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
}

fn default_max_positions() -> usize {
    2048
}

impl Config {
    fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

fn bias(yes: bool) -> Bias {
    if yes { Bias::Yes } else { Bias::No }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &Config, vb: &WeightsPath) -> lmx_io::Result<Self> {
        let (h, hd, n_kv) = (cfg.hidden_size, cfg.head_dim(), cfg.n_kv_heads());
        let b = bias(cfg.attention_bias);
        Ok(Self {
            q_proj: Linear::new(&vb.pp("q_proj"), h, cfg.num_attention_heads * hd, b)?,
            k_proj: Linear::new(&vb.pp("k_proj"), h, n_kv * hd, b)?,
            v_proj: Linear::new(&vb.pp("v_proj"), h, n_kv * hd, b)?,
            o_proj: Linear::new(&vb.pp("o_proj"), cfg.num_attention_heads * hd, h, b)?,
            q_norm: RmsNorm::new(&vb.pp("q_norm"), hd, cfg.rms_norm_eps)?,
            k_norm: RmsNorm::new(&vb.pp("k_norm"), hd, cfg.rms_norm_eps)?,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, cache: &mut KvCache, layer_idx: usize) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        // (b, heads, l, head_dim)
        let q = self.q_proj.forward(x)?.reshape((b, l, self.n_heads, self.head_dim))?;
        let q = self.q_norm.forward(&q)?.transpose(1, 2)?;
        let k = self.k_proj.forward(x)?.reshape((b, l, self.n_kv_heads, self.head_dim))?;
        let k = self.k_norm.forward(&k)?.transpose(1, 2)?;
        let v = self.v_proj.forward(x)?.reshape((b, l, self.n_kv_heads, self.head_dim))?.transpose(1, 2)?;
        let q = ops::rope(&q, cos, sin)?;
        let k = ops::rope(&k, cos, sin)?;
        let (k, v) = cache.append(layer_idx, &k, &v)?;
        let y = ops::attention(&q.contiguous()?, &k, &v, mask, 1.0 / (self.head_dim as f64).sqrt())?;
        self.o_proj.forward(&y.transpose(1, 2)?.reshape((b, l, self.n_heads * self.head_dim))?)
    }
}

struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn new(cfg: &Config, vb: &WeightsPath) -> lmx_io::Result<Self> {
        Ok(Self {
            self_attn: Attention::new(cfg, &vb.pp("self_attn"))?,
            mlp: Mlp::new(&vb.pp("mlp"), cfg.hidden_size, cfg.intermediate_size, Bias::No)?,
            input_layernorm: RmsNorm::new(&vb.pp("input_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            post_attention_layernorm: RmsNorm::new(&vb.pp("post_attention_layernorm"), cfg.hidden_size, cfg.rms_norm_eps)?,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>, cache: &mut KvCache, layer_idx: usize) -> Result<Tensor> {
        let h = self.self_attn.forward(&self.input_layernorm.forward(x)?, cos, sin, mask, cache, layer_idx)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.post_attention_layernorm.forward(&x)?)?;
        x + h
    }
}

/// The `model.` subtree: embeddings, layers, final norm.
struct Decoder {
    embed_tokens: Embedding,
    layers: Vec<Arc<DecoderLayer>>,
    norm: RmsNorm,
    rope: Rope,
}

/// A Qwen3 causal language model.
pub struct Model {
    model: Decoder,
    lm_head: Linear,
    cfg: Config,
}

impl Model {
    /// Builds the model from `cfg` and the checkpoint under `vb` (the root).
    pub fn new(cfg: &Config, vb: &WeightsPath) -> std::result::Result<Self, ModelError> {
        let m = vb.pp("model");
        let embed_tokens = Embedding::new(&m.pp("embed_tokens"), cfg.vocab_size, cfg.hidden_size)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(cfg, &m.pp("layers").pp(i)).map(Arc::new))
            .collect::<lmx_io::Result<Vec<_>>>()?;
        let norm = RmsNorm::new(&m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let rope = Rope::from_config(
            cfg.rope_theta,
            cfg.rope_scaling.as_ref(),
            cfg.rope_parameters.as_ref(),
            10_000.0,
            cfg.head_dim(),
            vb.dtype(),
            vb.device(),
        )?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.as_linear()
        } else {
            Linear::new(&vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, Bias::No)?
        };
        Ok(Self { model: Decoder { embed_tokens, layers, norm, rope }, lm_head, cfg: cfg.clone() })
    }
}

impl CausalLm for Model {
    fn forward(&self, input_ids: &Tensor, cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        let (_, l) = input_ids.dims2()?;
        let offset = cache.offset();
        let mut x = self.model.embed_tokens.forward(input_ids)?;
        let (cos, sin) = self.model.rope.cos_sin(offset, l)?;
        let mask = if l > 1 { Some(ops::causal_mask(l, offset, None, x.device())?) } else { None };
        for (layer_idx, layer) in self.model.layers.iter().enumerate() {
            x = if cache.checkpointing().is_some() {
                let (layer, cos, sin, mask) = (layer.clone(), cos.clone(), sin.clone(), mask.clone());
                lmx_nn::checkpoint::layer(cache, layer_idx, &x, move |x| layer.forward(x, &cos, &sin, mask.as_ref(), &mut KvCache::uncached(1), 0))?
            } else {
                layer.forward(&x, &cos, &sin, mask.as_ref(), cache, layer_idx)?
            };
        }
        let x = self.model.norm.forward(&x)?;
        let x = logits.select(&x)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers)
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_position_embeddings(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn device(&self) -> &lmx_core::Device {
        self.model.embed_tokens.device()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn golden_fixture_and_cached_decoding() {
        crate::testing::check_architecture("qwen3");
    }
}
