//! The gated feed-forward block: `down_proj(act(gate_proj(x)) * up_proj(x))`, SwiGLU (Llama,
//! Mistral, Qwen) or GeGLU (Gemma). Tensor parallelism splits the intermediate features:
//! gate/up column-parallel, down row-parallel (on quantization group boundaries), one all-sum.

use lmx_core::{ops, Module, Result, Tensor};

use crate::builder::{Builder, Shard};
use crate::error::BuildError;
use crate::linear::{Bias, Linear};

/// The gate's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (`hidden_act: silu`): SwiGLU.
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`): GeGLU.
    GeluTanh,
}

/// The `mlp` block of a decoder layer.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    activation: Activation,
}

impl Mlp {
    /// Reads `gate_proj`, `up_proj` and `down_proj` under `vb` (this rank's features).
    pub fn new(vb: &Builder, hidden_size: usize, intermediate_size: usize, bias: Bias, activation: Activation) -> std::result::Result<Self, BuildError> {
        let unit = vb.pp("down_proj").quantized_group_size()?.unwrap_or(1);
        let part = vb.split(intermediate_size, unit);
        Ok(Self {
            gate_proj: vb.pp("gate_proj").linear(hidden_size, intermediate_size, bias, Shard::Column(part.clone()))?,
            up_proj: vb.pp("up_proj").linear(hidden_size, intermediate_size, bias, Shard::Column(part.clone()))?,
            down_proj: vb.pp("down_proj").linear(intermediate_size, hidden_size, bias, Shard::Row(part))?,
            activation,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = (self.gate_proj.forward(x)?, self.up_proj.forward(x)?);
        let h = match self.activation {
            Activation::Silu => ops::silu_mul(&gate, &up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
        };
        self.down_proj.forward(&h)
    }
}
