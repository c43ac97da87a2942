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

/// bf16 stays close to f32 along a whole answer: teacher-forcing transformers' 64-token answer,
/// the bf16 model's next-token choice agrees with f32 at nearly every position. (An f32-sum
/// rms_norm in bf16, or any op that loses precision, drifts after a few positions.)
#[test]
fn bf16_tracks_f32_along_the_reference_answer() {
    let reference = reference();
    let case = &reference["cases"][0];
    let tokens: Vec<u32> = ids(&case["prompt_ids"]).into_iter().chain(ids(&case["ignore_eos_ids"])).collect();
    let n_prompt = case["prompt_ids"].as_array().expect("ids").len();
    let logits = |dtype| {
        let opts = lmx::LoadOptions { dtype: Some(dtype), ..Default::default() };
        let (model, _) = lmx::load_with(&default_model(), &opts).expect("load");
        let input = lmx::core::Tensor::new(tokens.as_slice(), &lmx::Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids");
        let out = model.forward(&input, &mut model.new_cache(), lmx::Logits::All).expect("forward");
        out.squeeze(0).and_then(|t| t.to_vec2::<f32>()).expect("logits")
    };
    let (f32_logits, bf16_logits) = (logits(lmx::DType::F32), logits(lmx::DType::BF16));
    let argmax = |row: &[f32]| row.iter().enumerate().fold(0, |best, (i, v)| if *v > row[best] { i } else { best });
    let positions = n_prompt - 1..tokens.len() - 1;
    let agree = positions.clone().filter(|&p| argmax(&f32_logits[p]) == argmax(&bf16_logits[p])).count();
    let total = positions.len();
    // Mean KL(f32 || bf16) of the next-token distributions: bf16 rounding alone gives ~1e-3.
    let log_softmax = |row: &[f32]| {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z = row.iter().map(|v| ((v - m) as f64).exp()).sum::<f64>().ln() + m as f64;
        row.iter().map(|v| *v as f64 - z).collect::<Vec<f64>>()
    };
    let kl: f64 = positions
        .clone()
        .map(|p| {
            let (a, b) = (log_softmax(&f32_logits[p]), log_softmax(&bf16_logits[p]));
            a.iter().zip(&b).map(|(x, y)| x.exp() * (x - y)).sum::<f64>()
        })
        .sum::<f64>()
        / total as f64;
    println!("bf16 agrees with f32 on {agree}/{total} next-token choices; mean KL {kl:.2e}");
    assert!(agree * 100 >= total * 90, "bf16 agrees with f32 on only {agree}/{total} positions");
    assert!(kl < 2e-2, "bf16 next-token distributions drift from f32: mean KL {kl}");
}

/// An f16 checkpoint on the CPU computes in f32 with its matrices read as stored (f16, half
/// the bytes of f32): its logits for a prompt, and for tokens decoded one at a time after it,
/// equal bit for bit those of the same values written as an f32 folder.
#[test]
fn f16_folder_computes_as_its_values_in_f32() {
    let base = std::env::temp_dir().join(format!("lmx-golden-f16-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (f16_dir, f32_dir) = (base.join("f16"), base.join("f32"));
    let f16 = lmx::convert::read(&lmx::ModelSource::Gguf(default_model().into()), Some(lmx::DType::F16)).expect("read gguf as f16");
    lmx::convert::write(&f16, &f16_dir).expect("write f16");
    let f32 = lmx::convert::read(&lmx::ModelSource::resolve(&f16_dir.to_string_lossy()).expect("folder"), Some(lmx::DType::F32)).expect("read f16 as f32");
    lmx::convert::write(&f32, &f32_dir).expect("write f32");
    let case = &reference()["cases"][0];
    let prompt = ids(&case["prompt_ids"]);
    let run = |dir: &std::path::Path| {
        let (model, _) = lmx::load(&dir.to_string_lossy()).expect("load");
        assert_eq!(model.dtype(), lmx::DType::F32, "{dir:?} computes in f32 on the CPU");
        let mut cache = model.new_cache();
        let input = lmx::core::Tensor::new(prompt.as_slice(), &lmx::Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids");
        let mut rows = vec![model.forward(&input, &mut cache, lmx::Logits::Last).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).expect("prompt logits")];
        for &token in &ids(&case["ignore_eos_ids"])[..4] {
            let input = lmx::core::Tensor::new(&[[token]], &lmx::Device::Cpu).expect("id");
            rows.push(model.forward(&input, &mut cache, lmx::Logits::Last).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).expect("step logits"));
        }
        rows
    };
    let (got, want) = (run(&f16_dir), run(&f32_dir));
    let _ = std::fs::remove_dir_all(&base);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g == w, "position {i}: the f16 folder's logits differ from its values' in f32");
    }
}
