//! Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), as the
//! `anthropic` clients and Claude Code speak it: content blocks (text, tool_use,
//! tool_result, thinking), `system`, `stop_sequences`, tools with `input_schema`, and the
//! streaming event sequence (message_start, content_block_start/delta/stop, message_delta,
//! message_stop). Errors use Anthropic's shape.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::chat::{constrain, prepare_chat, OutputSpec, Prepared, ToolChoice};
use crate::engine::Event;
use crate::generation::{collect, engine_gone, event_stream, failure, sse_response, submit};
use crate::openai::random_id;
use crate::output::{Piece, ToolCall};
use crate::request::{fields, parse_body, template_args, Sampling, Stop};
use crate::{ApiError, App, Dialect};

#[derive(Debug, Deserialize)]
struct MessagesRequest {
    #[serde(default)]
    model: Option<String>,
    max_tokens: usize,
    messages: Vec<InMessage>,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    tools: Option<Vec<InTool>>,
    #[serde(default)]
    tool_choice: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct CountRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<InMessage>,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    tools: Option<Vec<InTool>>,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    content: Value,
}

#[derive(Debug, Deserialize)]
struct InTool {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    input_schema: Option<Value>,
}

/// Text of a string or of a list of text blocks.
fn block_text(v: &Value, at: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(blocks) => {
            let mut out = String::new();
            for (i, b) in blocks.iter().enumerate() {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => out.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
                    kind => return Err(ApiError::invalid(format!("{at}[{i}]"), format!("blocks of type `{}` are not supported here: text only", kind.unwrap_or("?")))),
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::invalid(at, "must be a string or a list of text blocks")),
    }
}

/// The conversation as chat-template messages: `system` first; a user turn's tool_result
/// blocks become `tool` messages; an assistant turn's tool_use blocks its `tool_calls`.
fn template_messages(system: Option<&Value>, messages: &[InMessage]) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must hold at least one message"));
    }
    let mut out = Vec::new();
    if let Some(system) = system {
        let text = block_text(system, "system")?;
        if !text.is_empty() {
            out.push(json!({"role": "system", "content": text}));
        }
    }
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        if m.role != "user" && m.role != "assistant" {
            return Err(ApiError::invalid(format!("{at}.role"), format!("unknown role `{}`: use user or assistant (the system prompt goes in `system`)", m.role)));
        }
        let blocks = match &m.content {
            Value::String(s) => vec![json!({"type": "text", "text": s})],
            Value::Array(b) => b.clone(),
            _ => return Err(ApiError::invalid(format!("{at}.content"), "must be a string or a list of content blocks")),
        };
        let mut text = String::new();
        let mut calls = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let bat = format!("{at}.content[{j}]");
            match b.get("type").and_then(Value::as_str) {
                Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
                Some("thinking" | "redacted_thinking") => {}
                Some("tool_use") if m.role == "assistant" => {
                    let name = b.get("name").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(format!("{bat}.name"), "a tool_use block needs a `name`"))?;
                    calls.push(json!({"id": b.get("id"), "type": "function", "function": {"name": name, "arguments": b.get("input").cloned().unwrap_or(json!({}))}}));
                }
                Some("tool_result") if m.role == "user" => {
                    let content = block_text(b.get("content").unwrap_or(&Value::Null), &format!("{bat}.content"))?;
                    out.push(json!({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": content}));
                }
                kind => {
                    return Err(ApiError::invalid(
                        bat,
                        format!("content blocks of type `{}` are not supported in {} turns: this server reads text, tool_use and tool_result", kind.unwrap_or("?"), m.role),
                    ))
                }
            }
        }
        if !text.is_empty() || !calls.is_empty() || !blocks.iter().any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result")) {
            let mut msg = json!({"role": m.role, "content": text});
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            out.push(msg);
        }
    }
    Ok(out)
}

/// Anthropic tools as OpenAI's list (what chat templates take).
fn openai_tools(tools: Option<&[InTool]>) -> Option<Vec<Value>> {
    tools.map(|t| {
        t.iter().map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.input_schema.clone().unwrap_or(json!({"type": "object"}))}})).collect()
    })
}

/// Anthropic's `tool_choice`: {"type": "auto" | "any" | "tool" (with "name") | "none"}.
fn tool_choice(v: Option<&Value>) -> Result<ToolChoice, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(ToolChoice::Auto) };
    match v.get("type").and_then(Value::as_str) {
        Some("auto") => Ok(ToolChoice::Auto),
        Some("none") => Ok(ToolChoice::None),
        Some("any") => Ok(ToolChoice::Required),
        Some("tool") => match v.get("name").and_then(Value::as_str) {
            Some(n) => Ok(ToolChoice::Named(n.to_string())),
            None => Err(ApiError::invalid("tool_choice.name", "`tool_choice` of type `tool` needs a `name`")),
        },
        _ => Err(ApiError::invalid("tool_choice", "`tool_choice.type` is auto, any, tool or none")),
    }
}

pub(crate) async fn messages(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    match messages_inner(app, body).await {
        Ok(r) => r,
        Err(e) => e.dialect(Dialect::Anthropic).into_response(),
    }
}

async fn messages_inner(app: Arc<App>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = parse_body(body)?;
    let req: MessagesRequest = fields(&body)?;
    let served = app.models.get(req.model.as_deref()).await?;
    let model = req.model.clone().filter(|m| !m.is_empty()).unwrap_or_else(|| served.id.clone());
    let sampling =
        Sampling { max_tokens: Some(req.max_tokens), temperature: req.temperature, top_p: req.top_p, top_k: req.top_k, stop: req.stop_sequences.clone().map(Stop::Many), ..Default::default() };
    let mut params = sampling.params(&app, &served)?;
    let messages = template_messages(req.system.as_ref(), &req.messages)?;
    let tools = openai_tools(req.tools.as_deref());
    let choice = tool_choice(req.tool_choice.as_ref())?;
    let args = template_args(&app, None);
    let Prepared { prompt, spec, grammar } =
        prepare_chat(&served, &messages, tools.as_deref(), &choice, req.tool_choice.as_ref().and_then(|c| c.get("disable_parallel_tool_use")) == Some(&Value::Bool(false)), args.as_ref())?;
    constrain(&served, &mut params, grammar, None, "tool_choice")?;
    let mut receivers = submit(&served, &prompt, &params, 1)?;
    let rx = receivers.pop().ok_or_else(engine_gone)?;
    let id = format!("msg_{}", random_id(24));
    if req.stream {
        return Ok(sse_response(message_stream(id, model, rx, spec)));
    }
    let bare = spec.tools == Some(crate::output::ToolFormat::Llama3);
    let choice = collect(rx, spec.splitter(), bare).await?;
    let stop = choice.stop_matched.clone();
    let mut content = Vec::new();
    if !choice.reasoning.is_empty() {
        content.push(json!({"type": "thinking", "thinking": choice.reasoning, "signature": ""}));
    }
    if !choice.content.is_empty() || choice.tool_calls.is_empty() {
        content.push(json!({"type": "text", "text": choice.content}));
    }
    content.extend(choice.tool_calls.iter().map(tool_use));
    Ok(Json(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(choice.finish, stop.as_deref(), !choice.tool_calls.is_empty()),
        "stop_sequence": stop,
        "usage": usage(choice.prompt_tokens, choice.cached_tokens, choice.completion_tokens),
    }))
    .into_response())
}

pub(crate) async fn count_tokens(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = async {
        let body = parse_body(body)?;
        let req: CountRequest = fields(&body)?;
        let served = app.models.get(req.model.as_deref()).await?;
        let messages = template_messages(req.system.as_ref(), &req.messages)?;
        let tools = openai_tools(req.tools.as_deref());
        let prepared = prepare_chat(&served, &messages, tools.as_deref(), &ToolChoice::Auto, false, template_args(&app, None).as_ref())?;
        Ok::<_, ApiError>(Json(json!({"input_tokens": prepared.prompt.len()})).into_response())
    }
    .await;
    result.unwrap_or_else(|e| e.dialect(Dialect::Anthropic).into_response())
}

fn tool_use(c: &ToolCall) -> Value {
    let input: Value = serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}));
    json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input})
}

/// Anthropic's `stop_reason`: a stop sequence, the token limit, a tool call, or the end.
fn stop_reason(finish: Option<lmx::FinishReason>, stop: Option<&str>, called: bool) -> &'static str {
    match (finish, stop) {
        (_, Some(_)) => "stop_sequence",
        (Some(lmx::FinishReason::Length), _) => "max_tokens",
        _ if called => "tool_use",
        _ => "end_turn",
    }
}

/// Anthropic counts cache reads apart from input tokens.
fn usage(prompt: usize, cached: usize, output: usize) -> Value {
    json!({"input_tokens": prompt - cached.min(prompt), "output_tokens": output, "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0})
}

fn event(data: Value) -> SseEvent {
    let name = data["type"].as_str().unwrap_or("message").to_string();
    SseEvent::default().event(name).data(data.to_string())
}

/// Which block is open in a streamed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    Thinking,
}

/// Anthropic's streaming events for one message.
fn message_stream(id: String, model: String, rx: tokio::sync::mpsc::UnboundedReceiver<Event>, spec: OutputSpec) -> impl Stream<Item = SseEvent> + Send {
    let mut splitter = spec.splitter();
    let mut open: Option<Block> = None;
    let mut index = 0usize;
    let mut started = false;
    let mut called = false;
    event_stream(vec![rx], Vec::new(), move |_, e, queue| {
        match e {
            Some(Event::Token(r)) => {
                if !started {
                    started = true;
                    queue.push_back(json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage(r.prompt_tokens, r.cached_tokens, 0)}}));
                }
                let mut pieces = splitter.push(&r.text);
                if r.finish_reason.is_some() {
                    pieces.extend(splitter.finish());
                }
                for p in pieces {
                    let (want, delta) = match p {
                        Piece::Content(t) => (Some(Block::Text), json!({"type": "text_delta", "text": t})),
                        Piece::Reasoning(t) => (Some(Block::Thinking), json!({"type": "thinking_delta", "thinking": t})),
                        Piece::ToolCall(c) => {
                            if open.take().is_some() {
                                queue.push_back(json!({"type": "content_block_stop", "index": index}));
                                index += 1;
                            }
                            called = true;
                            let mut block = tool_use(&c);
                            block["input"] = json!({});
                            queue.push_back(json!({"type": "content_block_start", "index": index, "content_block": block}));
                            queue.push_back(json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": c.arguments}}));
                            queue.push_back(json!({"type": "content_block_stop", "index": index}));
                            index += 1;
                            continue;
                        }
                    };
                    if open != want {
                        if open.is_some() {
                            queue.push_back(json!({"type": "content_block_stop", "index": index}));
                            index += 1;
                        }
                        let block = match want {
                            Some(Block::Thinking) => json!({"type": "thinking", "thinking": ""}),
                            _ => json!({"type": "text", "text": ""}),
                        };
                        queue.push_back(json!({"type": "content_block_start", "index": index, "content_block": block}));
                        open = want;
                    }
                    queue.push_back(json!({"type": "content_block_delta", "index": index, "delta": delta}));
                }
                if let Some(finish) = r.finish_reason {
                    if open.take().is_some() {
                        queue.push_back(json!({"type": "content_block_stop", "index": index}));
                    }
                    let reason = stop_reason(Some(finish), r.stop_matched.as_deref(), called);
                    queue.push_back(json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": r.stop_matched}, "usage": {"output_tokens": r.generation_tokens}}));
                    queue.push_back(json!({"type": "message_stop"}));
                }
            }
            Some(Event::Failed { message, bad_request }) => queue.push_back(failure(message, bad_request).dialect(Dialect::Anthropic).body()),
            None => queue.push_back(engine_gone().dialect(Dialect::Anthropic).body()),
        }
    })
    .map(event)
}
