//! Gradient checkpointing (`--grad-checkpoint`): a trained layer's forward pass keeps only its
//! input and output; the backward pass runs the layer again on the tape, backpropagates the
//! output gradient through it, hands the input gradient on and collects the gradients of the
//! trained tensors in a [`GradSink`] (candle's backward cannot return them from inside an op).
//! Activation memory drops from every intermediate of every trained layer to one tensor per
//! layer, for one extra forward pass of those layers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lmx_core::{DType, Result, Tensor, TensorId, Var};

use crate::KvCache;

/// Where recomputed layers leave the gradients of the trained tensors.
#[derive(Debug, Default)]
pub struct GradSink {
    grads: Mutex<HashMap<TensorId, Tensor>>,
}

impl GradSink {
    fn add(&self, id: TensorId, g: Tensor) -> Result<()> {
        let mut map = self.grads.lock().unwrap_or_else(|e| e.into_inner());
        let sum = match map.remove(&id) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        map.insert(id, sum);
        Ok(())
    }

    /// The gradient collected for `var` since the last call, if any (removed from the sink).
    pub fn take(&self, var: &Var) -> Option<Tensor> {
        self.grads.lock().unwrap_or_else(|e| e.into_inner()).remove(&var.as_tensor().id())
    }
}

/// Checkpointing settings a training forward pass carries in its [`KvCache`].
#[derive(Debug, Clone)]
pub struct Checkpointing {
    /// Layers from this index on are checkpointed (the ones with trained tensors).
    pub first_layer: usize,
    /// Every trained tensor.
    pub vars: Arc<Vec<Var>>,
    /// Where their gradients go.
    pub sink: Arc<GradSink>,
}

type LayerFn = dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync;

/// Runs decoder layer `layer_idx` as `f(x)`: checkpointed when `cache` asks for it and the layer
/// trains, directly otherwise. `f` must not use the cache (training forwards are uncached).
pub fn layer(cache: &KvCache, layer_idx: usize, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static) -> Result<Tensor> {
    match cache.checkpointing() {
        Some(ck) if layer_idx >= ck.first_layer => {
            // The op's output is on the tape only if its input is: below the first trained
            // layer nothing is, so the input becomes a (never updated) variable.
            let x = if x.track_op() { x.clone() } else { Var::from_tensor(x)?.as_tensor().clone() };
            let op = Recompute { f: Arc::new(f), ck: ck.clone() };
            x.contiguous()?.apply_op1(op)
        }
        _ => f(x),
    }
}

struct Recompute {
    f: Arc<LayerFn>,
    ck: Checkpointing,
}

impl lmx_core::CustomOp1 for Recompute {
    fn name(&self) -> &'static str {
        "lmx-checkpoint"
    }

    fn cpu_fwd(&self, s: &lmx_core::CpuStorage, l: &lmx_core::Layout) -> Result<(lmx_core::CpuStorage, lmx_core::Shape)> {
        let lmx_core::CpuStorage::F32(v) = s else { lmx_core::bail!("gradient checkpointing runs in f32") };
        let (a, b) = l.contiguous_offsets().ok_or_else(|| lmx_core::Error::Msg("checkpoint: input must be contiguous".into()))?;
        // Off the tape: the layer's intermediates are freed as soon as it returns.
        let x = Tensor::from_slice(&v[a..b], l.shape(), &lmx_core::Device::Cpu)?;
        let y = (self.f)(&x)?.detach().to_dtype(DType::F32)?.contiguous()?;
        let shape = y.shape().clone();
        Ok((lmx_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let xv = Var::from_tensor(&x.detach())?;
        let y = (self.f)(xv.as_tensor())?;
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        for v in self.ck.vars.iter() {
            if let Some(g) = grads.get(v.as_tensor()) {
                self.ck.sink.add(v.as_tensor().id(), g.detach())?;
            }
        }
        Ok(grads.get(xv.as_tensor()).map(Tensor::detach))
    }
}
