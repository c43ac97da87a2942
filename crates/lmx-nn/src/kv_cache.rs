//! Key/value caches, as MLX LM keeps them (`mlx_lm/models/cache.py`), one per sequence:
//!
//! - **growing** (`KVCache`): one preallocated buffer per layer, grown in steps of 256
//!   positions and written in place, so decoding a token never copies the history;
//! - **rotating** (`RotatingKVCache(max_size, keep=4)`, `--max-kv-size`): at most `max_size`
//!   positions, the first 4 kept and the rest a ring overwritten by each new token (a prompt
//!   longer than that is concatenated and trimmed, as MLX LM does, so attention sees it whole);
//! - **quantized** (`QuantizedKVCache`, `--kv-bits`): keys and values in MLX's affine format
//!   (packed words, a scale and a bias per group of the head dimension), from
//!   `quantized_kv_start` tokens on; attention reads them dequantized.
//!
//! A [`KvCache`] holds one such cache per sequence of a batch (its *rows*): sequences of
//! different lengths decode together, each at its own position, and a sequence's cache moves
//! between batches whole ([`KvCache::batch`], [`KvCache::unbatch`]).

use lmx_core::quant::QuantizedMatrix;
use lmx_core::{Device, Result, Tensor};

/// Growing buffers gain this many positions at a time.
const STEP: usize = 256;

/// Positions a buffer grows to a multiple of when steps at a device position (recorded CUDA
/// graphs) need more: 1,024. Each growth costs a copy of the cache, a normal step and a new
/// recording (~15 ms for Llama-3-8B on an H200); 256 at a time cost 2-4% of a 256-token
/// decode's rate (docs/cuda/2026-12-03-fixed-costs.txt). `LMX_KV_GRAPH_STEP=N` (a multiple of
/// 256) sets it, for measurements.
fn device_step() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::env::var("LMX_KV_GRAPH_STEP").ok().and_then(|v| v.parse().ok()).filter(|n: &usize| *n > 0 && n % STEP == 0).unwrap_or(4 * STEP))
}

/// Tokens a rotating cache never drops (the first ones: attention sinks).
pub const ROTATING_KEEP: usize = 4;

/// How a sequence's keys and values are kept (MLX LM's `max_kv_size`, `kv_bits`,
/// `kv_group_size`, `quantized_kv_start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvOptions {
    /// Keep at most this many positions: the first [`ROTATING_KEEP`] and the latest.
    pub max_kv_size: Option<usize>,
    /// Keep keys and values quantized to this many bits.
    pub kv_bits: Option<usize>,
    /// Elements of the head dimension sharing one scale and bias.
    pub kv_group_size: usize,
    /// Quantize once a sequence holds this many tokens (before that, the growing cache).
    pub quantized_kv_start: usize,
}

impl Default for KvOptions {
    fn default() -> Self {
        Self { max_kv_size: None, kv_bits: None, kv_group_size: 64, quantized_kv_start: 0 }
    }
}

impl KvOptions {
    /// Checks the settings: a rotating size above the kept tokens, MLX's bits and group sizes,
    /// not rotating and quantized together (MLX LM's `RotatingKVCache.to_quantized` does not
    /// exist either). The error says which setting and what is allowed.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if let Some(m) = self.max_kv_size {
            if m <= ROTATING_KEEP {
                return Err(format!("max_kv_size {m} must be more than the {ROTATING_KEEP} first tokens a rotating cache keeps"));
            }
        }
        if let Some(bits) = self.kv_bits {
            if let Err((what, hint)) = lmx_core::quant::check_spec(bits, self.kv_group_size) {
                return Err(format!("kv_bits / kv_group_size: {what} is not supported ({hint})"));
            }
            if self.max_kv_size.is_some() {
                return Err("a quantized cache (kv_bits) cannot also rotate (max_kv_size); choose one".into());
            }
        }
        Ok(())
    }
}

/// What a layer attends to after an append.
#[derive(Debug, Clone)]
pub enum KvView {
    /// Keys and values (b, kv_heads, n, head_dim).
    Dense(Tensor, Tensor),
    /// Keys and values in MLX's affine format: [packed u32 codes, scales, biases], each
    /// (b, kv_heads, n, ..).
    Quantized { k: [Tensor; 3], v: [Tensor; 3], bits: usize, group_size: usize },
    /// The whole buffers (b, kv_heads, capacity, head_dim), of which the positions up to the
    /// one the u32 tensor `pos` (1,) holds on the device are written ([`KvCache::set_device_position`]).
    Upto { k: Tensor, v: Tensor, pos: Tensor },
}

impl KvView {
    /// Keys and values as floats (dequantized where quantized).
    pub fn dense(self) -> Result<(Tensor, Tensor)> {
        match self {
            KvView::Dense(k, v) => Ok((k, v)),
            KvView::Quantized { k, v, bits, group_size } => Ok((dequantize(&k, bits, group_size)?, dequantize(&v, bits, group_size)?)),
            KvView::Upto { .. } => lmx_core::bail!("this layer cannot attend over a cache whose length is on the device (a captured decode step)"),
        }
    }

    /// Positions held.
    pub fn positions(&self) -> Result<usize> {
        match self {
            KvView::Dense(k, _) | KvView::Quantized { k: [k, _, _], .. } | KvView::Upto { k, .. } => k.dim(2),
        }
    }
}

/// [packed, scales, biases] (b, h, n, ..) dequantized to the scales' dtype: (b, h, n, d).
fn dequantize([packed, scales, biases]: &[Tensor; 3], bits: usize, group_size: usize) -> Result<Tensor> {
    let (b, h, n, w) = packed.dims4()?;
    let flat = |t: &Tensor| -> Result<Tensor> {
        let last = t.dim(3)?;
        t.to_device(&Device::Cpu)?.contiguous()?.reshape((b * h * n, last))
    };
    let q = QuantizedMatrix::from_tensors(&flat(packed)?, &flat(scales)?, &flat(biases)?, bits, group_size)?;
    q.dequantize()?.reshape((b, h, n, w * 32 / bits))?.to_device(packed.device())
}

/// Keys or values in MLX's affine format: packed words (b, h, capacity, d * bits / 32) and
/// scales and biases (b, h, capacity, d / group_size).
#[derive(Debug, Clone)]
struct QuantizedBuf {
    packed: Tensor,
    scales: Tensor,
    biases: Tensor,
}

impl QuantizedBuf {
    /// Quantizes `x` (b, h, n, d) along its last dimension.
    fn quantize(x: &Tensor, bits: usize, group_size: usize) -> Result<Self> {
        let (b, h, n, d) = x.dims4()?;
        if d % group_size != 0 {
            lmx_core::bail!("a quantized KV cache needs a kv_group_size that divides the model's head_dim ({d}), not {group_size}");
        }
        let q = QuantizedMatrix::quantize(&x.to_device(&Device::Cpu)?.reshape((b * h * n, d))?, bits, group_size)?;
        let (packed, scales, biases) = q.to_tensors()?;
        let shape = |t: Tensor| -> Result<Tensor> {
            let w = t.dim(1)?;
            t.reshape((b, h, n, w))?.to_device(x.device())
        };
        Ok(Self { packed: shape(packed)?, scales: shape(scales)?, biases: shape(biases)? })
    }

    fn parts(&self) -> [&Tensor; 3] {
        [&self.packed, &self.scales, &self.biases]
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self { packed: f(&self.packed)?, scales: f(&self.scales)?, biases: f(&self.biases)? })
    }
}

/// One layer's keys and values of one sequence.
#[derive(Debug, Clone, Default)]
enum Store {
    #[default]
    Empty,
    /// (b, h, capacity, d) buffers filled up to the layer's offset.
    Growing { k: Tensor, v: Tensor },
    /// MLX LM's `RotatingKVCache`: `idx` is where the next token goes.
    Rotating { k: Tensor, v: Tensor, idx: usize },
    /// Filled up to the layer's offset.
    Quantized { k: QuantizedBuf, v: QuantizedBuf },
}

#[derive(Debug, Clone, Default)]
struct LayerKv {
    store: Store,
    /// Tokens this layer has seen (the position of the next one).
    offset: usize,
}

/// Every layer's keys and values for one sequence.
#[derive(Debug, Clone)]
struct Sequence {
    layers: Vec<LayerKv>,
    opts: KvOptions,
}

/// Each row's key and value buffers and offset (keys held) for a batch's one-position step
/// ([`KvCache::step_rows`]).
pub struct StepRows {
    pub keys: Vec<Tensor>,
    pub values: Vec<Tensor>,
    pub offsets: Vec<usize>,
}

/// Keys and values of every layer for the tokens processed so far, one cache per sequence
/// (row) of the batch.
#[derive(Debug, Clone)]
pub struct KvCache {
    rows: Vec<Sequence>,
    /// False for a whole-sequence forward (training, scoring): nothing is stored, and keys
    /// and values stay on the gradient tape (the in-place buffer writes are not differentiable).
    store: bool,
    /// The position of the next token as a u32 tensor (1,) on the device, when steps read it
    /// from there ([`KvCache::set_device_position`]).
    position: Option<Tensor>,
}

/// `t` (.., n, ..) with `extra` zero positions appended along dimension 2.
fn grow(t: &Tensor, extra: usize) -> Result<Tensor> {
    let mut dims = t.dims().to_vec();
    dims[2] = extra;
    // A cat with an empty part may hand back the other part's layout: copy to be sure (the
    // buffer is written in place).
    Tensor::cat(&[t, &Tensor::zeros(dims, t.dtype(), t.device())?], 2)?.contiguous()
}

/// A fresh (b, h, capacity, d) buffer holding `init` (b, h, n, d) at its start.
fn buffer_with(init: &Tensor, capacity: usize) -> Result<Tensor> {
    let mut dims = init.dims().to_vec();
    let n = dims[2];
    dims[2] = capacity;
    let buf = Tensor::zeros(dims, init.dtype(), init.device())?;
    if n > 0 {
        buf.slice_set(&init.contiguous()?, 2, 0)?;
    }
    Ok(buf)
}

impl LayerKv {
    fn append(&mut self, k: &Tensor, v: &Tensor, opts: &KvOptions) -> Result<KvView> {
        let n = k.dim(2)?;
        if let (Some(bits), Store::Growing { k: kb, v: vb }) = (opts.kv_bits, &self.store) {
            // MLX LM quantizes a growing cache after the forward pass that brings it to
            // quantized_kv_start tokens (`maybe_quantize_kv_cache`).
            if self.offset > 0 && self.offset >= opts.quantized_kv_start {
                let len = self.offset;
                self.store =
                    Store::Quantized { k: QuantizedBuf::quantize(&kb.narrow(2, 0, len)?, bits, opts.kv_group_size)?, v: QuantizedBuf::quantize(&vb.narrow(2, 0, len)?, bits, opts.kv_group_size)? };
            }
        }
        if matches!(self.store, Store::Empty) {
            self.store = match (opts.max_kv_size, opts.kv_bits) {
                (Some(_), _) => Store::Rotating { k: k.narrow(2, 0, 0)?.contiguous()?, v: v.narrow(2, 0, 0)?.contiguous()?, idx: 0 },
                // Quantized caches start as growing ones: MLX LM quantizes after a forward pass,
                // so the first chunk attends to its own keys in full precision.
                _ => Store::Growing { k: k.narrow(2, 0, 0)?.contiguous()?, v: v.narrow(2, 0, 0)?.contiguous()? },
            };
        }
        // A growing buffer first makes room.
        self.reserve(n, STEP)?;
        let offset = self.offset;
        let out = match &mut self.store {
            Store::Empty => unreachable!("filled above"),
            Store::Growing { k: kb, v: vb } => {
                let needed = offset + n;
                kb.slice_set(&k.contiguous()?, 2, offset)?;
                vb.slice_set(&v.contiguous()?, 2, offset)?;
                KvView::Dense(kb.narrow(2, 0, needed)?, vb.narrow(2, 0, needed)?)
            }
            Store::Quantized { k: kq, v: vq } => {
                let (bits, gs) = (opts.kv_bits.unwrap_or(8), opts.kv_group_size);
                let needed = offset + n;
                if needed > kq.packed.dim(2)? {
                    let cap = needed.div_ceil(STEP) * STEP;
                    let regrow = |q: &QuantizedBuf| q.map(|t| buffer_with(&t.narrow(2, 0, offset)?, cap));
                    *kq = regrow(kq)?;
                    *vq = regrow(vq)?;
                }
                for (buf, new) in [(&*kq, k), (&*vq, v)] {
                    let q = QuantizedBuf::quantize(new, bits, gs)?;
                    for (dst, src) in buf.parts().into_iter().zip(q.parts()) {
                        dst.slice_set(src, 2, offset)?;
                    }
                }
                let view = |q: &QuantizedBuf| -> Result<[Tensor; 3]> { Ok([q.packed.narrow(2, 0, needed)?, q.scales.narrow(2, 0, needed)?, q.biases.narrow(2, 0, needed)?]) };
                KvView::Quantized { k: view(kq)?, v: view(vq)?, bits, group_size: gs }
            }
            Store::Rotating { k: kb, v: vb, idx } => {
                let max = opts.max_kv_size.unwrap_or(usize::MAX);
                let (k, v) = if n == 1 { rotate_in_place(kb, vb, idx, offset, max, k, v)? } else { rotate_concat(kb, vb, idx, offset, max, k, v)? };
                KvView::Dense(k, v)
            }
        };
        self.offset += n;
        Ok(out)
    }

    /// Writes one position at the device position `pos` into a growing buffer with room for
    /// it ([`KvCache::reserve`]); the view is the whole buffer.
    fn append_at(&mut self, k: &Tensor, v: &Tensor, pos: &Tensor) -> Result<KvView> {
        let (kb, vb) = self.room_for_one(k)?;
        lmx_core::ops::kv_write(&kb, k, pos)?;
        lmx_core::ops::kv_write(&vb, v, pos)?;
        self.offset += 1;
        Ok(KvView::Upto { k: kb, v: vb, pos: pos.clone() })
    }

    /// The growing buffers a device-position step writes its one position `k` (1, heads, 1,
    /// d) into, checked to have room for it.
    fn room_for_one(&self, k: &Tensor) -> Result<(Tensor, Tensor)> {
        let Store::Growing { k: kb, v: vb } = &self.store else { lmx_core::bail!("a device-position step needs a growing cache") };
        if k.dim(2)? != 1 || self.offset >= kb.dim(2)? {
            lmx_core::bail!("a device-position step appends one position to a buffer with room for it ({} new, {} of {} held)", k.dim(2)?, self.offset, kb.dim(2)?);
        }
        Ok((kb.clone(), vb.clone()))
    }

    /// [`Self::append_at`] of keys still to be rotated by `cos`/`sin`: returns the rotated
    /// queries `q` too (`ops::rope_kv_write`: one kernel on a GPU).
    #[allow(clippy::too_many_arguments)]
    fn append_at_rotating(&mut self, q: &Tensor, k: &Tensor, v: &Tensor, cos: &Tensor, sin: &Tensor, pos: &Tensor) -> Result<(Tensor, KvView)> {
        let (kb, vb) = self.room_for_one(k)?;
        let q = lmx_core::ops::rope_kv_write(q, k, v, cos, sin, &kb, &vb, pos)?;
        self.offset += 1;
        Ok((q, KvView::Upto { k: kb, v: vb, pos: pos.clone() }))
    }

    /// [`Self::append`] of keys still to be rotated by `cos`/`sin` into a growing cache (a
    /// prompt chunk at the host offset): returns the rotated queries `q` too
    /// (`ops::rope_kv_write_rows`: one kernel on a GPU).
    fn append_rows_rotating(&mut self, q: &Tensor, k: &Tensor, v: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, KvView)> {
        if matches!(self.store, Store::Empty) {
            self.store = Store::Growing { k: k.narrow(2, 0, 0)?.contiguous()?, v: v.narrow(2, 0, 0)?.contiguous()? };
        }
        let n = k.dim(2)?;
        self.reserve(n, STEP)?;
        let Store::Growing { k: kb, v: vb } = &self.store else { lmx_core::bail!("kv cache: rotating rows into a cache that is not a plain growing one") };
        let offset = self.offset;
        let q = lmx_core::ops::rope_kv_write_rows(q, k, v, cos, sin, kb, vb, offset)?;
        let view = KvView::Dense(kb.narrow(2, 0, offset + n)?, vb.narrow(2, 0, offset + n)?);
        self.offset += n;
        Ok((q, view))
    }

    /// Makes room for `extra` more positions in a growing buffer, its capacity a multiple of
    /// `step`; true when it was reallocated.
    fn reserve(&mut self, extra: usize, step: usize) -> Result<bool> {
        let offset = self.offset;
        let Store::Growing { k: kb, v: vb } = &mut self.store else { return Ok(false) };
        let needed = offset + extra;
        if needed <= kb.dim(2)? {
            return Ok(false);
        }
        let cap = needed.div_ceil(step) * step;
        *kb = buffer_with(&kb.narrow(2, 0, offset)?, cap)?;
        *vb = buffer_with(&vb.narrow(2, 0, offset)?, cap)?;
        Ok(true)
    }

    fn quantize_due(&mut self, opts: &KvOptions) -> Result<()> {
        if let (Some(bits), Store::Growing { k, v }) = (opts.kv_bits, &self.store) {
            if self.offset > 0 && self.offset >= opts.quantized_kv_start {
                let q = |t: &Tensor| QuantizedBuf::quantize(&t.narrow(2, 0, self.offset)?, bits, opts.kv_group_size);
                self.store = Store::Quantized { k: q(k)?, v: q(v)? };
            }
        }
        Ok(())
    }

    fn truncate(&mut self, len: usize) {
        if len >= self.offset {
            return;
        }
        if let Store::Rotating { idx, .. } = &mut self.store {
            // Only reached while the ring has not wrapped (`can_truncate`): the buffer is in
            // temporal order and `idx` is the offset.
            *idx = len;
        }
        self.offset = len;
        if len == 0 {
            self.store = Store::Empty;
        }
    }

    fn can_truncate(&self, opts: &KvOptions) -> bool {
        !matches!(self.store, Store::Rotating { .. }) || self.offset < opts.max_kv_size.unwrap_or(usize::MAX)
    }

    fn nbytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match &self.store {
            Store::Empty => 0,
            Store::Growing { k, v } | Store::Rotating { k, v, .. } => size(k) + size(v),
            Store::Quantized { k, v } => k.parts().into_iter().chain(v.parts()).map(size).sum(),
        }
    }
}

/// `RotatingKVCache._temporal_order`: the ring rearranged oldest first, unused end cut off.
fn temporal_order(t: &Tensor, idx: usize, offset: usize) -> Result<Tensor> {
    let len = t.dim(2)?;
    if idx == len {
        Ok(t.clone())
    } else if idx < offset {
        let keep = ROTATING_KEEP.min(idx);
        Tensor::cat(&[t.narrow(2, 0, keep)?, t.narrow(2, idx, len - idx)?, t.narrow(2, keep, idx - keep)?], 2)
    } else {
        t.narrow(2, 0, idx)
    }
}

/// `RotatingKVCache._trim`: drops `trim` positions after the kept ones, then appends `append`.
fn trim_keep(t: &Tensor, trim: usize, append: Option<&Tensor>) -> Result<Tensor> {
    let len = t.dim(2)?;
    let mut parts = if trim > 0 {
        let keep = ROTATING_KEEP.min(len);
        vec![t.narrow(2, 0, keep)?, t.narrow(2, (trim + keep).min(len), len - (trim + keep).min(len))?]
    } else {
        vec![t.clone()]
    };
    parts.extend(append.cloned());
    Tensor::cat(&parts, 2)?.contiguous()
}

/// `RotatingKVCache._update_concat` (a prompt chunk): the cache in temporal order, trimmed to
/// `max - 1` positions, with the chunk appended, so every new token sees its whole window.
fn rotate_concat(kb: &mut Tensor, vb: &mut Tensor, idx: &mut usize, offset: usize, max: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let ordered = [temporal_order(kb, *idx, offset)?, temporal_order(vb, *idx, offset)?];
    let trim = (ordered[0].dim(2)? + 1).saturating_sub(max);
    *kb = trim_keep(&ordered[0], trim, Some(k))?;
    *vb = trim_keep(&ordered[1], trim, Some(v))?;
    *idx = kb.dim(2)?;
    Ok((kb.clone(), vb.clone()))
}

/// `RotatingKVCache._update_in_place` (one token): grow up to `max` in steps, then overwrite
/// the oldest position after the kept ones.
fn rotate_in_place(kb: &mut Tensor, vb: &mut Tensor, idx: &mut usize, offset: usize, max: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let len = kb.dim(2)?;
    if offset >= len && len < max {
        let extra = STEP.min(max - offset);
        *kb = grow(kb, extra)?;
        *vb = grow(vb, extra)?;
        *idx = offset;
    }
    let len = kb.dim(2)?;
    if len > max {
        *kb = trim_keep(kb, len - max, None)?;
        *vb = trim_keep(vb, len - max, None)?;
        *idx = max;
    }
    if *idx == max {
        *idx = ROTATING_KEEP;
    }
    kb.slice_set(&k.contiguous()?, 2, *idx)?;
    vb.slice_set(&v.contiguous()?, 2, *idx)?;
    *idx += 1;
    if offset + 1 < max {
        Ok((kb.narrow(2, 0, offset + 1)?, vb.narrow(2, 0, offset + 1)?))
    } else {
        Ok((kb.clone(), vb.clone()))
    }
}

/// One layer's cache as MLX LM saves it (`cache.state` and `meta_state` in
/// `mlx_lm/models/cache.py`).
#[derive(Debug, Clone)]
pub enum LayerState {
    /// `KVCache`: keys and values (1, kv_heads, n, head_dim), n >= offset.
    Growing { keys: Tensor, values: Tensor, offset: usize },
    /// `RotatingKVCache`: the buffers in ring order; `idx` is where the next token goes.
    Rotating { keys: Tensor, values: Tensor, offset: usize, keep: usize, max_size: usize, idx: usize },
    /// `QuantizedKVCache`: (packed words, scales, biases) for keys and for values.
    Quantized { keys: [Tensor; 3], values: [Tensor; 3], offset: usize, group_size: usize, bits: usize },
}

impl KvCache {
    /// Every layer's state, for a cache of one sequence (what a prompt cache file holds).
    pub fn states(&self) -> Result<Vec<LayerState>> {
        let [row] = &self.rows[..] else { lmx_core::bail!("only a cache of one sequence can be saved, not {}", self.rows.len()) };
        row.layers
            .iter()
            .map(|l| {
                let offset = l.offset;
                Ok(match &l.store {
                    Store::Empty => lmx_core::bail!("an empty cache has nothing to save"),
                    Store::Growing { k, v } => LayerState::Growing { keys: k.narrow(2, 0, offset)?, values: v.narrow(2, 0, offset)?, offset },
                    Store::Rotating { k, v, idx } => LayerState::Rotating { keys: k.clone(), values: v.clone(), offset, keep: ROTATING_KEEP, max_size: row.opts.max_kv_size.unwrap_or(0), idx: *idx },
                    Store::Quantized { k, v } => {
                        let part = |q: &QuantizedBuf| -> Result<[Tensor; 3]> { Ok([q.packed.narrow(2, 0, offset)?, q.scales.narrow(2, 0, offset)?, q.biases.narrow(2, 0, offset)?]) };
                        LayerState::Quantized { keys: part(k)?, values: part(v)?, offset, group_size: row.opts.kv_group_size, bits: row.opts.kv_bits.unwrap_or(8) }
                    }
                })
            })
            .collect()
    }

    /// A one-sequence cache from saved layer states, on `device`. The states set what they
    /// imply (a rotating size, quantization bits and group size); `opts` the rest (a growing
    /// cache still quantizes later with `kv_bits`). Layers must agree on the kind and settings.
    pub fn from_states(states: Vec<LayerState>, opts: KvOptions, device: &Device) -> Result<Self> {
        let mut opts = opts;
        let mut layers = Vec::with_capacity(states.len());
        let dev = |t: &Tensor| -> Result<Tensor> { t.to_device(device)?.contiguous() };
        for (i, s) in states.into_iter().enumerate() {
            let (store, offset) = match s {
                LayerState::Growing { keys, values, offset } => {
                    if keys.dims4()?.2 < offset || keys.dims() != values.dims() {
                        lmx_core::bail!("layer {i}: keys {:?} and values {:?} do not hold {offset} positions", keys.dims(), values.dims());
                    }
                    (Store::Growing { k: dev(&keys)?, v: dev(&values)? }, offset)
                }
                LayerState::Rotating { keys, values, offset, keep, max_size, idx } => {
                    if keep != ROTATING_KEEP || idx > keys.dims4()?.2 || keys.dims() != values.dims() {
                        lmx_core::bail!("layer {i}: a rotating cache keeping {keep} tokens (lmx keeps {ROTATING_KEEP}) or with keys {:?}, values {:?} and index {idx}", keys.dims(), values.dims());
                    }
                    opts.max_kv_size = Some(max_size);
                    (Store::Rotating { k: dev(&keys)?, v: dev(&values)?, idx }, offset)
                }
                LayerState::Quantized { keys, values, offset, group_size, bits } => {
                    opts.kv_bits = Some(bits);
                    opts.kv_group_size = group_size;
                    let buf = |[packed, scales, biases]: [Tensor; 3]| -> Result<QuantizedBuf> { Ok(QuantizedBuf { packed: dev(&packed)?, scales: dev(&scales)?, biases: dev(&biases)? }) };
                    let (k, v) = (buf(keys)?, buf(values)?);
                    if k.packed.dims4()?.2 < offset || k.scales.dims4()?.2 < offset {
                        lmx_core::bail!("layer {i}: quantized keys {:?} do not hold {offset} positions", k.packed.dims());
                    }
                    (Store::Quantized { k, v }, offset)
                }
            };
            layers.push(LayerKv { store, offset });
        }
        if layers.windows(2).any(|w| w[0].offset != w[1].offset || std::mem::discriminant(&w[0].store) != std::mem::discriminant(&w[1].store)) {
            lmx_core::bail!("the layers' caches differ in kind or length");
        }
        opts.validate().map_err(lmx_core::Error::Msg)?;
        Ok(Self { rows: vec![Sequence { layers, opts }], store: true, position: None })
    }

    /// An empty growing cache for one sequence of a model with `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self { rows: vec![Sequence { layers: vec![LayerKv::default(); n_layers], opts: KvOptions::default() }], store: true, position: None }
    }

    /// The same cache keeping keys and values as `opts` says (checked by the caller with
    /// [`KvOptions::validate`]; applies to what is appended from now on).
    pub fn with_options(mut self, opts: KvOptions) -> Self {
        for r in &mut self.rows {
            r.opts = opts;
        }
        self
    }

    /// A pass-through "cache" for one forward over whole sequences from position 0: keys and
    /// values are used as they are and nothing is stored.
    pub fn uncached() -> Self {
        Self { rows: Vec::new(), store: false, position: None }
    }

    /// One cache for a batch whose rows are `caches`' sequences, in order.
    pub fn batch(caches: Vec<KvCache>) -> Self {
        Self { rows: caches.into_iter().flat_map(|c| c.rows).collect(), store: true, position: None }
    }

    /// The inverse of [`KvCache::batch`]: one cache per row.
    pub fn unbatch(self) -> Vec<KvCache> {
        self.rows.into_iter().map(|r| KvCache { rows: vec![r], store: true, position: None }).collect()
    }

    /// Moves rows `range` out into a cache of their own (a pipeline micro-batch); put them
    /// back with [`KvCache::restore_rows`]. Nothing is copied.
    pub fn take_rows(&mut self, range: std::ops::Range<usize>) -> KvCache {
        KvCache { rows: self.rows.drain(range).collect(), store: self.store, position: None }
    }

    /// Puts rows taken by [`KvCache::take_rows`] back at `at`.
    pub fn restore_rows(&mut self, at: usize, part: KvCache) {
        self.rows.splice(at..at, part.rows);
    }

    /// Whether forwards append to this cache (false for [`KvCache::uncached`]).
    pub fn stores(&self) -> bool {
        self.store
    }

    /// Layers of each sequence's cache.
    pub fn layers(&self) -> usize {
        self.rows.first().map_or(0, |r| r.layers.len())
    }

    /// Quantizes the growing caches that have reached `quantized_kv_start` now rather than at
    /// their next append (MLX LM's `maybe_quantize_kv_cache` after a forward pass), e.g.
    /// before saving.
    pub fn quantize_due(&mut self) -> Result<()> {
        for r in &mut self.rows {
            for l in &mut r.layers {
                l.quantize_due(&r.opts)?;
            }
        }
        Ok(())
    }

    /// Sequences (rows) in this cache; 0 for [`KvCache::uncached`].
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Tokens already in the cache of the first row (the position of its next token).
    pub fn offset(&self) -> usize {
        self.row_offset(0)
    }

    /// Tokens already in row `row`'s cache.
    pub fn row_offset(&self, row: usize) -> usize {
        self.rows.get(row).and_then(|r| r.layers.first()).map_or(0, |l| l.offset)
    }

    /// The window a rotating row imposes on a prompt chunk's attention (its `max_kv_size`).
    pub fn row_window(&self, row: usize) -> Option<usize> {
        self.rows.get(row).and_then(|r| r.opts.max_kv_size)
    }

    /// Whether every row can forget positions (a rotating cache cannot once it has wrapped).
    pub fn can_truncate(&self) -> bool {
        self.rows.iter().all(|r| r.layers.iter().all(|l| l.can_truncate(&r.opts)))
    }

    /// Forgets every position from `len` on (reusing a shared prompt prefix, rejecting draft
    /// tokens). Check [`KvCache::can_truncate`] first: a wrapped rotating cache no longer
    /// holds the positions before its window, and truncating it empties it.
    pub fn truncate(&mut self, len: usize) {
        for r in &mut self.rows {
            let ok = r.layers.iter().all(|l| l.can_truncate(&r.opts));
            for l in &mut r.layers {
                l.truncate(if ok { len } else { 0 });
            }
        }
    }

    /// Empties the cache.
    pub fn reset(&mut self) {
        self.truncate(0);
    }

    /// A copy that shares no buffer with this cache (a plain `clone` shares them, and appends
    /// write in place), holding only the filled positions.
    pub fn deep_clone(&self) -> Result<Self> {
        // New contiguous storage either way (`copy` keeps a view's strides).
        let fresh = |t: Tensor| if t.is_contiguous() { t.copy() } else { t.contiguous() };
        let copy = |t: &Tensor, n: usize| -> Result<Tensor> { fresh(t.narrow(2, 0, n.min(t.dim(2)?))?) };
        let mut rows = Vec::with_capacity(self.rows.len());
        for r in &self.rows {
            let mut layers = Vec::with_capacity(r.layers.len());
            for l in &r.layers {
                let n = l.offset;
                let store = match &l.store {
                    Store::Empty => Store::Empty,
                    Store::Growing { k, v } => Store::Growing { k: copy(k, n)?, v: copy(v, n)? },
                    // The ring keeps its layout: copied whole.
                    Store::Rotating { k, v, idx } => Store::Rotating { k: fresh(k.clone())?, v: fresh(v.clone())?, idx: *idx },
                    Store::Quantized { k, v } => Store::Quantized { k: k.map(|t| copy(t, n))?, v: v.map(|t| copy(t, n))? },
                };
                layers.push(LayerKv { store, offset: n });
            }
            rows.push(Sequence { layers, opts: r.opts });
        }
        Ok(Self { rows, store: self.store, position: None })
    }

    /// Bytes held by the buffers.
    pub fn nbytes(&self) -> usize {
        self.rows.iter().flat_map(|r| &r.layers).map(LayerKv::nbytes).sum()
    }

    /// Steps read the position of their one token from `pos` (a u32 tensor (1,) on the
    /// model's device, equal to [`KvCache::offset`] when the step runs) rather than from the
    /// host: rotary angles, the key/value write and the attention's length all take it from
    /// the device, so that a step recorded as a CUDA graph replays at any position. Needs one
    /// growing cache with room for the token ([`KvCache::reserve`]); None goes back to host
    /// positions.
    pub fn set_device_position(&mut self, pos: Option<Tensor>) {
        self.position = pos;
    }

    /// The device position set by [`KvCache::set_device_position`].
    pub fn device_position(&self) -> Option<&Tensor> {
        self.position.as_ref()
    }

    /// Makes room for `extra` more positions (to a multiple of 1,024: see `device_step`), for
    /// steps at a device position. None when this cache cannot take such steps (more than one
    /// sequence, or a rotating or quantized cache, or nothing stored yet); else whether a
    /// buffer was reallocated (a recorded step that wrote to the old one is stale).
    pub fn reserve(&mut self, extra: usize) -> Result<Option<bool>> {
        let [row] = &mut self.rows[..] else { return Ok(None) };
        if !self.store || row.opts.kv_bits.is_some() || row.opts.max_kv_size.is_some() || !row.layers.iter().all(|l| matches!(l.store, Store::Growing { .. })) {
            return Ok(None);
        }
        let mut grew = false;
        for l in &mut row.layers {
            grew |= l.reserve(extra, device_step())?;
        }
        Ok(Some(grew))
    }

    /// The identities of the key and value buffers of every layer: a step recorded against
    /// them (a CUDA graph writes into them by address) may replay only while they are the same.
    pub fn buffer_ids(&self) -> Vec<lmx_core::TensorId> {
        self.rows
            .iter()
            .flat_map(|r| &r.layers)
            .flat_map(|l| match &l.store {
                Store::Growing { k, v } | Store::Rotating { k, v, .. } => vec![k.id(), v.id()],
                Store::Quantized { k, v } => k.parts().into_iter().chain(v.parts()).map(|t| t.id()).collect(),
                Store::Empty => Vec::new(),
            })
            .collect()
    }

    /// Counts `n` more positions as held in every layer of the one sequence: a replayed step
    /// wrote them on the device without running this cache's code.
    pub fn advance(&mut self, n: usize) {
        for l in self.rows.iter_mut().flat_map(|r| &mut r.layers) {
            l.offset += n;
        }
    }

    /// Rotates `q` and `k` (1, heads, l, d) by `cos`/`sin` ("rotate half") and appends `k`, `v`
    /// to row `row`'s layer `layer_idx` in one op, at a device position (a recorded decode
    /// step) or, on a GPU, into a plain growing cache (a prompt chunk); returns the rotated
    /// queries and the layer's keys and values. None otherwise (the caller rotates, then
    /// [`Self::append`]s).
    #[allow(clippy::too_many_arguments)]
    pub fn append_rotating(&mut self, row: usize, layer_idx: usize, q: &Tensor, k: &Tensor, v: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<(Tensor, KvView)>> {
        if !self.store {
            return Ok(None);
        }
        let position = self.position.clone();
        let (layer, opts) = self.layer_mut(row, layer_idx)?;
        match position {
            Some(pos) => layer.append_at_rotating(q, k, v, cos, sin, &pos).map(Some),
            None if q.device().is_cuda() && q.dim(0)? == 1 && opts.max_kv_size.is_none() && opts.kv_bits.is_none() => layer.append_rows_rotating(q, k, v, cos, sin).map(Some),
            None => Ok(None),
        }
    }

    /// For a batch's step of one new position in every row over plain growing caches (no
    /// quantization, no rotation, host positions): makes room for it in each row's layer
    /// `layer_idx` and returns the rows' buffers and the offsets the new keys and values go to
    /// (the caller writes them: `ops::decode_rows`, then [`Self::commit_rows`]). None when a
    /// row's cache is not such a one or would hold more than `window` positions. Offsets do not
    /// move here: a step that fails leaves every row as it was (at most with a larger buffer).
    pub fn step_rows(&mut self, layer_idx: usize, window: Option<usize>) -> Result<Option<StepRows>> {
        let fits = |l: &LayerKv| matches!(l.store, Store::Growing { .. }) && window.is_none_or(|w| l.offset < w);
        let plain = |seq: &Sequence| seq.opts.kv_bits.is_none() && seq.opts.max_kv_size.is_none() && seq.layers.get(layer_idx).is_some_and(fits);
        if !self.store || self.position.is_some() || !self.rows.iter().all(plain) {
            return Ok(None);
        }
        let n = self.rows.len();
        let mut rows = StepRows { keys: Vec::with_capacity(n), values: Vec::with_capacity(n), offsets: Vec::with_capacity(n) };
        for seq in &mut self.rows {
            let layer = &mut seq.layers[layer_idx];
            layer.reserve(1, STEP)?;
            let Store::Growing { k, v } = &layer.store else { lmx_core::bail!("kv cache: a growing buffer stopped growing") };
            rows.keys.push(k.clone());
            rows.values.push(v.clone());
            rows.offsets.push(layer.offset);
        }
        Ok(Some(rows))
    }

    /// Counts the position a [`Self::step_rows`] step wrote in each row's layer `layer_idx`.
    pub fn commit_rows(&mut self, layer_idx: usize) {
        for layer in self.rows.iter_mut().filter_map(|seq| seq.layers.get_mut(layer_idx)) {
            layer.offset += 1;
        }
    }

    /// Row `row`'s layer `layer_idx`, with the row's options.
    fn layer_mut(&mut self, row: usize, layer_idx: usize) -> Result<(&mut LayerKv, &KvOptions)> {
        let n_rows = self.rows.len();
        let Some(seq) = self.rows.get_mut(row) else { lmx_core::bail!("kv cache: row {row} of a cache for {n_rows} sequences") };
        let n_layers = seq.layers.len();
        let Some(layer) = seq.layers.get_mut(layer_idx) else { lmx_core::bail!("kv cache: layer {layer_idx} of a cache for {n_layers} layers") };
        Ok((layer, &seq.opts))
    }

    /// Appends `k`, `v` (b, n_kv_heads, seq_len, head_dim) to row `row`'s layer `layer_idx`
    /// and returns all its keys and values so far (for a rotating cache, those in its window,
    /// not in temporal order after a one-token step; for a quantized one, as stored).
    pub fn append(&mut self, row: usize, layer_idx: usize, k: &Tensor, v: &Tensor) -> Result<KvView> {
        if !self.store {
            return Ok(KvView::Dense(k.contiguous()?, v.contiguous()?));
        }
        let position = self.position.clone();
        let (layer, opts) = self.layer_mut(row, layer_idx)?;
        match &position {
            Some(pos) => layer.append_at(k, v, pos),
            None => layer.append(k, v, opts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmx_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = || -> Result<f32> { (a.contiguous()? - b.contiguous()?)?.abs()?.max_all()?.to_scalar::<f32>() };
        d().expect("same shapes")
    }

    #[test]
    fn append_grow_and_truncate() -> Result<()> {
        let mut c = KvCache::new(1);
        let a = Tensor::randn(0f32, 1.0, (1, 2, 300, 4), &Device::Cpu)?;
        let (k, _) = c.append(0, 0, &a.narrow(2, 0, 200)?, &a.narrow(2, 0, 200)?)?.dense()?;
        assert_eq!(k.dims(), &[1, 2, 200, 4]);
        let (k, v) = c.append(0, 0, &a.narrow(2, 200, 100)?, &a.narrow(2, 200, 100)?)?.dense()?;
        assert_eq!(c.offset(), 300);
        assert_eq!(max_diff(&k, &a), 0.0);
        assert_eq!(v.dims(), &[1, 2, 300, 4]);
        c.truncate(10);
        let (k, _) = c.append(0, 0, &a.narrow(2, 0, 1)?, &a.narrow(2, 0, 1)?)?.dense()?;
        assert_eq!(k.dim(2)?, 11);
        Ok(())
    }

    /// The positions a rotating cache returns, by the value stored at each (position p holds
    /// the value p), after a prompt of 6 and single tokens, with max_kv_size 8 and 4 kept:
    /// MLX LM's `RotatingKVCache` traced by hand.
    #[test]
    fn rotating_cache_keeps_the_first_tokens_and_a_ring() -> Result<()> {
        let opts = KvOptions { max_kv_size: Some(8), ..Default::default() };
        let mut c = KvCache::new(1).with_options(opts);
        let pos = |from: usize, n: usize| Tensor::arange(from as f32, (from + n) as f32, &Device::Cpu).and_then(|t| t.reshape((1, 1, n, 1))).expect("positions");
        let ids = |t: &Tensor| -> Vec<f32> { t.flatten_all().and_then(|t| t.to_vec1()).expect("values") };
        let (k, _) = c.append(0, 0, &pos(0, 6), &pos(0, 6))?.dense()?;
        assert_eq!(ids(&k), [0., 1., 2., 3., 4., 5.]);
        for p in 6..8 {
            c.append(0, 0, &pos(p, 1), &pos(p, 1))?;
        }
        // Full: the next token overwrites position 4 (the first after the kept ones).
        let (k, _) = c.append(0, 0, &pos(8, 1), &pos(8, 1))?.dense()?;
        assert_eq!(ids(&k), [0., 1., 2., 3., 8., 5., 6., 7.]);
        assert!(!c.can_truncate(), "a wrapped ring cannot rewind");
        // A prompt chunk: the ring in temporal order, trimmed to max - 1, plus the chunk.
        let (k, _) = c.append(0, 0, &pos(9, 3), &pos(9, 3))?.dense()?;
        assert_eq!(ids(&k), [0., 1., 2., 3., 6., 7., 8., 9., 10., 11.]);
        // The next token trims back to max, then rotates.
        let (k, _) = c.append(0, 0, &pos(12, 1), &pos(12, 1))?.dense()?;
        assert_eq!(ids(&k), [0., 1., 2., 3., 12., 9., 10., 11.]);
        assert_eq!(c.offset(), 13);
        Ok(())
    }

    /// A quantized cache returns its keys as MLX's quantize-then-dequantize gives them, and
    /// switches from the growing cache at quantized_kv_start.
    #[test]
    fn quantized_cache_round_trips_mlx_affine() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (1, 2, 5, 64), &Device::Cpu)?;
        let want = QuantizedMatrix::quantize(&x.reshape((10, 64))?, 8, 32)?.dequantize()?.reshape((1, 2, 5, 64))?;
        let opts = KvOptions { kv_bits: Some(8), kv_group_size: 32, quantized_kv_start: 3, ..Default::default() };
        let mut c = KvCache::new(1).with_options(opts);
        let (k, _) = c.append(0, 0, &x.narrow(2, 0, 3)?, &x.narrow(2, 0, 3)?)?.dense()?;
        assert_eq!(max_diff(&k, &x.narrow(2, 0, 3)?), 0.0, "below quantized_kv_start keys stay exact");
        let dense = c.nbytes();
        for p in 3..5 {
            c.append(0, 0, &x.narrow(2, p, 1)?, &x.narrow(2, p, 1)?)?;
        }
        let (k, _) = c.append(0, 0, &x.narrow(2, 0, 0)?, &x.narrow(2, 0, 0)?)?.dense()?;
        assert_eq!(max_diff(&k, &want), 0.0);
        assert!(max_diff(&k, &x) > 0.0, "8-bit keys differ from the floats");
        assert!(c.nbytes() < dense / 2, "8-bit buffers take under half the f32 ones ({} vs {dense})", c.nbytes());
        Ok(())
    }

    /// A rotating cache whose first append is one token (a one-token prompt) and whose input
    /// is a strided view (one row of a batch).
    #[test]
    fn rotating_cache_starts_with_one_token_from_a_view() -> Result<()> {
        let mut c = KvCache::new(1).with_options(KvOptions { max_kv_size: Some(8), ..Default::default() });
        let x = Tensor::randn(0f32, 1.0, (2, 3, 1, 4), &Device::Cpu)?.transpose(0, 1)?;
        for _ in 0..12 {
            let row = x.narrow(1, 1, 1)?.transpose(0, 1)?;
            c.append(0, 0, &row, &row)?;
        }
        assert_eq!(c.offset(), 12);
        Ok(())
    }

    /// A deep copy shares no buffer: appending to it (in place) leaves the original as it was,
    /// for every cache kind.
    #[test]
    fn deep_clone_shares_nothing() -> Result<()> {
        let a = Tensor::randn(0f32, 1.0, (1, 1, 6, 64), &Device::Cpu)?;
        let kinds = [KvOptions::default(), KvOptions { max_kv_size: Some(8), ..Default::default() }, KvOptions { kv_bits: Some(8), ..Default::default() }];
        for opts in kinds {
            let mut c = KvCache::new(1).with_options(opts);
            c.append(0, 0, &a.narrow(2, 0, 4)?, &a.narrow(2, 0, 4)?)?;
            c.append(0, 0, &a.narrow(2, 4, 1)?, &a.narrow(2, 4, 1)?)?;
            let mut copy = c.deep_clone()?;
            c.truncate(4);
            copy.truncate(4);
            let (before, _) = c.append(0, 0, &a.narrow(2, 4, 1)?, &a.narrow(2, 4, 1)?)?.dense()?;
            c.truncate(4);
            copy.append(0, 0, &a.narrow(2, 5, 1)?, &a.narrow(2, 5, 1)?)?;
            let (after, _) = c.append(0, 0, &a.narrow(2, 4, 1)?, &a.narrow(2, 4, 1)?)?.dense()?;
            assert_eq!(max_diff(&before, &after), 0.0, "{opts:?}: the copy's append changed the original");
        }
        Ok(())
    }

    /// `step_rows` hands out each row's buffers with room for one more position and the
    /// offsets it goes to, and `commit_rows` counts it; a row it cannot serve (rotating, or
    /// past the window) leaves every row as it was.
    #[test]
    fn step_rows_makes_room_and_counts_one_position() -> Result<()> {
        let a = Tensor::randn(0f32, 1.0, (1, 2, 256, 4), &Device::Cpu)?;
        let (mut x, mut y) = (KvCache::new(2), KvCache::new(2));
        for layer in 0..2 {
            x.append(0, layer, &a, &a)?;
            y.append(0, layer, &a.narrow(2, 0, 5)?, &a.narrow(2, 0, 5)?)?;
        }
        let mut both = KvCache::batch(vec![x, y]);
        assert!(both.step_rows(1, Some(256))?.is_none(), "a row of 256 keys past a window of 256");
        assert_eq!((both.row_offset(0), both.row_offset(1)), (256, 5));
        let Some(rows) = both.step_rows(1, None)? else { panic!("plain growing caches") };
        assert_eq!(rows.offsets, [256, 5]);
        // The full row grew (256 more positions), the other had room.
        assert_eq!(rows.keys.iter().chain(&rows.values).map(|t| t.dim(2)).collect::<Result<Vec<_>>>()?, [512, 256, 512, 256]);
        assert_eq!((both.row_offset(0), both.row_offset(1)), (256, 5), "counted before the step wrote anything");
        both.commit_rows(1);
        // Layer 1 counts its new position; layer 0 has not run this step.
        let parts = both.unbatch();
        assert_eq!(parts.iter().map(|c| (c.rows[0].layers[0].offset, c.rows[0].layers[1].offset)).collect::<Vec<_>>(), [(256, 257), (5, 6)]);
        let rotating = KvCache::new(1).with_options(KvOptions { max_kv_size: Some(8), ..Default::default() });
        let mut mixed = vec![rotating, KvCache::new(1)];
        for c in &mut mixed {
            c.append(0, 0, &a.narrow(2, 0, 3)?, &a.narrow(2, 0, 3)?)?;
        }
        let mut mixed = KvCache::batch(mixed);
        assert!(mixed.step_rows(0, None)?.is_none(), "a rotating row");
        assert_eq!((mixed.row_offset(0), mixed.row_offset(1)), (3, 3));
        Ok(())
    }

    #[test]
    fn batch_and_unbatch_keep_each_sequence() -> Result<()> {
        let a = Tensor::randn(0f32, 1.0, (1, 1, 3, 2), &Device::Cpu)?;
        let (mut x, mut y) = (KvCache::new(1), KvCache::new(1));
        x.append(0, 0, &a, &a)?;
        y.append(0, 0, &a.narrow(2, 0, 1)?, &a.narrow(2, 0, 1)?)?;
        let mut both = KvCache::batch(vec![x, y]);
        assert_eq!((both.rows(), both.row_offset(0), both.row_offset(1)), (2, 3, 1));
        both.append(1, 0, &a.narrow(2, 1, 1)?, &a.narrow(2, 1, 1)?)?;
        let parts = both.unbatch();
        assert_eq!(parts.iter().map(KvCache::offset).collect::<Vec<_>>(), [3, 2]);
        Ok(())
    }
}
