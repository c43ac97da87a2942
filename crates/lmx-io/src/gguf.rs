//! GGUF files (llama.cpp): metadata turned into a Hugging Face `config.json`, tensors renamed
//! to Hugging Face keys (q/k rows un-permuted for the Llama family), and the tokenizer and chat
//! template rebuilt from the `tokenizer.ggml.*` metadata. Tensors are dequantized to f32,
//! except, when asked ([`load_with`]), projection and embedding matrices in Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0, Q4_K or Q5_K, which stay packed as MLX affine groups of 32 ([`block_to_affine`],
//! no loss; the model builder widens 5-bit codes to bytes where the CPU does not read them as
//! stored), and MXFP4 experts, which always stay packed; config.json then has a
//! `quantization` block for them. Q6_K, Q3_K and Q2_K (groups of 16) are dequantized, or
//! when packing, requantized to 8-bit groups of 32 ([`requantize8`]).
//!
//! The result is the same in-memory model folder a safetensors checkpoint gives, so model
//! files never see GGUF names, and `lmx convert --gguf` only has to write it out.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::Value as GValue;
use candle_core::quantized::GgmlDType;
use lmx_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value};

use crate::error::{IoError, Result};

/// A GGUF file rebuilt as the parts of a Hugging Face model folder.
pub struct GgufModel {
    /// `config.json`.
    pub config: Value,
    /// Tensors under Hugging Face names: f32, or MLX's packed layout (`weight` words,
    /// `scales`, `biases`) for the modules config.json's `quantization` block names.
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
    // gpt-oss: the norm before the MLP, the router, experts where MLX LM keeps them, sinks.
    (&["gpt-oss"], "post_attention_norm", "post_attention_layernorm"),
    (&["gpt-oss"], "ffn_gate_inp", "mlp.router"),
    (&["gpt-oss"], "ffn_gate_exps", "mlp.experts.gate_proj"),
    (&["gpt-oss"], "ffn_up_exps", "mlp.experts.up_proj"),
    (&["gpt-oss"], "ffn_down_exps", "mlp.experts.down_proj"),
    (&["gpt-oss"], "attn_sinks", "self_attn.sinks"),
];

/// Architectures whose norms multiply by `1 + w`, which llama.cpp's converter stores as `w + 1`.
const ONE_PLUS_NORMS: &[&str] = &["gemma2", "gemma3"];

/// The `model_type` of a GGUF `general.architecture` (the same name unless listed), given
/// whether its blocks hold experts: llama.cpp writes Mixtral as `llama` with experts.
fn model_type(arch: &str, experts: bool) -> &str {
    match (arch, experts) {
        ("gemma3", _) => "gemma3_text",
        ("gpt-oss", _) => "gpt_oss",
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
        // gpt-oss's sinks are a bare parameter (`self_attn.sinks`), stored as `attn_sinks.weight`.
        Some(if hf.ends_with(".sinks") { format!("model.layers.{layer}.{hf}") } else { format!("model.layers.{layer}.{hf}.{kind}") })
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

/// llama.cpp's GGML type number of MXFP4 (groups of 32 E2M1 codes with an E8M0 scale), which
/// candle cannot read: lmx keeps those tensors packed ([`mxfp4_to_mlx`]).
const GGML_MXFP4: u32 = 39;

/// A tensor listed in a GGUF header: shape (outermost first, as candle orders it), GGML type
/// number and offset into the data section.
struct TensorInfo {
    dims: Vec<usize>,
    ggml_type: u32,
    offset: u64,
}

impl TensorInfo {
    /// Elements per block and bytes per block of its type, or None for a type lmx cannot read.
    fn block(&self) -> Option<(usize, usize)> {
        if self.ggml_type == GGML_MXFP4 {
            return Some((32, 17));
        }
        ggml_dtype(self.ggml_type).map(|t| (t.block_size(), t.type_size()))
    }
}

/// The dtype of GGML's float types (F32, F16, BF16).
fn float_dtype(t: u32) -> Option<DType> {
    match t {
        0 => Some(DType::F32),
        1 => Some(DType::F16),
        30 => Some(DType::BF16),
        _ => None,
    }
}

/// The candle type of a GGML type number.
fn ggml_dtype(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// A GGUF header (v2 and v3): metadata, tensors in file order, where tensor data starts.
struct Header {
    metadata: HashMap<String, GValue>,
    tensors: Vec<(String, TensorInfo)>,
    /// `general.alignment` (32 when absent).
    alignment: u64,
    /// Where tensor data starts (0 when the alignment is not a power of two).
    data_offset: u64,
}

/// Reads a GGUF header from `r` (`file_len` bytes in all). Every length is checked against the
/// bytes left before anything is allocated for it, so a corrupt or hostile header fails with
/// a message, never a huge allocation.
fn read_header(r: &mut impl Read, file_len: u64) -> std::io::Result<Header> {
    fn bad(msg: impl std::fmt::Display) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string())
    }
    struct Src<'a, R> {
        r: &'a mut R,
        left: u64,
    }
    impl<R: Read> Src<'_, R> {
        fn bytes<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
            if self.left < N as u64 {
                return Err(bad("the file ends inside its header"));
            }
            let mut b = [0u8; N];
            self.r.read_exact(&mut b)?;
            self.left -= N as u64;
            Ok(b)
        }
        fn u32(&mut self) -> std::io::Result<u32> {
            Ok(u32::from_le_bytes(self.bytes()?))
        }
        fn u64(&mut self) -> std::io::Result<u64> {
            Ok(u64::from_le_bytes(self.bytes()?))
        }
        /// A count of items of at least `min` bytes each that the rest of the file can hold.
        fn count(&mut self, min: u64, what: &str) -> std::io::Result<usize> {
            let n = self.u64()?;
            if n.saturating_mul(min) > self.left {
                return Err(bad(format!("{what} count {n} does not fit in the rest of the file")));
            }
            Ok(n as usize)
        }
        fn string(&mut self) -> std::io::Result<String> {
            let n = self.count(1, "string length")?;
            let mut v = vec![0u8; n];
            self.r.read_exact(&mut v)?;
            self.left -= n as u64;
            while v.last() == Some(&0) {
                v.pop();
            }
            Ok(String::from_utf8_lossy(&v).into_owned())
        }
        fn value(&mut self, t: u32, depth: u32) -> std::io::Result<GValue> {
            Ok(match t {
                0 => GValue::U8(self.bytes::<1>()?[0]),
                1 => GValue::I8(self.bytes::<1>()?[0] as i8),
                2 => GValue::U16(u16::from_le_bytes(self.bytes()?)),
                3 => GValue::I16(i16::from_le_bytes(self.bytes()?)),
                4 => GValue::U32(self.u32()?),
                5 => GValue::I32(i32::from_le_bytes(self.bytes()?)),
                6 => GValue::F32(f32::from_le_bytes(self.bytes()?)),
                7 => GValue::Bool(self.bytes::<1>()?[0] != 0),
                8 => GValue::String(self.string()?),
                9 if depth < 2 => {
                    let et = self.u32()?;
                    let n = self.count(1, "array length")?;
                    GValue::Array((0..n).map(|_| self.value(et, depth + 1)).collect::<std::io::Result<_>>()?)
                }
                10 => GValue::U64(self.u64()?),
                11 => GValue::I64(i64::from_le_bytes(self.bytes()?)),
                12 => GValue::F64(f64::from_le_bytes(self.bytes()?)),
                other => return Err(bad(format!("unknown metadata value type {other}"))),
            })
        }
    }
    let mut src = Src { r, left: file_len };
    if src.u32()? != 0x4655_4747 {
        return Err(bad("no GGUF magic"));
    }
    let version = src.u32()?;
    if !(2..=3).contains(&version) {
        return Err(bad(format!("GGUF version {version} (lmx reads versions 2 and 3)")));
    }
    let n_tensors = src.count(24, "tensor")?;
    let n_kvs = src.count(13, "metadata")?;
    let mut metadata = HashMap::new();
    for _ in 0..n_kvs {
        let key = src.string()?;
        let t = src.u32()?;
        let v = src.value(t, 0)?;
        metadata.insert(key, v);
    }
    let mut tensors = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = src.string()?;
        let n_dims = src.u32()?;
        if n_dims > 4 {
            return Err(bad(format!("tensor `{name}` has {n_dims} dimensions (GGML has at most 4)")));
        }
        let mut dims = (0..n_dims).map(|_| src.u64().map(|d| d as usize)).collect::<std::io::Result<Vec<_>>>()?;
        dims.reverse();
        let ggml_type = src.u32()?;
        let offset = src.u64()?;
        tensors.push((name, TensorInfo { dims, ggml_type, offset }));
    }
    let alignment = match metadata.get("general.alignment") {
        Some(GValue::U8(a)) => u64::from(*a),
        Some(GValue::U16(a)) => u64::from(*a),
        Some(GValue::U32(a)) => u64::from(*a),
        Some(GValue::U64(a)) => *a,
        Some(GValue::I8(a)) => u64::try_from(*a).unwrap_or(0),
        Some(GValue::I16(a)) => u64::try_from(*a).unwrap_or(0),
        Some(GValue::I32(a)) => u64::try_from(*a).unwrap_or(0),
        _ => 32,
    };
    let position = file_len - src.left;
    let data_offset = if alignment.is_power_of_two() { position.div_ceil(alignment) * alignment } else { 0 };
    Ok(Header { metadata, tensors, alignment, data_offset })
}

/// GGML MXFP4 blocks (17 bytes: the E8M0 scale, then 16 bytes holding element j in the low
/// nibble of byte j and element j + 16 in its high nibble) of a (.., rows, cols) tensor as MLX
/// stores MXFP4: u32 words (.., rows, cols / 8) of 8 codes each, the first in the low bits, and
/// u8 scales (.., rows, cols / 32). Values are the same E2M1 codes times `2^(scale - 127)`.
fn mxfp4_to_mlx(raw: &[u8], dims: &[usize]) -> lmx_core::Result<(Tensor, Tensor)> {
    let blocks = raw.len() / 17;
    let mut words = Vec::with_capacity(blocks * 4);
    let mut scales = Vec::with_capacity(blocks);
    for b in raw.chunks_exact(17) {
        scales.push(b[0]);
        let code = |k: usize| u32::from(if k < 16 { b[1 + k] & 15 } else { b[1 + k - 16] >> 4 });
        for w in 0..4 {
            words.push((0..8).map(|n| code(8 * w + n) << (4 * n)).fold(0, |a, c| a | c));
        }
    }
    let (lead, cols) = dims.split_at(dims.len().saturating_sub(1));
    let cols = cols.first().copied().unwrap_or(0);
    let shape = |per: usize| lead.iter().copied().chain(std::iter::once(cols / per)).collect::<Vec<_>>();
    Ok((Tensor::from_vec(words, shape(8), &Device::Cpu)?, Tensor::from_vec(scales, shape(32), &Device::Cpu)?))
}

/// GGML type ids of the block formats whose every group of 32 elements is an MLX affine group.
const GGML_Q4_0: u32 = 2;
const GGML_Q4_1: u32 = 3;
const GGML_Q5_0: u32 = 6;
const GGML_Q5_1: u32 = 7;
const GGML_Q8_0: u32 = 8;
const GGML_Q4_K: u32 = 12;
const GGML_Q5_K: u32 = 13;

/// GGML types whose scales go by groups of 16 (Q2_K, Q3_K, Q6_K): [`load_with`] requantizes
/// their packable matrices to 8-bit groups of 32.
const SIXTEENS: [u32; 3] = [GGML_Q2_K, GGML_Q3_K, GGML_Q6_K];
const GGML_Q2_K: u32 = 10;
const GGML_Q3_K: u32 = 11;
const GGML_Q6_K: u32 = 14;

/// A (rows, cols) matrix, whose row `r` `row(r, out)` writes as f32, as 8-bit affine groups of
/// 32 with f16 scales and biases, each group's codes spanning its minimum to its maximum: the
/// bias is the minimum rounded down to an f16, the scale `(max - bias) / 255` rounded up to
/// one, so every value is within half a step (about `(max - min) / 510`) of its original;
/// MLX's quantizer, which makes 0 exact, can be a whole step off. f16 rather than f32 scales:
/// 1.125 bytes a weight instead of 1.25, a tenth less to read a token. Where a group's range
/// does not fit an f16 (beyond 65504), the matrix keeps f32 scales and biases. Rows go by
/// runs on several threads, one row's values at a time (no f32 copy of the matrix). Returns
/// words, scales, biases.
fn requantize8(rows: usize, cols: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> lmx_core::Result<(Tensor, Tensor, Tensor)> {
    use half::f16;
    let groups = cols / 32;
    // `narrow` gives the grid scales and biases are held on: (down, up) roundings of a value.
    let quantize = |narrow: fn(f32) -> (f32, f32)| {
        let (mut words, mut scales, mut biases) = (vec![0u32; rows * cols / 4], vec![0f32; rows * groups], vec![0f32; rows * groups]);
        let threads = if rows * cols < (1 << 20) { 1 } else { std::thread::available_parallelism().map_or(1, |n| n.get()).min(8) };
        let per = rows.div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let parts = words.chunks_mut(per * cols / 4).zip(scales.chunks_mut(per * groups)).zip(biases.chunks_mut(per * groups));
            for (i, ((words, scales), biases)) in parts.enumerate() {
                let row = &row;
                scope.spawn(move || {
                    let mut values = vec![0f32; cols];
                    let (words, scales, biases) = (words.chunks_exact_mut(cols / 4), scales.chunks_exact_mut(groups), biases.chunks_exact_mut(groups));
                    for (r, ((words, scales), biases)) in words.zip(scales).zip(biases).enumerate() {
                        row(i * per + r, &mut values);
                        for (((v, w), s), b) in values.chunks_exact(32).zip(words.chunks_exact_mut(8)).zip(scales.iter_mut()).zip(biases.iter_mut()) {
                            let (lo, hi) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)));
                            let bias = narrow(lo).0;
                            let scale = narrow((hi - bias) / 255.0).1;
                            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                            // Rounded to nearest by the magic number (1.5 * 2^23): codes 0..=255.
                            const MAGIC: f32 = 12_582_912.0;
                            let code = |x: f32| (((x - bias) * inv).clamp(0.0, 255.0) + MAGIC).to_bits() - MAGIC.to_bits();
                            for (o, x) in w.iter_mut().zip(v.chunks_exact(4)) {
                                *o = code(x[0]) | code(x[1]) << 8 | code(x[2]) << 16 | code(x[3]) << 24;
                            }
                            (*s, *b) = (scale, bias);
                        }
                    }
                });
            }
        });
        (words, scales, biases)
    };
    // The f16 next to `v` on each side (`v` itself when it is one).
    fn f16_around(v: f32) -> (f32, f32) {
        let h = f16::from_f32(v);
        let next = |h: f16, up: bool| {
            let bits = h.to_bits();
            let positive = bits & 0x8000 == 0;
            // Moving away from zero adds one to the magnitude's bits; towards zero, takes one.
            let away = up == positive;
            if bits & 0x7fff == 0 {
                f16::from_bits(if up { 1 } else { 0x8001 })
            } else {
                f16::from_bits(if away { bits + 1 } else { bits - 1 })
            }
        };
        let x = h.to_f32();
        match x.partial_cmp(&v) {
            Some(std::cmp::Ordering::Less) => (x, next(h, true).to_f32()),
            Some(std::cmp::Ordering::Greater) => (next(h, false).to_f32(), x),
            _ => (x, x),
        }
    }
    let shape = (rows, groups);
    let (words, scales, biases) = quantize(f16_around);
    let words = Tensor::from_vec(words, (rows, cols / 4), &Device::Cpu)?;
    if scales.iter().chain(&biases).all(|v| v.is_finite()) {
        let half = |v: Vec<f32>| Tensor::from_vec(v.into_iter().map(f16::from_f32).collect::<Vec<_>>(), shape, &Device::Cpu);
        return Ok((words, half(scales)?, half(biases)?));
    }
    let (words, scales, biases) = quantize(|v| (v, v));
    Ok((Tensor::from_vec(words, (rows, cols / 4), &Device::Cpu)?, Tensor::from_vec(scales, shape, &Device::Cpu)?, Tensor::from_vec(biases, shape, &Device::Cpu)?))
}

/// The 256 values of one Q6_K block (210 bytes: 128 of low nibbles, 64 of high bit pairs, 16
/// signed scales, an f16 `d`), as llama.cpp's `dequantize_row_q6_K` computes them.
fn q6k_values(b: &[u8], out: &mut [f32]) {
    let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
    let d = half::f16::from_le_bytes([b[208], b[209]]).to_f32();
    // `d * scale` once per 16 values (llama.cpp's `d * sc * q` multiplies in that order).
    let ds: [f32; 16] = std::array::from_fn(|i| d * f32::from(sc[i] as i8));
    let value = |s: f32, q: u8| s * f32::from(q as i8 - 32);
    for (n, y) in out[..256].chunks_exact_mut(128).enumerate() {
        let (ql, qh, ds) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32], &ds[8 * n..8 * n + 8]);
        for l in 0..32 {
            let (a, c, h, i) = (ql[l], ql[l + 32], qh[l], l / 16);
            y[l] = value(ds[i], (a & 15) | (h & 3) << 4);
            y[l + 32] = value(ds[i + 2], (c & 15) | ((h >> 2) & 3) << 4);
            y[l + 64] = value(ds[i + 4], a >> 4 | ((h >> 4) & 3) << 4);
            y[l + 96] = value(ds[i + 6], c >> 4 | ((h >> 6) & 3) << 4);
        }
    }
}

/// A packed matrix's f32 scales and biases (the K-quants' products `d sc` and `dmin m`, which
/// need up to 17 bits) rounded to f16, when all of them fit: a sixth less to read a token at
/// 4 bits (0.625 bytes a weight instead of 0.75). Each scale and bias moves by at most 2^-11 of
/// itself, so a value `scale * q + bias` by at most 2^-11 of `|scale| * q + |bias|`: for Q4_K
/// under 1% of a step, where the quantization itself is off by up to half a step.
/// `LoadOptions::dequantize_gguf` keeps every value exact in f32.
fn narrow_params(scales: Tensor, biases: Tensor) -> lmx_core::Result<(Tensor, Tensor)> {
    if scales.dtype() != lmx_core::DType::F32 {
        return Ok((scales, biases));
    }
    let (s16, b16) = (scales.to_dtype(lmx_core::DType::F16)?, biases.to_dtype(lmx_core::DType::F16)?);
    if lmx_core::ops::all_finite(&s16)? && lmx_core::ops::all_finite(&b16)? {
        Ok((s16, b16))
    } else {
        Ok((scales, biases))
    }
}

/// A matrix stored as GGML Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K or Q5_K (`ggml_type`; `raw` its
/// blocks, `dims` its shape, rows first) in MLX's affine format without loss: packed words
/// (an LSB-first bitstream of 4-, 5- or 8-bit codes), scales and biases of groups of 32, and
/// the bits. Every element of these formats is `scale * q + bias` for its group of 32: Q4_0
/// `d (q - 8)` is scale `d`, bias `-8 d`; Q4_1 `d q + m`; Q5_0 `d (q - 16)`; Q5_1 `d q + m`;
/// Q8_0 `d q` (q signed) is code `q + 128`, bias `-128 d`; Q4_K and Q5_K sub-blocks of 32 are
/// `d sc q - dmin m` with 6-bit `sc` and `m`, scale `d sc` (exact in f32) and bias `-dmin m`.
/// Each scale times a code is exact in f32 and the bias is added once, so dequantizing gives
/// llama.cpp's values exactly (a zero of Q4_0 with a negative `d` comes out +0 where llama.cpp's
/// `0 * d` gives -0). Scales and biases are f16 where f16 holds them all exactly (the legacy
/// types, each `d` and `m` an f16), else f32 (the K-quants' products `d sc`). MLX's own GGUF
/// reader keeps Q4_0, Q4_1 and Q8_0 the same way. None for any other type.
pub fn block_to_affine(ggml_type: u32, raw: &[u8], dims: &[usize]) -> Option<lmx_core::Result<(Tensor, Tensor, Tensor, usize)>> {
    // 5-bit codes stay a 5-bit bitstream (0.75 bytes a weight with f16 scales and biases):
    // the model builder widens them to bytes where the integer kernels do not read 5 bits
    // (`QuantizedMatrix::for_integer_kernels`; 1.125 bytes a weight), as it widens an MLX
    // 5-bit folder's.
    let (block_bytes, block_len, bits) = match ggml_type {
        GGML_Q4_0 => (18, 32, 4),
        GGML_Q4_1 => (20, 32, 4),
        GGML_Q5_0 => (22, 32, 5),
        GGML_Q5_1 => (24, 32, 5),
        GGML_Q8_0 => (34, 32, 8),
        GGML_Q4_K => (144, 256, 4),
        GGML_Q5_K => (176, 256, 5),
        _ => return None,
    };
    // A group of 32 codes of `bits` bits fills exactly `bits` words of the bitstream, so each
    // group has its own words and runs of blocks convert apart, on several threads.
    let per_block = block_len / 32;
    let blocks = raw.len() / block_bytes;
    let groups = blocks * per_block;
    let mut words = vec![0u32; groups * bits];
    let (mut scales, mut biases) = (vec![0f32; groups], vec![0f32; groups]);
    let threads = if raw.len() < (1 << 20) { 1 } else { std::thread::available_parallelism().map_or(1, |n| n.get()).min(8) };
    let run = blocks.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let parts = raw.chunks(run * block_bytes).zip(words.chunks_mut(run * per_block * bits)).zip(scales.chunks_mut(run * per_block).zip(biases.chunks_mut(run * per_block)));
        for ((raw, words), (scales, biases)) in parts {
            let mut convert = move || match bits {
                4 => blocks_to_groups::<4>(ggml_type, block_bytes, raw, words, scales, biases),
                5 => blocks_to_groups::<5>(ggml_type, block_bytes, raw, words, scales, biases),
                _ => blocks_to_groups::<8>(ggml_type, block_bytes, raw, words, scales, biases),
            };
            if threads == 1 {
                convert();
            } else {
                s.spawn(convert);
            }
        }
    });
    let (lead, cols) = dims.split_at(dims.len().saturating_sub(1));
    let cols = cols.first().copied().unwrap_or(0);
    let shape = |per_bits: usize| lead.iter().copied().chain(std::iter::once(cols * per_bits / 32)).collect::<Vec<_>>();
    // f16 where every scale and bias round-trips exactly (slice conversions: vectorized).
    let to_f16 = |v: &[f32]| -> Option<Vec<half::f16>> {
        use half::slice::HalfFloatSliceExt;
        let mut h = vec![half::f16::ZERO; v.len()];
        h.convert_from_f32_slice(v);
        let mut back = [0f32; 1024];
        let exact = h.chunks(1024).zip(v.chunks(1024)).all(|(h, v)| {
            h.convert_to_f32_slice(&mut back[..h.len()]);
            back[..h.len()] == *v
        });
        exact.then_some(h)
    };
    let small = to_f16(&scales).zip(to_f16(&biases));
    let made = (|| {
        let (s, b) = match small {
            Some((s, b)) => (Tensor::from_vec(s, shape(1), &Device::Cpu)?, Tensor::from_vec(b, shape(1), &Device::Cpu)?),
            None => (Tensor::from_vec(scales, shape(1), &Device::Cpu)?, Tensor::from_vec(biases, shape(1), &Device::Cpu)?),
        };
        Ok((Tensor::from_vec(words, shape(bits), &Device::Cpu)?, s, b, bits))
    })();
    Some(made)
}

/// The low nibbles of the 8 bytes of `bytes` (each byte below 16) as one word, byte k's in
/// bits 4k to 4k + 3.
fn nibbles_to_word(bytes: u64) -> u32 {
    let y = (bytes | bytes >> 4) & 0x00FF_00FF_00FF_00FF;
    let y = (y | y >> 8) & 0x0000_FFFF_0000_FFFF;
    ((y | y >> 16) & 0xFFFF_FFFF) as u32
}

/// Converts whole blocks `raw` of one [`block_to_affine`] type into their groups of 32: each
/// group's `BITS` words of codes (LSB first) and its scale and bias.
fn blocks_to_groups<const BITS: usize>(ggml_type: u32, block_bytes: usize, raw: &[u8], words: &mut [u32], scales: &mut [f32], biases: &mut [f32]) {
    let f16_at = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32_const();
    // The legacy 4- and 8-bit types, most GGUF files, word by word: a Q4_0 / Q4_1 group's
    // first 8 bytes hold elements 0-7 (low nibbles) and 16-23 (high), the next 8 elements 8-15
    // and 24-31; a Q8_0 code is its signed byte plus 128, the byte with its top bit flipped.
    if matches!(ggml_type, GGML_Q4_0 | GGML_Q4_1 | GGML_Q8_0) {
        let at = if ggml_type == GGML_Q4_1 { 4 } else { 2 };
        for (((b, out), scale), bias) in raw.chunks_exact(block_bytes).zip(words.chunks_exact_mut(BITS)).zip(scales.iter_mut()).zip(biases.iter_mut()) {
            let d = f16_at(b, 0);
            let qs = &b[at..];
            if ggml_type == GGML_Q8_0 {
                for (w, q) in out.iter_mut().zip(qs.chunks_exact(4)) {
                    *w = u32::from_le_bytes([q[0], q[1], q[2], q[3]]) ^ 0x8080_8080;
                }
                (*scale, *bias) = (d, -128.0 * d);
            } else {
                let half = |i: usize| u64::from_le_bytes([qs[i], qs[i + 1], qs[i + 2], qs[i + 3], qs[i + 4], qs[i + 5], qs[i + 6], qs[i + 7]]);
                let (lo, hi) = (half(0), half(8));
                const LOW: u64 = 0x0F0F_0F0F_0F0F_0F0F;
                out.copy_from_slice(&[nibbles_to_word(lo & LOW), nibbles_to_word(hi & LOW), nibbles_to_word((lo >> 4) & LOW), nibbles_to_word((hi >> 4) & LOW)]);
                (*scale, *bias) = if ggml_type == GGML_Q4_1 { (d, f16_at(b, 2)) } else { (d, -8.0 * d) };
            }
        }
        return;
    }
    let mut g = 0;
    // `put` stores group g's words, scale and bias; `pack` makes the words of 32 codes (each
    // below 2^BITS): 8 bits are the bytes themselves; 4 bits, eight codes a word, code k in
    // bits 4k; 5 bits, the LSB-first bitstream, code k at bit 5k of the group's 5 words.
    let mut put = |g: &mut usize, out: [u32; BITS], scale: f32, bias: f32| {
        words[*g * BITS..(*g + 1) * BITS].copy_from_slice(&out);
        scales[*g] = scale;
        biases[*g] = bias;
        *g += 1;
    };
    let pack = |codes: [u8; 32]| -> [u32; BITS] {
        let mut out = [0u32; BITS];
        if BITS == 5 {
            // The bitstream a word at a time: codes gather in `bits` until a word is full.
            let (mut bits, mut held, mut words) = (0u64, 0, out.iter_mut());
            for &q in &codes {
                bits |= u64::from(q) << held;
                held += BITS;
                if held >= 32 {
                    *words.next().expect("32 codes fill BITS words") = bits as u32;
                    (bits, held) = (bits >> 32, held - 32);
                }
            }
            return out;
        }
        for (w, c) in out.iter_mut().zip(codes.chunks_exact(32 / BITS)) {
            *w = if BITS == 8 { u32::from_le_bytes([c[0], c[1], c[2], c[3]]) } else { nibbles_to_word(u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])) };
        }
        out
    };
    for b in raw.chunks_exact(block_bytes) {
        let d = f16_at(b, 0);
        // Byte j of 16 holds element j in its low nibble and element j + 16 in its high one.
        let nibbles = |qs: &[u8]| -> [u8; 32] { std::array::from_fn(|k| if k < 16 { qs[k] & 15 } else { qs[k - 16] >> 4 }) };
        // Q5_0 / Q5_1: the fifth bit of element k is bit k of the 32-bit `qh`.
        let fifth = |qh: u32, low: [u8; 32]| -> [u8; 32] { std::array::from_fn(|k| low[k] | (((qh >> k) & 1) as u8) << 4) };
        match ggml_type {
            GGML_Q5_0 => put(&mut g, pack(fifth(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), nibbles(&b[6..22]))), d, -16.0 * d),
            GGML_Q5_1 => put(&mut g, pack(fifth(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), nibbles(&b[8..24]))), d, f16_at(b, 2)),
            _ => {
                // Q4_K / Q5_K: d, dmin, 12 bytes of 6-bit scales and mins, (Q5_K: 32 bytes of
                // fifth bits,) then 128 bytes of nibbles; four runs of 64 elements, each two
                // sub-blocks of 32: the low nibbles of 32 bytes, then their high nibbles.
                let dmin = f16_at(b, 2);
                let sm = &b[4..16];
                let scale_min = |j: usize| -> (f32, f32) {
                    let (sc, m) = if j < 4 { (sm[j] & 63, sm[j + 4] & 63) } else { ((sm[j + 4] & 15) | (sm[j - 4] >> 6) << 4, (sm[j + 4] >> 4) | (sm[j] >> 6) << 4) };
                    (d * f32::from(sc), dmin * f32::from(m))
                };
                let (qh, qs) = if ggml_type == GGML_Q5_K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
                // Eight bytes at a time: a sub-block's codes are a nibble of each byte of its
                // run (and for Q5_K one bit of each byte of `qh`).
                let eight = |v: &[u8], i: usize| u64::from_le_bytes([v[i], v[i + 1], v[i + 2], v[i + 3], v[i + 4], v[i + 5], v[i + 6], v[i + 7]]);
                const LOW: u64 = 0x0F0F_0F0F_0F0F_0F0F;
                for run in 0..4 {
                    for half in 0..2 {
                        let (scale, min) = scale_min(2 * run + half);
                        let mut out = [0u32; BITS];
                        let mut codes = [0u8; 32];
                        for i in 0..4 {
                            let low = (eight(qs, 32 * run + 8 * i) >> (4 * half)) & LOW;
                            match qh {
                                None => out[i] = nibbles_to_word(low),
                                Some(h) => {
                                    let eight_codes = low | ((eight(h, 8 * i) >> (2 * run + half)) & 0x0101_0101_0101_0101) << 4;
                                    codes[8 * i..8 * i + 8].copy_from_slice(&eight_codes.to_le_bytes());
                                }
                            }
                        }
                        if qh.is_some() {
                            out = pack(codes);
                        }
                        put(&mut g, out, scale, -min);
                    }
                }
            }
        }
    }
}

/// Reads and converts a GGUF file, every tensor but MXFP4 experts dequantized to f32 (what
/// `lmx convert --gguf` writes).
pub fn load(path: &Path) -> Result<GgufModel> {
    load_with(path, false)
}

/// Reads and converts a GGUF file; `pack` keeps the [`PACKABLE`] matrices stored in a
/// [`block_to_affine`] type packed (as a model runs them: a fifth to a third of f32's bytes,
/// and the quantized products), the rest dequantized to f32.
///
/// The file is mapped, not read: each tensor is converted from the file's pages as they lie,
/// with no copy of its bytes in between (a Llama-1B-shaped BF16 file, 2.5 GB: the copies and
/// the fresh pages they filled were most of its load time).
pub fn load_with(path: &Path, pack: bool) -> Result<GgufModel> {
    let file = File::open(path).map_err(|e| IoError::io(path, e))?;
    let meta = file.metadata().map_err(|e| IoError::io(path, e))?;
    if !meta.is_file() || meta.len() == 0 {
        // Nothing to map (a pipe, an empty file): read, for the same checks and messages.
        let mut bytes = Vec::new();
        (&file).read_to_end(&mut bytes).map_err(|e| IoError::io(path, e))?;
        return load_bytes(&bytes, path, pack, &|_, _| ());
    }
    // SAFETY: the file is mapped read-only; lmx never writes to a checkpoint it is reading,
    // and a concurrent writer outside lmx is the user's responsibility (as for safetensors
    // files, weights.rs).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| IoError::io(path, e))?;
    // Each tensor's pages leave the process once converted (they stay in the page cache), so
    // that the mapped file does not add to the peak resident memory.
    // SAFETY: sysconf only reads a constant of the system (4 KiB, or 16 or 64 KiB on some
    // ARM kernels, where a 4 KiB-aligned range would be refused).
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok().filter(|p| p.is_power_of_two()).unwrap_or(4096);
    let done = |start: usize, len: usize| {
        let (from, to) = (start / page * page, (start + len).next_multiple_of(page).min(map.len()));
        // SAFETY: a read-only shared mapping of a file: dropping its pages loses nothing (a
        // later read faults them in again from the file).
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from) };
    };
    load_bytes(&map, path, pack, &done)
}

/// The modules (last segment of the Hugging Face path) whose weights in a [`block_to_affine`] type
/// [`load_with`] keeps packed: the plain projections and the embeddings, which the layer
/// builder reads quantized as it reads MLX's quantized folders. Fused projections (Phi-3's
/// `qkv_proj`), routers and MLA's latent projections are dequantized.
pub const PACKABLE: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"];

/// Reads and converts GGUF bytes of length `file_len` from `reader` (`path` names them in
/// errors; `pack` as for [`load_with`]).
pub fn load_from(mut reader: impl Read + Seek, file_len: u64, path: &Path, pack: bool) -> Result<GgufModel> {
    let mut bytes = Vec::new();
    reader.seek(SeekFrom::Start(0)).map_err(|e| IoError::io(path, e))?;
    reader.take(file_len).read_to_end(&mut bytes).map_err(|e| IoError::io(path, e))?;
    load_bytes(&bytes, path, pack, &|_, _| ())
}

/// Calls `self.0(start, len)` when dropped: the end of a tensor's turn in [`load_bytes`].
struct Done<'a>(&'a dyn Fn(usize, usize), usize, usize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        (self.0)(self.1, self.2)
    }
}

/// [`load_from`] on the file's bytes, in memory or mapped; `done(start, len)` after each
/// tensor's bytes have been converted.
fn load_bytes(bytes: &[u8], path: &Path, pack: bool, done: &dyn Fn(usize, usize)) -> Result<GgufModel> {
    let file_len = bytes.len() as u64;
    let header = read_header(&mut std::io::Cursor::new(bytes), file_len).map_err(|e| gguf_err(path, format!("not a valid GGUF file ({e}); the file may be truncated: download it again")))?;
    if !header.alignment.is_power_of_two() {
        return Err(gguf_err(path, format!("`general.alignment` is {}; it must be a positive power of two (llama.cpp writes 32)", header.alignment)));
    }
    // Check every tensor fits in the file before reading any, so a truncated download fails
    // with one clear message instead of midway.
    for (name, info) in &header.tensors {
        let Some((block, block_bytes)) = info.block() else {
            return Err(gguf_err(
                path,
                format!("tensor `{name}` has GGML type {}, which lmx cannot read (it reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q8_K and MXFP4)", info.ggml_type),
            ));
        };
        // Sizes from the header are checked for overflow: a wrapped product would pass the
        // length check and then ask for an impossible allocation.
        let elems = info.dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let bytes = elems.filter(|n| n % block == 0 && info.dims.last().is_none_or(|c| c % block == 0)).and_then(|n| (n / block).checked_mul(block_bytes));
        let Some(bytes) = bytes else {
            return Err(gguf_err(path, format!("tensor `{name}` has an impossible shape {:?} for GGML type {}", info.dims, info.ggml_type)));
        };
        let end = header.data_offset.checked_add(info.offset).and_then(|e| e.checked_add(bytes as u64)).unwrap_or(u64::MAX);
        if end > file_len {
            return Err(gguf_err(path, format!("truncated: tensor `{name}` ends at byte {end} but the file has {file_len} bytes; download it again")));
        }
    }
    let meta = Meta { metadata: &header.metadata, path };
    // The tokenizer first: the memory its conversion passes through is free again, and reused,
    // by the time the tensors are read (after them it stayed in the process, ~24 MB for
    // SmolLM2's 49k tokens).
    let (tokenizer, tokenizer_config, bos, eos) = tokenizer_from_meta(&meta)?;
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
    let mut mxfp4 = false;
    // Modules kept packed from affine blocks, and their bits.
    let mut packed: Vec<(String, usize)> = Vec::new();
    let unpermute_qk = |hf: &str, t: Tensor| -> lmx_core::Result<Tensor> {
        if PERMUTED_QK.contains(&arch.as_str()) && hf.contains("self_attn.q_proj") {
            unpermute(&t, n_heads)
        } else if PERMUTED_QK.contains(&arch.as_str()) && hf.contains("self_attn.k_proj") {
            unpermute(&t, n_kv_heads)
        } else {
            Ok(t)
        }
    };
    for (name, info) in &header.tensors {
        let tensor_err = |e: &dyn std::fmt::Display| gguf_err(path, format!("tensor `{name}`: {e}"));
        let (block, block_bytes) = info.block().unwrap_or((1, 1));
        // Inside the file: checked for every tensor above.
        let start = (header.data_offset + info.offset) as usize;
        let raw = &bytes[start..start + info.dims.iter().product::<usize>() / block * block_bytes];
        // Whichever way this tensor's turn ends, its bytes are done with (every conversion
        // below copies them).
        let _done = Done(done, start, raw.len());
        if info.ggml_type == GGML_MXFP4 {
            // Kept packed, in MLX's MXFP4 layout (`weight` words and `scales`), which the
            // layer builder reads as it reads an MLX `mxfp4` folder.
            let hf = hf_name_in(&arch, name).ok_or_else(|| gguf_err(path, format!("tensor `{name}` has no Hugging Face equivalent that lmx knows (architecture `{arch}`)")))?;
            let Some(module) = hf.strip_suffix(".weight") else { return Err(tensor_err(&"MXFP4 is only read for weight matrices")) };
            let (words, scales) = mxfp4_to_mlx(raw, &info.dims).map_err(|e| tensor_err(&e))?;
            tensors.insert(hf.clone(), words);
            tensors.insert(format!("{module}.scales"), scales);
            mxfp4 = true;
            continue;
        }
        let module = hf_name_in(&arch, name).and_then(|hf| hf.strip_suffix(".weight").map(str::to_string));
        if let Some(module) = module.filter(|m| pack && PACKABLE.iter().any(|p| m.rsplit('.').next() == Some(*p))) {
            let non_finite = || IoError::NonFinite { path: path.to_path_buf(), key: name.clone() };
            let made = match block_to_affine(info.ggml_type, raw, &info.dims) {
                Some(made) => {
                    let (words, scales, biases, bits) = made.map_err(|e| tensor_err(&e))?;
                    if !lmx_core::ops::all_finite(&scales)? || !lmx_core::ops::all_finite(&biases)? {
                        return Err(non_finite());
                    }
                    let (scales, biases) = narrow_params(scales, biases)?;
                    Some((words, scales, biases, bits))
                }
                // Groups of 16 (Q6_K, Q3_K, Q2_K), which no MLX affine group holds exactly:
                // requantized to 8 bits in groups of 32 (1.125 bytes a weight with f16 scales
                // and biases, where f32 took 4 and the dense products).
                None if SIXTEENS.contains(&info.ggml_type) && info.dims.len() == 2 && info.dims[1] % 32 == 0 => {
                    let (rows, cols) = (info.dims[0], info.dims[1]);
                    let (words, scales, biases) = if info.ggml_type == GGML_Q6_K && cols % 256 == 0 {
                        // Row by row from the blocks (210 bytes per 256 values).
                        let row_bytes = cols / 256 * 210;
                        if raw.len() < rows * row_bytes {
                            return Err(tensor_err(&"fewer Q6_K blocks than its shape needs"));
                        }
                        let made = requantize8(rows, cols, |r, out| {
                            for (b, y) in raw[r * row_bytes..(r + 1) * row_bytes].chunks_exact(210).zip(out.chunks_exact_mut(256)) {
                                q6k_values(b, y);
                            }
                        })?;
                        if !lmx_core::ops::all_finite(&made.1)? || !lmx_core::ops::all_finite(&made.2)? {
                            return Err(non_finite());
                        }
                        made
                    } else {
                        // Q3_K, Q2_K: dequantized whole by candle, then requantized.
                        let dtype = ggml_dtype(info.ggml_type).ok_or_else(|| tensor_err(&"unreadable type"))?;
                        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, raw, info.dims.clone(), &Device::Cpu).map_err(|e| tensor_err(&e))?;
                        let t = q.dequantize(&Device::Cpu).map_err(|e| tensor_err(&e))?;
                        if !lmx_core::ops::all_finite(&t)? {
                            return Err(non_finite());
                        }
                        let values = t.flatten_all()?.to_vec1::<f32>()?;
                        requantize8(rows, cols, |r, out| out.copy_from_slice(&values[r * cols..(r + 1) * cols]))?
                    };
                    Some((words, scales, biases, 8))
                }
                None => None,
            };
            if let Some((words, scales, biases, bits)) = made {
                // Un-permuting moves whole rows: the packed words, scales and biases alike.
                tensors.insert(format!("{module}.weight"), unpermute_qk(&module, words)?);
                tensors.insert(format!("{module}.scales"), unpermute_qk(&module, scales)?);
                tensors.insert(format!("{module}.biases"), unpermute_qk(&module, biases)?);
                packed.push((module, bits));
                continue;
            }
        }
        let dtype = ggml_dtype(info.ggml_type).ok_or_else(|| tensor_err(&"unreadable type"))?;
        let t = match float_dtype(info.ggml_type) {
            // A model's float matrices keep their dtype (a BF16 file computes in bf16, as a
            // bf16 folder does, at half the memory of f32); vectors (norms, rope factors) and
            // every tensor of a conversion become f32 as before.
            Some(stored) if pack && info.dims.len() >= 2 => Tensor::from_raw_buffer(raw, stored, &info.dims, &Device::Cpu).map_err(|e| tensor_err(&e))?,
            _ => {
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, raw, info.dims.clone(), &Device::Cpu).map_err(|e| tensor_err(&e))?;
                q.dequantize(&Device::Cpu).map_err(|e| tensor_err(&e))?
            }
        };
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
        let t = unpermute_qk(&hf, t)?;
        tensors.insert(hf, t);
    }
    let embed_rows = tensors.get("model.embed_tokens.weight").map(|t| t.dims()[0]);
    let n_layers = meta.uint(&arch_key("block_count"))?;
    let expert_count = meta.uint_opt(&arch_key("expert_count")).unwrap_or(0);
    let model_type = model_type(&arch, expert_count > 0);
    // Mixtral's block is `block_sparse_moe` (router `gate`, experts in `switch_mlp`).
    let rename = |k: String| if model_type == "mixtral" { k.replace(".mlp.gate.", ".block_sparse_moe.gate.").replace(".mlp.switch_mlp.", ".block_sparse_moe.switch_mlp.") } else { k };
    if model_type == "mixtral" {
        tensors = tensors.into_iter().map(|(k, t)| (rename(k), t)).collect();
    }

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
        } else if model_type != "gpt_oss" {
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
    if mxfp4 || !packed.is_empty() {
        // The modules with `scales`: MXFP4 experts (the default mode when there are any), and
        // the affine blocks kept packed, each named with its bits; everything else is float.
        let mut block = json!({"group_size": 32, "bits": 4, "mode": if mxfp4 { "mxfp4" } else { "affine" }});
        for (module, bits) in packed {
            block[rename(module)] = json!({"group_size": 32, "bits": bits, "mode": "affine"});
        }
        config.insert("quantization".into(), block);
    }
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
        "gpt-oss" => {
            // llama.cpp's gpt-oss: every layer routes to experts of `expert_feed_forward_length`
            // features, sliding-window layers first and alternating, YaRN with the ramp's ends
            // rounded (ggml's `rope_yarn_corr_dims` floors and ceils), SwiGLU clamped at 7.
            let experts = meta.uint(&key("expert_count"))?;
            set("num_local_experts", experts.into());
            set("intermediate_size", meta.uint_opt(&key("expert_feed_forward_length")).or(meta.uint_opt(&key("feed_forward_length"))).unwrap_or(0).into());
            set("layer_types", json!((0..n_layers).map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" }).collect::<Vec<_>>()));
            set("swiglu_limit", 7.0.into());
            if meta.str(&key("rope.scaling.type")).is_ok_and(|t| t == "yarn") {
                set(
                    "rope_scaling",
                    json!({
                        "rope_type": "yarn",
                        "factor": meta.float_opt(&key("rope.scaling.factor")).unwrap_or(1.0),
                        "original_max_position_embeddings": meta.uint_opt(&key("rope.scaling.original_context_length")).unwrap_or(4096),
                        "beta_fast": meta.float_opt(&key("rope.scaling.yarn_beta_fast")).unwrap_or(32.0),
                        "beta_slow": meta.float_opt(&key("rope.scaling.yarn_beta_slow")).unwrap_or(1.0),
                        "truncate": true,
                    }),
                );
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
    metadata: &'a HashMap<String, GValue>,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&GValue> {
        self.metadata.get(key).ok_or_else(|| gguf_err(self.path, format!("metadata key `{key}` is missing")))
    }
    fn str(&self, key: &str) -> Result<String> {
        self.get(key)?.to_string().cloned().map_err(|e| gguf_err(self.path, format!("`{key}`: {e}")))
    }
    fn uint(&self, key: &str) -> Result<usize> {
        self.uint_opt(key).ok_or_else(|| gguf_err(self.path, format!("metadata key `{key}` is missing or not an integer")))
    }
    fn uint_opt(&self, key: &str) -> Option<usize> {
        let v = self.metadata.get(key)?;
        v.to_u32().map(|x| x as usize).or_else(|_| v.to_u64().map(|x| x as usize)).or_else(|_| v.to_i32().map(|x| x as usize)).ok()
    }
    fn float_opt(&self, key: &str) -> Option<f64> {
        let v = self.metadata.get(key)?;
        v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()
    }
    fn bool_opt(&self, key: &str) -> Option<bool> {
        self.metadata.get(key)?.to_bool().ok()
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let list = self.get(key)?.to_vec().map_err(|e| gguf_err(self.path, format!("`{key}`: {e}")))?;
        list.iter().map(|v| v.to_string().cloned().map_err(|e| gguf_err(self.path, format!("`{key}`: {e}")))).collect()
    }
    fn floats(&self, key: &str) -> Vec<f64> {
        let Some(GValue::Array(list)) = self.metadata.get(key) else { return Vec::new() };
        list.iter().filter_map(|v| v.to_f32().map(f64::from).ok()).collect()
    }
    fn ints(&self, key: &str) -> Vec<i64> {
        let Some(GValue::Array(list)) = self.metadata.get(key) else { return Vec::new() };
        list.iter().filter_map(|v| v.to_i32().map(i64::from).or_else(|_| v.to_u32().map(i64::from)).ok()).collect()
    }
}

/// GPT-2 style pre-tokenizer regexes of the llama.cpp `tokenizer.ggml.pre` types lmx knows.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// o200k (GPT-4o, gpt-oss): case-aware letter runs with the contraction as a suffix.
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
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
        "gpt-4o" | "llama4" => split_then_bytelevel(GPT4O_SPLIT),
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

    /// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K blocks in MLX's affine format dequantize
    /// to exactly what llama.cpp's (candle's) dequantization gives, element for element (as
    /// values: -0 equals +0); other types are not taken.
    #[test]
    fn blocks_are_affine_groups_without_loss() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let types = [
            (GgmlDType::Q4_0, GGML_Q4_0),
            (GgmlDType::Q4_1, GGML_Q4_1),
            (GgmlDType::Q5_0, GGML_Q5_0),
            (GgmlDType::Q5_1, GGML_Q5_1),
            (GgmlDType::Q8_0, GGML_Q8_0),
            (GgmlDType::Q4K, GGML_Q4_K),
            (GgmlDType::Q5K, GGML_Q5_K),
        ];
        // The second shape's blocks (over 1 MB) convert on several threads.
        for ((dtype, id), (rows, cols)) in types.into_iter().flat_map(|t| [(t, (24, 256)), (t, (1040, 1024))]) {
            let w = (Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).expect("randn") * 3.0).expect("scale");
            let q = QTensor::quantize(&w, dtype).expect("quantize");
            let raw = q.data().expect("blocks");
            let (packed, scales, biases, bits) = block_to_affine(id, &raw, &[rows, cols]).expect("an affine block type").expect("converts");
            // 5-bit codes stay a 5-bit bitstream (the builder widens them where needed).
            let want_bits = match id {
                GGML_Q4_0 | GGML_Q4_1 | GGML_Q4_K => 4,
                GGML_Q5_0 | GGML_Q5_1 | GGML_Q5_K => 5,
                _ => 8,
            };
            assert_eq!(bits, want_bits, "{dtype:?}");
            // As the layer builder places them for an f32 model.
            let f32 = |t: &Tensor| t.to_dtype(lmx_core::DType::F32).expect("f32");
            let m = lmx_core::quant::QuantizedMatrix::from_tensors(&packed, &f32(&scales), &f32(&biases), bits, 32).expect("an MLX matrix");
            let (got, want) = (m.dequantize().expect("dequantize"), q.dequantize(&Device::Cpu).expect("ggml dequantize"));
            let values = |t: Tensor| t.to_dtype(lmx_core::DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).expect("values");
            let (got, want) = (values(got), values(want));
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            let examples: Vec<_> = got.iter().zip(&want).filter(|(a, b)| a != b).take(4).collect();
            assert_eq!(differ, 0, "{dtype:?}: {differ} of {} values differ from llama.cpp's: {examples:?}", want.len());
        }
        assert!(block_to_affine(GGML_Q6_K, &[0u8; 210], &[256]).is_none(), "Q6_K's groups of 16 are not affine groups of 32");
    }

    /// lmx's own Q6_K block reader (the requantizer's source, row by row) gives llama.cpp's
    /// (candle's) values exactly.
    #[test]
    fn q6k_blocks_read_as_llama_cpp_does() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let w = (Tensor::randn(0f32, 1.0, (8, 512), &Device::Cpu).expect("randn") * 3.0).expect("scale");
        let q = QTensor::quantize(&w, GgmlDType::Q6K).expect("quantize");
        let raw = q.data().expect("blocks");
        let mut got = vec![0f32; 8 * 512];
        for (b, y) in raw.chunks_exact(210).zip(got.chunks_exact_mut(256)) {
            q6k_values(b, y);
        }
        let want = q.dequantize(&Device::Cpu).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).expect("values");
        assert!(got == want, "Q6_K values differ from llama.cpp's");
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
        // (type, rms error bound, whether its matrices stay packed)
        let types = [
            (GgmlDType::Q8_0, 0.01f32, true),
            (GgmlDType::Q4_0, 0.12, true),
            (GgmlDType::Q4_1, 0.15, true),
            (GgmlDType::Q4K, 0.15, true),
            (GgmlDType::Q5K, 0.1, true),
            (GgmlDType::Q6K, 0.03, true),
            (GgmlDType::F16, 0.001, false),
            (GgmlDType::BF16, 0.005, false),
        ];
        for (dtype, tol, affine) in types {
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
            // Packed (as a model runs it): the same values, q/k rows un-permuted alike.
            let packed = load_with(&path, true).expect("lmx reads the GGUF, packed");
            let _ = std::fs::remove_file(&path);
            assert_eq!(model.config["tie_word_embeddings"], true);
            assert_eq!(model.config["num_key_value_heads"], n_kv);
            for (g, h, want) in &hf {
                let got = &model.tensors[*h];
                let err = (got - want).and_then(|d| d.sqr()).and_then(|d| d.mean_all()).and_then(|d| d.to_scalar::<f32>()).expect("err").sqrt();
                assert!(err < tol, "{dtype:?} {g} -> {h}: rms error {err} (tolerance {tol})");
                let module = h.trim_end_matches(".weight");
                let spec = &packed.config["quantization"][module];
                if !affine || want.rank() == 1 {
                    assert!(spec.is_null(), "{dtype:?} {h}: packed, yet not an affine block type");
                    // A model's float matrices keep the file's dtype; its vectors and the rest become f32.
                    let kept = match dtype {
                        GgmlDType::F16 if want.rank() == 2 => lmx_core::DType::F16,
                        GgmlDType::BF16 if want.rank() == 2 => lmx_core::DType::BF16,
                        _ => lmx_core::DType::F32,
                    };
                    let t = &packed.tensors[*h];
                    assert_eq!(t.dtype(), kept, "{dtype:?} {h}");
                    let values = |t: &Tensor| t.to_dtype(lmx_core::DType::F32).and_then(|t| t.flatten_all()).and_then(|t| t.to_vec1::<f32>()).expect("values");
                    assert!(values(t) == values(got), "{dtype:?} {h}: the model's values differ from the conversion's");
                    continue;
                }
                let f32 = |t: &Tensor| t.to_dtype(lmx_core::DType::F32).expect("f32");
                let part = |p: &str| f32(&packed.tensors[&format!("{module}.{p}")]);
                let bits = spec["bits"].as_u64().expect("bits") as usize;
                let q = lmx_core::quant::QuantizedMatrix::from_tensors(&packed.tensors[*h], &part("scales"), &part("biases"), bits, 32).expect("a packed matrix");
                let values = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("values");
                let (q, got) = (values(&q.dequantize().expect("dequantize")), values(got));
                let rms = |a: &[f32], b: &[f32]| (a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>() / a.len() as f32).sqrt();
                if dtype == GgmlDType::Q6K {
                    // Requantized to 8 bits: within half a step of a group, (max - min) / 510
                    // (the f16 scale rounded up: 2^-10 more at most).
                    assert_eq!(bits, 8, "{h}");
                    assert_eq!(packed.tensors[&format!("{module}.scales")].dtype(), lmx_core::DType::F16, "{h}");
                    let bound = got.iter().fold(0f32, |m, v| m.max(v.abs())) / 255.0 * 1.002;
                    let worst = q.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(worst <= bound, "{h}: requantized values {worst} from the dequantized ones (bound {bound})");
                } else if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K) {
                    // Scales and biases rounded to f16 (half an ulp: 2^-11 of each): a value
                    // q * s + b moves by at most 2^-11 (q_max |s| + |b|) of its group, plus f32
                    // rounding. bf16 would move them by up to 2^-8. (A bound on each value, not
                    // on a ratio to the quantization's error: that ratio depends on the draw.)
                    let (scales, biases) = (values(&part("scales")), values(&part("biases")));
                    let q_max = ((1u32 << bits) - 1) as f32;
                    for (i, (a, b)) in q.iter().zip(&got).enumerate() {
                        let (s, z) = (scales[i / 32].abs(), biases[i / 32].abs());
                        let bound = (q_max * s + z) * (0.5f32.powi(11) * 1.001 + 1e-6);
                        assert!((a - b).abs() <= bound, "{dtype:?} {h} value {i}: f16 scales moved it by {} (bound {bound})", (a - b).abs());
                    }
                    let (narrowing, quantization) = (rms(&q, &got), rms(&got, &values(want)));
                    assert!(narrowing < 0.05 * quantization, "{dtype:?} {h}: f16 scales moved values by {narrowing} (rms), the quantization by {quantization}");
                } else {
                    assert!(q == got, "{dtype:?} {h}: packed values differ from the dequantized ones");
                }
            }
        }
    }

    /// `general.alignment` is found behind arrays of strings, and 0 is refused.
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
            let len = bytes.get_ref().len() as u64;
            bytes.set_position(0);
            assert_eq!(Some(read_header(&mut bytes, len).expect("header").alignment), want);
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
