//! `lmx convert -q` / `--dequantize` through the binary, on the tiny llama fixture, and the
//! errors a user can hit.

use crate::{assert_clear_error, lmx, path_str, temp_dir, tiny_model};

fn generate(model: &str) -> std::process::Output {
    lmx(&["generate", "--model", model, "-p", "a b c", "-m", "4", "--verbose", "false"])
}

#[test]
fn quantize_load_and_dequantize() {
    let src = tiny_model("q-src");
    let out = temp_dir("q-out");
    let q8 = out.join("q8");
    let r = lmx(&["convert", "--hf-path", &path_str(&src), "--mlx-path", &path_str(&q8), "-q", "--q-bits", "8", "--q-group-size", "32"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(q8.join("config.json")).expect("cfg")).expect("json");
    assert_eq!(cfg["quantization"], serde_json::json!({"group_size": 32, "bits": 8, "mode": "affine"}));
    assert_eq!(cfg["quantization_config"], cfg["quantization"]);
    // 8-bit is close enough to the float model to give the same greedy tokens here.
    let (a, b) = (generate(&path_str(&src)), generate(&path_str(&q8)));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    assert_eq!(a.stdout, b.stdout);
    // Dequantized again: a plain float folder with no quantization block.
    let dq = out.join("dq");
    let r = lmx(&["convert", "--hf-path", &path_str(&q8), "--mlx-path", &path_str(&dq), "--dequantize"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dq.join("config.json")).expect("cfg")).expect("json");
    assert!(cfg.get("quantization").is_none() && cfg.get("quantization_config").is_none());
    assert_eq!(generate(&path_str(&dq)).stdout, b.stdout);
}

#[test]
fn rules_files_choose_bits_per_layer() {
    let src = tiny_model("rules-src");
    let dir = temp_dir("rules");
    let rules = dir.join("rules.txt");
    std::fs::write(&rules, "# embeddings at 8 bits, o_proj left in float, the rest 4-bit\nmodel.embed_tokens 8\n*.o_proj skip\n").expect("write");
    let out = dir.join("q");
    let r = lmx(&["convert", "--hf-path", &path_str(&src), "--mlx-path", &path_str(&out), "-q", "--q-group-size", "32", "--quant-rules", &path_str(&rules)]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("cfg")).expect("json");
    assert_eq!(cfg["quantization"]["model.embed_tokens"]["bits"], 8);
    assert!(cfg["quantization"].get("model.layers.0.self_attn.o_proj").is_none());
    assert!(generate(&path_str(&out)).status.success());
    // The o_proj weights stayed float: no scales were written for them.
    let w = lmx::io::Weights::from_safetensors(&[out.join("model.safetensors")]).expect("read");
    assert!(!w.keys().iter().any(|k| k.contains("o_proj.scales")));
    assert!(w.keys().iter().any(|k| k.contains("q_proj.scales")));
}

#[test]
fn quantization_errors_are_clear() {
    let src = tiny_model("qerr-src");
    let dir = temp_dir("qerr");
    let out = |n: &str| path_str(&dir.join(n));
    let r = lmx(&["convert", "--hf-path", &path_str(&src), "--mlx-path", &out("a"), "-q", "--q-bits", "7"]);
    assert_clear_error(&r, &["7-bit", "2, 3, 4, 5, 6 and 8"]);
    let r = lmx(&["convert", "--hf-path", &path_str(&src), "--mlx-path", &out("b"), "-q", "--q-mode", "nvfp4"]);
    assert_clear_error(&r, &["nvfp4", "affine"]);
    // A rule asking for a group size the layer's rows do not divide names the layer.
    let rules = dir.join("r.txt");
    std::fs::write(&rules, "*.down_proj 4 64\n").expect("write");
    let r = lmx(&["convert", "--hf-path", &path_str(&src), "--mlx-path", &out("c"), "-q", "--q-group-size", "32", "--quant-rules", &path_str(&rules)]);
    assert_clear_error(&r, &["model.layers.0.mlp.down_proj", "96", "64"]);
    let bad = dir.join("bad.txt");
    std::fs::write(&bad, "ok 4\n*.q_proj four\n").expect("write");
    let r = lmx(&["convert", "--hf-path", &path_str(&src), "--mlx-path", &out("d"), "-q", "--quant-rules", &path_str(&bad)]);
    assert_clear_error(&r, &["bad.txt:2", "four"]);
    // A quantization block that contradicts the packed tensors names the tensor and shapes.
    let q = dir.join("q4");
    let r = lmx(&["convert", "--hf-path", &path_str(&src), "--mlx-path", &path_str(&q), "-q", "--q-group-size", "32"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let cfg = std::fs::read_to_string(q.join("config.json")).expect("cfg").replace("\"bits\": 4", "\"bits\": 8");
    std::fs::write(q.join("config.json"), cfg).expect("write");
    assert_clear_error(&generate(&path_str(&q)), &["model.embed_tokens.weight", "[160, 8]", "[160, 16]"]);
    // Nothing was left behind by the failed conversions.
    for n in ["a", "b", "c", "d"] {
        assert!(!dir.join(n).exists(), "{n} was written");
    }
}
