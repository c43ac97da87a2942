//! The gated feed-forward block: `down_proj(act(gate_proj(x)) * up_proj(x))`, SwiGLU (Llama,
//! Mistral, Qwen) or GeGLU (Gemma). Tensor parallelism splits the intermediate features:
//! gate/up column-parallel, down row-parallel (on quantization group boundaries), one all-sum.

use lmx_core::cpu_step::StepLinear;
use lmx_core::quant::CodeTarget;
use lmx_core::{ops, Module, Result, Tensor};

use crate::builder::{Builder, Shard};
use crate::error::BuildError;
use crate::linear::{Bias, Linear};

/// The gate's activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// SiLU (`hidden_act: silu`): SwiGLU.
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`): GeGLU.
    GeluTanh,
    /// gpt-oss's clamped SwiGLU: the gate clamped above at `limit`, the up projection to
    /// `[-limit, limit]`, then `(up + 1) * gate * sigmoid(alpha * gate)`.
    ClampedSwiglu { alpha: f32, limit: f32 },
}

/// The `mlp` block of a decoder layer.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    activation: Activation,
    /// Where a decode step's SiLU product also writes its output coded for a quantized
    /// `down_proj` (GPU; see [`lmx_core::quant::CodeTarget`]).
    down_codes: Option<CodeTarget>,
}

impl Mlp {
    /// Reads `gate_proj`, `up_proj` and `down_proj` under `vb` (this rank's features).
    pub fn new(vb: &Builder, hidden_size: usize, intermediate_size: usize, bias: Bias, activation: Activation) -> std::result::Result<Self, BuildError> {
        Self::with_names(vb, ["gate_proj", "up_proj", "down_proj"], hidden_size, intermediate_size, bias, activation)
    }

    /// [`Mlp::new`] for checkpoints that name the projections otherwise (`[gate, up, down]`:
    /// Mixtral's experts are `w1`, `w3`, `w2`).
    pub fn with_names(vb: &Builder, [gate, up, down]: [&str; 3], hidden_size: usize, intermediate_size: usize, bias: Bias, activation: Activation) -> std::result::Result<Self, BuildError> {
        let unit = vb.pp(down).quantized_group_size()?.unwrap_or(1);
        let part = vb.split(intermediate_size, unit);
        Ok(Self {
            gate_proj: vb.pp(gate).linear(hidden_size, intermediate_size, bias, Shard::Column(part.clone()))?,
            up_proj: vb.pp(up).linear(hidden_size, intermediate_size, bias, Shard::Column(part.clone()))?,
            down_proj: vb.pp(down).linear(intermediate_size, hidden_size, bias, Shard::Row(part))?,
            activation,
            down_codes: None,
        }
        .coded())
    }
}

impl Mlp {
    /// [`Mlp::new`] for checkpoints that store gate and up as one `gate_up_proj` (Phi-3):
    /// rows `0..intermediate_size` are the gate, the rest the up projection.
    pub fn with_fused_gate_up(vb: &Builder, hidden_size: usize, intermediate_size: usize, bias: Bias, activation: Activation) -> std::result::Result<Self, BuildError> {
        let unit = vb.pp("down_proj").quantized_group_size()?.unwrap_or(1);
        let part = vb.split(intermediate_size, unit);
        let fused = vb.pp("gate_up_proj");
        let up = intermediate_size + part.start..intermediate_size + part.end;
        Ok(Self {
            gate_proj: fused.linear(hidden_size, 2 * intermediate_size, bias, Shard::Column(part.clone()))?,
            up_proj: fused.linear(hidden_size, 2 * intermediate_size, bias, Shard::Column(up))?,
            down_proj: vb.pp("down_proj").linear(intermediate_size, hidden_size, bias, Shard::Row(part))?,
            activation,
            down_codes: None,
        }
        .coded())
    }
}

impl Mlp {
    /// A SwiGLU block whose down projection reads int8 codes gets a target for them.
    fn coded(mut self) -> Self {
        if self.activation == Activation::Silu {
            self.down_codes = self.down_proj.code_spec().map(CodeTarget::new);
        }
        self
    }

    /// The (bits, group size) of the codes the gate and up projections read, if they agree.
    pub fn input_code_spec(&self) -> Option<(usize, usize)> {
        Linear::shared_code_spec(&[&self.gate_proj, &self.up_proj])
    }

    /// (gate, up, down) of a SwiGLU block (projections without adapters or tensor-parallel
    /// sums), for a decode step on plain buffers (`lmx_core::cpu_step`).
    pub(crate) fn step_parts(&self) -> Option<[StepLinear<'_>; 3]> {
        if self.activation != Activation::Silu {
            return None;
        }
        Some([self.gate_proj.step_linear()?, self.up_proj.step_linear()?, self.down_proj.step_linear()?])
    }

    fn activate(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        match self.activation {
            Activation::Silu => ops::silu_mul_coded(gate, up, self.down_codes.as_ref()),
            Activation::GeluTanh => gate.gelu()? * up,
            Activation::ClampedSwiglu { alpha, limit } => {
                let (alpha, limit) = (f64::from(alpha), f64::from(limit));
                let gate = gate.minimum(limit)?;
                let up = (up.clamp(-limit, limit)? + 1.0)?;
                let sigmoid = ((gate.affine(-alpha, 0.0)?.exp()? + 1.0)?).recip()?;
                (gate * sigmoid)? * up
            }
        }
    }

    /// Several MLPs on the same input (a token's experts): all their gate and up projections
    /// in one shared step ([`Linear::forward_many`]), then each one's down projection.
    pub fn forward_many(mlps: &[&Mlp], x: &Tensor) -> Result<Vec<Tensor>> {
        let layers: Vec<&Linear> = mlps.iter().flat_map(|m| [&m.gate_proj, &m.up_proj]).collect();
        let gate_up = Linear::forward_many(&layers, x)?;
        mlps.iter().zip(gate_up.chunks_exact(2)).map(|(m, gu)| m.down_proj.forward(&m.activate(&gu[0], &gu[1])?)).collect()
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up] = Linear::forward_shared([&self.gate_proj, &self.up_proj], x)?;
        self.down_proj.forward(&self.activate(&gate, &up)?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use lmx_core::{DType, Device, Module, Result, Tensor};
    use lmx_io::Weights;

    use super::*;

    fn err(e: BuildError) -> lmx_core::Error {
        lmx_core::Error::Msg(e.to_string())
    }

    /// GeGLU (`gelu_pytorch_tanh`) and SwiGLU blocks equal their formulas, and the `1 + w` RMS
    /// norm equals a plain one whose weight is `1 + w` (Gemma's checkpoints store `w`).
    #[test]
    fn activations_and_one_plus_norm_match_their_formulas() -> Result<()> {
        let dev = Device::Cpu;
        let (h, i) = (8, 12);
        let t = |shape: (usize, usize)| Tensor::randn(0f32, 0.5, shape, &dev);
        let (g, u, d) = (t((i, h))?, t((i, h))?, t((h, i))?);
        let w = Tensor::randn(0f32, 0.1, h, &dev)?;
        let tensors = HashMap::from([
            ("mlp.gate_proj.weight".to_string(), g.clone()),
            ("mlp.up_proj.weight".to_string(), u.clone()),
            ("mlp.down_proj.weight".to_string(), d.clone()),
            ("norm.weight".to_string(), w.clone()),
        ]);
        let vb = Builder::new(Weights::from_tensors(tensors, "t"), DType::F32, &dev);
        let x = Tensor::randn(0f32, 1.0, (1, 3, h), &dev)?;
        let lin = |w: &Tensor| x.broadcast_matmul(&w.t()?);
        for (act, f) in [(Activation::Silu, Tensor::silu as fn(&Tensor) -> Result<Tensor>), (Activation::GeluTanh, Tensor::gelu)] {
            let mlp = Mlp::new(&vb.pp("mlp"), h, i, Bias::No, act).map_err(err)?;
            let want = (f(&lin(&g)?)? * lin(&u)?)?.broadcast_matmul(&d.t()?)?;
            let diff = (mlp.forward(&x)? - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{act:?}: {diff}");
        }
        let norm = vb.pp("norm").rms_norm_one_plus(h, 1e-6).map_err(err)?;
        let want = lmx_core::ops::rms_norm(&x, &(w + 1.0)?, 1e-6)?;
        let diff = (norm.forward(&x)? - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "1 + w norm: {diff}");
        Ok(())
    }
}
