//! The `quantization` block of config.json (MLX's format): default `group_size`, `bits` and
//! `mode`, plus per-module overrides keyed by module path (a dict, or `false` for a module
//! left unquantized).

use std::collections::HashMap;

use serde_json::Value;

/// How one module is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    /// Bits per element.
    pub bits: usize,
    /// Elements per scale/bias group.
    pub group_size: usize,
}

/// Per-module decision from the quantization block.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Override {
    Spec(QuantSpec, String),
    Off,
}

/// A parsed `quantization` block.
#[derive(Debug, Clone)]
pub struct QuantConfig {
    default: QuantSpec,
    default_mode: String,
    overrides: HashMap<String, Override>,
}

impl QuantConfig {
    /// Parses `quantization` (or `quantization_config` when it has MLX's keys) from config.json;
    /// None for an unquantized model. Errors name the offending key.
    pub fn from_config(config: &Value) -> Result<Option<Self>, String> {
        let block = match config.get("quantization").or_else(|| config.get("quantization_config").filter(|q| q.get("bits").is_some())) {
            Some(Value::Object(b)) => b,
            Some(_) => return Err("`quantization` must be an object".into()),
            None => return Ok(None),
        };
        let spec = |v: &serde_json::Map<String, Value>, at: &str, fallback: Option<QuantSpec>| -> Result<(QuantSpec, String), String> {
            let num = |k: &str, d: Option<usize>| v.get(k).and_then(Value::as_u64).map(|x| x as usize).or(d).ok_or_else(|| format!("quantization{at}: `{k}` is missing or not an integer"));
            let bits = num("bits", fallback.map(|f| f.bits))?;
            let group_size = num("group_size", fallback.map(|f| f.group_size))?;
            let mode = v.get("mode").and_then(Value::as_str).unwrap_or("affine").to_string();
            Ok((QuantSpec { bits, group_size }, mode))
        };
        let (default, default_mode) = spec(block, "", None)?;
        let mut overrides = HashMap::new();
        for (k, v) in block {
            match v {
                Value::Object(o) => {
                    let (s, mode) = spec(o, &format!(".{k}"), Some(default))?;
                    overrides.insert(k.clone(), Override::Spec(s, mode));
                }
                Value::Bool(false) => {
                    overrides.insert(k.clone(), Override::Off);
                }
                _ => {}
            }
        }
        Ok(Some(Self { default, default_mode, overrides }))
    }

    /// Every module with quantized tensors in `spec` and `mode` (weights whose format a model
    /// knows from their names: OpenAI's MXFP4 experts).
    pub fn uniform(spec: QuantSpec, mode: &str) -> Self {
        Self { default: spec, default_mode: mode.to_string(), overrides: HashMap::new() }
    }

    /// The spec and mode for module `path` if it has quantized tensors (`has_scales`): its
    /// override, else the default. None when the module is not quantized.
    pub fn for_module(&self, path: &str, has_scales: bool) -> Option<(QuantSpec, &str)> {
        match self.overrides.get(path) {
            Some(Override::Off) => None,
            Some(Override::Spec(s, mode)) if has_scales => Some((*s, mode.as_str())),
            _ if has_scales => Some((self.default, self.default_mode.as_str())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_overrides_and_off() {
        let cfg = json!({"quantization": {"group_size": 64, "bits": 4, "mode": "affine",
            "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 6, "mode": "affine"},
            "lm_head": false}});
        let q = QuantConfig::from_config(&cfg).expect("parses").expect("quantized");
        assert_eq!(q.for_module("model.layers.1.mlp.down_proj", true), Some((QuantSpec { bits: 4, group_size: 64 }, "affine")));
        assert_eq!(q.for_module("model.layers.0.mlp.down_proj", true), Some((QuantSpec { bits: 6, group_size: 32 }, "affine")));
        assert_eq!(q.for_module("model.layers.1.mlp.down_proj", false), None);
        assert_eq!(q.for_module("lm_head", true), None);
        assert!(QuantConfig::from_config(&json!({})).expect("ok").is_none());
        let err = QuantConfig::from_config(&json!({"quantization": {"bits": 4}})).expect_err("no group size");
        assert!(err.contains("group_size"), "{err}");
    }
}
