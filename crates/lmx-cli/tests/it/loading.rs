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
    let shards: Vec<_> = std::fs::read_dir(&out)
        .expect("ls")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
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
        "--model", "--prompt", "-p,", "--system-prompt", "--max-tokens", "-m,", "--temp", "--top-p", "--top-k", "--min-p",
        "--seed", "--ignore-chat-template", "--chat-template-config", "--extra-eos-token", "--verbose",
        "--repetition-penalty", "--device",
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
