//! The layer builder: the one place that decides how every weight of a model is built.
//!
//! A model file asks for layers by checkpoint key (`vb.pp("q_proj").linear(..)`). For each the
//! builder decides: dense or quantized (MLX's rule: a `quantization` block in config.json and
//! `<path>.scales` in the checkpoint, with per-layer overrides), the device and compute dtype,
//! which adapter (LoRA/DoRA on targeted linear layers, or the weight itself trains for full
//! fine-tuning), trainable or frozen (variables go to the trainer's [`Training`]), and which
//! shard of the weight this rank holds (only that slice is read from the checkpoint). Layers
//! and model files never see any of these decisions.

use std::ops::Range;
use std::sync::Arc;

use lmx_core::frozen::Bf16Weight;
use lmx_core::quant::QuantizedMatrix;
use lmx_core::{DType, Device, Tensor};
use lmx_dist::{Group, Single};
use lmx_io::{FineTuneType, QuantConfig, QuantSpec, Weights};

use crate::adapter::{Adapter, AdapterPlan, AdapterSource};
use crate::error::{BuildError, Result};
use crate::linear::{Bias, Embedding, Linear, RmsNorm, Weight};
use crate::training::Training;

/// Which part of a linear layer's weight this rank holds (tensor parallelism).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shard {
    /// Every rank holds the whole weight (and computes the whole output).
    Replicated,
    /// Column-parallel: this rank holds output features `range` (rows of W and of the bias)
    /// and computes those features of the output.
    Column(Range<usize>),
    /// Row-parallel: this rank holds input features `range` (columns of W) of an input that
    /// is itself split; the partial products are summed over the group, then the bias added.
    Row(Range<usize>),
}

#[derive(Clone)]
struct Shared {
    weights: Weights,
    quantization: Option<QuantConfig>,
    dtype: DType,
    device: Device,
    adapters: Option<Arc<AdapterPlan>>,
    training: Option<Arc<Training>>,
    group: Arc<dyn Group>,
    /// The pipeline this process is one stage of, and each stage's weight: it holds a
    /// contiguous range of layers, sized in proportion to its weight.
    pipeline: Option<(Arc<dyn Group>, Vec<f64>)>,
    /// Mixture-of-experts blocks split their experts over the group (each rank holds whole
    /// experts) instead of each expert's features.
    expert_parallel: bool,
}

/// Builds layers from a checkpoint (see the module docs). Cheap to clone; `pp` descends one
/// key segment.
#[derive(Clone)]
pub struct Builder {
    shared: Arc<Shared>,
    prefix: String,
    /// Set under [`Builder::expert`]: (expert, experts) — tensors carry a leading expert
    /// dimension (MLX's `SwitchLinear`) and this builder reads that expert's slice.
    expert: Option<(usize, usize)>,
    /// Set under [`Builder::unreduced`]: row-parallel layers leave their partial sums to the
    /// caller instead of summing them over the group.
    unreduced: bool,
    /// Set under [`Builder::adapters_as_stacked`]: adapters are named as this expert's slice
    /// of stacked experts (MLX's names), whatever the checkpoint calls the module.
    adapter_as: Option<Arc<AdapterAlias>>,
}

/// Where a module's adapter lives in MLX's stacked-expert naming.
#[derive(Debug)]
struct AdapterAlias {
    /// The stacked module path at this builder's level (`model.layers.0.mlp.switch_mlp`, then
    /// `...switch_mlp.gate_proj` one level down).
    prefix: String,
    /// (expert, experts).
    expert: (usize, usize),
    /// This checkpoint's projection names and MLX's (`w1` -> `gate_proj`).
    names: [(String, &'static str); 3],
}

impl Builder {
    /// Layers computing in `dtype` on `device` from `weights`, unquantized, unadapted, on a
    /// single rank.
    pub fn new(weights: Weights, dtype: DType, device: &Device) -> Self {
        let shared = Shared { weights, quantization: None, dtype, device: device.clone(), adapters: None, training: None, group: Arc::new(Single), pipeline: None, expert_parallel: false };
        Self { shared: Arc::new(shared), prefix: String::new(), expert: None, unreduced: false, adapter_as: None }
    }

    fn edit(mut self, f: impl FnOnce(&mut Shared)) -> Self {
        if let Some(s) = Arc::get_mut(&mut self.shared) {
            f(s);
        }
        self
    }

    /// config.json's quantization block: layers read packed weights where the checkpoint has them.
    pub fn with_quantization(self, q: Option<QuantConfig>) -> Self {
        self.edit(|s| s.quantization = q)
    }

    /// Adapters to attach (LoRA/DoRA) or weights to train (full).
    pub fn with_adapters(self, plan: Arc<AdapterPlan>) -> Self {
        self.edit(|s| s.adapters = Some(plan))
    }

    /// Trainable tensors become variables registered in `training`.
    pub fn with_training(self, training: Arc<Training>) -> Self {
        self.edit(|s| s.training = Some(training))
    }

    /// This process is one rank of `group`: layers load and compute their shard.
    pub fn with_group(self, group: Arc<dyn Group>) -> Self {
        self.edit(|s| s.group = group)
    }

    /// Mixture-of-experts blocks split whole experts over the ranks of the group (expert
    /// parallelism) rather than each expert's features (tensor parallelism).
    pub fn with_expert_parallel(self) -> Self {
        self.edit(|s| s.expert_parallel = true)
    }

    /// Whether [`Builder::with_expert_parallel`] was asked for.
    pub fn expert_parallel(&self) -> bool {
        self.shared.expert_parallel
    }

    /// This builder on a single rank: the layers it builds hold their whole weights and sum
    /// over no group (an expert that one rank of an expert-parallel group owns).
    pub fn local(&self) -> Builder {
        let shared = Shared { group: Arc::new(Single), ..(*self.shared).clone() };
        Builder { shared: Arc::new(shared), ..self.clone() }
    }

    /// This builder with row-parallel layers that do not sum their partial outputs over the
    /// group: the caller sums once for several of them (a mixture of experts sums its experts'
    /// outputs in one all-sum, the same number of collectives whatever the routing).
    pub fn unreduced(&self) -> Builder {
        Builder { unreduced: true, ..self.clone() }
    }

    /// The builder one key segment down: `vb.pp("self_attn")`.
    pub fn pp(&self, segment: impl std::fmt::Display) -> Builder {
        let segment = segment.to_string();
        let prefix = if self.prefix.is_empty() { segment.clone() } else { format!("{}.{segment}", self.prefix) };
        let adapter_as = self.adapter_as.as_ref().map(|a| {
            let mlx = a.names.iter().find(|(own, _)| *own == segment).map_or(segment.as_str(), |(_, mlx)| mlx);
            Arc::new(AdapterAlias { prefix: format!("{}.{mlx}", a.prefix), expert: a.expert, names: a.names.clone() })
        });
        Builder { shared: self.shared.clone(), prefix, adapter_as, ..self.clone() }
    }

    /// This builder (one expert of a checkpoint that stores each expert apart, Hugging Face's
    /// `experts.{e}`) with its layers' adapters named as expert `e` of `experts` stacked under
    /// `stacked` (MLX's `switch_mlp`, whose sanitize stacks such experts), its projections
    /// renamed by `names` (this checkpoint's name, MLX's): adapters trained here load in MLX LM
    /// and MLX LM's load here.
    pub fn adapters_as_stacked(&self, stacked: &str, e: usize, experts: usize, names: [(&str, &'static str); 3]) -> Builder {
        let names = names.map(|(own, mlx)| (own.to_string(), mlx));
        Builder { adapter_as: Some(Arc::new(AdapterAlias { prefix: stacked.to_string(), expert: (e, experts), names })), ..self.clone() }
    }

    /// Expert `e` of `experts` stored together (MLX's `SwitchLinear`: `weight` (experts, out,
    /// in), quantized `scales`/`biases` likewise): under the returned builder every tensor is
    /// read as that expert's slice, so the layers built are that expert's alone.
    pub fn expert(&self, e: usize, experts: usize) -> Builder {
        Builder { expert: Some((e, experts)), ..self.clone() }
    }

    /// This builder reading `tensors` (full keys) instead of the checkpoint, its other
    /// settings kept (device, dtype, group, expert parallelism): for tensors a model
    /// rearranges as it loads (gpt-oss's fused experts into MLX's stacked layout). They are
    /// dense unless [`Builder::with_quantization`] says otherwise, and take LoRA adapters
    /// under the rearranged names (MLX LM's, whose sanitize rearranges them the same way), but
    /// no full fine-tuning (the checkpoint does not hold them under those names).
    pub fn with_tensors(&self, tensors: std::collections::HashMap<String, Tensor>) -> Builder {
        let mut weights = Weights::from_tensors(tensors, &format!("{} (rearranged)", self.prefix));
        if self.shared.weights.is_shapes_only() {
            weights = weights.shapes_only();
        }
        let adapters = self.shared.adapters.clone().filter(|a| a.kind != FineTuneType::Full);
        let shared = Shared { weights, quantization: None, adapters, ..(*self.shared).clone() };
        Builder { shared: Arc::new(shared), ..self.clone() }
    }

    /// Whether the checkpoint is a shape check's ([`Weights::shapes_only`]): tensors read are
    /// placeholders.
    pub fn is_shapes_only(&self) -> bool {
        self.shared.weights.is_shapes_only()
    }

    /// Whether the checkpoint holds tensor `name` under this prefix.
    pub fn has(&self, name: &str) -> bool {
        self.shared.weights.contains(&self.key(name))
    }

    /// The full checkpoint key of `name` under this prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The prefix (`model.layers.3.self_attn.q_proj`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.shared.dtype
    }

    /// The device layers are placed on.
    pub fn device(&self) -> &Device {
        &self.shared.device
    }

    /// This process is one stage of the pipeline `group`: the decoder builds only its range
    /// of layers ([`Builder::pipeline_layers`]) and passes activations on to the next stage.
    /// The stages get equal numbers of layers.
    pub fn with_pipeline(self, group: Arc<dyn Group>) -> Self {
        let weights = vec![1.0; group.size()];
        self.with_weighted_pipeline(group, weights)
    }

    /// [`Builder::with_pipeline`] with layers in proportion to `weights` (one per rank, e.g.
    /// each host's memory).
    pub fn with_weighted_pipeline(self, group: Arc<dyn Group>, weights: Vec<f64>) -> Self {
        self.edit(|s| s.pipeline = Some((group, weights)))
    }

    /// The pipeline this process is a stage of, if any.
    pub fn pipeline(&self) -> Option<&Arc<dyn Group>> {
        self.shared.pipeline.as_ref().map(|(g, _)| g)
    }

    /// The layers of `num_layers` this process builds: all, or its stage's contiguous share.
    pub fn pipeline_layers(&self, num_layers: usize) -> Range<usize> {
        match &self.shared.pipeline {
            Some((g, w)) if w.len() == g.size() => lmx_dist::proportional_ranges(num_layers, w).swap_remove(g.rank()),
            Some((g, _)) => lmx_dist::split_range(num_layers, 1, g.rank(), g.size()),
            None => 0..num_layers,
        }
    }

    /// Leaves every tensor under this prefix unread on purpose (another stage's layer).
    pub fn skip(&self) {
        self.shared.weights.skip_prefix(&self.prefix);
    }

    /// The tensor-parallel group (a single rank unless [`Builder::with_group`]).
    pub fn group(&self) -> &Arc<dyn Group> {
        &self.shared.group
    }

    /// The training state, when the model is built for training.
    pub fn training(&self) -> Option<&Arc<Training>> {
        self.shared.training.as_ref()
    }

    /// The part `[start, end)` of `total` features this rank holds when they are split in
    /// units of `unit` as evenly as possible.
    pub fn split(&self, total: usize, unit: usize) -> Range<usize> {
        let g = &self.shared.group;
        lmx_dist::split_range(total, unit, g.rank(), g.size())
    }

    /// Checks that every checkpoint tensor and every saved adapter tensor was used (keys for
    /// which `ignored` is true excepted). A sharded rank reads only its slices, so the check
    /// counts a key as used when any part of it was read.
    pub fn finish(&self, ignored: impl Fn(&str) -> bool) -> Result<()> {
        if let Some(a) = &self.shared.adapters {
            a.finish()?;
        }
        Ok(self.shared.weights.finish(ignored)?)
    }

    /// Places a checkpoint tensor: compute dtype (floats only) and device.
    fn place(&self, t: Tensor) -> Result<Tensor> {
        if self.shared.weights.is_shapes_only() {
            // A shape check: keep the placeholder (converting it would allocate it whole).
            return Ok(t);
        }
        let t = if t.dtype().is_float() { t.to_dtype(self.shared.dtype)? } else { t };
        Ok(t.to_device(&self.shared.device)?)
    }

    /// Reads `name` (whole, or one slice along `dim`) without placing it.
    fn read(&self, shape: &[usize], name: &str, part: Option<(usize, Range<usize>)>) -> Result<Tensor> {
        let key = self.key(name);
        if let Some((e, experts)) = self.expert {
            let whole: Vec<usize> = std::iter::once(experts).chain(shape.iter().copied()).collect();
            let t = self.shared.weights.get_slice(&key, &whole, 0, e..e + 1)?.squeeze(0)?;
            return Ok(match part {
                Some((dim, range)) if range.len() != shape[dim] => t.narrow(dim, range.start, range.len())?.contiguous()?,
                _ => t,
            });
        }
        Ok(match part {
            Some((dim, range)) if range.len() != shape[dim] => self.shared.weights.get_slice(&key, shape, dim, range)?,
            _ => self.shared.weights.get(&key, shape)?,
        })
    }

    /// A replicated tensor `name` of exactly `shape` in the compute dtype; for full
    /// fine-tuning of its layer, the saved value (if any) made a variable.
    pub fn get(&self, shape: impl Into<lmx_core::Shape>, name: &str) -> Result<Tensor> {
        let shape: lmx_core::Shape = shape.into();
        self.get_part(shape.dims(), name, None)
    }

    /// Only `range` along `dim` of tensor `name` (whole shape `shape`): a per-head tensor of
    /// a sharded layer (e.g. attention sinks). The whole tensor when the range covers it.
    pub fn get_split(&self, shape: &[usize], name: &str, dim: usize, range: Range<usize>) -> Result<Tensor> {
        self.get_part(shape, name, Some((dim, range)))
    }

    fn get_part(&self, shape: &[usize], name: &str, part: Option<(usize, Range<usize>)>) -> Result<Tensor> {
        let key = self.key(name);
        let t = self.place(self.read(shape, name, part.clone())?)?;
        match (&self.shared.adapters, &self.shared.training) {
            (Some(plan), training) if plan.full_trains(&key) => {
                if part.is_some_and(|(d, r)| r.len() != shape[d]) {
                    return Err(BuildError::unsupported("full fine-tuning of a tensor-parallel model"));
                }
                // An expert's slice of stacked experts trains as its own variable, stacked
                // again when saved.
                let t = match plan.saved_part(&key, shape, self.expert)? {
                    Some(saved) => self.place(saved)?,
                    None => t,
                };
                Ok(match training {
                    Some(tr) => tr.register(&crate::training::part_key(&key, self.expert), t)?,
                    None => t,
                })
            }
            _ => Ok(t),
        }
    }

    /// How the module at this prefix is quantized (its spec, and whether it is MXFP4 rather
    /// than MLX's affine format), or None for a float module.
    fn quantization(&self) -> Result<Option<(QuantSpec, bool)>> {
        let Some(q) = &self.shared.quantization else { return Ok(None) };
        let has_scales = self.shared.weights.contains(&self.key("scales"));
        match q.for_module(&self.prefix, has_scales) {
            None => Ok(None),
            Some(_) if self.shared.adapters.as_ref().is_some_and(|a| a.full_trains(&self.key("weight"))) => Err(BuildError::unsupported_with(
                format!("full fine-tuning of the quantized layer `{}`", self.prefix),
                "use lora or dora on a quantized model, or dequantize it first (`lmx convert -d`)",
            )),
            Some((spec, "affine")) => Ok(Some((spec, false))),
            Some((spec, "mxfp4")) if spec.bits == 4 && spec.group_size == 32 => Ok(Some((spec, true))),
            Some((spec, "mxfp4")) => {
                Err(BuildError::Quantization { layer: self.prefix.clone(), msg: format!("mode `mxfp4` takes bits 4 and group_size 32, not bits {} and group_size {}", spec.bits, spec.group_size) })
            }
            Some((_, mode)) => Err(BuildError::Quantization { layer: self.prefix.clone(), msg: format!("quantization mode `{mode}` is not supported; lmx supports `affine` and `mxfp4`") }),
        }
    }

    /// The quantization group size of the module at this prefix, when it is quantized:
    /// row-parallel splits of its input must fall on group boundaries.
    pub fn quantized_group_size(&self) -> Result<Option<usize>> {
        Ok(self.quantization()?.map(|(s, _)| s.group_size))
    }

    /// Reads a quantized matrix (rows x cols), or this rank's part of it: MLX's affine format,
    /// or with `mxfp4` MXFP4 words and E8M0 scales (held as 8-bit affine,
    /// [`QuantizedMatrix::from_mxfp4`]).
    fn read_quantized(&self, (spec, mxfp4): (QuantSpec, bool), rows: usize, cols: usize, shard: &Shard) -> Result<QuantizedMatrix> {
        let err = |msg: String| BuildError::Quantization { layer: self.prefix.clone(), msg };
        if cols % spec.group_size != 0 || (cols * spec.bits) % 32 != 0 {
            return Err(err(format!("{cols} input features are not divisible by the group size {}", spec.group_size)));
        }
        let (words, groups) = (cols * spec.bits / 32, cols / spec.group_size);
        let (packed_part, group_part) = match shard {
            Shard::Replicated => (None, None),
            Shard::Column(r) => (Some((0, r.clone())), Some((0, r.clone()))),
            Shard::Row(r) => {
                let g = spec.group_size;
                if r.start % g != 0 || (r.end % g != 0 && r.end != cols) {
                    let ranks = self.shared.group.size();
                    return Err(BuildError::Shard { layer: self.prefix.clone(), ranks, msg: format!("input features {r:?} do not fall on quantization group boundaries (group size {g})") });
                }
                (Some((1, r.start * spec.bits / 32..r.end * spec.bits / 32)), Some((1, r.start / g..r.end.div_ceil(g))))
            }
        };
        // A shape check: shapes are checked by the reads; a tiny stand-in matrix.
        let stand_in = || -> Result<QuantizedMatrix> {
            let zeros = Tensor::zeros((1, spec.group_size), DType::F32, &Device::Cpu)?;
            QuantizedMatrix::quantize(&zeros, spec.bits, spec.group_size).map_err(|e| err(e.to_string()))
        };
        let shapes_only = self.shared.weights.is_shapes_only();
        let packed = self.read(&[rows, words], "weight", packed_part)?;
        let scales = self.read(&[rows, groups], "scales", group_part.clone())?;
        let training = self.shared.training.is_some();
        if mxfp4 {
            if shapes_only {
                return stand_in();
            }
            let q = QuantizedMatrix::from_mxfp4(&packed, &scales, self.shared.dtype).map_err(|e| err(e.to_string()))?;
            return Ok(q.with_exact_products(training));
        }
        let bf16_checkpoint = scales.dtype() == DType::BF16;
        let biases = self.read(&[rows, groups], "biases", group_part)?;
        if shapes_only {
            return stand_in();
        }
        // 16-bit scales of an f32 model on the CPU stay as stored (a GGUF's f16 ones): the
        // kernels widen them, and a token reads a sixth fewer bytes than with f32 scales.
        let keep = self.shared.device.is_cpu() && self.shared.dtype == DType::F32 && matches!(scales.dtype(), DType::F16 | DType::BF16) && biases.dtype() == scales.dtype();
        let (scales, biases) = if keep { (scales, biases) } else { (self.place(scales)?, self.place(biases)?) };
        let q = QuantizedMatrix::from_tensors(&packed, &scales, &biases, spec.bits, spec.group_size).map_err(|e| err(e.to_string()))?;
        // 2-, 3-, 5- and 6-bit codes are held 4 or 8 bits wide where the integer kernels do
        // not read them as stored (~20x faster than the float ones on the CPU): 2 and 3 bits,
        // 5 and 6 on CPUs without AVX-512 VBMI, in training (whose exact products dequantize 4- and 8-bit
        // groups fastest), and on a GPU unless `LMX_CUDA_WIDEN=0` (its float kernels read
        // every width).
        let q = if self.shared.device.is_cpu() && !training {
            q.for_integer_kernels()
        } else if self.shared.device.is_cpu() || std::env::var("LMX_CUDA_WIDEN").map_or(true, |v| v != "0") {
            q.widened()
        } else {
            q
        };
        Ok(q.with_model_dtype(self.shared.dtype).with_exact_products(training).with_bf16_training(training && bf16_checkpoint))
    }

    /// Whether the matrix `name` here stays f16 as stored ([`Weight::Half`]): an f16
    /// checkpoint's, in an f32 model on the CPU, for inference (training reads every weight
    /// in the compute dtype).
    fn keeps_half(&self, name: &str) -> bool {
        let key = self.key(name);
        let s = &self.shared;
        s.device.is_cpu()
            && s.dtype == DType::F32
            && s.training.is_none()
            && !s.weights.is_shapes_only()
            && s.weights.stored_dtype(&key) == Some(DType::F16)
            && !s.adapters.as_ref().is_some_and(|a| a.full_trains(&key))
    }

    /// A dense weight read as `w`: frozen bf16 weights of an f32 training model go to the bf16
    /// kernel when the CPU has one.
    fn dense(&self, w: Tensor) -> Result<Weight> {
        let frozen_base = self.shared.training.is_some() && self.shared.adapters.as_ref().is_some_and(|a| a.kind != FineTuneType::Full);
        let stored = self.shared.weights.stored_dtype(&self.key("weight"));
        if frozen_base && self.shared.dtype == DType::F32 && stored == Some(DType::BF16) && self.shared.device.is_cpu() {
            if let Some(b) = Bf16Weight::new(&w)? {
                return Ok(Weight::FrozenBf16(Arc::new(b)));
            }
        }
        Ok(Weight::Dense(w))
    }

    /// The linear layer at this prefix, `in_features` -> `out_features`, holding the part of
    /// the weight `shard` names.
    pub fn linear(&self, in_features: usize, out_features: usize, bias: Bias, shard: Shard) -> Result<Linear> {
        let shape = [out_features, in_features];
        // In a world of one a split covers everything: no split. (With more ranks a rank may
        // hold a whole row-parallel input while others hold nothing; it must still take part
        // in the all-sum.)
        let shard = match shard {
            _ if self.shared.group.size() > 1 => shard,
            Shard::Column(r) if r == (0..out_features) => Shard::Replicated,
            Shard::Row(r) if r == (0..in_features) => Shard::Replicated,
            s => s,
        };
        let (weight_part, bias_part, reduce) = match &shard {
            Shard::Replicated => (None, None, None),
            Shard::Column(r) => (Some((0, r.clone())), Some((0, r.clone())), None),
            Shard::Row(r) => (Some((1, r.clone())), None, (!self.unreduced).then(|| self.shared.group.clone())),
        };
        let weight = match self.quantization()? {
            Some(spec) => Weight::Quantized(Arc::new(self.read_quantized(spec, out_features, in_features, &shard)?)),
            None if self.keeps_half("weight") => Weight::Half(self.read(&shape, "weight", weight_part)?.contiguous()?),
            None => self.dense(self.get_part(&shape, "weight", weight_part)?)?,
        };
        let bias = match bias {
            Bias::Yes => Some(self.get_part(&[out_features], "bias", bias_part)?),
            Bias::No => None,
        };
        // A row-parallel layer that leaves its sum to the caller: its bias is added on rank 0
        // alone, or the sum would count it once per rank.
        let unsummed = matches!(shard, Shard::Row(_)) && self.unreduced && self.shared.group.rank() != 0;
        let bias = bias.filter(|_| !unsummed);
        let mut layer = Linear { weight, bias, adapter: None, reduce };
        // The adapter's name: this module's, or its place among stacked experts.
        let (adapter_prefix, adapter_expert) = match &self.adapter_as {
            Some(a) => (a.prefix.as_str(), Some(a.expert)),
            None => (self.prefix.as_str(), self.expert),
        };
        if let Some(plan) = self.shared.adapters.as_ref().filter(|a| a.targets(adapter_prefix)) {
            if shard != Shard::Replicated {
                // In a world of one, a part of a weight is a slice of a fused projection.
                let what = if self.shared.group.size() > 1 {
                    "LoRA/DoRA adapters on a tensor-parallel model".to_string()
                } else {
                    format!("LoRA/DoRA adapters on the fused projection `{}` (Phi-3's qkv_proj / gate_up_proj)", self.prefix)
                };
                return Err(BuildError::unsupported_with(what, "leave it out of the adapter's keys (lora_parameters.keys), e.g. [\"self_attn.o_proj\", \"mlp.down_proj\"]"));
            }
            let dtype = if self.shared.training.is_some() { DType::F32 } else { self.shared.dtype };
            let src = AdapterSource { plan, training: self.shared.training.as_ref(), prefix: adapter_prefix, dtype, device: &self.shared.device, expert: adapter_expert };
            layer.adapter = Some(Arc::new(Adapter::new(&src, in_features, out_features, || layer.weight.row_norms_sq())?));
        }
        Ok(layer)
    }

    /// The token embedding at this prefix: (vocab_size, hidden_size), replicated.
    pub fn embedding(&self, vocab_size: usize, hidden_size: usize) -> Result<Embedding> {
        let shape = [vocab_size, hidden_size];
        let (weight, head) = match self.quantization()? {
            Some(spec) => (Weight::Quantized(Arc::new(self.read_quantized(spec, vocab_size, hidden_size, &Shard::Replicated)?)), None),
            None if self.keeps_half("weight") => (Weight::Half(self.read(&shape, "weight", None)?.contiguous()?), None),
            None => {
                // Rows are looked up in the compute dtype; a tied output projection may use the
                // bf16 kernel.
                let w = self.get(&shape[..], "weight")?;
                let head = match self.dense(w.clone())? {
                    Weight::Dense(_) => None,
                    other => Some(other),
                };
                (Weight::Dense(w), head)
            }
        };
        Ok(Embedding { weight, head, hidden_size, device: self.shared.device.clone() })
    }

    /// The RMS norm at this prefix (weight of size `dim`).
    pub fn rms_norm(&self, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: self.get(dim, "weight")?, eps, codes: None })
    }

    /// An RMS norm whose checkpoint stores `w` for a scale of `1 + w` (Gemma).
    pub fn rms_norm_one_plus(&self, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: (self.get(dim, "weight")? + 1.0)?, eps, codes: None })
    }
}
