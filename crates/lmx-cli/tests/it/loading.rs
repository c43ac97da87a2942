//! Loading paths beyond the default model: sharded checkpoints, and the CLI's flag names.

use crate::{lmx, path_str, temp_dir, tiny_model};

fn logits(model_dir: &str) -> Vec<f32> {
    let (model, _) = lmx::load(model_dir).expect("load");
    let ids = lmx::core::Tensor::new(&[[1u32, 2, 3, 1, 2]], &lmx::Device::Cpu).expect("ids");
    let out = model.forward(&ids, &mut model.new_cache(), lmx::Logits::All).expect("forward");
    out.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("vec")
}

#[test]
fn sharded_checkpoint_with_index_loads_identically() {
    let src = tiny_model("shard-src");
    let out = temp_dir("shard-out").join("sharded");
    let folder = lmx::convert::read(&lmx::ModelSource::Folder(src.clone()), None).expect("read");
    lmx::convert::write_sharded(&folder, &out, 40_000).expect("write shards");
    let shards: Vec<_> = std::fs::read_dir(&out).expect("ls").filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().to_string()).filter(|n| n.ends_with(".safetensors")).collect();
    assert!(shards.len() > 2, "expected several shards, got {shards:?}");
    assert!(out.join("model.safetensors.index.json").exists());
    assert!(!out.join("model.safetensors").exists());
    assert_eq!(logits(&path_str(&src)), logits(&path_str(&out)));
}

#[test]
fn help_lists_mlx_lm_flag_names() {
    let help = |cmd: &str| String::from_utf8(lmx(&[cmd, "--help"]).stdout).expect("utf-8");
    let generate = help("generate");
    for flag in [
        "--model",
        "--prompt",
        "-p,",
        "--system-prompt",
        "--max-tokens",
        "-m,",
        "--temp",
        "--top-p",
        "--top-k",
        "--min-p",
        "--seed",
        "--ignore-chat-template",
        "--chat-template-config",
        "--extra-eos-token",
        "--verbose",
        "--repetition-penalty",
        "--device",
    ] {
        assert!(generate.contains(flag), "lmx generate --help lacks {flag}");
    }
    let chat = help("chat");
    for flag in ["--model", "--max-tokens", "--temp", "--top-p", "--seed", "--system-prompt"] {
        assert!(chat.contains(flag), "lmx chat --help lacks {flag}");
    }
    let convert = help("convert");
    for flag in ["--hf-path", "--mlx-path", "--dtype", "--gguf"] {
        assert!(convert.contains(flag), "lmx convert --help lacks {flag}");
    }
    let bench = help("benchmark");
    for flag in ["--prompt-tokens", "--generation-tokens", "--num-trials", "--batch-size"] {
        assert!(bench.contains(flag), "lmx benchmark --help lacks {flag}");
    }
}

/// The streaming converter (one tensor at a time, shards written as they fill) writes the same
/// tensors as quantizing in memory, in several shards with an index.
#[test]
fn streaming_convert_equals_in_memory_quantize() {
    let src = tiny_model("stream-src");
    let dir = temp_dir("stream");
    let opts = lmx::convert::quantize::QuantizeOptions { group_size: 32, ..Default::default() };
    let source = lmx::ModelSource::Folder(src.clone());
    let streamed = dir.join("streamed");
    let bpw = lmx::convert::convert(&source, None, &lmx::convert::Transform::Quantize(opts.clone()), &streamed, 30_000).expect("convert").map(|s| s.bits_per_weight());
    // f32 scales and biases per 32 weights add 2 bits to the 4.
    assert!(bpw.is_some_and(|b| b > 6.0 && b < 6.5), "bits per weight {bpw:?}");
    assert!(streamed.join("model.safetensors.index.json").exists());
    let mut in_memory = lmx::convert::read(&source, None).expect("read");
    lmx::convert::quantize::quantize(&mut in_memory, &opts).expect("quantize");
    let (a, _) = lmx::load(&path_str(&streamed)).expect("load streamed");
    let w = lmx::io::Weights::from_safetensors(
        &std::fs::read_dir(&streamed).expect("ls").filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "safetensors")).collect::<Vec<_>>(),
    )
    .expect("read shards")
    .with_cast(Some(lmx::DType::F32));
    let mut keys = w.keys();
    let mut want: Vec<String> = in_memory.tensors.keys().cloned().collect();
    keys.sort();
    want.sort();
    assert_eq!(keys, want);
    for k in &keys {
        let (x, y) = (w.tensor(k).expect("t"), &in_memory.tensors[k]);
        let same = x.flatten_all().and_then(|x| x.to_dtype(lmx::DType::F32)).and_then(|x| x.to_vec1::<f32>()).expect("x")
            == y.flatten_all().and_then(|y| y.to_dtype(lmx::DType::F32)).and_then(|y| y.to_vec1::<f32>()).expect("y");
        assert!(same, "{k} differs between streamed and in-memory quantization");
    }
    drop(a);
}

/// The compute dtype follows the stored tensors, as in MLX LM, whatever config.json's
/// `torch_dtype` says (`mlx_lm.convert --dtype float32` keeps `bfloat16` there); `dtype`
/// overrides it.
#[test]
fn compute_dtype_follows_the_stored_weights() {
    let dir = crate::tiny_model("dtype-follows");
    let path = dir.join("config.json");
    let config = std::fs::read_to_string(&path).expect("config").replace("\"float32\"", "\"bfloat16\"");
    assert!(config.contains("bfloat16"), "the fixture config names its dtype");
    std::fs::write(&path, config).expect("write");
    let (model, _) = lmx::load(&crate::path_str(&dir)).expect("load");
    assert_eq!(model.dtype(), lmx::DType::F32, "f32 tensors compute in f32");
    let opts = lmx::LoadOptions { dtype: Some(lmx::DType::BF16), ..Default::default() };
    let (model, _) = lmx::load_with(&crate::path_str(&dir), &opts).expect("load bf16");
    assert_eq!(model.dtype(), lmx::DType::BF16, "an explicit dtype wins");
}
