//! Gradient checkpointing (`--grad-checkpoint`): a trained layer's forward pass keeps only its
//! input and output; the backward pass runs the layer again on the tape, backpropagates the
//! output gradient through it, hands the input gradient on and collects the gradients of the
//! trained tensors in the [`crate::training::GradSink`] (candle's backward cannot return them
//! from inside an op). Activation memory drops from every intermediate of every trained layer
//! to one tensor per layer, for one extra forward pass of those layers.
//!
//! The op runs on the CPU; on another device it says so.

use std::sync::Arc;

use lmx_core::{DType, Result, Tensor, Var};

use crate::training::Checkpointing;

type LayerFn = dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync;

/// Runs one decoder layer as `f(x)` checkpointed. `f` must not use a KV cache (training
/// forwards are uncached).
pub fn layer(ck: &Checkpointing, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static) -> Result<Tensor> {
    // The op's output is on the tape only if its input is: below the first trained layer
    // nothing is, so the input becomes a (never updated) variable.
    let x = if x.track_op() { x.clone() } else { Var::from_tensor(x)?.as_tensor().clone() };
    let op = Recompute { f: Arc::new(f), ck: ck.clone() };
    x.contiguous()?.apply_op1(op)
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _s: &lmx_core::CudaStorage, _l: &lmx_core::Layout) -> Result<(lmx_core::CudaStorage, lmx_core::Shape)> {
        lmx_core::bail!("gradient checkpointing (--grad-checkpoint) has no CUDA implementation yet; train without it")
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
