//! The local Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), laid out as `models--org--name/{refs/main, snapshots/<rev>/,
//! blobs/}`, the layout `huggingface_hub` and `hf-hub` write, and downloads into it from the
//! Hub (or `HF_ENDPOINT`): only weights in safetensors/GGUF, configs and tokenizer files,
//! never pickles; resumable (a `.incomplete` blob continues with an HTTP range request);
//! `HF_TOKEN` (else the `token` file under `HF_HOME`) authenticates; `HF_HUB_OFFLINE=1`
//! never touches the network.

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
    if let Some(rev) = std::fs::read_to_string(repo.join("refs").join("main")).ok().filter(|r| !r.trim().is_empty()) {
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

/// Where and how to download (from the environment: [`Hub::from_env`]).
#[derive(Debug, Clone)]
pub struct Hub {
    /// The Hub's base URL (`HF_ENDPOINT`, default `https://huggingface.co`).
    pub endpoint: String,
    /// Bearer token for private or gated repositories.
    pub token: Option<String>,
    /// The cache folder ([`cache_dir`]).
    pub cache: PathBuf,
    /// No network at all (`HF_HUB_OFFLINE` set to 1/true/yes/on).
    pub offline: bool,
    /// Show a progress bar per file on stderr.
    pub progress: bool,
}

impl Hub {
    /// Settings from `HF_ENDPOINT`, `HF_TOKEN` (or `HF_HOME/token`), `HF_HUB_CACHE`/`HF_HOME`
    /// and `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(".cache").join("huggingface"));
        let token = var("HF_TOKEN").or_else(|| std::fs::read_to_string(home.join("token")).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()));
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        Self { endpoint: var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()).trim_end_matches('/').to_string(), token, cache: cache_dir(), offline, progress: true }
    }

    /// The snapshot of `repo_id` at `main`: from the cache if it is there, else downloaded
    /// (the files lmx reads; see [`wanted`]).
    pub fn snapshot(&self, repo_id: &str) -> Result<PathBuf> {
        // A download writes refs/main last: a snapshot without it may be partial, and is
        // completed (files already there are kept) unless offline.
        let refs_main = self.cache.join(format!("models--{}", repo_id.replace('/', "--"))).join("refs").join("main");
        let complete = std::fs::read_to_string(refs_main).is_ok_and(|r| !r.trim().is_empty());
        if complete || self.offline {
            return cached_snapshot(&self.cache, repo_id);
        }
        self.download(repo_id, "main")
    }

    fn agent(&self) -> ureq::Agent {
        ureq::AgentBuilder::new().timeout_connect(std::time::Duration::from_secs(30)).timeout_read(std::time::Duration::from_secs(60)).build()
    }

    fn get(&self, agent: &ureq::Agent, url: &str) -> ureq::Request {
        self.request(agent, "GET", url)
    }

    fn request(&self, agent: &ureq::Agent, method: &str, url: &str) -> ureq::Request {
        let req = agent.request(method, url).set("User-Agent", concat!("lmx/", env!("CARGO_PKG_VERSION")));
        match &self.token {
            Some(t) => req.set("Authorization", &format!("Bearer {t}")),
            None => req,
        }
    }

    /// Downloads the wanted files of `repo_id` at `revision` into the cache and returns the
    /// snapshot folder. Each file goes to `blobs/<etag>.incomplete` first (continued where a
    /// previous attempt stopped), is renamed when complete, and linked from the snapshot.
    pub fn download(&self, repo_id: &str, revision: &str) -> Result<PathBuf> {
        let agent = self.agent();
        let info_url = format!("{}/api/models/{repo_id}/revision/{revision}", self.endpoint);
        let fail = |url: &str, msg: String| IoError::Download { id: repo_id.to_string(), url: url.to_string(), msg };
        let info: serde_json::Value = match self.get(&agent, &info_url).call() {
            Ok(r) => r.into_string().ok().and_then(|t| serde_json::from_str(&t).ok()).ok_or_else(|| fail(&info_url, "the answer is not JSON".into()))?,
            Err(ureq::Error::Status(404, _)) => return Err(fail(&info_url, "no such model (check the name; a private or gated one needs HF_TOKEN)".into())),
            Err(ureq::Error::Status(code @ (401 | 403), _)) => return Err(fail(&info_url, format!("HTTP {code}: set HF_TOKEN to a token with access to this model"))),
            Err(e) => return Err(fail(&info_url, format!("{} (check the network or HF_ENDPOINT; HF_HUB_OFFLINE=1 uses the cache only)", transport(&e)))),
        };
        let sha = info["sha"].as_str().filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric())).ok_or_else(|| fail(&info_url, "the answer has no commit sha".into()))?.to_string();
        let mut files: Vec<String> = info["siblings"].as_array().map(|a| a.iter().filter_map(|f| f["rfilename"].as_str()).filter(|f| wanted(f)).map(String::from).collect()).unwrap_or_default();
        let ggufs: Vec<String> = files.iter().filter(|f| f.ends_with(".gguf")).cloned().collect();
        if files.iter().any(|f| f.ends_with(".safetensors")) {
            // A folder model: GGUF exports beside it are not needed, and of the safetensors
            // only those the loader reads (the index's shards, else the top-level model*
            // files; not e.g. Mistral's consolidated.safetensors copy).
            files.retain(|f| !f.ends_with(".gguf"));
            let shards: Option<Vec<String>> = if files.iter().any(|f| f == "model.safetensors.index.json") {
                let url = format!("{}/{repo_id}/resolve/{sha}/model.safetensors.index.json", self.endpoint);
                let index: serde_json::Value = self
                    .get(&agent, &url)
                    .call()
                    .ok()
                    .and_then(|r| r.into_string().ok())
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .ok_or_else(|| fail(&url, "unreadable safetensors index".into()))?;
                index["weight_map"].as_object().map(|m| m.values().filter_map(|v| v.as_str().map(String::from)).collect())
            } else {
                None
            };
            let top_model = files.iter().any(|f| f.starts_with("model") && f.ends_with(".safetensors") && !f.contains('/'));
            files.retain(|f| match (&shards, f.ends_with(".safetensors")) {
                (_, false) => true,
                (Some(s), true) => s.contains(f),
                (None, true) => !f.contains('/') && (!top_model || f.starts_with("model")),
            });
        } else if ggufs.len() > 1 {
            return Err(fail(
                &info_url,
                format!("the repository holds {} GGUF files ({}); download the one you want, e.g. `huggingface-cli download {repo_id} {}`, and pass its path", ggufs.len(), ggufs.join(", "), ggufs[0]),
            ));
        } else if ggufs.is_empty() {
            return Err(fail(&info_url, "the repository has no safetensors or GGUF weights (lmx never loads pickle files)".into()));
        }
        let repo = self.cache.join(format!("models--{}", repo_id.replace('/', "--")));
        let snapshot = repo.join("snapshots").join(&sha);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IoError::Io { path: path.clone(), source }
        };
        for file in &files {
            let link = snapshot.join(file);
            if link.exists() {
                continue;
            }
            let url = format!("{}/{repo_id}/resolve/{sha}/{file}", self.endpoint);
            let blob = self.fetch(&agent, &url, &repo.join("blobs"), file).map_err(|msg| fail(&url, msg))?;
            std::fs::create_dir_all(link.parent().unwrap_or(&snapshot)).map_err(io(&link))?;
            let depth = file.matches('/').count();
            let target = PathBuf::from("../".repeat(depth + 2)).join("blobs").join(blob.file_name().unwrap_or_default());
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link).map_err(io(&link))?;
        }
        let refs = repo.join("refs");
        std::fs::create_dir_all(&refs).map_err(io(&refs))?;
        // Written last and atomically: its presence says the snapshot is complete.
        let tmp = refs.join(format!(".{revision}.tmp"));
        std::fs::write(&tmp, &sha).map_err(io(&tmp))?;
        std::fs::rename(&tmp, refs.join(revision)).map_err(io(&refs.join(revision)))?;
        Ok(snapshot)
    }

    /// One file into `blobs/`: the etag names the blob; a partial `.incomplete` blob resumes
    /// with a range request. Returns the blob's path; errors as text.
    fn fetch(&self, agent: &ureq::Agent, url: &str, blobs: &Path, file: &str) -> std::result::Result<PathBuf, String> {
        use std::io::Write;
        // Not following the redirect: the Hub answers a weights file with a redirect to its
        // storage, whose headers (x-linked-etag, x-linked-size) name the blob.
        // Relative redirects (a renamed repository) stay on the Hub and are followed.
        let no_redirect = ureq::AgentBuilder::new().redirects(0).timeout_connect(std::time::Duration::from_secs(30)).timeout_read(std::time::Duration::from_secs(60)).build();
        let mut at = url.to_string();
        let mut hops = 0;
        let head = loop {
            let r = match self.request(&no_redirect, "HEAD", &at).call() {
                Ok(r) => r,
                Err(ureq::Error::Status(code, _)) => return Err(format!("HTTP {code}")),
                Err(e) => return Err(transport(&e)),
            };
            match r.header("location").filter(|l| (300..400).contains(&r.status()) && l.starts_with('/') && hops < 5) {
                Some(l) => {
                    at = format!("{}{l}", self.endpoint);
                    hops += 1;
                }
                None => break r,
            }
        };
        let etag = head
            .header("x-linked-etag")
            .or_else(|| head.header("etag"))
            .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
            .filter(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        let total: Option<u64> = head.header("x-linked-size").or_else(|| head.header("content-length")).and_then(|v| v.parse().ok());
        let name = etag.ok_or("the server sent no usable etag")?;
        std::fs::create_dir_all(blobs).map_err(|e| format!("{}: {e}", blobs.display()))?;
        let blob = blobs.join(&name);
        if blob.exists() {
            return Ok(blob);
        }
        // One process per blob at a time: a second download of the same file waits, then
        // finds the blob the first one wrote.
        let _lock = lock_blob(blobs, &name, file)?;
        if blob.exists() {
            return Ok(blob);
        }
        let partial = blobs.join(format!("{name}.incomplete"));
        let mut have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        match total {
            // Complete but not renamed (interrupted at the end): finish it.
            Some(t) if have == t => {
                std::fs::rename(&partial, &blob).map_err(|e| format!("{}: {e}", blob.display()))?;
                return Ok(blob);
            }
            // Longer than the file: not a prefix of it; start over.
            Some(t) if have > t => {
                let _ = std::fs::remove_file(&partial);
                have = 0;
            }
            _ => {}
        }
        let req = self.get(agent, url);
        let req = if have > 0 { req.set("Range", &format!("bytes={have}-")) } else { req };
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(416, _)) => {
                // The server cannot continue from there: drop the partial file and start over.
                let _ = std::fs::remove_file(&partial);
                self.get(agent, url).call().map_err(|e| transport(&e))?
            }
            Err(e) => return Err(transport(&e)),
        };
        let resumed = resp.status() == 206;
        let mut out = std::fs::OpenOptions::new().create(true).write(true).append(resumed).truncate(!resumed).open(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
        let mut done = if resumed { have } else { 0 };
        let bar = if self.progress { indicatif::ProgressBar::new(total.unwrap_or(0)) } else { indicatif::ProgressBar::hidden() };
        bar.set_style(indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} [{eta}]").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
        bar.set_message(file.to_string());
        bar.set_position(done);
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut reader, &mut buf).map_err(|e| format!("interrupted after {done} bytes ({e}); run again to resume"))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(|e| format!("{}: {e}", partial.display()))?;
            done += n as u64;
            bar.set_position(done);
        }
        bar.finish();
        out.sync_all().map_err(|e| format!("{}: {e}", partial.display()))?;
        if let Some(t) = total.filter(|t| *t != done) {
            return Err(format!("got {done} of {t} bytes; run again to resume"));
        }
        std::fs::rename(&partial, &blob).map_err(|e| format!("{}: {e}", blob.display()))?;
        Ok(blob)
    }
}

/// An exclusive lock on blob `etag` of the repository whose `blobs` folder is given, where
/// huggingface_hub takes it (`<cache>/.locks/<repository folder>/<etag>.lock`, an `flock`),
/// so lmx and Python processes downloading the same file wait for each other. Held until the
/// returned file is dropped.
fn lock_blob(blobs: &Path, etag: &str, file: &str) -> std::result::Result<std::fs::File, String> {
    let repo = blobs.parent().unwrap_or(blobs);
    let dir = repo.parent().unwrap_or(repo).join(".locks").join(repo.file_name().unwrap_or_default());
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("{etag}.lock"));
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!("{file}: waiting for another download of it to finish (lock {})", path.display());
            lock.lock().map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(format!("{}: {e}", path.display())),
    }
    Ok(lock)
}

/// An HTTP error without the URL (the caller names it once).
fn transport(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, _) => format!("HTTP {code}"),
        ureq::Error::Transport(t) => format!("{}{}", t.kind(), t.message().map(|m| format!(": {m}")).unwrap_or_default()),
    }
}

/// The repository files lmx downloads: safetensors and GGUF weights, the safetensors index,
/// configs, tokenizer and chat template files. Never pickles (`.bin`, `.pt`, `.pth`, `.pkl`)
/// or anything else.
pub fn wanted(file: &str) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file);
    let safe_path = !file.starts_with('/') && !file.split('/').any(|p| p == ".." || p == "." || p.is_empty());
    safe_path
        && (name.ends_with(".safetensors")
            || name.ends_with(".gguf")
            || matches!(
                name,
                "config.json"
                    | "generation_config.json"
                    | "tokenizer.json"
                    | "tokenizer_config.json"
                    | "special_tokens_map.json"
                    | "model.safetensors.index.json"
                    | "chat_template.jinja"
                    | "chat_template.json"
                    | "adapter_config.json"
            ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback server that answers as the Hub does (model info, HEAD with etags, ranged
    /// GETs), cutting the first transfer of the weights in half; it records every request.
    fn mock_hub(files: Vec<(&'static str, Vec<u8>)>) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = log.clone();
        std::thread::spawn(move || {
            let mut cut = true;
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut range = None;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        range = v.trim().trim_end_matches('-').parse::<usize>().ok();
                    }
                }
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                seen.lock().expect("log").push(format!("{method} {path}{}", range.map(|r| format!(" from {r}")).unwrap_or_default()));
                let reply = |stream: &mut std::net::TcpStream, status: &str, headers: String, body: &[u8]| {
                    let _ = write!(stream, "HTTP/1.1 {status}\r\n{headers}Connection: close\r\n\r\n");
                    let _ = stream.write_all(body);
                };
                if path == "/api/models/org/name/revision/main" {
                    let siblings: Vec<String> = files.iter().map(|(n, _)| format!("{{\"rfilename\": \"{n}\"}}")).collect();
                    let body = format!("{{\"sha\": \"abc123\", \"siblings\": [{}]}}", siblings.join(","));
                    reply(&mut stream, "200 OK", format!("Content-Length: {}\r\n", body.len()), body.as_bytes());
                } else if let Some((_, data)) = files.iter().find(|(n, _)| path == format!("/org/name/resolve/abc123/{n}")) {
                    let etag = format!("ETag: \"e{:x}\"\r\n", data.len() * 7919 + data.first().copied().unwrap_or(0) as usize);
                    if method == "HEAD" {
                        reply(&mut stream, "200 OK", format!("{etag}Content-Length: {}\r\n", data.len()), b"");
                    } else if let Some(from) = range {
                        reply(&mut stream, "206 Partial Content", format!("{etag}Content-Length: {}\r\n", data.len() - from), &data[from..]);
                    } else if cut && data.len() > 1000 {
                        cut = false;
                        reply(&mut stream, "200 OK", format!("{etag}Content-Length: {}\r\n", data.len()), &data[..data.len() / 2]);
                    } else {
                        reply(&mut stream, "200 OK", format!("{etag}Content-Length: {}\r\n", data.len()), data);
                    }
                } else {
                    reply(&mut stream, "404 Not Found", "Content-Length: 0\r\n".into(), b"");
                }
            }
        });
        (url, log)
    }

    /// A download from the mock Hub: only the wanted files, the cut transfer resumes from
    /// where it stopped, the snapshot links blobs as huggingface_hub lays them out, refs/main
    /// names the commit; a second call is served from the cache; an unknown model and offline
    /// mode give clear errors.
    #[test]
    fn downloads_resume_and_skip_pickles() {
        let weights: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let files = vec![
            ("config.json", b"{}".to_vec()),
            ("model.safetensors", weights.clone()),
            ("consolidated.safetensors", vec![2; 3000]),
            ("pytorch_model.bin", vec![1; 3000]),
            ("tokenizer.json", b"{\"t\": 1}".to_vec()),
        ];
        let (url, log) = mock_hub(files);
        let cache = std::env::temp_dir().join(format!("lmx-hub-dl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        let hub = Hub { endpoint: url, token: None, cache: cache.clone(), offline: false, progress: false };
        let err = hub.snapshot("org/name").expect_err("the cut transfer fails").to_string();
        assert!(err.contains("run again to resume"), "{err}");
        let snap = hub.snapshot("org/name").expect("the second attempt resumes");
        assert_eq!(std::fs::read(snap.join("model.safetensors")).expect("weights"), weights);
        assert_eq!(std::fs::read(snap.join("config.json")).expect("config"), b"{}");
        assert!(!snap.join("pytorch_model.bin").exists(), "pickles are never downloaded");
        assert_eq!(std::fs::read_to_string(cache.join("models--org--name/refs/main")).expect("ref"), "abc123");
        assert!(std::fs::symlink_metadata(snap.join("config.json")).expect("link").file_type().is_symlink());
        let requests = log.lock().expect("log").clone();
        assert!(requests.iter().any(|r| r == "GET /org/name/resolve/abc123/model.safetensors from 2500"), "{requests:?}");
        assert!(!requests.iter().any(|r| r.contains("pytorch_model.bin") || r.contains("consolidated")), "{requests:?}");
        let before = requests.len();
        assert_eq!(hub.snapshot("org/name").expect("cached"), snap);
        assert_eq!(log.lock().expect("log").len(), before, "a cached model makes no request");
        let err = hub.snapshot("org/missing").expect_err("404").to_string();
        assert!(err.contains("no such model") && err.contains("org/missing"), "{err}");
        let offline = Hub { offline: true, ..hub };
        let err = offline.snapshot("org/other").expect_err("offline").to_string();
        assert!(err.contains("not in the Hugging Face cache"), "{err}");
        assert!(!wanted("../x.safetensors") && !wanted("./x.safetensors") && !wanted("model.bin") && wanted("sub/model-00001-of-00002.safetensors"));
        let _ = std::fs::remove_dir_all(&cache);
    }

    /// A partial blob that is already complete is finished without a transfer; one longer
    /// than the file (not a prefix of it) is discarded and the file fetched whole.
    #[test]
    fn complete_or_oversized_partial_blobs_recover() {
        let weights: Vec<u8> = (0..900u32).map(|i| (i % 13) as u8).collect();
        for (partial, requests_weights) in [(weights.clone(), false), (vec![9u8; 1200], true)] {
            let (url, log) = mock_hub(vec![("config.json", b"{}".to_vec()), ("model.safetensors", weights.clone())]);
            let cache = std::env::temp_dir().join(format!("lmx-hub-partial-{}-{}", std::process::id(), partial.len()));
            let _ = std::fs::remove_dir_all(&cache);
            let blobs = cache.join("models--org--name/blobs");
            std::fs::create_dir_all(&blobs).expect("mkdir");
            let etag = format!("e{:x}", weights.len() * 7919 + weights[0] as usize);
            std::fs::write(blobs.join(format!("{etag}.incomplete")), &partial).expect("partial");
            let hub = Hub { endpoint: url, token: None, cache: cache.clone(), offline: false, progress: false };
            let snap = hub.snapshot("org/name").expect("download");
            assert_eq!(std::fs::read(snap.join("model.safetensors")).expect("weights"), weights);
            let got = log.lock().expect("log").iter().any(|r| r.starts_with("GET /org/name/resolve/abc123/model.safetensors"));
            assert_eq!(got, requests_weights, "{:?}", log.lock().expect("log"));
            let _ = std::fs::remove_dir_all(&cache);
        }
    }

    /// A download waits while another process holds the blob's lock (where huggingface_hub
    /// takes it), then completes.
    #[test]
    fn a_locked_blob_waits_for_the_other_download() {
        let (url, _log) = mock_hub(vec![("config.json", b"{}".to_vec()), ("model.safetensors", vec![7u8; 600])]);
        let cache = std::env::temp_dir().join(format!("lmx-hub-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        let locks = cache.join(".locks/models--org--name");
        std::fs::create_dir_all(&locks).expect("mkdir");
        let etag = format!("e{:x}", 600 * 7919 + 7);
        let held = std::fs::File::create(locks.join(format!("{etag}.lock"))).expect("lock file");
        held.lock().expect("lock");
        let hub = Hub { endpoint: url, token: None, cache: cache.clone(), offline: false, progress: false };
        let download = std::thread::spawn(move || hub.snapshot("org/name").map_err(|e| e.to_string()));
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert!(!download.is_finished(), "the download went on while the blob was locked");
        drop(held);
        let snap = download.join().expect("thread").expect("download");
        assert_eq!(std::fs::read(snap.join("model.safetensors")).expect("weights"), vec![7u8; 600]);
        let _ = std::fs::remove_dir_all(&cache);
    }

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
