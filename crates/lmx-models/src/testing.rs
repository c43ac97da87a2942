//! The checks every architecture in the registry passes, against the golden fixture that
//! `scripts/fixtures/tiny_models.py` wrote with transformers: a tiny random model, a batch of
//! two sequences, and transformers' logits for them. The tiny models have 4 query and 2
//! key/value heads, so a world of 3 splits them unevenly (2 + 1 + 1 query heads, the last two
//! ranks sharing a key/value head).

use std::path::PathBuf;
use std::sync::Arc;

use lmx_core::{DType, Device, Tensor};
use lmx_dist::{Group, InProcess};
use lmx_io::Weights;
use lmx_nn::Builder;

use crate::registry::{is_ignored_key, ARCHITECTURES};
use crate::{load_model, CausalLm, Logits};

fn fixture_dir(model_type: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(model_type)
}

/// How a world splits the model.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Split {
    Tensor,
    Pipeline,
    /// Tensor parallel, with mixture-of-experts blocks split by whole experts.
    Expert,
}

/// The fixture model, built in `dtype` as one rank of `group` (None: unsharded).
fn load(model_type: &str, dtype: DType, group: Option<Arc<dyn Group>>) -> Box<dyn CausalLm> {
    load_split(model_type, dtype, group, Split::Tensor)
}

fn load_split(model_type: &str, dtype: DType, group: Option<Arc<dyn Group>>, split: Split) -> Box<dyn CausalLm> {
    let dir = fixture_dir(model_type);
    let config = lmx_io::config::read_json(&dir.join("config.json")).expect("fixture config.json");
    let weights = Weights::from_safetensors(&[dir.join("model.safetensors")]).expect("fixture weights");
    let mut vb = Builder::new(weights, dtype, &Device::Cpu);
    match (group, split) {
        (Some(g), Split::Tensor) => vb = vb.with_group(g),
        (Some(g), Split::Pipeline) => vb = vb.with_pipeline(g),
        (Some(g), Split::Expert) => vb = vb.with_group(g).with_expert_parallel(),
        (None, _) => {}
    }
    let model = load_model(model_type, &config, &vb).expect("model builds");
    vb.finish(is_ignored_key).expect("every checkpoint key is used");
    model
}

/// Largest |a - b| and the flat index where it occurs.
fn max_diff(a: &Tensor, b: &Tensor) -> (f32, usize) {
    let a = a.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("a");
    let b = b.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("b");
    assert_eq!(a.len(), b.len(), "logit counts differ");
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).enumerate().fold((0.0, 0), |m, (i, d)| if d > m.0 { (d, i) } else { m })
}

struct Golden {
    input_ids: Tensor,
    logits: Tensor,
    scale: f32,
}

fn golden(model_type: &str) -> Golden {
    golden_at(&fixture_dir(model_type).join("golden.safetensors"))
}

fn golden_at(path: &std::path::Path) -> Golden {
    let golden = candle_core::safetensors::load(path, &Device::Cpu).expect("golden");
    let logits = golden["logits"].clone();
    let scale = logits.abs().and_then(|t| t.flatten_all()).and_then(|t| t.max(0)).and_then(|t| t.to_scalar::<f32>()).expect("scale");
    Golden { input_ids: golden["input_ids"].to_dtype(DType::U32).expect("ids"), logits, scale }
}

/// Golden logits (f32 within 1e-4 of the logit scale, bf16 within 3e-2), and cached
/// token-by-token decoding equal to the full forward pass.
fn check_architecture(model_type: &str) {
    let Golden { input_ids, logits: want, scale } = golden(model_type);
    let (_, seq_len) = input_ids.dims2().expect("2-D ids");

    let model = load(model_type, DType::F32, None);
    let got = model.forward(&input_ids, &mut model.new_cache(), Logits::All).expect("forward");
    let (d, at) = max_diff(&got, &want);
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

    // The same decoding with each step's position read from a tensor (as a recorded CUDA
    // graph step does): equal to the full forward, or refused with an error (a layer that
    // needs the position on the host), never different numbers.
    match decode_at_device_positions(model.as_ref(), &input_ids, 4) {
        Ok(steps) => {
            let (d, at) = max_diff(&Tensor::cat(&steps, 1).expect("cat"), &got.narrow(0, 0, 1).and_then(|t| t.narrow(1, 4, seq_len - 4)).expect("n"));
            println!("{model_type} decode at device positions vs full forward: {d:.3e} at {at}");
            assert!(d <= 1e-4 * scale, "{model_type}: decoding at device positions differs from the full forward by {d} at {at}");
        }
        Err(e) => {
            println!("{model_type} decode at device positions refused: {e}");
            assert!(matches!(model_type, "deepseek_v3"), "{model_type} should decode at device positions: {e}");
        }
    }

    // The two sequences at different positions decode as one batch: row 0 prefilled with 3
    // tokens, row 1 with 5, each alone; then one token per row per step, each at its own
    // position, equal to the full forward.
    let starts = [3, 5];
    let caches = starts
        .iter()
        .enumerate()
        .map(|(r, &n)| {
            let mut c = model.new_cache();
            model.forward(&input_ids.narrow(0, r, 1).and_then(|t| t.narrow(1, 0, n)).expect("n"), &mut c, Logits::Last).expect("prefill");
            c
        })
        .collect();
    let mut batch = lmx_nn::KvCache::batch(caches);
    for step in 0..seq_len - starts[1] {
        let ids: Vec<u32> = starts.iter().enumerate().map(|(r, &s)| input_ids.get(r).and_then(|row| row.get(s + step)).and_then(|t| t.to_scalar::<u32>()).expect("id")).collect();
        let ids = Tensor::new(ids.as_slice(), &Device::Cpu).and_then(|t| t.unsqueeze(1)).expect("ids");
        let out = model.forward(&ids, &mut batch, Logits::Last).expect("batched decode");
        for (r, &s) in starts.iter().enumerate() {
            let want = got.get(r).and_then(|t| t.narrow(0, s + step, 1)).expect("row");
            let (d, at) = max_diff(&out.get(r).expect("row"), &want);
            assert!(d <= 1e-4 * scale, "{model_type}: batched decode row {r} step {step} differs from the full forward by {d} at {at}");
        }
    }

    let model = load(model_type, DType::BF16, None);
    let got = model.forward(&input_ids, &mut model.new_cache(), Logits::All).expect("bf16 forward");
    let (d, at) = max_diff(&got, &want);
    println!("{model_type} bf16: max |logit diff| {d:.3e} at {at}");
    assert!(d <= 3e-2 * scale, "{model_type} bf16 logits differ from transformers by {d} at {at}");
}

/// Row 0 of `input_ids` prefilled with `n` tokens, then decoded one token at a time with the
/// position of each read from a u32 tensor ([`lmx_nn::KvCache::set_device_position`]); each
/// step's logits.
fn decode_at_device_positions(model: &dyn CausalLm, input_ids: &Tensor, n: usize) -> lmx_core::Result<Vec<Tensor>> {
    let row = input_ids.narrow(0, 0, 1)?;
    let mut cache = model.new_cache();
    model.forward(&row.narrow(1, 0, n)?, &mut cache, Logits::Last)?;
    let mut steps = Vec::new();
    for i in n..row.dim(1)? {
        if cache.reserve(1)?.is_none() {
            lmx_core::bail!("the cache cannot take device positions");
        }
        cache.set_device_position(Some(Tensor::new(&[i as u32], &Device::Cpu)?));
        let out = model.forward(&row.narrow(1, i, 1)?, &mut cache, Logits::Last);
        cache.set_device_position(None);
        steps.push(out?);
    }
    Ok(steps)
}

/// Every rank of an in-process world of `size` builds its shard of the model (a share of
/// every layer, or a range of layers) and runs the batch (whole, then prefill + cached
/// decode); each rank's logits equal the unsharded ones within 1e-5 of the logit scale.
fn check_sharded(model_type: &str, size: usize, split: Split) {
    let Golden { input_ids, scale, .. } = golden(model_type);
    let whole = load(model_type, DType::F32, None);
    let want = whole.forward(&input_ids, &mut whole.new_cache(), Logits::All).expect("forward");
    let results: Vec<(Tensor, Tensor, Tensor)> = std::thread::scope(|s| {
        let handles: Vec<_> = InProcess::world(size)
            .into_iter()
            .map(|g| {
                let ids = input_ids.clone();
                s.spawn(move || {
                    // A failing rank aborts the group, so the others fail too instead of hanging.
                    let guard = AbortOnPanic(g.clone());
                    let model = load_split(model_type, DType::F32, Some(Arc::new(g)), split);
                    let full = model.forward(&ids, &mut model.new_cache(), Logits::All).expect("sharded forward");
                    let mut cache = model.new_cache();
                    let mut parts = vec![model.forward(&ids.narrow(1, 0, 6).expect("n"), &mut cache, Logits::All).expect("prefill")];
                    for i in 6..ids.dim(1).expect("len") {
                        parts.push(model.forward(&ids.narrow(1, i, 1).expect("n"), &mut cache, Logits::Last).expect("decode"));
                    }
                    // One cache per sequence (a pipeline cuts such a batch by sequence).
                    let mut rows = lmx_nn::KvCache::batch(vec![model.new_cache(), model.new_cache()]);
                    let per_row = model.forward(&ids, &mut rows, Logits::All).expect("forward with a cache per sequence");
                    std::mem::forget(guard);
                    (full, Tensor::cat(&parts, 1).expect("cat"), per_row)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    });
    for (rank, (full, cached, per_row)) in results.iter().enumerate() {
        for (what, got) in [("forward", full), ("cached decode", cached), ("forward with a cache per sequence", per_row)] {
            let (d, at) = max_diff(got, &want);
            println!("{model_type} {split:?} world {size} rank {rank} {what}: max |logit diff| {d:.3e} at {at}");
            assert!(d <= 1e-5 * scale, "{model_type}: rank {rank} of {size} ({split:?}): sharded {what} differs from the unsharded model by {d} at {at}");
        }
    }
}

/// Aborts the group when dropped, i.e. when its rank's thread unwinds from a panic.
struct AbortOnPanic(InProcess);

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[test]
fn every_architecture_matches_its_golden_fixture() {
    for a in ARCHITECTURES {
        check_architecture(a.model_type);
    }
}

#[test]
fn every_architecture_sharded_over_two_and_three_ranks_equals_the_whole_model() {
    for a in ARCHITECTURES {
        for size in [2, 3] {
            check_sharded(a.model_type, size, Split::Tensor);
        }
    }
}

/// The mixture-of-experts fixtures with their experts split whole over 2 and 3 ranks (expert
/// parallelism: 8 or 4 experts, so 3 ranks hold unequal shares; attention tensor-parallel)
/// equal the whole model, in prefill, cached decode and per-sequence caches.
#[test]
fn moe_models_expert_parallel_over_two_and_three_ranks_equal_the_whole_model() {
    for model_type in ["qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"] {
        for size in [2, 3] {
            check_sharded(model_type, size, Split::Expert);
        }
    }
}

/// Pipeline stages (a contiguous range of layers each) over 2 ranks, and over 3 where the
/// fixture has 3 layers or more; a pipeline longer than the model is a clear error.
#[test]
fn every_architecture_as_a_pipeline_equals_the_whole_model() {
    for a in ARCHITECTURES {
        let config = lmx_io::config::read_json(&fixture_dir(a.model_type).join("config.json")).expect("config");
        let layers = config.get("num_hidden_layers").and_then(|v| v.as_u64()).expect("num_hidden_layers") as usize;
        for size in [2, 3].into_iter().filter(|&s| s <= layers) {
            check_sharded(a.model_type, size, Split::Pipeline);
        }
    }
    let dir = fixture_dir("llama");
    let config = lmx_io::config::read_json(&dir.join("config.json")).expect("config");
    let vb = Builder::new(Weights::from_safetensors(&[dir.join("model.safetensors")]).expect("w"), DType::F32, &Device::Cpu).with_pipeline(Arc::new(InProcess::world(3).remove(2)));
    let err = load_model("llama", &config, &vb).err().expect("3 stages of 2 layers").to_string();
    assert!(err.contains("more stages than the model's 2 layers"), "{err}");
}

/// The llama fixture quantized to 4 bits (groups of 32) in memory: sharded over 2 ranks it
/// equals the whole quantized model (within the int8 activations' rounding) (o_proj and down_proj are split on group boundaries);
/// over 3 ranks o_proj's split (2 + 1 + 1 heads of 16 columns) would cut a group, which is a
/// clear error naming the layer.
/// The llama fixture with every matrix quantized to `bits` in groups of 32, as MLX stores it:
/// (config, tensors).
fn quantized_llama(bits: usize) -> (serde_json::Value, std::collections::HashMap<String, Tensor>) {
    use lmx_core::quant::QuantizedMatrix;
    let dir = fixture_dir("llama");
    let mut config = lmx_io::config::read_json(&dir.join("config.json")).expect("config");
    config["quantization"] = serde_json::json!({"group_size": 32, "bits": bits});
    let whole = Weights::from_safetensors(&[dir.join("model.safetensors")]).expect("weights");
    let mut tensors = std::collections::HashMap::new();
    for key in whole.keys() {
        let t = whole.tensor(&key).expect("tensor");
        match key.strip_suffix(".weight").filter(|_| t.rank() == 2) {
            Some(module) => {
                let (p, s, b) = QuantizedMatrix::quantize(&t, bits, 32).and_then(|q| q.to_tensors()).expect("quantize");
                tensors.insert(key.clone(), p);
                tensors.insert(format!("{module}.scales"), s);
                tensors.insert(format!("{module}.biases"), b);
            }
            None => {
                tensors.insert(key.clone(), t);
            }
        }
    }
    (config, tensors)
}

/// A decode token through the layers on plain buffers (`lmx_core::cpu_step`) gives the
/// logits of the layers op by op, bit for bit, over 300 positions (a cache buffer grows at
/// 256): the dense fixtures it takes (llama; qwen2's biases; qwen3's q/k norms and heads of 24;
/// mistral while its window of 4 holds the cache, op by op after) in f32 and bf16, and llama
/// quantized to 4 and 8 bits (int8 products where the rows fit them, float ones where they do
/// not: the MLP's 96 columns at 4 bits) in f32, bf16 and f16.
#[test]
fn the_cpu_decode_step_equals_the_layers_op_by_op() {
    let dense = ["llama", "qwen2", "qwen3", "mistral"].map(|m| (m, None));
    for (model_type, bits) in dense.into_iter().chain([("llama", Some(4)), ("llama", Some(8))]) {
        let config = lmx_io::config::read_json(&fixture_dir(model_type).join("config.json")).expect("config");
        let vocab = config["vocab_size"].as_u64().expect("vocab") as u32;
        let window = config["sliding_window"].as_u64().map(|w| w as usize);
        let Golden { input_ids, .. } = golden(model_type);
        let prompt: Vec<u32> = input_ids.get(0).and_then(|r| r.to_vec1()).expect("row");
        let ids: Vec<u32> = prompt.iter().copied().chain((0..300u32).map(|i| (i * 37 + 11) % vocab)).collect();
        let row = Tensor::new(ids.as_slice(), &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids");
        let prefill = 2;
        let expected = (prefill..ids.len()).filter(|&pos| window.is_none_or(|w| pos < w)).count();
        let dtypes = if bits.is_some() { &[DType::F32, DType::BF16, DType::F16][..] } else { &[DType::F32, DType::BF16][..] };
        for &dtype in dtypes {
            let model = match bits {
                None => load(model_type, dtype, None),
                Some(bits) => {
                    let (config, tensors) = quantized_llama(bits);
                    let q = lmx_io::QuantConfig::from_config(&config).expect("block");
                    let vb = Builder::new(Weights::from_tensors(tensors, "quantized"), dtype, &Device::Cpu).with_quantization(q);
                    load_model("llama", &config, &vb).expect("quantized model")
                }
            };
            let decode = |on: bool| {
                lmx_core::cpu_step::set_enabled(on);
                let taken = lmx_core::cpu_step::steps_taken();
                let mut cache = model.new_cache();
                let mut parts = vec![model.forward(&row.narrow(1, 0, prefill).expect("n"), &mut cache, Logits::Last).expect("prefill")];
                for i in prefill..ids.len() {
                    parts.push(model.forward(&row.narrow(1, i, 1).expect("n"), &mut cache, Logits::Last).expect("decode"));
                }
                (Tensor::cat(&parts, 1).expect("cat").to_dtype(DType::F32).expect("f32"), lmx_core::cpu_step::steps_taken() - taken)
            };
            let ((plain, steps), (op_by_op, none)) = (decode(true), decode(false));
            lmx_core::cpu_step::set_enabled(true);
            let what = format!("{model_type} {bits:?} bits {dtype:?}");
            assert_eq!((steps, none), (expected, 0), "{what}: decode steps on plain buffers");
            let (d, at) = max_diff(&plain, &op_by_op);
            assert_eq!(d, 0.0, "{what}: the decode step on plain buffers differs from the layers op by op at {at}");
        }
    }
}

#[test]
fn a_quantized_model_shards_on_group_boundaries() {
    let (config, tensors) = quantized_llama(4);
    let q = lmx_io::QuantConfig::from_config(&config).expect("block");
    let build = |group: Option<Arc<dyn Group>>| {
        let mut vb = Builder::new(Weights::from_tensors(tensors.clone(), "quantized"), DType::F32, &Device::Cpu).with_quantization(q.clone());
        if let Some(g) = group {
            vb = vb.with_group(g);
        }
        load_model("llama", &config, &vb)
    };
    let Golden { input_ids, scale, .. } = golden("llama");
    let model = build(None).expect("whole");
    let want = model.forward(&input_ids, &mut model.new_cache(), Logits::All).expect("forward");
    let results: Vec<Tensor> = std::thread::scope(|s| {
        let handles: Vec<_> = InProcess::world(2)
            .into_iter()
            .map(|g| {
                let (ids, build) = (input_ids.clone(), &build);
                s.spawn(move || {
                    let guard = AbortOnPanic(g.clone());
                    let model = build(Some(Arc::new(g))).expect("sharded quantized model");
                    let out = model.forward(&ids, &mut model.new_cache(), Logits::All).expect("forward");
                    std::mem::forget(guard);
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank")).collect()
    });
    for (rank, got) in results.iter().enumerate() {
        let (d, at) = max_diff(got, &want);
        println!("quantized llama world 2 rank {rank}: max |logit diff| {d:.3e} at {at}");
        // The whole model's o_proj (64 columns) takes the int8 product on two-level
        // activations (within max|x| / 64516 per group), a shard's 32 columns the float one.
        assert!(d <= 1e-3 * scale, "rank {rank}: sharded quantized logits differ by {d} (logit scale {scale})");
    }
    let g = InProcess::world(3).remove(1);
    let err = build(Some(Arc::new(g))).err().expect("a cut group is an error").to_string();
    assert!(err.contains("o_proj") && err.contains("group"), "{err}");
}

/// Mistral's fixture has a sliding window of 4 over 11 tokens: dropping the window must change
/// the later logits (so the golden test above really checks the window).
#[test]
fn the_mistral_fixture_exercises_its_sliding_window() {
    let dir = fixture_dir("mistral");
    let mut config = lmx_io::config::read_json(&dir.join("config.json")).expect("config");
    assert_eq!(config["sliding_window"], 4);
    config["sliding_window"] = serde_json::Value::Null;
    let weights = Weights::from_safetensors(&[dir.join("model.safetensors")]).expect("weights");
    let model = load_model("mistral", &config, &Builder::new(weights, DType::F32, &Device::Cpu)).expect("builds");
    let Golden { input_ids, logits, scale } = golden("mistral");
    let got = model.forward(&input_ids, &mut model.new_cache(), Logits::All).expect("forward");
    let (d, _) = max_diff(&got.narrow(1, 0, 4).expect("n"), &logits.narrow(1, 0, 4).expect("n"));
    assert!(d <= 1e-4 * scale, "positions inside the window do not depend on it");
    let (d, _) = max_diff(&got, &logits);
    assert!(d > 0.1 * scale, "without the window the logits must differ from transformers' (max diff {d})");
}

/// The model in fixture folder `folder` (config.json and model.safetensors, quantized where
/// its config says), in f32 on the CPU; every checkpoint key must be used.
fn folder_model(model_type: &str, folder: &std::path::Path) -> Box<dyn CausalLm> {
    let config = lmx_io::config::read_json(&folder.join("config.json")).expect("config");
    let weights = Weights::from_safetensors(&[folder.join("model.safetensors")]).expect("weights");
    let vb = Builder::new(weights, DType::F32, &Device::Cpu).with_quantization(lmx_io::QuantConfig::from_config(&config).expect("quantization block"));
    let model = load_model(model_type, &config, &vb).expect("model builds");
    vb.finish(is_ignored_key).expect("every checkpoint key is used");
    model
}

/// Asserts lmx's logits `got` are within 1e-3 of MLX LM's `want` largest logit; returns that
/// scale.
fn assert_near_mlx(got: &Tensor, want: &Tensor, what: &str) -> f32 {
    let scale = want.abs().and_then(|t| t.max_all()).and_then(|t| t.to_scalar::<f32>()).expect("scale");
    let (d, at) = max_diff(got, want);
    println!("{what}: max |logit diff| vs MLX LM {d:.3e} at {at} (scale {scale:.3})");
    assert!(d <= 1e-3 * scale, "{what}: lmx and MLX LM differ by {d} at {at}");
    scale
}

/// The mixture-of-experts fixtures as `mlx_lm.convert` writes them
/// (`scripts/fixtures/mlx_moe.py`): the experts stacked into `switch_mlp` by MLX LM's sanitize,
/// in float32 and in 4-bit (groups of 32; Qwen3-MoE's router in 8 bits, MLX's per-module
/// override). lmx reads them and gives MLX LM's logits: the float folders also transformers'
/// (the same weights), the 4-bit ones within 1e-3 of the logit scale (the same packed weights;
/// only summation order and lmx's int8 activations differ). gpt-oss's MLX folders say YaRN
/// `truncate: true` (MLX LM always rounds), so they compute other rotations than transformers'
/// fixture and are checked against MLX LM alone.
#[test]
fn moe_models_as_mlx_lm_converts_them_match_mlx_lm() {
    for model_type in ["qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"] {
        let dir = fixture_dir(&format!("{model_type}_mlx"));
        let mlx = lmx_io::Weights::from_safetensors(&[dir.join("logits.safetensors")]).expect("mlx logits");
        let ids = mlx.tensor("input_ids").expect("ids").to_dtype(DType::U32).expect("u32 ids");
        let Golden { logits: transformers, .. } = golden(model_type);
        for (name, vs_transformers) in [("f32", true), ("q4", false)] {
            let model = folder_model(model_type, &dir.join(name));
            let got = model.forward(&ids, &mut model.new_cache(), Logits::All).expect("forward");
            let scale = assert_near_mlx(&got, &mlx.tensor(name).expect("mlx logits"), &format!("{model_type} MLX {name}"));
            if vs_transformers && model_type != "gpt_oss" {
                let (d, at) = max_diff(&got, &transformers);
                assert!(d <= 1e-4 * scale, "{model_type} MLX {name}: lmx and transformers differ by {d} at {at}");
            }
        }
    }
}

/// gpt-oss with MXFP4 experts (`scripts/fixtures/mxfp4.py`): MLX's layout as `mlx_lm.convert
/// --q-mode mxfp4` writes it (E8M0 scales, no biases; the other layers 8-bit affine through
/// per-module entries) and OpenAI's (`experts.gate_up_proj_blocks` / `_scales`, gate and up
/// rows alternating, `quant_method: mxfp4`). lmx gives MLX LM's logits for both within 1e-3 of
/// the logit scale (the weights exact; summation order and lmx's int8 activations differ).
#[test]
fn mxfp4_gpt_oss_matches_mlx_lm() {
    let dir = fixture_dir("gpt_oss_mxfp4");
    let mlx = lmx_io::Weights::from_safetensors(&[dir.join("logits.safetensors")]).expect("mlx logits");
    let ids = mlx.tensor("input_ids").expect("ids").to_dtype(DType::U32).expect("u32 ids");
    for name in ["mlx", "hf"] {
        let model = folder_model("gpt_oss", &dir.join(name));
        let got = model.forward(&ids, &mut model.new_cache(), Logits::All).expect("forward");
        assert_near_mlx(&got, &mlx.tensor(name).expect("mlx logits"), &format!("gpt_oss MXFP4 ({name} layout)"));
    }
}

/// A Hugging Face fixture written as llama.cpp's converter writes a GGUF (float32): llama.cpp's
/// names, experts stacked (`ffn_{gate,up,down}_exps`), the Llama family's q/k rows permuted,
/// `{arch}.expert_*` metadata, a tokenizer of placeholder tokens.
fn fixture_as_gguf(model_type: &str, arch: &str) -> PathBuf {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use std::collections::BTreeMap;
    let dir = fixture_dir(model_type);
    let config = lmx_io::config::read_json(&dir.join("config.json")).expect("config");
    let weights = Weights::from_safetensors(&[dir.join("model.safetensors")]).expect("weights");
    let n = |k: &str| config.get(k).and_then(|v| v.as_u64()).map(|v| v as u32);
    let (heads, kv_heads) = (n("num_attention_heads").expect("heads"), n("num_key_value_heads").expect("kv heads"));
    // llama.cpp's permutation of the Llama family's q/k rows (rotary pairs interleaved).
    let permute = |t: &Tensor, h: u32| {
        let (rows, cols) = t.dims2().expect("2-D");
        let h = h as usize;
        t.reshape((h, 2, rows / h / 2, cols)).and_then(|t| t.transpose(1, 2)).and_then(|t| t.contiguous()).and_then(|t| t.reshape((rows, cols))).expect("permute")
    };
    let names = [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("mlp.gate", "ffn_gate_inp"),
        ("block_sparse_moe.gate", "ffn_gate_inp"),
        ("mlp.shared_expert.gate_proj", "ffn_gate_shexp"),
        ("mlp.shared_expert.up_proj", "ffn_up_shexp"),
        ("mlp.shared_expert.down_proj", "ffn_down_shexp"),
        ("mlp.shared_expert_gate", "ffn_gate_inp_shexp"),
    ];
    let experts = [("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps"), ("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")];
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let mut stacks: BTreeMap<String, BTreeMap<usize, Tensor>> = BTreeMap::new();
    for key in weights.keys() {
        let t = weights.tensor(&key).expect("tensor");
        let fixed = match key.as_str() {
            "model.embed_tokens.weight" => Some("token_embd.weight".to_string()),
            "model.norm.weight" => Some("output_norm.weight".to_string()),
            "lm_head.weight" => Some("output.weight".to_string()),
            _ => None,
        };
        if let Some(name) = fixed {
            out.push((name, t));
            continue;
        }
        let rest = key.strip_prefix("model.layers.").expect("a layer key");
        let (layer, rest) = rest.split_once('.').expect("layer index");
        let (module, kind) = rest.rsplit_once('.').expect("kind");
        if let Some((_, e_proj)) = module.split_once(".experts.") {
            let (e, proj) = e_proj.split_once('.').expect("expert index");
            let gguf = experts.iter().find(|(h, _)| *h == proj).expect("an expert projection").1;
            stacks.entry(format!("blk.{layer}.{gguf}.{kind}")).or_default().insert(e.parse().expect("expert"), t);
            continue;
        }
        let gguf = names.iter().find(|(h, _)| *h == module).unwrap_or_else(|| panic!("no GGUF name for {key}")).1;
        let t = match (arch, gguf, kind) {
            ("llama", "attn_q", "weight") => permute(&t, heads),
            ("llama", "attn_k", "weight") => permute(&t, kv_heads),
            _ => t,
        };
        out.push((format!("blk.{layer}.{gguf}.{kind}"), t));
    }
    for (name, by_expert) in stacks {
        let parts: Vec<Tensor> = by_expert.into_values().collect();
        out.push((name, Tensor::stack(&parts, 0).expect("stack")));
    }
    let qtensors: Vec<(String, QTensor)> = out.iter().map(|(k, t)| (k.clone(), QTensor::quantize(t, GgmlDType::F32).expect("f32 tensor"))).collect();
    let s = |x: &str| gguf_file::Value::String(x.into());
    let u = gguf_file::Value::U32;
    let f = gguf_file::Value::F32;
    let vocab = n("vocab_size").expect("vocab");
    let mut metadata = vec![
        ("general.architecture".to_string(), s(arch)),
        (format!("{arch}.block_count"), u(n("num_hidden_layers").expect("layers"))),
        (format!("{arch}.context_length"), u(n("max_position_embeddings").expect("context"))),
        (format!("{arch}.embedding_length"), u(n("hidden_size").expect("hidden"))),
        (format!("{arch}.attention.head_count"), u(heads)),
        (format!("{arch}.attention.head_count_kv"), u(kv_heads)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), f(config["rms_norm_eps"].as_f64().expect("eps") as f32)),
        (format!("{arch}.rope.freq_base"), f(config["rope_parameters"]["rope_theta"].as_f64().expect("theta") as f32)),
        (format!("{arch}.expert_count"), u(n("num_experts").or(n("num_local_experts")).expect("experts"))),
        (format!("{arch}.expert_used_count"), u(n("num_experts_per_tok").expect("k"))),
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        ("tokenizer.ggml.tokens".to_string(), gguf_file::Value::Array((0..vocab).map(|i| s(&format!("t{i}"))).collect())),
        ("tokenizer.ggml.merges".to_string(), gguf_file::Value::Array(vec![])),
        ("tokenizer.ggml.eos_token_id".to_string(), u(0)),
    ];
    for (key, gguf) in [
        ("intermediate_size", "feed_forward_length"),
        ("moe_intermediate_size", "expert_feed_forward_length"),
        ("head_dim", "attention.key_length"),
        ("shared_expert_intermediate_size", "expert_shared_feed_forward_length"),
    ] {
        if let Some(v) = n(key) {
            metadata.push((format!("{arch}.{gguf}"), u(v)));
        }
    }
    if let Some(norm) = config.get("norm_topk_prob").and_then(|v| v.as_bool()) {
        metadata.push((format!("{arch}.expert_weights_norm"), gguf_file::Value::Bool(norm)));
    }
    let path = std::env::temp_dir().join(format!("lmx-{model_type}-{}.gguf", std::process::id()));
    let mut file = std::fs::File::create(&path).expect("create");
    let meta: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &meta, &tensors).expect("write gguf");
    path
}

/// The mixture-of-experts fixtures as GGUF files (llama.cpp's names and layout: Qwen3-MoE's
/// `qwen3moe` with a dense block where there is no router, Qwen2-MoE's shared expert,
/// Mixtral as `llama` with experts) load and give transformers' logits.
/// GGUF files written by llama.cpp's own converter (`scripts/fixtures/gguf_models.py`) from
/// tiny transformers models give transformers' logits: Gemma 2 and 3 (`1 + w` norms stored as
/// `w + 1`, the norm before the MLP named `ffn_norm`, llama.cpp's fixed query scale, window
/// pattern and local rotary base) and Phi-3 (fused q/k/v and gate/up, LongRoPE factors as
/// tensors).
#[test]
fn gemma_and_phi3_from_llama_cpp_gguf_match_transformers() {
    for (model_type, file) in [("gemma2", "gemma2"), ("gemma3_text", "gemma3_text"), ("phi3", "phi3")] {
        let dir = fixture_dir("gguf");
        let model = lmx_io::gguf::load(&dir.join(format!("{file}.gguf"))).unwrap_or_else(|e| panic!("{file}.gguf: {e}"));
        assert_eq!(model.config["model_type"], model_type);
        let vb = Builder::new(Weights::from_tensors(model.tensors, "gguf"), DType::F32, &Device::Cpu);
        let lm = load_model(model_type, &model.config, &vb).unwrap_or_else(|e| panic!("{model_type} from GGUF: {e}"));
        vb.finish(is_ignored_key).expect("every GGUF tensor is used");
        let g = golden_at(&dir.join(format!("{file}.golden.safetensors")));
        let got = lm.forward(&g.input_ids, &mut lm.new_cache(), Logits::All).expect("forward");
        let (d, at) = max_diff(&got, &g.logits);
        println!("{model_type} from llama.cpp's GGUF: max |logit diff| {d:.3e} at {at}");
        assert!(d <= 1e-4 * g.scale, "{model_type} from GGUF differs from transformers by {d} at {at}");
    }
}

#[test]
fn moe_models_from_gguf_match_their_golden_fixture() {
    for (model_type, arch) in [("qwen3_moe", "qwen3moe"), ("qwen2_moe", "qwen2moe"), ("mixtral", "llama")] {
        let path = fixture_as_gguf(model_type, arch);
        let model = lmx_io::gguf::load(&path).expect("lmx reads the GGUF");
        let _ = std::fs::remove_file(&path);
        assert_eq!(model.config["model_type"], model_type, "{arch}");
        let vb = Builder::new(Weights::from_tensors(model.tensors, "gguf"), DType::F32, &Device::Cpu);
        let lm = load_model(model_type, &model.config, &vb).unwrap_or_else(|e| panic!("{model_type} from GGUF: {e}"));
        vb.finish(is_ignored_key).expect("every GGUF tensor is used");
        let g = golden(model_type);
        let got = lm.forward(&g.input_ids, &mut lm.new_cache(), Logits::All).expect("forward");
        let (d, at) = max_diff(&got, &g.logits);
        println!("{model_type} from GGUF ({arch}): max |logit diff| {d:.3e} at {at}");
        assert!(d <= 1e-4 * g.scale, "{model_type} from GGUF differs from transformers by {d} at {at}");
    }
}

/// gpt-oss from a GGUF laid out as llama.cpp's converter writes it, its experts in GGML's
/// MXFP4 (type 39, which candle's reader cannot parse: lmx reads the header itself and keeps
/// those tensors packed). `scripts/fixtures/gguf_gpt_oss.py` builds it from the MXFP4 fixture's
/// weights (gguf-py's own MXFP4 dequantizer gives MLX's values for them); lmx gives MLX LM's
/// logits on the same weights (`gpt_oss_mxfp4/logits.safetensors` "hf") within 1e-3 of the scale.
#[test]
fn gpt_oss_from_mxfp4_gguf_matches_mlx_lm() {
    let model = lmx_io::gguf::load(&fixture_dir("gguf").join("gpt-oss.gguf")).expect("lmx reads the GGUF");
    assert_eq!(model.config["model_type"], "gpt_oss");
    assert_eq!(model.config["quantization"]["mode"], "mxfp4", "the experts stay packed");
    // The packed experts are MLX's bytes: what `mlx_lm.convert --q-mode mxfp4` wrote for them.
    let mlx_folder = Weights::from_safetensors(&[fixture_dir("gpt_oss_mxfp4").join("mlx/model.safetensors")]).expect("mlx folder");
    for layer in 0..2 {
        for part in ["gate_proj.weight", "gate_proj.scales", "up_proj.weight", "up_proj.scales", "down_proj.weight", "down_proj.scales"] {
            let key = format!("model.layers.{layer}.mlp.experts.{part}");
            let (ours, theirs) = (&model.tensors[&key], mlx_folder.tensor(&key).expect("mlx tensor"));
            assert_eq!((ours.dtype(), ours.dims()), (theirs.dtype(), theirs.dims()), "{key}");
            let bytes = |t: &Tensor| t.to_dtype(DType::U32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<u32>()).expect("values");
            assert!(bytes(ours) == bytes(&theirs), "{key}: differs from MLX's");
        }
    }
    let quantization = lmx_io::QuantConfig::from_config(&model.config).expect("quantization block");
    let vb = Builder::new(Weights::from_tensors(model.tensors, "gguf"), DType::F32, &Device::Cpu).with_quantization(quantization);
    let lm = load_model("gpt_oss", &model.config, &vb).expect("gpt-oss from GGUF builds");
    vb.finish(is_ignored_key).expect("every GGUF tensor is used");
    let mlx = lmx_io::Weights::from_safetensors(&[fixture_dir("gpt_oss_mxfp4").join("logits.safetensors")]).expect("mlx logits");
    let ids = mlx.tensor("input_ids").expect("ids").to_dtype(DType::U32).expect("u32 ids");
    let got = lm.forward(&ids, &mut lm.new_cache(), Logits::All).expect("forward");
    assert_near_mlx(&got, &mlx.tensor("hf").expect("mlx logits"), "gpt_oss from MXFP4 GGUF");
}
