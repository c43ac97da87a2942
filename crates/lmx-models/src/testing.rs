//! The checks every architecture passes, against the golden fixture that
//! `scripts/fixtures/tiny_models.py` wrote with transformers: a tiny random model, a batch of
//! two sequences, and transformers' logits for them.

use std::path::PathBuf;

use lmx_core::{DType, Device, Tensor};
use lmx_io::Weights;

use crate::{load_model, CausalLm, Logits};

fn fixture_dir(model_type: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(model_type)
}

fn load(model_type: &str, dtype: DType) -> Box<dyn CausalLm> {
    let dir = fixture_dir(model_type);
    let config = lmx_io::config::read_json(&dir.join("config.json")).expect("fixture config.json");
    let weights = Weights::from_safetensors(&[dir.join("model.safetensors")], dtype, &Device::Cpu).expect("fixture weights");
    let model = load_model(model_type, &config, &weights.root()).expect("model builds");
    weights.finish(crate::registry::is_ignored_key).expect("every checkpoint key is used");
    model
}

/// Largest |a - b| and the flat index where it occurs.
fn max_diff(a: &Tensor, b: &Tensor) -> (f32, usize) {
    let a = a.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("a");
    let b = b.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("b");
    assert_eq!(a.len(), b.len(), "logit counts differ");
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).enumerate().fold((0.0, 0), |m, (i, d)| if d > m.0 { (d, i) } else { m })
}

/// Golden logits (f32 within 1e-4 of the logit scale, bf16 within 3e-2), and cached
/// token-by-token decoding equal to the full forward pass.
pub fn check_architecture(model_type: &str) {
    let golden = candle_core::safetensors::load(fixture_dir(model_type).join("golden.safetensors"), &Device::Cpu).expect("golden");
    let input_ids = golden["input_ids"].to_dtype(DType::U32).expect("ids");
    let want = &golden["logits"];
    let scale = want.abs().and_then(|t| t.flatten_all()).and_then(|t| t.max(0)).and_then(|t| t.to_scalar::<f32>()).expect("scale");
    let (_, seq_len) = input_ids.dims2().expect("2-D ids");

    let model = load(model_type, DType::F32);
    let got = model.forward(&input_ids, &mut model.new_cache(), Logits::All).expect("forward");
    let (d, at) = max_diff(&got, want);
    println!("{model_type} f32: max |logit diff| {d:.3e} at flat index {at} (logit scale {scale:.3})");
    assert!(d <= 1e-4 * scale, "{model_type} f32 logits differ from transformers by {d} at {at}");

    // Prefill 4 tokens, then decode one token at a time through the cache.
    let mut cache = model.new_cache();
    let mut parts = vec![model.forward(&input_ids.narrow(1, 0, 4).expect("n"), &mut cache, Logits::All).expect("prefill")];
    for i in 4..seq_len {
        parts.push(model.forward(&input_ids.narrow(1, i, 1).expect("n"), &mut cache, Logits::Last).expect("decode"));
    }
    let cached = Tensor::cat(&parts, 1).expect("cat");
    let (d, at) = max_diff(&cached, &got);
    println!("{model_type} cached decode vs full forward: {d:.3e} at {at}");
    assert!(d <= 1e-4 * scale, "{model_type}: cached decoding differs from the full forward by {d} at {at}");

    let model = load(model_type, DType::BF16);
    let got = model.forward(&input_ids, &mut model.new_cache(), Logits::All).expect("bf16 forward");
    let (d, at) = max_diff(&got, want);
    println!("{model_type} bf16: max |logit diff| {d:.3e} at {at}");
    assert!(d <= 3e-2 * scale, "{model_type} bf16 logits differ from transformers by {d} at {at}");
}
