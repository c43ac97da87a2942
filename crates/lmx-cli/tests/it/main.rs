//! Tests of the real `lmx` binary: output on the default model, and one clear error line
//! (never a panic) for each kind of bad input.

mod errors;
mod generate;
mod kill;
mod launch;
mod loading;
mod lora;
mod quantize;
mod serve;
mod start;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `lmx` with `args`.
pub fn lmx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmx")).args(args).output().expect("lmx runs")
}

/// Runs `lmx` with `args` and `stdin` piped in.
pub fn lmx_stdin(args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut child =
        Command::new(env!("CARGO_BIN_EXE_lmx")).args(args).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("lmx starts");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
    child.wait_with_output().expect("lmx finishes")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The default model file.
pub fn default_model() -> String {
    let p = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-default-model.sh", p.display());
    p.to_string_lossy().to_string()
}

/// A fresh temporary folder for one test. The first call removes the folders earlier test
/// runs left (those of processes that no longer exist): a run leaves several GB.
pub fn temp_dir(name: &str) -> PathBuf {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| {
        for entry in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
            let file = entry.file_name().to_string_lossy().to_string();
            let pid = file.strip_prefix("lmx-cli-").and_then(|rest| rest.rsplit('-').next()).and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| p != std::process::id() && !std::path::Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
    let d = std::env::temp_dir().join(format!("lmx-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

/// A runnable tiny model folder: the llama golden fixture plus a word-level tokenizer.
pub fn tiny_model(name: &str) -> PathBuf {
    tiny_model_of("llama", name)
}

/// [`tiny_model`] from another architecture's fixture.
pub fn tiny_model_of(arch: &str, name: &str) -> PathBuf {
    let dir = temp_dir(name);
    let fixture = repo_root().join("tests/fixtures").join(arch);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), dir.join(f)).expect("copy fixture");
    }
    std::fs::write(dir.join("tokenizer.json"), TINY_TOKENIZER).expect("write tokenizer");
    dir
}

const TINY_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"<unk>":0,"a":1,"b":2,"c":3},"unk_token":"<unk>"}}"#;

/// Asserts `out` failed with exactly one `error:` line containing every `needle`, and no panic.
pub fn assert_clear_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "lmx panicked: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line, got: {stderr}");
    for n in needles {
        assert!(errors[0].contains(n), "error line lacks `{n}`: {}", errors[0]);
    }
}

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().to_string()
}
