//! `lmx::load`: a model folder, GGUF file or hub id in, a runnable model and its tokenizer out.

use std::ops::Deref;

use lmx_core::{DType, Device};
use lmx_io::{ChatTemplate, Message, ModelFiles, ModelSource, Tokenizer};
use lmx_models::CausalLm;
use serde_json::Value;

use crate::Result;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype; None keeps the checkpoint's (float32 for GGUF files).
    pub dtype: Option<DType>,
    /// Where the weights go.
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: None, device: Device::Cpu }
    }
}

/// A loaded model: the architecture behind [`CausalLm`] plus its config.json.
pub struct Model {
    inner: Box<dyn CausalLm>,
    model_type: String,
    config: Value,
    dtype: DType,
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

    /// True when the model ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the chat template (generation prompt added). `extra` carries
    /// template variables (`--chat-template-config`).
    pub fn apply_chat_template(&self, messages: &[Message], tools: Option<&Value>, extra: Option<&Value>) -> Result<String> {
        match &self.chat_template {
            Some(t) => Ok(t.render(messages, true, tools, extra)?),
            None => Err(lmx_io::IoError::Template("this model has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja); use --ignore-chat-template".into()).into()),
        }
    }

    /// Token ids for a chat: the template's rendering, encoded without adding special tokens
    /// again (the template wrote them), as transformers' `apply_chat_template(tokenize=True)`.
    pub fn chat_prompt(&self, messages: &[Message], extra: Option<&Value>) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, None, extra)?;
        Ok(self.tokenizer.encode(&text, false)?)
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

/// Loads with explicit dtype and device.
pub fn load_with(model: &str, options: &LoadOptions) -> Result<(Model, TokenizerWrapper)> {
    let source = ModelSource::resolve(model)?;
    let files = ModelFiles::load(source, options.dtype, &options.device)?;
    let model_type = files.model_type()?;
    let dtype = files.weights.dtype();
    let inner = lmx_models::load_model(&model_type, &files.config, &files.weights.root())?;
    files.weights.finish(lmx_models::registry::is_ignored_key)?;
    let chat_template = files.compile_chat_template()?;
    let eos_token_ids = files.eos_token_ids();
    let ModelFiles { config, tokenizer, .. } = files;
    Ok((Model { inner, model_type, config, dtype }, TokenizerWrapper { tokenizer, chat_template, eos_token_ids }))
}
