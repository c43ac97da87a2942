//! GGUF files (llama.cpp): metadata turned into a Hugging Face `config.json`, tensors renamed
//! to Hugging Face keys (q/k rows un-permuted for the Llama family) and dequantized, and the
//! tokenizer and chat template rebuilt from the `tokenizer.ggml.*` metadata.
//!
//! The result is the same in-memory model folder a safetensors checkpoint gives, so model
//! files never see GGUF names, and `lmx convert --gguf` only has to write it out.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GValue};
use lmx_core::{Device, Tensor};
use serde_json::{json, Map, Value};

use crate::error::{IoError, Result};

/// A GGUF file rebuilt as the parts of a Hugging Face model folder.
pub struct GgufModel {
    /// `config.json`.
    pub config: Value,
    /// Tensors under Hugging Face names, dequantized to f32.
    pub tensors: HashMap<String, Tensor>,
    /// `tokenizer.json`.
    pub tokenizer: Value,
    /// `tokenizer_config.json` (special tokens, chat template).
    pub tokenizer_config: Value,
    /// `generation_config.json` (BOS/EOS ids).
    pub generation_config: Value,
}

/// Architectures whose GGUF conversion permutes the q/k projection rows.
const PERMUTED_QK: &[&str] = &["llama", "mistral"];

/// Per-block tensor names: GGUF suffix -> Hugging Face suffix under `model.layers.N.`.
const BLOCK_NAMES: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    // Mixture of experts: the router and the experts stacked (experts, out, in), which is
    // MLX's `switch_mlp` layout.
    ("ffn_gate_inp", "mlp.gate"),
    ("ffn_gate_exps", "mlp.switch_mlp.gate_proj"),
    ("ffn_up_exps", "mlp.switch_mlp.up_proj"),
    ("ffn_down_exps", "mlp.switch_mlp.down_proj"),
    // Qwen2-MoE's shared expert and its gate.
    ("ffn_gate_shexp", "mlp.shared_expert.gate_proj"),
    ("ffn_up_shexp", "mlp.shared_expert.up_proj"),
    ("ffn_down_shexp", "mlp.shared_expert.down_proj"),
    ("ffn_gate_inp_shexp", "mlp.shared_expert_gate"),
];

/// Per-block names that mean something else in some architectures: (architectures, GGUF
/// suffix, Hugging Face suffix). Gemma's `ffn_norm` is the norm before its MLP (its
/// `post_attention_layernorm` normalizes the attention's output); Phi-3 keeps q/k/v and
/// gate/up fused.
const ARCH_BLOCK_NAMES: &[(&[&str], &str, &str)] = &[
    (&["gemma2", "gemma3"], "ffn_norm", "pre_feedforward_layernorm"),
    (&["gemma2", "gemma3"], "post_attention_norm", "post_attention_layernorm"),
    (&["gemma2", "gemma3"], "post_ffw_norm", "post_feedforward_layernorm"),
    (&["phi3"], "attn_qkv", "self_attn.qkv_proj"),
    (&["phi3"], "ffn_up", "mlp.gate_up_proj"),
];

/// Architectures whose norms multiply by `1 + w`, which llama.cpp's converter stores as `w + 1`.
const ONE_PLUS_NORMS: &[&str] = &["gemma2", "gemma3"];

/// The `model_type` of a GGUF `general.architecture` (the same name unless listed), given
/// whether its blocks hold experts: llama.cpp writes Mixtral as `llama` with experts.
fn model_type(arch: &str, experts: bool) -> &str {
    match (arch, experts) {
        ("gemma3", _) => "gemma3_text",
        ("qwen3moe", _) => "qwen3_moe",
        ("qwen2moe", _) => "qwen2_moe",
        ("llama", true) => "mixtral",
        (a, _) => a,
    }
}

/// The Hugging Face key of a GGUF tensor name in architecture `arch`, or None for names lmx
/// does not map.
pub fn hf_name_in(arch: &str, gguf_name: &str) -> Option<String> {
    let own = gguf_name.strip_prefix("blk.").and_then(|rest| {
        let (layer, rest) = rest.split_once('.')?;
        let (base, kind) = rest.rsplit_once('.')?;
        let hf = ARCH_BLOCK_NAMES.iter().find(|(archs, g, _)| archs.contains(&arch) && *g == base)?.2;
        Some(format!("model.layers.{layer}.{hf}.{kind}"))
    });
    own.or_else(|| hf_name(gguf_name))
}

/// The Hugging Face key of a GGUF tensor name (names every architecture shares), or None for
/// names lmx does not map.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, kind) = rest.rsplit_once('.')?;
    let hf = BLOCK_NAMES.iter().find(|(g, _)| *g == base)?.1;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes llama.cpp's q/k permutation: GGUF rows are `hf.reshape(n, 2, r, ..).swapaxes(1, 2)`.
fn unpermute(t: &Tensor, n_heads: usize) -> lmx_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if n_heads == 0 || rows % (2 * n_heads) != 0 {
        lmx_core::bail!("{rows} rows do not split into {n_heads} heads of rotary pairs");
    }
    let half = rows / n_heads / 2;
    let rest: usize = dims[1..].iter().product();
    t.reshape((n_heads, half, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)
}

fn gguf_err(path: &Path, msg: impl std::fmt::Display) -> IoError {
    IoError::Gguf { path: path.to_path_buf(), msg: msg.to_string() }
}

/// The value of `general.alignment` in a GGUF header (None when absent or not an integer),
/// read by walking the key/value section without keeping any of it.
fn scan_alignment(r: &mut impl Read) -> std::io::Result<Option<u64>> {
    fn bad(msg: &str) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
    }
    fn u32_(r: &mut impl Read) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64_(r: &mut impl Read) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn skip(r: &mut impl Read, n: u64) -> std::io::Result<()> {
        if std::io::copy(&mut r.take(n), &mut std::io::sink())? != n {
            return Err(bad("the file ends inside its header"));
        }
        Ok(())
    }
    /// Skips (or reads, for integers) one value of GGUF type `t`.
    fn value(r: &mut impl Read, t: u32, depth: u32) -> std::io::Result<Option<u64>> {
        Ok(match t {
            0 | 1 | 7 => Some(read_n(r, 1)?),
            2 | 3 => Some(read_n(r, 2)?),
            4 | 5 => Some(read_n(r, 4)?),
            10 | 11 => Some(read_n(r, 8)?),
            6 => skip(r, 4).map(|_| None)?,
            12 => skip(r, 8).map(|_| None)?,
            8 => {
                let n = u64_(r)?;
                skip(r, n).map(|_| None)?
            }
            9 if depth == 0 => {
                let (et, n) = (u32_(r)?, u64_(r)?);
                for _ in 0..n {
                    value(r, et, depth + 1)?;
                }
                None
            }
            other => return Err(bad(&format!("unknown value type {other}"))),
        })
    }
    fn read_n(r: &mut impl Read, n: usize) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b[..n])?;
        Ok(u64::from_le_bytes(b))
    }
    if u32_(r)? != 0x4655_4747 {
        return Err(bad("no GGUF magic"));
    }
    if u32_(r)? < 2 {
        return Ok(None); // GGUF v1 has 32-bit lengths and no alignment key in practice.
    }
    let (_tensors, kvs) = (u64_(r)?, u64_(r)?);
    for _ in 0..kvs {
        let len = u64_(r)?;
        if len > 1 << 16 {
            return Err(bad("a key longer than 64 KiB"));
        }
        let mut key = vec![0u8; len as usize];
        r.read_exact(&mut key)?;
        let t = u32_(r)?;
        let v = value(r, t, 0)?;
        if key == b"general.alignment" {
            return Ok(v);
        }
    }
    Ok(None)
}

/// Reads and converts a GGUF file.
pub fn load(path: &Path) -> Result<GgufModel> {
    let file = File::open(path).map_err(|e| IoError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| IoError::io(path, e))?.len();
    load_from(BufReader::new(file), file_len, path)
}

/// Reads and converts GGUF bytes of length `file_len` from `reader` (`path` names them in
/// errors).
pub fn load_from(mut reader: impl Read + Seek, file_len: u64, path: &Path) -> Result<GgufModel> {
    // candle's reader divides by `general.alignment`: a 0 there must stop us first.
    if scan_alignment(&mut reader).map_err(|e| gguf_err(path, format!("not a valid GGUF file ({e}); the file may be truncated: download it again")))? == Some(0) {
        return Err(gguf_err(path, "`general.alignment` is 0; it must be a positive power of two (llama.cpp writes 32)"));
    }
    reader.seek(SeekFrom::Start(0)).map_err(|e| IoError::io(path, e))?;
    let content = Content::read(&mut reader).map_err(|e| gguf_err(path, format!("not a valid GGUF file ({e}); the file may be truncated: download it again")))?;
    // Check every tensor fits in the file before reading any, so a truncated download fails
    // with one clear message instead of midway.
    for (name, info) in &content.tensor_infos {
        // Sizes from the header are checked for overflow: a wrapped product would pass the
        // length check and then ask for an impossible allocation.
        let elems = info.shape.dims().iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let block = info.ggml_dtype.block_size();
        let bytes = elems.filter(|n| n % block == 0).and_then(|n| (n / block).checked_mul(info.ggml_dtype.type_size()));
        let Some(bytes) = bytes else {
            return Err(gguf_err(path, format!("tensor `{name}` has an impossible shape {:?} for {:?}", info.shape.dims(), info.ggml_dtype)));
        };
        let end = content.tensor_data_offset.checked_add(info.offset).and_then(|e| e.checked_add(bytes as u64)).unwrap_or(u64::MAX);
        if end > file_len {
            return Err(gguf_err(path, format!("truncated: tensor `{name}` ends at byte {end} but the file has {file_len} bytes; download it again")));
        }
    }
    let meta = Meta { content: &content, path };
    let arch = meta.str("general.architecture")?;
    let arch_key = |k: &str| format!("{arch}.{k}");
    let n_heads = meta.uint(&arch_key("attention.head_count"))?;
    let n_kv_heads = meta.uint_opt(&arch_key("attention.head_count_kv")).unwrap_or(n_heads);
    // Checked before any tensor is read: the q/k un-permutation divides rows by these.
    if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        return Err(gguf_err(path, format!("{arch}.attention.head_count {n_heads} and head_count_kv {n_kv_heads}: both must be at least 1 and the first a multiple of the second")));
    }

    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut rope_freqs = None;
    let mut rope_factors: HashMap<String, Vec<f32>> = HashMap::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut reader, name, &Device::Cpu).map_err(|e| gguf_err(path, format!("tensor `{name}`: {e}")))?;
        let t = q.dequantize(&Device::Cpu).map_err(|e| gguf_err(path, format!("tensor `{name}`: {e}")))?;
        // As safetensors reads do: a NaN or infinity is refused.
        if !lmx_core::ops::all_finite(&t)? {
            return Err(IoError::NonFinite { path: path.to_path_buf(), key: name.clone() });
        }
        if name == "rope_freqs.weight" {
            rope_freqs = Some(t);
            continue;
        }
        if let Some(which) = name.strip_prefix("rope_factors_").and_then(|n| n.strip_suffix(".weight")) {
            // Phi-3's LongRoPE factors (`long`, `short`), which config.json holds.
            rope_factors.insert(which.to_string(), t.flatten_all()?.to_vec1::<f32>()?);
            continue;
        }
        let hf = hf_name_in(&arch, name).ok_or_else(|| gguf_err(path, format!("tensor `{name}` has no Hugging Face equivalent that lmx knows (architecture `{arch}`)")))?;
        let t = if ONE_PLUS_NORMS.contains(&arch.as_str()) && name.ends_with("norm.weight") { (t - 1.0)? } else { t };
        let t = if PERMUTED_QK.contains(&arch.as_str()) && hf.contains("self_attn.q_proj") {
            unpermute(&t, n_heads)?
        } else if PERMUTED_QK.contains(&arch.as_str()) && hf.contains("self_attn.k_proj") {
            unpermute(&t, n_kv_heads)?
        } else {
            t
        };
        tensors.insert(hf, t);
    }
    let embed_rows = tensors.get("model.embed_tokens.weight").map(|t| t.dims()[0]);
    let n_layers = meta.uint(&arch_key("block_count"))?;
    let expert_count = meta.uint_opt(&arch_key("expert_count")).unwrap_or(0);
    let model_type = model_type(&arch, expert_count > 0);
    if model_type == "mixtral" {
        // Mixtral's block is `block_sparse_moe` (router `gate`, experts in `switch_mlp`).
        tensors = tensors.into_iter().map(|(k, t)| (k.replace(".mlp.gate.", ".block_sparse_moe.gate.").replace(".mlp.switch_mlp.", ".block_sparse_moe.switch_mlp."), t)).collect();
    }

    let (tokenizer, tokenizer_config, bos, eos) = tokenizer_from_meta(&meta)?;
    let mut eos_ids: Vec<u32> = eos.into_iter().collect();
    if let Some(eot) = meta.uint_opt("tokenizer.ggml.eot_token_id") {
        if !eos_ids.contains(&(eot as u32)) {
            eos_ids.push(eot as u32);
        }
    }

    let mut config = Map::new();
    config.insert("model_type".into(), model_type.into());
    config.insert("hidden_size".into(), meta.uint(&arch_key("embedding_length"))?.into());
    match meta.uint_opt(&arch_key("feed_forward_length")) {
        Some(n) => config.insert("intermediate_size".into(), n.into()),
        None if expert_count > 0 => None,
        None => config.insert("intermediate_size".into(), meta.uint(&arch_key("feed_forward_length"))?.into()),
    };
    config.insert("num_hidden_layers".into(), n_layers.into());
    if expert_count > 0 {
        let used = meta.uint(&arch_key("expert_used_count"))?;
        config.insert("num_experts_per_tok".into(), used.into());
        if model_type == "mixtral" {
            config.insert("num_local_experts".into(), expert_count.into());
        } else {
            config.insert("num_experts".into(), expert_count.into());
            let per_expert = meta.uint_opt(&arch_key("expert_feed_forward_length")).or(meta.uint_opt(&arch_key("feed_forward_length")));
            config.insert("moe_intermediate_size".into(), per_expert.ok_or_else(|| gguf_err(path, format!("metadata key `{arch}.expert_feed_forward_length` is missing")))?.into());
            // Qwen3-MoE renormalizes the kept weights (llama.cpp: `expert_weights_norm`).
            config.insert("norm_topk_prob".into(), meta.bool_opt(&arch_key("expert_weights_norm")).unwrap_or(model_type == "qwen3_moe").into());
            // Blocks without a router hold a dense MLP.
            let dense: Vec<usize> = (0..n_layers).filter(|i| !tensors.contains_key(&format!("model.layers.{i}.mlp.gate.weight"))).collect();
            config.insert("mlp_only_layers".into(), json!(dense));
            if let Some(shared) = meta.uint_opt(&arch_key("expert_shared_feed_forward_length")) {
                config.insert("shared_expert_intermediate_size".into(), shared.into());
            }
        }
    }
    config.insert("num_attention_heads".into(), n_heads.into());
    config.insert("num_key_value_heads".into(), n_kv_heads.into());
    config.insert("rms_norm_eps".into(), meta.float_opt(&arch_key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5).into());
    config.insert("rope_theta".into(), meta.float_opt(&arch_key("rope.freq_base")).unwrap_or(10_000.0).into());
    config.insert("max_position_embeddings".into(), meta.uint_opt(&arch_key("context_length")).unwrap_or(2048).into());
    if let Some(head_dim) = meta.uint_opt(&arch_key("attention.key_length")) {
        config.insert("head_dim".into(), head_dim.into());
    }
    let vocab = meta.uint_opt(&arch_key("vocab_size")).or(embed_rows).unwrap_or(0);
    config.insert("vocab_size".into(), vocab.into());
    config.insert("tie_word_embeddings".into(), (!tensors.contains_key("lm_head.weight")).into());
    if let Some(bos) = bos {
        config.insert("bos_token_id".into(), bos.into());
    }
    config.insert("eos_token_id".into(), json!(eos_ids));
    config.insert("torch_dtype".into(), "float32".into());
    if let Some(freqs) = rope_freqs {
        // llama.cpp stores Llama 3's rope scaling as per-frequency divisors; the largest is the
        // scaling factor, and low/high/original are the values every Llama 3.x model uses.
        let factor = freqs.max(0)?.to_scalar::<f32>()?;
        config.insert(
            "rope_scaling".into(),
            json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
            }),
        );
    }
    arch_config(&meta, &arch, n_layers, n_heads, &rope_factors, &mut config)?;
    let generation_config = json!({"bos_token_id": bos, "eos_token_id": eos_ids});
    Ok(GgufModel { config: Value::Object(config), tensors, tokenizer, tokenizer_config, generation_config })
}

/// The config.json keys of Gemma 2 / 3 and Phi-3 that their GGUF metadata holds, or that
/// llama.cpp fixes for them.
fn arch_config(meta: &Meta, arch: &str, n_layers: usize, n_heads: usize, rope_factors: &HashMap<String, Vec<f32>>, config: &mut Map<String, Value>) -> Result<()> {
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = meta.uint(&key("embedding_length"))?;
    let head_dim = meta.uint_opt(&key("attention.key_length")).unwrap_or(hidden / n_heads.max(1));
    let mut set = |k: &str, v: Value| {
        config.insert(k.into(), v);
    };
    if let Some(w) = meta.uint_opt(&key("attention.sliding_window")).filter(|&w| w > 0) {
        set("sliding_window", w.into());
    }
    match arch {
        "gemma2" | "gemma3" => {
            // llama.cpp scales queries by 1/sqrt(head_dim), except in the 27B shapes (46 and 62
            // layers), whose query_pre_attn_scalar is hidden / heads.
            let big = (arch == "gemma2" && n_layers == 46) || (arch == "gemma3" && n_layers == 62);
            set("query_pre_attn_scalar", (if big { hidden / n_heads.max(1) } else { head_dim }).into());
            for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
                if let Some(v) = meta.float_opt(&key(k)) {
                    set(k, v.into());
                }
            }
            if arch == "gemma3" {
                // Five local layers to one global unless the file says otherwise (llama.cpp's
                // fixed pattern); local layers rotate by their own base.
                set("sliding_window_pattern", meta.uint_opt(&key("attention.sliding_window_pattern")).unwrap_or(6).into());
                set("rope_local_base_freq", meta.float_opt(&key("rope.freq_base_swa")).unwrap_or(10_000.0).into());
                set("rope_theta", meta.float_opt(&key("rope.freq_base")).unwrap_or(1_000_000.0).into());
                if meta.str(&key("rope.scaling.type")).is_ok_and(|t| t == "linear") {
                    set("rope_scaling", json!({"rope_type": "linear", "factor": meta.float_opt(&key("rope.scaling.factor")).unwrap_or(1.0)}));
                }
            }
        }
        "phi3" => {
            let rotated = meta.uint_opt(&key("rope.dimension_count")).unwrap_or(head_dim);
            set("partial_rotary_factor", (rotated as f64 / head_dim as f64).into());
            if let Some(original) = meta.uint_opt(&key("rope.scaling.original_context_length")) {
                set("original_max_position_embeddings", original.into());
            }
            if let (Some(long), Some(short)) = (rope_factors.get("long"), rope_factors.get("short")) {
                set("rope_scaling", json!({"rope_type": "longrope", "long_factor": long, "short_factor": short}));
            }
        }
        _ => {}
    }
    Ok(())
}

struct Meta<'a> {
    content: &'a Content,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&GValue> {
        self.content.metadata.get(key).ok_or_else(|| gguf_err(self.path, format!("metadata key `{key}` is missing")))
    }
    fn str(&self, key: &str) -> Result<String> {
        self.get(key)?.to_string().cloned().map_err(|e| gguf_err(self.path, format!("`{key}`: {e}")))
    }
    fn uint(&self, key: &str) -> Result<usize> {
        self.uint_opt(key).ok_or_else(|| gguf_err(self.path, format!("metadata key `{key}` is missing or not an integer")))
    }
    fn uint_opt(&self, key: &str) -> Option<usize> {
        let v = self.content.metadata.get(key)?;
        v.to_u32().map(|x| x as usize).or_else(|_| v.to_u64().map(|x| x as usize)).or_else(|_| v.to_i32().map(|x| x as usize)).ok()
    }
    fn float_opt(&self, key: &str) -> Option<f64> {
        let v = self.content.metadata.get(key)?;
        v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()
    }
    fn bool_opt(&self, key: &str) -> Option<bool> {
        self.content.metadata.get(key)?.to_bool().ok()
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let list = self.get(key)?.to_vec().map_err(|e| gguf_err(self.path, format!("`{key}`: {e}")))?;
        list.iter().map(|v| v.to_string().cloned().map_err(|e| gguf_err(self.path, format!("`{key}`: {e}")))).collect()
    }
    fn floats(&self, key: &str) -> Vec<f64> {
        let Some(GValue::Array(list)) = self.content.metadata.get(key) else { return Vec::new() };
        list.iter().filter_map(|v| v.to_f32().map(f64::from).ok()).collect()
    }
    fn ints(&self, key: &str) -> Vec<i64> {
        let Some(GValue::Array(list)) = self.content.metadata.get(key) else { return Vec::new() };
        list.iter().filter_map(|v| v.to_i32().map(i64::from).or_else(|_| v.to_u32().map(i64::from)).ok()).collect()
    }
}

/// GPT-2 style pre-tokenizer regexes of the llama.cpp `tokenizer.ggml.pre` types lmx knows.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_then_bytelevel(pattern: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
    ]})
}

/// Rebuilds `tokenizer.json` and `tokenizer_config.json` from GGUF metadata.
/// Returns (tokenizer.json, tokenizer_config.json, bos id, eos id).
fn tokenizer_from_meta(meta: &Meta) -> Result<(Value, Value, Option<usize>, Option<u32>)> {
    let model = meta.str("tokenizer.ggml.model")?;
    if model == "llama" {
        return sentencepiece_from_meta(meta);
    }
    if model != "gpt2" {
        return Err(gguf_err(
            meta.path,
            format!(
                "tokenizer model `{model}` is not supported yet (lmx rebuilds byte-level BPE `gpt2` and SentencePiece `llama` tokenizers from GGUF); use the Hugging Face folder of this model instead"
            ),
        ));
    }
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types = meta.ints("tokenizer.ggml.token_type");
    let merges = meta.strings("tokenizer.ggml.merges")?;
    let pre = meta.str("tokenizer.ggml.pre").unwrap_or_else(|_| "default".into());
    let pre_tokenizer = match pre.as_str() {
        "llama-bpe" | "llama3" | "smaug-bpe" => split_then_bytelevel(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" => split_then_bytelevel(QWEN2_SPLIT),
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]}),
        _ => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
    };
    let vocab: Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    // Token types: 3 = control (special), 4 = user-defined (added, not special).
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let ty = types.get(i).copied().unwrap_or(1);
            (ty == 3 || ty == 4).then(|| {
                json!({
                    "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": ty == 4, "special": ty == 3
                })
            })
        })
        .collect();
    let bos = meta.uint_opt("tokenizer.ggml.bos_token_id");
    let eos = meta.uint_opt("tokenizer.ggml.eos_token_id").map(|x| x as u32);
    let add_bos = meta.bool_opt("tokenizer.ggml.add_bos_token").unwrap_or(false);
    let token_str = |id: Option<usize>| id.and_then(|i| tokens.get(i)).cloned();
    let post_processor = bos_template(add_bos, token_str(bos), bos).unwrap_or_else(|| json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}));
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added, "normalizer": null,
        "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    let tokenizer_config = tokenizer_config(meta, "PreTrainedTokenizerFast", add_bos, token_str(bos), token_str(eos.map(|e| e as usize)))?;
    Ok((tokenizer, tokenizer_config, bos, eos))
}

/// A post-processor that puts the BOS token first, when the file asks for one.
fn bos_template(add_bos: bool, bos_token: Option<String>, bos: Option<usize>) -> Option<Value> {
    let b = bos_token.filter(|_| add_bos)?;
    Some(json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {b.clone(): {"id": b, "ids": [bos], "tokens": [b]}}}))
}

/// `tokenizer_config.json`: class, BOS/EOS, context length and the file's chat template.
fn tokenizer_config(meta: &Meta, class: &str, add_bos: bool, bos_token: Option<String>, eos_token: Option<String>) -> Result<Value> {
    let mut config = json!({
        "tokenizer_class": class,
        "add_bos_token": add_bos,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "model_max_length": meta.uint_opt(&format!("{}.context_length", meta.str("general.architecture")?)).unwrap_or(2048),
    });
    if let Ok(t) = meta.str("tokenizer.chat_template") {
        config["chat_template"] = t.into();
    }
    Ok(config)
}

/// A SentencePiece BPE tokenizer (`tokenizer.ggml.model` = `llama`: Llama 2, Gemma, Phi-3)
/// as the `tokenizers` library runs it, the way transformers converts such a tokenizer
/// (`LlamaConverter`): the pieces as a BPE vocabulary whose merges are every split of a piece
/// into two pieces, ranked by the merged piece's score (SentencePiece merges the pair whose
/// result scores highest, so the ranks give the same merges), byte fallback to the
/// `<0xXX>` pieces, spaces as `▁` (with a leading one where `add_space_prefix` says so).
fn sentencepiece_from_meta(meta: &Meta) -> Result<(Value, Value, Option<usize>, Option<u32>)> {
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let scores = meta.floats("tokenizer.ggml.scores");
    let types = meta.ints("tokenizer.ggml.token_type");
    let ty = |i: usize| types.get(i).copied().unwrap_or(1);
    let vocab: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    // Merges: pieces of types normal (1) and user-defined (4) split every way into two pieces.
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate().filter(|(i, _)| matches!(ty(*i), 1 | 4)) {
        let score = scores.get(id).copied().unwrap_or(0.0);
        let mut local: Vec<(usize, usize)> = piece.char_indices().skip(1).filter_map(|(at, _)| Some((*vocab.get(&piece[..at])?, *vocab.get(&piece[at..])?))).collect();
        local.sort();
        merges.extend(local.into_iter().map(|(l, r)| (score, id, l, r)));
    }
    // Highest score first; ties in piece order, then by the ids of the halves.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then((a.2, a.3).cmp(&(b.2, b.3))));
    let merges: Vec<Value> = merges.iter().map(|&(_, _, l, r)| json!([tokens[l], tokens[r]])).collect();
    let unk = (0..tokens.len()).find(|&i| ty(i) == 2).map(|i| tokens[i].clone());
    // Control (3) and unknown (2) pieces are special added tokens; user-defined (4) added ones.
    let added: Vec<Value> = (0..tokens.len())
        .filter(|&i| matches!(ty(i), 2..=4))
        .map(|i| json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": ty(i) == 4, "special": ty(i) != 4}))
        .collect();
    let prefix = meta.bool_opt("tokenizer.ggml.add_space_prefix").unwrap_or(true);
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if prefix { json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]}) } else { replace };
    let mut decoders = vec![json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}), json!({"type": "ByteFallback"}), json!({"type": "Fuse"})];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let bos = meta.uint_opt("tokenizer.ggml.bos_token_id");
    let eos = meta.uint_opt("tokenizer.ggml.eos_token_id").map(|x| x as u32);
    let add_bos = meta.bool_opt("tokenizer.ggml.add_bos_token").unwrap_or(true);
    let token_str = |id: Option<usize>| id.and_then(|i| tokens.get(i)).cloned();
    let post_processor = bos_template(add_bos, token_str(bos), bos).unwrap_or(Value::Null);
    let vocab_json: Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": null, "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab_json, "merges": merges}
    });
    let tokenizer_config = tokenizer_config(meta, "LlamaTokenizerFast", add_bos, token_str(bos), token_str(eos.map(|e| e as usize)))?;
    Ok((tokenizer, tokenizer_config, bos, eos))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SentencePiece tokenizer rebuilt from a GGUF that llama.cpp's converter wrote
    /// encodes as sentencepiece itself does (`scripts/fixtures/gguf_models.py`: merges,
    /// characters it never saw as bytes, runs of spaces), and decodes back to the text.
    #[test]
    fn sentencepiece_tokenizer_from_gguf_encodes_as_sentencepiece() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf");
        let want: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("spm_encodings.json")).expect("encodings")).expect("json");
        let model = load(&dir.join("gemma2.gguf")).expect("gemma2.gguf");
        let tok = crate::tokenizer::Tokenizer::from_json(&model.tokenizer).expect("tokenizer");
        for (text, ids) in want["texts"].as_array().expect("texts").iter().zip(want["ids"].as_array().expect("ids")) {
            let text = text.as_str().expect("text");
            let ids: Vec<u32> = ids.as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
            assert_eq!(tok.encode(text, false).expect("encode"), ids, "{text:?}");
            assert_eq!(tok.decode(&ids, false).expect("decode"), text);
        }
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(hf_name("blk.3.attn_q.weight").as_deref(), Some("model.layers.3.self_attn.q_proj.weight"));
        assert_eq!(hf_name("blk.0.attn_k.bias").as_deref(), Some("model.layers.0.self_attn.k_proj.bias"));
        assert_eq!(hf_name("blk.11.ffn_down.weight").as_deref(), Some("model.layers.11.mlp.down_proj.weight"));
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.1.unknown.weight"), None);
    }

    /// Writes a GGUF the way llama.cpp's converter does (GGUF names, q/k rows permuted, weights
    /// quantized) and checks lmx reads back the original Hugging Face tensors, for every
    /// quantization family: 8-bit, legacy 4-bit, and k-quants.
    #[test]
    fn quantized_gguf_round_trips_to_hugging_face_tensors() {
        use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
        let (hidden, inter, n_heads, n_kv, vocab) = (256usize, 512usize, 4usize, 2usize, 64usize);
        let head_dim = hidden / n_heads;
        let dev = Device::Cpu;
        let rand = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).expect("randn");
        // llama.cpp: gguf = hf.reshape(n, 2, r, c).swapaxes(1, 2)
        let permute = |t: &Tensor, n: usize| -> Tensor {
            let (rows, cols) = t.dims2().expect("2-D");
            t.reshape((n, 2, rows / n / 2, cols)).and_then(|x| x.transpose(1, 2)).and_then(|x| x.contiguous()).and_then(|x| x.reshape((rows, cols))).expect("permute")
        };
        for (dtype, tol) in [(GgmlDType::Q8_0, 0.01f32), (GgmlDType::Q4_0, 0.12), (GgmlDType::Q4_1, 0.15), (GgmlDType::Q4K, 0.15), (GgmlDType::Q6K, 0.03), (GgmlDType::F16, 0.001)] {
            let hf: Vec<(&str, &str, Tensor)> = vec![
                ("token_embd.weight", "model.embed_tokens.weight", rand(&[vocab, hidden])),
                ("output_norm.weight", "model.norm.weight", rand(&[hidden])),
                ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight", rand(&[hidden])),
                ("blk.0.ffn_norm.weight", "model.layers.0.post_attention_layernorm.weight", rand(&[hidden])),
                ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", rand(&[hidden, hidden])),
                ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", rand(&[n_kv * head_dim, hidden])),
                ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", rand(&[n_kv * head_dim, hidden])),
                ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj.weight", rand(&[hidden, hidden])),
                ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj.weight", rand(&[inter, hidden])),
                ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight", rand(&[inter, hidden])),
                ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", rand(&[hidden, inter])),
            ];
            let qtensors: Vec<(&str, QTensor)> = hf
                .iter()
                .map(|(g, _, t)| {
                    let t = match *g {
                        "blk.0.attn_q.weight" => permute(t, n_heads),
                        "blk.0.attn_k.weight" => permute(t, n_kv),
                        _ => t.clone(),
                    };
                    let q = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
                    (*g, QTensor::quantize(&t, q).expect("quantize"))
                })
                .collect();
            let s = |x: &str| gguf_file::Value::String(x.into());
            let u = gguf_file::Value::U32;
            let tokens: Vec<gguf_file::Value> = (0..vocab).map(|i| s(&format!("t{i}"))).collect();
            let metadata = vec![
                ("general.architecture", s("llama")),
                ("llama.block_count", u(1)),
                ("llama.context_length", u(128)),
                ("llama.embedding_length", u(hidden as u32)),
                ("llama.feed_forward_length", u(inter as u32)),
                ("llama.attention.head_count", u(n_heads as u32)),
                ("llama.attention.head_count_kv", u(n_kv as u32)),
                ("tokenizer.ggml.model", s("gpt2")),
                ("tokenizer.ggml.tokens", gguf_file::Value::Array(tokens)),
                ("tokenizer.ggml.merges", gguf_file::Value::Array(vec![])),
                ("tokenizer.ggml.eos_token_id", u(0)),
            ];
            let path = std::env::temp_dir().join(format!("lmx-gguf-{dtype:?}-{}.gguf", std::process::id()));
            let mut f = std::fs::File::create(&path).expect("create");
            let meta_refs: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
            let tensor_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (*k, v)).collect();
            gguf_file::write(&mut f, &meta_refs, &tensor_refs).expect("write gguf");
            drop(f);
            let model = load(&path).expect("lmx reads the GGUF");
            let _ = std::fs::remove_file(&path);
            assert_eq!(model.config["tie_word_embeddings"], true);
            assert_eq!(model.config["num_key_value_heads"], n_kv);
            for (g, h, want) in &hf {
                let got = &model.tensors[*h];
                let err = (got - want).and_then(|d| d.sqr()).and_then(|d| d.mean_all()).and_then(|d| d.to_scalar::<f32>()).expect("err").sqrt();
                assert!(err < tol, "{dtype:?} {g} -> {h}: rms error {err} (tolerance {tol})");
            }
        }
    }

    /// `general.alignment` is found behind arrays of strings, and 0 is refused before candle's
    /// reader divides by it.
    #[test]
    fn alignment_is_checked_first() {
        use candle_core::quantized::{gguf_file, QTensor};
        let t = QTensor::quantize(&Tensor::zeros(32, lmx_core::DType::F32, &Device::Cpu).expect("zeros"), candle_core::quantized::GgmlDType::F32).expect("q");
        for (alignment, want) in [(32u32, Some(32u64)), (0, Some(0))] {
            let tokens = gguf_file::Value::Array(vec![gguf_file::Value::String("a".into()), gguf_file::Value::String("bc".into())]);
            let metadata = [("general.architecture", gguf_file::Value::String("llama".into())), ("tokenizer.ggml.tokens", tokens), ("general.alignment", gguf_file::Value::U32(alignment))];
            let mut bytes = std::io::Cursor::new(Vec::new());
            let meta: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
            gguf_file::write(&mut bytes, &meta, &[("x", &t)]).expect("write");
            bytes.set_position(0);
            assert_eq!(scan_alignment(&mut bytes).expect("scan"), want);
            let path = std::env::temp_dir().join(format!("lmx-align-{alignment}-{}.gguf", std::process::id()));
            std::fs::write(&path, bytes.get_ref()).expect("write file");
            let err = load(&path).err().map(|e| e.to_string()).unwrap_or_default();
            let _ = std::fs::remove_file(&path);
            if alignment == 0 {
                assert!(err.contains("`general.alignment` is 0"), "{err}");
            }
        }
    }

    /// Head counts that cannot split the rows are an error, not a division by zero.
    #[test]
    fn unpermute_refuses_bad_head_counts() -> lmx_core::Result<()> {
        let t = Tensor::zeros((12, 4), lmx_core::DType::F32, &Device::Cpu)?;
        assert!(unpermute(&t, 0).is_err());
        assert!(unpermute(&t, 5).is_err());
        assert!(unpermute(&t, 3).is_ok());
        Ok(())
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> lmx_core::Result<()> {
        // llama.cpp: gguf = hf.reshape(n, 2, r, c).swapaxes(1, 2).reshape(rows, c)
        let (n, r, c) = (3usize, 2usize, 5usize);
        let hf = Tensor::arange(0f32, (n * 2 * r * c) as f32, &Device::Cpu)?.reshape((n * 2 * r, c))?;
        let gguf = hf.reshape((n, 2, r, c))?.transpose(1, 2)?.contiguous()?.reshape((n * 2 * r, c))?;
        let back = unpermute(&gguf, n)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        Ok(())
    }
}
