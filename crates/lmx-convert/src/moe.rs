//! MLX LM's `sanitize` of mixture-of-experts checkpoints: Hugging Face stores each expert's
//! projections apart (`mlp.experts.{e}.gate_proj.weight`, 2-D); `mlx_lm.convert` writes them
//! stacked along a leading expert dimension (`mlp.switch_mlp.gate_proj.weight`, 3-D: MLX's
//! `SwitchLinear`), which is what quantizes per expert and what MLX LM loads. lmx reads both;
//! converting writes MLX's, byte for byte.

use std::collections::{HashMap, HashSet};

use lmx_core::{Result, Tensor};

/// Which checkpoint tensors [`convert`](crate::convert) writes stacked: for each stacked
/// tensor, keyed by its first expert's key, the new key and the experts' keys in order; and
/// the other experts' keys, which it skips.
#[derive(Debug, Default)]
pub struct Stacking {
    first: HashMap<String, (String, Vec<String>)>,
    rest: HashSet<String>,
}

/// Model types whose experts MLX LM stacks this way, and their expert projections' names in
/// Hugging Face's checkpoints -> in MLX's `switch_mlp`.
const STACKED: &[(&str, &[(&str, &str)])] = &[
    ("qwen3_moe", &[("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj")]),
    ("qwen2_moe", &[("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj")]),
    ("mixtral", &[("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")]),
];

/// Model types whose router MLX LM's `quant_predicate` keeps in 8 bits, and the router's name.
const ROUTER_8BIT: &[(&str, &str)] = &[("qwen3_moe", "mlp.gate"), ("gpt_oss", "mlp.router")];

/// MLX LM's `quant_predicate` of these models: the router in 8 bits, groups of 64, unless a
/// rule or recipe of the user's decides.
pub fn router_spec(model_type: &str, module: &str) -> Option<(usize, usize)> {
    ROUTER_8BIT.iter().any(|(t, router)| *t == model_type && module.ends_with(router)).then_some((8, 64))
}

impl Stacking {
    /// The stacking MLX LM's sanitize does for `model_type` over checkpoint `keys` (none for a
    /// dense model, or a checkpoint already stacked).
    pub fn new(model_type: &str, keys: &[String]) -> Self {
        let mut out = Stacking::default();
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

    /// What to write for checkpoint tensor `key`: None to skip it (an expert stacked with
    /// the first), else the key and tensor (`read` fetches a tensor by key).
    pub fn tensor<E>(&self, key: &str, mut read: impl FnMut(&str) -> std::result::Result<Tensor, E>) -> std::result::Result<Option<(String, Tensor)>, crate::ConvertError>
    where
        crate::ConvertError: From<E>,
    {
        if self.rest.contains(key) {
            return Ok(None);
        }
        Ok(Some(match self.first.get(key) {
            Some((stacked, experts)) => {
                let parts = experts.iter().map(|k| read(k)).collect::<std::result::Result<Vec<_>, _>>()?;
                (stacked.clone(), stack(&parts)?)
            }
            None => (key.to_string(), read(key)?),
        }))
    }
}

fn stack(parts: &[Tensor]) -> Result<Tensor> {
    Tensor::stack(parts, 0)
}
