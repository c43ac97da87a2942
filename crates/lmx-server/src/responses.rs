//! OpenAI's Responses API (`POST /v1/responses`, `GET /v1/responses/{id}`): `input` as text or
//! items (messages, function calls and their outputs), `instructions`, function tools,
//! `previous_response_id` (conversations kept in memory, the most recent
//! [`STORED_RESPONSES`]), and the streaming events the `openai` client reads
//! (`response.created` .. `response.completed`, each with its `sequence_number`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::chat::{constrain, prepare_chat, response_format, OutputSpec, Prepared, ToolChoice};
use crate::engine::Event;
use crate::generation::{collect, engine_gone, event_stream, failure, sse_response, submit, Choice};
use crate::openai::random_id;
use crate::output::{Piece, ToolCall};
use crate::request::{fields, parse_body, template_args, Content, Sampling};
use crate::{ApiError, App};

/// Responses kept for `previous_response_id` and `GET /v1/responses/{id}`.
pub(crate) const STORED_RESPONSES: usize = 256;

/// Finished responses: each with the conversation that led to it (its output included), so a
/// later request can go on from it.
#[derive(Default)]
pub(crate) struct Store {
    entries: VecDeque<(String, Vec<Value>, Value)>,
}

impl Store {
    fn get(&self, id: &str) -> Option<&(String, Vec<Value>, Value)> {
        self.entries.iter().find(|(i, _, _)| i == id)
    }

    fn put(&mut self, id: String, conversation: Vec<Value>, response: Value) {
        if self.entries.len() >= STORED_RESPONSES {
            self.entries.pop_front();
        }
        self.entries.push_back((id, conversation, response));
    }
}

#[derive(Debug, Deserialize)]
struct ResponsesRequest {
    #[serde(default)]
    model: Option<String>,
    input: Value,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    max_output_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_logprobs: Option<usize>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    text: Option<Value>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    store: Option<bool>,
}

/// Input items as chat-template messages; consecutive function calls join one assistant turn.
fn input_messages(input: &Value) -> Result<Vec<Value>, ApiError> {
    let items = match input {
        Value::String(s) => return Ok(vec![json!({"role": "user", "content": s})]),
        Value::Array(items) => items,
        _ => return Err(ApiError::invalid("input", "`input` is a string or a list of items")),
    };
    let mut out: Vec<Value> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        match item.get("type").and_then(Value::as_str).unwrap_or("message") {
            "message" => {
                let role = item.get("role").and_then(Value::as_str).unwrap_or("");
                let role = match role {
                    "developer" => "system",
                    r @ ("system" | "user" | "assistant") => r,
                    other => return Err(ApiError::invalid(format!("{at}.role"), format!("unknown role `{other}`: use system, developer, user or assistant"))),
                };
                let content: Content = serde_json::from_value(item.get("content").cloned().unwrap_or(Value::Null))
                    .map_err(|_| ApiError::invalid(format!("{at}.content"), "`content` is a string or a list of input_text parts"))?;
                out.push(json!({"role": role, "content": content.text(&at)?}));
            }
            "function_call" => {
                let name = item.get("name").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(format!("{at}.name"), "a function_call item needs a `name`"))?;
                let args = match item.get("arguments") {
                    Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| ApiError::invalid(format!("{at}.arguments"), format!("the arguments are not a JSON object: {e}")))?,
                    Some(v) => v.clone(),
                    None => json!({}),
                };
                let call = json!({"id": item.get("call_id"), "type": "function", "function": {"name": name, "arguments": args}});
                match out.last_mut() {
                    Some(last) if last["role"] == "assistant" && last.get("tool_calls").is_some() => {
                        if let Some(calls) = last["tool_calls"].as_array_mut() {
                            calls.push(call);
                        }
                    }
                    _ => out.push(json!({"role": "assistant", "content": "", "tool_calls": [call]})),
                }
            }
            "function_call_output" => {
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                    None => String::new(),
                };
                out.push(json!({"role": "tool", "tool_call_id": item.get("call_id"), "content": output}));
            }
            "reasoning" => {}
            other => return Err(ApiError::invalid(format!("{at}.type"), format!("input items of type `{other}` are not supported: use message, function_call or function_call_output"))),
        }
    }
    Ok(out)
}

/// Responses' flat function tools as chat completions' nested ones.
fn chat_tools(tools: Option<&[Value]>) -> Result<Option<Vec<Value>>, ApiError> {
    let Some(tools) = tools else { return Ok(None) };
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| match (t.get("type").and_then(Value::as_str), t.get("name").and_then(Value::as_str)) {
            (Some("function"), Some(name)) => {
                Ok(json!({"type": "function", "function": {"name": name, "description": t.get("description"), "parameters": t.get("parameters").cloned().unwrap_or(json!({"type": "object"}))}}))
            }
            (Some(kind), _) if kind != "function" => Err(ApiError::invalid(format!("tools[{i}].type"), format!("tools of type `{kind}` are not supported: only function tools run locally"))),
            _ => Err(ApiError::invalid(format!("tools[{i}]"), "each tool is {\"type\": \"function\", \"name\": ..., \"parameters\": {...}}")),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

pub(crate) async fn create(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = parse_body(body)?;
    let req: ResponsesRequest = fields(&body)?;
    let served = app.models.get(req.model.as_deref()).await?;
    let model = req.model.clone().filter(|m| !m.is_empty()).unwrap_or_else(|| served.id.clone());
    let sampling =
        Sampling { max_tokens: req.max_output_tokens, temperature: req.temperature, top_p: req.top_p, logprobs: req.top_logprobs.map(|_| true), top_logprobs: req.top_logprobs, ..Default::default() };
    let mut params = sampling.params(&app, &served)?;
    let mut conversation = match &req.previous_response_id {
        Some(prev) => {
            let store = app.responses.lock().map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the response store is unusable"))?;
            let (_, conv, _) =
                store.get(prev).ok_or_else(|| ApiError::invalid("previous_response_id", format!("no stored response `{prev}` (this server keeps the last {STORED_RESPONSES}, in memory)")))?;
            conv.clone()
        }
        None => Vec::new(),
    };
    conversation.extend(input_messages(&req.input)?);
    let mut messages = conversation.clone();
    if let Some(instructions) = req.instructions.as_ref().filter(|i| !i.is_empty()) {
        messages.retain(|m| m["role"] != "system");
        messages.insert(0, json!({"role": "system", "content": instructions}));
    }
    if messages.is_empty() {
        return Err(ApiError::invalid("input", "`input` holds no message"));
    }
    let tools = chat_tools(req.tools.as_deref())?;
    let choice = ToolChoice::openai(req.tool_choice.as_ref())?;
    let args = template_args(&app, None);
    let Prepared { prompt, spec, grammar } = prepare_chat(&served, &messages, tools.as_deref(), &choice, req.parallel_tool_calls.unwrap_or(false), args.as_ref())?;
    constrain(&served, &mut params, grammar, response_format(req.text.as_ref().and_then(|t| t.get("format")), "text.format")?, "text.format")?;
    let mut receivers = submit(&served, &prompt, &params, 1)?;
    let rx = receivers.pop().ok_or_else(engine_gone)?;
    let shell = Shell {
        id: format!("resp_{}", random_id(24)),
        created: crate::now(),
        model,
        request: json!({
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "previous_response_id": req.previous_response_id,
            "temperature": params.sampler.temp, "top_p": params.sampler.top_p, "tools": req.tools.clone().unwrap_or_default(),
            "tool_choice": req.tool_choice.clone().unwrap_or(json!("auto")), "store": req.store.unwrap_or(true),
        }),
        store: req.store.unwrap_or(true),
        conversation,
    };
    if req.stream {
        return Ok(sse_response(response_stream(app.clone(), shell, rx, spec)));
    }
    let bare = spec.tools == Some(crate::output::ToolFormat::Llama3);
    let choice = collect(rx, spec.splitter(), bare).await?;
    let items = output_items(&choice);
    let response = shell.finish(&app, items, &choice);
    Ok(Json(response).into_response())
}

pub(crate) async fn retrieve(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let store = app.responses.lock().map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the response store is unusable"))?;
    let (_, _, response) = store.get(&id).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no stored response `{id}`")).param("response_id"))?;
    Ok(Json(response.clone()))
}

/// What a response repeats from its request, and the conversation to store.
struct Shell {
    id: String,
    created: u64,
    model: String,
    request: Value,
    store: bool,
    conversation: Vec<Value>,
}

impl Shell {
    /// The response object with `output` and `status`.
    fn object(&self, status: &str, output: Vec<Value>, usage: Value, incomplete: Option<&str>) -> Value {
        let mut r = json!({
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "error": null,
            "incomplete_details": incomplete.map(|reason| json!({"reason": reason})), "model": self.model, "output": output,
            "parallel_tool_calls": false, "reasoning": {"effort": null, "summary": null}, "text": {"format": {"type": "text"}},
            "truncation": "disabled", "usage": usage, "metadata": {},
        });
        for (k, v) in self.request.as_object().into_iter().flatten() {
            r[k] = v.clone();
        }
        r
    }

    /// The completed response, stored when `store` is set.
    fn finish(&self, app: &App, items: Vec<Value>, choice: &Choice) -> Value {
        let incomplete = (choice.finish == Some(lmx::FinishReason::Length)).then_some("max_output_tokens");
        let status = if incomplete.is_some() { "incomplete" } else { "completed" };
        let response = self.object(status, items, usage(choice), incomplete);
        if self.store {
            let mut conversation = self.conversation.clone();
            let mut turn = json!({"role": "assistant", "content": choice.content});
            if !choice.tool_calls.is_empty() {
                turn["tool_calls"] = choice
                    .tool_calls
                    .iter()
                    .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": serde_json::from_str::<Value>(&c.arguments).unwrap_or(json!({}))}}))
                    .collect();
            }
            conversation.push(turn);
            if let Ok(mut store) = app.responses.lock() {
                store.put(self.id.clone(), conversation, response.clone());
            }
        }
        response
    }
}

fn usage(c: &Choice) -> Value {
    json!({"input_tokens": c.prompt_tokens, "input_tokens_details": {"cached_tokens": c.cached_tokens}, "output_tokens": c.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": c.prompt_tokens + c.completion_tokens})
}

fn reasoning_item(id: &str, text: &str) -> Value {
    json!({"type": "reasoning", "id": id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]})
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": [output_text(text)]})
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn call_item(c: &ToolCall, status: &str) -> Value {
    json!({"type": "function_call", "id": format!("fc_{}", c.id), "call_id": c.id, "name": c.name, "arguments": c.arguments, "status": status})
}

fn output_items(c: &Choice) -> Vec<Value> {
    let mut items = Vec::new();
    if !c.reasoning.is_empty() {
        items.push(reasoning_item(&format!("rs_{}", random_id(24)), &c.reasoning));
    }
    if !c.content.is_empty() || c.tool_calls.is_empty() {
        items.push(message_item(&format!("msg_{}", random_id(24)), &c.content, "completed"));
    }
    items.extend(c.tool_calls.iter().map(|t| call_item(t, "completed")));
    items
}

/// The item being streamed.
enum Open {
    Message { id: String, text: String },
    Reasoning { id: String, text: String },
}

/// The Responses streaming events of one response.
fn response_stream(app: Arc<App>, shell: Shell, rx: tokio::sync::mpsc::UnboundedReceiver<Event>, spec: OutputSpec) -> impl Stream<Item = SseEvent> + Send {
    let mut splitter = spec.splitter();
    let mut open: Option<Open> = None;
    let mut items: Vec<Value> = Vec::new();
    let mut choice = Choice::default();
    // Closes the open item: its done events, and it joins the output.
    fn close(open: &mut Option<Open>, items: &mut Vec<Value>, queue: &mut VecDeque<Value>) {
        let index = items.len();
        match open.take() {
            Some(Open::Message { id, text }) => {
                queue.push_back(json!({"type": "response.output_text.done", "item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}));
                queue.push_back(json!({"type": "response.content_part.done", "item_id": id, "output_index": index, "content_index": 0, "part": output_text(&text)}));
                let item = message_item(&id, &text, "completed");
                queue.push_back(json!({"type": "response.output_item.done", "output_index": index, "item": item}));
                items.push(item);
            }
            Some(Open::Reasoning { id, text }) => {
                queue.push_back(json!({"type": "response.reasoning_text.done", "item_id": id, "output_index": index, "content_index": 0, "text": text}));
                let item = reasoning_item(&id, &text);
                queue.push_back(json!({"type": "response.output_item.done", "output_index": index, "item": item}));
                items.push(item);
            }
            None => {}
        }
    }
    let r = shell.object("in_progress", Vec::new(), Value::Null, None);
    let first = vec![json!({"type": "response.created", "response": r}), json!({"type": "response.in_progress", "response": r})];
    event_stream(vec![rx], first, move |_, e, queue| {
        match e {
            Some(Event::Token(r)) => {
                choice.prompt_tokens = r.prompt_tokens;
                choice.cached_tokens = r.cached_tokens;
                choice.completion_tokens = r.generation_tokens;
                let mut pieces = splitter.push(&r.text);
                if r.finish_reason.is_some() {
                    pieces.extend(splitter.finish());
                }
                for p in pieces {
                    match p {
                        Piece::Content(t) => {
                            if !matches!(open, Some(Open::Message { .. })) {
                                close(&mut open, &mut items, queue);
                                let id = format!("msg_{}", random_id(24));
                                let index = items.len();
                                queue.push_back(json!({"type": "response.output_item.added", "output_index": index, "item": {"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []}}));
                                queue.push_back(json!({"type": "response.content_part.added", "item_id": id, "output_index": index, "content_index": 0, "part": output_text("")}));
                                open = Some(Open::Message { id, text: String::new() });
                            }
                            if let Some(Open::Message { id, text }) = &mut open {
                                text.push_str(&t);
                                choice.content.push_str(&t);
                                queue.push_back(json!({"type": "response.output_text.delta", "item_id": id, "output_index": items.len(), "content_index": 0, "delta": t, "logprobs": []}));
                            }
                        }
                        Piece::Reasoning(t) => {
                            if !matches!(open, Some(Open::Reasoning { .. })) {
                                close(&mut open, &mut items, queue);
                                let id = format!("rs_{}", random_id(24));
                                queue.push_back(json!({"type": "response.output_item.added", "output_index": items.len(), "item": {"type": "reasoning", "id": id, "summary": [], "content": []}}));
                                open = Some(Open::Reasoning { id, text: String::new() });
                            }
                            if let Some(Open::Reasoning { id, text }) = &mut open {
                                text.push_str(&t);
                                choice.reasoning.push_str(&t);
                                queue.push_back(json!({"type": "response.reasoning_text.delta", "item_id": id, "output_index": items.len(), "content_index": 0, "delta": t}));
                            }
                        }
                        Piece::ToolCall(c) => {
                            close(&mut open, &mut items, queue);
                            let index = items.len();
                            let mut added = call_item(&c, "in_progress");
                            added["arguments"] = json!("");
                            let item_id = added["id"].clone();
                            queue.push_back(json!({"type": "response.output_item.added", "output_index": index, "item": added}));
                            queue.push_back(json!({"type": "response.function_call_arguments.delta", "item_id": item_id, "output_index": index, "delta": c.arguments}));
                            queue.push_back(json!({"type": "response.function_call_arguments.done", "item_id": item_id, "output_index": index, "arguments": c.arguments}));
                            let item = call_item(&c, "completed");
                            queue.push_back(json!({"type": "response.output_item.done", "output_index": index, "item": item}));
                            items.push(item);
                            choice.tool_calls.push(c);
                        }
                    }
                }
                if let Some(finish) = r.finish_reason {
                    close(&mut open, &mut items, queue);
                    choice.finish = Some(finish);
                    let response = shell.finish(&app, std::mem::take(&mut items), &choice);
                    let kind = if response["status"] == "incomplete" { "response.incomplete" } else { "response.completed" };
                    queue.push_back(json!({"type": kind, "response": response}));
                }
            }
            Some(Event::Failed { message, bad_request }) => queue.push_back(json!({"type": "error", "code": null, "message": failure(message, bad_request).message, "param": null})),
            None => queue.push_back(json!({"type": "error", "code": null, "message": engine_gone().message, "param": null})),
        }
    })
    .enumerate()
    .map(|(sequence, mut v)| {
        v["sequence_number"] = json!(sequence);
        let name = v["type"].as_str().unwrap_or("message").to_string();
        SseEvent::default().event(name).data(v.to_string())
    })
}

/// The store every handler shares.
pub(crate) fn new_store() -> Mutex<Store> {
    Mutex::new(Store::default())
}
