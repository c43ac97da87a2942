//! The decoder stack every causal language model here is: token embeddings, a stack of
//! layers, a final norm and the output projection. [`Decoder`] owns the layer loop, the masks
//! and rotary angles of a forward pass, and gradient checkpointing; a model file supplies its
//! layers ([`DecoderLayer`] for the Llama family, or its own type implementing [`Layer`]).

use std::sync::Arc;

use lmx_core::cpu_step::{StepLayer, StepWeights};
use lmx_core::{DType, Device, Module, Result, Tensor};

use crate::attention::{Attention, AttentionConfig, AttentionInput};
use crate::builder::{Builder, Shard};
use crate::error::BuildError;
use crate::kv_cache::KvCache;
use crate::linear::{Bias, Embedding, Linear, RmsNorm};
use crate::mlp::{Activation, Mlp};
use crate::moe::Moe;
use crate::rope::Rope;
use crate::training::Training;

/// Which positions a forward pass returns logits for. candle is eager, so computing the
/// vocabulary projection only for the last position during generation must be explicit.
#[derive(Debug, Clone)]
pub enum Logits {
    /// Only the last position: (b, 1, vocab).
    Last,
    /// Every position: (b, seq_len, vocab).
    All,
    /// The positions with these indices into the flattened (b * seq_len) positions:
    /// (1, n, vocab). Training asks only for the positions its loss counts; these logits
    /// keep the compute dtype when the model has no logit cap (the loss reads them as they are).
    Rows(Tensor),
}

impl Logits {
    /// The hidden states (b, seq_len, hidden) of the positions asked for.
    pub fn select(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Logits::Last => x.narrow(1, x.dim(1)? - 1, 1),
            Logits::All => Ok(x.clone()),
            Logits::Rows(idx) => {
                let (b, l, h) = x.dims3()?;
                x.reshape((b * l, h))?.index_select(idx, 0)?.unsqueeze(0)
            }
        }
    }
}

/// A decoder-only language model.
pub trait CausalLm: Send + Sync {
    /// Runs `input_ids` (b, seq_len) after the positions already cached, appends their keys
    /// and values to `cache`, and returns f32 logits. A cache of several rows (one per
    /// sequence, [`KvCache::batch`]) runs row i of the batch at that row's own position.
    fn forward(&self, input_ids: &Tensor, cache: &mut KvCache, logits: Logits) -> Result<Tensor>;

    /// An empty cache sized for this model.
    fn new_cache(&self) -> KvCache;

    /// Vocabulary size (logits width).
    fn vocab_size(&self) -> usize;

    /// The longest context the model was trained for (`max_position_embeddings`).
    fn max_position_embeddings(&self) -> usize;

    /// The device the weights live on (inputs go there).
    fn device(&self) -> &Device;

    /// Whether a decode step can be recorded and replayed as one CUDA graph: it runs on this
    /// process's device alone, or talks to its tensor-parallel ranks only through sums a graph
    /// can hold (NCCL); no pipeline stages, no training.
    fn steps_recordable(&self) -> bool {
        false
    }

    /// Returns once the device work behind `logits` is done, within the tensor-parallel
    /// group's timeout (a rank that stopped is named instead of waited for forever); a no-op
    /// on one process. Replayed steps call it before reading their logits.
    fn settle(&self, _logits: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// One layer of a decoder stack.
pub trait Layer: Send + Sync + 'static {
    /// (b, l, hidden) -> (b, l, hidden); `cache` holds this layer's keys and values at
    /// `layer_idx`.
    fn forward(&self, x: &Tensor, input: &AttentionInput, cache: &mut KvCache, layer_idx: usize) -> Result<Tensor>;

    /// The layer on `x + pending` (the previous layer's last residual addition, left for this
    /// layer's first norm to fuse), returning (x, h) whose sum is its output, its own last
    /// addition left pending in turn. Layers that fuse nothing add first and leave nothing.
    fn forward_pending(&self, x: &Tensor, pending: Option<&Tensor>, input: &AttentionInput, cache: &mut KvCache, layer_idx: usize) -> Result<(Tensor, Option<Tensor>)> {
        let x = match pending {
            Some(h) => (x + h)?,
            None => x.clone(),
        };
        Ok((self.forward(&x, input, cache, layer_idx)?, None))
    }

    /// The layer's weights as a decode step on plain buffers reads them
    /// ([`lmx_core::cpu_step`]), where the layer is one it runs; None: op by op.
    fn step_weights(&self) -> Option<StepWeights<'_>> {
        None
    }
}

/// `x + pending` (x with nothing pending).
fn settled(x: Tensor, pending: Option<Tensor>) -> Result<Tensor> {
    match pending {
        Some(h) => x + h,
        None => Ok(x),
    }
}

/// A decoder layer's feed-forward block: one gated MLP, or a mixture of experts.
#[derive(Debug, Clone)]
pub enum FeedForward {
    /// A gated MLP (`mlp.{gate,up,down}_proj`).
    Dense(Mlp),
    /// A mixture of experts (`mlp.gate` + the experts).
    Moe(Moe),
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Dense(m) => m.forward(x),
            FeedForward::Moe(m) => m.forward(x),
        }
    }
}

impl From<Mlp> for FeedForward {
    fn from(m: Mlp) -> Self {
        FeedForward::Dense(m)
    }
}

impl From<Moe> for FeedForward {
    fn from(m: Moe) -> Self {
        FeedForward::Moe(m)
    }
}

/// A decoder layer's attention block.
#[derive(Debug, Clone)]
pub enum SelfAttention {
    /// Multi-head attention over cached keys and values (grouped-query, windows, ...).
    Standard(Attention),
    /// DeepSeek's multi-head latent attention (a compressed cache).
    Latent(crate::mla::Mla),
}

impl SelfAttention {
    fn forward(&self, x: &Tensor, input: &AttentionInput, cache: &mut KvCache, layer_idx: usize) -> Result<Tensor> {
        match self {
            SelfAttention::Standard(a) => a.forward(x, input, cache, layer_idx),
            SelfAttention::Latent(a) => a.forward(x, input, cache, layer_idx),
        }
    }
}

/// `x + self_attn(input_layernorm(x))`, then `x + mlp(post_attention_layernorm(x))`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    self_attn: SelfAttention,
    mlp: FeedForward,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// Reads `self_attn`, `mlp`, `input_layernorm` and `post_attention_layernorm` under `vb`.
    pub fn new(vb: &Builder, attention: &AttentionConfig, intermediate_size: usize, mlp_bias: bool, rms_norm_eps: f64) -> std::result::Result<Self, BuildError> {
        let mlp = Mlp::new(&vb.pp("mlp"), attention.hidden_size, intermediate_size, mlp_bias.into(), Activation::Silu)?;
        Self::with_mlp(vb, attention, mlp, rms_norm_eps)
    }

    /// [`DecoderLayer::new`] around a feed-forward block built apart (a fused `gate_up_proj`,
    /// a mixture of experts).
    pub fn with_mlp(vb: &Builder, attention: &AttentionConfig, mlp: impl Into<FeedForward>, rms_norm_eps: f64) -> std::result::Result<Self, BuildError> {
        let h = attention.hidden_size;
        Ok(Self {
            self_attn: SelfAttention::Standard(Attention::new(&vb.pp("self_attn"), attention)?),
            mlp: mlp.into(),
            input_layernorm: vb.pp("input_layernorm").rms_norm(h, rms_norm_eps)?,
            post_attention_layernorm: vb.pp("post_attention_layernorm").rms_norm(h, rms_norm_eps)?,
        }
        .coded())
    }

    /// Norms whose output feeds quantized products reading int8 codes write those too.
    fn coded(mut self) -> Self {
        if let SelfAttention::Standard(a) = &self.self_attn {
            self.input_layernorm.code_for(a.input_code_spec());
        }
        if let FeedForward::Dense(m) = &self.mlp {
            self.post_attention_layernorm.code_for(m.input_code_spec());
        }
        self
    }

    /// [`DecoderLayer::with_mlp`] with DeepSeek's latent attention (`self_attn` read as
    /// [`crate::mla::Mla`]).
    pub fn latent(vb: &Builder, attention: &crate::mla::MlaConfig, mlp: impl Into<FeedForward>, rms_norm_eps: f64) -> std::result::Result<Self, BuildError> {
        let h = attention.hidden_size;
        Ok(Self {
            self_attn: SelfAttention::Latent(crate::mla::Mla::new(&vb.pp("self_attn"), attention)?),
            mlp: mlp.into(),
            input_layernorm: vb.pp("input_layernorm").rms_norm(h, rms_norm_eps)?,
            post_attention_layernorm: vb.pp("post_attention_layernorm").rms_norm(h, rms_norm_eps)?,
        }
        .coded())
    }
}

impl Layer for DecoderLayer {
    fn forward(&self, x: &Tensor, input: &AttentionInput, cache: &mut KvCache, layer_idx: usize) -> Result<Tensor> {
        let (x, h) = self.forward_pending(x, None, input, cache, layer_idx)?;
        settled(x, h)
    }

    /// Each residual addition fused with the norm after it (one op instead of two); the
    /// layer's last addition is left to the next layer's (or the final) norm.
    fn forward_pending(&self, x: &Tensor, pending: Option<&Tensor>, input: &AttentionInput, cache: &mut KvCache, layer_idx: usize) -> Result<(Tensor, Option<Tensor>)> {
        let (x, normed) = self.input_layernorm.forward_pending(x, pending)?;
        let h = self.self_attn.forward(&normed, input, cache, layer_idx)?;
        let (x, normed) = self.post_attention_layernorm.forward_add(&x, &h)?;
        let h = self.mlp.forward(&normed)?;
        Ok((x, Some(h)))
    }

    fn step_weights(&self) -> Option<StepWeights<'_>> {
        let (SelfAttention::Standard(attn), FeedForward::Dense(mlp)) = (&self.self_attn, &self.mlp) else { return None };
        let [gate, up, down] = mlp.step_parts()?;
        Some(StepWeights { attn_norm: self.input_layernorm.parts(), mlp_norm: self.post_attention_layernorm.parts(), attn: attn.step_parts()?, gate_up: [gate, up], down })
    }
}

/// The decoder layer of Gemma 2 and 3, with norms before and after each block:
/// `x + post_attention_layernorm(self_attn(input_layernorm(x)))`, then
/// `x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))`; every norm multiplies
/// by `1 + weight`.
#[derive(Debug, Clone)]
pub struct SandwichLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
}

impl SandwichLayer {
    /// Reads `self_attn`, `mlp` (`activation`) and the four norms under `vb`.
    pub fn new(vb: &Builder, attention: &AttentionConfig, intermediate_size: usize, activation: Activation, rms_norm_eps: f64) -> std::result::Result<Self, BuildError> {
        let h = attention.hidden_size;
        let norm = |name: &str| vb.pp(name).rms_norm_one_plus(h, rms_norm_eps);
        Ok(Self {
            self_attn: Attention::new(&vb.pp("self_attn"), attention)?,
            mlp: Mlp::new(&vb.pp("mlp"), h, intermediate_size, Bias::No, activation)?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
        })
    }
}

impl Layer for SandwichLayer {
    fn forward(&self, x: &Tensor, input: &AttentionInput, cache: &mut KvCache, layer_idx: usize) -> Result<Tensor> {
        let h = self.self_attn.forward(&self.input_layernorm.forward(x)?, input, cache, layer_idx)?;
        let x = (x + self.post_attention_layernorm.forward(&h)?)?;
        let h = self.mlp.forward(&self.pre_feedforward_layernorm.forward(&x)?)?;
        x + self.post_feedforward_layernorm.forward(&h)?
    }
}

/// Which layers attend within a sliding window: config.json's `layer_types`
/// (`sliding_attention` / `full_attention`, one per layer), else `default(layer)`.
pub fn sliding_layers(layer_types: Option<&[String]>, num_layers: usize, default: impl Fn(usize) -> bool) -> std::result::Result<Vec<bool>, BuildError> {
    match layer_types {
        None => Ok((0..num_layers).map(default).collect()),
        Some(types) if types.len() == num_layers && types.iter().all(|t| t == "sliding_attention" || t == "full_attention") => Ok(types.iter().map(|t| t == "sliding_attention").collect()),
        Some(types) => Err(BuildError::ConfigValue { key: "layer_types", value: format!("{types:?}"), allowed: "one of sliding_attention / full_attention per layer (num_hidden_layers)" }),
    }
}

/// The sizes of a decoder stack: config.json keys every architecture shares (a model file's
/// `Config` flattens this in).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct DecoderConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Epsilon of the final norm.
    pub rms_norm_eps: f64,
    /// The output projection is the embedding matrix (no `lm_head` tensor).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// The longest context the model was trained for.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
}

fn default_max_positions() -> usize {
    2048
}

impl DecoderConfig {
    /// Checks the sizes where they enter: every one at least 1, a finite positive epsilon.
    pub fn validate(&self) -> std::result::Result<(), BuildError> {
        let positive = [("vocab_size", self.vocab_size), ("hidden_size", self.hidden_size), ("num_hidden_layers", self.num_hidden_layers), ("max_position_embeddings", self.max_position_embeddings)];
        if let Some((key, value)) = positive.into_iter().find(|(_, v)| *v == 0) {
            return Err(BuildError::ConfigValue { key, value: value.to_string(), allowed: "it must be at least 1" });
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(BuildError::ConfigValue { key: "rms_norm_eps", value: self.rms_norm_eps.to_string(), allowed: "it must be a small positive number (e.g. 1e-5)" });
        }
        Ok(())
    }
}

/// How long a pipeline stage waits for the previous one's hidden states (or for the last
/// one's logits): several stages' share of a long prompt on a large model can take minutes
/// on a CPU. A rank that dies still ends the job at once (the launcher notices).
const PIPELINE_WAIT: lmx_dist::Wait = lmx_dist::Wait::For(std::time::Duration::from_secs(600));

/// What differs around the layer stack between families (Gemma's, against Llama's defaults).
#[derive(Debug, Clone, Copy, Default)]
pub struct DecoderStyle {
    /// The embeddings are multiplied by this (Gemma: `sqrt(hidden_size)`, rounded to the
    /// compute dtype as transformers does).
    pub embed_scale: Option<f64>,
    /// The final norm multiplies by `1 + weight` (Gemma's checkpoints store `weight`).
    pub norm_one_plus: bool,
    /// Logits become `cap * tanh(logits / cap)` (`final_logit_softcapping`).
    pub logit_softcap: Option<f64>,
}

/// A whole causal language model: `model.embed_tokens`, `model.layers.<i>`, `model.norm`,
/// `lm_head` (or the tied embeddings).
pub struct Decoder<L: Layer> {
    embed_tokens: Embedding,
    /// The layers this process holds: all, or a pipeline stage's range from `first_layer`.
    layers: Vec<Arc<L>>,
    first_layer: usize,
    /// The pipeline this process is a stage of (more than one rank).
    pipeline: Option<Arc<dyn lmx_dist::Group>>,
    /// The tensor-parallel group (more than one rank): a forward ends by settling its sums
    /// ([`lmx_dist::Group::settle`]), and with `LMX_DIST_CHECK=1` by checking that every rank
    /// holds bit-identical logits (they must, to sample the same tokens).
    tp: Option<Arc<dyn lmx_dist::Group>>,
    check: bool,
    norm: RmsNorm,
    lm_head: Linear,
    /// The model's rotary embedding, then any further tables (`AttentionConfig::rope_table`).
    ropes: Vec<Rope>,
    cfg: DecoderConfig,
    style: DecoderStyle,
    training: Option<Arc<Training>>,
}

impl<L: Layer> Decoder<L> {
    /// Reads the stack under `vb` (the checkpoint root); `layer(vb, i)` builds layer `i` under
    /// `model.layers.<i>`.
    pub fn new(vb: &Builder, cfg: &DecoderConfig, rope: Rope, layer: impl Fn(&Builder, usize) -> std::result::Result<L, BuildError>) -> std::result::Result<Self, BuildError> {
        Self::with_style(vb, cfg, vec![rope], DecoderStyle::default(), layer)
    }

    /// [`Decoder::new`] with a family's embedding scale, final norm and logit capping, and
    /// `ropes`: the model's rotary embedding first, then tables some layers rotate by
    /// instead (Gemma 3's local layers).
    pub fn with_style(
        vb: &Builder,
        cfg: &DecoderConfig,
        ropes: Vec<Rope>,
        style: DecoderStyle,
        layer: impl Fn(&Builder, usize) -> std::result::Result<L, BuildError>,
    ) -> std::result::Result<Self, BuildError> {
        if ropes.is_empty() {
            return Err(BuildError::unsupported("a decoder without a rotary embedding".to_string()));
        }
        cfg.validate()?;
        let m = vb.pp("model");
        let embed_tokens = m.pp("embed_tokens").embedding(cfg.vocab_size, cfg.hidden_size)?;
        let pipeline = vb.pipeline().filter(|g| g.size() > 1).cloned();
        if pipeline.is_some() && vb.training().is_some() {
            return Err(BuildError::unsupported("fine-tuning a pipeline-parallel model"));
        }
        let mine = vb.pipeline_layers(cfg.num_hidden_layers);
        if mine.is_empty() {
            return Err(BuildError::unsupported(format!("a pipeline of more stages than the model's {} layers", cfg.num_hidden_layers)));
        }
        let mut layers = Vec::with_capacity(mine.len());
        for i in 0..cfg.num_hidden_layers {
            let lb = m.pp("layers").pp(i);
            if mine.contains(&i) {
                layers.push(Arc::new(layer(&lb, i)?));
            } else {
                lb.skip();
            }
        }
        let norm = if style.norm_one_plus { m.pp("norm").rms_norm_one_plus(cfg.hidden_size, cfg.rms_norm_eps)? } else { m.pp("norm").rms_norm(cfg.hidden_size, cfg.rms_norm_eps)? };
        let lm_head = if cfg.tie_word_embeddings { embed_tokens.as_linear() } else { vb.pp("lm_head").linear(cfg.hidden_size, cfg.vocab_size, Bias::No, Shard::Replicated)? };
        let tp = (vb.group().size() > 1).then(|| vb.group().clone());
        let check = std::env::var_os("LMX_DIST_CHECK").is_some();
        Ok(Self { embed_tokens, layers, first_layer: mine.start, pipeline, tp, check, norm, lm_head, ropes, cfg: cfg.clone(), style, training: vb.training().cloned() })
    }
}

impl<L: Layer> Decoder<L> {
    /// The scaled token embeddings of `input_ids`.
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let x = self.embed_tokens.forward(input_ids)?;
        match self.style.embed_scale {
            // transformers multiplies by the scale as a tensor of the hidden states' dtype.
            Some(scale) => x.broadcast_mul(&Tensor::new(scale as f32, x.device())?.to_dtype(x.dtype())?),
            None => Ok(x),
        }
    }

    /// This process's layers over hidden states `x` (b, l, hidden), after the positions
    /// `cache` holds: (x, h) whose sum is the last layer's output.
    fn run_layers(&self, mut x: Tensor, cache: &mut KvCache) -> Result<(Tensor, Option<Tensor>)> {
        if let Some(done) = self.cpu_step(&x, cache)? {
            return Ok(done);
        }
        let l = x.dim(1)?;
        // Rows at different positions (a batch of sequences of different lengths) each get
        // their own rotary angles.
        let offsets: Vec<usize> = (0..cache.rows().max(1)).map(|r| cache.row_offset(r)).collect();
        let angles = if offsets.iter().all(|&o| o == offsets[0]) { &offsets[..1] } else { &offsets[..] };
        let pos = cache.device_position().cloned();
        if pos.is_some() && (l != 1 || cache.rows() != 1) {
            lmx_core::bail!("a step at a device position runs one token of one sequence, not {l} of {}", cache.rows());
        }
        let table = |rope: &Rope| match &pos {
            // The position lives on the device (a recorded decode step).
            Some(p) => Ok(vec![rope.cos_sin_at(p)?]),
            None => angles.iter().map(|&o| rope.cos_sin(o, l)).collect::<Result<Vec<_>>>(),
        };
        let mut input = AttentionInput::new(table(&self.ropes[0])?);
        for rope in &self.ropes[1..] {
            input = input.with_table(table(rope)?);
        }
        let input = Arc::new(input);
        let checkpointing = self.training.as_ref().and_then(|t| t.checkpointing());
        // The cache holds this process's layers only (a pipeline stage's range), so the
        // positions it counts are those of its own first layer.
        // Each layer's last residual addition is left pending for the next norm to fuse.
        let mut pending = None;
        for (layer_idx, layer) in self.layers.iter().enumerate() {
            (x, pending) = match &checkpointing {
                Some(ck) if self.first_layer + layer_idx >= ck.first_layer => {
                    let (layer, input) = (layer.clone(), input.clone());
                    let x = settled(x, pending)?;
                    (crate::checkpoint::layer(ck, &x, move |x| layer.forward(x, &input, &mut KvCache::uncached(), 0))?, None)
                }
                _ => layer.forward_pending(&x, pending.as_ref(), &input, cache, layer_idx)?,
            };
        }
        Ok((x, pending))
    }

    /// One token of one sequence on the CPU through [`lmx_core::cpu_step`], when every layer
    /// is one it runs ([`Layer::step_weights`]) over a plain growing cache: the same numbers
    /// as the layers op by op, without a candle tensor per op. None: the layers run op by op.
    fn cpu_step(&self, x: &Tensor, cache: &mut KvCache) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let one = x.dims() == [1, 1, self.cfg.hidden_size] && cache.rows() == 1 && cache.device_position().is_none();
        if !one || !x.device().is_cpu() || self.ropes.len() != 1 || self.training.is_some() || !lmx_core::cpu_step::enabled() {
            return Ok(None);
        }
        let Some(weights) = self.layers.iter().map(|l| l.step_weights()).collect::<Option<Vec<_>>>() else { return Ok(None) };
        let mut buffers = Vec::with_capacity(weights.len());
        for layer_idx in 0..weights.len() {
            // Room for the new position in a plain growing cache (None: quantized, rotating,
            // not yet started by a prompt).
            let Some(rows) = cache.step_rows(layer_idx, None)? else { return Ok(None) };
            buffers.push((rows.keys[0].clone(), rows.values[0].clone(), rows.offsets[0]));
        }
        let pos = buffers[0].2;
        if buffers.iter().any(|b| b.2 != pos) {
            return Ok(None);
        }
        let (cos, sin) = self.ropes[0].cos_sin(pos, 1)?;
        let layers: Vec<StepLayer<'_>> = weights.into_iter().zip(&buffers).map(|(weights, (keys, values, _))| StepLayer { weights, keys, values }).collect();
        let Some((x, h)) = lmx_core::cpu_step::decode_layers(x, &layers, pos, &cos, &sin)? else { return Ok(None) };
        for layer_idx in 0..layers.len() {
            cache.commit_rows(layer_idx);
        }
        Ok(Some((x, Some(h))))
    }

    /// The final norm (of x + pending), the positions asked for, the output projection and
    /// capping: f32 logits, except training's rows without a cap, which stay in the compute
    /// dtype: the loss reads them as they are (exactly the f32 values), so a batch's logits
    /// over the vocabulary are not copied to f32 and back in the backward.
    fn head(&self, (x, pending): &(Tensor, Option<Tensor>), logits: &Logits) -> Result<Tensor> {
        let x = logits.select(&self.norm.forward_pending(x, pending.as_ref())?.1)?;
        let logits = match (logits, self.style.logit_softcap) {
            (Logits::Rows(_), None) => return self.lm_head.forward(&x),
            _ => self.lm_head.forward(&x)?.to_dtype(DType::F32)?,
        };
        match self.style.logit_softcap {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }

    /// One forward as a stage of pipeline `g`. A call over several positions (a prompt) is cut
    /// into as many micro-batches as there are stages (by sequence when the batch has one
    /// cache per sequence, else by position, each piece after the previous one in the cache),
    /// so that a stage works on one piece while the next stage works on the one before. A
    /// decode step (one position) is not cut: it reads the weights once per piece, and
    /// reading them is its whole cost.
    fn pipeline_forward(&self, g: &Arc<dyn lmx_dist::Group>, input_ids: &Tensor, cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let (rank, last) = (g.rank(), g.size() - 1);
        let by_rows = b > 1 && (cache.rows() == b || !cache.stores());
        let pieces = match &logits {
            Logits::Rows(_) => 1,
            _ if l < 2 => 1,
            _ if by_rows => b.min(g.size()),
            _ if cache.stores() => l.min(g.size()),
            _ => 1,
        };
        let mut outputs = Vec::with_capacity(pieces);
        for piece in 0..pieces {
            let (rows, positions) = if by_rows { (lmx_dist::split_range(b, 1, piece, pieces), 0..l) } else { (0..b, lmx_dist::split_range(l, 1, piece, pieces)) };
            let x = match rank {
                0 => self.embed(&input_ids.narrow(0, rows.start, rows.len())?.narrow(1, positions.start, positions.len())?)?,
                // A later stage continues from the previous stage's hidden states.
                _ => g.recv(rank - 1, PIPELINE_WAIT)?.to_device(self.device())?,
            };
            let x = if by_rows && cache.stores() {
                let mut part = cache.take_rows(rows.clone());
                let x = self.run_layers(x, &mut part);
                cache.restore_rows(rows.start, part);
                x?
            } else if by_rows {
                self.run_layers(x, &mut KvCache::uncached())?
            } else {
                self.run_layers(x, cache)?
            };
            if rank < last {
                g.send(&settled(x.0, x.1)?, rank + 1, PIPELINE_WAIT)?;
            } else if by_rows || matches!(logits, Logits::All) || piece == pieces - 1 {
                outputs.push(self.head(&x, &logits)?);
            }
        }
        if rank < last {
            // Every stage samples from the logits the last one computes.
            return g.broadcast(None, last, PIPELINE_WAIT)?.to_device(self.device());
        }
        let logits = if outputs.len() == 1 { outputs.remove(0) } else { Tensor::cat(&outputs, if by_rows { 0 } else { 1 })? };
        g.broadcast(Some(&logits), last, PIPELINE_WAIT)?;
        Ok(logits)
    }
}

impl<L: Layer> CausalLm for Decoder<L> {
    fn forward(&self, input_ids: &Tensor, cache: &mut KvCache, logits: Logits) -> Result<Tensor> {
        let b = input_ids.dim(0)?;
        if cache.rows() > 1 && cache.rows() != b {
            lmx_core::bail!("a batch of {b} sequences with a cache for {}", cache.rows());
        }
        if let Some(g) = &self.pipeline {
            return self.pipeline_forward(g, input_ids, cache, logits);
        }
        let x = self.run_layers(self.embed(input_ids)?, cache)?;
        let logits = self.head(&x, &logits)?;
        lmx_core::quant::clear_offered_codes();
        // While a step is recorded nothing runs: the replay settles instead.
        if self.tp.is_some() && !lmx_core::graph::capturing(self.device()) {
            self.settle(&logits)?;
        }
        if let Some(g) = self.tp.as_ref().filter(|_| self.check) {
            // A checksum of every rank's logits: the ranks must agree bit for bit.
            let bits = logits.flatten_all()?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1::<f32>()?.iter().fold(0u64, |h, v| h.rotate_left(5) ^ u64::from(v.to_bits()));
            let all = g.all_gather(&Tensor::new(&[bits as i64], &Device::Cpu)?, 0)?.to_vec1::<i64>()?;
            if all.iter().any(|&b| b != all[0]) {
                lmx_core::bail!("LMX_DIST_CHECK: the ranks' logits differ (checksums {all:?}): their sums are not bit-identical");
            }
        }
        Ok(logits)
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_position_embeddings(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    fn steps_recordable(&self) -> bool {
        let tp = self.tp.as_ref().is_none_or(|g| g.capturable() && !self.check);
        self.pipeline.is_none() && self.training.is_none() && tp
    }

    fn settle(&self, logits: &Tensor) -> Result<()> {
        match &self.tp {
            Some(g) => g.settle(logits),
            None => Ok(()),
        }
    }
}
