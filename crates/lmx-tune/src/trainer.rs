//! The training loop of `mlx_lm.lora` (`mlx_lm/tuner/trainer.py`): length-sorted batches
//! padded to a multiple of 32 (+1), masked cross-entropy averaged over trained tokens,
//! validation every `steps_per_eval`, reports every `steps_per_report`, adapters saved every
//! `save_every` steps and at the end.
//!
//! One deliberate difference: MLX LM's mask counts targets up to and including position
//! `length`, i.e. one padding token per sequence; lmx trains exactly the real tokens after the
//! prompt (`offset <= t < length`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use lmx::dist::Group;

use lmx::core::frozen::masked_cross_entropy;
use lmx::core::{Tensor, Var};
use lmx::{CausalLm, Logits};
use lmx_io::adapters::ADAPTER_FILE;
use lmx_nn::{GradSink, KvCache, Training};

use crate::optim::{Optimizer, OptimizerKind, Schedule};
use crate::TuneError;

/// Tokenized examples: token ids and the prompt offset (0 without `--mask-prompt`).
pub type Dataset = Vec<(Vec<u32>, usize)>;

/// One padded batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (rows, width) token ids, right-padded with 0.
    pub ids: Vec<u32>,
    /// Sequences in the batch.
    pub rows: usize,
    /// Padded length.
    pub width: usize,
    /// Real length of each sequence (after truncation).
    pub lengths: Vec<usize>,
    /// Prompt tokens of each sequence (not trained).
    pub offsets: Vec<usize>,
}

impl Batch {
    /// The rows data-parallel rank `rank` of `size` trains on: a balanced contiguous share,
    /// padded to the whole batch's width (so every row computes as it would in one process).
    pub fn share(&self, rank: usize, size: usize) -> Batch {
        let rows = lmx::dist::split_range(self.rows, 1, rank, size);
        Batch {
            ids: self.ids[rows.start * self.width..rows.end * self.width].to_vec(),
            rows: rows.len(),
            width: self.width,
            lengths: self.lengths[rows.clone()].to_vec(),
            offsets: self.offsets[rows].to_vec(),
        }
    }

    /// Targets counted in the loss.
    pub fn trained_tokens(&self) -> usize {
        self.lengths.iter().zip(&self.offsets).map(|(&l, &o)| l.saturating_sub(o.max(1))).sum()
    }
}

/// A seeded generator (splitmix64) for batch order.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// MLX LM's batching: examples sorted by length, cut into groups of `batch_size`; each group
/// padded to `1 + 32 * ceil(max_len / 32)` (at most `max_seq_length`), longer sequences
/// truncated. `warn` receives the truncation warning.
pub struct Batches<'a> {
    data: &'a Dataset,
    groups: Vec<Vec<usize>>,
    order: Vec<usize>,
    pos: usize,
    max_seq_length: usize,
    rng: Option<Rng>,
}

impl<'a> Batches<'a> {
    /// Batches over `data`; with a seed the group order is shuffled, and reshuffled each pass.
    pub fn new(data: &'a Dataset, batch_size: usize, max_seq_length: usize, seed: Option<u64>) -> Result<Self, TuneError> {
        if data.len() < batch_size {
            return Err(TuneError::TooFewExamples { examples: data.len(), batch_size });
        }
        let mut idx: Vec<usize> = (0..data.len()).collect();
        idx.sort_by_key(|&i| data[i].0.len());
        let groups: Vec<Vec<usize>> = idx.chunks_exact(batch_size).map(<[usize]>::to_vec).collect();
        let order = (0..groups.len()).collect();
        let mut b = Self { data, groups, order, pos: 0, max_seq_length, rng: seed.map(Rng) };
        b.reshuffle();
        Ok(b)
    }

    fn reshuffle(&mut self) {
        if let Some(rng) = &mut self.rng {
            rng.shuffle(&mut self.order);
        }
    }

    /// Batches in one pass.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// True when there is no batch.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The next batch, looping forever; the flag says some sequence was truncated.
    pub fn next_batch(&mut self) -> (Batch, Option<usize>) {
        if self.pos == self.order.len() {
            self.pos = 0;
            self.reshuffle();
        }
        let group = &self.groups[self.order[self.pos]];
        self.pos += 1;
        let longest = group.iter().map(|&i| self.data[i].0.len()).max().unwrap_or(0);
        let width = (1 + 32 * longest.div_ceil(32)).min(self.max_seq_length);
        let mut ids = vec![0u32; group.len() * width];
        let (mut lengths, mut offsets) = (Vec::new(), Vec::new());
        for (row, &i) in group.iter().enumerate() {
            let (tokens, offset) = &self.data[i];
            let n = tokens.len().min(width);
            ids[row * width..row * width + n].copy_from_slice(&tokens[..n]);
            lengths.push(n);
            offsets.push(*offset);
        }
        let truncated = (longest > self.max_seq_length).then_some(longest);
        (Batch { ids, rows: group.len(), width, lengths, offsets }, truncated)
    }
}

/// The masked mean cross-entropy of a batch and the number of trained tokens: logits of
/// `ids[:, :-1]` against `ids[:, 1:]`, counting target position t of a row iff
/// `offset <= t < length`. Whether layers are checkpointed (`--grad-checkpoint`) is the
/// model's training state's business.
pub fn batch_loss(model: &dyn CausalLm, batch: &Batch) -> lmx::core::Result<(Tensor, usize)> {
    let (rows, width) = (batch.rows, batch.width);
    let inputs: Vec<u32> = (0..rows).flat_map(|r| batch.ids[r * width..(r + 1) * width - 1].to_vec()).collect();
    let inputs = Tensor::from_vec(inputs, (rows, width - 1), model.device())?;
    // Logits only for the positions the loss counts (padding and masked prompts skip the
    // vocabulary projection, forward and backward).
    let (mut positions, mut targets) = (Vec::new(), Vec::new());
    for r in 0..rows {
        for t in 1..width {
            if t >= batch.offsets[r] && t < batch.lengths[r] {
                positions.push((r * (width - 1) + t - 1) as u32);
                targets.push(batch.ids[r * width + t]);
            }
        }
    }
    let ntoks = positions.len();
    if ntoks == 0 {
        return Ok((Tensor::zeros((), lmx::DType::F32, model.device())?, 0));
    }
    let positions = Tensor::from_vec(positions, ntoks, model.device())?;
    let logits = model.forward(&inputs, &mut KvCache::uncached(), Logits::Rows(positions))?.squeeze(0)?;
    let losses = masked_cross_entropy(&logits, &targets, &vec![1.0; ntoks])?;
    Ok(((losses.sum_all()? / ntoks as f64)?, ntoks))
}

/// Token-weighted mean loss over `num_batches` batches (all with `None`), in order.
pub fn evaluate(model: &dyn CausalLm, data: &Dataset, batch_size: usize, num_batches: Option<usize>, max_seq_length: usize) -> Result<f64, TuneError> {
    evaluate_in(model, data, batch_size, num_batches, max_seq_length, None)
}

/// [`evaluate`] as one rank of a data-parallel `group`: each rank scores its share of every
/// batch and the sums are added up over the ranks.
pub fn evaluate_in(model: &dyn CausalLm, data: &Dataset, batch_size: usize, num_batches: Option<usize>, max_seq_length: usize, group: Option<&dyn Group>) -> Result<f64, TuneError> {
    let mut batches = Batches::new(data, batch_size, max_seq_length, None)?;
    let n = num_batches.map_or(batches.len(), |n| n.min(batches.len()));
    let (mut total, mut tokens) = (0.0, 0usize);
    for _ in 0..n {
        let (batch, _) = batches.next_batch();
        let batch = match group {
            Some(g) => batch.share(g.rank(), g.size()),
            None => batch,
        };
        let (loss, ntoks) = lmx_generate::compute_pool().install(|| batch_loss(model, &batch))?;
        total += f64::from(loss.to_scalar::<f32>()?) * ntoks as f64;
        tokens += ntoks;
    }
    if let Some(g) = group {
        let sums = g.all_sum(&Tensor::new(&[total, tokens as f64], &lmx::core::Device::Cpu)?)?.to_vec1::<f64>()?;
        (total, tokens) = (sums[0], sums[1] as usize);
    }
    Ok(total / tokens.max(1) as f64)
}

/// The other ranks wait for rank 0 to write a checkpoint (a full fine-tune's can take minutes;
/// their next collective would time out on it).
fn after_write(dp: Option<&dyn Group>) -> lmx::core::Result<()> {
    match dp {
        Some(g) => g.barrier(lmx::dist::Wait::For(std::time::Duration::from_secs(1800))),
        None => Ok(()),
    }
}

/// The gradients of every rank of `group` summed, in one collective: flattened into one
/// vector (with a flag per tensor saying whether a rank had a gradient for it) and split
/// again. A tensor no rank has a gradient for stays `None`.
fn all_sum_gradients(group: &dyn Group, vars: &[&Var], grads: Vec<Option<Tensor>>) -> lmx::core::Result<Vec<Option<Tensor>>> {
    let cpu = lmx::core::Device::Cpu;
    let mut parts = Vec::with_capacity(vars.len() + 1);
    let flags: Vec<f32> = grads.iter().map(|g| if g.is_some() { 1.0 } else { 0.0 }).collect();
    parts.push(Tensor::new(flags.as_slice(), &cpu)?);
    for (v, g) in vars.iter().zip(&grads) {
        parts.push(match g {
            Some(g) => g.to_device(&cpu)?.to_dtype(lmx::DType::F32)?.flatten_all()?,
            None => Tensor::zeros(v.as_tensor().elem_count(), lmx::DType::F32, &cpu)?,
        });
    }
    let sum = group.all_sum(&Tensor::cat(&parts, 0)?)?;
    let flags = sum.narrow(0, 0, vars.len())?.to_vec1::<f32>()?;
    let mut at = vars.len();
    let mut out = Vec::with_capacity(vars.len());
    for (v, flag) in vars.iter().zip(flags) {
        let t = v.as_tensor();
        let n = t.elem_count();
        let g = sum.narrow(0, at, n)?;
        at += n;
        out.push(if flag > 0.0 { Some(g.reshape(t.shape())?.to_dtype(t.dtype())?.to_device(t.device())?) } else { None });
    }
    Ok(out)
}

/// Training settings (MLX LM's `TrainingArgs` and optimizer choice).
#[derive(Debug, Clone)]
pub struct TrainArgs {
    /// Sequences per batch.
    pub batch_size: usize,
    /// Optimizer updates.
    pub iters: usize,
    /// Validation batches per evaluation (None: the whole set).
    pub val_batches: Option<usize>,
    /// Steps between reports.
    pub steps_per_report: usize,
    /// Steps between validations.
    pub steps_per_eval: usize,
    /// Steps between adapter checkpoints.
    pub save_every: usize,
    /// Longest sequence; longer ones are truncated with a warning.
    pub max_seq_length: usize,
    /// Batches whose gradients are summed (then averaged) per update.
    pub grad_accumulation_steps: usize,
    /// Seed of the batch order.
    pub seed: u64,
    /// Learning rate schedule.
    pub schedule: Schedule,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Where adapters.safetensors and the checkpoints go.
    pub adapter_dir: PathBuf,
    /// Recompute trained layers in the backward pass instead of keeping their activations.
    pub grad_checkpoint: bool,
    /// The adapter folder's `adapter_config.json`, written with every save of the weights.
    pub config: Option<lmx_io::adapters::AdapterConfig>,
    /// The data-parallel world this process is one rank of (`lmx launch`): each rank trains
    /// on its share of every batch's rows, the gradients are summed over the ranks weighted
    /// by trained tokens (so an update equals one process's on the whole batch), and rank 0
    /// alone writes the adapters.
    pub data_parallel: Option<Arc<dyn Group>>,
}

/// What the loop reports as it runs.
#[derive(Debug, Clone)]
pub enum Event {
    /// Every `steps_per_report` steps.
    Train { it: usize, loss: f64, lr: f64, it_per_sec: f64, tokens_per_sec: f64, trained_tokens: usize, peak_memory: u64 },
    /// Validation loss.
    Val { it: usize, loss: f64, seconds: f64 },
    /// Adapters written.
    Saved { it: usize, path: PathBuf },
    /// A batch had a sequence longer than `max_seq_length`.
    Truncated { longest: usize, max: usize },
    /// One step done (for a progress bar).
    Step { it: usize },
}

/// Saves the trained tensors to `path` atomically; NaN or infinite values are refused
/// (nothing is written over a good file).
pub fn save_adapters(vars: &[(String, Var)], path: &Path) -> Result<(), TuneError> {
    stage_adapters(vars, path)?.commit()?;
    lmx_io::safetensors_io::sync_parent(path);
    Ok(())
}

/// [`save_adapters`] staged: written and synced under a temporary name, not yet in place.
fn stage_adapters(vars: &[(String, Var)], path: &Path) -> Result<lmx_io::safetensors_io::Staged, TuneError> {
    if let Some(key) = first_non_finite(vars)? {
        return Err(TuneError::NonFiniteWeights { key, path: path.to_path_buf() });
    }
    let map = lmx_nn::training::checkpoint_tensors(vars)?;
    Ok(lmx_io::safetensors_io::stage_safetensors(&map, path)?)
}

/// The first tensor holding a NaN or an infinity.
fn first_non_finite(vars: &[(String, Var)]) -> lmx::core::Result<Option<String>> {
    for (k, v) in vars {
        if !lmx::core::ops::all_finite(&v.as_tensor().detach())? {
            return Ok(Some(k.clone()));
        }
    }
    Ok(None)
}

/// Saves the adapters and, with them, the adapter folder's config (created on the first save,
/// so a run that fails before it leaves no folder, and never a config without its weights).
/// Both are written and synced under temporary names first, then renamed one right after the
/// other: a kill leaves the previous pair or the new one.
fn save_checkpoint(vars: &[(String, Var)], args: &TrainArgs, path: &Path) -> Result<(), TuneError> {
    std::fs::create_dir_all(&args.adapter_dir).map_err(|e| lmx_io::IoError::io(&args.adapter_dir, e))?;
    let weights = stage_adapters(vars, path)?;
    let config = args.config.as_ref().map(|c| lmx_io::adapters::stage_config(&args.adapter_dir, c)).transpose()?;
    weights.commit()?;
    if let Some(config) = config {
        config.commit()?;
    }
    lmx_io::safetensors_io::sync_parent(path);
    Ok(())
}

/// The gradients of `vars` from `loss`; with checkpointing, those of recomputed layers come
/// from its `sink`. A tensor the loss does not reach (an expert's adapter when no token of the
/// batch was routed to that expert) gets a zero gradient, as in MLX's `value_and_grad`, so
/// that the optimizer's moments and weight decay move it as MLX LM's stacked tensors move.
pub fn gradients(loss: &Tensor, vars: &[&Var], sink: Option<&GradSink>) -> lmx::core::Result<Vec<Option<Tensor>>> {
    let grads = loss.backward()?;
    // Detached: a gradient computed from taped tensors records its own graph, which the
    // optimizer state would otherwise keep alive (and chain) from step to step.
    vars.iter()
        .map(|v| match add_grads(grads.get(v.as_tensor()).map(Tensor::detach), sink.and_then(|s| s.take(v)))? {
            Some(g) => Ok(Some(g)),
            None => Ok(Some(v.as_tensor().zeros_like()?)),
        })
        .collect()
}

/// The sum of two optional gradients of one tensor.
fn add_grads(a: Option<Tensor>, b: Option<Tensor>) -> lmx::core::Result<Option<Tensor>> {
    match (a, b) {
        (Some(a), Some(b)) => Ok(Some((a + b)?)),
        (a, b) => Ok(a.or(b)),
    }
}

/// Switches a model's training state back to evaluation when dropped.
struct EvaluationOnDrop<'a>(&'a Training);

impl Drop for EvaluationOnDrop<'_> {
    fn drop(&mut self) {
        self.0.set_active(false);
    }
}

/// Trains the tensors registered in `training` (those of `model`) on `train`, validating on `valid`.
/// A non-finite loss or gradient stops training before the bad update: the adapters from the
/// last good step are saved and the error says where.
pub fn train(model: &dyn CausalLm, training: &Training, train: &Dataset, valid: Option<&Dataset>, args: &TrainArgs, on_event: &mut dyn FnMut(Event)) -> Result<(), TuneError> {
    // Whatever way training ends, later forwards of the model are evaluation ones again
    // (no dropout, no checkpointing, the caller's KV cache used).
    let _evaluation_on_exit = EvaluationOnDrop(training);
    let named = training.trainables();
    if named.is_empty() {
        return Err(TuneError::NothingToTrain);
    }
    let vars: Vec<&Var> = named.iter().map(|(_, v)| v).collect();
    let dp = args.data_parallel.as_deref().filter(|g| g.size() > 1);
    if let Some(g) = dp {
        if args.batch_size < g.size() {
            return Err(TuneError::Setting {
                key: "batch_size".into(),
                msg: format!("{} is smaller than the {} data-parallel ranks of lmx launch (each rank trains on a share of every batch)", args.batch_size, g.size()),
            });
        }
    }
    // Rank 0 alone writes files; the other ranks hold the same weights.
    let writes = dp.is_none_or(|g| g.rank() == 0);
    let sink = args.grad_checkpoint.then(|| training.enable_checkpointing().sink);
    let mut optimizer = Optimizer::new(args.optimizer.clone(), vars.len());
    let mut batches = Batches::new(train, args.batch_size, args.max_seq_length, Some(args.seed))?;
    let final_path = args.adapter_dir.join(ADAPTER_FILE);
    let accum = args.grad_accumulation_steps.max(1);
    let mut pending: Option<Vec<Option<Tensor>>> = None;
    let (mut losses, mut steps, mut n_tokens, mut trained_tokens, mut train_time) = (0.0, 0usize, 0usize, 0usize, 0.0);
    let mut warned = false;
    for it in 1..=args.iters {
        if let Some(valid) = valid {
            if it == 1 || it % args.steps_per_eval.max(1) == 0 || it == args.iters {
                let tic = Instant::now();
                training.set_active(false);
                let loss = evaluate_in(model, valid, args.batch_size, args.val_batches, args.max_seq_length, dp)?;
                on_event(Event::Val { it, loss, seconds: tic.elapsed().as_secs_f64() });
            }
        }
        let tic = Instant::now();
        let (batch, truncated) = batches.next_batch();
        if let (Some(longest), false) = (truncated, warned) {
            on_event(Event::Truncated { longest, max: args.max_seq_length });
            warned = true;
        }
        let batch = match dp {
            Some(g) => batch.share(g.rank(), g.size()),
            None => batch,
        };
        training.set_active(true);
        let (loss, grads) = lmx_generate::compute_pool().install(|| -> lmx::core::Result<_> {
            let (loss, ntoks) = batch_loss(model, &batch)?;
            let (value, loss) = match dp {
                None => {
                    n_tokens += ntoks;
                    (f64::from(loss.to_scalar::<f32>()?), loss)
                }
                Some(g) => {
                    // The whole batch's mean: every rank's token-weighted share of it.
                    let local = Tensor::new(&[f64::from(loss.to_scalar::<f32>()?) * ntoks as f64, ntoks as f64], &lmx::core::Device::Cpu)?;
                    let sums = g.all_sum(&local)?.to_vec1::<f64>()?;
                    n_tokens += sums[1] as usize;
                    (sums[0] / sums[1].max(1.0), (loss * (ntoks as f64 / sums[1].max(1.0)))?)
                }
            };
            // Every rank sees the same value, so all compute (and sum) gradients or none do.
            let grads = if value.is_finite() {
                let g = gradients(&loss, &vars, sink.as_deref())?;
                Some(match dp {
                    Some(group) => all_sum_gradients(group, &vars, g)?,
                    None => g,
                })
            } else {
                None
            };
            Ok((value, grads))
        })?;
        let bad = match &grads {
            None => true,
            Some(g) => g.iter().flatten().map(|g| g.sqr().and_then(|s| s.sum_all()).and_then(|s| s.to_scalar::<f32>())).any(|s| s.map_or(true, |s| !s.is_finite())),
        };
        if bad {
            // The weights are those of the last good step unless an update itself overflowed.
            let saved = first_non_finite(&named)?.is_none();
            if saved && writes {
                save_checkpoint(&named, args, &final_path)?;
            }
            return Err(TuneError::NonFinite { it, loss, path: final_path, saved });
        }
        let grads = grads.unwrap_or_default();
        pending = Some(match pending.take() {
            None => grads,
            Some(prev) => prev.into_iter().zip(grads).map(|(a, b)| add_grads(a, b)).collect::<lmx::core::Result<_>>()?,
        });
        if it % accum == 0 {
            let mut g = pending.take().unwrap_or_default();
            if accum > 1 {
                g = g.into_iter().map(|t| t.map(|t| t / accum as f64).transpose()).collect::<lmx::core::Result<_>>()?;
            }
            let lr = args.schedule.at(optimizer.step());
            lmx_generate::compute_pool().install(|| optimizer.update(&vars, &g, lr))?;
        }
        losses += loss;
        steps += 1;
        train_time += tic.elapsed().as_secs_f64();
        on_event(Event::Step { it });
        if it % args.steps_per_report.max(1) == 0 || it == args.iters {
            trained_tokens += n_tokens;
            on_event(Event::Train {
                it,
                loss: losses / steps as f64,
                lr: args.schedule.at(optimizer.step()),
                it_per_sec: steps as f64 / train_time,
                tokens_per_sec: n_tokens as f64 / train_time,
                trained_tokens,
                peak_memory: lmx_generate::peak_memory_bytes(),
            });
            (losses, steps, n_tokens, train_time) = (0.0, 0, 0, 0.0);
        }
        if args.save_every > 0 && it % args.save_every == 0 {
            let checkpoint = args.adapter_dir.join(format!("{it:07}_adapters.safetensors"));
            if writes {
                save_checkpoint(&named, args, &final_path)?;
                save_adapters(&named, &checkpoint)?;
            }
            after_write(dp)?;
            on_event(Event::Saved { it, path: checkpoint });
        }
    }
    if writes {
        save_checkpoint(&named, args, &final_path)?;
    }
    after_write(dp)?;
    on_event(Event::Saved { it: args.iters, path: final_path });
    Ok(())
}
