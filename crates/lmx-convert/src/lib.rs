//! lmx-convert: writes model folders in the Hugging Face / MLX layout.
//!
//! Every conversion writes into a temporary sibling folder and renames it into place at the
//! end, so an interrupted run never leaves a folder that looks complete, and an existing
//! output folder is never overwritten.

pub mod fuse;
pub mod moe;
pub mod quantize;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use lmx_core::{DType, Tensor};
use lmx_io::config::write_json;
use lmx_io::{IoError, ModelSource, Tokenizer};
use serde_json::{json, Value};

/// Largest shard written (MLX LM and transformers use about 5 GB).
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

/// What can go wrong converting.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The output folder exists already.
    #[error("cannot save to {0}: it already exists; delete it or choose another --mlx-path")]
    OutputExists(PathBuf),
    /// A feature or value lmx does not support.
    #[error("{what} is not supported{hint}")]
    Unsupported {
        /// What was asked for.
        what: String,
        /// What to do instead (starts with "; " when present).
        hint: String,
    },
    /// Dequantizing a model that is not quantized.
    #[error("the model is not quantized; nothing to dequantize")]
    NotQuantized,
    /// Quantizing a model that is quantized already.
    #[error("the model is already quantized; dequantize it first or start from the float model")]
    AlreadyQuantized,
    /// A line of a quantization rules file that cannot be read.
    #[error("{path}:{line}: {msg} (expected `PATTERN BITS [GROUP_SIZE]` or `PATTERN skip`)")]
    Rules { path: PathBuf, line: usize, msg: String },
    /// A layer that cannot be (de)quantized as asked.
    #[error("layer `{module}`: {msg}")]
    Layer { module: String, msg: String },
    /// Adapter files that do not fit the model being fused.
    #[error("{path}: {msg}")]
    Adapter { path: PathBuf, msg: String },
    /// The checkpoint does not fit the model its config.json describes.
    #[error(transparent)]
    Checkpoint(#[from] lmx_models::ModelError),
    /// Reading or writing files.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A tensor operation.
    #[error(transparent)]
    Tensor(#[from] lmx_core::Error),
}

/// A model folder in memory, ready to be written.
#[derive(Clone)]
pub struct Folder {
    /// config.json.
    pub config: Value,
    /// Tensors by checkpoint key.
    pub tensors: HashMap<String, Tensor>,
    /// tokenizer.json.
    pub tokenizer: Tokenizer,
    /// tokenizer_config.json (chat template included).
    pub tokenizer_config: Value,
    /// generation_config.json.
    pub generation_config: Option<Value>,
}

/// The name transformers and MLX LM use for a dtype in config.json.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Reads a GGUF file or a model folder with every floating tensor cast to `dtype` (default:
/// float32 for GGUF, the checkpoint's own dtype for folders).
pub fn read(source: &ModelSource, dtype: Option<DType>) -> Result<Folder, ConvertError> {
    let files = load(source, dtype)?;
    let mut tensors = HashMap::new();
    for key in files.weights.keys() {
        tensors.insert(key.clone(), files.weights.tensor(&key)?);
    }
    Ok(Folder { tensors, ..metadata(&files) })
}

/// Reads `source` with every floating tensor cast to `dtype`; by default, as `mlx_lm.convert`
/// does, to config.json's `torch_dtype` (or `dtype`), else to the dtype the weights are stored
/// in (float32 for GGUF).
fn load(source: &ModelSource, dtype: Option<DType>) -> Result<lmx_io::ModelFiles, ConvertError> {
    let mut files = lmx_io::ModelFiles::load(source.clone(), dtype, false)?;
    if dtype.is_none() {
        let declared = files.config.get("torch_dtype").or_else(|| files.config.get("dtype")).and_then(Value::as_str).and_then(|n| lmx_core::parse_dtype(n).ok());
        let dtype = declared.unwrap_or_else(|| files.weights.compute_dtype());
        let weights = std::mem::replace(&mut files.weights, lmx_io::Weights::from_tensors(HashMap::new(), ""));
        files.weights = weights.with_cast(Some(dtype));
    }
    Ok(files)
}

/// Everything of a model folder but its tensors.
fn metadata(files: &lmx_io::ModelFiles) -> Folder {
    let dtype = files.weights.compute_dtype();
    let mut config = files.config.clone();
    config["torch_dtype"] = dtype_name(dtype).into();
    if let Value::Object(map) = &mut config {
        map.remove("dtype");
    }
    let mut tokenizer_config = files.tokenizer_config.clone();
    if let (Some(t), Value::Object(map)) = (&files.chat_template, &mut tokenizer_config) {
        map.insert("chat_template".into(), t.clone().into());
    }
    Folder { config, tensors: HashMap::new(), tokenizer: files.tokenizer.clone(), tokenizer_config, generation_config: files.generation_config.clone() }
}

/// What [`convert`] does to each tensor.
#[derive(Debug, Clone)]
pub enum Transform {
    /// Copy (cast to the requested dtype).
    Cast,
    /// Quantize to MLX's affine format.
    Quantize(quantize::QuantizeOptions),
    /// Dequantize a quantized model.
    Dequantize,
    /// Fuse trained adapters into the weights (`lmx fuse`).
    Fuse(fuse::FuseOptions),
}

/// Converts `source` into the folder `out` one tensor at a time: each tensor is read from the
/// memory-mapped checkpoint, transformed, and added to the current output shard, which is
/// written when it reaches `max_shard_bytes`; so memory stays near one shard however large the
/// model (GGUF sources are dequantized in memory first). Returns what quantization did (bits
/// per weight, matrices left in float) when quantizing. The output appears only when complete (temporary folder + rename).
pub fn convert(source: &ModelSource, dtype: Option<DType>, transform: &Transform, out: &Path, max_shard_bytes: usize) -> Result<Option<quantize::Stats>, ConvertError> {
    if out.exists() {
        return Err(ConvertError::OutputExists(out.to_path_buf()));
    }
    let files = load(source, dtype)?;
    // Every tensor the model needs, with the shape config.json implies, and nothing else:
    // checked from the headers before anything is written (no tensor data is read).
    lmx_models::check_checkpoint(&files.model_type()?, &files.config, &files.weights, files.quantization.clone())?;
    let mut folder = metadata(&files);
    let keys = files.weights.keys();
    // Removed again if anything below fails (the guard's drop).
    let guard = lmx_io::temp::TempOutput::dir_for(out)?;
    let tmp = guard.path();
    let mut shards = ShardWriter::new(tmp, max_shard_bytes);
    let mut stats = quantize::Stats::default();
    // Experts stacked as MLX LM's sanitize writes them (a no-op for dense models).
    let stacking = moe::Stacking::new(&files.model_type()?, &files.config, &keys);
    let read = |k: &str| files.weights.tensor(k);
    match transform {
        Transform::Cast => {
            for key in &keys {
                for (k, t) in stacking.tensor(key, read)? {
                    shards.push(k, t)?;
                }
            }
        }
        Transform::Quantize(opts) => {
            let mut plan = quantize::Plan::new(&folder.config, opts, &keys)?;
            for key in &keys {
                for (k, t) in stacking.tensor(key, read)? {
                    for (k, t) in plan.tensor(&k, t, &mut stats)? {
                        shards.push(k, t)?;
                    }
                }
            }
            plan.write_config(&mut folder.config);
        }
        Transform::Dequantize | Transform::Fuse(_) => {
            let q = files.quantization.clone();
            let (mut fuser, dequantize) = match transform {
                Transform::Fuse(o) => {
                    let n_layers = keys.iter().filter_map(|k| k.strip_prefix("model.layers.")?.split('.').next()?.parse::<usize>().ok()).max().map_or(0, |m| m + 1);
                    (Some(fuse::Fuser::new(&o.adapter_dir, n_layers)?), o.dequantize)
                }
                _ => (None, true),
            };
            if fuser.is_none() && q.is_none() {
                return Err(ConvertError::NotQuantized);
            }
            let dtype = files.weights.compute_dtype();
            let key_set: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
            let is_quantized = |m: &str| key_set.contains(format!("{m}.scales").as_str());
            for key in &keys {
                // scales/biases of a quantized module that is rewritten are written with its weight.
                let params_of = [".scales", ".biases"].iter().find_map(|s| key.strip_suffix(s)).filter(|m| is_quantized(m));
                if params_of.is_some_and(|m| dequantize || fuser.as_ref().is_some_and(|f| f.rewrites(m))) {
                    continue;
                }
                let module = key.strip_suffix(".weight");
                let spec = module.and_then(|m| fuse::module_spec(q.as_ref(), m, is_quantized(m)));
                let rewritten = module.is_some_and(|m| fuser.as_ref().is_some_and(|f| f.rewrites(m)));
                let Some(m) = module.filter(|_| rewritten || (spec.is_some() && dequantize)) else {
                    let t = match fuser.as_mut().and_then(|f| f.replacement(key)) {
                        Some(trained) => trained.to_dtype(dtype)?,
                        None => files.weights.tensor(key)?,
                    };
                    shards.push(key.clone(), t)?;
                    continue;
                };
                let get = |s: &str| files.weights.tensor(&format!("{m}.{s}"));
                let base = || -> Result<Tensor, ConvertError> {
                    Ok(match spec {
                        Some((spec, mxfp4)) => {
                            let biases = if mxfp4 { None } else { Some(get("biases")?) };
                            quantize::dequantize_module(m, &get("weight")?, &get("scales")?, biases.as_ref(), spec, DType::F32)?
                        }
                        None => get("weight")?,
                    })
                };
                // A quantized module keeps its bits and group size whether it is fused with
                // its adapter or replaced by its fully trained weight.
                let w = match fuser.as_mut().filter(|_| rewritten) {
                    Some(f) => f.rewrite(m, base)?,
                    None => base()?,
                };
                match spec.filter(|_| !dequantize) {
                    Some((_, true)) => {
                        return Err(ConvertError::Layer { module: m.to_string(), msg: "writing MXFP4 weights again is not supported: fuse with --dequantize (-d) for float weights".into() });
                    }
                    Some((spec, false)) => {
                        let [p, s, b] = fuse::quantized_tensors(&w, spec, dtype)?;
                        shards.push(key.clone(), p)?;
                        shards.push(format!("{m}.scales"), s)?;
                        shards.push(format!("{m}.biases"), b)?;
                    }
                    None => shards.push(key.clone(), w.to_dtype(dtype)?)?,
                }
            }
            if let Some(f) = &fuser {
                f.finish()?;
            }
            if dequantize {
                if let Value::Object(c) = &mut folder.config {
                    c.remove("quantization");
                    c.remove("quantization_config");
                }
            }
        }
    }
    shards.finish()?;
    write_metadata(&folder, tmp)?;
    guard.commit(out)?;
    Ok(matches!(transform, Transform::Quantize(_)).then_some(stats))
}

/// config.json, tokenizer files and generation_config.json.
fn write_metadata(folder: &Folder, dir: &Path) -> Result<(), ConvertError> {
    write_json(&dir.join("config.json"), &folder.config)?;
    folder.tokenizer.save(&dir.join("tokenizer.json"))?;
    if !folder.tokenizer_config.is_null() {
        write_json(&dir.join("tokenizer_config.json"), &folder.tokenizer_config)?;
    }
    if let Some(g) = &folder.generation_config {
        write_json(&dir.join("generation_config.json"), g)?;
    }
    Ok(())
}

/// Collects tensors into shards of at most `max_bytes`, writing each as it fills; `finish`
/// names them `model.safetensors`, or `model-0000i-of-0000n.safetensors` with an index.
struct ShardWriter {
    dir: PathBuf,
    max_bytes: usize,
    current: HashMap<String, Tensor>,
    size: usize,
    written: Vec<(PathBuf, Vec<String>)>,
    total: usize,
}

impl ShardWriter {
    fn new(dir: &Path, max_bytes: usize) -> Self {
        Self { dir: dir.to_path_buf(), max_bytes, current: HashMap::new(), size: 0, written: Vec::new(), total: 0 }
    }

    fn push(&mut self, key: String, t: Tensor) -> Result<(), ConvertError> {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        if self.size + bytes > self.max_bytes && self.size > 0 {
            self.flush()?;
        }
        self.size += bytes;
        self.total += bytes;
        self.current.insert(key, t);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ConvertError> {
        let path = self.dir.join(format!("shard-{}.safetensors", self.written.len()));
        lmx_io::safetensors_io::save_safetensors(&self.current, &path)?;
        let mut keys: Vec<String> = self.current.drain().map(|(k, _)| k).collect();
        keys.sort();
        self.written.push((path, keys));
        self.size = 0;
        Ok(())
    }

    fn finish(mut self) -> Result<(), ConvertError> {
        if !self.current.is_empty() || self.written.is_empty() {
            self.flush()?;
        }
        let n = self.written.len();
        if n == 1 {
            let target = self.dir.join("model.safetensors");
            return std::fs::rename(&self.written[0].0, &target).map_err(|e| IoError::io(target, e).into());
        }
        let mut weight_map = serde_json::Map::new();
        for (i, (path, keys)) in self.written.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            let target = self.dir.join(&file);
            std::fs::rename(path, &target).map_err(|e| IoError::io(target, e))?;
            for k in keys {
                weight_map.insert(k.clone(), file.clone().into());
            }
        }
        write_json(&self.dir.join("model.safetensors.index.json"), &json!({"metadata": {"total_size": self.total}, "weight_map": weight_map}))?;
        Ok(())
    }
}

/// Writes `folder` to `out` (which must not exist) through a temporary folder, in shards of
/// about 5 GB.
pub fn write(folder: &Folder, out: &Path) -> Result<(), ConvertError> {
    write_sharded(folder, out, MAX_SHARD_BYTES)
}

/// [`write`] with an explicit shard size.
pub fn write_sharded(folder: &Folder, out: &Path, max_shard_bytes: usize) -> Result<(), ConvertError> {
    if out.exists() {
        return Err(ConvertError::OutputExists(out.to_path_buf()));
    }
    let guard = lmx_io::temp::TempOutput::dir_for(out)?;
    let tmp = guard.path();
    let mut shards = ShardWriter::new(tmp, max_shard_bytes);
    let sorted: BTreeMap<&String, &Tensor> = folder.tensors.iter().collect();
    for (k, t) in sorted {
        shards.push(k.clone(), t.clone())?;
    }
    shards.finish()?;
    write_metadata(folder, tmp)?;
    guard.commit(out)?;
    Ok(())
}
