//! The local Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), laid out as `models--org--name/{refs/main, snapshots/<rev>/}`,
//! the layout `huggingface_hub` and `hf-hub` write.

use std::path::{Path, PathBuf};

use crate::error::{IoError, Result};

/// The hub cache folder the environment selects.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// True for strings shaped like a hub id (`org/name`, no path-like parts).
pub fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && *p != "." && *p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

/// The snapshot folder of `repo_id` at `refs/main` (or the only snapshot) in `cache`.
pub fn cached_snapshot(cache: &Path, repo_id: &str) -> Result<PathBuf> {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let not_cached = || IoError::NotCached { id: repo_id.to_string(), cache: cache.to_path_buf() };
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let snap = snapshots.join(rev.trim());
        if snap.is_dir() {
            return Ok(snap);
        }
    }
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(&snapshots).map_err(|_| not_cached())?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
    snaps.sort();
    match snaps.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(not_cached()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(looks_like_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!looks_like_repo_id("./model"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../x"));
    }

    #[test]
    fn resolves_refs_main_and_reports_missing() {
        let tmp = std::env::temp_dir().join(format!("lmx-hub-test-{}", std::process::id()));
        let repo = tmp.join("models--org--name");
        std::fs::create_dir_all(repo.join("snapshots").join("abc123")).expect("mkdir");
        std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
        std::fs::write(repo.join("refs").join("main"), "abc123\n").expect("write");
        assert_eq!(cached_snapshot(&tmp, "org/name").expect("found"), repo.join("snapshots").join("abc123"));
        let err = cached_snapshot(&tmp, "org/other").expect_err("missing").to_string();
        assert!(err.contains("huggingface-cli download org/other"), "{err}");
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
