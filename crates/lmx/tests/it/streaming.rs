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
