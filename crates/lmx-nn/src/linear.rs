//! Linear and Embedding: the layers that hold the big matrices. They only compute; how each
//! was built (dense or quantized, adapted, trainable, which shard) was decided by the
//! [`crate::Builder`].

use std::sync::Arc;

use lmx_core::cpu_step::{StepLinear, StepMatrix};
use lmx_core::frozen::Bf16Weight;
use lmx_core::quant::{CodeTarget, QuantizedMatrix};
use lmx_core::{ops, Device, Module, Result, Tensor};
use lmx_dist::Group;

use crate::adapter::Adapter;

/// Whether a linear layer has a bias vector (`f(.., Bias::Yes)` reads better than `true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bias {
    /// The checkpoint holds `<path>.bias`.
    Yes,
    /// No bias.
    No,
}

impl From<bool> for Bias {
    fn from(yes: bool) -> Self {
        if yes {
            Bias::Yes
        } else {
            Bias::No
        }
    }
}

/// The weight of a linear layer: a plain float matrix, or MLX's affine quantized format.
#[derive(Debug, Clone)]
pub(crate) enum Weight {
    Dense(Tensor),
    Quantized(Arc<QuantizedMatrix>),
    /// A bf16 checkpoint weight frozen under LoRA/DoRA training in an f32 model: kept in bf16
    /// and multiplied with the AVX512-BF16 kernel (activations rounded to bf16 at the product,
    /// f32 accumulation), as PyTorch's bf16 training does.
    FrozenBf16(Arc<Bf16Weight>),
    /// An f16 checkpoint weight in an f32 model on the CPU (which has no f16 arithmetic), kept
    /// as stored: half the bytes of f32 to read a token; products widen it as they read it.
    Half(Tensor),
}

impl Weight {
    /// `x @ W^T`.
    pub(crate) fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => ops::linear(&x.to_dtype(w.dtype())?, w, None),
            Weight::Quantized(q) => q.matmul(x),
            Weight::FrozenBf16(b) => b.matmul(x),
            Weight::Half(w) => ops::linear(&x.to_dtype(lmx_core::DType::F32)?, w, None),
        }
    }

    /// `g @ W` for the output's gradient g (rows, out): the input's gradient of `matmul`.
    pub(crate) fn transposed(&self) -> lmx_core::ops::FrozenBackward {
        match self.clone() {
            // f32 on the CPU: on the decode pool (`lmx_core::cpu::matmul`), not candle's rayon.
            Weight::Dense(w) => Arc::new(move |g: &Tensor| lmx_core::cpu::matmul(&g.to_dtype(w.dtype())?, &w)),
            Weight::Quantized(q) => Arc::new(move |g: &Tensor| q.matmul_t(g)),
            Weight::FrozenBf16(b) => Arc::new(move |g: &Tensor| b.matmul_t(g)),
            Weight::Half(w) => Arc::new(move |g: &Tensor| lmx_core::cpu::matmul(&g.to_dtype(lmx_core::DType::F32)?, &w.to_dtype(lmx_core::DType::F32)?)),
        }
    }

    /// The (out, in) matrix as a float tensor (dequantized if it is stored quantized).
    fn to_tensor(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Quantized(q) => q.dequantize(),
            Weight::FrozenBf16(b) => b.to_tensor(),
            Weight::Half(w) => w.to_dtype(lmx_core::DType::F32),
        }
    }

    /// ||W_i||^2 for every output row, in f32 (quantized rows are dequantized 256 at a time).
    pub(crate) fn row_norms_sq(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => w.to_dtype(lmx_core::DType::F32)?.sqr()?.sum(1),
            Weight::FrozenBf16(b) => b.to_tensor()?.sqr()?.sum(1),
            Weight::Half(w) => w.to_dtype(lmx_core::DType::F32)?.sqr()?.sum(1),
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
}

/// `y = x W^T + b` with W stored as (out_features, in_features), as in Hugging Face checkpoints,
/// or packed in MLX's quantized format; optionally with a LoRA/DoRA adapter, and on a
/// tensor-parallel rank holding a slice of W (a row-parallel layer sums its partial products
/// over the group before adding the bias).
#[derive(Debug, Clone)]
pub struct Linear {
    pub(crate) weight: Weight,
    pub(crate) bias: Option<Tensor>,
    pub(crate) adapter: Option<Arc<Adapter>>,
    /// Set on row-parallel layers: the group whose partial outputs are summed.
    pub(crate) reduce: Option<Arc<dyn Group>>,
}

impl Linear {
    /// A dense layer without bias, adapter or reduction over `weight` (out, in): for weights a
    /// layer assembles from other tensors as it loads.
    pub(crate) fn dense(weight: Tensor) -> Self {
        Linear { weight: Weight::Dense(weight), bias: None, adapter: None, reduce: None }
    }

    /// The (out, in) weight this rank holds, dequantized if it is stored quantized.
    pub fn weight(&self) -> Result<Tensor> {
        self.weight.to_tensor()
    }

    /// `y + bias`, or `y` for a layer without one.
    fn with_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The outputs of layers that share their input (a layer's q/k/v or gate/up projections):
    /// quantized layers without adapters take one step together when decoding (the input
    /// rounded to int8 once, one parallel round); otherwise one product each.
    pub fn forward_shared<const N: usize>(layers: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
        Self::forward_many(&layers, x)?.try_into().map_err(|_| lmx_core::Error::Msg("forward_shared: output count".into()))
    }

    /// [`Linear::forward_shared`] for any number of layers (the gate and up projections of a
    /// token's experts).
    pub fn forward_many(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let quantized: Option<Vec<Arc<QuantizedMatrix>>> = layers
            .iter()
            .map(|l| match (&l.weight, &l.adapter, &l.reduce) {
                (Weight::Quantized(q), None, None) => Some(q.clone()),
                _ => None,
            })
            .collect();
        match quantized {
            Some(qs) => lmx_core::quant::matmul_many(&qs, x)?.into_iter().zip(layers).map(|(y, l)| l.with_bias(y)).collect(),
            None => layers.iter().map(|l| l.forward(x)).collect(),
        }
    }
}

impl Linear {
    /// The layer as a decode step on plain buffers reads it (`lmx_core::cpu_step`): a
    /// quantized or dense matrix and its bias, without an adapter or a tensor-parallel sum.
    pub(crate) fn step_linear(&self) -> Option<StepLinear<'_>> {
        let matrix = match (&self.weight, &self.adapter, &self.reduce) {
            (Weight::Quantized(q), None, None) => StepMatrix::Quantized(q),
            (Weight::Dense(w) | Weight::Half(w), None, None) => StepMatrix::Dense(w),
            _ => return None,
        };
        Some(StepLinear { matrix, bias: self.bias.as_ref() })
    }

    /// The (bits, group size) of the int8 codes this layer's one-row products read on a GPU
    /// ([`QuantizedMatrix::code_spec`]); None for other weights, or with an adapter.
    pub fn code_spec(&self) -> Option<(usize, usize)> {
        match (&self.weight, &self.adapter) {
            (Weight::Quantized(q), None) => q.code_spec(),
            _ => None,
        }
    }

    /// The spec every layer of `layers` reads (they share an input), if they agree.
    pub fn shared_code_spec(layers: &[&Linear]) -> Option<(usize, usize)> {
        let spec = layers.first()?.code_spec()?;
        layers.iter().all(|l| l.code_spec() == Some(spec)).then_some(spec)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match (&self.weight, &self.adapter, &self.reduce) {
            (Weight::Dense(w), None, None) => return ops::linear(x, w, self.bias.as_ref()),
            (w, None, _) => w.matmul(x)?,
            (w, Some(a), _) => match a.forward_fused(x, w)? {
                Some(y) => y,
                None => a.forward(x, &w.matmul(x)?, |t| w.matmul(t))?,
            },
        };
        let y = match &self.reduce {
            Some(group) => group.all_sum(&y)?,
            None => y,
        };
        self.with_bias(y)
    }
}

/// Token embeddings: (vocab_size, hidden_size), plain or quantized.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub(crate) weight: Weight,
    /// The weight as the tied output projection uses it, when that differs (frozen bf16).
    pub(crate) head: Option<Weight>,
    pub(crate) hidden_size: usize,
    pub(crate) device: Device,
}

impl Embedding {
    /// The output projection that shares this matrix (tied `lm_head`), quantized or not.
    pub fn as_linear(&self) -> Linear {
        Linear { weight: self.head.clone().unwrap_or_else(|| self.weight.clone()), bias: None, adapter: None, reduce: None }
    }

    /// The device the embedding matrix lives on (inputs go there).
    pub fn device(&self) -> &Device {
        &self.device
    }
}

impl Module for Embedding {
    /// (b, l) token ids -> (b, l, hidden_size).
    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let flat = match &self.weight {
            Weight::Dense(w) => w.index_select(&input_ids.flatten_all()?, 0)?,
            Weight::Quantized(q) => q.rows_of(&input_ids.flatten_all()?)?.to_device(&self.device)?,
            Weight::FrozenBf16(b) => b.to_tensor()?.index_select(&input_ids.flatten_all()?, 0)?,
            Weight::Half(w) => w.index_select(&input_ids.flatten_all()?, 0)?.to_dtype(lmx_core::DType::F32)?,
        };
        flat.reshape((b, l, self.hidden_size))
    }
}

/// Root-mean-square norm with a learned scale (for Gemma-style `1 + w` checkpoints the
/// builder stores `1 + w`).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub(crate) weight: Tensor,
    pub(crate) eps: f64,
    /// Where a fused residual add + norm also writes its output coded for the quantized
    /// products that read it next (GPU decode; see [`lmx_core::quant::CodeTarget`]).
    pub(crate) codes: Option<CodeTarget>,
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight, self.eps as f32)
    }
}

impl RmsNorm {
    /// The weight and epsilon, as `ops::rms_norm` takes them.
    pub(crate) fn parts(&self) -> (&Tensor, f32) {
        (&self.weight, self.eps as f32)
    }

    /// `x + h` and the norm of it, in one op ([`ops::add_rms_norm`]): (sum, normalised sum).
    pub fn forward_add(&self, x: &Tensor, h: &Tensor) -> Result<(Tensor, Tensor)> {
        ops::add_rms_norm_coded(x, h, &self.weight, self.eps as f32, self.codes.as_ref())
    }

    /// The norm's output feeds quantized products reading codes of `spec` (bits, group size):
    /// a decode step's fused add + norm writes them too. None: plain output.
    pub fn code_for(&mut self, spec: Option<(usize, usize)>) {
        self.codes = spec.map(CodeTarget::new);
    }

    /// The norm of `x + pending` (of `x` with nothing pending): (the sum, its norm).
    pub fn forward_pending(&self, x: &Tensor, pending: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        match pending {
            Some(h) => self.forward_add(x, h),
            None => Ok((x.clone(), self.forward(x)?)),
        }
    }
}
