//! Multi-head attention with grouped key/value heads (GQA), as the Llama family and its
//! descendants use it: q/k/v/o projections (optional biases), optional RMS norms on each query
//! and key head (Qwen3, Gemma 3), rotary embeddings, an optional sliding window, optional
//! logit soft-capping (Gemma 2), optional attention sinks (gpt-oss), and the KV cache.
//!
//! Tensor parallelism divides the query heads over the ranks as evenly as possible, also when
//! they do not divide evenly (9 heads over 2 ranks: 5 + 4). Each rank holds the key/value heads
//! its query heads use; a key/value head whose query heads straddle two ranks is held by both
//! (SmolLM2's 9 query / 3 key-value heads over 2 ranks: rank 0 has query heads 0-4 and key/value
//! heads 0-1, rank 1 query heads 5-8 and key/value heads 1-2). `o_proj` is row-parallel over
//! the same query heads, so one all-sum per attention block restores the full output.

use lmx_core::cpu_step::StepAttention;
use lmx_core::quant::CodeTarget;
use lmx_core::{ops, Module, Result, Tensor};

use crate::builder::{Builder, Shard};
use crate::error::BuildError;
use crate::kv_cache::{KvCache, KvView};
use crate::linear::{Bias, Linear, RmsNorm};

/// The shape and options of an attention block (from config.json).
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    /// Model width (input and output features).
    pub hidden_size: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (GQA: divides `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Biases on q_proj, k_proj and v_proj.
    pub qkv_bias: bool,
    /// A bias on o_proj.
    pub o_bias: bool,
    /// RMS norms `q_norm` / `k_norm` over each head before the rotation, with this epsilon.
    pub qk_norm_eps: Option<f64>,
    /// Keys `window` or more positions behind a query are not attended to.
    pub sliding_window: Option<usize>,
    /// Attention logits become `cap * tanh(logits / cap)`.
    pub softcap: Option<f64>,
    /// The logit scale; 1/sqrt(head_dim) when None.
    pub scale: Option<f64>,
    /// A learned sink logit per query head, `self_attn.sinks` (n_heads) (gpt-oss).
    pub sinks: bool,
    /// `q_norm` / `k_norm` multiply by `1 + weight` (Gemma 3).
    pub qk_norm_one_plus: bool,
    /// Which rotary table of the [`AttentionInput`] rotates this layer (0: the model's).
    pub rope_table: usize,
    /// Features of each head that rotate (the first ones); all when None.
    pub rotary_dim: Option<usize>,
    /// q, k and v are stored as one `qkv_proj` (rows: queries, keys, values; Phi-3).
    pub fused_qkv: bool,
}

/// The largest head width lmx builds (the rotary tables and score buffers scale with it).
const MAX_HEAD_DIM: usize = 4096;

impl AttentionConfig {
    /// Plain GQA attention: no biases, norms, window or capping.
    pub fn new(hidden_size: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        Self {
            hidden_size,
            n_heads,
            n_kv_heads,
            head_dim,
            qkv_bias: false,
            o_bias: false,
            qk_norm_eps: None,
            sliding_window: None,
            softcap: None,
            scale: None,
            sinks: false,
            qk_norm_one_plus: false,
            rope_table: 0,
            rotary_dim: None,
            fused_qkv: false,
        }
    }

    /// Plain GQA attention from config.json's `num_attention_heads`, `num_key_value_heads`
    /// (default: one per query head) and `head_dim` (default: `hidden_size / heads`), each
    /// checked here, where they enter: at least one head, query heads a multiple of the
    /// key/value heads, an even head width (RoPE rotates pairs) of at most 4096.
    pub fn from_heads(hidden_size: usize, num_attention_heads: usize, num_key_value_heads: Option<usize>, head_dim: Option<usize>) -> std::result::Result<Self, BuildError> {
        let bad = |key, value: usize, allowed| BuildError::ConfigValue { key, value: value.to_string(), allowed };
        if num_attention_heads == 0 {
            return Err(bad("num_attention_heads", 0, "a model needs at least one attention head"));
        }
        let n_kv = num_key_value_heads.unwrap_or(num_attention_heads);
        if n_kv == 0 || num_attention_heads % n_kv != 0 {
            return Err(bad("num_key_value_heads", n_kv, "it must be at least 1 and divide num_attention_heads"));
        }
        let head_dim = head_dim.unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > MAX_HEAD_DIM {
            return Err(bad("head_dim", head_dim, "a head width must be even, at least 2 and at most 4096 (head_dim, or hidden_size / num_attention_heads)"));
        }
        Ok(Self::new(hidden_size, num_attention_heads, n_kv, head_dim))
    }
}

/// A causal mask's shape: (queries, keys, window).
type MaskKey = (usize, usize, Option<usize>);

/// What every layer's attention needs for one forward pass: the rotary angles of each row's
/// positions, and the causal masks the layers ask for (built once per shape).
#[derive(Debug)]
pub struct AttentionInput {
    /// Rotary tables: one for most models; Gemma 3's local layers rotate by a second one.
    tables: Vec<Angles>,
    /// Additive masks by (queries, keys, window).
    masks: std::sync::Mutex<Vec<(MaskKey, Tensor)>>,
}

/// One rotary table's angles for a forward pass.
#[derive(Debug)]
pub(crate) struct Angles {
    /// (cos, sin), each (seq_len, head_dim / 2): one pair shared by every row of the batch,
    /// or one per row (sequences at different positions).
    rows: Vec<(Tensor, Tensor)>,
    /// The rows' angles stacked, (b, seq_len, head_dim / 2) each, built at first use.
    stacked: std::sync::OnceLock<(Tensor, Tensor)>,
}

impl AttentionInput {
    /// Angles for each row (`rows.len()` is 1 or the batch size).
    pub fn new(rows: Vec<(Tensor, Tensor)>) -> Self {
        Self { tables: vec![Angles { rows, stacked: Default::default() }], masks: Default::default() }
    }

    /// Adds a rotary table (index 1, 2, ...: `AttentionConfig::rope_table`) with angles for
    /// each row, for layers that rotate by another base.
    pub fn with_table(mut self, rows: Vec<(Tensor, Tensor)>) -> Self {
        self.tables.push(Angles { rows, stacked: Default::default() });
        self
    }

    pub(crate) fn table(&self, table: usize) -> Result<&Angles> {
        match self.tables.get(table) {
            Some(t) => Ok(t),
            None => lmx_core::bail!("attention input without rotary table {table}"),
        }
    }
}

/// Whether a batch's rows rotate in one op on a GPU too (the rows' angles stacked, once a step),
/// as on the CPU: two launches a layer instead of two a row. `LMX_CUDA_BATCH_ROPE=0`: row by row,
/// as before, for comparisons (the same kernel and values either way).
fn gpu_rows_rotate_together() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LMX_CUDA_BATCH_ROPE").is_ok_and(|v| v == "0"))
}

impl Angles {
    /// Angles for rotating every row of a batch in one op: the shared (seq_len, head_dim / 2)
    /// pair, or the rows' pairs stacked to (b, seq_len, head_dim / 2).
    fn per_row_angles(&self) -> Result<Option<(&Tensor, &Tensor)>> {
        match &self.rows[..] {
            [] => Ok(None),
            [(cos, sin)] => Ok(Some((cos, sin))),
            rows => {
                if self.stacked.get().is_none() {
                    let (cos, sin): (Vec<Tensor>, Vec<Tensor>) = rows.iter().cloned().unzip();
                    let _ = self.stacked.set((Tensor::stack(&cos, 0)?, Tensor::stack(&sin, 0)?));
                }
                Ok(self.stacked.get().map(|(c, s)| (c, s)))
            }
        }
    }

    pub(crate) fn cos_sin(&self, row: usize) -> Result<&(Tensor, Tensor)> {
        match self.rows.get(row).or(self.rows.first()) {
            Some(cs) => Ok(cs),
            None => lmx_core::bail!("attention input without rotary angles"),
        }
    }
}

impl AttentionInput {
    /// The causal mask of `q_len` queries that are the last of `kv_len` keys, within `window`.
    pub(crate) fn mask(&self, q_len: usize, kv_len: usize, window: Option<usize>, device: &lmx_core::Device) -> Result<Tensor> {
        let key = (q_len, kv_len, window);
        let mut masks = self.masks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, m)) = masks.iter().find(|(k, _)| *k == key) {
            return Ok(m.clone());
        }
        let m = ops::causal_mask(q_len, kv_len - q_len, window, device)?;
        masks.push((key, m.clone()));
        Ok(m)
    }
}

/// The attention block `self_attn` of a decoder layer.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// Query and key/value heads on this rank.
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// For a rank whose query heads do not fall into whole groups: the local key/value head of
    /// each local query head (keys and values are expanded to one per query head).
    kv_of_head: Option<Tensor>,
    window: Option<usize>,
    softcap: Option<f64>,
    /// This rank's query heads' sink logits.
    sinks: Option<Tensor>,
    scale: f64,
    rope_table: usize,
    rotary_dim: usize,
    /// Where a GPU decode step's attention also writes its outputs coded for a quantized
    /// `o_proj` (see [`lmx_core::quant::CodeTarget`]).
    o_codes: Option<CodeTarget>,
}

impl Attention {
    /// Reads `q_proj`, `k_proj`, `v_proj`, `o_proj` (and `q_norm`, `k_norm`) under `vb`, this
    /// rank's heads only.
    pub fn new(vb: &Builder, cfg: &AttentionConfig) -> std::result::Result<Self, BuildError> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        if cfg.n_heads == 0 || cfg.n_kv_heads == 0 || cfg.n_heads % cfg.n_kv_heads != 0 {
            return Err(BuildError::unsupported(format!("{} query heads over {} key/value heads (they must divide evenly)", cfg.n_heads, cfg.n_kv_heads)));
        }
        let n_rep = cfg.n_heads / cfg.n_kv_heads;
        let q = vb.split(cfg.n_heads, 1);
        if q.is_empty() {
            let ranks = vb.group().size();
            return Err(BuildError::Shard { layer: vb.prefix().to_string(), ranks, msg: format!("the model has only {} query heads", cfg.n_heads) });
        }
        let kv = q.start / n_rep..(q.end - 1) / n_rep + 1;
        let grouped = q.start % n_rep == 0 && q.len() == kv.len() * n_rep;
        let kv_of_head = if grouped {
            None
        } else {
            let ids: Vec<u32> = q.clone().map(|i| (i / n_rep - kv.start) as u32).collect();
            Some(Tensor::new(ids.as_slice(), vb.device())?)
        };
        let rows = |r: &std::ops::Range<usize>| r.start * hd..r.end * hd;
        // A fused `qkv_proj` is read as row slices of one tensor: the same path shards,
        // quantizes and places it as separate projections.
        let fused = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd;
        let proj = |name: &str, offset: usize, features: usize, part: std::ops::Range<usize>| {
            if cfg.fused_qkv {
                vb.pp("qkv_proj").linear(h, fused, cfg.qkv_bias.into(), Shard::Column(offset + part.start..offset + part.end))
            } else {
                vb.pp(name).linear(h, features, cfg.qkv_bias.into(), Shard::Column(part))
            }
        };
        let norm = |name: &str| cfg.qk_norm_eps.map(|eps| if cfg.qk_norm_one_plus { vb.pp(name).rms_norm_one_plus(hd, eps) } else { vb.pp(name).rms_norm(hd, eps) }).transpose();
        Ok(Self {
            q_proj: proj("q_proj", 0, cfg.n_heads * hd, rows(&q))?,
            k_proj: proj("k_proj", cfg.n_heads * hd, cfg.n_kv_heads * hd, rows(&kv))?,
            v_proj: proj("v_proj", (cfg.n_heads + cfg.n_kv_heads) * hd, cfg.n_kv_heads * hd, rows(&kv))?,
            o_proj: vb.pp("o_proj").linear(cfg.n_heads * hd, h, Bias::from(cfg.o_bias), Shard::Row(rows(&q)))?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            n_heads: q.len(),
            n_kv_heads: kv.len(),
            head_dim: hd,
            kv_of_head,
            window: cfg.sliding_window,
            softcap: cfg.softcap,
            sinks: if cfg.sinks { Some(vb.get_split(&[cfg.n_heads], "sinks", 0, q.clone())?) } else { None },
            scale: cfg.scale.unwrap_or(1.0 / (hd as f64).sqrt()),
            rope_table: cfg.rope_table,
            rotary_dim: cfg.rotary_dim.unwrap_or(hd),
            o_codes: None,
        }
        .coded())
    }

    /// An output projection that reads int8 codes gets a target for them.
    fn coded(mut self) -> Self {
        self.o_codes = self.o_proj.code_spec().map(CodeTarget::new);
        self
    }

    /// The (bits, group size) of the codes q, k and v's products read, if they agree.
    pub fn input_code_spec(&self) -> Option<(usize, usize)> {
        Linear::shared_code_spec(&[&self.q_proj, &self.k_proj, &self.v_proj])
    }

    /// The block as a decode step on plain buffers reads it (`lmx_core::cpu_step`): every
    /// feature rotated by the model's table, heads in whole groups, no soft-cap or sinks.
    pub(crate) fn step_parts(&self) -> Option<StepAttention<'_>> {
        if self.kv_of_head.is_some() || self.softcap.is_some() || self.sinks.is_some() || self.rope_table != 0 || self.rotary_dim != self.head_dim {
            return None;
        }
        Some(StepAttention {
            qkv: [self.q_proj.step_linear()?, self.k_proj.step_linear()?, self.v_proj.step_linear()?],
            o: self.o_proj.step_linear()?,
            q_norm: self.q_norm.as_ref().map(RmsNorm::parts),
            k_norm: self.k_norm.as_ref().map(RmsNorm::parts),
            heads: self.n_heads,
            kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            scale: self.scale as f32,
            window: self.window,
        })
    }

    /// Rotates the first `rotary_dim` features of each head (all of them unless the model
    /// rotates part: Phi-4-mini's `partial_rotary_factor`).
    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.rotary_dim == self.head_dim {
            return ops::rope(x, cos, sin);
        }
        let d = x.rank() - 1;
        let rotated = ops::rope(&x.narrow(d, 0, self.rotary_dim)?.contiguous()?, cos, sin)?;
        Tensor::cat(&[&rotated, &x.narrow(d, self.rotary_dim, self.head_dim - self.rotary_dim)?], d)
    }

    /// (b, l, hidden) -> (b, l, hidden), appending this layer's keys and values to `cache`
    /// (a cache of several rows: row i takes batch row i, at its own position).
    pub fn forward(&self, x: &Tensor, input: &AttentionInput, cache: &mut KvCache, layer_idx: usize) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let [q, k, v] = Linear::forward_shared([&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let heads = |t: Tensor, norm: &Option<RmsNorm>, n: usize| -> Result<Tensor> {
            let t = t.reshape((b, l, n, self.head_dim))?;
            let t = match norm {
                Some(norm) => norm.forward(&t)?,
                None => t,
            };
            // (b, heads, l, head_dim)
            t.transpose(1, 2)
        };
        let q = heads(q, &self.q_norm, self.n_heads)?;
        let k = heads(k, &self.k_norm, self.n_kv_heads)?;
        let v = heads(v, &None, self.n_kv_heads)?;
        let y = if cache.rows() > 1 {
            if cache.rows() != b {
                lmx_core::bail!("a batch of {b} sequences with a cache for {}", cache.rows());
            }
            self.attend_rows(&q, &k, &v, input, cache, layer_idx)?
        } else {
            let (cos, sin) = input.table(self.rope_table)?.cos_sin(0)?;
            // At a device position the rotation and the cache write are one op.
            let fused = if self.rotary_dim == self.head_dim { cache.append_rotating(0, layer_idx, &q, &k, &v, cos, sin)? } else { None };
            let (q, view) = match fused {
                Some(done) => done,
                None => (self.rotate(&q, cos, sin)?, cache.append(0, layer_idx, &self.rotate(&k, cos, sin)?, &v)?),
            };
            self.attend(&q, view, input, cache.row_window(0), self.o_codes.as_ref())?
        };
        let heads = y.transpose(1, 2)?.reshape((b, l, self.n_heads * self.head_dim))?;
        lmx_core::quant::follow_codes(&y, &heads);
        self.o_proj.forward(&heads)
    }

    /// A batch of sequences, one cache row each, at their own positions: q (b, heads, l, d),
    /// k and v (b, kv_heads, l, d) before rotation -> (b, heads, l, d). On the CPU the rows
    /// rotate in one op and, for one token each over growing caches, attend in one op;
    /// otherwise row by row.
    fn attend_rows(&self, q: &Tensor, k: &Tensor, v: &Tensor, input: &AttentionInput, cache: &mut KvCache, layer_idx: usize) -> Result<Tensor> {
        let (b, l) = (q.dim(0)?, q.dim(2)?);
        let cpu = q.device().is_cpu();
        let angles = input.table(self.rope_table)?;
        // On a GPU, one token a row over plain caches: the whole step in one op (two launches a
        // layer for the batch instead of several a row).
        let plain = self.kv_of_head.is_none() && self.softcap.is_none() && self.sinks.is_none() && self.rotary_dim == self.head_dim;
        let per_row = angles.per_row_angles()?;
        if let (true, Some((cos, sin))) = (plain && ops::decode_rows_fit(q), per_row) {
            if let Some(rows) = cache.step_rows(layer_idx, self.window)? {
                let y = ops::decode_rows(q, k, v, cos, sin, rows.keys, rows.values, rows.offsets, self.scale)?;
                cache.commit_rows(layer_idx);
                return Ok(y);
            }
        }
        let rotated = match per_row {
            Some((cos, sin)) if cpu || gpu_rows_rotate_together() => Some((self.rotate(q, cos, sin)?, self.rotate(k, cos, sin)?)),
            _ => None,
        };
        let mut qs = Vec::with_capacity(b);
        let mut views = Vec::with_capacity(b);
        for i in 0..b {
            let (qi, ki) = match &rotated {
                Some((q, k)) => (q.narrow(0, i, 1)?, k.narrow(0, i, 1)?),
                None => {
                    let (cos, sin) = angles.cos_sin(i)?;
                    (self.rotate(&q.narrow(0, i, 1)?, cos, sin)?, self.rotate(&k.narrow(0, i, 1)?, cos, sin)?)
                }
            };
            views.push(cache.append(i, layer_idx, &ki, &v.narrow(0, i, 1)?)?);
            qs.push(qi);
        }
        let plain = l == 1 && cpu && self.kv_of_head.is_none() && self.softcap.is_none() && self.sinks.is_none();
        let seen = |view: &KvView| self.window.is_none_or(|w| view.positions().is_ok_and(|n| n <= w));
        if plain && views.iter().all(|v| matches!(v, KvView::Dense(..)) && seen(v)) {
            let (keys, values) = views.into_iter().map(|v| v.dense()).collect::<Result<(Vec<_>, Vec<_>)>>()?;
            let q = match rotated {
                Some((q, _)) => q,
                None => Tensor::cat(&qs, 0)?,
            };
            return ops::decode_attention_rows(&q, keys, values, self.scale);
        }
        let ys = qs.iter().zip(views).enumerate().map(|(i, (q, view))| self.attend(q, view, input, cache.row_window(i), None)).collect::<Result<Vec<_>>>()?;
        Tensor::cat(&ys, 0)
    }

    /// Attention of rotated queries q (b, heads, l, d) over a cache row's keys and values
    /// (`rotating`: the row's rotating size) -> (b, heads, l, d).
    fn attend(&self, q: &Tensor, view: KvView, input: &AttentionInput, rotating: Option<usize>, codes: Option<&CodeTarget>) -> Result<Tensor> {
        let l = q.dim(2)?;
        if let KvView::Upto { k, v, pos } = &view {
            // The buffer's unwritten positions (and those behind a sliding window) are masked
            // by the device position.
            let (k, v) = match &self.kv_of_head {
                Some(ids) => (k.index_select(ids, 1)?, v.index_select(ids, 1)?),
                None => (k.clone(), v.clone()),
            };
            return ops::attention_coded(&q.contiguous()?, &k, &v, ops::Mask::Upto { pos, window: self.window }, self.scale, self.softcap, self.sinks.as_ref(), codes);
        }
        if let KvView::Quantized { k, v, bits, group_size } = &view {
            // One query over a quantized cache: read the codes as stored.
            let seen = self.window.is_none_or(|w| view.positions().is_ok_and(|n| n <= w));
            if l == 1 && seen && q.device().is_cpu() && self.kv_of_head.is_none() && self.softcap.is_none() && self.sinks.is_none() {
                return ops::decode_attention_quantized(q, k, v, *bits, *group_size, self.scale);
            }
        }
        let (k, v) = view.dense()?;
        let (k, v) = match &self.kv_of_head {
            Some(ids) => (k.contiguous()?.index_select(ids, 1)?, v.contiguous()?.index_select(ids, 1)?),
            None => (k, v),
        };
        let kv_len = k.dim(2)?;
        // A prompt chunk is causal (within the layer's window, else a rotating cache's size, as
        // MLX LM's `make_mask`); one query sees every cached key unless the layer's window is
        // shorter than the cache.
        let window = self.window.or(rotating);
        let additive;
        let mask = if l > 1 {
            additive = input.mask(l, kv_len, window, q.device())?;
            ops::Mask::Causal { window, additive: &additive }
        } else if let Some(w) = self.window.filter(|w| kv_len > *w) {
            if rotating.is_some() {
                lmx_core::bail!("a rotating cache (max_kv_size {}) longer than the layer's sliding window ({w}) is not supported; use a max_kv_size of at most {w}", rotating.unwrap_or(0));
            }
            additive = input.mask(1, kv_len, Some(w), q.device())?;
            ops::Mask::Causal { window: Some(w), additive: &additive }
        } else {
            ops::Mask::None
        };
        // Queries as they come (the flash kernel reads a view; the other paths copy if needed).
        ops::attention_coded(q, &k, &v, mask, self.scale, self.softcap, self.sinks.as_ref(), codes)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use lmx_core::{DType, Device, Tensor};
    use lmx_dist::{Group, InProcess};
    use lmx_io::Weights;

    use super::*;
    use crate::rope::Rope;

    /// An attention block with every option on (biases, q/k norms, a window of 3, soft-capping,
    /// sinks; 6 query heads on 2 key/value heads) gives the same output whole and split over
    /// 4 ranks (2 + 2 + 1 + 1 query heads: a key/value head straddles ranks 0 and 1).
    #[test]
    fn every_option_sharded_unevenly_equals_the_whole_block() -> lmx_core::Result<()> {
        let dev = Device::Cpu;
        let (h, n_heads, n_kv, hd, l) = (32, 6, 2, 8, 5);
        let r = |shape: &[usize]| Tensor::randn(0f32, 0.3, shape, &dev);
        let mut tensors = HashMap::new();
        for (name, shape) in [
            ("q_proj.weight", vec![n_heads * hd, h]),
            ("q_proj.bias", vec![n_heads * hd]),
            ("k_proj.weight", vec![n_kv * hd, h]),
            ("k_proj.bias", vec![n_kv * hd]),
            ("v_proj.weight", vec![n_kv * hd, h]),
            ("v_proj.bias", vec![n_kv * hd]),
            ("o_proj.weight", vec![h, n_heads * hd]),
            ("o_proj.bias", vec![h]),
            ("q_norm.weight", vec![hd]),
            ("k_norm.weight", vec![hd]),
            ("sinks", vec![n_heads]),
        ] {
            tensors.insert(format!("attn.{name}"), r(&shape)?);
        }
        let cfg = AttentionConfig { qkv_bias: true, o_bias: true, qk_norm_eps: Some(1e-6), sliding_window: Some(3), softcap: Some(2.0), sinks: true, ..AttentionConfig::new(h, n_heads, n_kv, hd) };
        let (cos, sin) = Rope::new(10_000.0, hd, None, DType::F32, &dev).map_err(|e| lmx_core::Error::Msg(e.to_string()))?.cos_sin(0, l)?;
        let input = AttentionInput::new(vec![(cos, sin)]);
        let x = Tensor::randn(0f32, 1.0, (2, l, h), &dev)?;
        let run = |group: Option<Arc<dyn Group>>| -> lmx_core::Result<Tensor> {
            let mut vb = crate::Builder::new(Weights::from_tensors(tensors.clone(), "t"), DType::F32, &dev);
            if let Some(g) = group {
                vb = vb.with_group(g);
            }
            let attn = Attention::new(&vb.pp("attn"), &cfg).map_err(|e| lmx_core::Error::Msg(e.to_string()))?;
            attn.forward(&x, &input, &mut KvCache::new(1), 0)
        };
        let want = run(None)?;
        let outs: Vec<lmx_core::Result<Tensor>> = std::thread::scope(|s| {
            let handles: Vec<_> = InProcess::world(4).into_iter().map(|g| s.spawn(|| run(Some(Arc::new(g))))).collect();
            handles.into_iter().map(|t| t.join().expect("rank")).collect()
        });
        for (rank, got) in outs.into_iter().enumerate() {
            let d = (got? - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "rank {rank} of 4 differs from the whole block by {d}");
        }
        Ok(())
    }
}
