//! LoRA and DoRA adapters on a linear layer, as MLX LM defines them (`mlx_lm/tuner/lora.py`,
//! `dora.py`), with MLX LM's tensor names and shapes:
//!
//! - LoRA: `y = base(x) + scale * (dropout(x) @ lora_a) @ lora_b`, `lora_a` (in, r) starts
//!   uniform in ±1/sqrt(in), `lora_b` (r, out) at zero.
//! - DoRA: `y = m / stop_grad(||W + scale * lora_b^T lora_a^T||_row) * (x W^T + scale * z) + bias`,
//!   `m` (out) starts at the row norms of W.
//!
//! DoRA's row norms are computed without ever forming `W + delta`:
//! `||W_i + s D_i||^2 = ||W_i||^2 + 2 s (W A)_i . B_i + s^2 B_i^T (A^T A) B_i`, where `W A` is one
//! product through the base layer's own (possibly quantized) matmul.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lmx_core::{DType, Result, Tensor};
use lmx_io::{AdapterSetup, FineTuneType, WeightsPath};

/// A low-rank adapter attached to one linear layer.
#[derive(Debug)]
pub struct Adapter {
    lora_a: Tensor,
    lora_b: Tensor,
    /// DoRA: the learned magnitudes and the squared row norms of the frozen weight.
    dora: Option<(Tensor, Tensor)>,
    scale: f64,
    dropout: f64,
    setup: Arc<AdapterSetup>,
    rng: AtomicU64,
}

/// splitmix64: a tiny seeded generator for `lora_a`'s initial values and dropout masks.
fn next_u64(state: &AtomicU64) -> u64 {
    let mut z = state.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn uniform(state: &AtomicU64) -> f32 {
    (next_u64(state) >> 40) as f32 / (1u64 << 24) as f32
}

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3))
}

impl Adapter {
    /// Creates (or loads, from the setup's saved tensors) the adapter of the linear layer at
    /// `vb` with `in_features` -> `out_features`. `row_norms_sq` gives ||W_i||^2 for DoRA.
    pub fn new(vb: &WeightsPath, setup: &Arc<AdapterSetup>, in_features: usize, out_features: usize, row_norms_sq: impl FnOnce() -> Result<Tensor>) -> lmx_io::Result<Self> {
        let r = setup.params.rank;
        let dev = vb.device().clone();
        let dtype = if setup.trainable() { DType::F32 } else { vb.dtype() };
        let rng = AtomicU64::new(setup.seed ^ hash(vb.prefix()));
        let bound = 1.0 / (in_features as f32).sqrt();
        let lora_a = setup.param(&vb.key("lora_a"), &[in_features, r], dtype, || {
            let v: Vec<f32> = (0..in_features * r).map(|_| (uniform(&rng) * 2.0 - 1.0) * bound).collect();
            Tensor::from_vec(v, (in_features, r), &dev)
        })?;
        let lora_b = setup.param(&vb.key("lora_b"), &[r, out_features], dtype, || Tensor::zeros((r, out_features), DType::F32, &dev))?;
        let dora = match setup.kind {
            FineTuneType::Dora => {
                let norms_sq = row_norms_sq()?.to_dtype(DType::F32)?;
                let m = setup.param(&vb.key("m"), &[out_features], dtype, || norms_sq.sqrt())?;
                Some((m, norms_sq))
            }
            _ => None,
        };
        Ok(Self { lora_a, lora_b, dora, scale: setup.params.scale, dropout: setup.params.dropout, setup: setup.clone(), rng })
    }

    /// `x` with dropout applied while training (inverted dropout, seeded per module).
    fn dropout(&self, x: &Tensor) -> Result<Tensor> {
        if self.dropout <= 0.0 || !self.setup.is_training() {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.dropout as f32;
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| if uniform(&self.rng) < keep { 1.0 / keep } else { 0.0 }).collect();
        x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?
    }

    /// The adapted output from the input `x` (.., in) and the frozen layer's output without
    /// bias `base_y` (.., out); `base` runs the frozen matmul (needed by DoRA's norms).
    pub fn forward(&self, x: &Tensor, base_y: &Tensor, base: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_features = dims.last().copied().unwrap_or(0);
        let rows = x.elem_count() / in_features.max(1);
        let x2 = self.dropout(&x.reshape((rows, in_features))?)?;
        let dtype = x.dtype();
        let z = x2.to_dtype(self.lora_a.dtype())?.matmul(&self.lora_a)?.matmul(&self.lora_b)?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.lora_b.dim(1)?;
        }
        let z = (z * self.scale)?.to_dtype(dtype)?.reshape(out_dims)?;
        let y = (base_y + z)?;
        let Some((m, norms_sq)) = &self.dora else { return Ok(y) };
        let denom = self.dora_row_norms(norms_sq, base)?;
        y.broadcast_mul(&(m / denom)?.to_dtype(dtype)?)
    }

    /// ||W_i + scale * (lora_b^T lora_a^T)_i|| for every output row i, off the tape.
    fn dora_row_norms(&self, norms_sq: &Tensor, base: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let a = self.lora_a.detach().to_dtype(DType::F32)?;
        let b = self.lora_b.detach().to_dtype(DType::F32)?;
        // (A^T W^T) (r, out) through the base layer's matmul, so quantized weights stay packed.
        let at_wt = base(&a.t()?.contiguous()?.to_dtype(norms_sq.dtype())?)?.to_dtype(DType::F32)?;
        let cross = (at_wt * &b)?.sum(0)?;
        let gram = a.t()?.matmul(&a)?;
        let quad = (gram.matmul(&b)? * &b)?.sum(0)?;
        let sq = ((norms_sq + (cross * (2.0 * self.scale))?)? + (quad * (self.scale * self.scale))?)?;
        sq.sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use lmx_core::gradcheck::{check_grad, check_var_grads, max_abs_diff};
    use lmx_core::quant::QuantizedMatrix;
    use lmx_core::{Device, Module};
    use lmx_io::{LoraParameters, QuantConfig, Weights};

    use crate::{Bias, Linear};

    const IN: usize = 64;
    const OUT: usize = 12;
    const R: usize = 4;
    const SCALE: f64 = 2.0;

    /// A layer `model.layers.0.mlp.up_proj` with a trainable adapter whose `lora_b` is not zero
    /// (so every parameter gets a gradient), dense or quantized to 4 bits.
    fn layer(kind: FineTuneType, quantized: bool) -> Result<(Linear, Arc<AdapterSetup>, Tensor)> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (OUT, IN), &dev)?;
        let mut tensors = HashMap::new();
        let key = "model.layers.0.mlp.up_proj";
        let (w_eff, quant) = if quantized {
            let q = QuantizedMatrix::quantize(&w, 4, 32)?;
            let (p, s, b) = q.to_tensors()?;
            tensors.insert(format!("{key}.weight"), p);
            tensors.insert(format!("{key}.scales"), s);
            tensors.insert(format!("{key}.biases"), b);
            let cfg = serde_json::json!({"quantization": {"bits": 4, "group_size": 32}});
            (q.dequantize()?, QuantConfig::from_config(&cfg).map_err(lmx_core::Error::Msg)?)
        } else {
            tensors.insert(format!("{key}.weight"), w.clone());
            (w, None)
        };
        tensors.insert(format!("{key}.bias"), Tensor::randn(0f32, 1.0, OUT, &dev)?);
        let params = LoraParameters { rank: R, scale: SCALE, dropout: 0.0, keys: None };
        let mut saved = HashMap::new();
        saved.insert(format!("{key}.lora_b"), Tensor::randn(0f32, 0.3, (R, OUT), &dev)?);
        let setup = AdapterSetup::new(kind, 1, 1, params, true, 7).map_err(|e| lmx_core::Error::Msg(e.to_string()))?.with_initial(saved, "test");
        let setup = Arc::new(setup);
        let weights = Weights::from_tensors(tensors, DType::F32, &dev, "test").with_quantization(quant).with_adapters(setup.clone());
        let lin = Linear::new(&weights.root().pp(key), IN, OUT, Bias::Yes).map_err(|e| lmx_core::Error::Msg(e.to_string()))?;
        weights.finish(|_| false).map_err(|e| lmx_core::Error::Msg(e.to_string()))?;
        Ok((lin, setup, w_eff))
    }

    /// The reference formulas of MLX LM's LoRALinear / DoRALinear, written out densely.
    fn reference(kind: FineTuneType, x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, m: Option<&Tensor>, bias: &Tensor) -> Result<Tensor> {
        let y = (x.matmul(&w.t()?)? + (x.matmul(a)?.matmul(b)? * SCALE)?)?;
        let y = match kind {
            FineTuneType::Dora => {
                let adapted = (w + (b.t()?.matmul(&a.t()?)? * SCALE)?)?;
                let norm = adapted.sqr()?.sum(1)?.sqrt()?;
                y.broadcast_mul(&(m.expect("m") / norm)?)?
            }
            _ => y,
        };
        y.broadcast_add(bias)
    }

    #[test]
    fn lora_and_dora_match_the_reference_and_pass_gradient_checks() -> Result<()> {
        for kind in [FineTuneType::Lora, FineTuneType::Dora] {
            for quantized in [false, true] {
                let (lin, setup, w) = layer(kind, quantized)?;
                let vars = setup.trainables();
                let names: Vec<&str> = vars.iter().map(|(k, _)| k.rsplit('.').next().unwrap_or("")).collect();
                let want: &[&str] = if kind == FineTuneType::Dora { &["lora_a", "lora_b", "m"] } else { &["lora_a", "lora_b"] };
                assert_eq!(names, want, "{kind:?}");
                let x = Tensor::randn(0f32, 1.0, (3, IN), &Device::Cpu)?;
                let (a, b) = (vars[0].1.as_tensor(), vars[1].1.as_tensor());
                let m = vars.get(2).map(|v| v.1.as_tensor());
                // The bias is the checkpoint's: recover it as the output at x = 0 minus nothing.
                let bias = lin.forward(&Tensor::zeros((1, IN), DType::F32, &Device::Cpu)?)?.squeeze(0)?;
                let got = lin.forward(&x)?;
                let want = reference(kind, &x, &w, a, b, m, &bias)?;
                let d = max_abs_diff(&got, &want)?;
                assert!(d < 1e-4, "{kind:?} quantized={quantized}: forward differs by {d}");
                // Gradients: of the input (through the frozen, possibly packed, weight) and of
                // every adapter tensor. DoRA's norm is a constant in the backward pass (stop
                // gradient), so the check holds it fixed: compare against a loss whose norm is
                // detached too, which is exactly what the layer computes.
                if kind == FineTuneType::Lora {
                    check_grad(|x| lin.forward(x), &x, 1e-2)?;
                    let r = Tensor::randn(0f32, 1.0, (3, OUT), &Device::Cpu)?;
                    let refs: Vec<&lmx_core::Var> = vars.iter().map(|(_, v)| v).collect();
                    check_var_grads(|| (lin.forward(&x)? * &r)?.sum_all(), &refs, 1e-2)?;
                } else {
                    // The m gradient is exact (m enters linearly); lora_a/lora_b are compared
                    // against the dense reference with its norm detached.
                    let r = Tensor::randn(0f32, 1.0, (3, OUT), &Device::Cpu)?;
                    let grads = (lin.forward(&x)? * &r)?.sum_all()?.backward()?;
                    let adapted = (&w + (b.t()?.matmul(&a.t()?)? * SCALE)?)?;
                    let norm = adapted.sqr()?.sum(1)?.sqrt()?.detach();
                    let reference_loss = {
                        let y = (x.matmul(&w.t()?)? + (x.matmul(a)?.matmul(b)? * SCALE)?)?;
                        (y.broadcast_mul(&(m.expect("m") / norm)?)?.broadcast_add(&bias)? * &r)?.sum_all()?
                    };
                    let ref_grads = reference_loss.backward()?;
                    for (k, v) in &vars {
                        let d = max_abs_diff(grads.get(v.as_tensor()).expect("grad"), ref_grads.get(v.as_tensor()).expect("ref grad"))?;
                        assert!(d < 1e-3, "DoRA quantized={quantized}: gradient of {k} differs by {d}");
                    }
                    check_grad(|x| lin.forward(x), &x, 1e-2)?;
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_saved_tensor_with_the_wrong_shape_or_no_module_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let mut tensors = HashMap::new();
        tensors.insert("model.layers.0.q.weight".to_string(), Tensor::zeros((OUT, IN), DType::F32, &dev)?);
        let params = LoraParameters { rank: R, scale: SCALE, dropout: 0.0, keys: None };
        let mut saved = HashMap::new();
        saved.insert("model.layers.0.q.lora_a".to_string(), Tensor::zeros((IN, R + 1), DType::F32, &dev)?);
        let setup = Arc::new(AdapterSetup::new(FineTuneType::Lora, -1, 1, params.clone(), false, 0).map_err(|e| lmx_core::Error::Msg(e.to_string()))?.with_initial(saved, "a.safetensors"));
        let weights = Weights::from_tensors(tensors.clone(), DType::F32, &dev, "t").with_adapters(setup);
        let err = Linear::new(&weights.root().pp("model.layers.0.q"), IN, OUT, Bias::No).expect_err("shape").to_string();
        assert!(err.contains("lora_a") && err.contains("a.safetensors"), "{err}");

        let mut saved = HashMap::new();
        saved.insert("model.layers.5.q.lora_a".to_string(), Tensor::zeros((IN, R), DType::F32, &dev)?);
        let setup = Arc::new(AdapterSetup::new(FineTuneType::Lora, -1, 1, params, false, 0).map_err(|e| lmx_core::Error::Msg(e.to_string()))?.with_initial(saved, "a.safetensors"));
        let weights = Weights::from_tensors(tensors, DType::F32, &dev, "t").with_adapters(setup);
        Linear::new(&weights.root().pp("model.layers.0.q"), IN, OUT, Bias::No).map_err(|e| lmx_core::Error::Msg(e.to_string()))?;
        let err = weights.finish(|_| false).expect_err("unused adapter tensor").to_string();
        assert!(err.contains("model.layers.5.q.lora_a"), "{err}");
        Ok(())
    }
}
