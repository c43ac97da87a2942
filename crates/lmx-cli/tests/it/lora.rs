//! `lmx lora` and `lmx fuse` through the binary: the user story (new facts learned by a short
//! LoRA run on the default model, answered with --adapter-path and after fusing), QLoRA/DoRA on
//! a 4-bit base with gradient checkpointing, resuming, and the errors a user can hit.

use std::path::{Path, PathBuf};

use crate::{assert_clear_error, default_model, lmx, path_str, repo_root, temp_dir, tiny_model};

fn facts() -> PathBuf {
    repo_root().join("tests/fixtures/facts")
}

/// The first training question and the last word of its answer (the made-up fact).
fn first_fact() -> (String, String) {
    let line = std::fs::read_to_string(facts().join("train.jsonl")).expect("train.jsonl").lines().next().expect("a line").to_string();
    let v: serde_json::Value = serde_json::from_str(&line).expect("json");
    let q = v["messages"][0]["content"].as_str().expect("question").to_string();
    let a = v["messages"][1]["content"].as_str().expect("answer");
    let word = a.trim_end_matches('.').rsplit(' ').next().expect("word").to_string();
    (q, word)
}

/// "Iter N: Val loss X" values, in order.
fn val_losses(stderr: &str) -> Vec<f64> {
    stderr.lines().filter_map(|l| l.split("Val loss ").nth(1)).filter_map(|s| s.split(',').next()?.parse().ok()).collect()
}

fn answer(model: &str, adapter: Option<&Path>, question: &str) -> String {
    let mut args = vec!["generate", "--model", model, "-p", question, "-m", "24", "--verbose", "false"];
    let a;
    if let Some(p) = adapter {
        a = path_str(p);
        args.extend(["--adapter-path", &a]);
    }
    let out = lmx(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn train(model: &str, adapters: &Path, extra: &[&str]) -> String {
    let (data, ad) = (path_str(&facts()), path_str(adapters));
    let mut args = vec!["lora", "--model", model, "--train", "--data", &data, "--adapter-path", &ad, "--batch-size", "4", "--steps-per-report", "5"];
    args.extend(extra);
    let out = lmx(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    stderr
}

#[test]
fn lora_teaches_the_default_model_new_facts_and_fuse_keeps_them() {
    let model = default_model();
    let dir = temp_dir("lora-facts");
    let adapters = dir.join("adapters");
    let (question, fact) = first_fact();
    assert!(!answer(&model, None, &question).contains(&fact), "the base model cannot know `{fact}`");
    let log = train(&model, &adapters, &["--iters", "24", "--learning-rate", "2e-4", "--num-layers", "8", "--steps-per-eval", "12", "--save-every", "12"]);
    let val = val_losses(&log);
    assert_eq!(val.len(), 3, "validation at iterations 1, 12 and 24:\n{log}");
    assert!(val[2] < 0.5 * val[0], "validation loss must fall: {val:?}\n{log}");
    assert!(log.contains("Tokens/sec") && log.contains("Peak mem"), "{log}");
    // MLX LM's layout: config + final weights + a checkpoint every --save-every steps.
    for f in ["adapter_config.json", "adapters.safetensors", "0000012_adapters.safetensors", "0000024_adapters.safetensors"] {
        assert!(adapters.join(f).exists(), "{f} missing");
    }
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(adapters.join("adapter_config.json")).expect("config")).expect("json");
    assert_eq!((cfg["fine_tune_type"].as_str(), cfg["num_layers"].as_i64()), (Some("lora"), Some(8)));
    assert_eq!(cfg["lora_parameters"], serde_json::json!({"rank": 8, "scale": 20.0, "dropout": 0.0}));

    let taught = answer(&model, Some(&adapters), &question);
    assert!(taught.contains(&fact), "with the adapter the model answers `{fact}`: {taught}");
    let fused = dir.join("fused");
    let out = lmx(&["fuse", "--model", &model, "--adapter-path", &path_str(&adapters), "--save-path", &path_str(&fused)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(answer(&path_str(&fused), None, &question), taught, "the fused model answers as base + adapter");

    // --test evaluates the saved adapters on test.jsonl.
    let out = lmx(&["lora", "--model", &model, "--test", "--data", &path_str(&facts()), "--adapter-path", &path_str(&adapters), "--batch-size", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let test_loss: f64 = stdout.split("Test loss ").nth(1).and_then(|s| s.split(',').next()).and_then(|s| s.parse().ok()).expect("test loss");
    assert!(test_loss < val[0], "test loss {test_loss} vs untrained validation loss {}", val[0]);
}

#[test]
fn qlora_and_dora_train_on_a_4bit_base_and_fuse_stays_quantized() {
    let dir = temp_dir("qlora");
    let q4 = dir.join("q4");
    let out = lmx(&["convert", "--gguf", &default_model(), "--mlx-path", &path_str(&q4), "-q"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let adapters = dir.join("adapters");
    let log = train(&path_str(&q4), &adapters, &["--iters", "8", "--fine-tune-type", "dora", "--learning-rate", "2e-4", "--num-layers", "4", "--steps-per-eval", "8", "--grad-checkpoint"]);
    let val = val_losses(&log);
    assert!(val.len() == 2 && val[1] < val[0], "validation loss must fall on the 4-bit base: {val:?}\n{log}");
    let keys = lmx::io::adapters::load_adapter_file(&adapters.join("adapters.safetensors")).expect("adapters");
    assert!(keys.keys().any(|k| k.ends_with(".m")) && keys.keys().all(|k| k.starts_with("model.layers.2")), "DoRA tensors on the last 4 layers only");
    // Resuming starts from the saved adapters: its first validation (before any update) is
    // below the last one of the first run (taken before that run's final update).
    let resumed = dir.join("resumed");
    let log2 = train(&path_str(&q4), &resumed, &["--iters", "1", "--fine-tune-type", "dora", "--num-layers", "4", "--resume-adapter-file", &path_str(&adapters.join("adapters.safetensors"))]);
    let val2 = val_losses(&log2);
    assert!(val2[0] < val[1] + 0.05 && val2[0] < 0.5 * val[0], "resumed run starts where the first ended: {val2:?} vs {val:?}");

    let fused = dir.join("fused");
    let out = lmx(&["fuse", "--model", &path_str(&q4), "--adapter-path", &path_str(&adapters), "--save-path", &path_str(&fused)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fused.join("config.json")).expect("config")).expect("json");
    assert_eq!(cfg["quantization"]["bits"], 4, "a quantized base stays quantized");
    let deq = dir.join("fused-f");
    let out = lmx(&["fuse", "--model", &path_str(&q4), "--adapter-path", &path_str(&adapters), "--save-path", &path_str(&deq), "--dequantize"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(deq.join("config.json")).expect("config")).expect("json");
    assert!(cfg.get("quantization").is_none());
    let (a, b) = (answer(&path_str(&fused), None, "Hello"), answer(&path_str(&deq), None, "Hello"));
    assert!(!a.is_empty() && !b.is_empty());

    // Adapter tensors outside the folder's num_layers are an error, not silently applied.
    let narrowed = dir.join("narrowed");
    std::fs::create_dir_all(&narrowed).expect("dir");
    std::fs::copy(adapters.join("adapters.safetensors"), narrowed.join("adapters.safetensors")).expect("copy");
    let cfg = std::fs::read_to_string(adapters.join("adapter_config.json")).expect("config").replace("\"num_layers\": 4", "\"num_layers\": 2");
    std::fs::write(narrowed.join("adapter_config.json"), cfg).expect("write");
    let out = lmx(&["fuse", "--model", &path_str(&q4), "--adapter-path", &path_str(&narrowed), "--save-path", &path_str(&dir.join("fused-narrow"))]);
    crate::assert_clear_error(&out, &["num_layers 2", "match no layer this adapter covers"]);

    // Weights fully fine-tuned on the float model, fused into the 4-bit one, are quantized
    // with the layer's bits and group size: the result is a 4-bit model that loads and runs.
    let float = dir.join("float");
    let out = lmx(&["convert", "--gguf", &default_model(), "--mlx-path", &path_str(&float)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let full = dir.join("full");
    train(&path_str(&float), &full, &["--iters", "1", "--fine-tune-type", "full", "--num-layers", "1", "--learning-rate", "1e-5"]);
    let fused_full = dir.join("fused-full");
    let out = lmx(&["fuse", "--model", &path_str(&q4), "--adapter-path", &path_str(&full), "--save-path", &path_str(&fused_full)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fused_full.join("config.json")).expect("config")).expect("json");
    assert_eq!(cfg["quantization"]["bits"], 4, "full fine-tuning of a quantized base stays quantized");
    assert!(!answer(&path_str(&fused_full), None, "Hello").is_empty());
}

/// A tiny data folder with `lines` as train.jsonl and valid.jsonl.
fn data_dir(name: &str, train: &str, valid: Option<&str>) -> PathBuf {
    let d = temp_dir(name);
    std::fs::write(d.join("train.jsonl"), train).expect("write");
    if let Some(v) = valid {
        std::fs::write(d.join("valid.jsonl"), v).expect("write");
    }
    d
}

#[test]
fn bad_data_and_flags_get_clear_errors() {
    let model = tiny_model("lora-errors");
    let m = path_str(&model);
    let good = "{\"text\": \"a b c d\"}\n{\"text\": \"b c d a\"}\n{\"text\": \"c d a b\"}\n{\"text\": \"d a b c\"}\n";
    let run = |data: &Path, extra: &[&str]| {
        let (d, ad) = (path_str(data), path_str(&data.join("ad")));
        let mut args = vec!["lora", "--model", &m, "--train", "--data", &d, "--adapter-path", &ad];
        for (flag, value) in [("--iters", "2"), ("--num-layers", "2")] {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend(extra);
        lmx(&args)
    };
    let bad = data_dir("lora-bad-line", "{\"text\": \"a b\"}\n{\"txt\": 1}\n", Some(good));
    assert_clear_error(&run(&bad, &[]), &["train.jsonl:2", "unknown format"]);
    let broken = data_dir("lora-bad-json", "{\"text\": \"a b\"}\n\n{not json\n", Some(good));
    assert_clear_error(&run(&broken, &[]), &["train.jsonl:3", "invalid JSON"]);
    let no_valid = data_dir("lora-no-valid", good, None);
    assert_clear_error(&run(&no_valid, &[]), &["valid.jsonl", "not found"]);
    let ok = data_dir("lora-flags", good, Some(good));
    assert_clear_error(&run(&ok, &["--fine-tune-type", "qlora"]), &["--fine-tune-type", "qlora"]);
    assert_clear_error(&run(&ok, &["--num-layers", "9"]), &["9 layers", "model has 2"]);
    assert_clear_error(&run(&ok, &["--mask-prompt"]), &["train.jsonl:1", "--mask-prompt"]);
    assert_clear_error(&run(&ok, &["--batch-size", "8"]), &["fewer than batch_size 8"]);
    let yaml = ok.join("c.yaml");
    std::fs::write(&yaml, "lora_parameters:\n  rank: 4\n  alpha: 8\n").expect("write");
    assert_clear_error(&run(&ok, &["-c", &path_str(&yaml)]), &["scale", "alpha"]);
    std::fs::write(&yaml, "learnin_rate: 1e-4\n").expect("write");
    assert_clear_error(&run(&ok, &["-c", &path_str(&yaml)]), &["learnin_rate"]);
    std::fs::write(&yaml, "lora_parameters:\n  rank: 4\n  scale: 10.0\n  keys: [self_attn.qproj]\n").expect("write");
    assert_clear_error(&run(&ok, &["-c", &path_str(&yaml)]), &["self_attn.qproj", "names no linear layer"]);
    // Over-long sequences are truncated with MLX LM's warning, and training goes on.
    let out = run(&ok, &["--max-seq-length", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("[WARNING] Some sequences are longer than 3 tokens"));
    // A diverging run stops with a clear message and keeps the last good adapters.
    let out = run(&ok, &["--learning-rate", "1e30", "--iters", "20"]);
    assert_clear_error(&out, &["not finite", "adapters.safetensors", "--learning-rate"]);
    assert!(ok.join("ad/adapters.safetensors").exists());
    let saved = lmx::io::adapters::load_adapter_file(&ok.join("ad/adapters.safetensors")).expect("readable");
    for (k, t) in saved {
        let finite = t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("f32").iter().all(|v| v.is_finite());
        assert!(finite, "{k} holds non-finite values");
    }
    // Full fine-tuning trains float weights only.
    let q = temp_dir("lora-full-q").join("q");
    assert!(lmx(&["convert", "--hf-path", &m, "--mlx-path", &path_str(&q), "-q", "--q-group-size", "32"]).status.success());
    let (d, ad) = (path_str(&ok), path_str(&ok.join("ad2")));
    let out = lmx(&["lora", "--model", &path_str(&q), "--train", "--data", &d, "--adapter-path", &ad, "--fine-tune-type", "full", "--num-layers", "1", "--iters", "1"]);
    assert_clear_error(&out, &["full fine-tuning", "quantized"]);
    // The golden adapters fuse into the tiny model they were made for, not into another one.
    let golden = path_str(&repo_root().join("tests/fixtures/lora_grads/dora"));
    let out = lmx(&["fuse", "--model", &m, "--adapter-path", &golden, "--save-path", &path_str(&ok.join("fused"))]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = lmx(&["fuse", "--model", &default_model(), "--adapter-path", &golden, "--save-path", &path_str(&ok.join("fused2"))]);
    assert_clear_error(&out, &["match no layer this adapter covers", "another base model"]);
    assert!(!ok.join("fused2").exists(), "no half-written output");
}

/// Training numbers are checked once flags and YAML are merged, before the model loads: each
/// gets one clear error naming the setting and the value (NaN and negative learning rates used
/// to train silently wrong, a huge rank to abort on allocation).
#[test]
fn bad_training_numbers_get_clear_errors() {
    let model = tiny_model("lora-numbers");
    let m = path_str(&model);
    let good = "{\"text\": \"a b c d\"}\n{\"text\": \"b c d a\"}\n";
    let data = data_dir("lora-numbers-data", good, Some(good));
    let d = path_str(&data);
    let yaml = data.join("c.yaml");
    let yaml_s = path_str(&yaml);
    let cases: &[(&[&str], Option<&str>, &[&str])] = &[
        (&["--learning-rate=nan"], None, &["learning_rate", "NaN"]),
        (&["--learning-rate=-1"], None, &["learning_rate", "-1"]),
        (&["--max-seq-length=1"], None, &["max_seq_length", "at least 2"]),
        (&["--batch-size=0"], None, &["batch_size", "at least 1"]),
        (&[], Some("lora_parameters:\n  rank: 1000000000\n  scale: 10.0\n"), &["lora_parameters.rank", "4096"]),
        (&[], Some("lora_parameters:\n  rank: 4\n  scale: 10.0\n  dropout: 1.5\n"), &["lora_parameters.dropout"]),
        (&[], Some("lr_schedule:\n  name: cosine_decay\n  arguments: [.nan, 10]\n"), &["c.yaml", "non-finite"]),
    ];
    for (flags, yaml_text, needles) in cases {
        let mut args = vec!["lora", "--model", &m, "--train", "--data", &d, "--iters", "1"];
        args.extend(flags.iter());
        if let Some(text) = yaml_text {
            std::fs::write(&yaml, text).expect("write");
            args.extend(["-c", &yaml_s]);
        }
        assert_clear_error(&lmx(&args), needles);
    }
}

/// Phi-3 stores q/k/v and gate/up fused: LoRA on them is refused by name with what to do,
/// and the suggested keys train.
#[test]
fn lora_on_fused_projections_is_refused_clearly_and_other_keys_train() {
    let model = crate::tiny_model_of("phi3", "phi3-lora");
    let data = word_data("phi3-data");
    let adapters = temp_dir("phi3-adapters");
    let (m, d, a) = (path_str(&model), path_str(&data), path_str(&adapters));
    let base = ["lora", "--model", m.as_str(), "--train", "--data", d.as_str(), "--iters", "2", "--batch-size", "2", "--num-layers", "2", "--adapter-path", a.as_str()];
    assert_clear_error(&lmx(&base), &["fused projection", "lora_parameters.keys"]);
    let config = data.join("lora.yaml");
    std::fs::write(&config, "lora_parameters:\n  keys: [\"self_attn.o_proj\", \"mlp.down_proj\"]\n  rank: 4\n  scale: 10.0\n  dropout: 0.0\n").expect("write config");
    let c = path_str(&config);
    let out = lmx(&[&base[..], &["-c", c.as_str()]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(adapters.join("adapters.safetensors").exists());
}

/// Training and validation texts in the tiny tokenizer's words.
fn word_data(name: &str) -> PathBuf {
    let data = temp_dir(name);
    for (split, n) in [("train", 8), ("valid", 2)] {
        let texts = ["a b c a b", "c c a b a", "b a c c b"];
        let lines: Vec<String> = (0..n).map(|i| serde_json::json!({ "text": texts[i % 3] }).to_string()).collect();
        std::fs::write(data.join(format!("{split}.jsonl")), lines.join("\n")).expect("write data");
    }
    data
}

/// A mixture-of-experts model in MLX's layout (experts stacked in `switch_mlp`): LoRA with no
/// `keys` adapts what mlx_lm.lora adapts, the routers and the stacked experts included
/// (`LoRASwitchLinear`, saved stacked as MLX LM saves them); generating with the adapter gives
/// the fused model's tokens; full fine-tuning trains the stacked experts too; DoRA on them is
/// refused clearly (MLX LM has none either).
#[test]
fn lora_trains_stacked_experts_and_fuse_keeps_them() {
    let model = crate::tiny_model_of("qwen3_moe_mlx/f32", "moe-lora");
    // The fixture's config names no EOS token (training appends one).
    let config = model.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).expect("config")).expect("json");
    cfg["eos_token_id"] = 0.into();
    std::fs::write(&config, cfg.to_string()).expect("write config");
    let data = word_data("moe-data");
    let (m, d) = (path_str(&model), path_str(&data));
    let run = |adapters: &Path, extra: &[&str]| {
        let a = path_str(adapters);
        let args = [&["lora", "--model", m.as_str(), "--train", "--data", d.as_str(), "--iters", "4", "--batch-size", "2", "--adapter-path", a.as_str()][..], extra].concat();
        lmx(&args)
    };
    let adapters = temp_dir("moe-adapters");
    let out = run(&adapters, &["--num-layers", "3", "--learning-rate", "1e-3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let saved = lmx::io::adapters::load_adapter_file(&adapters.join("adapters.safetensors")).expect("adapters");
    let expert = |k: &str| saved.get(&format!("model.layers.0.mlp.switch_mlp.gate_proj.{k}")).unwrap_or_else(|| panic!("no stacked {k}: {:?}", saved.keys()));
    assert_eq!(expert("lora_a").dims(), &[8, 8, 64], "lora_a (experts, r, in)");
    assert_eq!(expert("lora_b").dims(), &[8, 32, 8], "lora_b (experts, out, r)");
    let trained = expert("lora_b").abs().and_then(|t| t.max_all()).and_then(|t| t.to_scalar::<f32>()).expect("max");
    assert!(trained > 0.0, "the experts' lora_b moved from zero");
    assert!(saved.contains_key("model.layers.2.mlp.gate.lora_a"), "the router is adapted too");

    let generate = |model: &str, adapter: Option<&Path>| {
        let a = adapter.map(path_str);
        let mut args = vec!["generate", "--model", model, "-p", "a b c", "-m", "12", "--temp", "0", "--ignore-eos", "--ignore-chat-template", "--verbose", "false"];
        if let Some(a) = &a {
            args.extend(["--adapter-path", a.as_str()]);
        }
        let out = lmx(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let fused = temp_dir("moe-fused").join("fused");
    let out = lmx(&["fuse", "--model", &m, "--adapter-path", &path_str(&adapters), "--save-path", &path_str(&fused)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(generate(&path_str(&fused), None), generate(&m, Some(&adapters)), "the fused model generates as base + adapter");

    let full = temp_dir("moe-full");
    let out = run(&full, &["--fine-tune-type", "full", "--num-layers", "1", "--learning-rate", "1e-5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let saved = lmx::io::adapters::load_adapter_file(&full.join("adapters.safetensors")).expect("weights");
    assert_eq!(saved["model.layers.2.mlp.switch_mlp.down_proj.weight"].dims(), &[8, 64, 32], "stacked experts saved stacked");

    let out = run(&temp_dir("moe-dora"), &["--num-layers", "3", "--fine-tune-type", "dora"]);
    crate::assert_clear_error(&out, &["DoRA", "switch_mlp"]);
}
