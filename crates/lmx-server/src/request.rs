//! What every API's requests share: the JSON body read with errors that name the field, the
//! sampling fields turned into checked [`GenerateParams`], stop strings, and chat messages
//! normalized for the model's chat template.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use lmx::{GenerateParams, SamplerParams};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::models::Served;
use crate::{ApiError, App};

/// Reads a request body as a JSON object: 413 when it is over the limit, 400 when it is not
/// JSON or not an object.
pub(crate) fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "the request body is larger than this server accepts (lmx serve --max-body-bytes)")
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}"))
        }
    })?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "the request body must be a JSON object"));
    }
    Ok(value)
}

/// The fields `T` describes, read from a request body; 400 naming the field when one has the
/// wrong type or a required one is missing (unknown fields are ignored: clients send many).
pub(crate) fn fields<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::new(StatusCode::BAD_REQUEST, format!("{inner}"))
        } else {
            ApiError::invalid(path.clone(), format!("`{path}`: {inner}"))
        }
    })
}

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub(crate) fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// The sampling and length fields of OpenAI's chat and completions requests (MLX LM's
/// server adds `top_k`, `min_p`, `repetition_penalty` and the context sizes).
#[derive(Debug, Deserialize, Default)]
pub(crate) struct Sampling {
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub repetition_penalty: Option<f32>,
    pub repetition_context_size: Option<usize>,
    pub presence_penalty: Option<f32>,
    pub presence_context_size: Option<usize>,
    pub frequency_penalty: Option<f32>,
    pub frequency_context_size: Option<usize>,
    pub logit_bias: Option<BTreeMap<String, f32>>,
    pub stop: Option<Stop>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<usize>,
    pub n: Option<usize>,
}

/// Most choices one request may ask for.
pub(crate) const MAX_N: usize = 16;

impl Sampling {
    /// The checked generation settings, the server's defaults filling what is unset.
    pub(crate) fn params(&self, app: &App, served: &Served) -> Result<GenerateParams, ApiError> {
        let d = &app.opts.defaults;
        let max_tokens = self.max_completion_tokens.or(self.max_tokens).unwrap_or(d.max_tokens);
        if max_tokens == 0 {
            return Err(ApiError::invalid("max_tokens", "`max_tokens` must be at least 1"));
        }
        let vocab = served.model.vocab_size();
        let mut logit_bias = Vec::new();
        for (k, &v) in self.logit_bias.iter().flatten() {
            let id: u32 = k.parse().map_err(|_| ApiError::invalid("logit_bias", format!("`logit_bias` keys are token ids; `{k}` is not one")))?;
            if id as usize >= vocab {
                return Err(ApiError::invalid("logit_bias", format!("`logit_bias`: token id {id} is outside the vocabulary of {vocab}")));
            }
            if !(-100.0..=100.0).contains(&v) {
                return Err(ApiError::invalid("logit_bias", format!("`logit_bias` values go from -100 to 100; token {id} has {v}")));
            }
            logit_bias.push((id, v));
        }
        let top_logprobs = match (self.logprobs, self.top_logprobs) {
            (_, Some(n)) if n > 20 => return Err(ApiError::invalid("top_logprobs", format!("`top_logprobs` goes from 0 to 20, not {n}"))),
            (Some(true), n) => n.unwrap_or(0),
            (_, Some(n)) if n > 0 => return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
            _ => 0,
        };
        let sampler = SamplerParams {
            temp: self.temperature.unwrap_or(d.temperature),
            top_p: self.top_p.unwrap_or(d.top_p),
            top_k: self.top_k.unwrap_or(d.top_k),
            min_p: self.min_p.unwrap_or(d.min_p),
            seed: self.seed,
            repetition_penalty: self.repetition_penalty.filter(|&p| p != 0.0),
            repetition_context_size: self.repetition_context_size.unwrap_or(20),
            presence_penalty: self.presence_penalty.filter(|&p| p != 0.0),
            presence_context_size: self.presence_context_size.unwrap_or(20),
            frequency_penalty: self.frequency_penalty.filter(|&p| p != 0.0),
            frequency_context_size: self.frequency_context_size.unwrap_or(20),
            logit_bias,
            ..SamplerParams::default()
        };
        sampler.validate().map_err(|e| match e {
            lmx::GenerateError::Sampling { key, value, allowed } => {
                let key = if key == "temp" { "temperature" } else { key };
                ApiError::invalid(key, format!("`{key}` is {value}; {allowed}"))
            }
            e => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
        })?;
        let stop = self.stop.clone().map(Stop::into_vec).unwrap_or_default();
        let params = GenerateParams { max_tokens, sampler, top_logprobs, stop, ..GenerateParams::default() };
        Ok(lmx::with_model_eos(&served.tokenizer, params))
    }

    /// How many choices (`n`), checked.
    pub(crate) fn n(&self) -> Result<usize, ApiError> {
        match self.n.unwrap_or(1) {
            0 => Err(ApiError::invalid("n", "`n` must be at least 1")),
            n if n > MAX_N => Err(ApiError::invalid("n", format!("`n` goes up to {MAX_N}"))),
            n => Ok(n),
        }
    }

    /// Whether each token's log-probability is reported.
    pub(crate) fn wants_logprobs(&self) -> bool {
        self.logprobs == Some(true)
    }
}

/// A chat message as OpenAI clients send it.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCallIn>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// Message content: a string or a list of parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One part of a message's content.
#[derive(Debug, Deserialize)]
pub(crate) struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// A tool call in an assistant message of the history.
#[derive(Debug, Deserialize)]
pub(crate) struct ToolCallIn {
    #[serde(default)]
    pub id: Option<String>,
    pub function: FunctionIn,
}

/// The function of a tool call in the history; `arguments` is a JSON string (OpenAI) or an
/// object.
#[derive(Debug, Deserialize)]
pub(crate) struct FunctionIn {
    pub name: String,
    #[serde(default)]
    pub arguments: Value,
}

impl Content {
    /// The text of the content (text parts joined); other part kinds are refused.
    pub(crate) fn text(&self, at: &str) -> Result<String, ApiError> {
        match self {
            Content::Text(s) => Ok(s.clone()),
            Content::Parts(parts) => {
                let mut out = String::new();
                for (i, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text" | "input_text" | "output_text", Some(t)) => out.push_str(t),
                        (kind, _) => return Err(ApiError::invalid(format!("{at}.content[{i}]"), format!("content parts of type `{kind}` are not supported: this server reads text only"))),
                    }
                }
                Ok(out)
            }
        }
    }
}

/// The messages as chat templates expect them: `content` a string, tool calls with their
/// arguments as objects (templates iterate them), `tool_call_id` and `name` kept.
pub(crate) fn template_messages(messages: &[ChatMessage]) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must hold at least one message"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = match m.role.as_str() {
            "developer" => "system",
            r @ ("system" | "user" | "assistant" | "tool") => r,
            other => return Err(ApiError::invalid(format!("{at}.role"), format!("unknown role `{other}`: use system, developer, user, assistant or tool"))),
        };
        let content = m.content.as_ref().map(|c| c.text(&at)).transpose()?.unwrap_or_default();
        let mut msg = Map::new();
        msg.insert("role".into(), json!(role));
        msg.insert("content".into(), json!(content));
        if let Some(name) = &m.name {
            msg.insert("name".into(), json!(name));
        }
        if let Some(id) = &m.tool_call_id {
            msg.insert("tool_call_id".into(), json!(id));
        }
        if let Some(calls) = &m.tool_calls {
            let calls: Result<Vec<Value>, ApiError> = calls
                .iter()
                .enumerate()
                .map(|(j, c)| {
                    let arguments = match &c.function.arguments {
                        Value::String(s) if s.trim().is_empty() => json!({}),
                        Value::String(s) => {
                            serde_json::from_str(s).map_err(|e| ApiError::invalid(format!("{at}.tool_calls[{j}].function.arguments"), format!("the arguments are not a JSON object: {e}")))?
                        }
                        Value::Null => json!({}),
                        v => v.clone(),
                    };
                    Ok(json!({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": arguments}}))
                })
                .collect();
            msg.insert("tool_calls".into(), Value::Array(calls?));
        }
        out.push(Value::Object(msg));
    }
    Ok(out)
}

/// Template variables: the server's `--chat-template-args` with the request's
/// `chat_template_kwargs` over them.
pub(crate) fn template_args(app: &App, request: Option<&Map<String, Value>>) -> Option<Value> {
    let mut args = match &app.opts.defaults.chat_template_args {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    for (k, v) in request.into_iter().flatten() {
        args.insert(k.clone(), v.clone());
    }
    (!args.is_empty()).then_some(Value::Object(args))
}

/// Renders a chat with the model's template and encodes it, checking it fits the context.
pub(crate) fn chat_prompt(served: &Served, messages: &[Value], tools: Option<&Value>, args: Option<&Value>) -> Result<Vec<u32>, ApiError> {
    if !served.tokenizer.has_chat_template() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "this model has no chat template, so it cannot take `messages`: use /v1/completions with a `prompt`"));
    }
    let text = served.tokenizer.apply_chat_template(messages, tools, args).map_err(|e| ApiError::invalid("messages", format!("the chat template cannot render these messages: {e}")))?;
    encode(served, &text, false)
}

/// Encodes `text` (special tokens added for plain prompts) and checks it fits the context.
pub(crate) fn encode(served: &Served, text: &str, plain: bool) -> Result<Vec<u32>, ApiError> {
    let context = served.tokenizer.context();
    let encoded = if plain { served.tokenizer.encode_prompt(text) } else { served.tokenizer.encode_rendered(text) };
    let tokens = encoded.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("{e}")).code("context_length_exceeded"))?;
    if tokens.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "the prompt is empty: give at least one token"));
    }
    if tokens.len() >= context {
        return Err(
            ApiError::new(StatusCode::BAD_REQUEST, format!("the prompt has {} tokens but the model's context is {context} tokens: shorten the prompt", tokens.len())).code("context_length_exceeded")
        );
    }
    Ok(tokens)
}
