//! Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): keys and values are compressed into
//! one latent vector per position (`kv_a_proj_with_mqa`, then `kv_a_layernorm`) plus a small
//! rotated key shared by every head; the KV cache holds only those two (for DeepSeek-V3 576
//! numbers per position and layer instead of 128 heads x 2 x 128), and `kv_b_proj` expands
//! them into each head's keys and values when attending. Queries come from `q_proj`, or
//! through a low-rank `q_a_proj` / `q_a_layernorm` / `q_b_proj`. Each head's query and key are
//! a part without position (`qk_nope_head_dim`) and a rotated part (`qk_rope_head_dim`).
//!
//! Ports transformers' `DeepseekV3Attention` (v5): DeepSeek's checkpoints lay the rotated
//! dimensions out in interleaved pairs (`rope_interleave`), which transformers rotates into
//! split halves; so does this layer (a permutation applied to queries and keys alike).
//!
//! Decoding one position at a time takes the absorbed form (DeepSeek-V2's paper, section
//! 2.1.2; MLX LM's `deepseek_v3`): `kv_b_proj` splits per head into `W_UK` (latent -> key
//! without position) and `W_UV` (latent -> value), the query is moved into latent space
//! (`q_nope @ W_UK`), each head attends over the cached latent vectors and rotated keys
//! directly (one shared key/value "head", like multi-query attention), and `W_UV` maps the
//! attended latent back to the head's value. The expanded form runs `kv_b_proj` over every
//! cached position at every step: for DeepSeek-V3 (rank 512, 128 heads of 128 + 128) ~17
//! million multiply-adds per cached position and layer, against ~0.14 million absorbed.
//! Prompts (many positions at once) keep the expanded form, which is cheaper there.
//!
//! Tensor parallelism splits the heads: `q_b_proj` (or `q_proj`) and `kv_b_proj` by rows of
//! this rank's heads, `o_proj` by the matching columns (one all-sum); the compressions are
//! replicated, so every rank caches the same latent vectors.

use lmx_core::{ops, Module, Result, Tensor};

use crate::attention::AttentionInput;
use crate::builder::{Builder, Shard};
use crate::error::BuildError;
use crate::kv_cache::KvCache;
use crate::linear::{Bias, Linear, RmsNorm};

/// The shape of a latent attention block (config.json's names).
#[derive(Debug, Clone, Copy)]
pub struct MlaConfig {
    pub hidden_size: usize,
    pub num_heads: usize,
    /// Rank of the query compression (`q_lora_rank`), or None for a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Width of the cached latent vector (`kv_lora_rank`).
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Softmax scale (transformers: `qk_head_dim^-0.5`, times YaRN's `mscale^2`).
    pub scale: f64,
    /// The rotated dimensions are stored as interleaved pairs (`rope_interleave`).
    pub interleaved: bool,
    pub rms_norm_eps: f64,
    pub attention_bias: bool,
}

/// Multi-head latent attention; see the module documentation.
#[derive(Debug, Clone)]
pub struct Mla {
    /// `q_proj`, or `q_a_proj` + `q_a_layernorm` + `q_b_proj`.
    q: (Linear, Option<(RmsNorm, Linear)>),
    kv_a: Linear,
    kv_a_norm: RmsNorm,
    kv_b: Linear,
    o_proj: Linear,
    /// This rank's heads.
    heads: usize,
    cfg: MlaConfig,
    /// `(W_UK (heads, nope, rank), W_UV^T (heads, rank, v))` from `kv_b_proj`, made at the
    /// first decode step (a view of a dense weight; a quantized one is dequantized once).
    absorbed: std::sync::Arc<std::sync::OnceLock<(Tensor, Tensor)>>,
}

impl Mla {
    /// Reads the block under `vb` (`self_attn`).
    pub fn new(vb: &Builder, cfg: &MlaConfig) -> std::result::Result<Self, BuildError> {
        let (h, n) = (cfg.hidden_size, cfg.num_heads);
        if cfg.qk_rope_head_dim == 0 || cfg.qk_rope_head_dim % 2 != 0 {
            return Err(BuildError::ConfigValue { key: "qk_rope_head_dim", value: cfg.qk_rope_head_dim.to_string(), allowed: "an even number of rotated dimensions" });
        }
        let heads = vb.split(n, 1);
        let qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim;
        let kv = cfg.qk_nope_head_dim + cfg.v_head_dim;
        let rows = |per: usize| Shard::Column(heads.start * per..heads.end * per);
        let bias = Bias::from(cfg.attention_bias);
        let q = match cfg.q_lora_rank {
            None => (vb.pp("q_proj").linear(h, n * qk, Bias::No, rows(qk))?, None),
            Some(r) => {
                let a = vb.pp("q_a_proj").linear(h, r, bias, Shard::Replicated)?;
                let norm = vb.pp("q_a_layernorm").rms_norm(r, cfg.rms_norm_eps)?;
                (a, Some((norm, vb.pp("q_b_proj").linear(r, n * qk, Bias::No, rows(qk))?)))
            }
        };
        Ok(Self {
            q,
            kv_a: vb.pp("kv_a_proj_with_mqa").linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias, Shard::Replicated)?,
            kv_a_norm: vb.pp("kv_a_layernorm").rms_norm(cfg.kv_lora_rank, cfg.rms_norm_eps)?,
            kv_b: if vb.pp("kv_b_proj").has("weight") || vb.is_shapes_only() {
                vb.pp("kv_b_proj").linear(cfg.kv_lora_rank, n * kv, Bias::No, rows(kv))?
            } else {
                Self::kv_b_from_mlx(vb, cfg, heads.clone())?
            },
            o_proj: vb.pp("o_proj").linear(n * cfg.v_head_dim, h, bias, Shard::Row(heads.start * cfg.v_head_dim..heads.end * cfg.v_head_dim))?,
            heads: heads.len(),
            cfg: *cfg,
            absorbed: Default::default(),
        })
    }

    /// `kv_b_proj` (dense, this rank's heads) from MLX LM's split of it: `embed_q` (heads,
    /// rank, nope) holds each head's `W_UK` transposed and `unembed_out` (heads, v, rank) its
    /// `W_UV`, each dense or quantized like stacked experts (`mlx_lm`'s `sanitize` writes them
    /// for its own absorbed decode).
    fn kv_b_from_mlx(vb: &Builder, cfg: &MlaConfig, heads: std::ops::Range<usize>) -> std::result::Result<Linear, BuildError> {
        let (n, nope, v, rank) = (cfg.num_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
        let mut rows = Vec::with_capacity(2 * heads.len());
        for h in heads {
            let place = |t: Tensor| t.to_device(vb.device())?.to_dtype(vb.dtype());
            let w_uk_t = vb.pp("embed_q").expert(h, n).linear(nope, rank, Bias::No, Shard::Replicated)?.weight()?;
            let w_uv = vb.pp("unembed_out").expert(h, n).linear(rank, v, Bias::No, Shard::Replicated)?.weight()?;
            rows.push(place(w_uk_t.t()?.contiguous()?)?);
            rows.push(place(w_uv)?);
        }
        Ok(Linear::dense(Tensor::cat(&rows, 0)?))
    }

    /// `kv_b_proj` split per head for the absorbed form, in `like`'s dtype and device.
    fn absorbed(&self, like: &Tensor) -> Result<&(Tensor, Tensor)> {
        if let Some(w) = self.absorbed.get() {
            return Ok(w);
        }
        let c = self.cfg;
        let w = self.kv_b.weight()?.to_device(like.device())?.to_dtype(like.dtype())?;
        let w = w.reshape((self.heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank))?;
        let w_uk = w.narrow(1, 0, c.qk_nope_head_dim)?.contiguous()?;
        let w_uv_t = w.narrow(1, c.qk_nope_head_dim, c.v_head_dim)?.transpose(1, 2)?.contiguous()?;
        Ok(self.absorbed.get_or_init(|| (w_uk, w_uv_t)))
    }

    /// Interleaved pairs `(x0, x1), (x2, x3), ...` of the last dimension -> halves
    /// `(x0, x2, ..., x1, x3, ...)`, which the split-halves rotation then turns as DeepSeek's
    /// interleaved one does.
    fn halves(&self, x: &Tensor) -> Result<Tensor> {
        if !self.cfg.interleaved {
            return Ok(x.clone());
        }
        let mut dims = x.dims().to_vec();
        let d = dims.pop().unwrap_or(0);
        let pairs: Vec<usize> = dims.iter().copied().chain([d / 2, 2]).collect();
        let back: Vec<usize> = dims.iter().copied().chain([d]).collect();
        let r = pairs.len();
        x.reshape(pairs)?.transpose(r - 2, r - 1)?.contiguous()?.reshape(back)
    }

    /// (b, l, hidden) -> (b, l, hidden), appending each position's latent vector and rotated
    /// key to `cache` (a cache of several rows: row i takes batch row i at its own position).
    pub fn forward(&self, x: &Tensor, input: &AttentionInput, cache: &mut KvCache, layer_idx: usize) -> Result<Tensor> {
        let c = self.cfg;
        let (b, l, _) = x.dims3()?;
        let qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
        let q = match &self.q {
            (q_proj, None) => q_proj.forward(x)?,
            (a, Some((norm, q_b))) => q_b.forward(&norm.forward(&a.forward(x)?)?)?,
        };
        // (b, heads, l, qk)
        let q = q.reshape((b, l, self.heads, qk))?.transpose(1, 2)?;
        let q_pass = q.narrow(3, 0, c.qk_nope_head_dim)?;
        let q_rot = self.halves(&q.narrow(3, c.qk_nope_head_dim, c.qk_rope_head_dim)?)?;
        let compressed = self.kv_a.forward(x)?;
        let latent = self.kv_a_norm.forward(&compressed.narrow(2, 0, c.kv_lora_rank)?.contiguous()?)?.unsqueeze(1)?;
        let k_rot = self.halves(&compressed.narrow(2, c.kv_lora_rank, c.qk_rope_head_dim)?.contiguous()?)?.unsqueeze(1)?;
        if cache.rows() > 1 && cache.rows() != b {
            lmx_core::bail!("a batch of {b} sequences with a cache for {}", cache.rows());
        }
        let angles = input.table(0)?;
        // One cache row holds the whole batch (its sequences in step); several rows are
        // sequences at their own positions, attended row by row.
        let rows: Vec<Option<usize>> = if cache.rows() > 1 { (0..b).map(Some).collect() } else { vec![None] };
        let mut outs = Vec::with_capacity(rows.len());
        for r in rows {
            let part = |t: &Tensor| match r {
                Some(i) => t.narrow(0, i, 1),
                None => Ok(t.clone()),
            };
            let (i, n) = (r.unwrap_or(0), if r.is_some() { 1 } else { b });
            let (cos, sin) = angles.cos_sin(i)?;
            let q_rot = ops::rope(&part(&q_rot)?.contiguous()?, cos, sin)?;
            let k_rot = ops::rope(&part(&k_rot)?.contiguous()?, cos, sin)?;
            // The cache holds the latent vectors as "keys" and the rotated keys as "values".
            let (latent_all, k_rot_all) = cache.append(i, layer_idx, &part(&latent)?.contiguous()?, &k_rot)?.dense()?;
            let kv_len = latent_all.dim(2)?;
            if l == 1 && self.kv_b.adapter.is_none() && !x.track_op() {
                // Absorbed: scores over [latent | rotated key], values the latent vectors.
                let (w_uk, w_uv_t) = self.absorbed(x)?;
                let q_lat = part(&q_pass)?.contiguous()?.broadcast_matmul(&w_uk.unsqueeze(0)?)?;
                let q = Tensor::cat(&[&q_lat, &q_rot], 3)?.contiguous()?;
                let k = Tensor::cat(&[&latent_all, &k_rot_all], 3)?.contiguous()?;
                let o_lat = ops::attention(&q, &k, &latent_all.contiguous()?, ops::Mask::None, c.scale, None, None)?;
                outs.push(o_lat.broadcast_matmul(&w_uv_t.unsqueeze(0)?)?);
                continue;
            }
            // Each head's keys and values from the latent vectors: (n, heads, kv_len, ..).
            let kv = self.kv_b.forward(&latent_all.squeeze(1)?)?.reshape((n, kv_len, self.heads, c.qk_nope_head_dim + c.v_head_dim))?.transpose(1, 2)?;
            let k_nope = kv.narrow(3, 0, c.qk_nope_head_dim)?;
            let v = kv.narrow(3, c.qk_nope_head_dim, c.v_head_dim)?.contiguous()?;
            let k = Tensor::cat(&[&k_nope, &k_rot_all.broadcast_as((n, self.heads, kv_len, c.qk_rope_head_dim))?], 3)?.contiguous()?;
            let q = Tensor::cat(&[&part(&q_pass)?, &q_rot], 3)?.contiguous()?;
            let rotating = cache.row_window(i);
            let additive;
            let mask = if l > 1 {
                additive = input.mask(l, kv_len, rotating, q.device())?;
                ops::Mask::Causal { window: rotating, additive: &additive }
            } else {
                ops::Mask::None
            };
            outs.push(ops::attention(&q, &k, &v, mask, c.scale, None, None)?);
        }
        let y = if outs.len() == 1 { outs.swap_remove(0) } else { Tensor::cat(&outs, 0)? };
        self.o_proj.forward(&y.transpose(1, 2)?.reshape((b, l, self.heads * c.v_head_dim))?)
    }
}
