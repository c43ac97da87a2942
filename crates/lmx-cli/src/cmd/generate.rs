//! `lmx generate`: the flags and output of `mlx_lm.generate`. stdout carries only the
//! generated text; statistics go to stderr.

use std::io::Write;

use anyhow::Context;
use lmx::{GenerateParams, Message, PromptCache};

use super::{gb, load_prompt_cache, query_split, read_prompt, sampler, template_config, unescape, KvArgs, ModelArgs, SamplingArgs};

/// Flags of `lmx generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub kv: KvArgs,
    /// The prompt; `-` reads it from stdin. Literal \n and \t are unescaped.
    #[arg(long, short = 'p', default_value = "hello")]
    pub prompt: String,
    /// Generate for every prompt in this file, decoding them together in batches: one prompt
    /// per line, or JSON lines with "prompt" (text) or "messages" (a chat). Writes one JSON
    /// line per prompt, in order, to stdout.
    #[arg(long, conflicts_with = "prompt")]
    pub prompts_file: Option<std::path::PathBuf>,
    /// Start from a cache saved by `lmx cache-prompt` (or mlx_lm.cache_prompt): the prompt
    /// continues the cached one.
    #[arg(long, conflicts_with = "prompts_file")]
    pub prompt_cache_file: Option<std::path::PathBuf>,
    /// A smaller model with the same tokenizer that drafts tokens for the model to check
    /// (speculative decoding); a folder, .gguf file or Hugging Face id.
    #[arg(long, conflicts_with_all = ["prompts_file", "prompt_cache_file"])]
    pub draft_model: Option<String>,
    /// Tokens the draft model proposes per step.
    #[arg(long, default_value_t = 3)]
    pub num_draft_tokens: usize,
    /// Most sequences decoding at once with --prompts-file.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// System prompt for the chat template.
    #[arg(long)]
    pub system_prompt: Option<String>,
    /// Most tokens to generate.
    #[arg(long, short = 'm', default_value_t = 100)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Random seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Penalty for tokens seen in the last 20 (1.0 = off).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Subtracted from the logit of each distinct token among the last 20 (0 = off).
    #[arg(long)]
    pub presence_penalty: Option<f32>,
    /// Subtracted from a token's logit once per occurrence among the last 20 (0 = off).
    #[arg(long)]
    pub frequency_penalty: Option<f32>,
    /// Added to the logits of token ids, as JSON, e.g. '{"198": -100}'.
    #[arg(long)]
    pub logit_bias: Option<String>,
    /// Encode the raw prompt (with special tokens) instead of applying the chat template.
    #[arg(long)]
    pub ignore_chat_template: bool,
    /// Extra chat template variables as JSON, e.g. '{"enable_thinking": false}'.
    #[arg(long)]
    pub chat_template_config: Option<String>,
    /// Token strings or ids that also end generation.
    #[arg(long, num_args = 1..)]
    pub extra_eos_token: Vec<String>,
    /// Keep generating until --max-tokens: EOS tokens are never sampled (as llama.cpp's
    /// --ignore-eos), so the text differs from a run that stops at EOS.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print statistics to stderr (true/false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub verbose: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let kv = args.kv.options()?;
    let prompts_file = match &args.prompts_file {
        Some(path) => Some(read_prompts(path)?),
        None => None,
    };
    let prompt_text = if prompts_file.is_some() { String::new() } else { read_prompt(&args.prompt)? };
    let extra = template_config(args.chat_template_config.as_deref())?;
    let (model, mut tokenizer) = args.model.load()?;
    crate::dist::refuse("--prompt-cache-file", args.prompt_cache_file.is_some())?;
    for tok in &args.extra_eos_token {
        let id = tok.parse::<u32>().ok().or_else(|| tokenizer.token_to_id(tok));
        let id = id.with_context(|| format!("--extra-eos-token `{tok}` is neither a token of this tokenizer nor a token id"))?;
        tokenizer.add_eos_token_id(id);
    }
    let encode = |prompt: Prompt| -> anyhow::Result<Vec<u32>> {
        let messages = match prompt {
            Prompt::Text(text) if args.ignore_chat_template || !tokenizer.has_chat_template() => return Ok(tokenizer.encode_prompt(&text)?),
            Prompt::Text(text) => {
                let mut messages = Vec::new();
                if let Some(system) = &args.system_prompt {
                    messages.push(Message::new("system", system.clone()));
                }
                messages.push(Message::new("user", text));
                messages
            }
            Prompt::Messages(messages) => messages,
        };
        Ok(tokenizer.chat_prompt(&messages, extra.as_ref())?)
    };
    let sampler = lmx::SamplerParams {
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        logit_bias: logit_bias(args.logit_bias.as_deref(), tokenizer.vocab_size())?,
        ..sampler(args.sampling.temp, args.sampling.top_p, args.sampling.top_k, args.sampling.min_p, args.seed, args.repetition_penalty)?
    };
    let params = GenerateParams { max_tokens: args.max_tokens, sampler, ignore_eos: args.ignore_eos, ..Default::default() };
    if let Some(prompts) = prompts_file {
        let texts: Vec<String> = prompts.iter().map(|(_, p)| p.label()).collect();
        let ids = prompts.into_iter().map(|(line, p)| encode(p).with_context(|| format!("--prompts-file line {line}"))).collect::<anyhow::Result<Vec<_>>>()?;
        return run_batch(&model, &tokenizer, &texts, &ids, params, args.batch_size, kv, args.verbose);
    }
    let (prompt, mut cache) = match &args.prompt_cache_file {
        // Rank 0's tokens for every rank under lmx launch (a template could differ by host).
        None => (crate::dist::from_root(|| encode(Prompt::Text(prompt_text)))?, PromptCache::with_options(&*model, kv)?),
        Some(path) => {
            let (cache, _) = load_prompt_cache(&model, path, kv, &args.model.model)?;
            // The prompt completes the cached one: the rest of the user's message and the
            // template's generation prompt.
            let rest = if args.ignore_chat_template || !tokenizer.has_chat_template() { prompt_text } else { format!("{prompt_text}{}", query_split(&tokenizer, extra.as_ref())?.1) };
            let mut prompt = cache.tokens().to_vec();
            prompt.extend(tokenizer.encode(&rest, false)?);
            (prompt, cache)
        }
    };
    let mut stdout = std::io::stdout().lock();
    let mut last = None;
    let mut print = |response: lmx::GenerationResponse| -> anyhow::Result<()> {
        stdout.write_all(response.text.as_bytes())?;
        stdout.flush()?;
        last = Some(response);
        Ok(())
    };
    let mut draft_stats = None;
    match &args.draft_model {
        None => {
            for response in lmx::stream_generate(&model, &tokenizer, &prompt, &mut cache, params) {
                print(response?)?;
            }
        }
        Some(draft) => {
            let options = lmx::LoadOptions { device: lmx::core::parse_device(&args.model.device)?, ..Default::default() };
            let (draft, _) = super::load_model(draft, &options).context("--draft-model")?;
            let mut draft_cache = PromptCache::with_options(&*draft, kv)?;
            let mut stream = lmx::speculative_generate(&model, &draft, &tokenizer, &prompt, &mut cache, &mut draft_cache, params, args.num_draft_tokens);
            for response in stream.by_ref() {
                print(response.context("--draft-model")?)?;
            }
            draft_stats = Some(stream.stats());
        }
    }
    writeln!(std::io::stdout())?;
    if let (true, Some(r)) = (args.verbose, last) {
        eprintln!("==========");
        eprintln!("Prompt: {} tokens, {:.3} tokens-per-sec", r.prompt_tokens, r.prompt_tps);
        eprintln!("Generation: {} tokens, {:.3} tokens-per-sec", r.generation_tokens, r.generation_tps);
        if let Some(d) = draft_stats {
            eprintln!(
                "Draft: {} of {} draft tokens accepted ({:.1}%), {:.2} tokens per pass of the model",
                d.accepted,
                d.drafted,
                100.0 * d.accepted as f64 / d.drafted.max(1) as f64,
                r.generation_tokens as f64 / d.rounds.max(1) as f64
            );
        }
        eprintln!("Peak memory: {}", gb(r.peak_memory));
    }
    Ok(())
}

/// One entry of `--prompts-file`.
enum Prompt {
    Text(String),
    Messages(Vec<Message>),
}

impl Prompt {
    /// What the output line echoes as "prompt".
    fn label(&self) -> String {
        match self {
            Prompt::Text(t) => t.clone(),
            Prompt::Messages(m) => m.last().map(|m| m.content.clone()).unwrap_or_default(),
        }
    }
}

/// The prompts of `path` with their line numbers: plain lines, or JSON objects with "prompt"
/// or "messages"; blank lines skipped.
fn read_prompts(path: &std::path::Path) -> anyhow::Result<Vec<(usize, Prompt)>> {
    let text = crate::dist::from_root(|| std::fs::read_to_string(path).with_context(|| format!("--prompts-file {}", path.display())))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("--prompts-file {} line {}", path.display(), i + 1);
        let prompt = if line.trim_start().starts_with('{') {
            let need = || format!("{}: a JSON line needs exactly one of \"prompt\" (text) or \"messages\" (a non-empty list of {{\"role\", \"content\"}})", at());
            let value: serde_json::Value = serde_json::from_str(line).with_context(need)?;
            match (value.get("prompt"), value.get("messages")) {
                (Some(serde_json::Value::String(p)), None) => Prompt::Text(p.clone()),
                (None, Some(serde_json::Value::Array(list))) if !list.is_empty() => {
                    let message = |m: &serde_json::Value| Some(Message::new(m.get("role")?.as_str()?, m.get("content")?.as_str()?.to_string()));
                    Prompt::Messages(list.iter().map(message).collect::<Option<Vec<_>>>().with_context(need)?)
                }
                _ => anyhow::bail!(need()),
            }
        } else {
            Prompt::Text(unescape(line))
        };
        prompts.push((i + 1, prompt));
    }
    anyhow::ensure!(!prompts.is_empty(), "--prompts-file {} holds no prompts", path.display());
    Ok(prompts)
}

/// `--prompts-file`: every prompt through continuous batches; a progress bar and totals on
/// stderr, a JSON line per prompt on stdout.
#[allow(clippy::too_many_arguments)]
fn run_batch(
    model: &lmx::Model,
    tokenizer: &lmx::TokenizerWrapper,
    texts: &[String],
    prompts: &[Vec<u32>],
    params: GenerateParams,
    batch_size: usize,
    kv: lmx::KvOptions,
    verbose: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(batch_size > 0, "--batch-size must be at least 1");
    let bar = indicatif::ProgressBar::new(prompts.len() as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} prompts, {msg} [{elapsed_precise}]").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    if !verbose {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let start = std::time::Instant::now();
    let mut generated = 0usize;
    let mut peak = 0;
    let outputs = lmx::batch_generate(model, tokenizer, prompts, params, batch_size, kv, |responses| {
        generated += responses.len();
        for (_, r) in responses {
            peak = r.peak_memory;
            if r.finish_reason.is_some() {
                bar.inc(1);
            }
        }
        bar.set_message(format!("{generated} tokens, {:.1} tokens-per-sec", generated as f64 / start.elapsed().as_secs_f64().max(1e-9)));
    })?;
    bar.finish_and_clear();
    let took = start.elapsed().as_secs_f64();
    let mut stdout = std::io::stdout().lock();
    for (text, out) in texts.iter().zip(&outputs) {
        let line = serde_json::json!({
            "prompt": text,
            "text": out.text,
            "finish_reason": out.finish_reason.map(|f| f.as_str()),
            "prompt_tokens": out.prompt_tokens,
            "generation_tokens": out.tokens.len(),
        });
        writeln!(stdout, "{line}")?;
    }
    if verbose {
        let prompt_tokens: usize = outputs.iter().map(|o| o.prompt_tokens).sum();
        eprintln!("==========");
        eprintln!("Prompts: {}, {prompt_tokens} tokens; batches of at most {batch_size}", outputs.len());
        eprintln!("Generation: {generated} tokens in {took:.2} s, {:.3} tokens-per-sec in all", generated as f64 / took.max(1e-9));
        eprintln!("Peak memory: {}", gb(peak));
    }
    Ok(())
}

/// `--logit-bias` as (token id, bias) pairs: a JSON object of id strings to numbers, every id
/// inside the vocabulary.
fn logit_bias(arg: Option<&str>, vocab: usize) -> anyhow::Result<Vec<(u32, f32)>> {
    let Some(text) = arg else { return Ok(Vec::new()) };
    let hint = "--logit-bias must be a JSON object of token ids to numbers, e.g. '{\"198\": -100}'";
    let map: std::collections::BTreeMap<String, f32> = serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{hint}: {e}"))?;
    let mut seen = std::collections::HashSet::new();
    map.into_iter()
        .map(|(k, v)| {
            let id: u32 = k.parse().map_err(|_| anyhow::anyhow!("{hint}: {k:?} is not a token id"))?;
            anyhow::ensure!((id as usize) < vocab, "--logit-bias: token id {id} is outside the vocabulary of {vocab} tokens");
            anyhow::ensure!(seen.insert(id), "--logit-bias: token id {id} is given twice");
            Ok((id, v))
        })
        .collect()
}
