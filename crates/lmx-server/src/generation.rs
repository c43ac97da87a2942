//! One request's sequences in the engine, whatever the API: submitting them (429 when the
//! engine is full), collecting each into a [`Choice`], or merging their events into one
//! stream for server-sent events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::Poll;

use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use lmx::{FinishReason, GenerateParams, GenerationResponse};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::Event;
use crate::models::Served;
use crate::output::{Piece, Splitter, ToolCall};
use crate::ApiError;

/// Queues `n` sequences of `prompt` (choice i samples with seed + i, so choices differ when a
/// seed is set).
pub(crate) fn submit(served: &Served, prompt: &[u32], params: &GenerateParams, n: usize) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
    served
        .engine
        .submit(n, |i| {
            let mut p = params.clone();
            p.sampler.seed = p.sampler.seed.map(|s| s.wrapping_add(i as u64));
            (prompt.to_vec(), p)
        })
        .map_err(|busy| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("the server is busy: {} sequences are decoding or waiting, its limit (lmx serve --decode-concurrency + --max-queue); retry later", busy.in_flight),
            )
            .code("server_busy")
        })
}

/// The error an engine event reports.
pub(crate) fn failure(message: String, bad_request: bool) -> ApiError {
    let status = if bad_request { StatusCode::BAD_REQUEST } else { StatusCode::INTERNAL_SERVER_ERROR };
    ApiError::new(status, message)
}

/// A sequence that ended without its last token (the engine thread stopped).
pub(crate) fn engine_gone() -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the generation engine stopped before this answer was complete")
}

/// One token's log-probability and the most likely alternatives.
#[derive(Debug, Clone)]
pub(crate) struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    pub(crate) fn of(r: &GenerationResponse) -> Self {
        Self { token: r.token, logprob: r.logprob, top: r.top_logprobs.clone() }
    }
}

/// A finished sequence.
#[derive(Debug, Default)]
pub(crate) struct Choice {
    pub content: String,
    pub reasoning: String,
    pub tool_calls: Vec<ToolCall>,
    pub finish: Option<FinishReason>,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub logprobs: Vec<TokenLogprob>,
    /// The stop string that ended it, if one did.
    pub stop_matched: Option<String>,
}

impl Choice {
    /// Adds output pieces.
    pub(crate) fn add(&mut self, pieces: Vec<Piece>) {
        for p in pieces {
            match p {
                Piece::Content(t) => self.content.push_str(&t),
                Piece::Reasoning(t) => self.reasoning.push_str(&t),
                Piece::ToolCall(c) => self.tool_calls.push(c),
            }
        }
    }

    /// OpenAI's finish reason: `tool_calls` when a call ended the answer.
    pub(crate) fn finish_reason(&self) -> &'static str {
        finish_reason(self.finish, !self.tool_calls.is_empty())
    }
}

/// OpenAI's spelling of why a sequence ended.
pub(crate) fn finish_reason(finish: Option<FinishReason>, called: bool) -> &'static str {
    match finish {
        Some(FinishReason::Stop) | None if called => "tool_calls",
        Some(FinishReason::Length) => "length",
        _ => "stop",
    }
}

/// Reads a sequence to its end through `splitter`. `bare_calls`: an answer that is all one
/// JSON call counts as a call (Llama 3).
pub(crate) async fn collect(mut rx: UnboundedReceiver<Event>, mut splitter: Splitter, bare_calls: bool) -> Result<Choice, ApiError> {
    let mut choice = Choice::default();
    loop {
        match rx.recv().await {
            Some(Event::Token(r)) => {
                choice.prompt_tokens = r.prompt_tokens;
                choice.cached_tokens = r.cached_tokens;
                choice.completion_tokens = r.generation_tokens;
                choice.logprobs.push(TokenLogprob::of(&r));
                choice.add(splitter.push(&r.text));
                if r.finish_reason.is_some() {
                    choice.finish = r.finish_reason;
                    choice.stop_matched = r.stop_matched.clone();
                    choice.add(splitter.finish());
                    if bare_calls && choice.tool_calls.is_empty() {
                        if let Some(calls) = splitter.bare_calls(&choice.content) {
                            choice.content.clear();
                            choice.tool_calls = calls;
                        }
                    }
                    return Ok(choice);
                }
            }
            Some(Event::Failed { message, bad_request }) => return Err(failure(message, bad_request)),
            None => return Err(engine_gone()),
        }
    }
}

/// Collects every sequence of a request.
pub(crate) async fn collect_all(receivers: Vec<UnboundedReceiver<Event>>, mut splitter: impl FnMut() -> Splitter, bare_calls: bool) -> Result<Vec<Choice>, ApiError> {
    let mut choices = Vec::with_capacity(receivers.len());
    for rx in receivers {
        choices.push(collect(rx, splitter(), bare_calls).await?);
    }
    Ok(choices)
}

/// An event of one of a request's sequences (None: the engine stopped).
type Tagged = (usize, Option<Event>);

/// The events of all of a request's sequences, as they come, each tagged with its choice
/// index; a sequence's stream ends after its last token or failure.
pub(crate) fn merged(receivers: Vec<UnboundedReceiver<Event>>) -> Pin<Box<dyn Stream<Item = Tagged> + Send>> {
    let streams = receivers.into_iter().enumerate().map(|(i, rx)| {
        stream::unfold(Some(rx), move |rx| async move {
            let mut rx = rx?;
            let event = rx.recv().await;
            let last = match &event {
                Some(Event::Token(r)) => r.finish_reason.is_some(),
                _ => true,
            };
            Some(((i, event), if last { None } else { Some(rx) }))
        })
        .boxed()
    });
    stream::select_all(streams).boxed()
}

/// A stream of server-sent events, kept alive with comments while the prompt is processed
/// (MLX LM's `: keepalive`).
pub(crate) fn sse_response(events: impl Stream<Item = SseEvent> + Send + 'static) -> Response {
    Sse::new(events.map(Ok::<_, Infallible>)).keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(5)).text("keepalive")).into_response()
}

/// A request's output stream: `handle` turns each event of its sequences (tagged with the
/// choice index; None when the engine stopped) into items on `queue`, sent in order after
/// `first`; the stream ends after every sequence's last event, or after a failure.
pub(crate) fn event_stream<T: Send + 'static>(
    receivers: Vec<UnboundedReceiver<Event>>,
    first: Vec<T>,
    mut handle: impl FnMut(usize, Option<Event>, &mut VecDeque<T>) + Send + 'static,
) -> impl Stream<Item = T> + Send {
    let mut open = receivers.len();
    let mut events = merged(receivers);
    let mut queue: VecDeque<T> = first.into();
    stream::poll_fn(move |cx| loop {
        if let Some(item) = queue.pop_front() {
            return Poll::Ready(Some(item));
        }
        if open == 0 {
            return Poll::Ready(None);
        }
        let (i, event) = match events.poll_next_unpin(cx) {
            Poll::Ready(Some(e)) => e,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        match &event {
            Some(Event::Token(r)) if r.finish_reason.is_none() => {}
            Some(Event::Token(_)) => open -= 1,
            _ => open = 0,
        }
        handle(i, event, &mut queue);
    })
}
