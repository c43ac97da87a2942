//! `lmx lora`'s settings: MLX LM's `CONFIG_DEFAULTS`, overridden by a YAML file (`-c`),
//! overridden by command-line flags, with MLX LM's key names. Unknown keys are errors (a typo
//! must not silently train with a default); keys MLX LM uses for services lmx does not have
//! (`report_to`, `project_name`, ...) are accepted and reported as ignored.

use std::collections::BTreeMap;
use std::path::Path;

use lmx_io::LoraParameters;
use serde::Deserialize;
use serde_json::Value;

use crate::TuneError;

/// Every setting of a fine-tuning run (MLX LM's names and defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub model: Option<String>,
    pub train: bool,
    pub data: String,
    pub fine_tune_type: String,
    pub optimizer: String,
    pub optimizer_config: BTreeMap<String, BTreeMap<String, Value>>,
    pub mask_prompt: bool,
    pub num_layers: i64,
    pub batch_size: usize,
    pub iters: usize,
    pub val_batches: i64,
    pub learning_rate: f64,
    pub steps_per_report: usize,
    pub steps_per_eval: usize,
    pub grad_accumulation_steps: usize,
    pub resume_adapter_file: Option<String>,
    pub adapter_path: String,
    pub save_every: usize,
    pub test: bool,
    pub test_batches: i64,
    pub max_seq_length: usize,
    pub grad_checkpoint: bool,
    pub lr_schedule: Option<Value>,
    pub lora_parameters: LoraParameters,
    pub seed: u64,
}

/// The largest LoRA rank lmx trains (a larger one is a typo, and would allocate its adapters
/// before any shape check could catch it).
const MAX_RANK: usize = 4096;

impl LoraConfig {
    /// Checks every number once the flags and the YAML file are merged, before anything is
    /// loaded: each error names the setting (the YAML key; the flag is the same with dashes),
    /// the value and the allowed range.
    pub fn validate(&self) -> Result<(), TuneError> {
        let bad = |key: &str, value: String, allowed: &str| Err(TuneError::Setting { key: key.into(), msg: format!("{value} is out of range: {allowed}") });
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("learning_rate", self.learning_rate.to_string(), "use a positive number such as 1e-5");
        }
        if self.batch_size == 0 {
            return bad("batch_size", "0".into(), "at least 1");
        }
        if self.max_seq_length < 2 {
            return bad("max_seq_length", self.max_seq_length.to_string(), "at least 2 (one token to read, one to predict)");
        }
        if self.grad_accumulation_steps == 0 {
            return bad("grad_accumulation_steps", "0".into(), "at least 1");
        }
        let p = &self.lora_parameters;
        if p.rank == 0 || p.rank > MAX_RANK {
            return bad("lora_parameters.rank", p.rank.to_string(), "1 to 4096");
        }
        if !p.scale.is_finite() {
            return bad("lora_parameters.scale", p.scale.to_string(), "a finite number");
        }
        if !(0.0..1.0).contains(&p.dropout) {
            return bad("lora_parameters.dropout", p.dropout.to_string(), "at least 0 and below 1");
        }
        Ok(())
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            model: None,
            train: false,
            data: "data".into(),
            fine_tune_type: "lora".into(),
            optimizer: "adam".into(),
            optimizer_config: BTreeMap::new(),
            mask_prompt: false,
            num_layers: 16,
            batch_size: 4,
            iters: 1000,
            val_batches: 25,
            learning_rate: 1e-5,
            steps_per_report: 10,
            steps_per_eval: 200,
            grad_accumulation_steps: 1,
            resume_adapter_file: None,
            adapter_path: "adapters".into(),
            save_every: 100,
            test: false,
            test_batches: 500,
            max_seq_length: 2048,
            grad_checkpoint: false,
            lr_schedule: None,
            lora_parameters: LoraParameters::default(),
            seed: 0,
        }
    }
}

/// The YAML file: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub model: Option<String>,
    pub train: Option<bool>,
    pub data: Option<String>,
    pub fine_tune_type: Option<String>,
    pub optimizer: Option<String>,
    pub optimizer_config: Option<BTreeMap<String, BTreeMap<String, Value>>>,
    pub mask_prompt: Option<bool>,
    pub num_layers: Option<i64>,
    pub batch_size: Option<usize>,
    pub iters: Option<usize>,
    pub val_batches: Option<i64>,
    pub learning_rate: Option<f64>,
    pub steps_per_report: Option<usize>,
    pub steps_per_eval: Option<usize>,
    pub grad_accumulation_steps: Option<usize>,
    pub resume_adapter_file: Option<String>,
    pub adapter_path: Option<String>,
    pub save_every: Option<usize>,
    pub test: Option<bool>,
    pub test_batches: Option<i64>,
    pub max_seq_length: Option<usize>,
    pub grad_checkpoint: Option<bool>,
    pub lr_schedule: Option<Value>,
    pub lora_parameters: Option<LoraParametersFile>,
    pub seed: Option<u64>,
    /// Hugging Face datasets need the hub; rejected with a clear message.
    pub hf_dataset: Option<Value>,
    /// Services and knobs lmx has no use for; accepted and reported as ignored.
    pub report_to: Option<Value>,
    pub project_name: Option<Value>,
    pub trust_remote_code: Option<Value>,
    pub clear_cache_threshold: Option<Value>,
    pub wandb: Option<Value>,
}

/// `lora_parameters` as written in YAML (`scale` required when present, as in MLX LM).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraParametersFile {
    pub rank: Option<usize>,
    pub scale: Option<f64>,
    pub alpha: Option<f64>,
    pub dropout: Option<f64>,
    pub keys: Option<Vec<String>>,
}

impl ConfigFile {
    /// Reads and parses a YAML config; errors name the file.
    pub fn read(path: &Path) -> Result<Self, TuneError> {
        let err = |msg: String| TuneError::ConfigFile { path: path.to_path_buf(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text, path)
    }

    /// Parses the YAML text of a config read from `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, TuneError> {
        serde_saphyr::from_str(text).map_err(|e| TuneError::ConfigFile { path: path.to_path_buf(), msg: e.to_string() })
    }

    /// Keys present in the file that lmx ignores (for a warning).
    pub fn ignored_keys(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (k, present) in [
            ("report_to", self.report_to.is_some()),
            ("project_name", self.project_name.is_some()),
            ("trust_remote_code", self.trust_remote_code.is_some()),
            ("clear_cache_threshold", self.clear_cache_threshold.is_some()),
            ("wandb", self.wandb.is_some()),
        ] {
            if present {
                v.push(k);
            }
        }
        v
    }

    /// Applies the file's values over `c`.
    pub fn apply(self, c: &mut LoraConfig) -> Result<(), TuneError> {
        if self.hf_dataset.is_some() {
            return Err(TuneError::Unsupported {
                what: "`hf_dataset` (it needs the Hugging Face hub)".into(),
                hint: "; lmx trains on a local folder with train.jsonl / valid.jsonl / test.jsonl (`data:`)".into(),
            });
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            train,
            data,
            fine_tune_type,
            optimizer,
            optimizer_config,
            mask_prompt,
            num_layers,
            batch_size,
            iters,
            val_batches,
            learning_rate,
            steps_per_report,
            steps_per_eval,
            grad_accumulation_steps,
            adapter_path,
            save_every,
            test,
            test_batches,
            max_seq_length,
            grad_checkpoint,
            seed
        );
        if self.model.is_some() {
            c.model = self.model;
        }
        if self.resume_adapter_file.is_some() {
            c.resume_adapter_file = self.resume_adapter_file;
        }
        if self.lr_schedule.is_some() {
            c.lr_schedule = self.lr_schedule;
        }
        if let Some(p) = self.lora_parameters {
            let Some(scale) = p.scale else {
                let hint = if p.alpha.is_some() { " (found `alpha`: MLX LM's config uses `scale`, which is PEFT's alpha / rank)" } else { "" };
                return Err(TuneError::Setting { key: "lora_parameters".into(), msg: format!("needs `scale`{hint}") });
            };
            let d = LoraParameters::default();
            c.lora_parameters = LoraParameters { rank: p.rank.unwrap_or(d.rank), scale, dropout: p.dropout.unwrap_or(d.dropout), keys: p.keys };
        }
        Ok(())
    }
}

/// A number that YAML may have left as a string (`1e-5` in YAML 1.1 readers).
pub fn as_number(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

impl LoraConfig {
    /// The settings as `adapter_config.json` records them (every key, as MLX LM's `vars(args)`).
    pub fn to_json(&self) -> BTreeMap<String, Value> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("model", self.model.clone().into());
        put("train", self.train.into());
        put("data", self.data.clone().into());
        put("optimizer", self.optimizer.clone().into());
        put("optimizer_config", serde_json::to_value(&self.optimizer_config).unwrap_or(Value::Null));
        put("mask_prompt", self.mask_prompt.into());
        put("batch_size", self.batch_size.into());
        put("iters", self.iters.into());
        put("val_batches", self.val_batches.into());
        put("learning_rate", self.learning_rate.into());
        put("steps_per_report", self.steps_per_report.into());
        put("steps_per_eval", self.steps_per_eval.into());
        put("grad_accumulation_steps", self.grad_accumulation_steps.into());
        put("resume_adapter_file", self.resume_adapter_file.clone().into());
        put("adapter_path", self.adapter_path.clone().into());
        put("save_every", self.save_every.into());
        put("test", self.test.into());
        put("test_batches", self.test_batches.into());
        put("max_seq_length", self.max_seq_length.into());
        put("grad_checkpoint", self.grad_checkpoint.into());
        put("lr_schedule", self.lr_schedule.clone().unwrap_or(Value::Null));
        put("seed", self.seed.into());
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_overrides_defaults_and_typos_are_errors() -> Result<(), TuneError> {
        let yaml = "fine_tune_type: dora\nlearning_rate: 1e-4\nlora_parameters:\n  rank: 4\n  scale: 10.0\n  keys: [self_attn.q_proj]\nlr_schedule:\n  name: cosine_decay\n  warmup: 10\n  arguments: [1e-4, 100, 1e-7]\noptimizer_config:\n  adamw:\n    weight_decay: 0.05\nreport_to: wandb\n";
        let f: ConfigFile = serde_saphyr::from_str(yaml).map_err(|e| TuneError::Setting { key: "yaml".into(), msg: e.to_string() })?;
        assert_eq!(f.ignored_keys(), vec!["report_to"]);
        let mut c = LoraConfig::default();
        f.apply(&mut c)?;
        assert_eq!(c.fine_tune_type, "dora");
        assert!((c.learning_rate - 1e-4).abs() < 1e-12);
        assert_eq!(c.lora_parameters.rank, 4);
        assert_eq!(c.lora_parameters.keys.as_deref(), Some(&["self_attn.q_proj".to_string()][..]));
        assert_eq!(c.batch_size, 4, "untouched keys keep MLX LM's defaults");
        let s = crate::optim::Schedule::from_config(c.lr_schedule.as_ref().expect("schedule"))?;
        assert!(s.at(0) < 1e-6);
        let err = serde_saphyr::from_str::<ConfigFile>("learnin_rate: 1e-4\n").expect_err("typo").to_string();
        assert!(err.contains("learnin_rate"), "{err}");
        let f: ConfigFile = serde_saphyr::from_str("lora_parameters:\n  rank: 8\n  alpha: 16\n").map_err(|e| TuneError::Setting { key: "yaml".into(), msg: e.to_string() })?;
        let err = f.apply(&mut LoraConfig::default()).expect_err("alpha").to_string();
        assert!(err.contains("scale") && err.contains("alpha"), "{err}");
        Ok(())
    }
}
