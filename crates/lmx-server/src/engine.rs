//! The engine thread: one thread owns the model's continuous batch ([`BatchGenerator`]) and
//! the prompt-prefix cache ([`PrefixCache`]); HTTP handlers hand it [`Job`]s and read each
//! job's tokens from its own channel. A job whose receiver is gone (the client disconnected)
//! leaves the batch before the next step, so its slot is free at once.
//!
//! With a draft model the engine decodes one sequence at a time with speculative decoding
//! instead (as MLX LM's server does: drafting does not batch); the others wait their turn.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use lmx::{BatchGenerator, GenerateParams, GenerationResponse, KvOptions, Model, PrefixCache, PromptCache, SequenceId, TokenizerWrapper};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::lockstep::{Leader, Op};

/// What the engine sends a job: a token, or why it cannot go on.
#[derive(Debug)]
pub enum Event {
    /// One generated token (the last has a `finish_reason`).
    Token(Box<GenerationResponse>),
    /// The job failed; `bad_request` when its input was at fault.
    Failed { message: String, bad_request: bool },
}

/// One sequence to generate.
pub struct Job {
    /// The whole prompt (the prefix cache finds what it can reuse).
    pub prompt: Vec<u32>,
    /// Sampling, stop rules, maximum tokens.
    pub params: GenerateParams,
    events: UnboundedSender<Event>,
}

/// Settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The ranks the model is sharded over, when this is rank 0 of `lmx launch`: the engine
    /// tells the others every step ([`crate::lockstep`]; they run
    /// [`crate::lockstep::follow`]). Not with a draft model.
    pub lockstep: Option<Arc<dyn lmx::dist::Group>>,
    /// Sequences decoding together (MLX LM's `--decode-concurrency`).
    pub decode_concurrency: usize,
    /// Sequences that may wait for a decoding slot; more are refused.
    pub max_queue: usize,
    /// Prompt caches kept across requests (`--prompt-cache-size`).
    pub prompt_cache_size: usize,
    /// Bytes of keys and values those caches may hold (`--prompt-cache-bytes`).
    pub prompt_cache_bytes: usize,
    /// Key/value cache kind of every sequence.
    pub kv: KvOptions,
}

/// A draft model for speculative decoding: it proposes `num_draft_tokens` tokens at a time.
#[derive(Clone)]
pub struct Draft {
    /// The draft model (the served model's tokenizer).
    pub model: Arc<Model>,
    /// Tokens drafted per verification.
    pub num_draft_tokens: usize,
}

/// The handle handlers submit jobs through.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    /// Jobs submitted and not finished (decoding, prefilling or waiting).
    in_flight: Arc<AtomicUsize>,
    limit: usize,
    /// Prompt caches kept and their bytes, as of the last step.
    cached: Arc<(AtomicUsize, AtomicUsize)>,
}

/// The engine has no room for more sequences.
#[derive(Debug)]
pub struct Busy {
    /// Sequences in flight when the job was refused.
    pub in_flight: usize,
}

impl Engine {
    /// Starts the engine thread for `model`.
    pub fn start(model: Arc<Model>, tokenizer: Arc<TokenizerWrapper>, opts: EngineOptions, draft: Option<Draft>) -> Self {
        let (jobs, rx) = mpsc::channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let limit = opts.decode_concurrency.max(1) + opts.max_queue;
        let counter = in_flight.clone();
        let cached = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let stats = cached.clone();
        std::thread::Builder::new()
            .name("lmx-engine".into())
            .spawn(move || match &draft {
                Some(draft) => run_speculative(&model, draft, &tokenizer, &opts, &rx, &counter, &stats),
                None => run(&model, &tokenizer, &opts, &rx, &counter, &stats),
            })
            .expect("spawning the engine thread (out of threads or memory at startup)");
        Self { jobs, in_flight, limit, cached }
    }

    /// Queues `count` sequences made by `job(i)`; refuses them all when the engine would hold
    /// more than its decode slots plus its queue. Returns one receiver per sequence.
    pub fn submit(&self, count: usize, mut job: impl FnMut(usize) -> (Vec<u32>, GenerateParams)) -> Result<Vec<UnboundedReceiver<Event>>, Busy> {
        let before = self.in_flight.fetch_add(count, Ordering::SeqCst);
        if before + count > self.limit {
            self.in_flight.fetch_sub(count, Ordering::SeqCst);
            return Err(Busy { in_flight: before });
        }
        let mut receivers = Vec::with_capacity(count);
        for i in 0..count {
            let (events, rx) = unbounded_channel();
            let (prompt, params) = job(i);
            if self.jobs.send(Job { prompt, params, events }).is_err() {
                // The engine thread is gone; the receiver reports it (no event will come).
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            receivers.push(rx);
        }
        Ok(receivers)
    }

    /// Sequences submitted and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Prompt caches kept across requests, and their bytes.
    pub fn stats(&self) -> (usize, usize) {
        (self.cached.0.load(Ordering::Relaxed), self.cached.1.load(Ordering::Relaxed))
    }
}

/// The engine loop: admit new jobs, drop those whose clients left, run one batch step, send
/// each token to its job, keep finished caches for later prompts.
fn run(model: &Model, tokenizer: &TokenizerWrapper, opts: &EngineOptions, jobs: &mpsc::Receiver<Job>, in_flight: &AtomicUsize, cached: &(AtomicUsize, AtomicUsize)) {
    let mut gen = BatchGenerator::new(&**model, tokenizer, opts.decode_concurrency).keep_caches(true);
    let mut prefixes = PrefixCache::new(opts.prompt_cache_size, opts.prompt_cache_bytes);
    let mut active: HashMap<SequenceId, UnboundedSender<Event>> = HashMap::new();
    let mut leader = opts.lockstep.clone().map(Leader::new);
    let done = |n: usize| in_flight.fetch_sub(n, Ordering::SeqCst);
    loop {
        if active.is_empty() {
            match jobs.recv() {
                Ok(job) => admit(job, model, opts, &mut gen, &mut prefixes, &mut active, &mut leader, &done),
                Err(_) => {
                    if let Some(Err(e)) = leader.as_mut().map(|l| l.publish(Op::Stop)) {
                        eprintln!("[ERROR] {e}");
                    }
                    return;
                }
            }
        }
        while let Ok(job) = jobs.try_recv() {
            admit(job, model, opts, &mut gen, &mut prefixes, &mut active, &mut leader, &done);
        }
        let gone: Vec<SequenceId> = active.iter().filter(|(_, tx)| tx.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            active.remove(&id);
            let _ = gen.remove(id);
            if let Some(l) = &mut leader {
                l.record(Op::Remove(id));
            }
            done(1);
        }
        if gen.is_empty() {
            continue;
        }
        let step = match leader.as_mut().map(|l| l.publish(Op::Step)) {
            // The other ranks are gone or stuck: nothing can be computed any more.
            Some(Err(e)) => {
                eprintln!("[ERROR] {e}");
                fail_all(&mut active, &mut gen, &e, &done);
                return;
            }
            _ => gen.step(),
        };
        match step {
            Ok(responses) => {
                for (id, e) in gen.take_failures() {
                    if let Some(l) = &mut leader {
                        l.record_next(id, lmx::Next::Failed, 0);
                    }
                    if let Some(tx) = active.remove(&id) {
                        let _ = tx.send(Event::Failed { message: format!("generation failed: {e}"), bad_request: false });
                        done(1);
                    }
                }
                for (id, response) in responses {
                    let finished = response.finish_reason.is_some();
                    let token = response.token;
                    if let Some(tx) = active.get(&id) {
                        let _ = tx.send(Event::Token(Box::new(response)));
                    }
                    let mut evicted = 0;
                    if finished {
                        active.remove(&id);
                        done(1);
                        if let Some(cache) = gen.take_cache(id) {
                            evicted = prefixes.insert(cache);
                            cached.0.store(prefixes.len(), Ordering::Relaxed);
                            cached.1.store(prefixes.nbytes(), Ordering::Relaxed);
                        }
                    }
                    if let Some(l) = &mut leader {
                        l.record_next(id, if finished { lmx::Next::Finished } else { lmx::Next::Token(token) }, evicted);
                    }
                }
            }
            Err(e) => {
                // A failed step fails every sequence in it; the engine goes on with new ones.
                let message = format!("generation failed: {e}");
                eprintln!("[ERROR] {message}");
                if let Some(l) = &mut leader {
                    active.keys().for_each(|&id| l.record(Op::Remove(id)));
                }
                fail_all(&mut active, &mut gen, &message, &done);
            }
        }
    }
}

/// Ends every active sequence with `message`.
fn fail_all(active: &mut HashMap<SequenceId, UnboundedSender<Event>>, gen: &mut BatchGenerator<'_>, message: &str, done: &impl Fn(usize) -> usize) {
    for (id, tx) in active.drain() {
        let _ = tx.send(Event::Failed { message: message.to_string(), bad_request: false });
        let _ = gen.remove(id);
        done(1);
    }
}

/// The engine loop with a draft model: one job at a time, drafted and verified; jobs that
/// come meanwhile wait in order, and a job whose client left is skipped or stopped.
fn run_speculative(model: &Model, draft: &Draft, tokenizer: &TokenizerWrapper, opts: &EngineOptions, jobs: &mpsc::Receiver<Job>, in_flight: &AtomicUsize, cached: &(AtomicUsize, AtomicUsize)) {
    let mut prefixes = PrefixCache::new(opts.prompt_cache_size, opts.prompt_cache_bytes);
    let mut draft_prefixes = PrefixCache::new(opts.prompt_cache_size, opts.prompt_cache_bytes);
    let mut waiting: VecDeque<Job> = VecDeque::new();
    loop {
        let job = match waiting.pop_front() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        if job.events.is_closed() {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let caches = start_cache(&mut prefixes, model, opts.kv, &job.prompt).and_then(|c| Ok((c, start_cache(&mut draft_prefixes, &draft.model, opts.kv, &job.prompt)?)));
        let (mut cache, mut draft_cache) = match caches {
            Ok(c) => c,
            Err(e) => {
                let _ = job.events.send(Event::Failed { message: e.to_string(), bad_request: true });
                in_flight.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
        };
        let mut finished = false;
        let stream = lmx::speculative_generate(model, &draft.model, tokenizer, &job.prompt, &mut cache, &mut draft_cache, job.params, draft.num_draft_tokens);
        for r in stream {
            while let Ok(next) = jobs.try_recv() {
                waiting.push_back(next);
            }
            match r {
                Ok(response) => {
                    finished = response.finish_reason.is_some();
                    if job.events.send(Event::Token(Box::new(response))).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = job.events.send(Event::Failed { message: format!("generation failed: {e}"), bad_request: false });
                    break;
                }
            }
        }
        in_flight.fetch_sub(1, Ordering::SeqCst);
        // Only a finished sequence's caches are whole (a stopped one may hold a rejected draft).
        if finished {
            prefixes.insert(cache);
            draft_prefixes.insert(draft_cache);
            cached.0.store(prefixes.len(), Ordering::Relaxed);
            cached.1.store(prefixes.nbytes() + draft_prefixes.nbytes(), Ordering::Relaxed);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn admit(
    job: Job,
    model: &Model,
    opts: &EngineOptions,
    gen: &mut BatchGenerator<'_>,
    prefixes: &mut PrefixCache,
    active: &mut HashMap<SequenceId, UnboundedSender<Event>>,
    leader: &mut Option<Leader>,
    done: &impl Fn(usize) -> usize,
) {
    if job.events.is_closed() {
        done(1);
        return;
    }
    let prefill_step_size = job.params.prefill_step_size;
    let admitted = start_cache(prefixes, model, opts.kv, &job.prompt).and_then(|cache| gen.insert(&job.prompt, job.params, cache));
    if let Some(l) = leader {
        l.record(Op::Admit { prompt: job.prompt.clone(), prefill_step_size, id: admitted.as_ref().ok().copied() });
    }
    match admitted {
        Ok(id) => {
            active.insert(id, job.events);
        }
        Err(e) => {
            let _ = job.events.send(Event::Failed { message: e.to_string(), bad_request: true });
            done(1);
        }
    }
}

/// The cache a prompt starts from: a copy of the kept one sharing its longest prefix, else an
/// empty one of the engine's kind.
pub(crate) fn start_cache(prefixes: &mut PrefixCache, model: &Model, kv: KvOptions, prompt: &[u32]) -> Result<PromptCache, lmx::GenerateError> {
    match prefixes.fetch(prompt)? {
        Some(cache) => Ok(cache),
        None => PromptCache::with_options(&**model, kv),
    }
}
