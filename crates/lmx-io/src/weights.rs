//! A strict tensor store: models ask for tensors by checkpoint key and shape; whatever the
//! checkpoint holds that no layer asked for is an error at the end of loading.
//!
//! Safetensors files are memory-mapped and each tensor is read from the map once, into the
//! model's dtype. GGUF tensors arrive already renamed and dequantized (see [`crate::gguf`]).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use lmx_core::{DType, Device, Shape, Tensor};

use crate::adapters::AdapterSetup;
use crate::error::{IoError, Result};
use crate::quant_config::{QuantConfig, QuantSpec};

enum Source {
    /// One memory-mapped safetensors file per shard.
    Safetensors(Vec<(PathBuf, MmapedSafetensors)>),
    /// Tensors already in memory (a GGUF file after renaming and dequantization).
    Memory(HashMap<String, Tensor>),
}

struct Inner {
    source: Source,
    /// Which shard holds each key (for safetensors); shape of every key.
    index: HashMap<String, (usize, Vec<usize>)>,
    used: Mutex<BTreeSet<String>>,
    dtype: DType,
    device: Device,
    /// The quantization block of config.json, if the model is quantized.
    quantization: Option<QuantConfig>,
    /// Adapters (LoRA/DoRA/full fine-tuning) the layers attach while the model is built.
    adapters: Option<Arc<AdapterSetup>>,
    /// A short description of where the tensors come from, for error messages.
    name: String,
}

/// The tensors of one checkpoint, shared by every layer while a model is built.
#[derive(Clone)]
pub struct Weights {
    inner: Arc<Inner>,
}

/// A view of [`Weights`] under a key prefix (`model.layers.3.self_attn`).
#[derive(Clone)]
pub struct WeightsPath {
    weights: Weights,
    prefix: String,
}

impl Weights {
    /// Memory-maps safetensors shards. Tensors are converted to `dtype` on `device` as they
    /// are read.
    pub fn from_safetensors(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            if !path.exists() {
                return Err(IoError::NotFound { path: path.clone(), hint: String::new() });
            }
            // SAFETY: the file is mapped read-only; lmx never writes to a checkpoint it is
            // reading, and a concurrent writer outside lmx is the user's responsibility (the same
            // contract as every mmap-based loader: candle, safetensors, MLX).
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| IoError::Safetensors {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            for (name, view) in st.tensors() {
                index.insert(name, (i, view.shape().to_vec()));
            }
            files.push((path.clone(), st));
        }
        let name = match paths {
            [one] => one.display().to_string(),
            _ => format!("{} safetensors shards in {}", paths.len(), parent_of(paths)),
        };
        Ok(Self::new(Source::Safetensors(files), index, dtype, device, name))
    }

    /// Wraps tensors already in memory (renamed GGUF tensors, or tensors built by a test).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device, name: &str) -> Self {
        let index = tensors.iter().map(|(k, t)| (k.clone(), (0, t.dims().to_vec()))).collect();
        Self::new(Source::Memory(tensors), index, dtype, device, name.to_string())
    }

    fn new(source: Source, index: HashMap<String, (usize, Vec<usize>)>, dtype: DType, device: &Device, name: String) -> Self {
        let inner = Inner { source, index, used: Mutex::new(BTreeSet::new()), dtype, device: device.clone(), quantization: None, adapters: None, name };
        Self { inner: Arc::new(inner) }
    }

    /// Attaches config.json's quantization block (MLX format); layers then read packed
    /// weights where the checkpoint has them.
    pub fn with_quantization(mut self, quantization: Option<QuantConfig>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.quantization = quantization;
        }
        self
    }

    /// Attaches an adapter setup: linear layers it targets get LoRA/DoRA adapters, and for
    /// full fine-tuning the weights of the adapted layers become variables.
    pub fn with_adapters(mut self, setup: Arc<AdapterSetup>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.adapters = Some(setup);
        }
        self
    }

    /// The root view (no prefix).
    pub fn root(&self) -> WeightsPath {
        WeightsPath { weights: self.clone(), prefix: String::new() }
    }

    /// Every key in the checkpoint, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.inner.index.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.inner.dtype
    }

    /// Checks that every checkpoint tensor was used, except keys for which `ignored` is true
    /// (e.g. `rotary_emb.inv_freq` buffers that some exporters save).
    pub fn finish(&self, ignored: impl Fn(&str) -> bool) -> Result<()> {
        // A panic while another thread held the lock cannot corrupt a set of names: keep it.
        if let Some(a) = &self.inner.adapters {
            a.finish()?;
        }
        let used = self.inner.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut unused: Vec<&String> =
            self.inner.index.keys().filter(|k| !used.contains(*k) && !ignored(k)).collect();
        unused.sort();
        match unused.first() {
            None => Ok(()),
            Some(first) => Err(IoError::UnusedTensors {
                count: unused.len(),
                first: (*first).clone(),
                source_name: self.inner.name.clone(),
            }),
        }
    }

    /// Reads tensor `key` whatever its shape (for conversion, which copies every tensor).
    pub fn tensor(&self, key: &str) -> Result<Tensor> {
        self.load(key)
    }

    fn load(&self, key: &str) -> Result<Tensor> {
        let inner = &self.inner;
        let Some((shard, _)) = inner.index.get(key) else {
            return Err(IoError::MissingTensor { key: key.to_string(), source_name: inner.name.clone() });
        };
        let tensor = match &inner.source {
            Source::Safetensors(files) => {
                let (path, st) = &files[*shard];
                let err = |e: candle_core::Error| IoError::Safetensors { path: path.clone(), msg: e.to_string() };
                let view = st.get(key).map_err(err)?;
                let tensor = candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(err)?;
                release_pages(view.data());
                tensor
            }
            Source::Memory(map) => map[key].clone(),
        };
        if let Ok(mut used) = inner.used.lock() {
            used.insert(key.to_string());
        }
        // Floating tensors take the model dtype; integer ones (packed quantized weights) stay.
        let tensor = if tensor.dtype().is_float() { tensor.to_dtype(inner.dtype)? } else { tensor };
        Ok(tensor.to_device(&inner.device)?)
    }
}

/// Tells the kernel the mapped pages of `bytes` are no longer needed. Each tensor is read from
/// the map exactly once (into its compute buffer), so without this the file pages would stay
/// resident next to the copy and loading would peak at twice the weights.
fn release_pages(bytes: &[u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
    let start = (bytes.as_ptr() as usize).div_ceil(page) * page;
    let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
    if end > start {
        // SAFETY: [start, end) lies inside a read-only, private file mapping that lmx never
        // writes; MADV_DONTNEED only drops the resident copies, and any later read faults the
        // same bytes back in from the file, so no live reference can observe a change.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

fn parent_of(paths: &[PathBuf]) -> String {
    paths.first().and_then(|p| p.parent()).map(Path::display).map(|d| d.to_string()).unwrap_or_default()
}

impl WeightsPath {
    /// The view one level down: `vb.pp("self_attn")`.
    pub fn pp(&self, segment: impl std::fmt::Display) -> WeightsPath {
        let prefix = if self.prefix.is_empty() { segment.to_string() } else { format!("{}.{segment}", self.prefix) };
        WeightsPath { weights: self.weights.clone(), prefix }
    }

    /// The full checkpoint key of `name` under this prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) }
    }

    /// True when the checkpoint holds `name` under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.weights.inner.index.contains_key(&self.key(name))
    }

    /// Reads tensor `name`, checking it has exactly `shape`.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let key = self.key(name);
        let expected: Shape = shape.into();
        if let Some((_, found)) = self.weights.inner.index.get(&key) {
            if found.as_slice() != expected.dims() {
                return Err(IoError::ShapeMismatch {
                    key,
                    expected: expected.dims().to_vec(),
                    found: found.clone(),
                    source_name: self.weights.inner.name.clone(),
                });
            }
        }
        let tensor = self.weights.load(&key)?;
        match &self.weights.inner.adapters {
            Some(a) if a.full_trains(&key) => match a.saved(&key, expected.dims())? {
                Some(saved) => a.register(&key, saved.to_dtype(tensor.dtype())?.to_device(tensor.device())?),
                None => a.register(&key, tensor),
            },
            _ => Ok(tensor),
        }
    }

    /// The adapter setup, when the module at this prefix gets a LoRA/DoRA adapter.
    pub fn adapter(&self) -> Option<&Arc<AdapterSetup>> {
        self.weights.inner.adapters.as_ref().filter(|a| a.targets(&self.prefix))
    }

    /// The view's prefix (`model.layers.3.self_attn.q_proj`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.weights.inner.dtype
    }

    /// The dtype tensor `name` has in the checkpoint (before conversion), if it exists.
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        let key = self.key(name);
        let inner = &self.weights.inner;
        let (shard, _) = inner.index.get(&key)?;
        match &inner.source {
            Source::Safetensors(files) => files[*shard].1.get(&key).ok().and_then(|v| DType::try_from(v.dtype()).ok()),
            Source::Memory(map) => map.get(&key).map(Tensor::dtype),
        }
    }

    /// True when the model is being built for LoRA/DoRA training (its base weights are frozen).
    pub fn frozen_base(&self) -> bool {
        self.weights.inner.adapters.as_ref().is_some_and(|a| a.trainable() && a.kind != crate::FineTuneType::Full)
    }

    /// How the module at this prefix is quantized (bits, group size), or None when it is a
    /// plain float module. A mode other than `affine` is an error naming the module.
    pub fn quantization(&self) -> Result<Option<QuantSpec>> {
        let Some(q) = &self.weights.inner.quantization else { return Ok(None) };
        match q.for_module(&self.prefix, self.contains("scales")) {
            None => Ok(None),
            Some(_) if self.weights.inner.adapters.as_ref().is_some_and(|a| a.full_trains(&self.key("weight"))) => Err(IoError::Json {
                path: PathBuf::from("--fine-tune-type"),
                msg: format!("full fine-tuning trains `{}`, which is quantized; use lora or dora on a quantized model, or dequantize it first (`lmx convert -d`)", self.prefix),
            }),
            Some((spec, "affine")) => Ok(Some(spec)),
            Some((_, mode)) => Err(IoError::Json {
                path: PathBuf::from("config.json"),
                msg: format!("layer `{}` uses quantization mode `{mode}`; lmx supports `affine` only", self.prefix),
            }),
        }
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.weights.inner.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Weights {
        let mut m = HashMap::new();
        m.insert("a.b.weight".to_string(), Tensor::zeros((2, 3), DType::F32, &Device::Cpu).expect("zeros"));
        m.insert("a.extra".to_string(), Tensor::zeros(4, DType::F32, &Device::Cpu).expect("zeros"));
        Weights::from_tensors(m, DType::BF16, &Device::Cpu, "test")
    }

    #[test]
    fn strict_loading_names_keys_and_shapes() {
        let w = store();
        let b = w.root().pp("a").pp("b");
        let t = b.get((2, 3), "weight").expect("present");
        assert_eq!(t.dtype(), DType::BF16);
        let err = b.get((3, 2), "weight").expect_err("wrong shape").to_string();
        assert!(err.contains("a.b.weight") && err.contains("[2, 3]") && err.contains("[3, 2]"), "{err}");
        let err = b.get(3, "bias").expect_err("missing").to_string();
        assert!(err.contains("a.b.bias"), "{err}");
        let err = w.finish(|_| false).expect_err("unused").to_string();
        assert!(err.contains("a.extra"), "{err}");
        assert!(w.finish(|k| k == "a.extra").is_ok());
    }
}
