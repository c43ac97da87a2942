//! Temporary outputs: a folder or file is written under `.NAME.partial-PID` beside its target
//! and renamed into place when complete. [`TempOutput`] removes it when the work fails (the
//! guard is dropped without [`TempOutput::commit`]); [`remove_registered`] removes every
//! live one (the CLI calls it on Ctrl-C, before exiting); [`remove_stale`] removes those left
//! by runs that were killed outright (their process no longer exists).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{IoError, Result};

/// Temporary outputs of this process that are still being written.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The temporary sibling of `target` for this process.
pub fn partial_path(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "output".into());
    target.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// A temporary output folder, removed on drop unless committed.
#[derive(Debug)]
pub struct TempOutput {
    path: PathBuf,
}

impl TempOutput {
    /// Creates the (empty) temporary folder for `target`, first removing stale ones of
    /// killed runs.
    pub fn dir_for(target: &Path) -> Result<Self> {
        remove_stale(target);
        let path = partial_path(target);
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| IoError::io(&path, e))?;
        }
        std::fs::create_dir_all(&path).map_err(|e| IoError::io(&path, e))?;
        register(&path);
        Ok(Self { path })
    }

    /// The temporary folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the finished folder to `target` (flushing the parent's entry).
    pub fn commit(self, target: &Path) -> Result<()> {
        std::fs::rename(&self.path, target).map_err(|e| IoError::io(target, e))?;
        crate::safetensors_io::sync_parent(target);
        unregister(&self.path);
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        unregister(&self.path);
    }
}

pub(crate) fn register(path: &Path) {
    if let Ok(mut live) = LIVE.lock() {
        live.push(path.to_path_buf());
    }
}

pub(crate) fn unregister(path: &Path) {
    if let Ok(mut live) = LIVE.lock() {
        live.retain(|p| p != path);
    }
}

/// Removes every temporary output this process is writing (for an interrupted process,
/// just before it exits).
pub fn remove_registered() {
    let paths = match LIVE.lock() {
        Ok(mut live) => std::mem::take(&mut *live),
        Err(_) => return,
    };
    for p in paths {
        let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
    }
}

/// Removes the temporary siblings of `target` (`.NAME.partial-PID`) whose process no longer
/// runs, and returns them.
pub fn remove_stale(target: &Path) -> Vec<PathBuf> {
    let Some(name) = target.file_name().map(|n| n.to_string_lossy().to_string()) else { return Vec::new() };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().to_string();
        let Some(pid) = file.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() || process_runs(pid) {
            continue;
        }
        let p = e.path();
        let gone = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        if gone.is_ok() {
            removed.push(p);
        }
    }
    removed
}

/// Whether process `pid` exists (on other systems than Linux: assumed, so nothing is removed).
fn process_runs(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dropped guard removes its folder; a committed one is renamed; a folder of a dead
    /// process is stale, one of a live process is not.
    #[test]
    fn guards_and_stale_folders() -> Result<()> {
        let base = std::env::temp_dir().join(format!("lmx-temp-{}", std::process::id()));
        std::fs::create_dir_all(&base).map_err(|e| IoError::io(&base, e))?;
        let target = base.join("out");
        {
            let t = TempOutput::dir_for(&target)?;
            std::fs::write(t.path().join("x"), b"1").map_err(|e| IoError::io(t.path(), e))?;
        }
        assert_eq!(std::fs::read_dir(&base).map(|d| d.count()).unwrap_or(9), 0, "dropped guard leaves nothing");
        let t = TempOutput::dir_for(&target)?;
        t.commit(&target)?;
        assert!(target.is_dir());
        // PID 1 always runs; a PID beyond pid_max never does.
        let (live, dead) = (base.join(".out2.partial-1"), base.join(".out2.partial-4294967294"));
        for d in [&live, &dead] {
            std::fs::create_dir_all(d).map_err(|e| IoError::io(d, e))?;
        }
        let removed = remove_stale(&base.join("out2"));
        assert_eq!(removed, vec![dead.clone()]);
        assert!(live.exists() && !dead.exists());
        std::fs::remove_dir_all(&base).ok();
        Ok(())
    }
}
