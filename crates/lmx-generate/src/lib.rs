//! lmx-generate: turning a model and a prompt into tokens.
//!
//! [`stream_generate`] yields one [`GenerationResponse`] per token with its text delta, as
//! MLX LM's `stream_generate` does; [`generate`] collects them. A [`PromptCache`] made once
//! and passed to every call keeps the keys and values of tokens already processed, so a
//! multi-turn chat prefills only what is new. [`BatchGenerator`] decodes many sequences
//! together (continuous batching); [`batch_generate`] runs a list of prompts through it.

pub mod batch;
pub mod generate;
mod graph_steps;
pub mod prompt_cache;
pub mod sampler;
pub mod speculative;

pub use batch::{batch_generate, BatchGenerator, BatchOutput, Next, SequenceId};
pub use generate::{
    check_vocab, compute_pool, generate, peak_memory_bytes, stream_generate, Constraint, ConstraintFactory, FinishReason, GenerateError, GenerateParams, GenerationResponse, TokenStream,
};
pub use prompt_cache::{PrefixCache, PromptCache};
pub use sampler::{Sampler, SamplerParams};
pub use speculative::{speculative_generate, DraftStats, SpeculativeStream};
