//! A strict tensor source: models ask for tensors by checkpoint key and shape; whatever the
//! checkpoint holds that nobody asked for is an error at the end of loading.
//!
//! Safetensors files are memory-mapped and each tensor (or the slice of it one rank of a
//! sharded model holds) is read from the map once, on the CPU, in its stored dtype unless the
//! source was opened with a cast. GGUF tensors arrive already renamed, dequantized or packed (see
//! [`crate::gguf`]). Where tensors go and in which dtype they compute is decided by the layer
//! builder (`lmx_nn::Builder`), not here.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use lmx_core::{DType, Device, Tensor};

use crate::error::{IoError, Result};

enum Source {
    /// One memory-mapped safetensors file per shard.
    Safetensors(Vec<(PathBuf, MmapedSafetensors)>),
    /// Tensors already in memory (a GGUF file after renaming and dequantization).
    Memory(Mutex<HashMap<String, Tensor>>),
}

/// Where a key lives and what it holds.
#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    shape: Vec<usize>,
    /// None for a dtype candle cannot hold.
    dtype: Option<DType>,
}

struct Inner {
    source: Source,
    index: HashMap<String, Entry>,
    used: Mutex<BTreeSet<String>>,
    /// Floating tensors are converted to this dtype as they are read (conversion).
    cast: Option<DType>,
    /// A short description of where the tensors come from, for error messages.
    name: String,
    /// Reads return placeholders of the right shape and dtype without touching any data.
    shapes_only: bool,
    /// In-memory tensors are handed over on their first whole read ([`Weights::handed_over`]).
    hand_over: bool,
}

/// The tensors of one checkpoint, shared by every layer while a model is built.
#[derive(Clone)]
pub struct Weights {
    inner: Arc<Inner>,
}

impl Weights {
    /// Memory-maps safetensors shards.
    pub fn from_safetensors(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            match std::fs::metadata(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(IoError::NotFound { path: path.clone(), hint: String::new() }),
                Err(e) => return Err(IoError::io(path, e)),
                // A FIFO or device would block or stream forever; a folder cannot be mapped.
                Ok(m) if !m.is_file() => {
                    return Err(IoError::io(path, std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file; lmx reads weights only from regular files or links to them")))
                }
                Ok(_) => {}
            }
            // SAFETY: the file is mapped read-only; lmx never writes to a checkpoint it is
            // reading, and a concurrent writer outside lmx is the user's responsibility (the same
            // contract as every mmap-based loader: candle, safetensors, MLX).
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| IoError::Safetensors { path: path.clone(), msg: e.to_string() })?;
            for (name, view) in st.tensors() {
                // A dtype candle lacks is an error only if the tensor is read.
                let dtype = DType::try_from(view.dtype()).ok();
                index.insert(name, Entry { shard: i, shape: view.shape().to_vec(), dtype });
            }
            files.push((path.clone(), st));
        }
        let name = match paths {
            [one] => one.display().to_string(),
            _ => format!("{} safetensors shards in {}", paths.len(), parent_of(paths)),
        };
        Ok(Self::new(Source::Safetensors(files), index, name))
    }

    /// Wraps tensors already in memory (renamed GGUF tensors, or tensors built by a test).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, name: &str) -> Self {
        let index = tensors.iter().map(|(k, t)| (k.clone(), Entry { shard: 0, shape: t.dims().to_vec(), dtype: Some(t.dtype()) })).collect();
        Self::new(Source::Memory(Mutex::new(tensors)), index, name.to_string())
    }

    fn new(source: Source, index: HashMap<String, Entry>, name: String) -> Self {
        Self { inner: Arc::new(Inner { source, index, used: Mutex::new(BTreeSet::new()), cast: None, name, shapes_only: false, hand_over: false }) }
    }

    /// Floating tensors are read as `dtype` (None: as stored). Conversion uses this; a model
    /// being built leaves the choice to its layer builder.
    pub fn with_cast(mut self, dtype: Option<DType>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.cast = dtype;
        }
        self
    }

    /// In-memory tensors leave this source on their first whole read (a second one is an
    /// error), so a model that copies what it reads (packed matrices) does not hold a GGUF
    /// model twice while it loads.
    pub fn handed_over(mut self) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.hand_over = true;
        }
        self
    }

    /// The dtype floating tensors are read as, if [`with_cast`](Self::with_cast) set one.
    pub fn cast(&self) -> Option<DType> {
        self.inner.cast
    }

    /// The same checkpoint for a shape check: every read checks the key and shape as usual
    /// but returns a zero-stride placeholder (a broadcast scalar) instead of the data, so a
    /// whole model can be built to validate a checkpoint without reading or allocating it.
    /// Its used-key record is its own.
    pub fn shapes_only(&self) -> Self {
        let index = self.inner.index.clone();
        Self {
            inner: Arc::new(Inner {
                source: Source::Memory(Mutex::new(HashMap::new())),
                index,
                used: Mutex::new(BTreeSet::new()),
                cast: None,
                name: self.inner.name.clone(),
                shapes_only: true,
                hand_over: false,
            }),
        }
    }

    /// True for a [`Weights::shapes_only`] checkpoint.
    pub fn is_shapes_only(&self) -> bool {
        self.inner.shapes_only
    }

    /// Every key in the checkpoint, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.inner.index.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// True when the checkpoint holds `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.inner.index.contains_key(key)
    }

    /// The dtype `key` is stored in (before any cast).
    pub fn stored_dtype(&self, key: &str) -> Option<DType> {
        self.inner.index.get(key).and_then(|e| e.dtype)
    }

    /// The dtype the model computes in by default, as MLX LM does: the stored dtype of the
    /// weights. For a quantized checkpoint that is the dtype of its scales; otherwise the
    /// float32/float16/bfloat16 dtype holding the most elements (float32 if none). The cast,
    /// when one is set, wins.
    pub fn compute_dtype(&self) -> DType {
        if let Some(d) = self.inner.cast {
            return d;
        }
        let index = &self.inner.index;
        let mut scales: Vec<(&String, &Entry)> = index.iter().filter(|(k, _)| k.ends_with(".scales")).collect();
        scales.sort_by(|a, b| a.0.cmp(b.0));
        let compute = |d: &DType| matches!(d, DType::F32 | DType::F16 | DType::BF16);
        if let Some(d) = scales.first().and_then(|(_, e)| e.dtype).filter(compute) {
            return d;
        }
        let mut count: HashMap<DType, usize> = HashMap::new();
        for (d, e) in index.values().filter_map(|e| e.dtype.filter(compute).map(|d| (d, e))) {
            *count.entry(d).or_default() += e.shape.iter().product::<usize>();
        }
        let mut by_count: Vec<(DType, usize)> = count.into_iter().collect();
        by_count.sort_by_key(|(d, n)| (std::cmp::Reverse(*n), d.size_in_bytes()));
        by_count.first().map_or(DType::F32, |(d, _)| *d)
    }

    /// Checks that every checkpoint tensor was used, except keys for which `ignored` is true
    /// (e.g. `rotary_emb.inv_freq` buffers that some exporters save).
    pub fn finish(&self, ignored: impl Fn(&str) -> bool) -> Result<()> {
        // A panic while another thread held the lock cannot corrupt a set of names: keep it.
        let used = self.inner.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut unused: Vec<&String> = self.inner.index.keys().filter(|k| !used.contains(*k) && !ignored(k)).collect();
        unused.sort();
        match unused.first() {
            None => Ok(()),
            Some(first) => Err(IoError::UnusedTensors { count: unused.len(), first: (*first).clone(), source_name: self.inner.name.clone() }),
        }
    }

    /// Marks every tensor under `prefix` (`model.layers.3` covers `model.layers.3.*`) as
    /// left out on purpose, without reading it: the layers another pipeline stage holds.
    pub fn skip_prefix(&self, prefix: &str) {
        let dotted = format!("{prefix}.");
        let mut used = self.inner.used.lock().unwrap_or_else(|e| e.into_inner());
        for key in self.inner.index.keys().filter(|k| k.starts_with(&dotted)) {
            used.insert(key.clone());
        }
    }

    /// Reads tensor `key` whatever its shape (for conversion, which copies every tensor).
    pub fn tensor(&self, key: &str) -> Result<Tensor> {
        self.read(key, None)
    }

    /// Reads tensor `key`, checking it has exactly `shape`.
    pub fn get(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        self.check_shape(key, shape)?;
        self.read(key, None)
    }

    /// Reads only `range` along dimension `dim` of tensor `key`, whose whole shape must be
    /// `shape`: a rank of a sharded model never holds the rest.
    pub fn get_slice(&self, key: &str, shape: &[usize], dim: usize, range: Range<usize>) -> Result<Tensor> {
        self.check_shape(key, shape)?;
        if dim >= shape.len() || range.end > shape[dim] || range.start > range.end {
            return Err(IoError::ShapeMismatch {
                key: key.to_string(),
                expected: shape.to_vec(),
                found: shape.to_vec(),
                source_name: format!("{} (slice {range:?} of dimension {dim} is out of range)", self.inner.name),
            });
        }
        self.read(key, Some((dim, range)))
    }

    fn check_shape(&self, key: &str, shape: &[usize]) -> Result<()> {
        match self.inner.index.get(key) {
            Some(e) if e.shape != shape => Err(IoError::ShapeMismatch { key: key.to_string(), expected: shape.to_vec(), found: e.shape.clone(), source_name: self.inner.name.clone() }),
            _ => Ok(()),
        }
    }

    fn read(&self, key: &str, slice: Option<(usize, Range<usize>)>) -> Result<Tensor> {
        let inner = &self.inner;
        let Some(entry) = inner.index.get(key) else {
            return Err(IoError::MissingTensor { key: key.to_string(), source_name: inner.name.clone() });
        };
        if inner.shapes_only {
            let mut dims = entry.shape.clone();
            if let Some((dim, range)) = &slice {
                dims[*dim] = range.len();
            }
            inner.used.lock().unwrap_or_else(|e| e.into_inner()).insert(key.to_string());
            return Ok(Tensor::zeros((), entry.dtype.unwrap_or(DType::F32), &Device::Cpu)?.broadcast_as(dims)?);
        }
        let tensor = match &inner.source {
            Source::Safetensors(files) => {
                let (path, st) = &files[entry.shard];
                let err = |e: candle_core::Error| IoError::Safetensors { path: path.clone(), msg: e.to_string() };
                let view = st.get(key).map_err(err)?;
                // The bytes this read touches: the whole tensor, or from the slice's first
                // run to its last (exactly the slice when it cuts the first dimension, as an
                // expert of stacked experts does), so that reading a tensor in E slices
                // checks and releases each byte once, not E times.
                let span = match &slice {
                    None => 0..view.data().len(),
                    Some((dim, range)) => slice_span(&entry.shape, entry.dtype.map_or(1, |d| d.size_in_bytes()), *dim, range.clone()),
                };
                let touched = view.data().get(span).ok_or_else(|| IoError::Safetensors { path: path.clone(), msg: format!("tensor `{key}` is shorter than its shape") })?;
                if !raw_all_finite(touched, entry.dtype) {
                    return Err(IoError::NonFinite { path: path.clone(), key: key.to_string() });
                }
                let tensor = match &slice {
                    None => candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(err)?,
                    Some((dim, range)) => {
                        let dtype = entry.dtype.ok_or_else(|| IoError::Safetensors { path: path.clone(), msg: format!("tensor `{key}` has a dtype lmx cannot read") })?;
                        slice_bytes(view.data(), &entry.shape, dtype, *dim, range.clone()).map_err(err)?
                    }
                };
                release_pages(touched);
                tensor
            }
            Source::Memory(map) => {
                // A panic while another thread held the lock cannot corrupt the map: keep it.
                let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
                let taken = || IoError::MissingTensor { key: key.to_string(), source_name: format!("{} (it was read whole once already, which hands an in-memory tensor over)", inner.name) };
                match &slice {
                    None if inner.hand_over => map.remove(key).ok_or_else(taken)?,
                    None => map.get(key).ok_or_else(taken)?.clone(),
                    Some((dim, range)) => map.get(key).ok_or_else(taken)?.narrow(*dim, range.start, range.len())?.contiguous()?,
                }
            }
        };
        inner.used.lock().unwrap_or_else(|e| e.into_inner()).insert(key.to_string());
        Ok(match inner.cast {
            Some(dtype) if tensor.dtype().is_float() => tensor.to_dtype(dtype)?,
            _ => tensor,
        })
    }
}

/// False when the raw little-endian values of a float tensor include a NaN or an infinity
/// (all exponent bits set): a corrupt or diverged checkpoint is refused when it is read,
/// instead of turning every output into NaN. Integer tensors are always finite.
fn raw_all_finite(data: &[u8], dtype: Option<DType>) -> bool {
    dtype.is_none_or(|d| lmx_core::ops::raw_all_finite(data, d))
}

/// The bytes of a row-major tensor of `shape` (`elem` bytes per value) that the part `range`
/// of dimension `dim` spans: from its first run to the end of its last.
fn slice_span(shape: &[usize], elem: usize, dim: usize, range: Range<usize>) -> Range<usize> {
    let inner: usize = shape[dim + 1..].iter().product::<usize>() * elem;
    let outer: usize = shape[..dim].iter().product();
    let row = shape[dim] * inner;
    if outer == 0 || range.is_empty() {
        return 0..0;
    }
    range.start * inner..(outer - 1) * row + range.end * inner
}

/// The part `range` of dimension `dim` of a row-major tensor whose raw bytes are `data`:
/// one contiguous run per index of the dimensions before `dim`.
fn slice_bytes(data: &[u8], shape: &[usize], dtype: DType, dim: usize, range: Range<usize>) -> candle_core::Result<Tensor> {
    let elem = dtype.size_in_bytes();
    let inner: usize = shape[dim + 1..].iter().product::<usize>() * elem;
    let outer: usize = shape[..dim].iter().product();
    let (row, run) = (shape[dim] * inner, range.len() * inner);
    if data.len() != outer * row {
        candle_core::bail!("{} bytes for a tensor of shape {shape:?} and dtype {dtype:?}", data.len());
    }
    let mut bytes = Vec::with_capacity(outer * run);
    for o in 0..outer {
        let start = o * row + range.start * inner;
        bytes.extend_from_slice(&data[start..start + run]);
    }
    let mut dims = shape.to_vec();
    dims[dim] = range.len();
    Tensor::from_raw_buffer(&bytes, dtype, &dims, &Device::Cpu)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Weights {
        let mut m = HashMap::new();
        m.insert("a.b.weight".to_string(), Tensor::arange(0f32, 6.0, &Device::Cpu).and_then(|t| t.reshape((2, 3))).expect("t"));
        m.insert("a.extra".to_string(), Tensor::zeros(4, DType::BF16, &Device::Cpu).expect("zeros"));
        Weights::from_tensors(m, "test")
    }

    /// NaN and infinities are found in every float dtype's raw bytes; finite values and
    /// integers pass.
    #[test]
    fn non_finite_values_are_found() {
        let bytes = |v: &[f32], dtype: DType| -> Vec<u8> {
            match dtype {
                DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                DType::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect(),
                _ => v.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect(),
            }
        };
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            assert!(raw_all_finite(&bytes(&[0.0, -1.5, 1e4, -0.0], dtype), Some(dtype)), "{dtype:?}");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                assert!(!raw_all_finite(&bytes(&[1.0, bad, 2.0], dtype), Some(dtype)), "{dtype:?} {bad}");
            }
        }
        assert!(raw_all_finite(&[0xff; 16], Some(DType::U32)));
    }

    #[test]
    fn strict_loading_names_keys_and_shapes() {
        let w = store();
        let t = w.get("a.b.weight", &[2, 3]).expect("present");
        assert_eq!(t.dtype(), DType::F32);
        let err = w.get("a.b.weight", &[3, 2]).expect_err("wrong shape").to_string();
        assert!(err.contains("a.b.weight") && err.contains("[2, 3]") && err.contains("[3, 2]"), "{err}");
        let err = w.get("a.b.bias", &[3]).expect_err("missing").to_string();
        assert!(err.contains("a.b.bias"), "{err}");
        let err = w.finish(|_| false).expect_err("unused").to_string();
        assert!(err.contains("a.extra"), "{err}");
        assert!(w.finish(|k| k == "a.extra").is_ok());
        // Most elements are f32 (6 against 4).
        assert_eq!(w.compute_dtype(), DType::F32);
    }

    /// A slice read from the file's bytes equals the same slice of the whole tensor.
    #[test]
    fn slices_read_from_safetensors_bytes() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lmx-weights-slice-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| IoError::io(&dir, e))?;
        let path = dir.join("m.safetensors");
        let t = Tensor::arange(0u32, 24, &Device::Cpu)?.reshape((2, 3, 4))?;
        let map = HashMap::from([("t".to_string(), t.clone())]);
        candle_core::safetensors::save(&map, &path)?;
        let w = Weights::from_safetensors(&[path])?;
        for (dim, range) in [(0, 1..2), (1, 1..3), (2, 0..1), (2, 2..4)] {
            let got = w.get_slice("t", &[2, 3, 4], dim, range.clone())?.flatten_all()?.to_vec1::<u32>()?;
            let want = t.narrow(dim, range.start, range.len())?.flatten_all()?.to_vec1::<u32>()?;
            assert_eq!(got, want, "dim {dim} {range:?}");
        }
        assert!(w.get_slice("t", &[2, 3, 4], 1, 2..4).is_err());
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
