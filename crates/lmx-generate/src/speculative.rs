//! Speculative decoding (MLX LM's `speculative_generate_step`): a small draft model of the
//! same vocabulary proposes `num_draft_tokens` tokens one at a time, the model scores them all
//! in one forward pass, and the tokens it would itself have chosen are kept up to the first
//! one it would not, which it replaces with its own; when it agrees with every draft token it
//! adds one more. MLX LM's acceptance rule: a draft token is accepted when the model's sampled
//! token (same sampler, same logits processors) equals it, so greedy output is the model's
//! own. Both caches then forget the rejected positions.

use std::collections::VecDeque;

use lmx_io::Tokenizer;
use lmx_models::CausalLm;

use crate::generate::{run, run_last, Sequence};
use crate::{GenerateError, GenerateParams, GenerationResponse, PromptCache, Sampler};

/// Draft statistics of a [`SpeculativeStream`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DraftStats {
    /// Draft tokens proposed.
    pub drafted: usize,
    /// Draft tokens the model accepted.
    pub accepted: usize,
    /// Verification passes of the model.
    pub rounds: usize,
}

/// The iterator [`speculative_generate`] returns: one response per token, as
/// [`crate::stream_generate`]'s, with `from_draft` set on accepted draft tokens.
pub struct SpeculativeStream<'a> {
    model: &'a dyn CausalLm,
    draft: &'a dyn CausalLm,
    cache: &'a mut PromptCache,
    draft_cache: &'a mut PromptCache,
    seq: Sequence<'a>,
    draft_sampler: Sampler,
    num_draft: usize,
    prompt: Option<Vec<u32>>,
    queue: VecDeque<GenerationResponse>,
    done: bool,
    stats: DraftStats,
}

/// Generates from `prompt` with `model`, drafting `num_draft_tokens` at a time with `draft`
/// (each model with its own cache; a prefix either cache already holds is reused).
#[allow(clippy::too_many_arguments)]
pub fn speculative_generate<'a>(
    model: &'a dyn CausalLm,
    draft: &'a dyn CausalLm,
    tokenizer: &'a Tokenizer,
    prompt: &[u32],
    cache: &'a mut PromptCache,
    draft_cache: &'a mut PromptCache,
    params: GenerateParams,
    num_draft_tokens: usize,
) -> SpeculativeStream<'a> {
    SpeculativeStream {
        model,
        draft,
        cache,
        draft_cache,
        draft_sampler: Sampler::new(params.sampler.clone()),
        seq: Sequence::new(tokenizer, prompt, params),
        num_draft: num_draft_tokens,
        prompt: Some(prompt.to_vec()),
        queue: VecDeque::new(),
        done: false,
        stats: DraftStats::default(),
    }
}

impl SpeculativeStream<'_> {
    /// Draft tokens proposed and accepted so far.
    pub fn stats(&self) -> DraftStats {
        self.stats
    }

    fn check(&self) -> Result<(), GenerateError> {
        let (v, dv) = (self.model.vocab_size(), self.draft.vocab_size());
        if v != dv {
            return Err(GenerateError::Draft(format!("the draft model's vocabulary has {dv} tokens but the model's {v}; a draft model must share the model's tokenizer")));
        }
        if self.num_draft == 0 {
            return Err(GenerateError::Draft("the number of draft tokens must be at least 1".into()));
        }
        if !self.cache.kv.can_truncate() || !self.draft_cache.kv.can_truncate() || self.cache.kv.row_window(0).is_some() {
            return Err(GenerateError::Draft("speculative decoding rewinds the caches: a rotating cache (max_kv_size) cannot be used".into()));
        }
        Ok(())
    }

    /// One round: draft, verify, keep the agreed tokens, rewind both caches.
    fn round(&mut self) -> Result<(), GenerateError> {
        if let Some(prompt) = self.prompt.take() {
            self.check()?;
            // Both models take all but the last prompt token now; the rest runs with the
            // first round, as every later pending token does.
            self.seq.prefill(self.model, self.cache, &prompt)?;
            self.draft_cache.reuse_prefix(&prompt);
            let done = self.draft_cache.tokens.len();
            self.draft_cache.extend(self.draft, &prompt[done..prompt.len() - 1], self.seq.params.prefill_step_size)?;
        }
        let left = self.seq.params.max_tokens.saturating_sub(self.seq.generated());
        let context = self.model.max_position_embeddings();
        let k = self.num_draft.min(left.saturating_sub(1)).min(context.saturating_sub(self.seq.history.len() + 1));
        let mut drafted = Vec::with_capacity(k);
        let mut seen = self.seq.history.clone();
        for _ in 0..k {
            let pending = seen[self.draft_cache.tokens.len()..].to_vec();
            let mut logits = run(self.draft, &mut self.draft_cache.kv, &[&pending])?.pop().unwrap_or_default();
            self.draft_cache.tokens.extend_from_slice(&pending);
            self.draft_sampler.penalize(&mut logits, &seen);
            self.seq.mask_eos(&mut logits);
            let t = self.draft_sampler.sample(&logits);
            drafted.push(t);
            seen.push(t);
        }
        let pending = seen[self.cache.tokens.len()..].to_vec();
        let rows = run_last(self.model, &mut self.cache.kv, &pending, k + 1)?;
        self.cache.tokens.extend_from_slice(&pending);
        self.stats.rounds += 1;
        self.stats.drafted += k;
        for (n, logits) in rows.into_iter().enumerate() {
            let (mut response, next) = self.seq.sample(logits, self.seq.history.len(), context)?;
            let accepted = drafted.get(n) == Some(&response.token);
            response.from_draft = accepted;
            self.stats.accepted += accepted as usize;
            self.queue.push_back(response);
            if next.is_none() {
                self.done = true;
                break;
            }
            if !accepted {
                break;
            }
        }
        // Keep what both caches share with the tokens so far; the last one runs next round.
        let history = &self.seq.history;
        self.cache.reuse_prefix(history);
        self.draft_cache.reuse_prefix(history);
        Ok(())
    }
}

impl Iterator for SpeculativeStream<'_> {
    type Item = Result<GenerationResponse, GenerateError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(r) = self.queue.pop_front() {
            return Some(Ok(r));
        }
        if self.done || self.seq.params.max_tokens == 0 {
            return None;
        }
        if let Err(e) = self.round() {
            self.done = true;
            return Some(Err(e));
        }
        self.queue.pop_front().map(Ok)
    }
}
