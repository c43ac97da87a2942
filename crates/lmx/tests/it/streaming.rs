//! Streamed text deltas never split a multi-byte UTF-8 character and add up to the full text.

use crate::default_model;

#[test]
fn deltas_hold_back_partial_characters() {
    let (_, tok) = lmx::load(&default_model()).expect("load");
    let text = "naïve café — 世界 🎉🦀 done";
    let ids = tok.encode(text, false).expect("encode");
    let mut dec = tok.stream_decoder();
    let mut out = String::new();
    let mut held_back = 0;
    for id in &ids {
        match dec.push(*id).expect("push") {
            Some(delta) => {
                assert!(!delta.contains('\u{FFFD}'), "delta {delta:?} splits a character");
                out.push_str(&delta);
            }
            None => held_back += 1,
        }
    }
    if let Some(rest) = dec.finish().expect("finish") {
        out.push_str(&rest);
    }
    assert_eq!(out, tok.decode(&ids, false).expect("decode"));
    assert_eq!(out, text);
    // Byte-level BPE splits the emoji and CJK characters over several tokens.
    assert!(held_back > 0, "expected some tokens to end mid-character");
}

/// Every response carries its token's log-probability and the most likely tokens: greedy
/// picks the first of them; a logit bias of -inf bans a token that greedy decoding would
/// otherwise emit, and a frequency penalty changes a repetitive continuation.
#[test]
fn responses_carry_logprobs_and_processors_apply() {
    let (model, tok) = lmx::load(&default_model()).expect("load");
    let prompt = tok.encode("one, two, three, four,", true).expect("encode");
    let run = |sampler: lmx::SamplerParams| -> Vec<lmx::GenerationResponse> {
        let mut cache = lmx::PromptCache::new(&*model);
        let params = lmx::GenerateParams { max_tokens: 6, top_logprobs: 3, sampler, ..Default::default() };
        lmx::stream_generate(&model, &tok, &prompt, &mut cache, params).map(|r| r.expect("step")).collect()
    };
    let plain = run(Default::default());
    for r in &plain {
        assert_eq!(r.top_logprobs.len(), 3);
        assert_eq!(r.top_logprobs[0].0, r.token, "greedy takes the most likely token");
        assert!((r.logprob - r.top_logprobs[0].1).abs() < 1e-6 && r.logprob <= 0.0);
        assert!(r.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1), "sorted: {:?}", r.top_logprobs);
    }
    let first = plain[0].token;
    let banned = run(lmx::SamplerParams { logit_bias: vec![(first, f32::NEG_INFINITY)], ..Default::default() });
    assert_ne!(banned[0].token, first, "a banned token is never chosen");
    assert_eq!(banned[0].token, plain[0].top_logprobs[1].0, "the runner-up takes its place");
    let tokens = |rs: &[lmx::GenerationResponse]| rs.iter().map(|r| r.token).collect::<Vec<_>>();
    let penalized = run(lmx::SamplerParams { frequency_penalty: Some(5.0), ..Default::default() });
    assert_ne!(tokens(&penalized), tokens(&plain), "a strong frequency penalty changes a counting continuation");
}

/// Stop strings end generation where the text first contains one, cut before it, even when
/// it spans several tokens; text that only might begin one is held back and released; a stop
/// string that never appears changes nothing.
#[test]
fn stop_strings_cut_the_text_where_they_appear() {
    let (model, tok) = lmx::load(&default_model()).expect("load");
    let prompt = tok.chat_prompt(&[lmx::Message::new("user", "Write a short poem about the sea.")], None).expect("prompt");
    let run = |stop: Vec<String>| -> (String, Option<lmx::FinishReason>, usize) {
        let mut cache = lmx::PromptCache::new(&*model);
        let params = lmx::GenerateParams { max_tokens: 40, ignore_eos: true, stop, ..Default::default() };
        let rs: Vec<lmx::GenerationResponse> = lmx::stream_generate(&model, &tok, &prompt, &mut cache, params).map(|r| r.expect("step")).collect();
        (rs.iter().map(|r| r.text.as_str()).collect(), rs.last().and_then(|r| r.finish_reason), rs.len())
    };
    let (full, reason, n) = run(Vec::new());
    assert_eq!((reason, n), (Some(lmx::FinishReason::Length), 40));
    // A stop string from the middle of the text, longer than one token.
    let start = full.char_indices().map(|(i, _)| i).find(|&i| i >= full.len() / 2).expect("middle");
    let stop: String = full[start..].chars().take(7).collect();
    let (cut, reason, n) = run(vec!["never appears".into(), stop.clone()]);
    let at = full.find(&stop).expect("the stop string is in the text");
    assert_eq!(cut, full[..at], "stopped before {stop:?}");
    assert_eq!(reason, Some(lmx::FinishReason::Stop));
    assert!(n < 40, "generation ended early ({n} tokens)");
    let (same, reason, _) = run(vec!["never appears".into()]);
    assert_eq!((same, reason), (full, Some(lmx::FinishReason::Length)), "held-back text is released");
}
