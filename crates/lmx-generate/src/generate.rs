//! The generation loop: prefill (in chunks, reusing the prompt cache), then sample one token at
//! a time, stream text deltas, and stop on EOS, `max_tokens` or the context limit.

use std::time::Instant;

use lmx_core::Tensor;
use lmx_io::{StreamDecoder, Tokenizer};
use lmx_models::{CausalLm, Logits};
use lmx_nn::KvCache;

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
    /// Key/value cache settings that cannot work together or with this model.
    #[error("kv cache: {0}")]
    KvCache(String),
    /// A prompt cache file that cannot be used with this model.
    #[error("prompt cache file {path}: {msg}")]
    PromptCacheFile { path: std::path::PathBuf, msg: String },
    /// Speculative decoding settings that cannot work.
    #[error("draft model: {0}")]
    Draft(String),
    /// A constraint (grammar) that cannot be built or followed.
    #[error("constraint: {0}")]
    Constraint(String),
    /// A batch generator has no sequence with this id.
    #[error("no sequence with id {0} in the batch")]
    UnknownSequence(u64),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] lmx_core::Error),
    /// Decoding tokens to text failed.
    #[error(transparent)]
    Io(#[from] lmx_io::IoError),
}

/// Restricts which tokens a sequence may sample next: structured output and grammar-enforced
/// tool calls (the server's grammar engine implements it).
pub trait Constraint: Send {
    /// Sets the logits of the tokens not allowed next to -inf.
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String>;
    /// Moves past the sampled `token`.
    fn accept(&mut self, token: u32) -> Result<(), String>;
}

/// Makes a fresh [`Constraint`] for each sequence generated with the same settings.
#[derive(Clone)]
pub struct ConstraintFactory(pub std::sync::Arc<dyn Fn() -> Result<Box<dyn Constraint>, String> + Send + Sync>);

impl std::fmt::Debug for ConstraintFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConstraintFactory")
    }
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
    /// Texts that end generation when the output contains them (OpenAI's `stop`); the text
    /// is cut before the match, and text that may begin a match is held back until it
    /// cannot.
    pub stop: Vec<String>,
    /// Which tokens may come next (a grammar); None lets every token through.
    pub constraint: Option<ConstraintFactory>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self { max_tokens: 100, sampler: SamplerParams::default(), eos_token_ids: Vec::new(), ignore_eos: false, prefill_step_size: 2048, top_logprobs: 0, stop: Vec::new(), constraint: None }
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
    /// The token was a draft model's guess the model accepted (speculative decoding).
    pub from_draft: bool,
    /// Set on the last response.
    pub finish_reason: Option<FinishReason>,
    /// The stop string (from `GenerateParams::stop`) that ended generation, if one did.
    pub stop_matched: Option<String>,
}

/// The iterator [`stream_generate`] returns.
pub struct TokenStream<'a> {
    model: &'a dyn CausalLm,
    cache: &'a mut PromptCache,
    seq: Sequence<'a>,
    prompt: Vec<u32>,
    /// Token sampled but not yet run through the model.
    pending: Option<u32>,
    done: bool,
    /// Decode steps recorded as a CUDA graph, where the device can.
    graph: Option<crate::graph_steps::GraphSteps>,
}

#[derive(Default)]
struct Stats {
    cached: usize,
    prompt_start: Option<Instant>,
    prompt_tps: f64,
    generated: usize,
    gen_start: Option<Instant>,
}

/// What a decode step hands the host for a sequence: the logits to sample from, or the token
/// the device picked greedily with its log probability (8 bytes instead of the vocabulary).
pub(crate) enum Drawn {
    Logits(Vec<f32>),
    Picked { token: u32, logprob: f32 },
}

/// One sequence's generation state, alone or in a batch: its sampler and logits processors,
/// the tokens it has seen (for the penalties), its text decoder, stop rules and counters.
pub(crate) struct Sequence<'a> {
    decoder: StreamDecoder<'a>,
    sampler: Sampler,
    pub(crate) params: GenerateParams,
    prompt_len: usize,
    /// Every token of prompt + generation, for the penalties.
    pub(crate) history: Vec<u32>,
    stats: Stats,
    /// Decoded text not yet emitted: it may be the start of a stop string.
    held: String,
    /// The grammar the tokens must follow, if any (or why it could not be built).
    constraint: Option<Result<Box<dyn Constraint>, String>>,
}

impl<'a> Sequence<'a> {
    pub(crate) fn new(tokenizer: &'a Tokenizer, prompt: &[u32], params: GenerateParams) -> Self {
        let constraint = params.constraint.as_ref().map(|f| (f.0)());
        Self {
            decoder: tokenizer.stream_decoder(),
            sampler: Sampler::new(params.sampler.clone()),
            prompt_len: prompt.len(),
            history: prompt.to_vec(),
            params,
            stats: Stats::default(),
            held: String::new(),
            constraint,
        }
    }

    /// Checks the sampling settings and that `prompt` fits the model.
    pub(crate) fn check(&self, model: &dyn CausalLm, prompt: &[u32]) -> Result<(), GenerateError> {
        self.params.sampler.validate()?;
        if let Some(Err(e)) = &self.constraint {
            return Err(GenerateError::Constraint(e.clone()));
        }
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let context = model.max_position_embeddings();
        if prompt.len() > context {
            return Err(GenerateError::PromptTooLong { prompt: prompt.len(), context });
        }
        check_vocab(prompt, model.vocab_size())
    }

    /// Checks the prompt and settings, then runs all but the last prompt token through the
    /// model after the prefix `cache` already holds, in chunks of `prefill_step_size`, and
    /// returns the last token: it runs as the first decode step, as in MLX LM's
    /// `generate_step` (which matters for rotating and quantized caches: the first sampled
    /// token sees the cache as every later one does).
    pub(crate) fn prefill(&mut self, model: &dyn CausalLm, cache: &mut PromptCache, prompt: &[u32]) -> Result<u32, GenerateError> {
        self.check(model, prompt)?;
        self.stats.prompt_start = Some(Instant::now());
        self.stats.cached = cache.reuse_prefix(prompt);
        let (&last, head) = prompt.split_last().ok_or(GenerateError::EmptyPrompt)?;
        cache.extend(model, &head[self.stats.cached..], self.params.prefill_step_size)?;
        Ok(last)
    }

    /// Runs `delta` through the stop strings: returns the text that can be emitted now and
    /// the stop string that matched, if one did (the text then ends before it). Text that may be the
    /// start of a stop string waits, unless this is the `last` delta.
    fn hold_back_stops(&mut self, delta: String, last: bool) -> (String, Option<String>) {
        self.held.push_str(&delta);
        if let Some((at, stop)) = self.params.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s))).min_by_key(|&(at, _)| at) {
            let out = self.held[..at].to_string();
            let stop = stop.clone();
            self.held.clear();
            return (out, Some(stop));
        }
        // The longest tail of the held text that begins some stop string stays held.
        let keep = if last {
            0
        } else {
            let longest = self.params.stop.iter().map(|s| s.len()).max().unwrap_or(0);
            (1..longest.min(self.held.len() + 1))
                .rev()
                .find(|&n| self.held.is_char_boundary(self.held.len() - n) && self.params.stop.iter().any(|s| s.starts_with(&self.held[self.held.len() - n..])))
                .unwrap_or(0)
        };
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, None)
    }

    /// Tokens generated so far.
    pub(crate) fn generated(&self) -> usize {
        self.stats.generated
    }

    /// Masks the EOS tokens out of `logits` when EOS is ignored.
    pub(crate) fn mask_eos(&self, logits: &mut [f32]) {
        if self.params.ignore_eos {
            for &id in &self.params.eos_token_ids {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// Samples the next token from `logits` (the processors applied first); `cached` is the
    /// number of tokens in the sequence's cache and `context` the model's. Returns the
    /// response and, unless the sequence ended, the token to run next.
    pub(crate) fn sample(&mut self, mut logits: Vec<f32>, cached: usize, context: usize) -> Result<(GenerationResponse, Option<u32>), GenerateError> {
        self.prompt_done();
        self.sampler.penalize(&mut logits, &self.history);
        self.mask_eos(&mut logits);
        if let Some(Ok(c)) = &mut self.constraint {
            c.mask(&mut logits).map_err(GenerateError::Constraint)?;
        }
        let token = self.sampler.sample(&logits);
        if let Some(Ok(c)) = &mut self.constraint {
            c.accept(token).map_err(GenerateError::Constraint)?;
        }
        let (logprob, top_logprobs) = crate::sampler::logprobs(&logits, token, self.params.top_logprobs);
        self.accept(token, logprob, top_logprobs, cached, context)
    }

    /// Takes what a decode step drew: samples from its logits, or accepts the token the
    /// device picked (see [`Sequence::device_pick`]).
    pub(crate) fn take(&mut self, drawn: Drawn, cached: usize, context: usize) -> Result<(GenerationResponse, Option<u32>), GenerateError> {
        match drawn {
            Drawn::Logits(logits) => self.sample(logits, cached, context),
            Drawn::Picked { token, logprob } => {
                self.prompt_done();
                self.accept(token, logprob, Vec::new(), cached, context)
            }
        }
    }

    /// When the next token is a function of the logits alone that the device computes as the
    /// host would (greedy, no logits processors, no grammar, no top log probabilities): the
    /// ids to leave out (EOS when ignored, at most 8). A decode step then hands the host the
    /// token and its log probability instead of the logits.
    pub(crate) fn device_pick(&self) -> Option<Vec<u32>> {
        let s = &self.params.sampler;
        let plain = s.temp <= 0.0
            && s.logit_bias.is_empty()
            && s.repetition_penalty.is_none_or(|p| p == 1.0)
            && s.presence_penalty.is_none_or(|p| p == 0.0)
            && s.frequency_penalty.is_none_or(|p| p == 0.0)
            && self.constraint.is_none()
            && self.params.top_logprobs == 0;
        let masked = if self.params.ignore_eos { self.params.eos_token_ids.clone() } else { Vec::new() };
        (plain && masked.len() <= 8).then_some(masked)
    }

    /// Starts the generation clock at the first token (the prompt is done then).
    fn prompt_done(&mut self) {
        if self.stats.gen_start.is_none() {
            let took = self.stats.prompt_start.map_or(0.0, |s| s.elapsed().as_secs_f64());
            self.stats.prompt_tps = (self.prompt_len - self.stats.cached) as f64 / took.max(1e-9);
            self.stats.gen_start = Some(Instant::now());
        }
    }

    /// Records `token` (drawn with `logprob`) as the sequence's next one: the response and,
    /// unless the sequence ended, the token to run next.
    fn accept(&mut self, token: u32, logprob: f32, top_logprobs: Vec<(u32, f32)>, cached: usize, context: usize) -> Result<(GenerationResponse, Option<u32>), GenerateError> {
        self.history.push(token);
        let is_eos = !self.params.ignore_eos && self.params.eos_token_ids.contains(&token);
        let mut text = String::new();
        let mut next = None;
        let mut finish = if is_eos {
            Some(FinishReason::Stop)
        } else {
            self.stats.generated += 1;
            text = self.decoder.push(token)?.unwrap_or_default();
            next = Some(token);
            (self.stats.generated >= self.params.max_tokens || cached + 1 >= context).then_some(FinishReason::Length)
        };
        if finish.is_some() {
            next = None;
            if let Some(rest) = self.decoder.finish()? {
                text.push_str(&rest);
            }
        }
        let mut stop_matched = None;
        if !self.params.stop.is_empty() {
            let (out, matched) = self.hold_back_stops(text, finish.is_some());
            text = out;
            if matched.is_some() {
                finish = Some(FinishReason::Stop);
                next = None;
                stop_matched = matched;
            }
        }
        let elapsed = self.stats.gen_start.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let generated = self.stats.generated;
        let response = GenerationResponse {
            text,
            token,
            logprob,
            top_logprobs,
            prompt_tokens: self.prompt_len,
            cached_tokens: self.stats.cached,
            prompt_tps: self.stats.prompt_tps,
            generation_tokens: generated,
            // The first token comes from the prompt pass: no rate until a decode step ran.
            generation_tps: if generated > 1 { generated as f64 / elapsed.max(1e-9) } else { 0.0 },
            peak_memory: peak_memory_bytes(),
            from_draft: false,
            finish_reason: finish,
            stop_matched,
        };
        Ok((response, next))
    }
}

/// Runs `tokens` through the model after what `kv` holds; returns the logits of the last `n`
/// positions (speculative decoding's verification).
pub(crate) fn run_last(model: &dyn CausalLm, kv: &mut KvCache, tokens: &[u32], n: usize) -> Result<Vec<Vec<f32>>, GenerateError> {
    let ids = Tensor::new(tokens, model.device())?.unsqueeze(0)?;
    let logits = compute_pool().install(|| model.forward(&ids, kv, Logits::All))?;
    let l = logits.dim(1)?;
    Ok(logits.squeeze(0)?.narrow(0, l - n.min(l), n.min(l))?.to_vec2::<f32>()?)
}

/// Runs one row of tokens per sequence (rows of equal length) through the model after what
/// `kv` holds (one cache row per sequence); returns each row's last-position logits.
pub(crate) fn run(model: &dyn CausalLm, kv: &mut KvCache, rows: &[&[u32]]) -> Result<Vec<Vec<f32>>, GenerateError> {
    run_with(model, kv, rows, |logits| logits.to_vec2::<f32>())
}

/// [`run`] for decode steps: what each row's sequence draws from, its logits or, where its
/// `picks` entry holds the ids to leave out ([`Sequence::device_pick`]) and the model is on a
/// GPU, the token picked there (8 bytes to the host instead of the vocabulary's logits).
pub(crate) fn run_drawn(model: &dyn CausalLm, kv: &mut KvCache, rows: &[&[u32]], picks: &[Option<Vec<u32>>]) -> Result<Vec<Drawn>, GenerateError> {
    run_with(model, kv, rows, |logits| {
        if !logits.device().is_cuda() || !device_pick_on() || picks.iter().all(Option::is_none) {
            return Ok(logits.to_vec2::<f32>()?.into_iter().map(Drawn::Logits).collect());
        }
        let picked = if let Some(all) = picks.iter().cloned().collect::<Option<Vec<_>>>().filter(|_| pick_rows_on()) {
            // Every row picks: one op for the batch.
            lmx_core::ops::pick_greedy_rows(logits, &all)?.to_vec1::<u32>()?
        } else {
            let mut parts = Vec::with_capacity(picks.len());
            for (i, masked) in picks.iter().enumerate() {
                if let Some(masked) = masked {
                    parts.push(lmx_core::ops::pick_greedy(&logits.get(i)?, masked)?);
                }
            }
            Tensor::cat(&parts, 0)?.to_vec1::<u32>()?
        };
        drawn_rows(picks, &picked, |i| logits.get(i)?.to_vec1::<f32>())
    })
}

/// Each row's draw: the next two words of `picked` (token, log probability's bits) for a row
/// with a pick, in row order, else the row's logits from `row`.
fn drawn_rows(picks: &[Option<Vec<u32>>], picked: &[u32], mut row: impl FnMut(usize) -> lmx_core::Result<Vec<f32>>) -> lmx_core::Result<Vec<Drawn>> {
    let mut words = picked.iter().copied();
    let mut out = Vec::with_capacity(picks.len());
    for (i, masked) in picks.iter().enumerate() {
        let pair = if masked.is_some() { words.next().zip(words.next()) } else { None };
        out.push(match pair {
            Some((token, bits)) => Drawn::Picked { token, logprob: f32::from_bits(bits) },
            None => Drawn::Logits(row(i)?),
        });
    }
    Ok(out)
}

/// Runs the rows (see [`run`]) and reads their last-position logits (n, vocab) with `read`.
fn run_with<T>(model: &dyn CausalLm, kv: &mut KvCache, rows: &[&[u32]], read: impl FnOnce(&Tensor) -> lmx_core::Result<T>) -> Result<T, GenerateError> {
    let flat: Vec<u32> = rows.concat();
    let start = std::time::Instant::now();
    let ids = Tensor::from_vec(flat, (rows.len(), rows.first().map_or(0, |r| r.len())), model.device())?;
    let logits = compute_pool().install(|| model.forward(&ids, kv, Logits::Last))?;
    let issued = start.elapsed();
    let out = read(&logits.squeeze(1)?)?;
    if trace_steps() {
        // On a GPU, `issue` is the host's time to queue the pass's kernels and `wait` the time
        // the device then still needed: a wait near zero means the host's launches bound a step.
        eprintln!("lmx-step: tokens {} issue_ms {:.3} wait_ms {:.3}", ids.elem_count(), issued.as_secs_f64() * 1e3, (start.elapsed() - issued).as_secs_f64() * 1e3);
    }
    Ok(out)
}

/// Whether greedy steps on a GPU pick on the device (`LMX_CUDA_PICK=0`: the host samples from
/// the logits, for comparisons).
pub(crate) fn device_pick_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LMX_CUDA_PICK").is_ok_and(|v| v == "0"))
}

/// Whether a batch whose rows all pick greedily picks in one op (`LMX_CUDA_PICK_ROWS=0`: one op
/// a row, for comparisons).
fn pick_rows_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LMX_CUDA_PICK_ROWS").is_ok_and(|v| v == "0"))
}

/// `LMX_TRACE_STEPS=1`: each step of [`run`] prints its timing on stderr.
pub(crate) fn trace_steps() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LMX_TRACE_STEPS").is_ok_and(|v| v == "1"))
}

/// Generates from `prompt` (the whole token sequence; whatever prefix `cache` already holds is
/// reused), yielding a response per token.
pub fn stream_generate<'a>(model: &'a dyn CausalLm, tokenizer: &'a Tokenizer, prompt: &[u32], cache: &'a mut PromptCache, params: GenerateParams) -> TokenStream<'a> {
    let graph = crate::graph_steps::GraphSteps::new(model);
    TokenStream { model, cache, seq: Sequence::new(tokenizer, prompt, params), prompt: prompt.to_vec(), pending: None, done: false, graph }
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
    fn step(&mut self) -> Result<GenerationResponse, GenerateError> {
        let tok = match self.pending.take() {
            None => {
                let prompt = std::mem::take(&mut self.prompt);
                self.seq.prefill(self.model, self.cache, &prompt)?
            }
            Some(tok) => tok,
        };
        let recorded = match &mut self.graph {
            Some(g) => g.step(self.model, &mut self.cache.kv, tok, self.seq.device_pick().as_deref())?,
            None => None,
        };
        let drawn = match recorded {
            Some(drawn) => drawn,
            None => run_drawn(self.model, &mut self.cache.kv, &[&[tok]], &[self.seq.device_pick()])?.pop().unwrap_or(Drawn::Logits(Vec::new())),
        };
        self.cache.tokens.push(tok);
        let (response, next) = self.seq.take(drawn, self.cache.tokens.len(), self.model.max_position_embeddings())?;
        self.pending = next;
        self.done = next.is_none();
        Ok(response)
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<GenerationResponse, GenerateError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.seq.params.max_tokens == 0 {
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

/// The most memory the model has held: on a GPU, its GPU memory (the pools' high-water
/// marks); otherwise this process's peak resident set size (VmHWM), in bytes; 0 where /proc is
/// unavailable.
pub fn peak_memory_bytes() -> u64 {
    // On a GPU the model and its activations live in GPU memory: report that (as MLX LM
    // reports its device's peak), not the host process's.
    if let Some(gpu) = lmx_core::device::gpu_peak_memory_bytes() {
        return gpu;
    }
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return 0 };
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a batch where only some rows pick on the device, each picked row takes its own two
    /// words (in row order) and every other row its own logits.
    #[test]
    fn mixed_rows_take_their_own_draws() -> lmx_core::Result<()> {
        let picks = vec![None, Some(vec![2]), None, Some(Vec::new())];
        let picked = [7, (-0.5f32).to_bits(), 9, (-1.5f32).to_bits()];
        let out = drawn_rows(&picks, &picked, |i| Ok(vec![i as f32]))?;
        let seen: Vec<String> = out
            .iter()
            .map(|d| match d {
                Drawn::Logits(l) => format!("logits {l:?}"),
                Drawn::Picked { token, logprob } => format!("picked {token} {logprob}"),
            })
            .collect();
        assert_eq!(seen, ["logits [0.0]", "picked 7 -0.5", "logits [2.0]", "picked 9 -1.5"]);
        Ok(())
    }
}
