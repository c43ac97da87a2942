//! Linear, Mlp, Embedding and RmsNorm.

use std::sync::Arc;

use lmx_core::frozen::Bf16Weight;
use lmx_core::quant::QuantizedMatrix;
use lmx_core::{ops, Module, Result, Tensor};
use lmx_io::{QuantSpec, WeightsPath};

use crate::adapter::Adapter;

/// Whether a linear layer has a bias vector (`f(.., Bias::Yes)` reads better than `true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bias {
    /// The checkpoint holds `<path>.bias`.
    Yes,
    /// No bias.
    No,
}

/// The weight of a linear layer: a plain float matrix, or MLX's affine quantized format.
#[derive(Debug, Clone)]
enum Weight {
    Dense(Tensor),
    Quantized(Arc<QuantizedMatrix>),
    /// A bf16 checkpoint weight frozen under LoRA/DoRA training in an f32 model: kept in bf16
    /// and multiplied with the AVX512-BF16 kernel (activations rounded to bf16 at the product,
    /// f32 accumulation), as PyTorch's bf16 training does.
    FrozenBf16(Arc<Bf16Weight>),
}

impl Weight {
    /// A dense weight read for training: frozen bf16 weights go to the bf16 kernel when the CPU
    /// has one.
    fn dense(vb: &WeightsPath, w: Tensor) -> Result<Self> {
        let frozen_bf16 = vb.frozen_base() && vb.dtype() == lmx_core::DType::F32 && vb.stored_dtype("weight") == Some(lmx_core::DType::BF16);
        if frozen_bf16 {
            if let Some(b) = Bf16Weight::new(&w)? {
                return Ok(Weight::FrozenBf16(Arc::new(b)));
            }
        }
        Ok(Weight::Dense(w))
    }
}

/// `y = x W^T + b` with W stored as (out_features, in_features), as in Hugging Face checkpoints,
/// or packed in MLX's quantized format (`weight` u32, `scales`, `biases`) when the checkpoint
/// and config.json say so. Model files never see the difference.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    /// A LoRA/DoRA adapter, when the weights' adapter setup targets this layer.
    adapter: Option<Arc<Adapter>>,
}

/// Reads a quantized matrix (rows x cols) under `vb`, naming the layer in any error.
fn read_quantized(vb: &WeightsPath, spec: QuantSpec, rows: usize, cols: usize) -> lmx_io::Result<QuantizedMatrix> {
    let layer_err = |msg: String| lmx_io::IoError::Json { path: "config.json".into(), msg: format!("layer `{}`: {msg}", vb.key("weight").trim_end_matches(".weight")) };
    if cols % spec.group_size != 0 || (cols * spec.bits) % 32 != 0 {
        return Err(layer_err(format!("{cols} input features are not divisible by the group size {}", spec.group_size)));
    }
    let packed = vb.get((rows, cols * spec.bits / 32), "weight")?;
    let groups = (rows, cols / spec.group_size);
    let scales = vb.get(groups, "scales")?;
    let biases = vb.get(groups, "biases")?;
    QuantizedMatrix::from_tensors(&packed, &scales, &biases, spec.bits, spec.group_size).map_err(|e| layer_err(e.to_string()))
}

impl Linear {
    /// Reads `weight` (and `bias`) under `vb`; quantized when the checkpoint holds `scales`
    /// for this module and config.json has a quantization block.
    pub fn new(vb: &WeightsPath, in_features: usize, out_features: usize, bias: Bias) -> lmx_io::Result<Self> {
        let weight = match vb.quantization()? {
            Some(spec) => Weight::Quantized(Arc::new(read_quantized(vb, spec, out_features, in_features)?)),
            None => Weight::dense(vb, vb.get((out_features, in_features), "weight")?)?,
        };
        let bias = match bias {
            Bias::Yes => Some(vb.get(out_features, "bias")?),
            Bias::No => None,
        };
        let mut layer = Self { weight, bias, adapter: None };
        if let Some(setup) = vb.adapter() {
            layer.adapter = Some(Arc::new(Adapter::new(vb, setup, in_features, out_features, || layer.row_norms_sq())?));
        }
        Ok(layer)
    }

    /// A dense linear layer from existing tensors (tests, fused weights).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight: Weight::Dense(weight), bias, adapter: None }
    }

    /// ||W_i||^2 for every output row, in f32 (quantized rows are dequantized one block at a time).
    fn row_norms_sq(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => w.to_dtype(lmx_core::DType::F32)?.sqr()?.sum(1),
            Weight::FrozenBf16(b) => b.to_tensor()?.sqr()?.sum(1),
            Weight::Quantized(q) => {
                let mut parts = Vec::new();
                for start in (0..q.rows).step_by(256) {
                    let ids: Vec<u32> = (start as u32..(start + 256).min(q.rows) as u32).collect();
                    parts.push(q.dequantize_rows(&ids)?.to_dtype(lmx_core::DType::F32)?.sqr()?.sum(1)?);
                }
                Tensor::cat(&parts, 0)
            }
        }
    }

    /// `x @ W^T` without bias or adapter.
    fn base(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => ops::linear(&x.to_dtype(w.dtype())?, w, None),
            Weight::Quantized(q) => q.matmul(x),
            Weight::FrozenBf16(b) => b.matmul(x),
        }
    }

    /// The (out, in) weight, dequantized if it is stored quantized.
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Quantized(q) => q.dequantize(),
            Weight::FrozenBf16(b) => b.to_tensor(),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match (&self.weight, &self.adapter) {
            (Weight::Dense(w), None) => return ops::linear(x, w, self.bias.as_ref()),
            (_, None) => self.base(x)?,
            (_, Some(a)) => a.forward(x, &self.base(x)?, |t| self.base(t))?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
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

/// Token embeddings: (vocab_size, hidden_size), plain or quantized.
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Weight,
    /// The weight as the tied output projection uses it, when that differs (frozen bf16).
    head: Option<Weight>,
    hidden_size: usize,
}

impl Embedding {
    /// Reads `weight` under `vb` (with `scales`/`biases` when quantized).
    pub fn new(vb: &WeightsPath, vocab_size: usize, hidden_size: usize) -> lmx_io::Result<Self> {
        let (weight, head) = match vb.quantization()? {
            Some(spec) => (Weight::Quantized(Arc::new(read_quantized(vb, spec, vocab_size, hidden_size)?)), None),
            None => {
                let w = vb.get((vocab_size, hidden_size), "weight")?;
                // Rows are looked up in f32; a tied output projection may use the bf16 kernel.
                let head = match Weight::dense(vb, w.clone())? {
                    Weight::Dense(_) => None,
                    other => Some(other),
                };
                (Weight::Dense(w), head)
            }
        };
        Ok(Self { weight, head, hidden_size })
    }

    /// The output projection that shares this matrix (tied `lm_head`), quantized or not.
    pub fn as_linear(&self) -> Linear {
        Linear { weight: self.head.clone().unwrap_or_else(|| self.weight.clone()), bias: None, adapter: None }
    }

    /// The device of the embedding matrix.
    pub fn device(&self) -> &lmx_core::Device {
        match &self.weight {
            Weight::Dense(w) => w.device(),
            Weight::Quantized(_) | Weight::FrozenBf16(_) => &lmx_core::Device::Cpu,
        }
    }
}

impl Module for Embedding {
    /// (b, l) token ids -> (b, l, hidden_size).
    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let flat = match &self.weight {
            Weight::Dense(w) => w.index_select(&input_ids.flatten_all()?, 0)?,
            Weight::Quantized(q) => q.dequantize_rows(&input_ids.flatten_all()?.to_vec1::<u32>()?)?,
            Weight::FrozenBf16(b) => b.to_tensor()?.index_select(&input_ids.flatten_all()?, 0)?,
        };
        flat.reshape((b, l, self.hidden_size))
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
