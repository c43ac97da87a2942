//! Resolving `--model` (a folder, a `.gguf` file or a hub id) and reading everything a model
//! needs besides its math: config, weights, tokenizer, chat template and stop tokens.

use std::path::{Path, PathBuf};

use lmx_core::DType;
use serde_json::Value;

use crate::chat_template::ChatTemplate;
use crate::config::{chat_template_source, read_json, read_json_opt, special_token, token_ids};
use crate::error::{IoError, Result};
use crate::quant_config::QuantConfig;
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use crate::{gguf, hub};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face model folder (config.json + safetensors + tokenizer files).
    Folder(PathBuf),
    /// A llama.cpp GGUF file.
    Gguf(PathBuf),
}

impl ModelSource {
    /// Interprets a `--model` argument: an existing folder or `.gguf` file, else an `org/name`
    /// id looked up in the local Hugging Face cache and downloaded into it when missing
    /// ([`hub::Hub::snapshot`]).
    pub fn resolve(arg: &str) -> Result<Self> {
        let path = Path::new(arg);
        if path.is_dir() {
            return Ok(ModelSource::Folder(path.to_path_buf()));
        }
        if path.is_file() {
            return match path.extension().and_then(|e| e.to_str()) {
                Some("gguf") => Ok(ModelSource::Gguf(path.to_path_buf())),
                _ => Err(IoError::NotFound { path: path.to_path_buf(), hint: ": a model is a folder, a .gguf file or a Hugging Face id (org/name); lmx never loads pickle (.bin/.pt) files".into() }),
            };
        }
        if hub::looks_like_repo_id(arg) {
            let snapshot = hub::Hub::from_env().snapshot(arg).map_err(|e| match path.parent().filter(|p| p.is_dir()) {
                // `models/smolm2` beside a local `models` folder is most likely a mistyped path.
                Some(folder) => IoError::NotFound { path: path.to_path_buf(), hint: format!(" (the folder `{}` has no such entry); as a Hugging Face id: {e}", folder.display()) },
                None => e,
            })?;
            // A repository of one GGUF file (and no config.json) is that file.
            if !snapshot.join("config.json").exists() {
                let ggufs: Vec<PathBuf> = std::fs::read_dir(&snapshot).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "gguf")).collect();
                if let [one] = ggufs.as_slice() {
                    return Ok(ModelSource::Gguf(one.clone()));
                }
            }
            return Ok(ModelSource::Folder(snapshot));
        }
        Err(IoError::NotFound { path: path.to_path_buf(), hint: ": a model is a folder, a .gguf file or a Hugging Face id (org/name)".into() })
    }

    /// The path behind this source.
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Folder(p) | ModelSource::Gguf(p) => p,
        }
    }
}

/// Everything read from a model source.
pub struct ModelFiles {
    /// Where it came from.
    pub source: ModelSource,
    /// `config.json`.
    pub config: Value,
    /// The checkpoint's tensors.
    pub weights: Weights,
    /// config.json's `quantization` block (MLX format), if the model is quantized.
    pub quantization: Option<QuantConfig>,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// `tokenizer_config.json` (or its GGUF equivalent).
    pub tokenizer_config: Value,
    /// `generation_config.json`, if any.
    pub generation_config: Option<Value>,
    /// The chat template source, if the model has one.
    pub chat_template: Option<String>,
}

impl ModelFiles {
    /// Reads `source`. `cast` converts every floating tensor to that dtype as it is read
    /// (conversion); None keeps the stored dtypes. GGUF tensors are dequantized to float32,
    /// except projections in 4-, 5- and 8-bit blocks when `pack_gguf` ([`gguf::load_with`]: as a model
    /// runs them) and MXFP4 experts.
    pub fn load(source: ModelSource, cast: Option<DType>, pack_gguf: bool) -> Result<Self> {
        match &source {
            ModelSource::Folder(dir) => Self::load_folder(dir.clone(), source.clone(), cast),
            ModelSource::Gguf(path) => {
                let mut g = gguf::load_with(path, pack_gguf)?;
                let tokenizer = Tokenizer::from_json(&g.tokenizer)?;
                // The tokenizer's JSON and what its conversion passed through, returned before
                // the weights are built (without it the default model peaked at 0.192 GB, not 0.167).
                drop(std::mem::take(&mut g.tokenizer));
                release_freed_memory();
                // Handed over as the model reads them: packed matrices are copied into the model, and
                // the file's copy goes as each is read.
                let weights = Weights::from_tensors(g.tensors, &path.display().to_string()).with_cast(cast).handed_over();
                let chat_template = chat_template_source(&g.tokenizer_config, false);
                // Packed tensors (MXFP4, or legacy blocks kept): the config has a `quantization`
                // block for them.
                let quantization = QuantConfig::from_config(&g.config).map_err(|msg| IoError::Gguf { path: path.clone(), msg })?;
                Ok(Self {
                    source: source.clone(),
                    config: g.config,
                    weights,
                    quantization,
                    tokenizer,
                    tokenizer_config: g.tokenizer_config,
                    generation_config: Some(g.generation_config),
                    chat_template,
                })
            }
        }
    }

    fn load_folder(dir: PathBuf, source: ModelSource, cast: Option<DType>) -> Result<Self> {
        let config_path = dir.join("config.json");
        if crate::config::is_missing(&config_path)? {
            return Err(IoError::NotFound { path: config_path, hint: ": not a model folder (expected config.json, *.safetensors and tokenizer.json)".into() });
        }
        let config = read_json(&config_path)?;
        let quantization = QuantConfig::from_config(&config).map_err(|msg| IoError::Json { path: config_path.clone(), msg })?;
        let weights = Weights::from_safetensors(&safetensors_files(&dir)?)?.with_cast(cast);
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let tokenizer_config = read_json_opt(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let generation_config = read_json_opt(&dir.join("generation_config.json"))?;
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() { Some(std::fs::read_to_string(&jinja).map_err(|e| IoError::io(&jinja, e))?) } else { chat_template_source(&tokenizer_config, false) };
        Ok(Self { source, config, weights, quantization, tokenizer, tokenizer_config, generation_config, chat_template })
    }

    /// The dtype the model computes in unless told otherwise: the checkpoint's
    /// ([`Weights::compute_dtype`]), but float32 for a GGUF file, as llama.cpp computes (the
    /// scales of its packed blocks are f16), or bfloat16 for one whose matrices are BF16 (the
    /// cast, when one is set, wins).
    pub fn compute_dtype(&self) -> DType {
        match self.source {
            // A GGUF computes in f32 (its quantized blocks' f16 scales and F16 matrices too),
            // unless its matrices are BF16: then in bf16, as a bf16 folder does.
            ModelSource::Gguf(_) if self.weights.cast().is_none() => match self.weights.compute_dtype() {
                DType::BF16 => DType::BF16,
                _ => DType::F32,
            },
            _ => self.weights.compute_dtype(),
        }
    }

    /// Every id that ends generation: config.json, generation_config.json and the tokenizer's
    /// `eos_token`, deduplicated.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids = token_ids(&self.config, "eos_token_id");
        if let Some(g) = &self.generation_config {
            ids.extend(token_ids(g, "eos_token_id"));
        }
        if let Some(id) = special_token(&self.tokenizer_config, "eos_token").and_then(|t| self.tokenizer.token_to_id(&t)) {
            ids.push(id);
        }
        let mut seen = std::collections::HashSet::new();
        ids.retain(|id| seen.insert(*id));
        ids
    }

    /// The compiled chat template, if the model has one.
    pub fn compile_chat_template(&self) -> Result<Option<ChatTemplate>> {
        let Some(src) = &self.chat_template else { return Ok(None) };
        let bos = special_token(&self.tokenizer_config, "bos_token").unwrap_or_default();
        let eos = special_token(&self.tokenizer_config, "eos_token").unwrap_or_default();
        ChatTemplate::new(src, &bos, &eos).map(Some)
    }

    /// The `model_type` from config.json.
    pub fn model_type(&self) -> Result<String> {
        self.config
            .get("model_type")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| IoError::Json { path: self.source.path().join("config.json"), msg: "config.json has no `model_type`".into() })
    }
}

/// The safetensors files of a folder: those listed by `model.safetensors.index.json`, else
/// `model.safetensors`, else every `*.safetensors` file.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let json = read_json(&index)?;
        let map = json.get("weight_map").and_then(Value::as_object).ok_or_else(|| IoError::Json { path: index.clone(), msg: "no `weight_map` object".into() })?;
        let mut files = Vec::with_capacity(map.len());
        for (key, file) in map {
            let name = file.as_str().ok_or_else(|| IoError::Json { path: index.clone(), msg: format!("`weight_map` entry `{key}` is not a file name") })?;
            // Names stay inside the folder (a link inside it may point elsewhere, as the HF
            // cache's snapshot links point into blobs/; a name may not).
            let inside = !name.is_empty() && Path::new(name).components().all(|c| matches!(c, std::path::Component::Normal(_)));
            if !inside {
                return Err(IoError::Json { path: index.clone(), msg: format!("`weight_map` entry `{key}` names `{name}`, which is not a file inside the model folder") });
            }
            files.push(dir.join(name));
        }
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).map_err(|e| IoError::io(dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    files.sort();
    if files.is_empty() {
        return Err(IoError::NotFound { path: dir.join("model.safetensors"), hint: ": the folder has no safetensors weights (lmx loads safetensors and GGUF, never pickle .bin files)".into() });
    }
    Ok(files)
}

/// Hands memory the allocator holds free back to the system (glibc's `malloc_trim`, which also
/// releases whole free pages inside the heap), so that what loading passed through (a GGUF's
/// tokenizer conversions, tensors copied into the model) does not stay in the process's
/// resident memory. Elsewhere a no-op.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
