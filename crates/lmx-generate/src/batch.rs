//! Continuous batching (MLX LM's `BatchGenerator` and `batch_generate`): sequences of
//! different lengths decode together, one token each per step, each at its own position with
//! its own cache, sampler, logits processors and stop rules; sequences join and leave between
//! steps.
//!
//! A step prefills the sequences that joined (all but their last prompt token, one sequence
//! at a time), then runs every sequence's next token in one forward pass (the projections
//! and MLP as one product over the batch: the weights are read once for all of them). Each sequence keeps its own
//! [`PromptCache`] (growing, rotating or quantized: quantized caches batch too), so its output
//! is the one it would have alone.

use lmx_io::Tokenizer;
use lmx_models::CausalLm;
use lmx_nn::KvCache;

use crate::generate::{run_drawn, Drawn, Sequence};
use crate::{FinishReason, GenerateError, GenerateParams, GenerationResponse, PromptCache};

/// Identifies a sequence in a [`BatchGenerator`].
pub type SequenceId = u64;

enum State {
    /// Waiting for its prompt to be processed.
    Prompt(Vec<u32>),
    /// Its next token, to run in the next step.
    Pending(u32),
}

struct Slot<'a> {
    id: SequenceId,
    seq: Sequence<'a>,
    cache: PromptCache,
    state: State,
}

/// What a sequence does after a step: decode its sampled token next, or leave the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Run this token in the next step.
    Token(u32),
    /// It finished (EOS, a stop string, its length).
    Finished,
    /// Its sampling failed (see [`BatchGenerator::take_failures`]).
    Failed,
}

/// Decodes many sequences together; see the module documentation.
pub struct BatchGenerator<'a> {
    model: &'a dyn CausalLm,
    tokenizer: &'a Tokenizer,
    slots: Vec<Slot<'a>>,
    /// Most sequences decoding at once (MLX LM's `completion_batch_size`); more wait.
    max_batch: usize,
    next_id: SequenceId,
    /// Caches of finished sequences, kept when `keep_caches` is set.
    finished: Vec<(SequenceId, PromptCache)>,
    keep_caches: bool,
    /// Sequences that failed alone in a step (see [`BatchGenerator::take_failures`]).
    failures: Vec<(SequenceId, GenerateError)>,
    /// Steps of a lone sequence recorded as a CUDA graph, where the device can.
    graph: Option<crate::graph_steps::GraphSteps>,
}

impl<'a> BatchGenerator<'a> {
    /// A generator decoding at most `max_batch` sequences at once.
    pub fn new(model: &'a dyn CausalLm, tokenizer: &'a Tokenizer, max_batch: usize) -> Self {
        let graph = crate::graph_steps::GraphSteps::new(model);
        Self { model, tokenizer, slots: Vec::new(), max_batch: max_batch.max(1), next_id: 0, finished: Vec::new(), keep_caches: false, failures: Vec::new(), graph }
    }

    /// Keeps each finished sequence's cache for [`BatchGenerator::take_cache`] (a server's
    /// prompt cache); otherwise it is dropped when the sequence ends.
    pub fn keep_caches(mut self, yes: bool) -> Self {
        self.keep_caches = yes;
        self
    }

    /// Adds a sequence: `prompt` (whole; the prefix `cache` already holds is reused),
    /// generated with `params`. The prompt is checked now and processed in the next step (or
    /// a later one, while `max_batch` sequences are decoding).
    pub fn insert(&mut self, prompt: &[u32], params: GenerateParams, cache: PromptCache) -> Result<SequenceId, GenerateError> {
        let seq = Sequence::new(self.tokenizer, prompt, params);
        seq.check(self.model, prompt)?;
        let id = self.next_id;
        self.next_id += 1;
        self.slots.push(Slot { id, seq, cache, state: State::Prompt(prompt.to_vec()) });
        Ok(id)
    }

    /// Sequences not finished (decoding or waiting).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether every sequence has finished.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Bytes held by the key/value caches of the unfinished sequences.
    pub fn cache_nbytes(&self) -> usize {
        self.slots.iter().map(|s| s.cache.nbytes()).sum()
    }

    /// Stops sequence `id` now (a client went away) and returns its cache.
    pub fn remove(&mut self, id: SequenceId) -> Result<PromptCache, GenerateError> {
        let i = self.slots.iter().position(|s| s.id == id).ok_or(GenerateError::UnknownSequence(id))?;
        Ok(self.slots.remove(i).cache)
    }

    /// The cache of finished sequence `id`, when [`BatchGenerator::keep_caches`] is set.
    pub fn take_cache(&mut self, id: SequenceId) -> Option<PromptCache> {
        let i = self.finished.iter().position(|(f, _)| *f == id)?;
        Some(self.finished.remove(i).1)
    }

    /// One step: the prompts of waiting sequences while there is room (all but their last
    /// token, one sequence at a time), then every sequence's next token in one batched
    /// forward pass. Returns one response per sequence that produced a token; a response
    /// with a `finish_reason` is its sequence's last. A sequence whose sampling fails (its
    /// constraint) leaves the batch and is reported by [`BatchGenerator::take_failures`];
    /// an error here fails the whole step.
    pub fn step(&mut self) -> Result<Vec<(SequenceId, GenerationResponse)>, GenerateError> {
        let ran = self.forward()?;
        let context = self.model.max_position_embeddings();
        let mut responses = Vec::with_capacity(ran.len());
        let mut outcome = Vec::with_capacity(ran.len());
        for (i, drawn) in ran {
            let slot = &mut self.slots[i];
            match slot.seq.take(drawn, slot.cache.tokens.len(), context) {
                Ok((response, next)) => {
                    outcome.push((slot.id, next.map_or(Next::Finished, Next::Token)));
                    responses.push((slot.id, response));
                }
                // One sequence's failure (its grammar) ends it alone.
                Err(e) => {
                    outcome.push((slot.id, Next::Failed));
                    self.failures.push((slot.id, e));
                }
            }
        }
        for (id, next) in outcome {
            self.follow(id, next)?;
        }
        Ok(responses)
    }

    /// A step that runs the same forward passes as [`BatchGenerator::step`] and samples
    /// nothing: on a rank that computes its shard of the model while another rank samples
    /// (`lmx serve` under `lmx launch`). The sampling rank's choices then come through
    /// [`BatchGenerator::follow`]. Returns the sequences that ran.
    pub fn step_unsampled(&mut self) -> Result<Vec<SequenceId>, GenerateError> {
        let ran = self.forward()?;
        Ok(ran.into_iter().map(|(i, _)| self.slots[i].id).collect())
    }

    /// Sets what sequence `id` does after the step that just ran it: decode `Token(t)` next,
    /// or leave the batch (a finished sequence's cache is kept when
    /// [`BatchGenerator::keep_caches`] is set).
    pub fn follow(&mut self, id: SequenceId, next: Next) -> Result<(), GenerateError> {
        let i = self.slots.iter().position(|s| s.id == id).ok_or(GenerateError::UnknownSequence(id))?;
        match next {
            Next::Token(t) => self.slots[i].state = State::Pending(t),
            Next::Finished => {
                let slot = self.slots.remove(i);
                if self.keep_caches {
                    self.finished.push((slot.id, slot.cache));
                }
            }
            Next::Failed => {
                self.slots.remove(i);
            }
        }
        Ok(())
    }

    /// The forward passes of a step: the waiting prompts while there is room, then the
    /// batch of every sequence's pending token. Returns the slots that ran, each with its
    /// logits or its device-picked token (none when no sequence has a token to run).
    fn forward(&mut self) -> Result<Vec<(usize, Drawn)>, GenerateError> {
        let decoding = self.slots.iter().filter(|s| matches!(s.state, State::Pending(_))).count();
        let mut room = self.max_batch.saturating_sub(decoding);
        for slot in &mut self.slots {
            if room == 0 {
                break;
            }
            if let State::Prompt(prompt) = &slot.state {
                let prompt = prompt.clone();
                slot.state = State::Pending(slot.seq.prefill(self.model, &mut slot.cache, &prompt)?);
                room -= 1;
            }
        }
        let batch: Vec<(usize, u32)> = self.slots.iter().enumerate().filter_map(|(i, s)| if let State::Pending(t) = s.state { Some((i, t)) } else { None }).collect();
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if let (Some(g), &[(i, t)]) = (&mut self.graph, &batch[..]) {
            // One sequence decoding: its step replayed as a graph where it can be.
            let pick = self.slots[i].seq.device_pick();
            if let Some(drawn) = g.step(self.model, &mut self.slots[i].cache.kv, t, pick.as_deref())? {
                self.slots[i].cache.tokens.push(t);
                return Ok(vec![(i, drawn)]);
            }
        }
        let caches = batch.iter().map(|&(i, _)| std::mem::replace(&mut self.slots[i].cache.kv, KvCache::uncached())).collect();
        let mut kv = KvCache::batch(caches);
        let rows: Vec<[u32; 1]> = batch.iter().map(|&(_, t)| [t]).collect();
        let rows: Vec<&[u32]> = rows.iter().map(|r| &r[..]).collect();
        let picks: Vec<_> = batch.iter().map(|&(i, _)| self.slots[i].seq.device_pick()).collect();
        let result = run_drawn(self.model, &mut kv, &rows, &picks);
        // Every sequence gets its cache back before the result is looked at.
        for (&(i, _), c) in batch.iter().zip(kv.unbatch()) {
            self.slots[i].cache.kv = c;
        }
        let result = result?;
        for &(i, t) in &batch {
            self.slots[i].cache.tokens.push(t);
        }
        Ok(batch.into_iter().map(|(i, _)| i).zip(result).collect())
    }

    /// Sequences that failed in the steps so far (each left the batch), with why; taken.
    pub fn take_failures(&mut self) -> Vec<(SequenceId, GenerateError)> {
        std::mem::take(&mut self.failures)
    }
}

/// One sequence's result from [`batch_generate`].
#[derive(Debug, Clone)]
pub struct BatchOutput {
    /// The generated text.
    pub text: String,
    /// The generated token ids (the EOS token included on a `Stop` finish).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish_reason: Option<FinishReason>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
}

/// Generates for every prompt (token ids) in continuous batches of at most `max_batch`, each
/// with `params` and a cache made by `new_cache`; calls `progress` with each step's responses.
/// Results are in the order of `prompts`.
pub fn batch_generate(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    max_batch: usize,
    mut new_cache: impl FnMut() -> Result<PromptCache, GenerateError>,
    mut progress: impl FnMut(&[(SequenceId, GenerationResponse)]),
) -> Result<Vec<BatchOutput>, GenerateError> {
    let mut gen = BatchGenerator::new(model, tokenizer, max_batch);
    let mut outputs: Vec<BatchOutput> = prompts.iter().map(|p| BatchOutput { text: String::new(), tokens: Vec::new(), finish_reason: None, prompt_tokens: p.len() }).collect();
    if params.max_tokens == 0 {
        return Ok(outputs);
    }
    let mut ids = Vec::with_capacity(prompts.len());
    for p in prompts {
        ids.push(gen.insert(p, params.clone(), new_cache()?)?);
    }
    while !gen.is_empty() {
        let responses = gen.step()?;
        if let Some((_, e)) = gen.take_failures().into_iter().next() {
            return Err(e);
        }
        progress(&responses);
        for (id, r) in responses {
            let o = &mut outputs[ids.iter().position(|&i| i == id).expect("ids come from insert")];
            o.text.push_str(&r.text);
            o.tokens.push(r.token);
            o.finish_reason = r.finish_reason;
        }
    }
    Ok(outputs)
}
