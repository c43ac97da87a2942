//! `lmx benchmark`: prompt and generation throughput on random tokens (`mlx_lm.benchmark`).

use lmx::{GenerateParams, PromptCache};

use super::{gb, ModelArgs};

/// Flags of `lmx benchmark`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, short = 'p', default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens to generate (EOS is ignored, so exactly this many).
    #[arg(long, short = 'g', default_value_t = 1024)]
    pub generation_tokens: usize,
    /// Batch size (only 1 is supported so far).
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
    anyhow::ensure!(args.batch_size == 1, "--batch-size {} is not supported yet: lmx benchmarks batch size 1", args.batch_size);
    anyhow::ensure!(args.prompt_tokens > 0 && args.num_trials > 0, "--prompt-tokens and --num-trials must be at least 1");
    let (model, tokenizer) = args.model.load()?;
    // Deterministic pseudo-random prompt (a linear congruential sequence over the vocabulary).
    let vocab = model.vocab_size() as u64;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let prompt: Vec<u32> = (0..args.prompt_tokens)
        .map(|_| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % vocab) as u32
        })
        .collect();
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| std::thread::available_parallelism().map_or(1, |n| n.get()).to_string());
    eprintln!("Running benchmark: model={} dtype={:?} prompt_tokens={} generation_tokens={} threads={threads}", args.model.model, model.dtype(), args.prompt_tokens, args.generation_tokens);
    let params = || GenerateParams { max_tokens: args.generation_tokens, ignore_eos: true, prefill_step_size: args.prefill_step_size, ..Default::default() };
    let trial = || -> anyhow::Result<lmx::GenerationResponse> {
        let mut cache = PromptCache::new(&*model);
        let mut last = None;
        for r in lmx::stream_generate(&model, &tokenizer, &prompt, &mut cache, params()) {
            last = Some(r?);
        }
        last.ok_or_else(|| anyhow::anyhow!("no tokens were generated"))
    };
    trial()?; // warm-up
    let (mut p, mut g, mut m) = (0.0, 0.0, 0u64);
    for i in 0..args.num_trials {
        if args.delay > 0.0 {
            std::thread::sleep(std::time::Duration::from_secs_f64(args.delay));
        }
        let r = trial()?;
        println!("Trial {}: prompt_tps={:.3}, generation_tps={:.3}, peak_memory={}", i + 1, r.prompt_tps, r.generation_tps, gb(r.peak_memory));
        p += r.prompt_tps;
        g += r.generation_tps;
        m = m.max(r.peak_memory);
    }
    let n = args.num_trials as f64;
    println!("Averages: prompt_tps={:.3}, generation_tps={:.3}, peak_memory={}", p / n, g / n, gb(m));
    Ok(())
}
