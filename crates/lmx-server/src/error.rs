//! Errors as the clients expect them: OpenAI's `{"error": {"message", "type", "param",
//! "code"}}`, or Anthropic's `{"type": "error", "error": {"type", "message"}}` on
//! `/v1/messages`. Client errors keep their message; server errors are logged.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Which API's error shape to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI's (chat, completions, responses, models).
    OpenAi,
    /// Anthropic's (messages).
    Anthropic,
}

/// An error answered as JSON with an HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong and what to do.
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`, ...).
    pub code: Option<&'static str>,
    /// The error shape.
    pub dialect: Dialect,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message).param(param)
    }

    /// An error with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), param: None, code: None, dialect: Dialect::OpenAi }
    }

    /// Names the request field at fault.
    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Sets the machine-readable code.
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Answers in `dialect`'s shape.
    pub fn dialect(mut self, dialect: Dialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// OpenAI's `type` for this status (Anthropic's names differ only for some).
    fn kind(&self) -> &'static str {
        match (self.status.as_u16(), self.dialect) {
            (401, Dialect::OpenAi) => "invalid_api_key",
            (401, Dialect::Anthropic) => "authentication_error",
            (404, Dialect::Anthropic) => "not_found_error",
            (413, Dialect::Anthropic) => "request_too_large",
            (429, Dialect::Anthropic) => "rate_limit_error",
            (429, Dialect::OpenAi) => "rate_limit_exceeded",
            (503, Dialect::Anthropic) => "overloaded_error",
            (s, Dialect::Anthropic) if s >= 500 => "api_error",
            (s, Dialect::OpenAi) if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        match self.dialect {
            Dialect::OpenAi => json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.code}}),
            Dialect::Anthropic => json!({"type": "error", "error": {"type": self.kind(), "message": self.message}}),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            eprintln!("[ERROR] {} {}", self.status.as_u16(), self.message);
        }
        (self.status, Json(self.body())).into_response()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}
