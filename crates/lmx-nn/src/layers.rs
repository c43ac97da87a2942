//! Linear, Mlp, Embedding and RmsNorm.

use lmx_core::{ops, Module, Result, Tensor};
use lmx_io::WeightsPath;

/// Whether a linear layer has a bias vector (`f(.., Bias::Yes)` reads better than `true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bias {
    /// The checkpoint holds `<path>.bias`.
    Yes,
    /// No bias.
    No,
}

/// `y = x W^T + b` with W stored as (out_features, in_features), as in Hugging Face checkpoints.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Reads `weight` (and `bias`) under `vb`.
    pub fn new(vb: &WeightsPath, in_features: usize, out_features: usize, bias: Bias) -> lmx_io::Result<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = match bias {
            Bias::Yes => Some(vb.get(out_features, "bias")?),
            Bias::No => None,
        };
        Ok(Self { weight, bias })
    }

    /// A linear layer from existing tensors (tied embeddings, tests).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The (out, in) weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
    }
}

/// The gated SiLU feed-forward block (SwiGLU) of the Llama family:
/// `down_proj(silu(gate_proj(x)) * up_proj(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// Reads `gate_proj`, `up_proj` and `down_proj` under `vb`.
    pub fn new(vb: &WeightsPath, hidden_size: usize, intermediate_size: usize, bias: Bias) -> lmx_io::Result<Self> {
        Ok(Self {
            gate_proj: Linear::new(&vb.pp("gate_proj"), hidden_size, intermediate_size, bias)?,
            up_proj: Linear::new(&vb.pp("up_proj"), hidden_size, intermediate_size, bias)?,
            down_proj: Linear::new(&vb.pp("down_proj"), intermediate_size, hidden_size, bias)?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = ops::silu_mul(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }
}

/// Token embeddings: (vocab_size, hidden_size).
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// Reads `weight` under `vb`.
    pub fn new(vb: &WeightsPath, vocab_size: usize, hidden_size: usize) -> lmx_io::Result<Self> {
        Ok(Self { weight: vb.get((vocab_size, hidden_size), "weight")? })
    }

    /// The embedding matrix (shared with `lm_head` when embeddings are tied).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Embedding {
    /// (b, l) token ids -> (b, l, hidden_size).
    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let flat = self.weight.index_select(&input_ids.flatten_all()?, 0)?;
        flat.reshape((b, l, ()))
    }
}

/// Root-mean-square norm with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Reads `weight` (size `dim`) under `vb`.
    pub fn new(vb: &WeightsPath, dim: usize, eps: f64) -> lmx_io::Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight, self.eps as f32)
    }
}
