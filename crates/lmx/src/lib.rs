//! lmx: run large language models locally, from Rust, the way MLX LM does from Python.
//!
//! ```no_run
//! let (model, tokenizer) = lmx::load("models/SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let prompt = tokenizer.chat_prompt(&[lmx::Message::new("user", "What is the capital of France?")], None)?;
//! let mut cache = lmx::PromptCache::new(&*model);
//! for response in lmx::stream_generate(&model, &tokenizer, &prompt, &mut cache, lmx::GenerateParams::default()) {
//!     print!("{}", response?.text);
//! }
//! # Ok::<(), lmx::Error>(())
//! ```
//!
//! The prompt cache is made once and passed to every call: each call gives the whole token
//! sequence, and only what is not already cached is prefilled (multi-turn chat).

mod load;
mod perplexity;

pub use lmx_core::{DType, Device};
pub use lmx_generate::{
    BatchGenerator, BatchOutput, Constraint, ConstraintFactory, DraftStats, FinishReason, GenerateError, GenerateParams, GenerationResponse, Next, PrefixCache, PromptCache, SamplerParams, SequenceId,
    SpeculativeStream, TokenStream,
};
pub use lmx_io::{Message, ModelSource};
pub use lmx_nn::KvOptions;
pub use load::{load, load_with, AdapterOptions, LoadOptions, Model, TokenizerWrapper};
pub use perplexity::{perplexity, Perplexity};
/// Writing model folders (GGUF to safetensors, dtype casts).
pub mod convert {
    pub use lmx_convert::*;
}
pub use lmx_models::{supported_model_types, CausalLm, Logits};

/// Lower layers, for callers who need them (custom loops, conversion).
pub mod core {
    pub use lmx_core::*;
}
/// Checkpoint and tokenizer I/O.
pub mod io {
    pub use lmx_io::*;
}
/// Layers and the layer builder.
pub mod nn {
    pub use lmx_nn::*;
}
/// Collectives (tensor-parallel groups).
pub mod dist {
    pub use lmx_dist::*;
}

/// Everything the lmx library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading model files.
    #[error(transparent)]
    Io(#[from] lmx_io::IoError),
    /// Building the model.
    #[error(transparent)]
    Model(#[from] lmx_models::ModelError),
    /// Building a layer (adapters, sharding).
    #[error(transparent)]
    Build(#[from] lmx_nn::BuildError),
    /// Generating.
    #[error(transparent)]
    Generate(#[from] lmx_generate::GenerateError),
    /// Choosing a device or dtype.
    #[error(transparent)]
    Device(#[from] lmx_core::DeviceError),
    /// A tensor operation.
    #[error(transparent)]
    Tensor(#[from] lmx_core::Error),
    /// Converting a model.
    #[error(transparent)]
    Convert(#[from] lmx_convert::ConvertError),
    /// A text to evaluate that does not fill one sequence.
    #[error("the text has {tokens} tokens, fewer than one sequence of {sequence_length}: use a longer text or a shorter sequence length")]
    TextTooShort { tokens: usize, sequence_length: usize },
    /// A sequence length beyond the model's context.
    #[error("a sequence length of {sequence_length} is more than the model's context of {context} tokens (max_position_embeddings); use a shorter sequence length")]
    SequenceTooLong { sequence_length: usize, context: usize },
}

/// Result alias for the lmx library.
pub type Result<T> = std::result::Result<T, Error>;

/// Streams a generation for `prompt` (token ids; see [`TokenizerWrapper::chat_prompt`]),
/// stopping on the model's EOS tokens as well as any in `params.eos_token_ids`.
pub fn stream_generate<'a>(model: &'a Model, tokenizer: &'a TokenizerWrapper, prompt: &[u32], cache: &'a mut PromptCache, params: GenerateParams) -> TokenStream<'a> {
    lmx_generate::stream_generate(&**model, tokenizer, prompt, cache, with_model_eos(tokenizer, params))
}

/// Streams a generation for `prompt` with speculative decoding: `draft` (a smaller model with
/// the same tokenizer) proposes `num_draft_tokens` tokens at a time and `model` keeps those
/// it would have chosen itself (MLX LM's `speculative_generate_step`). Each model has its own
/// cache.
#[allow(clippy::too_many_arguments)]
pub fn speculative_generate<'a>(
    model: &'a Model,
    draft: &'a Model,
    tokenizer: &'a TokenizerWrapper,
    prompt: &[u32],
    cache: &'a mut PromptCache,
    draft_cache: &'a mut PromptCache,
    params: GenerateParams,
    num_draft_tokens: usize,
) -> SpeculativeStream<'a> {
    lmx_generate::speculative_generate(&**model, &**draft, tokenizer, prompt, cache, draft_cache, with_model_eos(tokenizer, params), num_draft_tokens)
}

/// `params` stopping on the model's EOS tokens too.
pub fn with_model_eos(tokenizer: &TokenizerWrapper, mut params: GenerateParams) -> GenerateParams {
    for id in tokenizer.eos_token_ids() {
        if !params.eos_token_ids.contains(id) {
            params.eos_token_ids.push(*id);
        }
    }
    params
}

/// Generates for every prompt (token ids) in continuous batches of at most `max_batch`
/// sequences (MLX LM's `batch_generate`), each with a fresh cache kept as `kv` says; calls
/// `progress` after each step with the responses it produced. Results are in prompt order.
pub fn batch_generate(
    model: &Model,
    tokenizer: &TokenizerWrapper,
    prompts: &[Vec<u32>],
    params: GenerateParams,
    max_batch: usize,
    kv: KvOptions,
    progress: impl FnMut(&[(SequenceId, GenerationResponse)]),
) -> Result<Vec<BatchOutput>> {
    let params = with_model_eos(tokenizer, params);
    Ok(lmx_generate::batch_generate(&**model, tokenizer, prompts, &params, max_batch, || PromptCache::with_options(&**model, kv), progress)?)
}

/// Generates and returns the whole text (a fresh cache; see [`stream_generate`] to reuse one).
pub fn generate(model: &Model, tokenizer: &TokenizerWrapper, prompt: &[u32], params: GenerateParams) -> Result<String> {
    let mut cache = PromptCache::new(&**model);
    let mut text = String::new();
    for r in stream_generate(model, tokenizer, prompt, &mut cache, params) {
        text.push_str(&r?.text);
    }
    Ok(text)
}
