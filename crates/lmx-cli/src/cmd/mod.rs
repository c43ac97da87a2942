//! One module per subcommand, plus the flags they share.

pub mod benchmark;
pub mod cache_prompt;
pub mod chat;
pub mod convert;
pub mod fuse;
pub mod generate;
pub mod launch;
pub mod lora;
pub mod perplexity;
pub mod serve;

use anyhow::Context;
use clap::Args as ClapArgs;

/// The default model: SmolLM2-135M-Instruct (see README for how to fetch it).
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The default model's Hugging Face id, used when the file above is absent.
pub const DEFAULT_HUB_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// Flags for choosing and loading a model.
#[derive(ClapArgs, Debug, Clone)]
pub struct ModelArgs {
    /// Model folder, .gguf file, or Hugging Face id (org/name): from the HF cache, downloaded
    /// if missing.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Device: auto (the GPU when this binary has CUDA and one is visible, else the CPU),
    /// cpu or cuda[:N].
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype (float32, float16, bfloat16); default: the checkpoint's.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Under `lmx launch`: split the model by layers (pipeline parallel: each rank holds a
    /// range of layers) instead of splitting every layer (tensor parallel, the default).
    #[arg(long)]
    pub pipeline: bool,
    /// Under `lmx launch`, tensor parallel: mixture-of-experts layers split whole experts
    /// over the ranks (expert parallel: one all-sum per layer, no expert cut) instead of
    /// splitting every expert's features.
    #[arg(long, conflicts_with = "pipeline")]
    pub expert_parallel: bool,
    /// LoRA/DoRA/full adapter folder (adapter_config.json + adapters.safetensors) from
    /// `lmx lora` or `mlx_lm.lora`.
    #[arg(long)]
    pub adapter_path: Option<std::path::PathBuf>,
}

impl ModelArgs {
    /// Loads the model and tokenizer these flags name.
    pub fn load(&self) -> anyhow::Result<(lmx::Model, lmx::TokenizerWrapper)> {
        let device = crate::dist::rank_device(lmx::core::parse_device(&self.device)?, &self.device)?;
        let dtype = self.dtype.as_deref().map(lmx::core::parse_dtype).transpose()?;
        let adapters = match self.adapter_path.as_deref() {
            Some(dir) => Some(lmx::AdapterOptions::from_dir(dir).with_context(|| format!("--adapter-path {}", dir.display()))?),
            None => None,
        };
        let loaded =
            load_model(&self.model, &lmx::LoadOptions { dtype, device, adapters, group: crate::dist::group(), pipeline: self.pipeline, expert_parallel: self.expert_parallel, ..Default::default() })?;
        crate::dist::loaded()?;
        Ok(loaded)
    }
}

/// The path of `--model`: as given, except that the default model falls back to the Hugging
/// Face cache outside the checkout.
pub fn resolve_model(model: &str) -> anyhow::Result<String> {
    if model != DEFAULT_MODEL || std::path::Path::new(DEFAULT_MODEL).exists() {
        return Ok(model.to_string());
    }
    let cached = lmx::io::hub::cached_snapshot(&lmx::io::hub::cache_dir(), DEFAULT_HUB_ID).ok();
    let Some(dir) = cached else {
        anyhow::bail!(
            "the default model ({DEFAULT_MODEL}) is not here and {DEFAULT_HUB_ID} is not in the Hugging Face cache: run scripts/fetch-default-model.sh in the lmx checkout (or `huggingface-cli download {DEFAULT_HUB_ID}`), or pass --model"
        );
    };
    Ok(dir.to_string_lossy().to_string())
}

/// Loads `model` (resolved as [`resolve_model`]) with `options`.
pub fn load_model(model: &str, options: &lmx::LoadOptions) -> anyhow::Result<(lmx::Model, lmx::TokenizerWrapper)> {
    let model = resolve_model(model)?;
    lmx::load_with(&model, options).with_context(|| format!("loading model `{model}`"))
}

/// KV cache flags (MLX LM's), shared by generate and chat.
#[derive(ClapArgs, Debug, Clone)]
pub struct KvArgs {
    /// Keep at most this many tokens' keys and values: a rotating cache that keeps the first 4
    /// tokens and the latest ones (long generations in bounded memory).
    #[arg(long)]
    pub max_kv_size: Option<usize>,
    /// Keep keys and values quantized to this many bits (2, 3, 4, 5, 6 or 8; MLX's affine format).
    #[arg(long)]
    pub kv_bits: Option<usize>,
    /// Elements sharing one scale and bias in the quantized cache (32, 64 or 128).
    #[arg(long, default_value_t = 64)]
    pub kv_group_size: usize,
    /// Quantize the cache once it holds this many tokens (with --kv-bits).
    #[arg(long, default_value_t = 5000)]
    pub quantized_kv_start: usize,
}

impl KvArgs {
    /// The cache options, checked.
    pub fn options(&self) -> anyhow::Result<lmx::KvOptions> {
        let opts = lmx::KvOptions { max_kv_size: self.max_kv_size, kv_bits: self.kv_bits, kv_group_size: self.kv_group_size, quantized_kv_start: self.quantized_kv_start };
        opts.validate().map_err(|e| anyhow::anyhow!("--max-kv-size / --kv-bits / --kv-group-size: {e}"))?;
        Ok(opts)
    }
}

/// `--prompt`: stdin for `-`, else the text with the literal escapes `\n` and `\t` replaced
/// (MLX LM does this for --prompt).
pub fn read_prompt(arg: &str) -> anyhow::Result<String> {
    if arg != "-" {
        return Ok(unescape(arg));
    }
    crate::dist::from_root(|| {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading the prompt from stdin")?;
        Ok(s)
    })
}

/// Replaces the literal escapes `\n` and `\t`.
pub fn unescape(s: &str) -> String {
    s.replace("\\n", "\n").replace("\\t", "\t")
}

/// The metadata a prompt cache file for `--model model` carries, `extra` added: `model` (checked
/// when it is loaded) and `tokenizer_config` (MLX LM's loader requires it; no extra settings).
pub fn cache_file_metadata(model: &str, extra: impl IntoIterator<Item = (String, String)>) -> std::collections::BTreeMap<String, String> {
    let mut meta = std::collections::BTreeMap::from([("model".to_string(), model.to_string()), ("tokenizer_config".to_string(), "{}".to_string())]);
    meta.extend(extra);
    meta
}

/// Loads `--prompt-cache-file path` for `model` (loaded from `--model model_arg`), refusing a
/// file made with another `--model`; returns the cache and the file's metadata.
pub fn load_prompt_cache(model: &lmx::Model, path: &std::path::Path, kv: lmx::KvOptions, model_arg: &str) -> anyhow::Result<(lmx::PromptCache, std::collections::BTreeMap<String, String>)> {
    let (cache, meta) = lmx::PromptCache::load(&**model, path, kv).with_context(|| format!("--prompt-cache-file {}", path.display()))?;
    if let Some(made_with) = meta.get("model").filter(|m| *m != model_arg) {
        anyhow::bail!("--prompt-cache-file {} was made with --model {made_with}, not {model_arg}: pass --model {made_with}", path.display());
    }
    Ok((cache, meta))
}

/// The chat template around one user message, split where the message goes: (the text
/// before it, the text after it, generation prompt included). A prompt cache file holds the
/// tokens of `before + cached prompt`; a prompt given with it adds `prompt + after`, as
/// MLX LM's `<query>` placeholder does.
pub fn query_split(tokenizer: &lmx::TokenizerWrapper, extra: Option<&serde_json::Value>) -> anyhow::Result<(String, String)> {
    const QUERY: &str = "<query>";
    let text = tokenizer.apply_chat_template(&[lmx::Message::new("user", QUERY.to_string())], None, extra)?;
    let at = text.find(QUERY).context("the chat template drops the user's message")?;
    Ok((text[..at].to_string(), text[at + QUERY.len()..].to_string()))
}

/// The sampling flags of generate and serve (MLX LM's names).
#[derive(ClapArgs, Debug, Clone)]
pub struct SamplingArgs {
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
}

/// Sampling flags shared by generate and chat.
/// Under `lmx launch` without `--seed`, rank 0 draws the seed and every rank uses it, so
/// all ranks sample the same tokens.
pub fn sampler(temp: f32, top_p: f32, top_k: usize, min_p: f32, seed: Option<u64>, repetition_penalty: Option<f32>) -> anyhow::Result<lmx::SamplerParams> {
    let seed = match seed {
        None if crate::dist::group().is_some() => Some(crate::dist::from_root(|| Ok(rand_seed()))?),
        s => s,
    };
    Ok(lmx::SamplerParams { temp, top_p, top_k, min_p, seed, repetition_penalty, ..Default::default() })
}

/// A seed from the clock and the process id.
fn rand_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// The chat template variables of `--chat-template-config` (a JSON object).
pub fn template_config(arg: Option<&str>) -> anyhow::Result<Option<serde_json::Value>> {
    let Some(text) = arg else { return Ok(None) };
    let value: serde_json::Value = serde_json::from_str(text).context("--chat-template-config must be a JSON object, e.g. '{\"enable_thinking\": false}'")?;
    anyhow::ensure!(value.is_object(), "--chat-template-config must be a JSON object, e.g. '{{\"enable_thinking\": false}}'");
    Ok(Some(value))
}

/// Human-readable gigabytes, as MLX LM prints peak memory.
pub fn gb(bytes: u64) -> String {
    format!("{:.3} GB", bytes as f64 / 1e9)
}
