//! The default model (SmolLM2-135M: 9 query and 3 key/value heads) split over two in-process
//! ranks: 5 + 4 query heads, the middle key/value head held by both. Every rank's logits equal
//! the whole model's (up to rounding).

use std::sync::Arc;

use lmx::dist::{Group, InProcess};

use crate::default_model;

fn logits(model: &lmx::Model, ids: &[u32]) -> Vec<f32> {
    let input = lmx::core::Tensor::new(ids, model.device()).and_then(|t| t.unsqueeze(0)).expect("ids");
    let out = model.forward(&input, &mut model.new_cache(), lmx::Logits::All).expect("forward");
    out.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("logits")
}

/// The GGUF dequantized to float32: every rank's logits are the whole model's up to float
/// rounding (the sums of row-parallel layers split in two).
#[test]
fn smollm2_over_two_ranks_equals_the_whole_model() {
    check_two_ranks(true, 1e-5);
}

/// The GGUF as it runs, its Q4_1 matrices packed: each rank rounds its own half of a
/// row-parallel layer's input to int8 (its own scales), so logits agree within int8 rounding.
#[test]
fn packed_smollm2_over_two_ranks_follows_the_whole_model() {
    check_two_ranks(false, 2e-3);
}

/// Rank 0 and 1 of two in-process ranks give the whole model's logits within `tolerance` of
/// their largest magnitude.
fn check_two_ranks(dequantize_gguf: bool, tolerance: f32) {
    let opts = lmx::LoadOptions { dequantize_gguf, ..Default::default() };
    let (whole, tok) = lmx::load_with(&default_model(), &opts).expect("load");
    let ids = tok.chat_prompt(&[lmx::Message::new("user", "What is the capital of France?")], None).expect("prompt");
    let want = logits(&whole, &ids);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    drop(whole);
    let results: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = InProcess::world(2)
            .into_iter()
            .map(|g| {
                let ids = ids.clone();
                s.spawn(move || {
                    let group: Arc<dyn Group> = Arc::new(g.clone());
                    let opts = lmx::LoadOptions { group: Some(group), dequantize_gguf, ..Default::default() };
                    let r = lmx::load_with(&default_model(), &opts).map(|(m, _)| logits(&m, &ids));
                    if r.is_err() {
                        g.abort();
                    }
                    r.expect("sharded load")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    });
    for (rank, got) in results.iter().enumerate() {
        let d = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        println!("rank {rank} (dequantized: {dequantize_gguf}): max |logit diff| {d:.3e} (logit scale {scale:.2})");
        assert!(d <= tolerance * scale, "rank {rank}: sharded logits differ from the whole model by {d}");
    }
}
