//! The default model gives transformers' exact greedy tokens: from the GGUF file directly, and
//! from the model folder `lmx convert --gguf` writes.

use crate::{default_model, greedy_ids, reference};
use lmx::Message;

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn check_model(model_arg: &str) {
    let (model, tok) = lmx::load(model_arg).expect("default model loads");
    let reference = reference();
    for case in reference["cases"].as_array().expect("cases") {
        let prompt = tok.chat_prompt(&[Message::new("user", case["prompt"].as_str().expect("prompt"))], None).expect("chat prompt");
        // The chat template and the tokenizer rebuilt from GGUF metadata match transformers'.
        assert_eq!(prompt, ids(&case["prompt_ids"]), "prompt tokens for {}", case["prompt"]);
        let got = greedy_ids(&model, &tok, &prompt, 64, false);
        assert_eq!(got, ids(&case["generated_ids"]), "greedy tokens for {}", case["prompt"]);
        if let Some(long) = case.get("ignore_eos_ids") {
            let got = greedy_ids(&model, &tok, &prompt, 64, true);
            let want = ids(long);
            assert!(want.len() >= 40);
            assert_eq!(got, want, "64 greedy tokens past EOS for {}", case["prompt"]);
        }
    }
}

#[test]
fn gguf_matches_transformers_tokens() {
    check_model(&default_model());
}

#[test]
fn converted_folder_matches_transformers_tokens() {
    let out = std::env::temp_dir().join(format!("lmx-golden-convert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let folder = lmx::convert::read(&lmx::ModelSource::Gguf(default_model().into()), None).expect("read gguf");
    lmx::convert::write(&folder, &out).expect("write folder");
    // Writing again refuses to overwrite.
    let err = lmx::convert::write(&folder, &out).expect_err("output exists").to_string();
    assert!(err.contains("already exists"), "{err}");
    check_model(&out.to_string_lossy());
    let _ = std::fs::remove_dir_all(&out);
}
