//! An adapter trained by `mlx_lm.lora` (tests/fixtures/mlx_adapter, written by
//! scripts/fixtures/mlx_adapter.py) loads with `LoadOptions::adapters` and gives MLX LM's greedy
//! tokens; without it the model gives MLX LM's base tokens.

use std::path::PathBuf;

use crate::{default_model, greedy_ids};

#[test]
fn mlx_lm_adapter_gives_mlx_lm_greedy_tokens() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mlx_adapter");
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).expect("expected.json")).expect("json");
    let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().expect("list").iter().map(|x| x.as_u64().expect("id") as u32).collect() };
    let adapters = lmx::AdapterOptions::from_dir(&dir).expect("adapter folder");
    let opts = lmx::LoadOptions { adapters: Some(adapters), ..Default::default() };
    let (tuned, tok) = lmx::load_with(&default_model(), &opts).expect("load with adapter");
    let (base, _) = lmx::load(&default_model()).expect("load");
    for case in expected["cases"].as_array().expect("cases") {
        let prompt = tok.chat_prompt(&[lmx::Message::new("user", case["prompt"].as_str().expect("prompt"))], None).expect("prompt");
        assert_eq!(prompt, ids(&case["prompt_tokens"]), "prompt tokens");
        // MLX LM's generate_step runs past EOS; lmx stops there (the EOS included).
        let upto_eos = |v: Vec<u32>| -> Vec<u32> {
            match v.iter().position(|t| tok.eos_token_ids().contains(t)) {
                Some(i) => v[..=i].to_vec(),
                None => v,
            }
        };
        let want = upto_eos(ids(&case["with_adapter"]));
        let got = greedy_ids(&tuned, &tok, &prompt, want.len(), false);
        assert_eq!(got, want, "with the adapter, for {}: {:?} vs MLX LM's {:?}", case["prompt"], tok.decode(&got, false), tok.decode(&want, false));
        let want = upto_eos(ids(&case["without_adapter"]));
        let got = greedy_ids(&base, &tok, &prompt, want.len(), false);
        assert_eq!(got, want, "without the adapter, for {}", case["prompt"]);
    }
}
