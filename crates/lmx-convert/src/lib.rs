//! lmx-convert: writes model folders in the Hugging Face / MLX layout.
//!
//! Every conversion writes into a temporary sibling folder and renames it into place at the
//! end, so an interrupted run never leaves a folder that looks complete, and an existing
//! output folder is never overwritten.

pub mod quantize;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use lmx_core::{DType, Device, Tensor};
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
    /// An option or input that cannot be converted.
    #[error("{0}")]
    Invalid(String),
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
    let files = lmx_io::ModelFiles::load(source.clone(), dtype, &Device::Cpu)?;
    let dtype = files.weights.dtype();
    let mut tensors = HashMap::new();
    for key in files.weights.keys() {
        tensors.insert(key.clone(), files.weights.tensor(&key)?);
    }
    let mut config = files.config.clone();
    config["torch_dtype"] = dtype_name(dtype).into();
    if let Value::Object(map) = &mut config {
        map.remove("dtype");
    }
    let mut tokenizer_config = files.tokenizer_config.clone();
    if let (Some(t), Value::Object(map)) = (&files.chat_template, &mut tokenizer_config) {
        map.insert("chat_template".into(), t.clone().into());
    }
    Ok(Folder { config, tensors, tokenizer: files.tokenizer, tokenizer_config, generation_config: files.generation_config })
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
    let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
    let tmp = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| IoError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| IoError::io(&tmp, e))?;
    write_weights(&folder.tensors, &tmp, max_shard_bytes)?;
    write_json(&tmp.join("config.json"), &folder.config)?;
    folder.tokenizer.save(&tmp.join("tokenizer.json"))?;
    if !folder.tokenizer_config.is_null() {
        write_json(&tmp.join("tokenizer_config.json"), &folder.tokenizer_config)?;
    }
    if let Some(g) = &folder.generation_config {
        write_json(&tmp.join("generation_config.json"), g)?;
    }
    std::fs::rename(&tmp, out).map_err(|e| IoError::io(out, e))?;
    Ok(())
}

/// Writes `model.safetensors`, or shards of at most `max_shard_bytes` with
/// `model.safetensors.index.json`.
fn write_weights(tensors: &HashMap<String, Tensor>, dir: &Path, max_shard_bytes: usize) -> Result<(), ConvertError> {
    let sorted: BTreeMap<&String, &Tensor> = tensors.iter().collect();
    let mut shards: Vec<HashMap<String, Tensor>> = vec![HashMap::new()];
    let mut size = 0;
    for (k, t) in sorted {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        if size + bytes > max_shard_bytes && size > 0 {
            shards.push(HashMap::new());
            size = 0;
        }
        size += bytes;
        if let Some(last) = shards.last_mut() {
            last.insert(k.clone(), t.clone());
        }
    }
    if shards.len() == 1 {
        return Ok(lmx_io::safetensors_io::save_safetensors(&shards[0], &dir.join("model.safetensors"))?);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let total: usize = tensors.values().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        lmx_io::safetensors_io::save_safetensors(shard, &dir.join(&file))?;
        for k in shard.keys() {
            weight_map.insert(k.clone(), file.clone().into());
        }
    }
    write_json(&dir.join("model.safetensors.index.json"), &json!({"metadata": {"total_size": total}, "weight_map": weight_map}))?;
    Ok(())
}

