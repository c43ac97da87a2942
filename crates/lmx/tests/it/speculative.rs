//! Speculative decoding on the real model: greedy output is the model's own, whatever the
//! draft proposes; a perfect draft (the model itself) has every token accepted; a 4-bit draft
//! some.

use crate::default_model;

fn greedy(model: &lmx::Model, tok: &lmx::TokenizerWrapper, prompt: &[u32], draft: Option<(&lmx::Model, usize)>) -> (Vec<lmx::GenerationResponse>, lmx::DraftStats) {
    let params = lmx::GenerateParams { max_tokens: 24, ignore_eos: true, top_logprobs: 2, ..Default::default() };
    let mut cache = lmx::PromptCache::new(&**model);
    match draft {
        None => (lmx::stream_generate(model, tok, prompt, &mut cache, params).map(|r| r.expect("step")).collect(), Default::default()),
        Some((d, k)) => {
            let mut draft_cache = lmx::PromptCache::new(&**d);
            let mut s = lmx::speculative_generate(model, d, tok, prompt, &mut cache, &mut draft_cache, params, k);
            let out = s.by_ref().map(|r| r.expect("step")).collect();
            (out, s.stats())
        }
    }
}

#[test]
fn greedy_output_is_the_models_own() {
    let (model, tok) = lmx::load(&default_model()).expect("load");
    let mut folder = lmx::convert::read(&lmx::ModelSource::Gguf(default_model().into()), Some(lmx::DType::BF16)).expect("read");
    lmx::convert::quantize::quantize(&mut folder, &lmx::convert::quantize::QuantizeOptions { bits: 4, group_size: 64, recipe: None, rules: Vec::new() }).expect("quantize");
    let dir = std::env::temp_dir().join(format!("lmx-it-draft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    lmx::convert::write(&folder, &dir).expect("write");
    let (draft4, _) = lmx::load(&dir.to_string_lossy()).expect("load draft");
    for text in ["Write a short poem about the sea.", "List three prime numbers:"] {
        let prompt = tok.chat_prompt(&[lmx::Message::new("user", text)], None).expect("prompt");
        let (plain, _) = greedy(&model, &tok, &prompt, None);
        let want: Vec<u32> = plain.iter().map(|r| r.token).collect();
        // The model drafting for itself: every draft token accepted, the same tokens.
        let (same, stats) = greedy(&model, &tok, &prompt, Some((&model, 4)));
        assert_eq!(same.iter().map(|r| r.token).collect::<Vec<_>>(), want, "{text}: self-drafted");
        assert_eq!(stats.accepted, stats.drafted, "{text}: a model agrees with itself: {stats:?}");
        assert!(same.iter().filter(|r| r.from_draft).count() == stats.accepted);
        // A 4-bit draft: some accepted, some rejected; still the model's own tokens, except
        // where the model's top two are a near-tie (verification runs several positions in
        // one pass, whose sums may round differently from one at a time).
        let (spec, stats) = greedy(&model, &tok, &prompt, Some((&draft4, 3)));
        let got: Vec<u32> = spec.iter().map(|r| r.token).collect();
        assert!(stats.accepted > 0 && stats.accepted < stats.drafted, "{text}: {stats:?}");
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None => assert_eq!(got.len(), want.len()),
            Some(t) => {
                let margin = plain[t].top_logprobs[0].1 - plain[t].top_logprobs[1].1;
                assert!(margin < 0.05, "{text}: token {t} differs ({} vs {}) where the model's margin is {margin}", got[t], want[t]);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
