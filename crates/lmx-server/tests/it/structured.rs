//! Structured output and tool calls, enforced by the grammar: the answer parses and follows
//! the schema whatever the (135M-parameter) model would have said, tool calls name a given
//! function with valid arguments, and a tool loop goes on after the tool's answer.

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::{post, send, sse_data};

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}},
        {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}
    ])
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": content}], "max_tokens": 80});
    for (k, v) in extra.as_object().expect("an object") {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn json_schema_output_parses_and_follows_the_schema() {
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "items": {"type": "string", "enum": ["cat", "dog", "fish"]}, "maxItems": 3}
    }, "required": ["name", "age", "pets"], "additionalProperties": false});
    for prompt in ["Describe a person.", "Say hello.", "What is 2 + 2?"] {
        let (status, body) = post("/v1/chat/completions", &chat(prompt, json!({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let text = body["choices"][0]["message"]["content"].as_str().expect("content");
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        let obj = v.as_object().expect("an object");
        assert_eq!(obj.len(), 3, "{text}");
        assert!(v["name"].as_str().is_some_and(|n| n.chars().count() <= 20), "{text}");
        assert!(v["age"].as_u64().is_some_and(|a| a <= 150), "{text}");
        let pets = v["pets"].as_array().expect("pets");
        assert!(pets.len() <= 3 && pets.iter().all(|p| ["cat", "dog", "fish"].contains(&p.as_str().unwrap_or(""))), "{text}");
        assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
    }
}

#[tokio::test]
async fn json_object_output_is_an_object() {
    let (status, body) = post("/v1/chat/completions", &chat("Say hello.", json!({"response_format": {"type": "json_object"}}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let text = body["choices"][0]["message"]["content"].as_str().expect("content");
    assert!(serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object()), "{text}");
}

#[tokio::test]
async fn a_bad_schema_is_a_400() {
    let (status, body) = post(
        "/v1/chat/completions",
        &chat("Hi", json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "response_format", "{body}");
    let (status, body) = post("/v1/chat/completions", &chat("Hi", json!({"response_format": {"type": "xml"}}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn tool_choice_required_and_named_give_valid_calls() {
    for (choice, expected) in [
        (json!("required"), None),
        (json!({"type": "function", "function": {"name": "get_time"}}), Some("get_time")),
        (json!({"type": "function", "function": {"name": "get_weather"}}), Some("get_weather")),
    ] {
        let (status, body) = post("/v1/chat/completions", &chat("Hello there!", json!({"tools": weather_tools(), "tool_choice": choice}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
        let calls = choice["message"]["tool_calls"].as_array().expect("tool_calls");
        assert_eq!(calls.len(), 1, "{body}");
        let name = calls[0]["function"]["name"].as_str().expect("a name");
        if let Some(e) = expected {
            assert_eq!(name, e);
        }
        let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().expect("arguments")).expect("JSON arguments");
        match name {
            "get_weather" => assert!(args["city"].is_string() && ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap_or("")), "{args}"),
            "get_time" => assert!(args["tz"].is_string(), "{args}"),
            other => panic!("an unknown function {other}"),
        }
        assert!(calls[0]["id"].as_str().is_some_and(|id| !id.is_empty()));
    }
}

#[tokio::test]
async fn tool_choice_none_and_unknown_names() {
    let (status, body) = post("/v1/chat/completions", &chat("Hello!", json!({"tools": weather_tools(), "tool_choice": "none", "max_tokens": 8}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["choices"][0]["message"]["tool_calls"].is_null(), "{body}");
    let (status, body) = post("/v1/chat/completions", &chat("Hi", json!({"tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "launch_rockets"}}}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "tool_choice");
    let (status, _) = post("/v1/chat/completions", &chat("Hi", json!({"tool_choice": "required"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_streamed_tool_call_arrives_whole_with_its_index() {
    let body = chat("What is the weather in Paris?", json!({"tools": weather_tools(), "tool_choice": "required", "stream": true}));
    let (status, text) = send("POST", "/v1/chat/completions", Some(&body.to_string()), Some("sesame")).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let chunks: Vec<Value> = sse_data(&text).iter().filter_map(|d| serde_json::from_str(d).ok()).collect();
    let calls: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array()).flatten().collect();
    assert_eq!(calls.len(), 1, "{text}");
    assert_eq!(calls[0]["index"], 0);
    assert!(serde_json::from_str::<Value>(calls[0]["function"]["arguments"].as_str().unwrap_or("")).is_ok());
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(!content.contains("<tool_call>"), "the markup leaked: {content}");
    let finish: Vec<&str> = chunks.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).collect();
    assert_eq!(finish, ["tool_calls"]);
}

#[tokio::test]
async fn a_tool_loop_goes_on_after_the_result() {
    let (_, first) = post("/v1/chat/completions", &chat("What is the weather in Paris?", json!({"tools": weather_tools(), "tool_choice": "required"}))).await;
    let call = first["choices"][0]["message"]["tool_calls"][0].clone();
    let messages = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature\": 21, \"sky\": \"sunny\"}"}
    ]);
    let (status, second) = post("/v1/chat/completions", &json!({"messages": messages, "tools": weather_tools(), "tool_choice": "none", "max_tokens": 40})).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let answer = second["choices"][0]["message"]["content"].as_str().expect("an answer");
    assert!(!answer.is_empty());
    // The earlier call and its result are in the prompt the model saw.
    assert!(second["usage"]["prompt_tokens"].as_u64() > first["usage"]["prompt_tokens"].as_u64());
}

#[tokio::test]
async fn anthropic_tool_use_and_responses_formats() {
    let tools = json!([{"name": "get_time", "description": "Current time in a timezone", "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}]);
    let (status, msg) = post("/v1/messages", &json!({"max_tokens": 60, "messages": [{"role": "user", "content": "What time is it in Tokyo?"}], "tools": tools, "tool_choice": {"type": "any"}})).await;
    assert_eq!(status, StatusCode::OK, "{msg}");
    assert_eq!(msg["stop_reason"], "tool_use", "{msg}");
    let block = msg["content"].as_array().and_then(|c| c.iter().find(|b| b["type"] == "tool_use")).expect("a tool_use block");
    assert_eq!(block["name"], "get_time");
    assert!(block["input"]["tz"].is_string(), "{block}");

    let schema = json!({"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"], "additionalProperties": false});
    let (status, r) = post("/v1/responses", &json!({"input": "What is 2 + 2?", "max_output_tokens": 30, "text": {"format": {"type": "json_schema", "name": "sum", "schema": schema}}})).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let text = r["output"][0]["content"][0]["text"].as_str().expect("output text");
    let v: Value = serde_json::from_str(text).expect("JSON");
    assert!(v["answer"].is_i64(), "{text}");
    let rtools = json!([{"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}]);
    let (status, r) = post("/v1/responses", &json!({"input": "Time in Tokyo?", "max_output_tokens": 60, "tools": rtools, "tool_choice": "required"})).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let call = r["output"].as_array().and_then(|o| o.iter().find(|i| i["type"] == "function_call")).expect("a function_call item");
    assert_eq!(call["name"], "get_time");
}
