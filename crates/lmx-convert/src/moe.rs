//! MLX LM's `sanitize` of mixture-of-experts checkpoints: Hugging Face stores each expert's
//! projections apart (`mlp.experts.{e}.gate_proj.weight`, 2-D); `mlx_lm.convert` writes them
//! stacked along a leading expert dimension (`mlp.switch_mlp.gate_proj.weight`, 3-D: MLX's
//! `SwitchLinear`), which is what quantizes per expert and what MLX LM loads. lmx reads both;
//! converting writes MLX's, byte for byte. DeepSeek's `kv_b_proj` is split the same way into
//! MLX LM's per-head `embed_q` (heads, kv_lora_rank, qk_nope_head_dim) and `unembed_out`
//! (heads, v_head_dim, kv_lora_rank).

use std::collections::{HashMap, HashSet};

use lmx_core::{Result, Tensor};

/// Which checkpoint tensors [`convert`](crate::convert) writes stacked: for each stacked
/// tensor, keyed by its first expert's key, the new key and the experts' keys in order; and
/// the other experts' keys, which it skips.
#[derive(Debug, Default)]
pub struct Stacking {
    first: HashMap<String, (String, Vec<String>)>,
    rest: HashSet<String>,
    /// DeepSeek's latent attention: (heads, qk_nope_head_dim, v_head_dim) for splitting
    /// `kv_b_proj`.
    mla: Option<(usize, usize, usize)>,
}

/// Model types whose experts MLX LM stacks this way, and their expert projections' names in
/// Hugging Face's checkpoints -> in MLX's `switch_mlp`.
const STACKED: &[(&str, &[(&str, &str)])] = &[
    ("qwen3_moe", &[("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj")]),
    ("qwen2_moe", &[("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj")]),
    ("mixtral", &[("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")]),
    ("deepseek_v3", &[("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj")]),
];

/// Model types whose router MLX LM's `quant_predicate` keeps in 8 bits, and the router's name.
const ROUTER_8BIT: &[(&str, &str)] = &[("qwen3_moe", "mlp.gate"), ("gpt_oss", "mlp.router")];

/// Model types whose router MLX LM keeps in float (DeepSeek's `MoEGate` is not a layer MLX
/// quantizes), and the router's name.
const ROUTER_FLOAT: &[(&str, &str)] = &[("deepseek_v3", "mlp.gate")];

/// Whether `module` is a router MLX LM leaves unquantized in `model_type`.
pub fn float_router(model_type: &str, module: &str) -> bool {
    ROUTER_FLOAT.iter().any(|(t, router)| *t == model_type && module.ends_with(router))
}

/// MLX LM's `quant_predicate` of these models: the router in 8 bits, groups of 64, unless a
/// rule or recipe of the user's decides.
pub fn router_spec(model_type: &str, module: &str) -> Option<(usize, usize)> {
    ROUTER_8BIT.iter().any(|(t, router)| *t == model_type && module.ends_with(router)).then_some((8, 64))
}

impl Stacking {
    /// The stacking MLX LM's sanitize does for `model_type` over checkpoint `keys` (none for a
    /// dense model, or a checkpoint already stacked).
    pub fn new(model_type: &str, config: &serde_json::Value, keys: &[String]) -> Self {
        let mut out = Stacking::default();
        if model_type == "deepseek_v3" {
            let n = |k: &str| config.get(k).and_then(serde_json::Value::as_u64).map(|v| v as usize);
            out.mla = n("num_attention_heads").zip(n("qk_nope_head_dim")).zip(n("v_head_dim")).map(|((h, k), v)| (h, k, v));
        }
        let Some((_, names)) = STACKED.iter().find(|(t, _)| *t == model_type) else { return out };
        // (prefix, projection) -> expert index -> key.
        let mut groups: HashMap<(String, String), Vec<(usize, String)>> = HashMap::new();
        for key in keys {
            let Some((prefix, rest)) = key.split_once(".experts.") else { continue };
            let Some((e, proj)) = rest.split_once('.') else { continue };
            let (Ok(e), Some(proj)) = (e.parse::<usize>(), proj.strip_suffix(".weight")) else { continue };
            if let Some((_, mlx)) = names.iter().find(|(hf, _)| *hf == proj) {
                groups.entry((prefix.to_string(), mlx.to_string())).or_default().push((e, key.clone()));
            }
        }
        for ((prefix, proj), mut experts) in groups {
            experts.sort();
            let keys: Vec<String> = experts.into_iter().map(|(_, k)| k).collect();
            out.rest.extend(keys[1..].iter().cloned());
            out.first.insert(keys[0].clone(), (format!("{prefix}.switch_mlp.{proj}.weight"), keys));
        }
        out
    }

    /// What to write for checkpoint tensor `key`: nothing (an expert stacked with the first),
    /// the stacked experts, `embed_q` and `unembed_out` for a `kv_b_proj`, else the tensor
    /// itself (`read` fetches a tensor by key).
    pub fn tensor<E>(&self, key: &str, mut read: impl FnMut(&str) -> std::result::Result<Tensor, E>) -> std::result::Result<Vec<(String, Tensor)>, crate::ConvertError>
    where
        crate::ConvertError: From<E>,
    {
        if self.rest.contains(key) {
            return Ok(Vec::new());
        }
        if let (Some((heads, nope, v)), Some(prefix)) = (self.mla, key.strip_suffix(".kv_b_proj.weight")) {
            // As MLX LM's sanitize: per head, W_UK transposed and W_UV.
            let w = read(key)?;
            let rank = w.dim(1)?;
            let w = w.reshape((heads, nope + v, rank))?;
            let embed_q = w.narrow(1, 0, nope)?.transpose(1, 2)?.contiguous()?;
            let unembed_out = w.narrow(1, nope, v)?.contiguous()?;
            return Ok(vec![(format!("{prefix}.embed_q.weight"), embed_q), (format!("{prefix}.unembed_out.weight"), unembed_out)]);
        }
        Ok(vec![match self.first.get(key) {
            Some((stacked, experts)) => {
                let parts = experts.iter().map(|k| read(k)).collect::<std::result::Result<Vec<_>, _>>()?;
                (stacked.clone(), stack(&parts)?)
            }
            None => (key.to_string(), read(key)?),
        }])
    }
}

fn stack(parts: &[Tensor]) -> Result<Tensor> {
    Tensor::stack(parts, 0)
}
