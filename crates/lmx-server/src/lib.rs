//! lmx-server: `lmx serve`, an HTTP server for agents and apps over the generation engine.
//!
//! Endpoints: OpenAI's `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/responses`
//! (and `GET /v1/responses/{id}`), `GET /v1/models`,
//! Anthropic's `POST /v1/messages` (and `/v1/messages/count_tokens`), and `GET /health` (the paths without `/v1` too, as MLX LM's server). Every request becomes
//! one or more sequences in the engine's continuous batch ([`engine`]); tokens stream back
//! over server-sent events or are collected into one JSON answer. Requests are checked
//! before they reach the engine, and every failure is a JSON error with a 4xx or 5xx status
//! ([`ApiError`]); the server never dies on a request.

mod anthropic;
mod chat;
pub mod engine;
mod error;
mod generation;
mod grammar;
pub mod lockstep;
mod models;
mod openai;
mod output;
mod request;
mod responses;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lmx::{KvOptions, Model, TokenizerWrapper};
use serde_json::json;

pub use engine::{Draft, Engine, EngineOptions};
pub use error::{ApiError, Dialect};
pub use models::Loader;

/// What can go wrong starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The address cannot be bound (in use, no permission, bad host).
    #[error("cannot listen on {addr}: {source}; choose another --host/--port")]
    Bind { addr: String, source: std::io::Error },
    /// Serving failed after start.
    #[error("server: {0}")]
    Serve(std::io::Error),
}

/// Default sampling and limits for requests that do not set them (MLX LM's server flags).
#[derive(Debug, Clone)]
pub struct Defaults {
    /// `--temp`.
    pub temperature: f32,
    /// `--top-p`.
    pub top_p: f32,
    /// `--top-k`.
    pub top_k: usize,
    /// `--min-p`.
    pub min_p: f32,
    /// `--max-tokens`: tokens per answer unless the request says otherwise.
    pub max_tokens: usize,
    /// `--chat-template-args`: template variables merged under each request's
    /// `chat_template_kwargs`.
    pub chat_template_args: Option<serde_json::Value>,
}

impl Default for Defaults {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, min_p: 0.0, max_tokens: 512, chat_template_args: None }
    }
}

/// Everything `lmx serve` configures.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The name requests use for the model (`--model` as given); `/v1/models` lists it.
    pub model_id: String,
    /// Other names accepted for it (besides `default_model`).
    pub aliases: Vec<String>,
    /// Requests must carry `Authorization: Bearer KEY` (or `x-api-key: KEY`) when set.
    pub api_key: Option<String>,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Defaults for requests.
    pub defaults: Defaults,
    /// The engine's batch, queue and caches (each loaded model has its own engine).
    pub engine: EngineOptions,
    /// Models a request may load by naming them (`--allowed-models`).
    pub allowed_models: Vec<String>,
    /// Most models loaded at once; the least recently used are unloaded.
    pub max_loaded_models: usize,
    /// Origins browsers may call from (`--allowed-origins`; `*` for any).
    pub allowed_origins: Vec<String>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            model_id: "default_model".into(),
            aliases: Vec::new(),
            api_key: None,
            max_body_bytes: 16 << 20,
            defaults: Defaults::default(),
            engine: EngineOptions { decode_concurrency: 32, max_queue: 256, prompt_cache_size: 10, prompt_cache_bytes: 2 << 30, kv: KvOptions::default(), lockstep: None },
            allowed_models: Vec::new(),
            max_loaded_models: 1,
            allowed_origins: vec!["*".into()],
        }
    }
}

/// The state every handler shares.
pub(crate) struct App {
    pub(crate) models: models::Models,
    pub(crate) opts: ServeOptions,
    pub(crate) created: u64,
    /// Finished Responses-API responses, for `previous_response_id`.
    pub(crate) responses: std::sync::Mutex<responses::Store>,
}

/// Unix time, seconds.
pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The router serving `model` (its engine thread starts here; with `draft`, decoding one
/// sequence at a time speculatively); `loader` loads the models of `--allowed-models` when a
/// request names one. Tests drive the router without a socket;
/// [`serve`] binds it.
pub fn router(model: Model, tokenizer: TokenizerWrapper, opts: ServeOptions, loader: Option<Loader>, draft: Option<Draft>) -> Router {
    let first = models::Served::new(opts.model_id.clone(), opts.aliases.clone(), model, tokenizer, &opts.engine, draft.clone());
    let registry = models::Models::new(first, opts.allowed_models.clone(), opts.max_loaded_models, loader, opts.engine.clone(), draft);
    let max_body = opts.max_body_bytes;
    let origins = opts.allowed_origins.clone();
    let app = Arc::new(App { models: registry, opts, created: now(), responses: responses::new_store() });
    let api = Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/completions", post(openai::completions))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/{id}", get(responses::retrieve))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/models", get(list_models))
        .route("/models", get(list_models))
        .route("/v1/models/{*id}", get(model_info))
        .layer(middleware::from_fn_with_state(app.clone(), authorize));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(Arc::new(origins), cors))
        .with_state(app)
}

/// CORS for browser apps (`--allowed-origins`, MLX LM's flag): the allowed origin on every
/// answer, and 204 to preflight requests.
async fn cors(State(origins): State<Arc<Vec<String>>>, request: Request, next: Next) -> Response {
    let origin = request.headers().get("origin").and_then(|v| v.to_str().ok()).map(str::to_string);
    let allowed = match &origin {
        Some(o) if origins.iter().any(|a| a == "*" || a == o) => Some(if origins.iter().any(|a| a == "*") { "*".to_string() } else { o.clone() }),
        _ => None,
    };
    let preflight = request.method() == axum::http::Method::OPTIONS;
    let mut response = if preflight { StatusCode::NO_CONTENT.into_response() } else { next.run(request).await };
    if let Some(value) = allowed.and_then(|a| axum::http::HeaderValue::from_str(&a).ok()) {
        let h = response.headers_mut();
        h.insert("access-control-allow-origin", value);
        h.insert("access-control-allow-methods", axum::http::HeaderValue::from_static("GET, POST, OPTIONS"));
        h.insert("access-control-allow-headers", axum::http::HeaderValue::from_static("*"));
    }
    response
}

/// Binds `host:port` and serves until the process is stopped; `ready` is called with the
/// bound address (port 0 picks a free one).
pub async fn serve(router: Router, host: &str, port: u16, ready: impl FnOnce(SocketAddr)) -> Result<(), ServerError> {
    let addr = format!("{host}:{port}");
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|source| ServerError::Bind { addr: addr.clone(), source })?;
    let local = listener.local_addr().map_err(|source| ServerError::Bind { addr, source })?;
    ready(local);
    axum::serve(listener, router).with_graceful_shutdown(shutdown_signal()).await.map_err(ServerError::Serve)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

async fn authorize(State(app): State<Arc<App>>, headers: HeaderMap, request: Request, next: Next) -> Response {
    let Some(key) = &app.opts.api_key else { return next.run(request).await };
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim);
    let given = bearer.or(x_api_key);
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
        return next.run(request).await;
    }
    let dialect = if request.uri().path().ends_with("/messages") { Dialect::Anthropic } else { Dialect::OpenAi };
    let message = match given {
        None => "this server requires an API key: send `Authorization: Bearer KEY` (or `x-api-key: KEY`) with the key given to lmx serve --api-key",
        Some(_) => "incorrect API key: use the key given to lmx serve --api-key",
    };
    ApiError::new(StatusCode::UNAUTHORIZED, message).dialect(dialect).into_response()
}

/// Compares without returning early, so the time taken does not reveal the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `{"status": "ok"}` (MLX LM's answer) plus the engines' load: sequences decoding or
/// waiting, and the prompt caches kept, over the loaded models.
async fn health(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let loaded = app.models.loaded();
    let sequences: usize = loaded.iter().map(|s| s.engine.in_flight()).sum();
    let (entries, bytes) = loaded.iter().map(|s| s.engine.stats()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let names: Vec<&str> = loaded.iter().map(|s| s.id.as_str()).collect();
    Json(json!({"status": "ok", "loaded": names, "sequences": sequences, "prompt_cache": {"entries": entries, "bytes": bytes}}))
}

fn model_entry(app: &App, id: &str) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": app.created, "owned_by": "lmx"})
}

/// The models requests may name: the served one and `--allowed-models`.
async fn list_models(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(json!({"object": "list", "data": app.models.names().iter().map(|n| model_entry(&app, n)).collect::<Vec<_>>()}))
}

async fn model_info(State(app): State<Arc<App>>, axum::extract::Path(id): axum::extract::Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    if !app.models.names().contains(&id) && app.models.loaded().iter().all(|s| !s.aliases.contains(&id)) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no model `{id}` here (GET /v1/models lists them)")).param("model").code("model_not_found"));
    }
    Ok(Json(model_entry(&app, &id)))
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no endpoint {} {}: see GET /v1/models, POST /v1/chat/completions, /v1/completions, /v1/responses, /v1/messages", request.method(), request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed on {}", request.method(), request.uri().path()))
}
