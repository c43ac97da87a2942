//! Multi-turn chat through one prompt cache: turn two prefills only the new tokens and gives
//! the same reply as a fresh cache on the whole conversation.

use crate::{default_model, greedy_ids};
use lmx::{GenerateParams, Message, PromptCache};

#[test]
fn second_turn_reuses_the_cache_and_matches_a_fresh_run() {
    let (model, tok) = lmx::load(&default_model()).expect("load");
    let mut cache = PromptCache::new(&*model);
    let mut messages = vec![Message::new("user", "Name a colour.")];
    let params = || GenerateParams { max_tokens: 24, ..Default::default() };

    let prompt = tok.chat_prompt(&messages, None).expect("prompt");
    let mut reply = String::new();
    for r in lmx::stream_generate(&model, &tok, &prompt, &mut cache, params()) {
        reply.push_str(&r.expect("step").text);
    }
    assert!(!reply.is_empty());
    messages.push(Message::new("assistant", reply));
    messages.push(Message::new("user", "And another one?"));

    let prompt2 = tok.chat_prompt(&messages, None).expect("prompt 2");
    let responses: Vec<_> = lmx::stream_generate(&model, &tok, &prompt2, &mut cache, params()).map(|r| r.expect("step")).collect();
    let first = &responses[0];
    assert!(first.cached_tokens > prompt.len(), "turn 2 reused {} tokens; the first prompt alone had {}", first.cached_tokens, prompt.len());
    let cached_ids: Vec<u32> = responses.iter().map(|r| r.token).collect();
    assert_eq!(cached_ids, greedy_ids(&model, &tok, &prompt2, 24, false));

    // Resetting forgets everything.
    cache.reset();
    assert!(cache.tokens().is_empty());
}

#[test]
fn prompt_longer_than_the_context_is_an_error() {
    let (model, tok) = lmx::load(&default_model()).expect("load");
    let too_long = vec![42u32; model.max_position_embeddings() + 1];
    let mut cache = PromptCache::new(&*model);
    let err = lmx::stream_generate(&model, &tok, &too_long, &mut cache, GenerateParams::default()).next().expect("one item").expect_err("too long").to_string();
    assert!(err.contains("8193 tokens") && err.contains("8192"), "{err}");
}
