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
    /// Starts `lmx serve` on a free port with `args` and waits until it listens.
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lmx"))
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
