//! Gradient checkpointing (`--grad-checkpoint`): a trained layer's forward pass keeps only its
//! input and output; the backward pass runs the layer again on the tape, backpropagates the
//! output gradient through it, hands the input gradient on and collects the gradients of the
//! trained tensors in the [`crate::training::GradSink`] (candle's backward cannot return them
//! from inside an op). Activation memory drops from every intermediate of every trained layer
//! to one tensor per layer, for one extra forward pass of those layers.
//!
//! The layer runs off the tape first; an op of (input, output) then puts its output on the
//! tape (a copy of the output, on any device) with the recomputing backward.

use std::sync::Arc;

use lmx_core::{BackendDevice, BackendStorage, Layout, Result, Shape, Tensor, Var};

use crate::training::Checkpointing;

type LayerFn = dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync;

/// Runs one decoder layer as `f(x)` checkpointed. `f` must not use a KV cache (training
/// forwards are uncached).
pub fn layer(ck: &Checkpointing, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static) -> Result<Tensor> {
    // The op's output is on the tape only if its input is: below the first trained layer
    // nothing is, so the input becomes a (never updated) variable.
    let x = if x.track_op() { x.clone() } else { Var::from_tensor(x)?.as_tensor().clone() };
    // Off the tape: the layer's intermediates are freed as soon as it returns.
    let y = f(&x.detach())?.detach();
    let op = Recompute { f: Arc::new(f), ck: ck.clone() };
    x.contiguous()?.apply_op2(&y, op)
}

struct Recompute {
    f: Arc<LayerFn>,
    ck: Checkpointing,
}

/// A copy of the tensor `s` and `l` describe, as a storage of its own.
fn output<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)>
where
    S::Device: BackendDevice<Storage = S>,
{
    // SAFETY: every element is written by the copy below.
    let mut out = unsafe { s.device().alloc_uninit(l.shape(), s.dtype())? };
    s.copy_strided_src(&mut out, 0, l)?;
    Ok((out, l.shape().clone()))
}

impl lmx_core::CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "lmx-checkpoint"
    }

    fn cpu_fwd(&self, _: &lmx_core::CpuStorage, _: &Layout, y: &lmx_core::CpuStorage, l: &Layout) -> Result<(lmx_core::CpuStorage, Shape)> {
        output(y, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &lmx_core::CudaStorage, _: &Layout, y: &lmx_core::CudaStorage, l: &Layout) -> Result<(lmx_core::CudaStorage, Shape)> {
        output(y, l)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let xv = Var::from_tensor(&x.detach())?;
        let y = (self.f)(xv.as_tensor())?;
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        for v in self.ck.vars.iter() {
            if let Some(g) = grads.get(v.as_tensor()) {
                self.ck.sink.add(v.as_tensor().id(), g.detach())?;
            }
        }
        Ok((grads.get(xv.as_tensor()).map(Tensor::detach), None))
    }
}
