//! What every chat API (chat completions, messages, responses) does alike before generating:
//! checks the tools and the tool choice, renders the conversation with the chat template
//! (describing the tools in a system message when the template takes none), decides how the
//! output is parsed, and builds the grammar that enforces a required call or a response
//! format.

use llguidance::api::TopLevelGrammar;
use lmx::GenerateParams;
use serde_json::{json, Value};

use crate::grammar;
use crate::models::Served;
use crate::output::{Splitter, ToolFormat};
use crate::request::chat_prompt;
use crate::ApiError;

/// What a request's sequences are parsed with.
pub(crate) struct OutputSpec {
    pub tools: Option<ToolFormat>,
    pub think: bool,
    pub in_reasoning: bool,
}

impl OutputSpec {
    pub(crate) fn splitter(&self) -> Splitter {
        Splitter::new(self.tools, self.think, self.in_reasoning)
    }

    /// For `prompt` rendered by the chat template, with or without tools.
    pub(crate) fn for_chat(served: &Served, prompt: &[u32], tools: bool) -> Self {
        let think = served.tokenizer.token_to_id("<think>").is_some() && served.tokenizer.token_to_id("</think>").is_some();
        let in_reasoning = think && {
            let tail = &prompt[prompt.len().saturating_sub(8)..];
            let text = served.tokenizer.decode(tail, false).unwrap_or_default();
            text.rfind("<think>").is_some_and(|open| text.rfind("</think>").is_none_or(|close| close < open))
        };
        let format = served.tokenizer.chat_template().map(|t| ToolFormat::detect(t.source())).unwrap_or(ToolFormat::Hermes);
        Self { tools: tools.then_some(format), think, in_reasoning }
    }
}

/// How the request lets the model call tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToolChoice {
    /// The model decides.
    Auto,
    /// No calls: the tools are shown but calls are not parsed.
    None,
    /// At least one call.
    Required,
    /// A call of this function.
    Named(String),
}

impl ToolChoice {
    /// OpenAI's `tool_choice`: "auto", "none", "required" or {"type": "function", "function": {"name"}}.
    pub(crate) fn openai(v: Option<&Value>) -> Result<Self, ApiError> {
        match v {
            None | Some(Value::Null) => Ok(ToolChoice::Auto),
            Some(Value::String(s)) => match s.as_str() {
                "auto" => Ok(ToolChoice::Auto),
                "none" => Ok(ToolChoice::None),
                "required" => Ok(ToolChoice::Required),
                other => Err(ApiError::invalid("tool_choice", format!("`tool_choice` `{other}`: use auto, none, required or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"))),
            },
            Some(v) => match v.get("function").and_then(|f| f.get("name")).or_else(|| v.get("name")).and_then(Value::as_str) {
                Some(name) => Ok(ToolChoice::Named(name.to_string())),
                None => Err(ApiError::invalid("tool_choice", "`tool_choice` objects name a function: {\"type\": \"function\", \"function\": {\"name\": ...}}")),
            },
        }
    }
}

/// A chat ready for the engine.
pub(crate) struct Prepared {
    pub prompt: Vec<u32>,
    pub spec: OutputSpec,
    /// The grammar a required or named tool call follows.
    pub grammar: Option<TopLevelGrammar>,
}

/// The system message lmx adds for templates that take no tools (the Hermes convention,
/// which the output parser reads back).
fn tool_prompt(tools: &[Value]) -> String {
    let list: Vec<String> = tools.iter().map(|t| t.get("function").unwrap_or(t).to_string()).collect();
    format!(
        "You are a function calling AI model. You may call one or more functions to assist with the user query. Here are the available tools:\n<tools>\n{}\n</tools>\nFor each function call, return a JSON object with the function name and arguments within <tool_call></tool_call> tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
        list.join("\n")
    )
}

/// The conversation for a template that knows no tools: the tools described in the system
/// message, earlier calls written into the assistant's text, tool results as user turns.
fn without_tool_support(messages: &[Value], tools: &[Value]) -> Vec<Value> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    let prompt = tool_prompt(tools);
    match messages.first() {
        Some(m) if m["role"] == "system" => out.push(json!({"role": "system", "content": format!("{}\n\n{prompt}", m["content"].as_str().unwrap_or(""))})),
        _ => out.push(json!({"role": "system", "content": prompt})),
    }
    for m in messages.iter().skip(usize::from(messages.first().is_some_and(|m| m["role"] == "system"))) {
        match m["role"].as_str() {
            Some("assistant") if m.get("tool_calls").is_some() => {
                let mut text = m["content"].as_str().unwrap_or("").to_string();
                for c in m["tool_calls"].as_array().into_iter().flatten() {
                    let call = json!({"name": c["function"]["name"], "arguments": c["function"]["arguments"]});
                    text.push_str(&format!("<tool_call>\n{call}\n</tool_call>"));
                }
                out.push(json!({"role": "assistant", "content": text}));
            }
            Some("tool") => out.push(json!({"role": "user", "content": format!("<tool_response>\n{}\n</tool_response>", m["content"].as_str().unwrap_or(""))})),
            _ => out.push(m.clone()),
        }
    }
    out
}

/// Checks `tools` (OpenAI's list) and `choice`, renders the chat, and says how its output is
/// parsed and which grammar a required call follows (several calls when `parallel`).
pub(crate) fn prepare_chat(served: &Served, messages: &[Value], tools: Option<&[Value]>, choice: &ToolChoice, parallel: bool, args: Option<&Value>) -> Result<Prepared, ApiError> {
    let tools = tools.filter(|t| !t.is_empty());
    let mut names = Vec::new();
    for (i, t) in tools.into_iter().flatten().enumerate() {
        let name = t.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
        match name {
            Some(name) if t.get("type").and_then(Value::as_str) == Some("function") && !name.is_empty() => names.push(name),
            _ => return Err(ApiError::invalid(format!("tools[{i}]"), "each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}}")),
        }
    }
    match choice {
        ToolChoice::Named(name) if !names.contains(&name.as_str()) => return Err(ApiError::invalid("tool_choice", format!("`tool_choice` names `{name}`, which is not in `tools`"))),
        ToolChoice::Required | ToolChoice::Named(_) if tools.is_none() => return Err(ApiError::invalid("tool_choice", "`tool_choice` asks for a call but `tools` is empty")),
        _ => {}
    }
    let template_takes_tools = served.tokenizer.chat_template().is_some_and(|t| t.source().contains("tools"));
    let prompt = match tools {
        Some(t) if !template_takes_tools => chat_prompt(served, &without_tool_support(messages, t), None, args)?,
        Some(t) => chat_prompt(served, messages, Some(&Value::Array(t.to_vec())), args)?,
        None => chat_prompt(served, messages, None, args)?,
    };
    let mut spec = OutputSpec::for_chat(served, &prompt, tools.is_some() && *choice != ToolChoice::None);
    if !template_takes_tools && spec.tools.is_some() {
        spec.tools = Some(ToolFormat::Hermes);
    }
    let grammar = match (choice, tools, spec.tools) {
        (ToolChoice::Required, Some(t), Some(format)) => Some(grammars(served)?.tool_call(format, t, None, parallel)),
        (ToolChoice::Named(name), Some(t), Some(format)) => Some(grammars(served)?.tool_call(format, t, Some(name), false)),
        _ => None,
    };
    Ok(Prepared { prompt, spec, grammar })
}

fn grammars(served: &Served) -> Result<&grammar::Grammars, ApiError> {
    served.grammars.as_ref().map_err(|e| ApiError::new(axum::http::StatusCode::BAD_REQUEST, format!("constrained decoding is unavailable for this model: {e}")))
}

/// The grammar of a response format: OpenAI's `{"type": "json_object"}` or `{"type":
/// "json_schema", "json_schema": {"schema"}}` (chat), or Responses' flat `{"type":
/// "json_schema", "schema"}`; None for text.
pub(crate) fn response_format(format: Option<&Value>, param: &str) -> Result<Option<TopLevelGrammar>, ApiError> {
    let Some(format) = format.filter(|f| !f.is_null()) else { return Ok(None) };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(grammar::json_schema(json!({"type": "object"})))),
        Some("json_schema") => {
            let schema = format.get("json_schema").unwrap_or(format).get("schema").cloned().ok_or_else(|| ApiError::invalid(param, format!("`{param}` of type json_schema needs a `schema`")))?;
            Ok(Some(grammar::json_schema(schema)))
        }
        _ => Err(ApiError::invalid(param, format!("`{param}.type` is text, json_object or json_schema"))),
    }
}

/// Puts the grammar (a required tool call's or the response format's) on `params`.
pub(crate) fn constrain(served: &Served, params: &mut GenerateParams, tool: Option<TopLevelGrammar>, format: Option<TopLevelGrammar>, param: &str) -> Result<(), ApiError> {
    let grammar = match (tool, format) {
        (Some(_), Some(_)) => return Err(ApiError::invalid(param, format!("`{param}` cannot apply while `tool_choice` requires a tool call"))),
        (Some(g), None) | (None, Some(g)) => g,
        (None, None) => return Ok(()),
    };
    let factory = grammars(served)?.constraint(grammar).map_err(|e| ApiError::invalid(param, format!("the grammar cannot be built: {e}")))?;
    params.constraint = Some(factory);
    Ok(())
}
