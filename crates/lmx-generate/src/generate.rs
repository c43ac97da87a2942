//! The generation loop: prefill (in chunks, reusing the prompt cache), then sample one token at
//! a time, stream text deltas, and stop on EOS, `max_tokens` or the context limit.

use std::time::Instant;

use lmx_core::Tensor;
use lmx_io::{StreamDecoder, Tokenizer};
use lmx_models::{CausalLm, Logits};

use crate::prompt_cache::PromptCache;
use crate::sampler::{Sampler, SamplerParams};

/// What can go wrong while generating.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The prompt does not fit the model's context.
    #[error("the prompt has {prompt} tokens but the model's context is {context} tokens (max_position_embeddings); shorten the prompt")]
    PromptTooLong { prompt: usize, context: usize },
    /// A token id the model has no embedding for (a tokenizer that does not match the model).
    #[error("token id {id} is outside the model's vocabulary of {vocab} (vocab_size in config.json); the tokenizer does not belong to this model")]
    TokenOutOfVocab { id: u32, vocab: usize },
    /// An empty prompt gives the model nothing to continue.
    #[error("the prompt is empty: give at least one token")]
    EmptyPrompt,
    /// A sampling setting outside its range (NaN included).
    #[error("sampling: `{key}` is {value}; {allowed}")]
    Sampling { key: &'static str, value: f32, allowed: &'static str },
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] lmx_core::Error),
    /// Decoding tokens to text failed.
    #[error(transparent)]
    Io(#[from] lmx_io::IoError),
}

/// Settings of one generation call.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampler: SamplerParams,
    /// Ids that end generation (not emitted as text).
    pub eos_token_ids: Vec<u32>,
    /// Never stop on EOS (llama.cpp's `--ignore-eos`): EOS logits are masked out.
    pub ignore_eos: bool,
    /// Prompt tokens processed per forward pass (MLX LM's `prefill_step_size`).
    pub prefill_step_size: usize,
    /// How many of the most likely tokens each response lists with their log-probabilities
    /// (OpenAI's `top_logprobs`; 0 = none).
    pub top_logprobs: usize,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self { max_tokens: 100, sampler: SamplerParams::default(), eos_token_ids: Vec::new(), ignore_eos: false, prefill_step_size: 2048, top_logprobs: 0 }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token was sampled.
    Stop,
    /// `max_tokens` or the model's context length was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI / MLX LM spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One step of a generation stream (MLX LM's `GenerationResponse`).
#[derive(Debug, Clone)]
pub struct GenerationResponse {
    /// Text completed by this token (may be empty while a UTF-8 character is incomplete).
    pub text: String,
    /// The sampled token (the EOS token on a `Stop` finish).
    pub token: u32,
    /// Its log-probability under the processed logits (after bias and penalties, before
    /// temperature and filters, as MLX LM's `logprobs`).
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens with their log-probabilities, most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
    /// Prompt tokens in this call.
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys/values came from the prompt cache.
    pub cached_tokens: usize,
    /// Prefill speed (tokens actually processed per second).
    pub prompt_tps: f64,
    /// Tokens generated so far.
    pub generation_tokens: usize,
    /// Generation speed so far.
    pub generation_tps: f64,
    /// Peak resident memory of the process, bytes.
    pub peak_memory: u64,
    /// Set on the last response.
    pub finish_reason: Option<FinishReason>,
}

/// The iterator [`stream_generate`] returns.
pub struct TokenStream<'a> {
    model: &'a dyn CausalLm,
    cache: &'a mut PromptCache,
    decoder: StreamDecoder<'a>,
    sampler: Sampler,
    params: GenerateParams,
    prompt: Vec<u32>,
    /// Token sampled but not yet run through the model.
    pending: Option<u32>,
    /// Every token of prompt + generation, for the repetition penalty.
    history: Vec<u32>,
    stats: Stats,
    done: bool,
}

#[derive(Default)]
struct Stats {
    cached: usize,
    prompt_tps: f64,
    generated: usize,
    gen_start: Option<Instant>,
}

/// Generates from `prompt` (the whole token sequence; whatever prefix `cache` already holds is
/// reused), yielding a response per token.
pub fn stream_generate<'a>(model: &'a dyn CausalLm, tokenizer: &'a Tokenizer, prompt: &[u32], cache: &'a mut PromptCache, params: GenerateParams) -> TokenStream<'a> {
    TokenStream {
        model,
        cache,
        decoder: tokenizer.stream_decoder(),
        sampler: Sampler::new(params.sampler.clone()),
        params,
        prompt: prompt.to_vec(),
        pending: None,
        history: prompt.to_vec(),
        stats: Stats::default(),
        done: false,
    }
}

/// Generates and returns the whole text.
pub fn generate(model: &dyn CausalLm, tokenizer: &Tokenizer, prompt: &[u32], cache: &mut PromptCache, params: GenerateParams) -> Result<String, GenerateError> {
    let mut text = String::new();
    for r in stream_generate(model, tokenizer, prompt, cache, params) {
        text.push_str(&r?.text);
    }
    Ok(text)
}

impl TokenStream<'_> {
    /// Runs `tokens` through the model after the cached ones; returns last-position logits.
    fn run(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GenerateError> {
        let ids = Tensor::new(tokens, self.model.device())?.unsqueeze(0)?;
        let (model, kv) = (self.model, &mut self.cache.kv);
        let logits = compute_pool().install(|| model.forward(&ids, kv, Logits::Last))?;
        self.cache.tokens.extend_from_slice(tokens);
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }

    fn prefill(&mut self) -> Result<Vec<f32>, GenerateError> {
        let context = self.model.max_position_embeddings();
        self.params.sampler.validate()?;
        if self.prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if self.prompt.len() > context {
            return Err(GenerateError::PromptTooLong { prompt: self.prompt.len(), context });
        }
        check_vocab(&self.prompt, self.model.vocab_size())?;
        let start = Instant::now();
        self.stats.cached = self.cache.reuse_prefix(&self.prompt);
        let todo = self.prompt[self.stats.cached..].to_vec();
        let mut logits = Vec::new();
        for chunk in todo.chunks(self.params.prefill_step_size.max(1)) {
            logits = self.run(chunk)?;
        }
        self.stats.prompt_tps = todo.len() as f64 / start.elapsed().as_secs_f64().max(1e-9);
        self.stats.gen_start = Some(Instant::now());
        Ok(logits)
    }

    fn step(&mut self) -> Result<GenerationResponse, GenerateError> {
        let mut logits = match self.pending.take() {
            None => self.prefill()?,
            Some(tok) => self.run(&[tok])?,
        };
        self.sampler.penalize(&mut logits, &self.history);
        if self.params.ignore_eos {
            for &id in &self.params.eos_token_ids {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let token = self.sampler.sample(&logits);
        let (logprob, top_logprobs) = crate::sampler::logprobs(&logits, token, self.params.top_logprobs);
        self.history.push(token);
        let is_eos = !self.params.ignore_eos && self.params.eos_token_ids.contains(&token);
        let mut text = String::new();
        let finish = if is_eos {
            Some(FinishReason::Stop)
        } else {
            self.stats.generated += 1;
            text = self.decoder.push(token)?.unwrap_or_default();
            let at_limit = self.stats.generated >= self.params.max_tokens || self.cache.tokens.len() + 1 >= self.model.max_position_embeddings();
            self.pending = Some(token);
            at_limit.then_some(FinishReason::Length)
        };
        if finish.is_some() {
            self.done = true;
            if let Some(rest) = self.decoder.finish()? {
                text.push_str(&rest);
            }
        }
        let elapsed = self.stats.gen_start.map_or(0.0, |s| s.elapsed().as_secs_f64());
        Ok(GenerationResponse {
            text,
            token,
            logprob,
            top_logprobs,
            prompt_tokens: self.prompt.len(),
            cached_tokens: self.stats.cached,
            prompt_tps: self.stats.prompt_tps,
            generation_tokens: self.stats.generated,
            // The first token comes from the prompt pass: no rate until a decode step ran.
            generation_tps: if self.stats.generated > 1 { self.stats.generated as f64 / elapsed.max(1e-9) } else { 0.0 },
            peak_memory: peak_memory_bytes(),
            finish_reason: finish,
        })
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<GenerationResponse, GenerateError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.params.max_tokens == 0 {
            self.done = true;
            return None;
        }
        let r = self.step();
        if r.is_err() {
            self.done = true;
        }
        Some(r)
    }
}

/// The thread pool forward passes run in. Running the whole pass inside the pool makes the
/// calling thread one of the workers, so the many small parallel ops of a decode step do not
/// each pay a wake-up of the caller (that cost a quarter of decode time on 2 cores).
/// Sized by `RAYON_NUM_THREADS`, else the available cores.
/// The thread pool every forward pass (generation, training, scoring) runs in.
pub fn compute_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("lmx-compute-{i}"))
            .build()
            .unwrap_or_else(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool always builds"))
    })
}

/// Every id in `tokens` has an embedding in a model of `vocab` rows.
pub fn check_vocab(tokens: &[u32], vocab: usize) -> Result<(), GenerateError> {
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(&id) => Err(GenerateError::TokenOutOfVocab { id, vocab }),
        None => Ok(()),
    }
}

/// Peak resident set size of this process (VmHWM), in bytes; 0 where /proc is unavailable.
pub fn peak_memory_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return 0 };
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).map_or(0, |kb| kb * 1024)
}
