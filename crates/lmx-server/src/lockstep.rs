//! `lmx serve` under `lmx launch`: rank 0 serves HTTP and every rank computes its shard.
//!
//! Only rank 0 sees requests, and only it samples (grammars, stop strings and penalties live
//! there). Every change it makes to the engine's state is an [`Op`]: a sequence admitted
//! (with the prompt, so the prefix cache picks the same cache), a sequence removed, the
//! token a sequence decodes next or its end (with how many kept caches its own cache pushed
//! out), and a step. Rank 0 logs them as they happen and, just before each step, broadcasts
//! the log; the other ranks ([`follow`]) replay it on a `BatchGenerator` and a `PrefixCache`
//! of their own, so they run the same forward passes with the same tokens, collectives
//! included, and hold the same caches. Nothing is decided twice: a follower never samples
//! and never measures its (sharded, possibly smaller) caches to evict.

use lmx::dist::{broadcast_bytes, Group, Wait};
use lmx::{BatchGenerator, GenerateParams, Model, Next, PrefixCache, SequenceId, TokenizerWrapper};
use serde::{Deserialize, Serialize};

use crate::engine::{start_cache, EngineOptions};

/// One change to the engine's state, in the order rank 0 made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Op {
    /// A prompt went to the prefix cache and the batch: `id` is the sequence it became, or
    /// None when the batch refused it (its sampling settings; the prefix cache's recency
    /// changed all the same).
    Admit { prompt: Vec<u32>, prefill_step_size: usize, id: Option<SequenceId> },
    /// A sequence left early (its client went away, or a step failed).
    Remove(SequenceId),
    /// After a step: the token the sequence runs next.
    Decode(SequenceId, u32),
    /// After a step: the sequence finished; its cache went to the prefix cache, which then
    /// dropped `evicted` caches for its bounds.
    Finish { id: SequenceId, evicted: usize },
    /// After a step: the sequence's sampling failed.
    Fail(SequenceId),
    /// One batch step.
    Step,
    /// The server is shutting down.
    Stop,
}

/// Rank 0's side: the log of operations since the last broadcast.
#[derive(Debug)]
pub(crate) struct Leader {
    group: std::sync::Arc<dyn Group>,
    log: Vec<Op>,
}

impl Leader {
    pub(crate) fn new(group: std::sync::Arc<dyn Group>) -> Self {
        Self { group, log: Vec::new() }
    }

    pub(crate) fn record(&mut self, op: Op) {
        self.log.push(op);
    }

    /// The outcome of a step for one sequence (see [`BatchGenerator::follow`]).
    pub(crate) fn record_next(&mut self, id: SequenceId, next: Next, evicted: usize) {
        self.log.push(match next {
            Next::Token(t) => Op::Decode(id, t),
            Next::Finished => Op::Finish { id, evicted },
            Next::Failed => Op::Fail(id),
        });
    }

    /// Sends the log, ending in `last` (a step, or the stop), to the other ranks.
    pub(crate) fn publish(&mut self, last: Op) -> Result<(), String> {
        self.log.push(last);
        let bytes = serde_json::to_vec(&self.log).map_err(|e| e.to_string())?;
        self.log.clear();
        broadcast_bytes(&*self.group, Some(&bytes), 0, Wait::Collective).map(|_| ()).map_err(|e| format!("telling the other ranks the next step: {e}"))
    }
}

/// A rank other than 0: replays rank 0's operations until it stops. Returns an error when
/// the log cannot be followed (then the ranks no longer hold the same state).
pub fn follow(model: &Model, tokenizer: &TokenizerWrapper, opts: &EngineOptions, group: &dyn Group) -> Result<(), String> {
    let mut gen = BatchGenerator::new(&**model, tokenizer, opts.decode_concurrency).keep_caches(true);
    let mut prefixes = PrefixCache::new(opts.prompt_cache_size, opts.prompt_cache_bytes);
    loop {
        // Rank 0 may wait for a request for as long as nobody sends one.
        let bytes = broadcast_bytes(group, None, 0, Wait::Forever).map_err(|e| format!("waiting for rank 0's next step: {e}"))?;
        let ops: Vec<Op> = serde_json::from_slice(&bytes).map_err(|e| format!("rank 0's step log: {e}"))?;
        for op in ops {
            let lost = |e: lmx::GenerateError| format!("following rank 0: {e}");
            match op {
                Op::Admit { prompt, prefill_step_size, id } => {
                    let cache = start_cache(&mut prefixes, model, opts.kv, &prompt);
                    let Some(id) = id else { continue };
                    let params = GenerateParams { prefill_step_size, ..GenerateParams::default() };
                    let mine = cache.and_then(|c| gen.insert(&prompt, params, c)).map_err(lost)?;
                    if mine != id {
                        return Err(format!("following rank 0: its sequence {id} is {mine} here"));
                    }
                }
                Op::Remove(id) => {
                    let _ = gen.remove(id);
                }
                Op::Decode(id, t) => gen.follow(id, Next::Token(t)).map_err(lost)?,
                Op::Finish { id, evicted } => {
                    gen.follow(id, Next::Finished).map_err(lost)?;
                    if let Some(cache) = gen.take_cache(id) {
                        prefixes.insert_evicting(cache, evicted);
                    }
                }
                Op::Fail(id) => gen.follow(id, Next::Failed).map_err(lost)?,
                // A failed step fails on rank 0 too, which then removes its sequences.
                Op::Step => {
                    if let Err(e) = gen.step_unsampled() {
                        eprintln!("[ERROR] step: {e}");
                    }
                }
                Op::Stop => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Op;

    #[test]
    fn the_log_survives_its_encoding() {
        let log = vec![
            Op::Admit { prompt: vec![1, 2, 3], prefill_step_size: 2048, id: Some(0) },
            Op::Admit { prompt: vec![4], prefill_step_size: 512, id: None },
            Op::Step,
            Op::Decode(0, 42),
            Op::Finish { id: 0, evicted: 2 },
            Op::Fail(3),
            Op::Remove(7),
            Op::Stop,
        ];
        let bytes = serde_json::to_vec(&log).expect("the log encodes");
        assert_eq!(serde_json::from_slice::<Vec<Op>>(&bytes).expect("the log decodes"), log);
    }
}
