//! The mixture-of-experts feed-forward block (Qwen3-MoE, Qwen2-MoE, Mixtral): a linear router
//! scores every expert per token, the top k are kept (softmax over all experts, then the k
//! largest, renormalized where the model asks), and the block's output is the kept experts'
//! gated-MLP outputs weighted by those scores.
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
        MoeConfig { hidden_size, intermediate_size: self.moe_intermediate_size, num_experts: self.experts(), top_k: self.num_experts_per_tok, normalize: self.norm_topk_prob }
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
    /// On several ranks (tensor or expert parallel): the group whose ranks' partial outputs
    /// are summed, once per block.
    reduce: Option<Arc<dyn Group>>,
    /// An expert every token takes (Qwen2-MoE's `shared_expert`), weighted by the sigmoid
    /// of its own gate (`shared_expert_gate`).
    shared: Option<(Mlp, Linear)>,
}

impl Moe {
    /// Reads the router at `vb.pp(gate)` and the experts under `vb`: MLX's `switch_mlp`
    /// (`gate_proj`, `up_proj`, `down_proj`) when the checkpoint has it, else Hugging Face's
    /// `experts.{e}` with its projections named `hf_names` (`[gate, up, down]`).
    pub fn new(vb: &Builder, gate: &str, hf_names: [&str; 3], cfg: &MoeConfig) -> std::result::Result<Self, BuildError> {
        if cfg.top_k == 0 || cfg.top_k > cfg.num_experts {
            return Err(BuildError::ConfigValue { key: "num_experts_per_tok", value: cfg.top_k.to_string(), allowed: "it must be between 1 and the number of experts" });
        }
        let gate = vb.pp(gate).linear(cfg.hidden_size, cfg.num_experts, Bias::No, Shard::Replicated)?;
        let switch = vb.pp("switch_mlp");
        let stacked = switch.pp("gate_proj").has("weight");
        // Expert parallelism: rank r of n owns experts r, r + n, ... whole.
        let group = vb.group().clone();
        let (ep, rank, ranks) = (vb.expert_parallel() && group.size() > 1, group.rank(), group.size());
        let experts = (0..cfg.num_experts)
            .map(|e| {
                let (expert, names) = if stacked { (switch.expert(e, cfg.num_experts), ["gate_proj", "up_proj", "down_proj"]) } else { (vb.pp("experts").pp(e), hf_names) };
                if ep && e % ranks != rank {
                    if !stacked {
                        expert.skip();
                    }
                    return Ok(None);
                }
                // Tensor parallel: each expert's share of the features, its down projection's
                // partial sums added up with the others' in the block's one all-sum.
                let expert = if ep { expert.local() } else { expert.unreduced() };
                Mlp::with_names(&expert, names, cfg.hidden_size, cfg.intermediate_size, Bias::No, Activation::Silu).map(Some)
            })
            .collect::<std::result::Result<_, _>>()?;
        if ep && stacked {
            // A rank may own none of the experts (more ranks than experts): reading no slice
            // of the stacked tensors is expected.
            switch.skip();
        }
        Ok(Self { gate, experts, top_k: cfg.top_k, normalize: cfg.normalize, reduce: (ranks > 1).then_some(group), shared: None })
    }

    /// Adds the expert every token takes: `shared_expert` (an MLP of `intermediate_size`
    /// features, split over a tensor-parallel group like a dense one, also under expert
    /// parallelism) weighted by `sigmoid(shared_expert_gate(x))`.
    pub fn with_shared_expert(mut self, vb: &Builder, hidden_size: usize, intermediate_size: usize) -> std::result::Result<Self, BuildError> {
        let mlp = Mlp::new(&vb.pp("shared_expert"), hidden_size, intermediate_size, Bias::No, Activation::Silu)?;
        let gate = vb.pp("shared_expert_gate").linear(hidden_size, 1, Bias::No, Shard::Replicated)?;
        self.shared = Some((mlp, gate));
        Ok(self)
    }

    /// Each token's kept experts and their weights, from the router's logits (one row per
    /// token): softmax in f32 over all experts, the k largest (the lower index first among
    /// equals), divided by their sum when the model normalizes.
    fn route(&self, logits: &[Vec<f32>]) -> Vec<Vec<(usize, f32)>> {
        logits
            .iter()
            .map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
                let total: f32 = e.iter().sum();
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_by(|&a, &b| e[b].total_cmp(&e[a]).then(a.cmp(&b)));
                let mut kept: Vec<(usize, f32)> = order[..self.top_k].iter().map(|&i| (i, e[i] / total)).collect();
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
        let logits = self.gate.forward(&xs)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        if logits.len() == 1 {
            return self.forward_token(x, &xs, &logits);
        }
        // Tokens (and their weights) per expert, experts in index order: the order in which
        // transformers adds the experts' outputs.
        let mut routed: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (token, kept) in self.route(&logits).into_iter().enumerate() {
            for (e, w) in kept {
                routed[e].0.push(token as u32);
                routed[e].1.push(w);
            }
        }
        let mut out = Tensor::zeros(xs.dims(), DType::F32, xs.device())?;
        for (expert, (tokens, weights)) in self.experts.iter().zip(&routed) {
            let Some(expert) = expert.as_ref().filter(|_| !tokens.is_empty()) else { continue };
            let ids = Tensor::new(tokens.as_slice(), xs.device())?;
            let y = expert.forward(&xs.index_select(&ids, 0)?.unsqueeze(0)?)?.squeeze(0)?;
            let w = Tensor::new(weights.as_slice(), xs.device())?.unsqueeze(1)?;
            out = out.index_add(&ids, &y.to_dtype(DType::F32)?.broadcast_mul(&w)?, 0)?;
        }
        self.finish(out, x)
    }
}

impl Moe {
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
            Some((mlp, gate)) => {
                let g = (gate.forward(x)?.neg()?.exp()? + 1.0)?.recip()?;
                out + g.broadcast_mul(&mlp.forward(x)?)?
            }
            None => Ok(out),
        }
    }
}
