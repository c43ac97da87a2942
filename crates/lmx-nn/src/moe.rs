//! The mixture-of-experts feed-forward block (Qwen3-MoE, Qwen2-MoE, Mixtral, gpt-oss): a linear
//! router scores every expert per token, the top k are kept (softmax over all experts, then
//! the k largest, renormalized where the model asks; or gpt-oss's softmax over the k largest
//! logits), and the block's output is the kept experts' gated-MLP outputs weighted by those
//! scores.
//!
//! Experts are read either as MLX stores them (`switch_mlp.{gate,up,down}_proj` with a
//! leading expert dimension, dense or MLX-quantized, as `mlx_lm.convert` writes them) or as
//! Hugging Face checkpoints do (`experts.{e}.{gate,up,down}_proj`, one module per expert).
//! Either way each expert becomes its own [`Mlp`], so a token reads only its k experts'
//! weights (decode time tracks active, not total, parameters) and a prompt runs each expert
//! once over the tokens routed to it. Under tensor parallelism every expert's intermediate
//! features split over the ranks like a dense MLP's; with [`Builder::with_expert_parallel`]
//! rank r of n holds experts r, r + n, ... whole instead and computes only those. Either way
//! the ranks' partial outputs are summed once per block, so every rank makes the same
//! collectives whatever the routing.

use std::sync::Arc;

use lmx_core::{DType, Module, Result, Tensor};
use lmx_dist::Group;

use crate::builder::{Builder, Shard};
use crate::error::BuildError;
use crate::linear::{Bias, Linear};
use crate::mlp::{Activation, Mlp};

/// The shape of a mixture-of-experts block (config.json's names vary by model; each model
/// file maps its own).
#[derive(Debug, Clone, Copy)]
pub struct MoeConfig {
    /// The model's hidden size.
    pub hidden_size: usize,
    /// Each expert's intermediate size.
    pub intermediate_size: usize,
    /// Experts in the block.
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Whether the k kept scores are divided by their sum (Qwen3-MoE's `norm_topk_prob`;
    /// Mixtral always).
    pub normalize: bool,
    /// Where the router's softmax is taken.
    pub routing: Routing,
    /// The router and every expert projection have a bias (gpt-oss).
    pub bias: bool,
    /// The experts' gate activation.
    pub activation: Activation,
}

impl MoeConfig {
    /// Qwen's and Mixtral's block: no biases, SwiGLU experts, a softmax over every expert.
    pub fn new(hidden_size: usize, intermediate_size: usize, num_experts: usize, top_k: usize, normalize: bool) -> Self {
        Self { hidden_size, intermediate_size, num_experts, top_k, normalize, routing: Routing::SoftmaxAll, bias: false, activation: Activation::Silu }
    }
}

/// How router logits become the kept experts' weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Routing {
    /// A softmax over every expert, then the k largest (renormalized when
    /// [`MoeConfig::normalize`]).
    SoftmaxAll,
    /// The k largest logits, then a softmax over those k (gpt-oss; Mixtral's equivalent).
    TopKSoftmax,
    /// DeepSeek-V3's: each expert's score is the sigmoid of its logit; experts are chosen by
    /// score plus the router's `e_score_correction_bias`, only within the `topk_group` best of
    /// `groups` equal groups (a group's worth: its two best choice scores); the kept scores
    /// (without the bias) are renormalized when [`MoeConfig::normalize`], then multiplied by
    /// `scaling` (`routed_scaling_factor`).
    GroupedSigmoid { groups: usize, topk_group: usize, scaling: f32 },
}

/// The config.json keys of Qwen's mixture-of-experts families (Qwen2-MoE, Qwen3-MoE), read
/// flattened into a model's config: which layers hold experts and how many.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct QwenMoeArgs {
    /// Each routed expert's intermediate size.
    pub moe_intermediate_size: usize,
    /// Experts per MoE layer: `num_experts` in Qwen's checkpoints, `num_local_experts` as
    /// transformers 5 writes it.
    pub num_experts: Option<usize>,
    pub num_local_experts: Option<usize>,
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
}

fn one() -> usize {
    1
}

impl QwenMoeArgs {
    /// The block's shape for a model of `hidden_size`.
    pub fn config(&self, hidden_size: usize) -> MoeConfig {
        MoeConfig::new(hidden_size, self.moe_intermediate_size, self.experts(), self.num_experts_per_tok, self.norm_topk_prob)
    }

    fn experts(&self) -> usize {
        self.num_experts.or(self.num_local_experts).unwrap_or(0)
    }

    /// Whether layer `i` holds experts (transformers' rule); the others a dense MLP.
    pub fn sparse(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i) && self.experts() > 0 && (i + 1) % self.decoder_sparse_step.max(1) == 0
    }
}

/// A mixture-of-experts block: the router (`gate`) and the experts.
#[derive(Debug, Clone)]
pub struct Moe {
    gate: Linear,
    /// Every expert, or under expert parallelism this rank's (the others None).
    experts: Vec<Option<Mlp>>,
    top_k: usize,
    normalize: bool,
    routing: Routing,
    /// DeepSeek's `e_score_correction_bias` (one per expert), added to the scores that choose.
    correction: Option<Vec<f32>>,
    /// On several ranks (tensor or expert parallel): the group whose ranks' partial outputs
    /// are summed, once per block.
    reduce: Option<Arc<dyn Group>>,
    /// An expert every token takes: Qwen2-MoE's `shared_expert`, weighted by the sigmoid of
    /// its own gate (`shared_expert_gate`), or DeepSeek's `shared_experts`, unweighted.
    shared: Option<(Mlp, Option<Linear>)>,
}

impl Moe {
    /// Reads the router at `vb.pp(gate)` and the experts under `vb`: stacked as MLX stores
    /// them (`switch_mlp.{gate,up,down}_proj`, or `experts.*` for gpt-oss) when the checkpoint
    /// has them, else Hugging Face's `experts.{e}` with its projections named `hf_names`
    /// (`[gate, up, down]`), or gpt-oss's fused `experts.gate_up_proj` (rearranged into
    /// MLX's layout as MLX LM's sanitize does).
    pub fn new(vb: &Builder, gate: &str, hf_names: [&str; 3], cfg: &MoeConfig) -> std::result::Result<Self, BuildError> {
        if cfg.top_k == 0 || cfg.top_k > cfg.num_experts {
            return Err(BuildError::ConfigValue { key: "num_experts_per_tok", value: cfg.top_k.to_string(), allowed: "it must be between 1 and the number of experts" });
        }
        if let Routing::GroupedSigmoid { groups, topk_group, .. } = cfg.routing {
            if groups == 0 || cfg.num_experts % groups != 0 || topk_group == 0 || topk_group > groups || cfg.top_k > topk_group * (cfg.num_experts / groups) {
                return Err(BuildError::ConfigValue {
                    key: "n_group",
                    value: format!("{groups} groups, topk_group {topk_group}, {} experts, {} per token", cfg.num_experts, cfg.top_k),
                    allowed: "groups dividing the experts, 1 <= topk_group <= n_group, and enough experts in the kept groups",
                });
            }
        }
        let bias = Bias::from(cfg.bias);
        let router = vb.pp(gate);
        let gate = router.linear(cfg.hidden_size, cfg.num_experts, bias, Shard::Replicated)?;
        let correction = match cfg.routing {
            Routing::GroupedSigmoid { .. } => Some(router.get(cfg.num_experts, "e_score_correction_bias")?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            _ => None,
        };
        let rearranged = if vb.pp("experts").has("gate_up_proj_blocks") {
            Some(fused_mxfp4_experts(vb, cfg)?)
        } else if vb.pp("experts").has("gate_up_proj") {
            Some(fused_experts(vb, cfg)?)
        } else {
            None
        };
        let switch = match &rearranged {
            Some(r) => r.pp("experts"),
            None if vb.pp("experts").pp("gate_proj").has("weight") => vb.pp("experts"),
            None => vb.pp("switch_mlp"),
        };
        let stacked = switch.pp("gate_proj").has("weight");
        // Expert parallelism: rank r of n owns experts r, r + n, ... whole.
        let group = vb.group().clone();
        let (ep, rank, ranks) = (vb.expert_parallel() && group.size() > 1, group.rank(), group.size());
        let experts = (0..cfg.num_experts)
            .map(|e| {
                let (expert, names) = if stacked {
                    (switch.expert(e, cfg.num_experts), ["gate_proj", "up_proj", "down_proj"])
                } else {
                    // Adapters named as MLX LM names them once its sanitize has stacked these.
                    let mlx = [(hf_names[0], "gate_proj"), (hf_names[1], "up_proj"), (hf_names[2], "down_proj")];
                    (vb.pp("experts").pp(e).adapters_as_stacked(switch.prefix(), e, cfg.num_experts, mlx), hf_names)
                };
                if ep && e % ranks != rank {
                    if !stacked {
                        expert.skip();
                    }
                    return Ok(None);
                }
                // Tensor parallel: each expert's share of the features, its down projection's
                // partial sums added up with the others' in the block's one all-sum.
                let expert = if ep { expert.local() } else { expert.unreduced() };
                Mlp::with_names(&expert, names, cfg.hidden_size, cfg.intermediate_size, bias, cfg.activation).map(Some)
            })
            .collect::<std::result::Result<_, _>>()?;
        if ep && stacked {
            // A rank may own none of the experts (more ranks than experts): reading no slice
            // of the stacked tensors is expected.
            switch.skip();
        }
        Ok(Self { gate, experts, top_k: cfg.top_k, normalize: cfg.normalize, routing: cfg.routing, correction, reduce: (ranks > 1).then_some(group), shared: None })
    }

    /// Adds the expert every token takes: `shared_expert` (an MLP of `intermediate_size`
    /// features, split over a tensor-parallel group like a dense one, also under expert
    /// parallelism) weighted by `sigmoid(shared_expert_gate(x))`.
    pub fn with_shared_expert(mut self, vb: &Builder, hidden_size: usize, intermediate_size: usize) -> std::result::Result<Self, BuildError> {
        let mlp = Mlp::new(&vb.pp("shared_expert"), hidden_size, intermediate_size, Bias::No, Activation::Silu)?;
        let gate = vb.pp("shared_expert_gate").linear(hidden_size, 1, Bias::No, Shard::Replicated)?;
        self.shared = Some((mlp, Some(gate)));
        Ok(self)
    }

    /// Adds DeepSeek's `shared_experts`: one MLP of `intermediate_size` features (the shared
    /// experts side by side) that every token takes, unweighted.
    pub fn with_shared_experts(mut self, vb: &Builder, hidden_size: usize, intermediate_size: usize) -> std::result::Result<Self, BuildError> {
        self.shared = Some((Mlp::new(&vb.pp("shared_experts"), hidden_size, intermediate_size, Bias::No, Activation::Silu)?, None));
        Ok(self)
    }

    /// Each token's kept experts and their weights, from the router's logits (one row per
    /// token): softmax in f32 over all experts (or, [`Routing::TopKSoftmax`], over the kept
    /// ones), the k largest (the lower index first among equals), divided by their sum when
    /// the model normalizes.
    fn route(&self, logits: &[Vec<f32>]) -> Vec<Vec<(usize, f32)>> {
        if let Routing::GroupedSigmoid { groups, topk_group, scaling } = self.routing {
            return logits.iter().map(|row| self.route_grouped(row, groups, topk_group, scaling)).collect();
        }
        logits
            .iter()
            .map(|row| {
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                let max = row[order[0]];
                // Summed in index order over all experts (as before), in score order over the kept.
                let total: f32 = match self.routing {
                    Routing::TopKSoftmax => order[..self.top_k].iter().map(|&i| (row[i] - max).exp()).sum(),
                    _ => row.iter().map(|v| (v - max).exp()).sum(),
                };
                let mut kept: Vec<(usize, f32)> = order[..self.top_k].iter().map(|&i| (i, (row[i] - max).exp() / total)).collect();
                if self.normalize {
                    let sum: f32 = kept.iter().map(|(_, w)| w).sum();
                    kept.iter_mut().for_each(|(_, w)| *w /= sum);
                }
                kept
            })
            .collect()
    }
}

impl Module for Moe {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let hidden = *dims.last().unwrap_or(&0);
        let xs = x.reshape(((), hidden))?;
        let logits_t = self.gate.forward(&xs)?.to_dtype(DType::F32)?;
        let logits = logits_t.to_vec2::<f32>()?;
        if logits.len() == 1 && !logits_t.track_op() {
            return self.forward_token(x, &xs, &logits);
        }
        let routes = self.route(&logits);
        // Fine-tuning (the logits on the gradient tape): the kept weights are recomputed from
        // the logits by tensor ops, so gradients reach the router and everything before it
        // through them too (as in transformers); which experts are kept stays this decision.
        let on_tape = if logits_t.track_op() { Some(self.kept_weights(&logits_t, &routes)?) } else { None };
        // Tokens (and their weights) per expert, experts in index order: the order in which
        // transformers adds the experts' outputs.
        let mut routed: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (token, kept) in routes.into_iter().enumerate() {
            for (e, w) in kept {
                routed[e].0.push(token as u32);
                routed[e].1.push(w);
            }
        }
        let mut out = Tensor::zeros(xs.dims(), DType::F32, xs.device())?;
        for (e, (expert, (tokens, weights))) in self.experts.iter().zip(&routed).enumerate() {
            let Some(expert) = expert.as_ref().filter(|_| !tokens.is_empty()) else { continue };
            let ids = Tensor::new(tokens.as_slice(), xs.device())?;
            let y = expert.forward(&xs.index_select(&ids, 0)?.unsqueeze(0)?)?.squeeze(0)?;
            let w = match &on_tape {
                Some(w) => w.index_select(&ids, 0)?.narrow(1, e, 1)?,
                None => Tensor::new(weights.as_slice(), xs.device())?.unsqueeze(1)?,
            };
            out = out.index_add(&ids, &y.to_dtype(DType::F32)?.broadcast_mul(&w)?, 0)?;
        }
        self.finish(out, x)
    }
}

impl Moe {
    /// [`Routing::GroupedSigmoid`] for one token (transformers' `DeepseekV3TopkRouter`).
    fn route_grouped(&self, row: &[f32], groups: usize, topk_group: usize, scaling: f32) -> Vec<(usize, f32)> {
        let scores: Vec<f32> = row.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
        let choice: Vec<f32> = scores.iter().zip(self.correction.iter().flatten().chain(std::iter::repeat(&0.0))).map(|(s, b)| s + b).collect();
        let per = row.len() / groups;
        // A group's worth: the sum of its two best choice scores.
        let worth: Vec<f32> = choice
            .chunks(per)
            .map(|g| {
                let mut g = g.to_vec();
                g.sort_by(|a, b| b.total_cmp(a));
                g.iter().take(2).sum()
            })
            .collect();
        let mut order: Vec<usize> = (0..groups).collect();
        order.sort_by(|&a, &b| worth[b].total_cmp(&worth[a]).then(a.cmp(&b)));
        let kept_groups = &order[..topk_group];
        let mut candidates: Vec<usize> = (0..row.len()).filter(|e| kept_groups.contains(&(e / per))).collect();
        candidates.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
        let mut kept: Vec<(usize, f32)> = candidates[..self.top_k].iter().map(|&e| (e, scores[e])).collect();
        let sum: f32 = kept.iter().map(|(_, w)| w).sum::<f32>() + 1e-20;
        for (_, w) in &mut kept {
            if self.normalize {
                *w /= sum;
            }
            *w *= scaling;
        }
        kept
    }

    /// Every token's weight for every expert (0 for those not kept), (tokens, experts), as a
    /// differentiable function of the router `logits`: the softmax over all experts masked to
    /// the kept ones, renormalized where the model asks (a softmax over the kept logits, gpt-oss's
    /// routing, is the same thing).
    fn kept_weights(&self, logits: &Tensor, routes: &[Vec<(usize, f32)>]) -> Result<Tensor> {
        let n = logits.dim(1)?;
        let mut mask = vec![0f32; routes.len() * n];
        for (t, kept) in routes.iter().enumerate() {
            kept.iter().for_each(|&(e, _)| mask[t * n + e] = 1.0);
        }
        let mask = Tensor::from_vec(mask, (routes.len(), n), logits.device())?;
        if let Routing::GroupedSigmoid { scaling, .. } = self.routing {
            let sigmoid = (logits.neg()?.exp()? + 1.0)?.recip()?;
            let kept = (sigmoid * mask)?;
            let kept = if self.normalize { kept.broadcast_div(&(kept.sum_keepdim(1)? + 1e-20)?)? } else { kept };
            return kept * f64::from(scaling);
        }
        let kept = (lmx_core::ops::softmax_last_dim(logits)? * mask)?;
        if self.normalize || self.routing == Routing::TopKSoftmax {
            return kept.broadcast_div(&kept.sum_keepdim(1)?);
        }
        Ok(kept)
    }

    /// One token (decode): its experts' gate and up projections in one shared step, no
    /// gather or scatter; the weighted outputs added in f32 in expert order, as above.
    fn forward_token(&self, x: &Tensor, xs: &Tensor, logits: &[Vec<f32>]) -> Result<Tensor> {
        let mut kept = self.route(logits).swap_remove(0);
        kept.sort_by_key(|&(e, _)| e);
        // This rank's experts among them (all of them unless expert-parallel).
        kept.retain(|&(e, _)| self.experts[e].is_some());
        let mlps: Vec<&Mlp> = kept.iter().filter_map(|&(e, _)| self.experts[e].as_ref()).collect();
        let mut out = Tensor::zeros(xs.dims(), DType::F32, xs.device())?;
        for (y, &(_, w)) in Mlp::forward_many(&mlps, xs)?.iter().zip(&kept) {
            out = (out + (y.to_dtype(DType::F32)? * f64::from(w))?)?;
        }
        self.finish(out, x)
    }

    /// The block's output from this rank's f32 sum: summed over the expert-parallel group,
    /// in `x`'s dtype and shape.
    fn finish(&self, out: Tensor, x: &Tensor) -> Result<Tensor> {
        let out = match &self.reduce {
            Some(group) => group.all_sum(&out)?,
            None => out,
        };
        let out = out.to_dtype(x.dtype())?.reshape(x.dims())?;
        match &self.shared {
            Some((mlp, Some(gate))) => {
                let g = (gate.forward(x)?.neg()?.exp()? + 1.0)?.recip()?;
                out + g.broadcast_mul(&mlp.forward(x)?)?
            }
            Some((mlp, None)) => out + mlp.forward(x)?,
            None => Ok(out),
        }
    }
}

/// gpt-oss's experts as transformers stores them (`experts.gate_up_proj` (experts, hidden,
/// 2 x features) with gate and up features interleaved, `experts.down_proj` (experts,
/// features, hidden), inputs first, biases `*_bias`) rearranged into MLX's stacked layout
/// (`experts.{gate,up,down}_proj.{weight,bias}`, outputs first), as MLX LM's `sanitize` does:
/// a builder over those tensors at `vb`'s prefix.
fn fused_experts(vb: &Builder, cfg: &MoeConfig) -> std::result::Result<Builder, BuildError> {
    let (e, h, i) = (cfg.num_experts, cfg.hidden_size, cfg.intermediate_size);
    let fused = vb.pp("experts");
    let gate_up = fused.get(&[e, h, 2 * i][..], "gate_up_proj")?;
    let down = fused.get(&[e, i, h][..], "down_proj")?;
    let (gate_up_bias, down_bias) = if cfg.bias { (Some(fused.get(&[e, 2 * i][..], "gate_up_proj_bias")?), Some(fused.get(&[e, h][..], "down_proj_bias")?)) } else { (None, None) };
    let key = |name: &str| fused.key(name);
    let mut tensors = std::collections::HashMap::new();
    if vb.is_shapes_only() {
        // A shape check: placeholders of the rearranged shapes (nothing allocated).
        let placeholder = |dims: &[usize]| Tensor::zeros((), gate_up.dtype(), gate_up.device())?.broadcast_as(dims);
        for name in ["gate_proj", "up_proj"] {
            tensors.insert(key(&format!("{name}.weight")), placeholder(&[e, i, h])?);
            if cfg.bias {
                tensors.insert(key(&format!("{name}.bias")), placeholder(&[e, i])?);
            }
        }
        tensors.insert(key("down_proj.weight"), placeholder(&[e, h, i])?);
        if cfg.bias {
            tensors.insert(key("down_proj.bias"), placeholder(&[e, h])?);
        }
        return Ok(vb.with_tensors(tensors));
    }
    // Feature f of the gate is column 2f, of the up projection column 2f + 1.
    let pairs = gate_up.reshape((e, h, i, 2))?;
    for (name, at) in [("gate_proj", 0), ("up_proj", 1)] {
        tensors.insert(key(&format!("{name}.weight")), pairs.narrow(3, at, 1)?.squeeze(3)?.transpose(1, 2)?.contiguous()?);
        if let Some(b) = &gate_up_bias {
            tensors.insert(key(&format!("{name}.bias")), b.reshape((e, i, 2))?.narrow(2, at, 1)?.squeeze(2)?.contiguous()?);
        }
    }
    tensors.insert(key("down_proj.weight"), down.transpose(1, 2)?.contiguous()?);
    if let Some(b) = down_bias {
        tensors.insert(key("down_proj.bias"), b);
    }
    Ok(vb.with_tensors(tensors))
}

/// OpenAI's MXFP4 gpt-oss experts (`experts.gate_up_proj_blocks` (experts, 2 x inter,
/// hidden / 32, 16) bytes with `_scales` (experts, 2 x inter, hidden / 32) E8M0 bytes, gate and
/// up rows alternating; `down_proj_blocks` / `_scales`; float biases) rearranged into MLX's
/// stacked MXFP4 layout as MLX LM's sanitize does: each row's bytes read as little-endian u32
/// words (the same nibble order), even rows the gate, odd rows the up projection.
fn fused_mxfp4_experts(vb: &Builder, cfg: &MoeConfig) -> std::result::Result<Builder, BuildError> {
    let (e, h, i) = (cfg.num_experts, cfg.hidden_size, cfg.intermediate_size);
    if h % 32 != 0 || i % 32 != 0 {
        return Err(BuildError::ConfigValue { key: "hidden_size", value: format!("{h} (intermediate {i})"), allowed: "multiples of 32 for MXFP4 experts" });
    }
    let fused = vb.pp("experts");
    let key = |name: &str| fused.key(name);
    let mut tensors = std::collections::HashMap::new();
    // Rows `rows` of (e, n, groups, 16) blocks as (e, rows.len(), groups * 4) words, and of the
    // (e, n, groups) scales.
    let rearrange = |name: &str, n: usize, cols: usize, pick: Option<usize>| -> std::result::Result<(Tensor, Tensor), BuildError> {
        let groups = cols / 32;
        let blocks = fused.get(&[e, n, groups, 16][..], &format!("{name}_blocks"))?;
        let scales = fused.get(&[e, n, groups][..], &format!("{name}_scales"))?;
        let (blocks, scales) = match pick {
            Some(at) => (blocks.reshape((e, n / 2, 2, groups * 16))?.narrow(2, at, 1)?, scales.reshape((e, n / 2, 2, groups))?.narrow(2, at, 1)?),
            None => (blocks, scales),
        };
        let rows = if pick.is_some() { n / 2 } else { n };
        let scales = scales.reshape((e, rows, groups))?.contiguous()?;
        if vb.is_shapes_only() {
            return Ok((Tensor::zeros((), DType::U32, blocks.device())?.broadcast_as((e, rows, groups * 4))?, scales));
        }
        let bytes = blocks.flatten_all()?.to_vec1::<u8>()?;
        let words: Vec<u32> = bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Ok((Tensor::from_vec(words, (e, rows, groups * 4), &lmx_core::Device::Cpu)?, scales))
    };
    for (name, at) in [("gate_proj", 0), ("up_proj", 1)] {
        let (w, s) = rearrange("gate_up_proj", 2 * i, h, Some(at))?;
        tensors.insert(key(&format!("{name}.weight")), w);
        tensors.insert(key(&format!("{name}.scales")), s);
    }
    let (w, s) = rearrange("down_proj", h, i, None)?;
    tensors.insert(key("down_proj.weight"), w);
    tensors.insert(key("down_proj.scales"), s);
    if cfg.bias {
        let b = fused.get(&[e, 2 * i][..], "gate_up_proj_bias")?;
        for (name, at) in [("gate_proj", 0), ("up_proj", 1)] {
            tensors.insert(key(&format!("{name}.bias")), b.reshape((e, i, 2))?.narrow(2, at, 1)?.squeeze(2)?.contiguous()?);
        }
        tensors.insert(key("down_proj.bias"), fused.get(&[e, h][..], "down_proj_bias")?);
    }
    let mxfp4 = lmx_io::QuantConfig::uniform(lmx_io::QuantSpec { bits: 4, group_size: 32 }, "mxfp4");
    Ok(vb.with_tensors(tensors).with_quantization(Some(mxfp4)))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use lmx_core::{DType, Device, Module, Result, Tensor};
    use lmx_io::Weights;

    use super::*;

    /// Deterministic values, uniform with standard deviation `std` (a fixed LCG: the gradient
    /// checks must not land on a routing tie by chance).
    fn values(shape: &[usize], std: f32, seed: u64) -> Result<Tensor> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * std * 3f32.sqrt()
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// The block's input gradient equals central differences, with the router's own path
    /// included (the kept experts' weights depend on the input through the router), for both
    /// routings, with and without biases.
    #[test]
    fn the_input_gradient_includes_the_router() -> Result<()> {
        let dev = Device::Cpu;
        let (h, i, e) = (8, 6, 4);
        let seed = std::cell::Cell::new(0u64);
        let t = |shape: &[usize], std: f32| {
            seed.set(seed.get() + 1);
            values(shape, std, seed.get())
        };
        for (routing, bias, normalize) in [(Routing::SoftmaxAll, false, true), (Routing::SoftmaxAll, false, false), (Routing::TopKSoftmax, true, false)] {
            let mut tensors = HashMap::from([("mlp.gate.weight".to_string(), t(&[e, h], 1.0)?)]);
            for (name, shape) in [("gate_proj", [e, i, h]), ("up_proj", [e, i, h]), ("down_proj", [e, h, i])] {
                tensors.insert(format!("mlp.switch_mlp.{name}.weight"), t(&shape, 0.5)?);
                if bias {
                    tensors.insert(format!("mlp.switch_mlp.{name}.bias"), t(&shape[..2], 0.5)?);
                }
            }
            if bias {
                tensors.insert("mlp.gate.bias".to_string(), t(&[e], 0.5)?);
            }
            let vb = Builder::new(Weights::from_tensors(tensors, "t"), DType::F32, &dev);
            let cfg = MoeConfig { routing, bias, ..MoeConfig::new(h, i, e, 2, normalize) };
            let moe = Moe::new(&vb.pp("mlp"), "gate", ["gate_proj", "up_proj", "down_proj"], &cfg).map_err(|e| lmx_core::Error::Msg(e.to_string()))?;
            let x = t(&[1, 5, h], 1.0)?;
            lmx_core::gradcheck::check_grad(|x| moe.forward(x), &x, 2e-2)?;
        }
        Ok(())
    }

    /// DeepSeek-V3's grouped sigmoid routing gives transformers' `DeepseekV3TopkRouter`
    /// choices and weights (8 experts in 4 groups, the best 2 groups, 3 experts per token,
    /// renormalized, scaled by 2.5; numbers from transformers 5.24), and its input gradient
    /// (the router's path included) equals central differences.
    #[test]
    fn grouped_sigmoid_routing_matches_transformers() -> Result<()> {
        let dev = Device::Cpu;
        #[rustfmt::skip]
        let w = [-0.076644f32, 0.359882, -0.782017, 0.071528, 0.664839, -0.28678, 1.620551, -1.596708, -0.051681, -0.305976, 0.248502, -0.222561, 0.913152, 0.204341, 0.573985, 0.416331, 0.261501, 0.931124, -0.514462, -1.651665, 1.046023, 0.522187, -0.166809, 0.053033, 0.563763, 2.256557, 1.86926, -1.195234, 0.997922, 0.45918, 2.436397, -0.146808];
        let bias = [0.277923f32, 0.244703, 0.148557, -0.049295, -0.203389, -0.317732, 0.224309, 0.071675];
        #[rustfmt::skip]
        let x = [-0.455424f32, 2.212418, -0.376986, -0.143684, -1.583494, 1.39601, -1.031888, 1.139089, 0.724746, 1.079544, 1.730247, -1.471268, -0.633628, -0.789338, -0.897733, -1.887572, 0.33604, 0.500926, 0.546641, -0.264441];
        let want: [[(usize, f32); 3]; 5] = [
            [(0, 0.873664), (6, 1.142876), (7, 0.48346)],
            [(0, 1.821193), (1, 0.015724), (2, 0.663082)],
            [(1, 0.831721), (6, 0.835439), (7, 0.83284)],
            [(0, 0.729759), (1, 0.998417), (2, 0.771824)],
            [(1, 0.76692), (6, 0.895564), (7, 0.837516)],
        ];
        let (h, i, e) = (4, 3, 8);
        let mut tensors =
            HashMap::from([("mlp.gate.weight".to_string(), Tensor::new(&w[..], &dev)?.reshape((e, h))?), ("mlp.gate.e_score_correction_bias".to_string(), Tensor::new(&bias[..], &dev)?)]);
        for (name, shape) in [("gate_proj", [e, i, h]), ("up_proj", [e, i, h]), ("down_proj", [e, h, i])] {
            tensors.insert(format!("mlp.switch_mlp.{name}.weight"), values(&shape, 0.5, 100 + shape[1] as u64)?);
        }
        tensors.insert("mlp.shared_experts.gate_proj.weight".to_string(), values(&[i, h], 0.5, 201)?);
        tensors.insert("mlp.shared_experts.up_proj.weight".to_string(), values(&[i, h], 0.5, 202)?);
        tensors.insert("mlp.shared_experts.down_proj.weight".to_string(), values(&[h, i], 0.5, 203)?);
        let vb = Builder::new(Weights::from_tensors(tensors, "t"), DType::F32, &dev);
        let cfg = MoeConfig { routing: Routing::GroupedSigmoid { groups: 4, topk_group: 2, scaling: 2.5 }, ..MoeConfig::new(h, i, e, 3, true) };
        let err = |e: BuildError| lmx_core::Error::Msg(e.to_string());
        let moe = Moe::new(&vb.pp("mlp"), "gate", ["gate_proj", "up_proj", "down_proj"], &cfg).map_err(err)?.with_shared_experts(&vb.pp("mlp"), h, i).map_err(err)?;
        let xs = Tensor::new(&x[..], &dev)?.reshape((5, h))?;
        let logits = xs.matmul(&Tensor::new(&w[..], &dev)?.reshape((e, h))?.t()?)?.to_vec2::<f32>()?;
        for (t, (mut got, want)) in moe.route(&logits).into_iter().zip(want).enumerate() {
            got.sort_by_key(|&(e, _)| e);
            for ((ge, gw), (we, ww)) in got.into_iter().zip(want) {
                assert_eq!(ge, we, "token {t}: experts");
                assert!((gw - ww).abs() < 2e-6, "token {t} expert {ge}: {gw} vs transformers' {ww}");
            }
        }
        lmx_core::gradcheck::check_grad(|x| moe.forward(x), &xs.unsqueeze(0)?, 2e-2)?;
        Ok(())
    }
}
