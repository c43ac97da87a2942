//! `lmx cache-prompt`: the flags of `mlx_lm.cache_prompt`. Runs a prompt through the model
//! once and saves its keys and values (MLX LM's prompt cache file format), so that
//! `lmx generate --prompt-cache-file` starts after it.

use anyhow::Context;
use lmx::PromptCache;

use super::{cache_file_metadata, gb, query_split, read_prompt, template_config, KvArgs, ModelArgs};

/// Flags of `lmx cache-prompt`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub kv: KvArgs,
    /// The file to write (safetensors).
    #[arg(long)]
    pub prompt_cache_file: std::path::PathBuf,
    /// The prompt to cache; `-` reads it from stdin. With a chat template it opens the user's
    /// message, which the prompt given to generate completes.
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Encode the raw prompt instead of applying the chat template.
    #[arg(long)]
    pub ignore_chat_template: bool,
    /// Extra chat template variables as JSON, e.g. '{"enable_thinking": false}'.
    #[arg(long)]
    pub chat_template_config: Option<String>,
    /// Prompt tokens processed per forward pass.
    #[arg(long, default_value_t = 2048)]
    pub prefill_step_size: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let kv = args.kv.options()?;
    let extra = template_config(args.chat_template_config.as_deref())?;
    let text = read_prompt(&args.prompt)?;
    let (model, tokenizer) = args.model.load()?;
    let tokens = if args.ignore_chat_template || !tokenizer.has_chat_template() {
        tokenizer.encode_prompt(&text)?
    } else {
        let (before, _) = query_split(&tokenizer, extra.as_ref())?;
        tokenizer.encode(&format!("{before}{text}"), false)?
    };
    let start = std::time::Instant::now();
    let mut cache = PromptCache::with_options(&*model, kv)?;
    cache.extend(&*model, &tokens, args.prefill_step_size)?;
    let took = start.elapsed().as_secs_f64();
    let metadata = cache_file_metadata(&args.model.model, []);
    cache.save(&args.prompt_cache_file, &metadata).with_context(|| format!("--prompt-cache-file {}", args.prompt_cache_file.display()))?;
    eprintln!("Prompt: {} tokens, {:.3} tokens-per-sec", tokens.len(), tokens.len() as f64 / took.max(1e-9));
    eprintln!("Saved the cache ({}) to {}", gb(cache.nbytes() as u64), args.prompt_cache_file.display());
    Ok(())
}
