//! OpenAI's chat completions and (legacy) completions: requests, answers and SSE chunks as
//! the `openai` clients read them.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::chat::{constrain, prepare_chat, response_format, OutputSpec, Prepared, ToolChoice};
use crate::engine::Event;
use crate::generation::{collect_all, engine_gone, event_stream, failure, finish_reason, submit, Choice, TokenLogprob};
use crate::models::Served;
use crate::output::{Piece, Splitter, ToolFormat};
use crate::request::{encode, fields, parse_body, template_args, template_messages, ChatMessage, Sampling};
use crate::{ApiError, App};

/// `n` random alphanumeric characters (ids of answers and tool calls).
pub(crate) fn random_id(n: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..n).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char).collect()
}

/// `system_fingerprint`: the lmx version and backend.
pub(crate) fn fingerprint() -> String {
    format!("lmx-{}", env!("CARGO_PKG_VERSION"))
}

#[derive(Debug, Deserialize, Default)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    chat_template_kwargs: Option<Map<String, Value>>,
}

pub(crate) async fn chat(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = parse_body(body)?;
    let req: ChatRequest = fields(&body)?;
    let sampling: Sampling = fields(&body)?;
    let served = app.models.get(req.model.as_deref()).await?;
    let model = req.model.clone().filter(|m| !m.is_empty()).unwrap_or_else(|| served.id.clone());
    let mut params = sampling.params(&app, &served)?;
    let n = sampling.n()?;
    let messages = template_messages(&req.messages)?;
    let choice = ToolChoice::openai(req.tool_choice.as_ref())?;
    let args = template_args(&app, req.chat_template_kwargs.as_ref());
    let Prepared { prompt, spec, grammar } = prepare_chat(&served, &messages, req.tools.as_deref(), &choice, req.parallel_tool_calls.unwrap_or(false), args.as_ref())?;
    constrain(&served, &mut params, grammar, response_format(req.response_format.as_ref(), "response_format")?, "response_format")?;
    let receivers = submit(&served, &prompt, &params, n)?;
    let meta = Meta { id: format!("chatcmpl-{}", random_id(24)), model, created: crate::now(), logprobs: sampling.wants_logprobs() };
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        return Ok(sse(chat_stream(served.clone(), meta, receivers, spec, include_usage)));
    }
    let bare = spec.tools == Some(ToolFormat::Llama3);
    let choices = collect_all(receivers, || spec.splitter(), bare).await?;
    let body = json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": fingerprint(),
        "choices": choices.iter().enumerate().map(|(i, c)| {
            let mut message = json!({"role": "assistant", "content": if c.content.is_empty() && !c.tool_calls.is_empty() { Value::Null } else { json!(c.content) }});
            if !c.reasoning.is_empty() {
                message["reasoning_content"] = json!(c.reasoning);
                message["reasoning"] = json!(c.reasoning);
            }
            if !c.tool_calls.is_empty() {
                message["tool_calls"] = c.tool_calls.iter().map(|t| t.openai()).collect();
            }
            json!({"index": i, "message": message, "logprobs": meta.logprobs.then(|| chat_logprobs(&served, &c.logprobs)), "finish_reason": c.finish_reason()})
        }).collect::<Vec<_>>(),
        "usage": usage(&choices),
    });
    Ok(Json(body).into_response())
}

/// What every chunk of an answer repeats.
pub(crate) struct Meta {
    pub id: String,
    pub model: String,
    pub created: u64,
    pub logprobs: bool,
}

/// `usage` over all choices (the prompt counted once).
fn usage(choices: &[Choice]) -> Value {
    let prompt = choices.first().map_or(0, |c| c.prompt_tokens);
    let cached = choices.first().map_or(0, |c| c.cached_tokens);
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    usage_json(prompt, cached, completion)
}

pub(crate) fn usage_json(prompt: usize, cached: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}})
}

fn token_text(served: &Served, id: u32) -> String {
    served.tokenizer.decode(&[id], false).unwrap_or_default()
}

/// Chat's `logprobs.content`.
fn chat_logprobs(served: &Served, tokens: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let text = token_text(served, id);
        json!({"token": text, "logprob": lp, "bytes": text.as_bytes()})
    };
    json!({"content": tokens.iter().map(|t| {
        let mut e = entry(t.token, t.logprob);
        e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
        e
    }).collect::<Vec<_>>()})
}

/// OpenAI's server-sent events: one `data:` JSON per chunk, then `data: [DONE]`.
pub(crate) fn sse(chunks: impl Stream<Item = Value> + Send + 'static) -> Response {
    let data = chunks.map(|v| SseEvent::default().data(v.to_string())).chain(stream::once(async { SseEvent::default().data("[DONE]") }));
    crate::generation::sse_response(data)
}

/// Per-choice state of a chat stream.
struct ChoiceState {
    splitter: Splitter,
    started: bool,
    calls: usize,
}

/// Chat completion chunks for every choice as its tokens come.
fn chat_stream(served: Arc<Served>, meta: Meta, receivers: Vec<tokio::sync::mpsc::UnboundedReceiver<Event>>, spec: OutputSpec, include_usage: bool) -> impl Stream<Item = Value> + Send {
    let n = receivers.len();
    let states: Vec<ChoiceState> = (0..n).map(|_| ChoiceState { splitter: spec.splitter(), started: false, calls: 0 }).collect();
    let chunk = move |meta: &Meta, i: usize, delta: Value, logprobs: Option<Value>, finish: Option<&str>| {
        json!({"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model, "system_fingerprint": fingerprint(),
               "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})
    };
    let mut usage = (0usize, 0usize, 0usize);
    let mut open = n;
    let mut states = states;
    event_stream(receivers, Vec::new(), move |i, event, queue| {
        let st = &mut states[i];
        match event {
            Some(Event::Token(r)) => {
                if !st.started {
                    st.started = true;
                    queue.push_back(chunk(&meta, i, json!({"role": "assistant", "content": ""}), None, None));
                }
                let mut pieces = st.splitter.push(&r.text);
                if r.finish_reason.is_some() {
                    pieces.extend(st.splitter.finish());
                }
                let logprobs = meta.logprobs.then(|| chat_logprobs(&served, &[TokenLogprob::of(&r)]));
                let mut sent_logprobs = logprobs.is_none();
                for p in pieces {
                    let delta = match p {
                        Piece::Content(t) => json!({"content": t}),
                        Piece::Reasoning(t) => json!({"reasoning_content": t, "reasoning": t}),
                        Piece::ToolCall(c) => {
                            let mut call = c.openai();
                            call["index"] = json!(st.calls);
                            st.calls += 1;
                            json!({"tool_calls": [call]})
                        }
                    };
                    let lp = if sent_logprobs { None } else { logprobs.clone() };
                    sent_logprobs = true;
                    queue.push_back(chunk(&meta, i, delta, lp, None));
                }
                if !sent_logprobs {
                    queue.push_back(chunk(&meta, i, json!({}), logprobs, None));
                }
                if let Some(finish) = r.finish_reason {
                    queue.push_back(chunk(&meta, i, json!({}), None, Some(finish_reason(Some(finish), st.calls > 0))));
                    open -= 1;
                    if usage.0 == 0 {
                        usage.0 = r.prompt_tokens;
                        usage.1 = r.cached_tokens;
                    }
                    usage.2 += r.generation_tokens;
                    if open == 0 && include_usage {
                        queue.push_back(json!({"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model, "system_fingerprint": fingerprint(), "choices": [], "usage": usage_json(usage.0, usage.1, usage.2)}));
                    }
                }
            }
            Some(Event::Failed { message, bad_request }) => {
                open = 0;
                queue.push_back(failure(message, bad_request).body());
            }
            None => {
                open = 0;
                queue.push_back(engine_gone().body());
            }
        }
    })
}

/// `prompt` of a completions request: text, texts, token ids or lists of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    prompt: PromptInput,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    echo: bool,
    #[serde(default)]
    suffix: Option<String>,
}

pub(crate) async fn completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = parse_body(body)?;
    let req: CompletionRequest = fields(&body)?;
    let sampling: Sampling = fields(&body)?;
    let served = app.models.get(req.model.as_deref()).await?;
    let model = req.model.clone().filter(|m| !m.is_empty()).unwrap_or_else(|| served.id.clone());
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` (fill in the middle) is not supported"));
    }
    let params = sampling.params(&app, &served)?;
    let n = sampling.n()?;
    let prompts: Vec<Vec<u32>> = match &req.prompt {
        PromptInput::Text(t) => vec![encode(&served, t, true)?],
        PromptInput::Texts(ts) => ts.iter().map(|t| encode(&served, t, true)).collect::<Result<_, _>>()?,
        PromptInput::Tokens(ids) => vec![ids.clone()],
        PromptInput::TokenLists(l) => l.clone(),
    };
    if prompts.is_empty() || prompts.len() * n > crate::request::MAX_N {
        return Err(ApiError::invalid("prompt", format!("give 1 to {} prompts (times `n`)", crate::request::MAX_N)));
    }
    let vocab = served.model.vocab_size();
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(ApiError::invalid("prompt", "the prompt is empty: give at least one token"));
        }
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::invalid("prompt", format!("prompt {i}: token id {bad} is outside the vocabulary of {vocab}")));
        }
        if p.len() >= served.tokenizer.context() {
            return Err(
                ApiError::invalid("prompt", format!("prompt {i} has {} tokens but the model's context is {} tokens: shorten it", p.len(), served.tokenizer.context())).code("context_length_exceeded")
            );
        }
    }
    let mut receivers = Vec::new();
    for p in &prompts {
        receivers.extend(submit(&served, p, &params, n)?);
    }
    let echoes: Vec<String> = prompts.iter().map(|p| if req.echo { served.tokenizer.decode(p, false).unwrap_or_default() } else { String::new() }).flat_map(|e| std::iter::repeat_n(e, n)).collect();
    let meta = Meta { id: format!("cmpl-{}", random_id(24)), model, created: crate::now(), logprobs: sampling.wants_logprobs() };
    let plain = || Splitter::new(None, false, false);
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        return Ok(sse(completion_stream(served.clone(), meta, receivers, echoes, include_usage, prompts.iter().map(Vec::len).sum())));
    }
    let choices = collect_all(receivers, plain, false).await?;
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let cached: usize = choices.iter().step_by(n).map(|c| c.cached_tokens).sum();
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let body = json!({
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": fingerprint(),
        "choices": choices.iter().enumerate().map(|(i, c)| json!({
            "index": i,
            "text": format!("{}{}", echoes[i], c.content),
            "logprobs": meta.logprobs.then(|| completion_logprobs(&served, &c.logprobs)),
            "finish_reason": c.finish_reason(),
        })).collect::<Vec<_>>(),
        "usage": usage_json(prompt_tokens, cached, completion),
    });
    Ok(Json(body).into_response())
}

/// The legacy completions `logprobs` object.
fn completion_logprobs(served: &Served, tokens: &[TokenLogprob]) -> Value {
    let texts: Vec<String> = tokens.iter().map(|t| token_text(served, t.token)).collect();
    let mut offset = 0;
    let offsets: Vec<usize> = texts
        .iter()
        .map(|t| {
            let o = offset;
            offset += t.len();
            o
        })
        .collect();
    json!({
        "tokens": texts,
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| t.top.iter().map(|&(id, lp)| (token_text(served, id), json!(lp))).collect::<Map<String, Value>>()).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

fn completion_stream(
    served: Arc<Served>,
    meta: Meta,
    receivers: Vec<tokio::sync::mpsc::UnboundedReceiver<Event>>,
    echoes: Vec<String>,
    include_usage: bool,
    prompt_tokens: usize,
) -> impl Stream<Item = Value> + Send {
    let n = receivers.len();
    let mut open = n;
    let mut started = vec![false; n];
    let mut usage = (0usize, 0usize);
    event_stream(receivers, Vec::new(), move |i, event, queue| match event {
        Some(Event::Token(r)) => {
            let mut text = r.text.clone();
            if !started[i] {
                started[i] = true;
                text.insert_str(0, &echoes[i]);
            }
            let finish = r.finish_reason.map(|f| finish_reason(Some(f), false));
            let logprobs = meta.logprobs.then(|| completion_logprobs(&served, &[TokenLogprob::of(&r)]));
            queue.push_back(json!({"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model, "system_fingerprint": fingerprint(),
                    "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]}));
            if finish.is_some() {
                open -= 1;
                usage.0 += r.cached_tokens;
                usage.1 += r.generation_tokens;
                if open == 0 && include_usage {
                    queue.push_back(
                        json!({"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model, "choices": [], "usage": usage_json(prompt_tokens, usage.0, usage.1)}),
                    );
                }
            }
        }
        Some(Event::Failed { message, bad_request }) => {
            open = 0;
            queue.push_back(failure(message, bad_request).body());
        }
        None => {
            open = 0;
            queue.push_back(engine_gone().body());
        }
    })
}
