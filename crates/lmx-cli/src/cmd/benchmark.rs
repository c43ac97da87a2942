//! `lmx benchmark`: prompt and generation throughput on random tokens (`mlx_lm.benchmark`).

use lmx::{GenerateParams, PromptCache};

use super::{gb, KvArgs, ModelArgs};

/// Flags of `lmx benchmark`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub kv: KvArgs,
    /// Prompt length in tokens.
    #[arg(long, short = 'p', default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens to generate (EOS is ignored, so exactly this many).
    #[arg(long, short = 'g', default_value_t = 1024)]
    pub generation_tokens: usize,
    /// Sequences decoding together (continuous batching); rates are totals over the batch.
    #[arg(long, short = 'b', default_value_t = 1)]
    pub batch_size: usize,
    /// Timed trials (after one untimed warm-up).
    #[arg(long, short = 'n', default_value_t = 5)]
    pub num_trials: usize,
    /// Prompt tokens per forward pass.
    #[arg(long, default_value_t = 2048)]
    pub prefill_step_size: usize,
    /// Seconds to wait between trials.
    #[arg(long, default_value_t = 0.0)]
    pub delay: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.prompt_tokens > 0 && args.num_trials > 0 && args.batch_size > 0, "--prompt-tokens, --num-trials and --batch-size must be at least 1");
    let kv = args.kv.options()?;
    let (model, tokenizer) = args.model.load()?;
    // Deterministic pseudo-random prompts (a linear congruential sequence over the vocabulary).
    let vocab = model.vocab_size() as u64;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let prompts: Vec<Vec<u32>> = (0..args.batch_size)
        .map(|_| {
            (0..args.prompt_tokens)
                .map(|_| {
                    state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    ((state >> 33) % vocab) as u32
                })
                .collect()
        })
        .collect();
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| std::thread::available_parallelism().map_or(1, |n| n.get()).to_string());
    eprintln!(
        "Running benchmark: model={} dtype={:?} prompt_tokens={} generation_tokens={} batch_size={} threads={threads}",
        args.model.model,
        model.dtype(),
        args.prompt_tokens,
        args.generation_tokens,
        args.batch_size
    );
    let params = GenerateParams { max_tokens: args.generation_tokens, ignore_eos: true, prefill_step_size: args.prefill_step_size, ..Default::default() };
    let trial = || -> anyhow::Result<Trial> {
        if args.batch_size == 1 {
            let mut cache = PromptCache::with_options(&*model, kv)?;
            let mut last = None;
            for r in lmx::stream_generate(&model, &tokenizer, &prompts[0], &mut cache, params.clone()) {
                last = Some(r?);
            }
            let cache_bytes = cache.nbytes();
            let r = last.ok_or_else(|| anyhow::anyhow!("no tokens were generated"))?;
            return Ok(Trial { prompt_tps: r.prompt_tps, generation_tps: r.generation_tps, peak_memory: r.peak_memory, cache_bytes });
        }
        batch_trial(&model, &tokenizer, &prompts, &params, kv)
    };
    trial()?; // warm-up
    let (mut p, mut g, mut m, mut c) = (0.0, 0.0, 0u64, 0usize);
    for i in 0..args.num_trials {
        if args.delay > 0.0 {
            std::thread::sleep(std::time::Duration::from_secs_f64(args.delay));
        }
        let r = trial()?;
        println!("Trial {}: prompt_tps={:.3}, generation_tps={:.3}, peak_memory={}, kv_cache={}", i + 1, r.prompt_tps, r.generation_tps, gb(r.peak_memory), gb(r.cache_bytes as u64));
        p += r.prompt_tps;
        g += r.generation_tps;
        m = m.max(r.peak_memory);
        c = c.max(r.cache_bytes);
    }
    let n = args.num_trials as f64;
    println!("Averages: prompt_tps={:.3}, generation_tps={:.3}, peak_memory={}, kv_cache={} ({} per sequence)", p / n, g / n, gb(m), gb(c as u64), gb((c / args.batch_size) as u64));
    Ok(())
}

/// One trial's totals.
struct Trial {
    prompt_tps: f64,
    generation_tps: f64,
    peak_memory: u64,
    /// Key/value cache bytes at the end.
    cache_bytes: usize,
}

/// Every prompt through one continuous batch: the prompt rate is the prompts' tokens over the
/// time to every sequence's first token, the generation rate all later tokens over the rest.
fn batch_trial(model: &lmx::Model, tokenizer: &lmx::TokenizerWrapper, prompts: &[Vec<u32>], params: &GenerateParams, kv: lmx::KvOptions) -> anyhow::Result<Trial> {
    let mut gen = lmx::BatchGenerator::new(&**model, tokenizer, prompts.len());
    for p in prompts {
        gen.insert(p, params.clone(), PromptCache::with_options(&**model, kv)?)?;
    }
    let start = std::time::Instant::now();
    let (mut first, mut later, mut peak, mut cache_bytes) = (0usize, 0usize, 0u64, 0usize);
    let mut gen_start = None;
    while !gen.is_empty() {
        cache_bytes = cache_bytes.max(gen.cache_nbytes());
        for (_, r) in gen.step()? {
            peak = r.peak_memory;
            if r.generation_tokens <= 1 {
                first += 1;
            } else {
                later += 1;
            }
        }
        if first == prompts.len() && gen_start.is_none() {
            gen_start = Some((std::time::Instant::now(), later));
        }
    }
    let prompt_secs = gen_start.map_or(0.0, |(t, _)| (t - start).as_secs_f64());
    let (gen_secs, before) = gen_start.map_or((0.0, 0), |(t, n)| (t.elapsed().as_secs_f64(), n));
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    Ok(Trial { prompt_tps: prompt_tokens as f64 / prompt_secs.max(1e-9), generation_tps: (later - before) as f64 / gen_secs.max(1e-9), peak_memory: peak, cache_bytes })
}
