//! The gradients of one LoRA / DoRA training step on the tiny Llama fixture equal PyTorch +
//! PEFT's (scripts/fixtures/lora_grads.py, float64 reference): same adapters (MLX layout), same
//! batch (right padding, a prompt-masked row), same masked mean cross-entropy; also with
//! gradient checkpointing.

use std::path::PathBuf;
use std::sync::Arc;

use lmx::core::{DType, Device, Tensor};
use lmx_io::adapters::{load_adapter_file, parse_config};
use lmx_io::Weights;
use lmx_nn::{AdapterPlan, Builder, Training};
use lmx_tune::trainer::{batch_loss, gradients, Batch};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn ints(t: &Tensor) -> Vec<usize> {
    t.to_dtype(DType::I64).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<i64>()).expect("ints").into_iter().map(|v| v as usize).collect()
}

///
/// And on the tiny Qwen3-MoE fixture (scripts/fixtures/lora_grads_moe.py): LoRA on the
/// attention of its three layers, whose gradients pass through two mixture-of-experts blocks,
/// the routers' softmax included.
///
/// And against MLX LM itself (scripts/fixtures/mlx_switch_lora.py, f32): the same model in
/// MLX's layout, dense and 4-bit, with adapters on every linear layer as mlx_lm.lora attaches
/// them by default, the routers and the stacked experts (`LoRASwitchLinear`: lora_a
/// (experts, r, in), lora_b (experts, out, r)) included; and gpt-oss as OpenAI stores it
/// (MXFP4 experts, gate and up interleaved), its experts rearranged at load by both and
/// adapted under MLX LM's names (`mlp.experts.*`).
#[test]
fn lora_and_dora_gradients_equal_peft() {
    for (model_type, folder, variant) in [
        ("llama", "llama", "lora"),
        ("llama", "llama", "dora"),
        ("qwen3_moe", "qwen3_moe", "qwen3_moe"),
        ("qwen3_moe", "qwen3_moe_mlx/f32", "switch_f32"),
        ("qwen3_moe", "qwen3_moe_mlx/q4", "switch_q4"),
        // The same weights in Hugging Face's layout (one module per expert): MLX LM's stacked
        // adapters land on each expert, named as MLX LM names them.
        ("qwen3_moe", "qwen3_moe", "switch_f32"),
        ("gpt_oss", "gpt_oss_mxfp4/hf", "switch_gpt_oss_mxfp4"),
    ] {
        let model_dir = fixtures().join(folder);
        let config = lmx_io::config::read_json(&model_dir.join("config.json")).expect("config");
        let layers = config["num_hidden_layers"].as_u64().expect("layers") as usize;
        let dir = fixtures().join("lora_grads").join(variant);
        let ac = parse_config(&dir.join("adapter_config.json")).expect("adapter config");
        let plan = AdapterPlan::new(ac.fine_tune_type, ac.num_layers, layers, ac.lora_parameters.clone().expect("params"), 0)
            .expect("plan")
            .with_saved(load_adapter_file(&dir.join("adapters.safetensors")).expect("adapters"), "fixture");
        let training = Arc::new(Training::new());
        let weights = Weights::from_safetensors(&[model_dir.join("model.safetensors")]).expect("weights");
        let quantization = lmx_io::QuantConfig::from_config(&config).expect("quantization block");
        let vb = Builder::new(weights, DType::F32, &Device::Cpu).with_quantization(quantization).with_adapters(Arc::new(plan)).with_training(training.clone());
        let model = lmx_models::load_model(model_type, &config, &vb).expect("model");
        vb.finish(|_| false).expect("every adapter tensor used");
        training.set_active(true);

        let golden = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).expect("golden");
        let ids = ints(&golden["input_ids"]);
        let (rows, width) = golden["input_ids"].dims2().expect("2-D");
        let batch = Batch { ids: ids.iter().map(|&v| v as u32).collect(), rows, width, lengths: ints(&golden["lengths"]), offsets: ints(&golden["offsets"]) };
        let want_loss = golden["loss"].to_dtype(DType::F64).and_then(|t| t.to_vec1::<f64>()).expect("loss")[0];
        let trainables = training.trainables();
        let vars: Vec<&lmx::core::Var> = trainables.iter().map(|(_, v)| v).collect();
        // An expert's slices of stacked adapters train as `key[e]`: one saved tensor per `key`.
        let saved = lmx_nn::training::checkpoint_tensors(&trainables).expect("stacked");
        assert_eq!(saved.len(), golden.keys().filter(|k| k.starts_with("grad.")).count(), "{variant}: one gradient per adapter tensor");
        // Plain, and with gradient checkpointing (every layer recomputed in the backward pass).
        for checkpointed in [false, true] {
            let sink = checkpointed.then(|| training.enable_checkpointing().sink);
            let (loss, ntoks) = batch_loss(&*model, &batch).expect("loss");
            assert_eq!(ntoks, batch.trained_tokens());
            let got_loss = f64::from(loss.to_scalar::<f32>().expect("scalar"));
            assert!((got_loss - want_loss).abs() < 1e-5 * want_loss.abs(), "{variant}: loss {got_loss} vs the reference {want_loss}");
            let grads = gradients(&loss, &vars, sink.as_deref()).expect("backward");
            for ((key, _), got) in trainables.iter().zip(grads) {
                let got = got.unwrap_or_else(|| panic!("{variant} (checkpointed: {checkpointed}): no gradient for {key}"));
                let want = match key.strip_suffix(']').and_then(|k| k.rsplit_once('[')) {
                    Some((base, e)) => golden[&format!("grad.{base}")].get(e.parse().expect("expert")).expect("slice"),
                    None => golden[&format!("grad.{key}")].clone(),
                };
                let want = &want;
                let scale = want.abs().and_then(|t| t.max_all()).and_then(|t| t.to_scalar::<f32>()).expect("max");
                let diff = lmx::core::gradcheck::max_abs_diff(&got, want).expect("diff");
                // f32 against a float64 reference: relative to the tensor's largest gradient.
                assert!(diff <= 2e-4 * scale + 1e-7, "{variant} (checkpointed: {checkpointed}): gradient of {key} differs by {diff} (largest {scale})");
            }
        }
    }
}

/// A run that diverges stops with an error, and the model is in evaluation mode afterwards:
/// its forwards use the caller's KV cache again (no checkpointing, no dropout).
#[test]
fn a_failed_run_leaves_the_model_in_evaluation_mode() {
    use lmx_tune::optim::{OptimizerKind, Schedule};
    use lmx_tune::trainer::{train, TrainArgs};
    let model_dir = fixtures().join("llama");
    let config = lmx_io::config::read_json(&model_dir.join("config.json")).expect("config");
    let params = lmx_io::LoraParameters { rank: 4, scale: 10.0, dropout: 0.1, keys: None };
    let plan = AdapterPlan::new(lmx_io::FineTuneType::Lora, -1, 2, params, 0).expect("plan");
    let training = Arc::new(Training::new());
    let weights = Weights::from_safetensors(&[model_dir.join("model.safetensors")]).expect("weights");
    let vb = Builder::new(weights, DType::F32, &Device::Cpu).with_adapters(Arc::new(plan)).with_training(training.clone());
    let model = lmx_models::load_model("llama", &config, &vb).expect("model");
    let data: Vec<(Vec<u32>, usize)> = (0..4).map(|i| ((0..12).map(|t| (t * 7 + i) % 160).collect(), 0)).collect();
    let dir = std::env::temp_dir().join(format!("lmx-diverge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let args = TrainArgs {
        batch_size: 2,
        iters: 4,
        val_batches: Some(1),
        steps_per_report: 10,
        steps_per_eval: 100,
        save_every: 0,
        max_seq_length: 64,
        grad_accumulation_steps: 1,
        seed: 0,
        schedule: Schedule::constant(1e30),
        optimizer: OptimizerKind::Sgd { momentum: 0.0, weight_decay: 0.0, dampening: 0.0, nesterov: false },
        adapter_dir: dir.clone(),
        grad_checkpoint: true,
        config: None,
        data_parallel: None,
    };
    let err = train(&*model, &training, &data, None, &args, &mut |_| {}).expect_err("diverges");
    assert!(err.to_string().contains("not finite"), "{err}");
    // Whatever was saved is finite: non-finite adapters are never written.
    let saved = dir.join("adapters.safetensors");
    if saved.exists() {
        for (k, t) in candle_core::safetensors::load(&saved, &Device::Cpu).expect("load") {
            assert!(lmx::core::ops::all_finite(&t).expect("check"), "{k} was saved with NaN or infinite values");
        }
    }
    assert!(!training.is_active(), "training mode must end with the run");
    let mut cache = model.new_cache();
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).expect("ids");
    model.forward(&ids, &mut cache, lmx::Logits::Last).expect("forward");
    assert_eq!(cache.offset(), 3, "the cache holds the prompt");
    std::fs::remove_dir_all(&dir).ok();
}
