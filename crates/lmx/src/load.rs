//! `lmx::load`: a model folder, GGUF file or hub id in, a runnable model and its tokenizer out.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lmx_core::{DType, Device};
use lmx_dist::Group;
use lmx_io::{ChatTemplate, FineTuneType, LoraParameters, Message, ModelFiles, ModelSource, Tokenizer};
use lmx_models::CausalLm;
use lmx_nn::{AdapterPlan, Builder, Training};
use serde_json::Value;

use crate::Result;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype; None computes in the dtype the weights are stored in, as MLX LM does
    /// (for quantized models, that of the scales; for GGUF files float32 on the CPU, as
    /// llama.cpp's CPU path computes, and bfloat16 on a GPU, where f32 prefill ran at a tenth
    /// of the speed: Llama-3-8B-shaped Q4_0 on an H100, 2.9k against 28.4k tok/s).
    pub dtype: Option<DType>,
    /// Where the weights go.
    pub device: Device,
    /// Fine-tuning adapters to attach (an adapter folder, or a fresh setup to train).
    pub adapters: Option<AdapterOptions>,
    /// The group this process is one rank of (None: the whole model here): tensor parallel
    /// (each rank holds a share of every layer's heads and features) unless `pipeline`.
    pub group: Option<Arc<dyn Group>>,
    /// With `group`: pipeline parallel instead, each rank holding a contiguous range of
    /// layers (as many as its share of its host's memory allows, relative to the others)
    /// and passing hidden states on to the next.
    pub pipeline: bool,
    /// With `group` (tensor parallel): mixture-of-experts blocks split whole experts over the
    /// ranks (expert parallel) instead of each expert's features.
    pub expert_parallel: bool,
    /// A GGUF file's quantized matrices dequantized to float32 (the weights `lmx convert
    /// --gguf` writes, multiplied with float activations) instead of kept packed and
    /// multiplied as llama.cpp does, with activations rounded to int8 (the default: a quarter
    /// of the memory, several times the decode speed; Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and
    /// Q5_K exactly, Q6_K, Q3_K and Q2_K requantized to 8 bits, within half a step).
    pub dequantize_gguf: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: None, device: Device::Cpu, adapters: None, group: None, pipeline: false, expert_parallel: false, dequantize_gguf: false }
    }
}

/// Which adapters a model gets while it is built (see [`lmx_io::adapters`]).
#[derive(Debug, Clone)]
pub struct AdapterOptions {
    /// LoRA, DoRA or full fine-tuning.
    pub kind: FineTuneType,
    /// Layers adapted, counted from the last (-1: all).
    pub num_layers: i64,
    /// Rank, scale, dropout, keys.
    pub params: LoraParameters,
    /// Make the adapter tensors trainable variables (f32).
    pub trainable: bool,
    /// Seed of new `lora_a` values and dropout masks.
    pub seed: u64,
    /// Saved adapter tensors to start from (`adapters.safetensors`).
    pub weights_file: Option<PathBuf>,
}

impl AdapterOptions {
    /// The adapters of a folder `lmx lora` or `mlx_lm.lora` wrote, for inference.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = lmx_io::adapters::read_adapter_config(dir)?;
        Ok(Self {
            kind: config.fine_tune_type,
            num_layers: config.num_layers,
            params: config.lora_parameters.unwrap_or_default(),
            trainable: false,
            seed: 0,
            weights_file: Some(dir.join(lmx_io::adapters::ADAPTER_FILE)),
        })
    }
}

/// A loaded model: the architecture behind [`CausalLm`] plus its config.json.
pub struct Model {
    inner: Box<dyn CausalLm>,
    model_type: String,
    config: Value,
    dtype: DType,
    training: Option<Arc<Training>>,
}

impl Model {
    /// The Hugging Face `model_type`.
    pub fn model_type(&self) -> &str {
        &self.model_type
    }
    /// config.json as loaded (rebuilt from metadata for GGUF files).
    pub fn config(&self) -> &Value {
        &self.config
    }
    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The training state (trainable tensors, training/evaluation switch), when the model
    /// was loaded with trainable adapters.
    pub fn training(&self) -> Option<&Arc<Training>> {
        self.training.as_ref()
    }
    /// Number of transformer layers (config.json `num_hidden_layers`).
    pub fn num_layers(&self) -> usize {
        num_layers(&self.config)
    }
}

fn num_layers(config: &Value) -> usize {
    config.get("num_hidden_layers").and_then(Value::as_u64).unwrap_or(0) as usize
}

impl Deref for Model {
    type Target = dyn CausalLm;
    fn deref(&self) -> &Self::Target {
        &*self.inner
    }
}

/// A tokenizer with the model's chat template and stop tokens.
pub struct TokenizerWrapper {
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    eos_token_ids: Vec<u32>,
    /// The model's context in tokens: prompts longer than it are refused before encoding.
    context: usize,
}

impl TokenizerWrapper {
    /// Every id that ends generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Adds an id that ends generation (`--extra-eos-token`).
    pub fn add_eos_token_id(&mut self, id: u32) {
        if !self.eos_token_ids.contains(&id) {
            self.eos_token_ids.push(id);
        }
    }

    /// The compiled chat template, if the model ships one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// True when the model ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the chat template (generation prompt added). `extra` carries
    /// template variables (`--chat-template-config`).
    /// `messages` are [`Message`]s or any serializable message objects (a server's, with
    /// `tool_calls` and `tool_call_id`); `tools` is the OpenAI tool list.
    pub fn apply_chat_template<M: serde::Serialize>(&self, messages: &[M], tools: Option<&Value>, extra: Option<&Value>) -> Result<String> {
        match &self.chat_template {
            Some(t) => Ok(t.render(messages, true, tools, extra)?),
            None => Err(lmx_io::IoError::Template("this model has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja); use --ignore-chat-template".into()).into()),
        }
    }

    /// Token ids for a chat: the template's rendering, encoded without adding special tokens
    /// again (the template wrote them), as transformers' `apply_chat_template(tokenize=True)`.
    pub fn chat_prompt(&self, messages: &[Message], extra: Option<&Value>) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, None, extra)?;
        self.encode_rendered(&text)
    }

    /// Token ids of a rendered chat template (no special tokens added again); a text that
    /// cannot fit in the model's context is refused before encoding.
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode_within(text, false, self.context)?)
    }

    /// The model's context in tokens (max_position_embeddings).
    pub fn context(&self) -> usize {
        self.context
    }

    /// Token ids of a plain prompt (special tokens added as the tokenizer's post-processor
    /// says); a text that cannot fit in the model's context is refused before encoding.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode_within(text, true, self.context)?)
    }
}

impl Deref for TokenizerWrapper {
    type Target = Tokenizer;
    fn deref(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// Loads a model folder, a `.gguf` file or a cached hub id (`org/name`) on the CPU, in the
/// checkpoint's dtype.
pub fn load(model: &str) -> Result<(Model, TokenizerWrapper)> {
    load_with(model, &LoadOptions::default())
}

/// Loads with explicit dtype, device, adapters and tensor-parallel group.
pub fn load_with(model: &str, options: &LoadOptions) -> Result<(Model, TokenizerWrapper)> {
    let source = ModelSource::resolve(model)?;
    // GGUF projections in 4-, 5- and 8-bit blocks stay packed, as llama.cpp runs them.
    let files = ModelFiles::load(source, None, !options.dequantize_gguf)?;
    let model_type = files.model_type()?;
    let dtype = options.dtype.unwrap_or_else(|| match files.compute_dtype() {
        DType::F32 if matches!(files.source, ModelSource::Gguf(_)) && options.device.is_cuda() => DType::BF16,
        // The CPU has no f16 arithmetic: an f16 checkpoint computes in f32, its matrices read
        // as stored (`Weight::Half`), at bf16's speed where candle's f16 products ran at a
        // third of it.
        DType::F16 if options.device.is_cpu() => DType::F32,
        stored => stored,
    });
    let mut vb = Builder::new(files.weights.clone(), dtype, &options.device).with_quantization(files.quantization.clone());
    match &options.group {
        Some(group) if options.pipeline => {
            // Layers in proportion to each rank's share of its host's memory (once every rank
            // got here: resolving or downloading the model takes each its own time).
            group.barrier(lmx_dist::Wait::For(std::time::Duration::from_secs(600)))?;
            let mine = lmx_core::Tensor::new(&[lmx_dist::memory_share()], &lmx_core::Device::Cpu)?;
            let weights = group.all_gather(&mine, 0)?.to_vec1::<f64>()?;
            vb = vb.with_weighted_pipeline(group.clone(), weights);
        }
        Some(group) if options.expert_parallel => vb = vb.with_group(group.clone()).with_expert_parallel(),
        Some(group) => vb = vb.with_group(group.clone()),
        None => {}
    }
    let mut training = None;
    if let Some(a) = &options.adapters {
        let mut plan = AdapterPlan::new(a.kind, a.num_layers, num_layers(&files.config), a.params.clone(), a.seed)?;
        if let Some(file) = &a.weights_file {
            plan = plan.with_saved(lmx_io::adapters::load_adapter_file(file)?, &file.display().to_string());
        }
        vb = vb.with_adapters(Arc::new(plan));
        if a.trainable {
            let t = Arc::new(Training::new());
            vb = vb.with_training(t.clone());
            training = Some(t);
        }
    }
    let inner = lmx_models::load_model(&model_type, &files.config, &vb)?;
    vb.finish(lmx_models::registry::is_ignored_key)?;
    drop(vb);
    // The file's copies of the weights, handed over to the model, are free now.
    lmx_io::model_files::release_freed_memory();
    let chat_template = files.compile_chat_template()?;
    let eos_token_ids = files.eos_token_ids();
    let ModelFiles { config, tokenizer, .. } = files;
    let context = inner.max_position_embeddings();
    Ok((Model { inner, model_type, config, dtype, training }, TokenizerWrapper { tokenizer, chat_template, eos_token_ids, context }))
}
