//! The prompt cache: a model's keys and values plus the exact tokens they belong to.
//!
//! Each generation call gives the whole token sequence (for a chat, the full conversation as
//! the template renders it); the cache keeps the longest common prefix and only the rest is
//! prefilled. Multi-turn chat therefore processes just the new turn, and an edited history
//! recomputes from the first changed token.

use lmx_models::CausalLm;
use lmx_nn::{KvCache, KvOptions};

/// Keys/values of processed tokens, reusable across generation calls.
pub struct PromptCache {
    pub(crate) kv: KvCache,
    pub(crate) tokens: Vec<u32>,
}

impl PromptCache {
    /// An empty growing cache for `model`.
    pub fn new(model: &dyn CausalLm) -> Self {
        Self { kv: model.new_cache(), tokens: Vec::new() }
    }

    /// An empty cache for `model` keeping keys and values as `opts` says (rotating,
    /// quantized); the options are checked here.
    pub fn with_options(model: &dyn CausalLm, opts: KvOptions) -> Result<Self, crate::GenerateError> {
        opts.validate().map_err(crate::GenerateError::KvCache)?;
        Ok(Self { kv: model.new_cache().with_options(opts), tokens: Vec::new() })
    }

    /// The tokens whose keys and values are cached.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Empties the cache (a chat's `r`).
    pub fn reset(&mut self) {
        self.kv.reset();
        self.tokens.clear();
    }

    /// Bytes held by the key/value buffers.
    pub fn nbytes(&self) -> usize {
        self.kv.nbytes()
    }

    /// Keeps the longest prefix shared with `prompt`, but never all of it (the last prompt
    /// token must run to produce logits). Returns how many tokens are reused.
    pub(crate) fn reuse_prefix(&mut self, prompt: &[u32]) -> usize {
        let common = self.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let mut keep = common.min(prompt.len().saturating_sub(1));
        if keep < self.tokens.len() && !self.kv.can_truncate() {
            // A rotating cache that has wrapped no longer holds the positions to rewind to.
            keep = 0;
        }
        self.kv.truncate(keep);
        self.tokens.truncate(keep);
        keep
    }
}
