//! Integration tests of the lmx library on the real default model (SmolLM2-135M-Instruct,
//! fetched by scripts/fetch-default-model.sh) against tokens transformers produced.

mod adapters;
mod batch;
mod chat;
mod golden;
mod quant;
mod sharded;
mod speculative;
mod streaming;

use std::path::PathBuf;

/// The default model file (or `LMX_TEST_MODEL`).
pub fn default_model() -> String {
    if let Ok(p) = std::env::var("LMX_TEST_MODEL") {
        return p;
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-default-model.sh", p.display());
    p.to_string_lossy().to_string()
}

/// The reference tokens written by scripts/fixtures/smollm2_reference.py.
pub fn reference() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2/reference_tokens.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("reference file")).expect("reference JSON")
}

/// Greedy token ids for `prompt`, the EOS token that ended it included.
pub fn greedy_ids(model: &lmx::Model, tok: &lmx::TokenizerWrapper, prompt: &[u32], max_tokens: usize, ignore_eos: bool) -> Vec<u32> {
    let mut cache = lmx::PromptCache::new(&**model);
    let params = lmx::GenerateParams { max_tokens, ignore_eos, ..Default::default() };
    lmx::stream_generate(model, tok, prompt, &mut cache, params).map(|r| r.expect("generation step")).map(|r| r.token).collect()
}
