//! Every kind of bad request gets a JSON error with a 4xx status that names the field at
//! fault, and the server goes on answering.

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::{post, send};

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    for (k, v) in extra.as_object().expect("an object") {
        body[k] = v.clone();
    }
    body
}

/// (what, path, body, status, a phrase the message must hold, the `param` if any).
type Case = (&'static str, &'static str, String, u16, &'static str, Option<&'static str>);

fn cases() -> Vec<Case> {
    let c = |v: Value| chat(v).to_string();
    vec![
        ("malformed JSON", "/v1/chat/completions", "{\"messages\": [".into(), 400, "not valid JSON", None),
        ("not an object", "/v1/chat/completions", "[1, 2]".into(), 400, "JSON object", None),
        ("missing messages", "/v1/chat/completions", json!({"model": "smollm2"}).to_string(), 400, "messages", None),
        ("wrong type", "/v1/chat/completions", c(json!({"temperature": "hot"})), 400, "temperature", Some("temperature")),
        ("negative temperature", "/v1/chat/completions", c(json!({"temperature": -1.0})), 400, "temperature", Some("temperature")),
        ("top_p out of range", "/v1/chat/completions", c(json!({"top_p": 1.5})), 400, "top_p", Some("top_p")),
        ("zero max_tokens", "/v1/chat/completions", c(json!({"max_tokens": 0})), 400, "max_tokens", Some("max_tokens")),
        ("too many top_logprobs", "/v1/chat/completions", c(json!({"logprobs": true, "top_logprobs": 50})), 400, "top_logprobs", Some("top_logprobs")),
        ("logit_bias key", "/v1/chat/completions", c(json!({"logit_bias": {"hello": 1}})), 400, "token ids", Some("logit_bias")),
        ("logit_bias range", "/v1/chat/completions", c(json!({"logit_bias": {"5": 500}})), 400, "-100 to 100", Some("logit_bias")),
        ("logit_bias vocab", "/v1/chat/completions", c(json!({"logit_bias": {"99999999": 1}})), 400, "vocabulary", Some("logit_bias")),
        ("n zero", "/v1/chat/completions", c(json!({"n": 0})), 400, "`n`", Some("n")),
        ("unknown model", "/v1/chat/completions", c(json!({"model": "gpt-17"})), 404, "not served here", Some("model")),
        ("empty messages", "/v1/chat/completions", c(json!({"messages": []})), 400, "at least one message", Some("messages")),
        ("unknown role", "/v1/chat/completions", c(json!({"messages": [{"role": "wizard", "content": "x"}]})), 400, "unknown role", Some("messages[0].role")),
        (
            "image part",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})),
            400,
            "text only",
            Some("messages[0].content[0]"),
        ),
        ("bad tool", "/v1/chat/completions", c(json!({"tools": [{"type": "function"}]})), 400, "each tool", Some("tools[0]")),
        (
            "bad tool arguments",
            "/v1/chat/completions",
            c(json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]})),
            400,
            "not a JSON object",
            None,
        ),
        ("context overflow", "/v1/chat/completions", c(json!({"messages": [{"role": "user", "content": "word ".repeat(9000)}]})), 400, "context", None),
        ("completions empty prompt list", "/v1/completions", json!({"prompt": []}).to_string(), 400, "prompt", Some("prompt")),
        ("completions token out of vocab", "/v1/completions", json!({"prompt": [1, 2, 999999]}).to_string(), 400, "vocabulary", Some("prompt")),
        ("completions suffix", "/v1/completions", json!({"prompt": "a", "suffix": "b"}).to_string(), 400, "suffix", Some("suffix")),
        ("too large body", "/v1/chat/completions", c(json!({"messages": [{"role": "user", "content": "x".repeat(100_000)}]})), 413, "larger", None),
    ]
}

#[tokio::test]
async fn bad_requests_get_json_errors_naming_the_field() {
    let mut failures = Vec::new();
    for (what, path, body, status, phrase, param) in cases() {
        let (got, text) = send("POST", path, Some(&body), Some("sesame")).await;
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let message = json["error"]["message"].as_str().unwrap_or("");
        let ok = got.as_u16() == status && message.contains(phrase) && param.is_none_or(|p| json["error"]["param"] == p) && json["error"]["type"].is_string();
        if !ok {
            failures.push(format!("{what}: got {got} {text}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // And the server still answers.
    let (status, body) = post("/v1/chat/completions", &chat(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn the_api_key_is_required() {
    let body = chat(json!({})).to_string();
    let (status, text) = send("POST", "/v1/chat/completions", Some(&body), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    assert!(text.contains("--api-key"), "{text}");
    let (status, _) = send("POST", "/v1/chat/completions", Some(&body), Some("wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send("GET", "/v1/models", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Health checks need no key.
    let (status, text) = send("GET", "/health", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let health: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(health["status"], "ok", "{text}");
    assert!(health["sequences"].is_u64(), "{text}");
}

#[tokio::test]
async fn unknown_paths_and_methods() {
    let (status, text) = send("POST", "/v1/nothing", Some("{}"), Some("sesame")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
    assert!(text.contains("no endpoint"), "{text}");
    let (status, text) = send("GET", "/v1/chat/completions", None, Some("sesame")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{text}");
    assert!(text.starts_with("{\"error\""), "{text}");
}
