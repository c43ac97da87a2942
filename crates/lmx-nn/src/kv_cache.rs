//! The key/value cache: one preallocated buffer per layer, grown in steps of 256 positions
//! (as MLX LM's `KVCache`), written in place, so decoding a token never copies the history.

use lmx_core::{Result, Tensor};

const STEP: usize = 256;

#[derive(Debug, Clone, Default)]
struct LayerKv {
    /// (b, n_kv_heads, capacity, head_dim) buffers, filled up to `len`.
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

/// Keys and values of every layer for the tokens processed so far.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    /// False for a whole-sequence forward (training, scoring): nothing is stored, and keys
    /// and values stay on the gradient tape (the in-place buffer writes are not differentiable).
    store: bool,
}

impl KvCache {
    /// An empty cache for `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self { layers: vec![LayerKv::default(); n_layers], store: true }
    }

    /// A pass-through "cache" for one forward over whole sequences from position 0: keys and
    /// values are used as they are and nothing is stored.
    pub fn uncached() -> Self {
        Self { layers: Vec::new(), store: false }
    }

    /// Tokens already in the cache (the position of the next token).
    pub fn offset(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    /// Forgets every position from `len` on (reusing a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.layers {
            l.len = l.len.min(len);
        }
    }

    /// Empties the cache.
    pub fn reset(&mut self) {
        self.truncate(0);
    }

    /// Bytes held by the buffers.
    pub fn nbytes(&self) -> usize {
        self.layers.iter().flat_map(|l| [&l.k, &l.v]).flatten().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }

    /// Appends `k`, `v` (b, n_kv_heads, seq_len, head_dim) for layer `layer_idx` and returns
    /// all keys and values so far.
    pub fn append(&mut self, layer_idx: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if !self.store {
            return Ok((k.contiguous()?, v.contiguous()?));
        }
        let n_layers = self.layers.len();
        let Some(layer) = self.layers.get_mut(layer_idx) else { lmx_core::bail!("kv cache: layer {layer_idx} of a cache for {n_layers} layers") };
        let (b, h, seq_len, d) = k.dims4()?;
        let needed = layer.len + seq_len;
        let capacity = layer.k.as_ref().map_or(0, |t| t.dim(2).unwrap_or(0));
        if needed > capacity {
            let new_cap = needed.div_ceil(STEP) * STEP;
            let grow = |old: &Option<Tensor>, like: &Tensor| -> Result<Tensor> {
                let buf = Tensor::zeros((b, h, new_cap, d), like.dtype(), like.device())?;
                if let (Some(old), true) = (old, layer.len > 0) {
                    buf.slice_set(&old.narrow(2, 0, layer.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let (nk, nv) = (grow(&layer.k, k)?, grow(&layer.v, v)?);
            layer.k = Some(nk);
            layer.v = Some(nv);
        }
        let (Some(kb), Some(vb)) = (&layer.k, &layer.v) else {
            return Err(lmx_core::Error::Msg("kv cache buffers missing after growth".into()));
        };
        kb.slice_set(&k.contiguous()?, 2, layer.len)?;
        vb.slice_set(&v.contiguous()?, 2, layer.len)?;
        layer.len = needed;
        Ok((kb.narrow(2, 0, needed)?, vb.narrow(2, 0, needed)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmx_core::Device;

    #[test]
    fn append_grow_and_truncate() -> Result<()> {
        let mut c = KvCache::new(1);
        let a = Tensor::randn(0f32, 1.0, (1, 2, 300, 4), &Device::Cpu)?;
        let (k, _) = c.append(0, &a.narrow(2, 0, 200)?, &a.narrow(2, 0, 200)?)?;
        assert_eq!(k.dims(), &[1, 2, 200, 4]);
        let (k, v) = c.append(0, &a.narrow(2, 200, 100)?, &a.narrow(2, 200, 100)?)?;
        assert_eq!(c.offset(), 300);
        let diff = (k.contiguous()? - &a)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        assert_eq!(v.dims(), &[1, 2, 300, 4]);
        c.truncate(10);
        let (k, _) = c.append(0, &a.narrow(2, 0, 1)?, &a.narrow(2, 0, 1)?)?;
        assert_eq!(k.dim(2)?, 11);
        Ok(())
    }
}
