//! `lmx chat`: an interactive chat (`mlx_lm.chat`). The whole conversation is rendered with
//! the chat template each turn and the prompt cache keeps the common prefix, so a turn
//! prefills only its new tokens. `q` quits, `r` resets, `s FILE` saves the session (its
//! KV cache and messages: `lmx chat --prompt-cache-file FILE` resumes it), `h` shows help.
//! Works from piped stdin.

use std::io::{BufRead, IsTerminal, Write};

use lmx::{GenerateParams, Message, PromptCache};

use super::{cache_file_metadata, load_prompt_cache, sampler, KvArgs, ModelArgs};

/// Flags of `lmx chat`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub kv: KvArgs,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens per reply.
    #[arg(long, short = 'm', default_value_t = 256)]
    pub max_tokens: usize,
    /// System prompt.
    #[arg(long)]
    pub system_prompt: Option<String>,
    /// Resume a session saved with `s FILE`.
    #[arg(long)]
    pub prompt_cache_file: Option<std::path::PathBuf>,
    /// Print how many tokens each turn prefilled and reused, to stderr.
    #[arg(long)]
    pub verbose: bool,
}

const HELP: &str = "The command list:\n- 'q' to exit\n- 'r' to reset the chat\n- 's FILE' to save the session (resume it with --prompt-cache-file FILE)\n- 'h' to display these commands";

/// The metadata key holding a saved session's messages (JSON).
const MESSAGES_KEY: &str = "chat_messages";

pub fn run(args: Args) -> anyhow::Result<()> {
    let kv = args.kv.options()?;
    let (model, tokenizer) = args.model.load()?;
    crate::dist::refuse("--prompt-cache-file", args.prompt_cache_file.is_some())?;
    anyhow::ensure!(tokenizer.has_chat_template(), "model `{}` has no chat template, so it cannot chat; use `lmx generate --ignore-chat-template`", args.model.model);
    let interactive = std::io::stdin().is_terminal() || std::env::var_os("LMX_STDIN_IS_TERMINAL").is_some();
    eprintln!("[INFO] Starting chat session with {}.\n{HELP}", args.model.model);
    let fresh = || args.system_prompt.iter().map(|s| Message::new("system", s.clone())).collect::<Vec<_>>();
    let (mut messages, mut cache) = match &args.prompt_cache_file {
        None => (fresh(), PromptCache::with_options(&*model, kv)?),
        Some(path) => resume(&model, path, kv, &args.model.model)?,
    };
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut out = std::io::stdout();
    loop {
        if interactive {
            eprint!(">> ");
        }
        // Under lmx launch, rank 0 reads the line and every rank gets it.
        let Some(query) = crate::dist::from_root(|| Ok(lines.next().transpose()?))? else { break };
        match query.trim() {
            "q" => break,
            "r" => {
                messages = fresh();
                cache.reset();
                continue;
            }
            "h" => {
                eprintln!("{HELP}");
                continue;
            }
            q if q.starts_with("s ") && crate::dist::group().is_some() => {
                eprintln!("[ERROR] Saving a session does not work under lmx launch yet (each rank holds only its shard of the KV cache).");
                continue;
            }
            q if q.starts_with("s ") => {
                let path = std::path::Path::new(q[2..].trim());
                let metadata = cache_file_metadata(&args.model.model, [(MESSAGES_KEY.to_string(), serde_json::to_string(&messages)?)]);
                match cache.save(path, &metadata) {
                    Ok(()) => eprintln!("[INFO] Saved the session ({} tokens) to {}.", cache.tokens().len(), path.display()),
                    Err(e) => eprintln!("[ERROR] Saving the session to {}: {e}", path.display()),
                }
                continue;
            }
            "" => continue,
            _ => {}
        }
        messages.push(Message::new("user", query));
        // Rank 0's tokens for every rank (a template that prints the date could differ by host).
        let prompt = crate::dist::from_root(|| Ok(tokenizer.chat_prompt(&messages, None)?))?;
        let params = GenerateParams { max_tokens: args.max_tokens, sampler: sampler(args.temp, args.top_p, 0, 0.0, Some(args.seed), None)?, ..Default::default() };
        let mut reply = String::new();
        let mut last = None;
        for r in lmx::stream_generate(&model, &tokenizer, &prompt, &mut cache, params) {
            let r = r?;
            out.write_all(r.text.as_bytes())?;
            out.flush()?;
            reply.push_str(&r.text);
            last = Some(r);
        }
        writeln!(out)?;
        if let (true, Some(r)) = (args.verbose, last) {
            eprintln!("[turn: {} prompt tokens, {} reused from the cache, {} prefilled; {} generated]", r.prompt_tokens, r.cached_tokens, r.prompt_tokens - r.cached_tokens, r.generation_tokens);
        }
        messages.push(Message::new("assistant", reply));
    }
    Ok(())
}

/// A session saved with `s FILE`: its messages and KV cache, for the same model.
fn resume(model: &lmx::Model, path: &std::path::Path, kv: lmx::KvOptions, model_arg: &str) -> anyhow::Result<(Vec<Message>, PromptCache)> {
    use anyhow::Context;
    let (cache, meta) = load_prompt_cache(model, path, kv, model_arg)?;
    let saved = meta
        .get(MESSAGES_KEY)
        .with_context(|| format!("--prompt-cache-file {} holds no chat session (save one with `s FILE` in lmx chat); a cache from cache-prompt goes to lmx generate", path.display()))?;
    let values: Vec<serde_json::Value> = serde_json::from_str(saved).with_context(|| format!("--prompt-cache-file {}: {MESSAGES_KEY}", path.display()))?;
    let messages = values
        .iter()
        .map(|m| Some(Message::new(m.get("role")?.as_str()?, m.get("content")?.as_str()?.to_string())))
        .collect::<Option<Vec<_>>>()
        .with_context(|| format!("--prompt-cache-file {}: {MESSAGES_KEY} must be a list of {{\"role\", \"content\"}}", path.display()))?;
    eprintln!("[INFO] Resumed a session of {} messages ({} cached tokens).", messages.len(), cache.tokens().len());
    Ok((messages, cache))
}
