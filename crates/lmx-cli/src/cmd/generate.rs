//! `lmx generate`: the flags and output of `mlx_lm.generate`. stdout carries only the
//! generated text; statistics go to stderr.

use std::io::{Read, Write};

use anyhow::Context;
use lmx::{GenerateParams, Message, PromptCache};

use super::{gb, sampler, template_config, ModelArgs};

/// Flags of `lmx generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt; `-` reads it from stdin. Literal \n and \t are unescaped.
    #[arg(long, short = 'p', default_value = "hello")]
    pub prompt: String,
    /// System prompt for the chat template.
    #[arg(long)]
    pub system_prompt: Option<String>,
    /// Most tokens to generate.
    #[arg(long, short = 'm', default_value_t = 100)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Min-p sampling threshold (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
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
    /// Keep generating past EOS until --max-tokens (as llama.cpp's --ignore-eos).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print statistics to stderr (true/false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub verbose: bool,
}

/// Replaces the literal escapes `\n` and `\t` (MLX LM does this for --prompt).
fn unescape(s: &str) -> String {
    s.replace("\\n", "\n").replace("\\t", "\t")
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let prompt_text = if args.prompt == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("reading the prompt from stdin")?;
        s
    } else {
        unescape(&args.prompt)
    };
    let extra = template_config(args.chat_template_config.as_deref())?;
    let (model, mut tokenizer) = args.model.load()?;
    for tok in &args.extra_eos_token {
        let id = tok.parse::<u32>().ok().or_else(|| tokenizer.token_to_id(tok));
        let id = id.with_context(|| format!("--extra-eos-token `{tok}` is neither a token of this tokenizer nor a token id"))?;
        tokenizer.add_eos_token_id(id);
    }
    let prompt = if args.ignore_chat_template || !tokenizer.has_chat_template() {
        tokenizer.encode_prompt(&prompt_text)?
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system_prompt {
            messages.push(Message::new("system", system.clone()));
        }
        messages.push(Message::new("user", prompt_text));
        tokenizer.chat_prompt(&messages, extra.as_ref())?
    };
    let sampler = lmx::SamplerParams {
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        logit_bias: logit_bias(args.logit_bias.as_deref(), tokenizer.vocab_size())?,
        ..sampler(args.temp, args.top_p, args.top_k, args.min_p, args.seed, args.repetition_penalty)
    };
    let params = GenerateParams { max_tokens: args.max_tokens, sampler, ignore_eos: args.ignore_eos, ..Default::default() };
    let mut cache = PromptCache::new(&*model);
    let mut stdout = std::io::stdout().lock();
    let mut last = None;
    for response in lmx::stream_generate(&model, &tokenizer, &prompt, &mut cache, params) {
        let response = response?;
        stdout.write_all(response.text.as_bytes())?;
        stdout.flush()?;
        last = Some(response);
    }
    writeln!(stdout)?;
    if let (true, Some(r)) = (args.verbose, last) {
        eprintln!("==========");
        eprintln!("Prompt: {} tokens, {:.3} tokens-per-sec", r.prompt_tokens, r.prompt_tps);
        eprintln!("Generation: {} tokens, {:.3} tokens-per-sec", r.generation_tokens, r.generation_tps);
        eprintln!("Peak memory: {}", gb(r.peak_memory));
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
