//! Models loaded on request (`--allowed-models`) and CORS, on a router of their own.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::default_model;

async fn call(router: &axum::Router, method: &str, path: &str, body: Option<Value>, origin: Option<&str>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    let req = req.body(body.map_or_else(Body::empty, |b| Body::from(b.to_string()))).expect("a request");
    let response = router.clone().oneshot(req).await.expect("an answer");
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("a body");
    (status, headers, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8})
}

#[tokio::test]
async fn allowed_models_load_on_request_and_others_are_refused() {
    let (model, tokenizer) = lmx::load(&default_model()).expect("the default model");
    let opts = lmx_server::ServeOptions { model_id: "first".into(), allowed_models: vec!["second".into()], allowed_origins: vec!["https://app.example".into()], ..Default::default() };
    let loads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = loads.clone();
    let loader: lmx_server::Loader = std::sync::Arc::new(move |name: &str| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        assert!(name == "second" || name == "first", "asked to load {name}");
        lmx::load(&default_model()).map_err(|e| e.to_string())
    });
    let router = lmx_server::router(model, tokenizer, opts, Some(loader), None);

    let (status, _, first) = call(&router, "POST", "/v1/chat/completions", Some(chat("first")), None).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (status, _, second) = call(&router, "POST", "/v1/chat/completions", Some(chat("second")), None).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second["model"], "second");
    assert_eq!(second["choices"][0]["message"], first["choices"][0]["message"], "the same weights answer the same");
    let (_, _, health) = call(&router, "GET", "/health", None, None).await;
    assert_eq!(health["loaded"], json!(["second"]), "one model loaded at a time: {health}");
    // The first model comes back when named again.
    let (status, _, _) = call(&router, "POST", "/v1/chat/completions", Some(chat("default_model")), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 2);

    let (status, _, refused) = call(&router, "POST", "/v1/chat/completions", Some(chat("../../etc/passwd")), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{refused}");
    assert_eq!(refused["error"]["code"], "model_not_found");
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("`second`")), "{refused}");
    let (_, _, list) = call(&router, "GET", "/v1/models", None, None).await;
    let ids: Vec<&str> = list["data"].as_array().expect("data").iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["first", "second"]);

    // CORS: the allowed origin is echoed, preflights get 204, other origins nothing.
    let (status, headers, _) = call(&router, "OPTIONS", "/v1/chat/completions", None, Some("https://app.example")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(headers.get("access-control-allow-origin").and_then(|v| v.to_str().ok()), Some("https://app.example"));
    let (_, headers, _) = call(&router, "GET", "/v1/models", None, Some("https://evil.example")).await;
    assert!(headers.get("access-control-allow-origin").is_none());
}
