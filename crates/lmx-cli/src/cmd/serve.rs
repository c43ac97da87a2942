//! `lmx serve`: the OpenAI-compatible HTTP server (`mlx_lm.server`'s flags, plus the KV
//! cache flags, `--api-key` and the queue bound).

use anyhow::Context;

use super::{template_config, KvArgs, ModelArgs, SamplingArgs};

/// Flags of `lmx serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub kv: KvArgs,
    /// Address to listen on; 127.0.0.1 keeps the server on this machine (0.0.0.0 opens it to
    /// the network: set --api-key then).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the chosen address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require this key from clients (`Authorization: Bearer KEY` or `x-api-key: KEY`).
    /// Also read from LMX_API_KEY.
    #[arg(long, env = "LMX_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Sampling of requests that set none.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Default most tokens per answer.
    #[arg(long, short = 'm', default_value_t = 512)]
    pub max_tokens: usize,
    /// Chat template variables for every request, a JSON object (e.g.
    /// '{"enable_thinking": false}'); a request's chat_template_kwargs go over them.
    #[arg(long)]
    pub chat_template_args: Option<String>,
    /// Sequences decoding together in the continuous batch.
    #[arg(long, default_value_t = 32)]
    pub decode_concurrency: usize,
    /// Sequences that may wait for a decoding slot; beyond, requests get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Prompt caches kept across requests (their common prefixes are not processed again).
    #[arg(long, default_value_t = 10)]
    pub prompt_cache_size: usize,
    /// Most memory those caches may hold, e.g. 512MB or 8GB.
    #[arg(long, default_value = "2GB")]
    pub prompt_cache_bytes: String,
    /// Largest request body accepted, bytes.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Models a request may load by naming them (folders, .gguf files or Hub ids), loaded
    /// with this server's --device and --dtype; other names get 404.
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    pub allowed_models: Vec<String>,
    /// Most models kept loaded at once (the least recently used is unloaded).
    #[arg(long, default_value_t = 1)]
    pub max_loaded_models: usize,
    /// A smaller model with the same tokenizer that drafts tokens for speculative decoding
    /// (requests are then decoded one at a time, as with mlx_lm.server).
    #[arg(long)]
    pub draft_model: Option<String>,
    /// Tokens the draft model proposes per verification.
    #[arg(long, default_value_t = 3)]
    pub num_draft_tokens: usize,
    /// Origins browsers may call the server from, comma-separated (* for any).
    #[arg(long, default_value = "*", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
}

/// `8GB`, `512MB`, `1.5GiB`, `1000000`.
pub fn parse_size(text: &str) -> anyhow::Result<usize> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.trim().parse().with_context(|| format!("`{text}` is not a size: use a number of bytes or e.g. 512MB, 8GB"))?;
    let scale = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "K" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        u => anyhow::bail!("`{text}`: unknown unit `{u}`; use B, KB, MB, GB, TB, KiB, MiB or GiB"),
    };
    anyhow::ensure!(value.is_finite() && value >= 0.0, "`{text}` is not a size");
    Ok((value * scale) as usize)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let kv = args.kv.options()?;
    let prompt_cache_bytes = parse_size(&args.prompt_cache_bytes).context("--prompt-cache-bytes")?;
    let chat_template_args = template_config(args.chat_template_args.as_deref()).map_err(|e| anyhow::anyhow!("{e}").context("--chat-template-args"))?;
    anyhow::ensure!(args.decode_concurrency >= 1, "--decode-concurrency must be at least 1");
    anyhow::ensure!(args.max_tokens >= 1, "--max-tokens must be at least 1");
    let s = &args.sampling;
    let defaults = lmx_server::Defaults { temperature: s.temp, top_p: s.top_p, top_k: s.top_k, min_p: s.min_p, max_tokens: args.max_tokens, chat_template_args };
    super::sampler(s.temp, s.top_p, s.top_k, s.min_p, None, None)?.validate().context("--temp / --top-p / --min-p")?;
    let group = crate::dist::group();
    if group.is_some() {
        anyhow::ensure!(args.draft_model.is_none(), "--draft-model does not work with lmx serve under lmx launch yet (the speculative engine runs one rank's model); run without launch");
        anyhow::ensure!(args.allowed_models.is_empty(), "--allowed-models does not work under lmx launch (a model a request names would load on rank 0 alone); run without launch");
    }
    let (model, tokenizer) = args.model.load()?;
    let device = lmx::core::parse_device(&args.model.device)?;
    let dtype = args.model.dtype.as_deref().map(lmx::core::parse_dtype).transpose()?;
    let draft = match &args.draft_model {
        Some(name) => {
            anyhow::ensure!(args.num_draft_tokens >= 1, "--num-draft-tokens must be at least 1");
            anyhow::ensure!(args.kv.max_kv_size.is_none(), "--draft-model cannot be used with --max-kv-size: speculative decoding rewinds the cache, which a rotating cache cannot");
            let (draft, _) = super::load_model(name, &lmx::LoadOptions { dtype, device: device.clone(), ..Default::default() }).context("--draft-model")?;
            anyhow::ensure!(
                draft.vocab_size() == model.vocab_size(),
                "--draft-model {name} has a vocabulary of {} tokens but --model {} has {}: a draft model must share the model's tokenizer",
                draft.vocab_size(),
                args.model.model,
                model.vocab_size()
            );
            Some(lmx_server::Draft { model: std::sync::Arc::new(draft), num_draft_tokens: args.num_draft_tokens })
        }
        None => None,
    };
    let loader: lmx_server::Loader =
        std::sync::Arc::new(move |name: &str| super::load_model(name, &lmx::LoadOptions { dtype, device: device.clone(), ..Default::default() }).map_err(|e| format!("{e:#}")));
    let stem = std::path::Path::new(&args.model.model).file_stem().map(|s| s.to_string_lossy().to_string());
    let opts = lmx_server::ServeOptions {
        model_id: args.model.model.clone(),
        aliases: stem.into_iter().collect(),
        api_key: args.api_key.filter(|k| !k.is_empty()),
        max_body_bytes: args.max_body_bytes,
        defaults,
        engine: lmx_server::EngineOptions {
            decode_concurrency: args.decode_concurrency,
            max_queue: args.max_queue,
            prompt_cache_size: args.prompt_cache_size,
            prompt_cache_bytes,
            kv,
            lockstep: group.clone(),
        },
        allowed_models: args.allowed_models.clone(),
        max_loaded_models: args.max_loaded_models,
        allowed_origins: args.allowed_origins.clone(),
    };
    // Under `lmx launch`, rank 0 serves and the other ranks follow its engine step by step.
    if let Some(g) = group.filter(|g| g.rank() != 0) {
        return lmx_server::lockstep::follow(&model, &tokenizer, &opts.engine, &*g).map_err(|e| anyhow::anyhow!(e));
    }
    if args.host != "127.0.0.1" && args.host != "localhost" && args.host != "::1" && opts.api_key.is_none() {
        eprintln!("[WARNING] listening on {} without --api-key: anyone who can reach this address can use the model", args.host);
    }
    let router = lmx_server::router(model, tokenizer, opts, Some(loader), draft);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("lmx-http").enable_all().build().context("starting the HTTP runtime")?;
    let model_name = args.model.model.clone();
    runtime.block_on(lmx_server::serve(router, &args.host, args.port, |addr| {
        eprintln!("[INFO] serving {model_name} at http://{addr}/v1 (POST /v1/chat/completions, /v1/completions, /v1/responses, /v1/messages; GET /v1/models, /health)");
    }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8GB").ok(), Some(8_000_000_000));
        assert_eq!(parse_size("512 MiB").ok(), Some(512 << 20));
        assert_eq!(parse_size("1000").ok(), Some(1000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }
}
