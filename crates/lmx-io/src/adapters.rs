//! Fine-tuning adapters in MLX LM's layout: a folder with `adapter_config.json` (the training
//! arguments: `fine_tune_type`, `num_layers`, `lora_parameters`, ...) and
//! `adapters.safetensors` (only the trained tensors: `<module>.lora_a` (in, r),
//! `<module>.lora_b` (r, out), `<module>.m` (out) for DoRA, or whole weights for `full`).
//!
//! An [`AdapterSetup`] attached to [`crate::Weights`] tells the layers, while the model is
//! built, which modules carry adapters and which tensors train; model files never see it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use lmx_core::{DType, Tensor, Var};
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
        return Err(IoError::NotFound { path: dir.to_path_buf(), hint: ": --adapter-path must be a folder with adapter_config.json and adapters.safetensors (as `lmx lora` or `mlx_lm.lora` write)".into() });
    }
    let config_path = dir.join(ADAPTER_CONFIG);
    if !config_path.exists() {
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

/// Reads an adapter safetensors file (all tensors, on the CPU).
pub fn load_adapter_file(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(IoError::NotFound { path: path.to_path_buf(), hint: ": no adapter weights here".into() });
    }
    candle_core::safetensors::load(path, &lmx_core::Device::Cpu)
        .map_err(|e| IoError::Safetensors { path: path.to_path_buf(), msg: e.to_string() })
}

/// Writes `adapter_config.json` atomically, keys sorted as MLX LM writes them.
pub fn save_config(dir: &Path, config: &AdapterConfig) -> Result<()> {
    let path = dir.join(ADAPTER_CONFIG);
    let value = serde_json::to_value(config).map_err(|e| IoError::Json { path: path.clone(), msg: e.to_string() })?;
    let text = serde_json::to_string_pretty(&value).map_err(|e| IoError::Json { path: path.clone(), msg: e.to_string() })?;
    crate::safetensors_io::write_atomic(&path, (text + "\n").as_bytes())
}

/// How a model being built gets its adapters: which modules, which tensors train, and the
/// values to start from (a saved adapter, for inference or to resume training).
#[derive(Debug)]
pub struct AdapterSetup {
    /// LoRA, DoRA or full.
    pub kind: FineTuneType,
    /// Layers with index >= this one are adapted.
    pub first_layer: usize,
    /// Rank, scale, dropout, keys (unused for `full`).
    pub params: LoraParameters,
    /// Seed for new `lora_a` values and dropout masks.
    pub seed: u64,
    trainable: bool,
    initial: HashMap<String, Tensor>,
    initial_source: String,
    used: Mutex<BTreeSet<String>>,
    /// `keys` entries that matched a module (each must match one).
    matched_keys: Mutex<BTreeSet<String>>,
    registry: Mutex<Vec<(String, Var)>>,
    training: AtomicBool,
}

impl AdapterSetup {
    /// A setup for a model of `n_layers` layers: `num_layers` counts from the last (-1: all).
    /// `trainable` makes the adapter tensors (or, for `full`, the layer weights) variables on
    /// the gradient tape. A `num_layers` above the model's is an error, as in MLX LM.
    pub fn new(kind: FineTuneType, num_layers: i64, n_layers: usize, params: LoraParameters, trainable: bool, seed: u64) -> Result<Self> {
        let first_layer = match usize::try_from(num_layers) {
            Err(_) => 0,
            Ok(n) if n > n_layers => {
                return Err(IoError::Json { path: PathBuf::from("--num-layers"), msg: format!("asks for {n} layers but the model has {n_layers}") })
            }
            Ok(n) => n_layers - n,
        };
        if kind != FineTuneType::Full && params.rank == 0 {
            return Err(IoError::Json { path: PathBuf::from("lora_parameters"), msg: "rank must be at least 1".into() });
        }
        Ok(Self {
            kind,
            first_layer,
            params,
            seed,
            trainable,
            initial: HashMap::new(),
            initial_source: String::new(),
            used: Mutex::new(BTreeSet::new()),
            matched_keys: Mutex::new(BTreeSet::new()),
            registry: Mutex::new(Vec::new()),
            training: AtomicBool::new(false),
        })
    }

    /// Starts from saved adapter tensors (`source` names the file in errors).
    pub fn with_initial(mut self, tensors: HashMap<String, Tensor>, source: &str) -> Self {
        self.initial = tensors;
        self.initial_source = source.to_string();
        self
    }

    /// Whether adapter tensors are variables.
    pub fn trainable(&self) -> bool {
        self.trainable
    }

    /// Dropout applies only while training; evaluation turns it off.
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// True between `set_training(true)` and `set_training(false)`.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// The layer index and the module path inside the layer, for `model.layers.<i>.<rest>`.
    fn layer_of(prefix: &str) -> Option<(usize, &str)> {
        let rest = prefix.strip_prefix("model.layers.")?;
        let (idx, module) = rest.split_once('.').unwrap_or((rest, ""));
        Some((idx.parse().ok()?, module))
    }

    /// True when the linear module at `prefix` gets a LoRA/DoRA adapter: inside one of the
    /// adapted layers and named by `keys` (every linear module when `keys` is absent), or a
    /// model-level module named in `keys` (e.g. `lm_head`).
    pub fn targets(&self, prefix: &str) -> bool {
        if self.kind == FineTuneType::Full {
            return false;
        }
        let keys = self.params.keys.as_ref();
        let (hit, key) = match Self::layer_of(prefix) {
            Some((i, module)) => (i >= self.first_layer && keys.is_none_or(|k| k.iter().any(|k| k == module)), module),
            None => (keys.is_some_and(|k| k.iter().any(|k| k == prefix)), prefix),
        };
        if hit && keys.is_some() {
            self.matched_keys.lock().unwrap_or_else(|e| e.into_inner()).insert(key.to_string());
        }
        hit
    }

    /// True when checkpoint tensor `key` trains (full fine-tuning of the adapted layers).
    pub fn full_trains(&self, key: &str) -> bool {
        self.kind == FineTuneType::Full && Self::layer_of(key).is_some_and(|(i, _)| i >= self.first_layer)
    }

    /// The saved value of `key` (shape-checked and counted as used), if the adapter file has one.
    pub fn saved(&self, key: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let Some(t) = self.initial.get(key) else { return Ok(None) };
        if t.dims() != shape {
            return Err(IoError::ShapeMismatch { key: key.into(), expected: shape.to_vec(), found: t.dims().to_vec(), source_name: self.initial_source.clone() });
        }
        self.used.lock().unwrap_or_else(|e| e.into_inner()).insert(key.to_string());
        Ok(Some(t.clone()))
    }

    /// The starting value of adapter tensor `key` with `shape`: the saved one if there is one
    /// (shape-checked), else `init()`; converted to `dtype`, made a variable and registered
    /// when the setup trains.
    pub fn param(&self, key: &str, shape: &[usize], dtype: DType, init: impl FnOnce() -> lmx_core::Result<Tensor>) -> Result<Tensor> {
        let t = match self.saved(key, shape)? {
            Some(t) => t,
            None => init()?,
        };
        self.register(key, t.to_dtype(dtype)?)
    }

    /// Makes `t` a variable and records it under `key` when training; returns it unchanged
    /// otherwise.
    pub fn register(&self, key: &str, t: Tensor) -> Result<Tensor> {
        if !self.trainable {
            return Ok(t);
        }
        let var = Var::from_tensor(&t.detach())?;
        let out = var.as_tensor().clone();
        self.registry.lock().unwrap_or_else(|e| e.into_inner()).push((key.to_string(), var));
        Ok(out)
    }

    /// The trained tensors, by key, sorted.
    pub fn trainables(&self) -> Vec<(String, Var)> {
        let mut v = self.registry.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Checks that every saved adapter tensor found its module: a tensor for a layer the
    /// model lacks (wrong base model, wrong `num_layers` or `keys`) is an error naming it.
    pub fn finish(&self) -> Result<()> {
        if let Some(keys) = &self.params.keys {
            let matched = self.matched_keys.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(k) = keys.iter().find(|k| !matched.contains(*k)) {
                return Err(IoError::Json {
                    path: PathBuf::from("lora_parameters.keys"),
                    msg: format!("`{k}` names no linear layer of the adapted layers (keys are paths inside a layer, e.g. `self_attn.q_proj`, `mlp.down_proj`)"),
                });
            }
        }
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut unused: Vec<&String> = self.initial.keys().filter(|k| !used.contains(*k)).collect();
        unused.sort();
        match unused.first() {
            None => Ok(()),
            Some(first) => Err(IoError::Json {
                path: PathBuf::from(&self.initial_source),
                msg: format!("{} adapter tensor(s) match no {} module of this model, e.g. `{first}`: was the adapter trained on another base model?", unused.len(), match self.kind { FineTuneType::Full => "trained", _ => "adapted" }),
            }),
        }
    }
}

/// Shared handle to a setup.
pub type SharedAdapterSetup = Arc<AdapterSetup>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_num_layers_and_keys() -> Result<()> {
        let s = AdapterSetup::new(FineTuneType::Lora, 2, 4, LoraParameters::default(), false, 0)?;
        assert!(!s.targets("model.layers.1.self_attn.q_proj"));
        assert!(s.targets("model.layers.2.self_attn.q_proj"));
        assert!(s.targets("model.layers.3.mlp.down_proj"));
        assert!(!s.targets("lm_head"));
        let p = LoraParameters { keys: Some(vec!["self_attn.v_proj".into(), "lm_head".into()]), ..Default::default() };
        let s = AdapterSetup::new(FineTuneType::Dora, -1, 4, p, false, 0)?;
        assert!(s.targets("model.layers.0.self_attn.v_proj"));
        assert!(!s.targets("model.layers.0.self_attn.q_proj"));
        assert!(s.targets("lm_head"));
        let err = AdapterSetup::new(FineTuneType::Lora, 5, 4, LoraParameters::default(), false, 0).expect_err("too many layers");
        assert!(err.to_string().contains("model has 4"), "{err}");
        let s = AdapterSetup::new(FineTuneType::Full, 1, 4, LoraParameters::default(), true, 0)?;
        assert!(s.full_trains("model.layers.3.mlp.up_proj.weight") && !s.full_trains("model.layers.2.mlp.up_proj.weight"));
        Ok(())
    }

    /// Full fine-tuning from saved weights: the saved value replaces the checkpoint's and is
    /// registered once, as the tensor the layer uses.
    #[test]
    fn full_fine_tuning_starts_from_saved_weights() -> Result<()> {
        let dev = lmx_core::Device::Cpu;
        let key = "model.layers.0.mlp.up_proj.weight";
        let checkpoint = HashMap::from([(key.to_string(), Tensor::zeros((2, 3), DType::F32, &dev)?)]);
        let saved = HashMap::from([(key.to_string(), Tensor::ones((2, 3), DType::F32, &dev)?)]);
        let setup = Arc::new(AdapterSetup::new(FineTuneType::Full, 1, 1, LoraParameters::default(), true, 0)?.with_initial(saved, "saved"));
        let weights = crate::Weights::from_tensors(checkpoint, DType::F32, &dev, "t").with_adapters(setup.clone());
        let w = weights.root().pp("model.layers.0.mlp.up_proj").get((2, 3), "weight")?;
        let trained = setup.trainables();
        assert_eq!(trained.len(), 1);
        assert_eq!(trained[0].1.as_tensor().id(), w.id(), "the registered variable is the layer's weight");
        assert_eq!(w.sum_all()?.to_scalar::<f32>()?, 6.0, "starts from the saved values");
        weights.finish(|_| false)
    }

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
