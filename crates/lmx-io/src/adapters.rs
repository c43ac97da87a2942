//! Fine-tuning adapters in MLX LM's layout: a folder with `adapter_config.json` (the training
//! arguments: `fine_tune_type`, `num_layers`, `lora_parameters`, ...) and
//! `adapters.safetensors` (only the trained tensors: `<module>.lora_a` (in, r),
//! `<module>.lora_b` (r, out), `<module>.m` (out) for DoRA, or whole weights for `full`).
//!
//! Which modules get adapters and which tensors train is decided by the layer builder
//! (`lmx_nn::AdapterPlan`); this module only reads and writes the folder.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use lmx_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{IoError, Result};

/// The adapter weights file inside an adapter folder.
pub const ADAPTER_FILE: &str = "adapters.safetensors";
/// The adapter config file inside an adapter folder.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// What fine-tuning trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FineTuneType {
    /// Low-rank adapters `lora_a`, `lora_b` on linear layers.
    Lora,
    /// LoRA plus a learned magnitude per output row (`m`).
    Dora,
    /// Every weight of the last `num_layers` layers.
    Full,
}

impl FineTuneType {
    /// Parses `lora`, `dora` or `full`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "lora" => Some(Self::Lora),
            "dora" => Some(Self::Dora),
            "full" => Some(Self::Full),
            _ => None,
        }
    }
}

/// `lora_parameters` of MLX LM's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraParameters {
    /// The rank r of `lora_a` (in, r) and `lora_b` (r, out).
    pub rank: usize,
    /// The multiplier of the low-rank product (MLX LM's `scale`; PEFT's `alpha / r`).
    pub scale: f64,
    /// Dropout on the adapter's input while training.
    #[serde(default)]
    pub dropout: f64,
    /// Module paths inside a layer (`self_attn.q_proj`) that get adapters; all linear layers
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
}

impl Default for LoraParameters {
    fn default() -> Self {
        Self { rank: 8, scale: 20.0, dropout: 0.0, keys: None }
    }
}

/// The parts of `adapter_config.json` loading needs; every other key is kept as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// `lora`, `dora` or `full` (MLX LM's default is `lora`).
    #[serde(default = "default_type")]
    pub fine_tune_type: FineTuneType,
    /// Layers adapted, counted from the last; -1 means all.
    pub num_layers: i64,
    /// Rank, scale, dropout and keys (absent or null for `full`).
    #[serde(default)]
    pub lora_parameters: Option<LoraParameters>,
    /// The other training arguments MLX LM records.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn default_type() -> FineTuneType {
    FineTuneType::Lora
}

/// Reads `adapter_config.json` and `adapters.safetensors` from an adapter folder. A missing
/// folder or file, a config without `lora_parameters.scale` (e.g. PEFT's `alpha`), or an
/// unreadable tensor file is an error naming the file.
pub fn load_adapter_dir(dir: &Path) -> Result<(AdapterConfig, HashMap<String, Tensor>)> {
    let config = read_adapter_config(dir)?;
    let tensors = load_adapter_file(&dir.join(ADAPTER_FILE))?;
    Ok((config, tensors))
}

/// Reads the `adapter_config.json` of an adapter folder; a missing folder or file is an error
/// saying what the folder should hold.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    if !dir.is_dir() {
        return Err(IoError::NotFound { path: dir.to_path_buf(), hint: ": an adapter folder holds adapter_config.json and adapters.safetensors (as `lmx lora` or `mlx_lm.lora` write)".into() });
    }
    let config_path = dir.join(ADAPTER_CONFIG);
    if crate::config::is_missing(&config_path)? {
        return Err(IoError::NotFound { path: config_path, hint: ": not an adapter folder".into() });
    }
    parse_config(&config_path)
}

/// Parses an `adapter_config.json`.
pub fn parse_config(path: &Path) -> Result<AdapterConfig> {
    let value = crate::config::read_json(path)?;
    if let Some(p) = value.get("lora_parameters").filter(|p| p.is_object()) {
        if p.get("scale").is_none() {
            let hint = if p.get("alpha").is_some() { " (found `alpha`: MLX LM's config uses `scale`, which is PEFT's alpha / rank)" } else { "" };
            return Err(IoError::Json { path: path.to_path_buf(), msg: format!("`lora_parameters` has no `scale`{hint}") });
        }
    }
    serde_json::from_value(value).map_err(|e| IoError::Json { path: path.to_path_buf(), msg: format!("not an adapter config: {e}") })
}

/// Reads an adapter safetensors file (all tensors, on the CPU). Tensors holding NaN or
/// infinite values (a diverged run) are refused: they would turn every output into NaN.
pub fn load_adapter_file(path: &Path) -> Result<HashMap<String, Tensor>> {
    if crate::config::is_missing(path)? {
        return Err(IoError::NotFound { path: path.to_path_buf(), hint: ": no adapter weights here".into() });
    }
    let tensors = candle_core::safetensors::load(path, &lmx_core::Device::Cpu).map_err(|e| IoError::Safetensors { path: path.to_path_buf(), msg: e.to_string() })?;
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    for key in keys {
        let t = &tensors[key];
        if !lmx_core::ops::all_finite(t)? {
            return Err(IoError::NonFinite { path: path.to_path_buf(), key: key.clone() });
        }
    }
    Ok(tensors)
}

/// Writes `adapter_config.json` atomically, keys sorted as MLX LM writes them.
pub fn save_config(dir: &Path, config: &AdapterConfig) -> Result<()> {
    let path = dir.join(ADAPTER_CONFIG);
    stage_config(dir, config)?.commit()?;
    crate::safetensors_io::sync_parent(&path);
    Ok(())
}

/// [`save_config`] staged: written and synced under a temporary name, not yet in place.
pub fn stage_config(dir: &Path, config: &AdapterConfig) -> Result<crate::safetensors_io::Staged> {
    use std::io::Write;
    let path = dir.join(ADAPTER_CONFIG);
    let value = serde_json::to_value(config).map_err(|e| IoError::Json { path: path.clone(), msg: e.to_string() })?;
    let text = serde_json::to_string_pretty(&value).map_err(|e| IoError::Json { path: path.clone(), msg: e.to_string() })?;
    crate::safetensors_io::stage_file(&path, |w| w.write_all((text + "\n").as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_needs_scale_and_keeps_other_keys() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lmx-adapter-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| IoError::io(&dir, e))?;
        let path = dir.join(ADAPTER_CONFIG);
        std::fs::write(&path, r#"{"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": {"rank": 8, "alpha": 16}}"#).map_err(|e| IoError::io(&path, e))?;
        let err = parse_config(&path).expect_err("alpha instead of scale").to_string();
        assert!(err.contains("scale") && err.contains("alpha"), "{err}");
        std::fs::write(&path, r#"{"num_layers": -1, "lora_parameters": {"rank": 4, "scale": 10.0}, "batch_size": 2}"#).map_err(|e| IoError::io(&path, e))?;
        let c = parse_config(&path)?;
        assert_eq!(c.fine_tune_type, FineTuneType::Lora);
        assert_eq!(c.extra.get("batch_size"), Some(&Value::from(2)));
        save_config(&dir, &c)?;
        let again = parse_config(&path)?;
        assert_eq!(again.lora_parameters, c.lora_parameters);
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
