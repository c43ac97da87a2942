//! Server tests on the real default model, driving the router without a socket: what each
//! endpoint answers, and a JSON error with the right status for each kind of bad request.
//! The end-to-end tests with the real `openai` and `anthropic` clients over loopback are in
//! lmx-cli's tests (they run the `lmx serve` binary).

mod errors;
mod models;
mod openai;
mod structured;

use std::path::PathBuf;
use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use serde_json::Value;
use tower::ServiceExt;

/// The default model file.
pub fn default_model() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-default-model.sh", p.display());
    p.to_string_lossy().to_string()
}

/// Options of the shared test server: a small body limit and an API key.
pub fn options() -> lmx_server::ServeOptions {
    lmx_server::ServeOptions { model_id: "smollm2".into(), api_key: Some("sesame".into()), max_body_bytes: 64 << 10, ..Default::default() }
}

/// One router (and engine thread) for all tests of this binary.
pub fn router() -> Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER
        .get_or_init(|| {
            let (model, tokenizer) = lmx::load(&default_model()).expect("the default model loads");
            lmx_server::router(model, tokenizer, options(), None, None)
        })
        .clone()
}

/// The model and tokenizer, for answers to compare with.
pub fn model() -> &'static (lmx::Model, lmx::TokenizerWrapper) {
    static MODEL: OnceLock<(lmx::Model, lmx::TokenizerWrapper)> = OnceLock::new();
    MODEL.get_or_init(|| lmx::load(&default_model()).expect("the default model loads"))
}

/// Sends `body` to `path` (POST; GET when None) with the key; returns the status and body
/// text.
pub async fn send(method: &str, path: &str, body: Option<&str>, key: Option<&str>) -> (StatusCode, String) {
    let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req.body(body.map_or_else(Body::empty, |b| Body::from(b.to_string()))).expect("a request");
    let response = router().oneshot(req).await.expect("the router answers");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("the body");
    (status, String::from_utf8_lossy(&bytes).to_string())
}

/// POSTs JSON with the right key; returns the status and the parsed body.
pub async fn post(path: &str, body: &Value) -> (StatusCode, Value) {
    let (status, text) = send("POST", path, Some(&body.to_string()), Some("sesame")).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}
