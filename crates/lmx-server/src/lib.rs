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

pub use engine::{Engine, EngineOptions};
pub use error::{ApiError, Dialect};

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
    /// The engine's batch, queue and caches.
    pub engine: EngineOptions,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            model_id: "default_model".into(),
            aliases: Vec::new(),
            api_key: None,
            max_body_bytes: 16 << 20,
            defaults: Defaults::default(),
            engine: EngineOptions { decode_concurrency: 32, max_queue: 256, prompt_cache_size: 10, prompt_cache_bytes: 2 << 30, kv: KvOptions::default() },
        }
    }
}

/// The state every handler shares.
pub(crate) struct App {
    pub(crate) engine: Engine,
    pub(crate) model: Arc<Model>,
    pub(crate) tokenizer: Arc<TokenizerWrapper>,
    pub(crate) opts: ServeOptions,
    pub(crate) created: u64,
    /// Grammars for constrained decoding over this model's vocabulary (or why there are none).
    pub(crate) grammars: Result<grammar::Grammars, String>,
    /// Finished Responses-API responses, for `previous_response_id`.
    pub(crate) responses: std::sync::Mutex<responses::Store>,
}

impl App {
    /// Checks that `requested` names the served model; returns the name to answer with.
    pub(crate) fn check_model(&self, requested: Option<&str>) -> Result<String, ApiError> {
        let Some(name) = requested.filter(|n| !n.is_empty()) else { return Ok(self.opts.model_id.clone()) };
        if name == self.opts.model_id || name == "default_model" || self.opts.aliases.iter().any(|a| a == name) {
            return Ok(name.to_string());
        }
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("model `{name}` is not served here: this server serves `{}` (GET /v1/models lists it); start lmx serve with --model {name} to serve that one", self.opts.model_id),
        )
        .param("model")
        .code("model_not_found"))
    }
}

/// Unix time, seconds.
pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The router serving `model` (the engine thread starts here). Tests drive it without a
/// socket; [`serve`] binds it.
pub fn router(model: Model, tokenizer: TokenizerWrapper, opts: ServeOptions) -> Router {
    let model = Arc::new(model);
    let tokenizer = Arc::new(tokenizer);
    let engine = Engine::start(model.clone(), tokenizer.clone(), opts.engine.clone());
    let max_body = opts.max_body_bytes;
    let grammars = grammar::Grammars::new(tokenizer.clone(), model.vocab_size(), tokenizer.eos_token_ids());
    if let Err(e) = &grammars {
        eprintln!("[WARNING] structured output and required tool calls are unavailable: {e}");
    }
    let app = Arc::new(App { engine, model, tokenizer, opts, created: now(), grammars, responses: responses::new_store() });
    let api = Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/completions", post(openai::completions))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/{id}", get(responses::retrieve))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route("/v1/models/{*id}", get(model_info))
        .layer(middleware::from_fn_with_state(app.clone(), authorize));
    Router::new().route("/health", get(health)).merge(api).fallback(not_found).method_not_allowed_fallback(method_not_allowed).layer(DefaultBodyLimit::max(max_body)).with_state(app)
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

/// `{"status": "ok"}` (MLX LM's answer) plus the engine's load: sequences decoding or
/// waiting, and the prompt caches kept.
async fn health(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let stats = app.engine.stats();
    Json(json!({"status": "ok", "sequences": app.engine.in_flight(), "prompt_cache": {"entries": stats.0, "bytes": stats.1}}))
}

fn model_entry(app: &App) -> serde_json::Value {
    json!({"id": app.opts.model_id, "object": "model", "created": app.created, "owned_by": "lmx"})
}

async fn models(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(json!({"object": "list", "data": [model_entry(&app)]}))
}

async fn model_info(State(app): State<Arc<App>>, axum::extract::Path(id): axum::extract::Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    app.check_model(Some(&id))?;
    Ok(Json(model_entry(&app)))
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
