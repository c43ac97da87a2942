//! `lmx serve` end to end: the real binary on loopback, driven by the official `openai` and
//! `anthropic` Python clients (tests/clients/; scripts/test.sh installs them).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::{default_model, repo_root};

/// A running `lmx serve`; killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// The server's process id (`lmx launch`'s under launch).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Starts `lmx serve` on a free port with `args` and waits until it listens.
    pub fn start(args: &[&str]) -> Server {
        Self::start_under(&[], args)
    }

    /// [`Server::start`] after `before` (e.g. `launch -n 2 --`).
    pub fn start_under(before: &[&str], args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lmx"))
            .args(before)
            .args(["serve", "--model", &default_model(), "--port", "0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("lmx serve starts");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        let url = loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                panic!("lmx serve exited before listening:\n{}", seen.join("\n"));
            };
            if let Some(rest) = line.split(" at http://").nth(1) {
                break format!("http://{}", rest.split("/v1").next().expect("an address"));
            }
            seen.push(line);
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Server { child, url }
    }
}

/// Runs a client script against `server`; fails with its output unless it exits 0.
fn run_client(script: &str, args: &[&str]) {
    let path = repo_root().join("tests/clients").join(script);
    let out = Command::new("python3").arg(&path).args(args).output().expect("python3 runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("No module named"), "{script} needs its client package: python3 -m pip install -r tests/clients/requirements.txt (scripts/test.sh does)\n{text}");
    assert!(out.status.success(), "{script} failed:\n{text}");
}

#[test]
fn the_openai_client_works_against_lmx_serve() {
    let server = Server::start(&["--api-key", "test-key"]);
    run_client("openai_client.py", &[&format!("{}/v1", server.url), "test-key"]);
}

#[test]
fn the_anthropic_client_works_against_lmx_serve() {
    let server = Server::start(&["--api-key", "test-key"]);
    run_client("anthropic_client.py", &[&server.url, "test-key"]);
}

/// Sends a raw HTTP request and returns the stream (still open).
pub fn raw_request(url: &str, path: &str, body: &str) -> std::net::TcpStream {
    use std::io::Write;
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).expect("send");
    s
}

fn get(url: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// POSTs `body` and returns the JSON answer (panics on another status than 200).
pub fn post(url: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let mut s = raw_request(url, path, &body.to_string());
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).expect("read the answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{path} {body}: {answer}");
    serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap_or("")).expect("a JSON answer")
}

pub fn sequences(url: &str) -> u64 {
    let text = get(url, "/health");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| v["sequences"].as_u64()).unwrap_or(u64::MAX)
}

#[test]
fn a_full_queue_answers_429_and_a_client_that_leaves_frees_its_slot() {
    let server = Server::start(&["--decode-concurrency", "1", "--max-queue", "0"]);
    // EOS banned: this answer would run for its 4000 tokens (tens of seconds).
    let long = r#"{"messages": [{"role": "user", "content": "Write a story."}], "max_tokens": 4000, "logit_bias": {"2": -100}}"#;
    let held = raw_request(&server.url, "/v1/chat/completions", long);
    let start = std::time::Instant::now();
    while sequences(&server.url) != 1 {
        assert!(start.elapsed().as_secs() < 20, "the request never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut busy = raw_request(&server.url, "/v1/chat/completions", r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}"#);
    busy.set_read_timeout(Some(std::time::Duration::from_secs(30))).expect("a timeout");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut busy, &mut answer).ok();
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("server_busy"), "{answer}");
    // The client goes away: its sequence leaves the batch at once.
    drop(held);
    let gone = std::time::Instant::now();
    while sequences(&server.url) != 0 {
        assert!(gone.elapsed().as_secs() < 5, "the sequence of a closed connection is still decoding");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
