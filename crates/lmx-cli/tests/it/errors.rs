//! Bad input gets one clear error line naming what is wrong, and a non-zero exit.

use std::collections::HashMap;

use crate::{assert_clear_error, lmx, path_str, temp_dir, tiny_model};
use lmx::io::Weights;

fn generate(model: &str) -> std::process::Output {
    lmx(&["generate", "--model", model, "-p", "a b", "-m", "2"])
}

/// Rewrites the tiny model's weights through `edit`.
fn edit_weights(dir: &std::path::Path, edit: impl FnOnce(&mut HashMap<String, lmx::core::Tensor>)) {
    let path = dir.join("model.safetensors");
    let w = Weights::from_safetensors(std::slice::from_ref(&path)).expect("read");
    let mut map: HashMap<String, lmx::core::Tensor> = w
        .keys()
        .into_iter()
        .map(|k| {
            let t = w.tensor(&k).expect("tensor");
            (k, t)
        })
        .collect();
    drop(w);
    edit(&mut map);
    lmx::io::safetensors_io::save_safetensors(&map, &path).expect("write");
}

#[test]
fn tiny_model_runs() {
    let dir = tiny_model("ok");
    let out = generate(&path_str(&dir));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn missing_folder() {
    let out = generate("/nonexistent/model-dir");
    assert_clear_error(&out, &["/nonexistent/model-dir", "not found"]);
}

#[test]
fn folder_without_config() {
    let dir = temp_dir("noconfig");
    assert_clear_error(&generate(&path_str(&dir)), &["config.json", "not a model folder"]);
}

#[test]
fn unknown_model_type() {
    let dir = tiny_model("badtype");
    let cfg = std::fs::read_to_string(dir.join("config.json")).expect("read").replace("\"llama\"", "\"gpt_fancy\"");
    std::fs::write(dir.join("config.json"), cfg).expect("write");
    assert_clear_error(&generate(&path_str(&dir)), &["gpt_fancy", "llama, mistral, qwen2, qwen3"]);
}

#[test]
fn missing_tensor() {
    let dir = tiny_model("missing");
    edit_weights(&dir, |m| {
        m.remove("model.layers.1.mlp.up_proj.weight");
    });
    assert_clear_error(&generate(&path_str(&dir)), &["model.layers.1.mlp.up_proj.weight", "missing"]);
}

#[test]
fn wrong_shape_tensor() {
    let dir = tiny_model("shape");
    edit_weights(&dir, |m| {
        let t = m["model.layers.0.self_attn.q_proj.weight"].t().and_then(|t| t.contiguous()).expect("t");
        m.insert("model.layers.0.self_attn.q_proj.weight".into(), t);
    });
    // Rectangular q_proj: (64, 64) is square for this config, so use k_proj (32, 64).
    edit_weights(&dir, |m| {
        let t = m["model.layers.0.self_attn.k_proj.weight"].t().and_then(|t| t.contiguous()).expect("t");
        m.insert("model.layers.0.self_attn.k_proj.weight".into(), t);
    });
    assert_clear_error(&generate(&path_str(&dir)), &["model.layers.0.self_attn.k_proj.weight", "[64, 32]", "[32, 64]"]);
    // convert checks the checkpoint against config.json before writing anything.
    let out_dir = dir.with_file_name(format!("{}-converted", dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()));
    let out = lmx(&["convert", "--hf-path", &path_str(&dir), "--mlx-path", &path_str(&out_dir), "-q", "--q-group-size", "32"]);
    assert_clear_error(&out, &["model.layers.0.self_attn.k_proj.weight", "[64, 32]", "[32, 64]"]);
    assert!(!out_dir.exists(), "nothing written");
}

#[test]
fn unused_tensor() {
    let dir = tiny_model("unused");
    edit_weights(&dir, |m| {
        let t = m["model.norm.weight"].clone();
        m.insert("model.extra_norm.weight".into(), t);
    });
    assert_clear_error(&generate(&path_str(&dir)), &["model.extra_norm.weight", "not used"]);
}

#[test]
fn truncated_safetensors() {
    let dir = tiny_model("truncsafe");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
    assert_clear_error(&generate(&path_str(&dir)), &["model.safetensors", "truncated"]);
}

#[test]
fn truncated_gguf() {
    let dir = temp_dir("truncgguf");
    let path = dir.join("half.gguf");
    let bytes = std::fs::read(crate::default_model()).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
    assert_clear_error(&generate(&path_str(&path)), &["half.gguf", "truncated"]);
}

#[test]
fn prompt_longer_than_context() {
    let dir = tiny_model("long");
    let prompt = vec!["a"; 300].join(" ");
    let out = lmx(&["generate", "--model", &path_str(&dir), "-p", &prompt]);
    assert_clear_error(&out, &["300 tokens", "256"]);
}

#[test]
fn bad_flags_and_values() {
    let dir = tiny_model("flags");
    let out = lmx(&["generate", "--model", &path_str(&dir), "--device", "tpu"]);
    assert_clear_error(&out, &["tpu", "cpu"]);
    let out = lmx(&["generate", "--model", &path_str(&dir), "--chat-template-config", "{oops"]);
    assert_clear_error(&out, &["--chat-template-config"]);
    let out = lmx(&["generate", "--model", &path_str(&dir), "--extra-eos-token", "<nope>"]);
    assert_clear_error(&out, &["<nope>"]);
    let out = lmx(&["generate", "--model", "weights.bin"]);
    assert_clear_error(&out, &["weights.bin"]);
}

/// The engine's flags: KV cache settings, prompt files, cache files, draft models.
#[test]
fn bad_engine_flags_and_files() {
    let dir = tiny_model("engine");
    let model = path_str(&dir);
    let run = |extra: &[&str]| lmx(&[&["generate", "--model", model.as_str(), "-p", "a b", "-m", "2"], extra].concat());
    assert_clear_error(&run(&["--kv-bits", "7"]), &["--kv-bits", "7-bit", "2, 3, 4, 5, 6 and 8"]);
    assert_clear_error(&run(&["--kv-bits", "4", "--kv-group-size", "48"]), &["--kv-group-size", "48"]);
    assert_clear_error(&run(&["--max-kv-size", "3"]), &["--max-kv-size", "max_kv_size 3"]);
    assert_clear_error(&run(&["--max-kv-size", "64", "--kv-bits", "8"]), &["cannot also rotate"]);
    assert_clear_error(&run(&["--draft-model", model.as_str(), "--num-draft-tokens", "0"]), &["draft", "at least 1"]);
    assert_clear_error(&run(&["--draft-model", model.as_str(), "--max-kv-size", "64"]), &["draft", "rotating"]);
    let missing = dir.join("nope.safetensors");
    assert_clear_error(&run(&["--prompt-cache-file", &path_str(&missing)]), &["--prompt-cache-file", "nope.safetensors"]);
    let not_a_cache = dir.join("model.safetensors");
    assert_clear_error(&run(&["--prompt-cache-file", &path_str(&not_a_cache)]), &["--prompt-cache-file", "not a prompt cache file"]);
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(&prompts, "hello\n{\"prompt\": 3}\n").expect("write");
    let out = lmx(&["generate", "--model", model.as_str(), "--prompts-file", &path_str(&prompts), "-m", "2"]);
    assert_clear_error(&out, &["prompts.jsonl line 2", "\"prompt\""]);
    std::fs::write(&prompts, "\n\n").expect("write");
    let out = lmx(&["generate", "--model", model.as_str(), "--prompts-file", &path_str(&prompts), "-m", "2"]);
    assert_clear_error(&out, &["holds no prompts"]);
}

#[test]
fn perplexity_on_a_text_shorter_than_one_sequence() {
    let dir = tiny_model("ppl-short");
    let text = dir.join("short.txt");
    std::fs::write(&text, "a b c").expect("write");
    let out = lmx(&["perplexity", "--model", &path_str(&dir), "--data", &path_str(&text), "--sequence-length", "64"]);
    assert_clear_error(&out, &["3 tokens", "fewer than one sequence"]);
}

/// config.json numbers are checked where they enter: each bad value gets one clear error line
/// naming the key and the value (no panic, no huge allocation). Extend the table as bad inputs
/// turn up.
#[test]
fn bad_config_numbers_get_clear_errors() {
    let cases: &[(&str, serde_json::Value, &[&str])] = &[
        ("num_attention_heads", 0.into(), &["num_attention_heads", "is 0"]),
        ("num_key_value_heads", 0.into(), &["num_key_value_heads", "is 0"]),
        ("num_key_value_heads", 3.into(), &["num_key_value_heads", "divide num_attention_heads"]),
        ("head_dim", 1_000_000_000_000u64.into(), &["head_dim", "at most 4096"]),
        ("head_dim", 15.into(), &["head_dim", "even"]),
        ("vocab_size", 0.into(), &["vocab_size", "at least 1"]),
        ("hidden_size", 0.into(), &["hidden_size", "at least 1"]),
        ("num_hidden_layers", 0.into(), &["num_hidden_layers", "at least 1"]),
        ("rms_norm_eps", (-1.0).into(), &["rms_norm_eps", "positive"]),
    ];
    for (key, value, needles) in cases {
        let dir = tiny_model(&format!("badcfg-{key}-{value}"));
        let path = dir.join("config.json");
        let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        config[*key] = value.clone();
        std::fs::write(&path, config.to_string()).expect("write");
        assert_clear_error(&generate(&path_str(&dir)), needles);
    }
}

/// Sampling settings out of range (NaN included) are refused before any work, naming the
/// setting and the value, instead of sampling silently wrong.
#[test]
fn bad_sampling_settings_get_clear_errors() {
    let dir = tiny_model("bad-sampling");
    let m = path_str(&dir);
    for (flag, value, needle) in
        [("--temp", "nan", "temp"), ("--temp", "-1", "temp"), ("--top-p", "0", "top_p"), ("--top-p", "1.5", "top_p"), ("--min-p", "2", "min_p"), ("--repetition-penalty", "0", "repetition_penalty")]
    {
        let arg = format!("{flag}={value}");
        let out = lmx(&["generate", "--model", &m, "-p", "a b", "-m", "2", &arg]);
        assert_clear_error(&out, &[needle, "sampling"]);
    }
}

/// Bad files and inputs that would once block, panic or run out of memory: one clear error
/// line each, before any expensive work. Each case prepares a copy of the tiny model and
/// returns the command line to run. Extend the table as bad inputs turn up.
#[test]
fn bad_inputs_are_refused_before_work() {
    /// Prepares a model folder and returns the command line.
    type Setup = Box<dyn Fn(&std::path::Path) -> Vec<String>>;
    let generate_args = |dir: &std::path::Path, prompt: &str| vec!["generate".into(), "--model".into(), path_str(dir), "-p".into(), prompt.to_string(), "-m".into(), "2".into()];
    let index = |dir: &std::path::Path, file: &str| {
        let map = serde_json::json!({"metadata": {}, "weight_map": {"model.embed_tokens.weight": file}});
        std::fs::write(dir.join("model.safetensors.index.json"), map.to_string()).expect("write index");
    };
    let cases: Vec<(&str, Setup, &[&str])> = vec![
        (
            "weight-map-escapes",
            Box::new(move |d| {
                index(d, "../elsewhere.safetensors");
                generate_args(d, "a b")
            }),
            &["weight_map", "../elsewhere.safetensors", "not a file inside the model folder"],
        ),
        (
            "weight-map-fifo",
            Box::new(move |d| {
                let status = std::process::Command::new("mkfifo").arg(d.join("fifo.safetensors")).status().expect("mkfifo");
                assert!(status.success());
                index(d, "fifo.safetensors");
                generate_args(d, "a b")
            }),
            &["fifo.safetensors", "not a regular file"],
        ),
        (
            "token-beyond-vocab",
            Box::new(move |d| {
                let tok = std::fs::read_to_string(d.join("tokenizer.json")).expect("read").replace(r#""c":3"#, r#""c":3,"zzz":100000"#);
                std::fs::write(d.join("tokenizer.json"), tok).expect("write");
                generate_args(d, "a zzz")
            }),
            &["token id 100000", "vocabulary"],
        ),
        (
            "nan-adapters",
            Box::new(move |d| {
                let ad = d.join("adapters");
                std::fs::create_dir_all(&ad).expect("dir");
                std::fs::write(ad.join("adapter_config.json"), r#"{"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": {"rank": 2, "scale": 1.0}}"#).expect("config");
                let nan = lmx::core::Tensor::new(&[[f32::NAN, 0.0]], &lmx::core::Device::Cpu).expect("tensor");
                let map = HashMap::from([("model.layers.1.self_attn.q_proj.lora_b".to_string(), nan)]);
                lmx::io::safetensors_io::save_safetensors(&map, &ad.join("adapters.safetensors")).expect("write");
                let mut args = generate_args(d, "a b");
                args.extend(["--adapter-path".to_string(), path_str(&ad)]);
                args
            }),
            &["adapters.safetensors", "lora_b", "NaN or infinite"],
        ),
        (
            "nan-weights",
            Box::new(move |d| {
                edit_weights(d, |m| {
                    let w = &m["model.norm.weight"];
                    let bad = w.ones_like().and_then(|o| o * f64::NAN).expect("nan");
                    m.insert("model.norm.weight".into(), bad);
                });
                generate_args(d, "a b")
            }),
            &["model.norm.weight", "NaN or infinite"],
        ),
        ("prompt-too-many-bytes", Box::new(move |d| generate_args(d, &"a".repeat(5000))), &["5000 bytes", "context", "shorten it"]),
        (
            "perplexity-sequence-beyond-context",
            Box::new(|d| {
                let text = d.join("long.txt");
                std::fs::write(&text, "a b ".repeat(400)).expect("write");
                ["perplexity", "--model", &path_str(d), "--data", &path_str(&text), "--sequence-length", "600"].map(String::from).to_vec()
            }),
            &["sequence length of 600", "context of 256"],
        ),
    ];
    for (label, setup, needles) in &cases {
        let dir = tiny_model(&format!("bad-input-{label}"));
        let args = setup(&dir);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = lmx(&args);
        assert_clear_error(&out, needles);
    }
}
