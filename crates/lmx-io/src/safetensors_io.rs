//! Writing checkpoints safely: every output file is written under a temporary name in the
//! destination folder, flushed to disk and renamed into place, so an interrupted run never
//! leaves a file that looks complete, and a failed write leaves nothing behind. Files get the
//! permissions of any file the user creates (their umask), not a temp file's 0600.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use lmx_core::{DType, Tensor};

use crate::error::{IoError, Result};

/// Writes `path` atomically: `fill` writes the content into a temporary sibling, which is
/// flushed to disk and renamed into place (then the folder entry is flushed too). On any
/// error the temporary file is removed and the error names the file and the cause (a full
/// disk says so, rather than blaming the data).
pub fn write_file_atomic(path: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> Result<()> {
    crate::temp::remove_stale(path);
    let tmp = crate::temp::partial_path(path);
    crate::temp::register(&tmp);
    let result = write_and_rename(&tmp, path, fill);
    crate::temp::unregister(&tmp);
    result
}

fn write_and_rename(tmp: &Path, path: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> Result<()> {
    let written = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(tmp)?);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(tmp);
        return Err(IoError::io(path, e));
    }
    if let Err(e) = std::fs::rename(tmp, path) {
        let _ = std::fs::remove_file(tmp);
        return Err(IoError::io(path, e));
    }
    sync_parent(path);
    Ok(())
}

/// A file written and synced under a temporary name, not yet in place: [`Staged::commit`]
/// renames it (dropped uncommitted, it is removed). Files that belong together (adapter
/// weights and their config) are staged first and committed one right after the other, so an
/// interrupted run leaves the old set or the new one, not one file of each.
pub struct Staged {
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
    done: bool,
}

/// Writes `path`'s new content under its temporary name and syncs it.
pub fn stage_file(path: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>) -> Result<Staged> {
    crate::temp::remove_stale(path);
    let tmp = crate::temp::partial_path(path);
    crate::temp::register(&tmp);
    let staged = Staged { tmp: tmp.clone(), path: path.to_path_buf(), done: false };
    let written = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        fill(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })();
    written.map_err(|e| IoError::io(path, e))?;
    Ok(staged)
}

impl Staged {
    /// Renames the staged file into place (the folder entry is synced by the caller, once).
    pub fn commit(mut self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.path).map_err(|e| IoError::io(&self.path, e))?;
        self.done = true;
        crate::temp::unregister(&self.tmp);
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
            crate::temp::unregister(&self.tmp);
        }
    }
}

/// Flushes the folder entry of `path` (best effort: not every file system supports it).
pub fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Writes `bytes` to `path` atomically (temporary file + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_atomic(path, |w| w.write_all(bytes))
}

/// The safetensors name of a dtype and its element size (other dtypes are written as F32).
fn st_dtype(dtype: DType) -> (&'static str, usize) {
    match dtype {
        DType::U8 => ("U8", 1),
        DType::U32 => ("U32", 4),
        DType::I32 => ("I32", 4),
        DType::I64 => ("I64", 8),
        DType::BF16 => ("BF16", 2),
        DType::F16 => ("F16", 2),
        DType::F32 => ("F32", 4),
        DType::F64 => ("F64", 8),
        _ => ("F32", 4),
    }
}

/// The little-endian bytes of a tensor's elements in row-major order.
fn tensor_bytes(t: &Tensor) -> lmx_core::Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::U8 => t.to_vec1::<u8>()?,
        DType::U32 => t.to_vec1::<u32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::I32 => t.to_vec1::<i32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::I64 => t.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        DType::F64 => t.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => t.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
    })
}

/// Saves `tensors` as one safetensors file, atomically. Tensors are laid out by element size
/// (largest first), then by name, so every tensor starts aligned to its element size; one
/// tensor's bytes are in memory at a time.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    save_safetensors_with_metadata(tensors, &BTreeMap::new(), path)
}

/// [`save_safetensors`] staged ([`stage_file`]): written and synced, not yet in place.
pub fn stage_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<Staged> {
    let (head, names) = safetensors_header(tensors, &BTreeMap::new(), path)?;
    stage_file(path, |w| write_safetensors(w, &head, &names, tensors))
}

/// [`save_safetensors`] with string `metadata` in the header (`__metadata__`).
pub fn save_safetensors_with_metadata(tensors: &HashMap<String, Tensor>, metadata: &BTreeMap<String, String>, path: &Path) -> Result<()> {
    let (head, names) = safetensors_header(tensors, metadata, path)?;
    write_file_atomic(path, |w| write_safetensors(w, &head, &names, tensors))
}

fn write_safetensors(w: &mut BufWriter<File>, head: &[u8], names: &[&String], tensors: &HashMap<String, Tensor>) -> std::io::Result<()> {
    w.write_all(&(head.len() as u64).to_le_bytes())?;
    w.write_all(head)?;
    for name in names {
        w.write_all(&tensor_bytes(&tensors[*name]).map_err(std::io::Error::other)?)?;
    }
    Ok(())
}

/// The padded header and the tensor order of a safetensors file of `tensors`.
fn safetensors_header<'a>(tensors: &'a HashMap<String, Tensor>, metadata: &BTreeMap<String, String>, path: &Path) -> Result<(Vec<u8>, Vec<&'a String>)> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort_by_key(|n| (std::cmp::Reverse(st_dtype(tensors[*n].dtype()).1), (*n).clone()));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).map_err(|e| IoError::Json { path: path.to_path_buf(), msg: e.to_string() })?);
    }
    let mut offset = 0usize;
    for name in &names {
        let t = &tensors[*name];
        let (dtype, size) = st_dtype(t.dtype());
        let bytes = t.elem_count() * size;
        header.insert((*name).clone(), serde_json::json!({"dtype": dtype, "shape": t.dims(), "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    let mut head = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| IoError::Json { path: path.to_path_buf(), msg: e.to_string() })?;
    // The data starts 8-byte aligned: the header is padded with spaces.
    head.resize(head.len().next_multiple_of(8), b' ');
    Ok((head, names))
}

/// Reads a whole safetensors file (small files: prompt caches) into CPU tensors, with its
/// string metadata. Every header entry is checked against the file: a known dtype, a shape
/// matching its byte range, ranges inside the data.
pub fn read_safetensors_with_metadata(path: &Path) -> Result<(HashMap<String, Tensor>, BTreeMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| IoError::io(path, e))?;
    let bad = |msg: String| IoError::Safetensors { path: path.to_path_buf(), msg };
    let n = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize).ok_or_else(|| bad("shorter than its 8-byte header length".into()))?;
    let head = bytes.get(8..8usize.saturating_add(n)).ok_or_else(|| bad(format!("a header of {n} bytes in a file of {}", bytes.len())))?;
    let data = &bytes[8 + n..];
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(head).map_err(|e| bad(format!("header: {e}")))?;
    let mut tensors = HashMap::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            metadata = serde_json::from_value(entry).map_err(|e| bad(format!("__metadata__ must map strings to strings: {e}")))?;
            continue;
        }
        let field = |k: &str| entry.get(k).cloned().ok_or_else(|| bad(format!("tensor `{name}` has no `{k}`")));
        let dtype: String = serde_json::from_value(field("dtype")?).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let shape: Vec<usize> = serde_json::from_value(field("shape")?).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let [start, end]: [usize; 2] = serde_json::from_value(field("data_offsets")?).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let (dt, size) = match dtype.as_str() {
            "F32" => (DType::F32, 4),
            "BF16" => (DType::BF16, 2),
            "F16" => (DType::F16, 2),
            "U32" => (DType::U32, 4),
            "I32" => (DType::I32, 4),
            "I64" => (DType::I64, 8),
            "U8" => (DType::U8, 1),
            other => return Err(bad(format!("tensor `{name}` has dtype {other}, which lmx does not read"))),
        };
        let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad(format!("tensor `{name}`: shape {shape:?} overflows")))?;
        let raw =
            data.get(start..end).filter(|r| r.len() == count * size).ok_or_else(|| bad(format!("tensor `{name}`: bytes {start}..{end} do not hold {shape:?} {dtype} in {} data bytes", data.len())))?;
        let t = Tensor::from_raw_buffer(raw, dt, &shape, &lmx_core::Device::Cpu)?;
        tensors.insert(name, t);
    }
    Ok((tensors, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What this writer writes, candle's reader reads back bit for bit, and the file has the
    /// permissions of an ordinary new file.
    #[test]
    fn round_trips_through_candle_with_normal_permissions() -> Result<()> {
        let dev = lmx_core::Device::Cpu;
        let mut map = HashMap::new();
        map.insert("a.weight".to_string(), Tensor::randn(0f32, 1.0, (3, 5), &dev)?);
        map.insert("b.scales".to_string(), Tensor::randn(0f32, 1.0, (2, 3), &dev)?.to_dtype(DType::BF16)?);
        map.insert("c.packed".to_string(), Tensor::new(&[1u32, 2, 3, 0xFFFF_FFFF], &dev)?);
        map.insert("d.half".to_string(), Tensor::randn(0f32, 1.0, 7, &dev)?.to_dtype(DType::F16)?);
        let dir = std::env::temp_dir().join(format!("lmx-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| IoError::io(&dir, e))?;
        let path = dir.join("t.safetensors");
        save_safetensors(&map, &path)?;
        let back = candle_core::safetensors::load(&path, &dev)?;
        for (k, t) in &map {
            let diff = (t.to_dtype(DType::F64)? - back[k].to_dtype(DType::F64)?)?.abs()?.sum_all()?.to_scalar::<f64>()?;
            assert_eq!(diff, 0.0, "{k}");
            assert_eq!(t.dtype(), back[k].dtype(), "{k}");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let probe = dir.join("probe");
            std::fs::write(&probe, b"x").map_err(|e| IoError::io(&probe, e))?;
            let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
            assert_eq!(mode(&path), mode(&probe), "safetensors files get the umask's permissions");
        }
        let left: Vec<_> = std::fs::read_dir(&dir).map_err(|e| IoError::io(&dir, e))?.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with('.')).collect();
        assert!(left.is_empty(), "temporary files left behind: {left:?}");
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    /// A write that fails midway leaves neither the target nor a temporary file.
    #[test]
    fn a_failed_write_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("lmx-st-fail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("x.json");
        let err = write_file_atomic(&path, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device"))
        })
        .expect_err("the fill fails");
        assert!(err.to_string().contains("No space left"), "{err}");
        assert_eq!(std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(1), 0);
        std::fs::remove_dir_all(&dir).ok();
    }
}
