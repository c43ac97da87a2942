//! Writing checkpoints safely: every output file is written under a temporary name in the
//! destination folder and renamed into place, so an interrupted run never leaves a file that
//! looks complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lmx_core::Tensor;

use crate::error::{IoError, Result};

/// The temporary sibling a file is written to before the rename.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically (temporary file + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    std::fs::write(&tmp, bytes).map_err(|e| IoError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| IoError::io(path, e))
}

/// Saves `tensors` as one safetensors file, atomically.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = temp_path(path);
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| IoError::Safetensors { path: tmp.clone(), msg: e.to_string() })?;
    std::fs::rename(&tmp, path).map_err(|e| IoError::io(path, e))
}
