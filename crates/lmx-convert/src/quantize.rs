//! Quantizing and dequantizing model folders in MLX's affine format, with MLX LM's choices of
//! which layers to quantize: every linear and embedding matrix whose input dimension the group
//! size divides; mixed-precision recipes (`mixed_2_6` ... `mixed_4_6`); and lmx's rules files.

use std::path::Path;

use lmx_core::quant::{check_spec, QuantizedMatrix};
use lmx_core::{DType, Tensor};
use serde_json::{json, Map, Value};

use crate::{ConvertError, Folder};

/// MLX LM's `--quant-predicate` recipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixedRecipe {
    /// 2 bits, 6 for sensitive layers.
    Mixed2_6,
    /// 3 bits, 4 for sensitive layers.
    Mixed3_4,
    /// 3 bits, 6 for sensitive layers.
    Mixed3_6,
    /// 4 bits, 6 for sensitive layers.
    Mixed4_6,
}

impl MixedRecipe {
    /// Parses `mixed_2_6` etc.
    pub fn parse(name: &str) -> Result<Self, ConvertError> {
        Ok(match name {
            "mixed_2_6" => Self::Mixed2_6,
            "mixed_3_4" => Self::Mixed3_4,
            "mixed_3_6" => Self::Mixed3_6,
            "mixed_4_6" => Self::Mixed4_6,
            _ => return Err(ConvertError::Unsupported { what: format!("the quantization recipe `{name}`"), hint: "; use mixed_2_6, mixed_3_4, mixed_3_6 or mixed_4_6".into() }),
        })
    }

    fn bits(self) -> (usize, usize) {
        match self {
            Self::Mixed2_6 => (2, 6),
            Self::Mixed3_4 => (3, 4),
            Self::Mixed3_6 => (3, 6),
            Self::Mixed4_6 => (4, 6),
        }
    }
}

/// One line of a rules file: modules whose path matches `pattern` get `bits`/`group_size`, or
/// stay unquantized (`bits` None).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// A module path with `*` matching any run of characters (`model.layers.*.mlp.down_proj`).
    pub pattern: String,
    /// Bits, or None for `skip`.
    pub bits: Option<usize>,
    /// Group size (the default when omitted).
    pub group_size: Option<usize>,
}

/// Parses a rules file: one `PATTERN BITS [GROUP_SIZE]` or `PATTERN skip` per line, `#`
/// comments; the first matching line wins; modules no line matches use the defaults.
pub fn parse_rules(text: &str, path: &Path) -> Result<Vec<Rule>, ConvertError> {
    let mut rules = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = |msg: &str| ConvertError::Rules { path: path.to_path_buf(), line: i + 1, msg: msg.to_string() };
        let parts: Vec<&str> = line.split_whitespace().collect();
        let rule = match parts.as_slice() {
            [p, "skip"] => Rule { pattern: p.to_string(), bits: None, group_size: None },
            [p, b] | [p, b, _] => {
                let bits = b.parse().map_err(|_| bad(&format!("`{b}` is not a number of bits")))?;
                let group_size = match parts.get(2) {
                    Some(g) => Some(g.parse().map_err(|_| bad(&format!("`{g}` is not a group size")))?),
                    None => None,
                };
                check_spec(bits, group_size.unwrap_or(64)).map_err(|(what, hint)| bad(&format!("{what} is not supported ({hint})")))?;
                Rule { pattern: p.to_string(), bits: Some(bits), group_size }
            }
            _ => return Err(bad("wrong number of fields")),
        };
        rules.push(rule);
    }
    Ok(rules)
}

/// `*`-glob match over a whole module path.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// What to quantize and how.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// Default bits (`--q-bits`, 4).
    pub bits: usize,
    /// Default group size (`--q-group-size`, 64).
    pub group_size: usize,
    /// A mixed-precision recipe (`--quant-predicate`).
    pub recipe: Option<MixedRecipe>,
    /// Per-module rules (`--quant-rules`), applied before the recipe.
    pub rules: Vec<Rule>,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        Self { bits: 4, group_size: 64, recipe: None, rules: Vec::new() }
    }
}

/// Quantizes every eligible matrix of `folder` in place, writes the `quantization` and
/// `quantization_config` blocks, and returns the bits per weight.
pub fn quantize(folder: &mut Folder, opts: &QuantizeOptions) -> Result<f64, ConvertError> {
    let mut keys: Vec<String> = folder.tensors.keys().cloned().collect();
    keys.sort();
    let mut plan = Plan::new(&folder.config, opts, &keys)?;
    let mut stats = Stats::default();
    let mut out = std::collections::HashMap::new();
    let stacking = crate::moe::Stacking::new(&plan.model_type, &folder.config, &keys);
    let mut tensors = std::mem::take(&mut folder.tensors);
    for key in keys {
        // Each source tensor is taken out as it is used, so memory stays near one copy.
        let read = |k: &str| tensors.remove(k).ok_or_else(|| ConvertError::Layer { module: k.to_string(), msg: "missing".into() });
        for (k, t) in stacking.tensor(&key, read)? {
            out.extend(plan.tensor(&k, t, &mut stats)?);
        }
    }
    folder.tensors = out;
    plan.write_config(&mut folder.config);
    Ok(stats.bits_per_weight())
}

/// Bytes stored over parameters represented, for the bits-per-weight MLX LM prints.
#[derive(Debug, Default)]
pub struct Stats {
    bytes: usize,
    params: usize,
    /// Matrices left in float because the group size does not divide their rows: (module,
    /// row length).
    unquantized: Vec<(String, usize)>,
}

impl Stats {
    /// Stored bits per parameter.
    pub fn bits_per_weight(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.params.max(1) as f64
    }

    /// Matrices left in float because the group size does not divide their rows (MLX LM
    /// skips them the same way): (module, row length).
    pub fn unquantized(&self) -> &[(String, usize)] {
        &self.unquantized
    }
}

/// The per-tensor quantization decisions for one model (MLX LM's `quantize_model`).
pub struct Plan<'a> {
    opts: &'a QuantizeOptions,
    n_layers: usize,
    block: Map<String, Value>,
    model_type: String,
}

impl<'a> Plan<'a> {
    /// A plan for the checkpoint with `config` and tensor `keys`.
    pub fn new(config: &Value, opts: &'a QuantizeOptions, keys: &[String]) -> Result<Self, ConvertError> {
        check_spec(opts.bits, opts.group_size).map_err(|(what, hint)| ConvertError::Unsupported { what, hint: format!("; {hint}") })?;
        if config.get("quantization").is_some() {
            return Err(ConvertError::AlreadyQuantized);
        }
        let n_layers = keys.iter().filter_map(|k| layer_index(k)).max().map_or(0, |m| m + 1);
        let mut block = Map::new();
        block.insert("group_size".into(), opts.group_size.into());
        block.insert("bits".into(), opts.bits.into());
        block.insert("mode".into(), "affine".into());
        let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or_default().to_string();
        Ok(Self { opts, n_layers, block, model_type })
    }

    /// The tensors to write for checkpoint tensor `key`: the packed weight with its scales and
    /// biases for a quantized matrix, else the tensor itself.
    pub fn tensor(&mut self, key: &str, t: Tensor, stats: &mut Stats) -> Result<Vec<(String, Tensor)>, ConvertError> {
        let opts = self.opts;
        // Matrices, and stacked experts' matrices (experts, out, in: `switch_mlp`, gpt-oss's
        // `experts`) or DeepSeek's per-head ones (`embed_q`, `unembed_out`), quantized per
        // expert or head.
        let stacked = t.rank() == 3 && [".switch_mlp.", ".experts.", ".embed_q.", ".unembed_out."].iter().any(|p| key.contains(p));
        let module = key.strip_suffix(".weight").filter(|m| (t.rank() == 2 || stacked) && t.dtype().is_float() && !crate::moe::float_router(&self.model_type, m));
        let cols = *t.dims().last().unwrap_or(&0);
        // MLX LM skips matrices whose rows the default group size does not divide.
        let Some(module) = module.filter(|_| cols % opts.group_size == 0) else {
            if let Some(m) = module {
                stats.unquantized.push((m.to_string(), cols));
            }
            stats.bytes += t.elem_count() * t.dtype().size_in_bytes();
            stats.params += t.elem_count();
            return Ok(vec![(key.to_string(), t)]);
        };
        let rule = opts.rules.iter().find(|r| glob(&r.pattern, module));
        // The module's entry in the config block, when its choice is not the default: a rule's
        // or a recipe's with the mode; a model predicate's (MoE routers) without it, as MLX LM
        // writes them.
        let with_mode = |bits: usize, group_size: usize| json!({"group_size": group_size, "bits": bits, "mode": "affine"});
        let (bits, group_size, entry) = match (rule, opts.recipe, crate::moe::router_spec(&self.model_type, module)) {
            (Some(Rule { bits: None, .. }), _, _) => {
                stats.bytes += t.elem_count() * t.dtype().size_in_bytes();
                stats.params += t.elem_count();
                return Ok(vec![(key.to_string(), t)]);
            }
            (Some(r), _, _) => {
                let (b, g) = (r.bits.unwrap_or(opts.bits), r.group_size.unwrap_or(opts.group_size));
                (b, g, Some(with_mode(b, g)))
            }
            (None, Some(recipe), _) => {
                let b = mixed_bits(recipe, module, self.n_layers);
                (b, opts.group_size, Some(with_mode(b, opts.group_size)))
            }
            (None, None, Some((b, g))) => (b, g, Some(json!({"group_size": g, "bits": b}))),
            (None, None, None) => (opts.bits, opts.group_size, None),
        };
        if cols % group_size != 0 {
            return Err(ConvertError::Layer { module: module.to_string(), msg: format!("a row of {cols} elements is not divisible by the group size {group_size}") });
        }
        let quantize = |t: &Tensor| -> Result<(Tensor, Tensor, Tensor), ConvertError> {
            let q = QuantizedMatrix::quantize(t, bits, group_size).map_err(|e| ConvertError::Layer { module: module.to_string(), msg: e.to_string() })?;
            Ok(q.to_tensors()?)
        };
        let (packed, scales, biases) = if t.rank() == 3 {
            let parts = (0..t.dims()[0]).map(|e| quantize(&t.get(e)?)).collect::<Result<Vec<_>, _>>()?;
            let stack = |f: fn(&(Tensor, Tensor, Tensor)) -> &Tensor| Tensor::stack(&parts.iter().map(f).collect::<Vec<_>>(), 0);
            (stack(|p| &p.0)?, stack(|p| &p.1)?, stack(|p| &p.2)?)
        } else {
            quantize(&t)?
        };
        stats.params += t.elem_count();
        for x in [&packed, &scales, &biases] {
            stats.bytes += x.elem_count() * x.dtype().size_in_bytes();
        }
        if let Some(entry) = entry {
            self.block.insert(module.to_string(), entry);
        }
        Ok(vec![(key.to_string(), packed), (format!("{module}.scales"), scales), (format!("{module}.biases"), biases)])
    }

    /// Writes the `quantization` and `quantization_config` blocks into config.json.
    pub fn write_config(self, config: &mut Value) {
        config["quantization"] = Value::Object(self.block.clone());
        config["quantization_config"] = Value::Object(self.block);
    }
}

/// The layer index in a module path (`model.layers.7.mlp` -> 7).
fn layer_index(module: &str) -> Option<usize> {
    let mut parts = module.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" {
            return parts.next()?.parse().ok();
        }
    }
    None
}

/// MLX LM's `mixed_quant_predicate_builder`: v_proj and down_proj of the first and last
/// eighth of the layers and of every third layer between get more bits, as does lm_head.
fn mixed_bits(recipe: MixedRecipe, module: &str, n_layers: usize) -> usize {
    let (low, high) = recipe.bits();
    let index = layer_index(module).unwrap_or(0) as i64;
    let l = n_layers as i64;
    let more = index < l / 8 || index >= 7 * l / 8 || (index - l / 8).rem_euclid(3) == 2;
    let sensitive = module.contains("v_proj") || module.contains("v_a_proj") || module.contains("v_b_proj") || module.contains("down_proj");
    if (sensitive && more) || module.contains("lm_head") {
        high
    } else {
        low
    }
}

/// The float matrix of a quantized module (`--dequantize`), from its packed weight, scales and
/// biases, in `dtype`. Errors name the layer.
/// `biases` None: MXFP4 (words and E8M0 scales, no biases).
pub fn dequantize_module(module: &str, packed: &Tensor, scales: &Tensor, biases: Option<&Tensor>, spec: lmx_io::QuantSpec, dtype: DType) -> Result<Tensor, ConvertError> {
    if packed.rank() == 3 {
        // Stacked experts (MLX's SwitchLinear): each expert's matrix.
        let experts =
            (0..packed.dims()[0]).map(|e| dequantize_module(module, &packed.get(e)?, &scales.get(e)?, biases.map(|b| b.get(e)).transpose()?.as_ref(), spec, dtype)).collect::<Result<Vec<_>, _>>()?;
        return Ok(Tensor::stack(&experts, 0)?);
    }
    let m = match biases {
        Some(biases) => QuantizedMatrix::from_tensors(packed, scales, biases, spec.bits, spec.group_size),
        None => QuantizedMatrix::from_mxfp4(packed, scales, DType::F32),
    };
    let m = m.map_err(|e| ConvertError::Layer { module: module.to_string(), msg: e.to_string() })?;
    Ok(m.dequantize()?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("model.layers.*.mlp.down_proj", "model.layers.12.mlp.down_proj"));
        assert!(!glob("model.layers.*.mlp.down_proj", "model.layers.12.mlp.up_proj"));
        assert!(glob("*", "lm_head"));
        assert!(glob("lm_head", "lm_head") && !glob("lm_head", "lm_head2"));
        assert!(glob("*embed*", "model.embed_tokens"));
    }

    #[test]
    fn rules_files_parse_and_name_bad_lines() {
        let rules = parse_rules("# comment\nmodel.embed_tokens 6\nlm_head 8 32\n*.o_proj skip\n", Path::new("r.txt")).expect("parses");
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[1], Rule { pattern: "lm_head".into(), bits: Some(8), group_size: Some(32) });
        assert_eq!(rules[2].bits, None);
        let err = parse_rules("ok 4\nbad 7\n", Path::new("r.txt")).expect_err("7 bits").to_string();
        assert!(err.contains("r.txt:2") && err.contains("7-bit"), "{err}");
    }

    #[test]
    fn mixed_recipe_matches_mlx_lm() {
        // 30 layers (SmolLM2): more bits for i < 3, i >= 26, and (i - 3) % 3 == 2.
        let more: Vec<usize> = (0..30).filter(|i| mixed_bits(MixedRecipe::Mixed3_6, &format!("model.layers.{i}.mlp.down_proj"), 30) == 6).collect();
        assert_eq!(more, vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
        assert_eq!(mixed_bits(MixedRecipe::Mixed3_6, "model.layers.0.self_attn.q_proj", 30), 3);
        assert_eq!(mixed_bits(MixedRecipe::Mixed3_6, "model.embed_tokens", 30), 3);
        assert_eq!(mixed_bits(MixedRecipe::Mixed2_6, "lm_head", 30), 6);
    }
}
