//! One entry point per input format lmx reads from files a user may be handed: each takes
//! arbitrary bytes and must return (an error is fine) without panicking, hanging or
//! allocating without bound. `fuzz/` runs them under libFuzzer (`cargo +nightly fuzz run
//! <target>`, see fuzz/README.md); the test below replays every saved input of
//! `fuzz/corpus/<target>/` on stable Rust, so a crash once found stays fixed.

use std::collections::HashMap;
use std::path::Path;

/// A fuzzing entry point.
pub type Target = fn(&[u8]);

/// Every entry point, by the name of its fuzz target and corpus folder.
pub const TARGETS: &[(&str, Target)] = &[("gguf", gguf), ("safetensors", safetensors), ("config", config), ("chat_template", chat_template), ("jsonl", jsonl), ("yaml", yaml)];

/// A GGUF file: header, metadata, tensor table, tensors, tokenizer rebuilt from metadata.
pub fn gguf(data: &[u8]) {
    let _ = lmx_io::gguf::load_from(std::io::Cursor::new(data), data.len() as u64, Path::new("fuzz.gguf"), true);
}

/// A safetensors file: header and every tensor read (through a file: lmx memory-maps them).
pub fn safetensors(data: &[u8]) {
    let path = std::env::temp_dir().join(format!("lmx-fuzz-{}-{:?}.safetensors", std::process::id(), std::thread::current().id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(w) = lmx_io::Weights::from_safetensors(std::slice::from_ref(&path)) {
        for key in w.keys() {
            let _ = w.tensor(&key);
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// A config.json (with its quantization block): parsed, validated and used to build the model
/// its `model_type` names over an empty checkpoint (which fails at the first weight, after
/// every number of the config was checked and every size derived from it allocated).
pub fn config(data: &[u8]) {
    let Ok(config) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let quantization = lmx_io::QuantConfig::from_config(&config).ok().flatten();
    let weights = lmx_io::Weights::from_tensors(HashMap::new(), "fuzz");
    let vb = lmx_nn::Builder::new(weights, lmx_core::DType::F32, &lmx_core::Device::Cpu).with_quantization(quantization);
    let model_type = config.get("model_type").and_then(|v| v.as_str()).unwrap_or("llama").to_string();
    let _ = lmx_models::load_model(&model_type, &config, &vb);
}

/// A chat template: compiled and rendered for a short chat.
pub fn chat_template(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else { return };
    let Ok(t) = lmx_io::ChatTemplate::new(src, "<s>", "</s>") else { return };
    let messages = [lmx_io::Message::new("system", "Be brief."), lmx_io::Message::new("user", "Hi"), lmx_io::Message::new("assistant", "Hello!"), lmx_io::Message::new("user", "Bye")];
    let _ = t.render(&messages, true, None, None);
}

/// A JSONL training split.
pub fn jsonl(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = lmx_tune::data::parse_split(text, Path::new("fuzz.jsonl"));
}

/// A `lmx lora -c` YAML config: parsed, applied over the defaults and validated.
pub fn yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(file) = lmx_tune::config::ConfigFile::parse(text, Path::new("fuzz.yaml")) {
        let mut c = lmx_tune::config::LoraConfig::default();
        if file.apply(&mut c).is_ok() {
            let _ = c.validate();
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every saved input of every target runs without a panic (crashes found by fuzzing are
    /// kept in the corpus once fixed).
    #[test]
    fn corpora_replay_without_panics() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        let mut total = 0;
        for (name, run) in super::TARGETS {
            let dir = root.join(name);
            let Ok(entries) = std::fs::read_dir(&dir) else { panic!("{} is missing: every target keeps a corpus", dir.display()) };
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).unwrap_or_default();
                run(&data);
                total += 1;
            }
        }
        assert!(total >= super::TARGETS.len(), "the corpora are empty");
    }

    use std::path::Path;
}
