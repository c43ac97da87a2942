//! `lmx generate`, `lmx chat` and `lmx convert` on the default model.

use crate::{default_model, lmx, lmx_stdin, path_str, temp_dir};

fn reference_text() -> String {
    let p = crate::repo_root().join("tests/fixtures/smollm2/reference_tokens.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("json");
    v["cases"][0]["ignore_eos_text"].as_str().expect("text").to_string()
}

#[test]
fn generate_prints_only_the_text_on_stdout_and_stats_on_stderr() {
    let model = default_model();
    let out = lmx(&["generate", "--model", &model, "--prompt", "What is the capital of France?", "--max-tokens", "64", "--ignore-eos", "--temp", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(stdout.trim_end_matches('\n'), reference_text());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Prompt: 37 tokens,") && stderr.contains("Generation: 64 tokens,") && stderr.contains("Peak memory:"), "{stderr}");
}

#[test]
fn prompt_from_stdin_and_extra_eos_token() {
    let model = default_model();
    // "Paris" ends generation early when it is an extra EOS token.
    let out = lmx_stdin(&["generate", "--model", &model, "-p", "-", "--extra-eos-token", "ĠParis", "--verbose", "false"], "What is the capital of France?");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "The capital of France is\n");
    assert!(out.stderr.is_empty(), "--verbose false prints no statistics");
}

#[test]
fn seeded_sampling_is_reproducible() {
    let model = default_model();
    let args = ["generate", "--model", &model, "-p", "Tell me a story.", "--temp", "0.9", "--top-p", "0.95", "--seed", "3", "-m", "20", "--verbose", "false"];
    let a = lmx(&args);
    let b = lmx(&args);
    assert!(a.status.success());
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn chat_from_piped_stdin_keeps_the_cache() {
    let model = default_model();
    let out = lmx_stdin(&["chat", "--model", &model, "--max-tokens", "20", "--verbose"], "What is 2+2?\nAnd times 3?\nr\nHi\nq\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let turns: Vec<&str> = stderr.lines().filter(|l| l.starts_with("[turn:")).collect();
    assert_eq!(turns.len(), 3, "{stderr}");
    assert!(turns[0].contains(" 0 reused"), "{}", turns[0]);
    assert!(!turns[1].contains(" 0 reused"), "turn 2 must reuse the cache: {}", turns[1]);
    // After `r` the cache restarts... except for the shared system-prompt prefix.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().filter(|l| !l.is_empty()).count(), 3, "{stdout}");
}

#[test]
fn convert_gguf_writes_a_loadable_folder() {
    let dir = temp_dir("convert");
    let out_dir = dir.join("smollm2");
    let out = lmx(&["convert", "--gguf", &default_model(), "--mlx-path", &path_str(&out_dir), "--dtype", "bfloat16"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(out_dir.join(f).exists(), "{f} missing");
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).expect("cfg")).expect("json");
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert_eq!(cfg["tie_word_embeddings"], true);
    let out = lmx(&["generate", "--model", &path_str(&out_dir), "-p", "What is the capital of France?", "--verbose", "false"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // bf16 sits at a near-tie between two first tokens on this prompt (see the bf16 test in
    // crates/lmx/tests/it/golden.rs, which checks bf16 numerically), so only check it answers.
    assert!(String::from_utf8_lossy(&out.stdout).trim().len() > 10);
    // An existing output is never overwritten.
    let again = lmx(&["convert", "--gguf", &default_model(), "--mlx-path", &path_str(&out_dir)]);
    crate::assert_clear_error(&again, &["already exists"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hub_ids_resolve_in_the_local_cache() {
    let cache = temp_dir("hub");
    let snap = cache.join("models--org--tiny/snapshots/0123abc");
    std::fs::create_dir_all(&snap).expect("mkdir");
    std::fs::create_dir_all(cache.join("models--org--tiny/refs")).expect("mkdir");
    std::fs::write(cache.join("models--org--tiny/refs/main"), "0123abc").expect("ref");
    let tiny = crate::tiny_model("hub-src");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny.join(f), snap.join(f)).expect("copy");
    }
    // Offline: a missing model is not downloaded (the download itself is tested in lmx-io
    // against a loopback server that mimics the Hub).
    let run = |id: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lmx"))
            .args(["generate", "--model", id, "-p", "a b", "-m", "3", "--verbose", "false"])
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .expect("runs")
    };
    let out = run("org/tiny");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let missing = run("org/absent");
    crate::assert_clear_error(&missing, &["org/absent", "huggingface-cli download org/absent"]);
    // `folder/name` beside a local `folder` that lacks `name` is most likely a mistyped path:
    // the error says so before the Hub's answer.
    let folder = temp_dir("typo");
    let (parent, name) = (folder.parent().expect("a parent"), folder.file_name().expect("a name").to_string_lossy().into_owned());
    let typo = std::process::Command::new(env!("CARGO_BIN_EXE_lmx"))
        .args(["generate", "--model", &format!("{name}/smolm2"), "-p", "a b", "-m", "3"])
        .current_dir(parent)
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("runs");
    crate::assert_clear_error(&typo, &[&format!("the folder `{name}` has no such entry"), "huggingface-cli download"]);
}
