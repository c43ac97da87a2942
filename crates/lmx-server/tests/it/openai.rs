//! OpenAI's chat and completions endpoints on the real default model: answers equal the
//! library's greedy generation, streams equal whole answers, and the prefix cache, stop
//! strings, log-probabilities, `n` and concurrent requests behave.

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::{model, post, send, sse_data};

const QUESTION: &str = "What is the capital of France?";

fn chat(question: &str, extra: Value) -> Value {
    let mut body = json!({"model": "smollm2", "messages": [{"role": "user", "content": question}], "max_tokens": 24});
    for (k, v) in extra.as_object().expect("an object") {
        body[k] = v.clone();
    }
    body
}

/// What the library generates greedily for `question` as a chat, up to `max_tokens`.
fn library_answer(question: &str, max_tokens: usize) -> String {
    let (m, tok) = model();
    let prompt = tok.chat_prompt(&[lmx::Message::new("user", question)], None).expect("a prompt");
    let params = lmx::GenerateParams { max_tokens, ..Default::default() };
    let mut cache = lmx::PromptCache::new(&**m);
    lmx::stream_generate(m, tok, &prompt, &mut cache, params).map(|r| r.expect("a step").text).collect()
}

#[tokio::test]
async fn a_chat_answer_is_the_librarys_greedy_generation() {
    let (status, body) = post("/v1/chat/completions", &chat(QUESTION, json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let content = body["choices"][0]["message"]["content"].as_str().expect("content");
    assert_eq!(content, library_answer(QUESTION, 24));
    assert!(content.contains("Paris"), "{content}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "smollm2");
    assert!(body["id"].as_str().is_some_and(|id| id.starts_with("chatcmpl-")));
    let usage = &body["usage"];
    let (_, tok) = model();
    let prompt = tok.chat_prompt(&[lmx::Message::new("user", QUESTION)], None).expect("a prompt");
    assert_eq!(usage["prompt_tokens"], prompt.len());
    assert_eq!(usage["total_tokens"].as_u64(), Some(usage["prompt_tokens"].as_u64().unwrap_or(0) + usage["completion_tokens"].as_u64().unwrap_or(0)));
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn a_stream_equals_the_whole_answer() {
    let q = "Name three colors.";
    let (_, whole) = post("/v1/chat/completions", &chat(q, json!({}))).await;
    let (status, text) = send("POST", "/v1/chat/completions", Some(&chat(q, json!({"stream": true, "stream_options": {"include_usage": true}})).to_string()), Some("sesame")).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("a JSON chunk")).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, whole["choices"][0]["message"]["content"].as_str().expect("content"));
    let finish: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finish, [&whole["choices"][0]["finish_reason"]]);
    let last = chunks.last().expect("a usage chunk");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], whole["usage"]["completion_tokens"]);
}

#[tokio::test]
async fn a_repeated_prompt_comes_from_the_prefix_cache() {
    let body = chat("Tell me about the moon in one sentence.", json!({"max_tokens": 4}));
    let (_, first) = post("/v1/chat/completions", &body).await;
    let (_, second) = post("/v1/chat/completions", &body).await;
    let prompt = first["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");
    // Everything but the last prompt token, which runs as the first decode step.
    assert_eq!(second["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(), Some(prompt - 1), "{second}");
    assert_eq!(first["choices"][0]["message"], second["choices"][0]["message"]);
}

#[tokio::test]
async fn stop_strings_cut_the_answer() {
    let full = library_answer(QUESTION, 24);
    let (_, body) = post("/v1/chat/completions", &chat(QUESTION, json!({"stop": ["Paris"]}))).await;
    let content = body["choices"][0]["message"]["content"].as_str().expect("content");
    assert_eq!(content, &full[..full.find("Paris").expect("Paris in the answer")]);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn log_probabilities() {
    let (status, body) = post("/v1/chat/completions", &chat(QUESTION, json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 5}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let content = body["choices"][0]["logprobs"]["content"].as_array().expect("logprobs.content");
    assert_eq!(content.len(), body["usage"]["completion_tokens"].as_u64().expect("tokens") as usize);
    let text: String = content.iter().map(|t| t["token"].as_str().expect("token")).collect();
    assert_eq!(text, body["choices"][0]["message"]["content"].as_str().expect("content"));
    for t in content {
        let top = t["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 3);
        let lps: Vec<f64> = top.iter().map(|e| e["logprob"].as_f64().expect("a logprob")).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0, "{lps:?}");
        // Greedy: the chosen token is the most likely one.
        assert_eq!(t["token"], top[0]["token"]);
        assert!((t["logprob"].as_f64().expect("logprob") - lps[0]).abs() < 1e-6);
    }
}

#[tokio::test]
async fn n_choices_with_a_seed_are_reproducible() {
    let body = chat("Write a word.", json!({"n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 6}));
    let (status, a) = post("/v1/chat/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{a}");
    let (_, b) = post("/v1/chat/completions", &body).await;
    let texts = |v: &Value| v["choices"].as_array().expect("choices").iter().map(|c| c["message"]["content"].as_str().unwrap_or("").to_string()).collect::<Vec<_>>();
    assert_eq!(texts(&a).len(), 3);
    assert_eq!(texts(&a), texts(&b));
    let indices: Vec<u64> = a["choices"].as_array().expect("choices").iter().map(|c| c["index"].as_u64().expect("index")).collect();
    assert_eq!(indices, [0, 1, 2]);
}

#[tokio::test]
async fn concurrent_requests_decode_together_and_answer_as_alone() {
    let questions = ["What is the capital of France?", "What is 2 + 2?", "Name a fruit.", "What color is the sky?", "Who wrote Hamlet?", "What is water made of?"];
    let alone: Vec<String> = questions.iter().map(|q| library_answer(q, 16)).collect();
    let requests = questions.iter().map(|q| async move { post("/v1/chat/completions", &chat(q, json!({"max_tokens": 16}))).await });
    let answers = futures_util::future::join_all(requests).await;
    for ((status, body), expected) in answers.iter().zip(&alone) {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"].as_str(), Some(expected.as_str()));
    }
}

#[tokio::test]
async fn completions_plain_echo_lists_and_stream() {
    let (status, body) = post("/v1/completions", &json!({"prompt": "The capital of France is", "max_tokens": 6, "echo": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let text = body["choices"][0]["text"].as_str().expect("text");
    assert!(text.starts_with("The capital of France is"), "{text}");
    assert_eq!(body["object"], "text_completion");
    let (_, two) = post("/v1/completions", &json!({"prompt": ["One, two,", "Red, green,"], "max_tokens": 3})).await;
    assert_eq!(two["choices"].as_array().map(Vec::len), Some(2), "{two}");
    let (_, plain) = post("/v1/completions", &json!({"prompt": "One, two,", "max_tokens": 3})).await;
    assert_eq!(two["choices"][0]["text"], plain["choices"][0]["text"]);
    let (_, text) = send("POST", "/v1/completions", Some(&json!({"prompt": "One, two,", "max_tokens": 3, "stream": true}).to_string()), Some("sesame")).await;
    let data = sse_data(&text);
    let streamed: String = data.iter().filter_map(|d| serde_json::from_str::<Value>(d).ok()).filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string)).collect();
    assert_eq!(streamed, plain["choices"][0]["text"].as_str().expect("text"));
}

#[tokio::test]
async fn models_lists_the_served_model() {
    let (status, text) = send("GET", "/v1/models", None, Some("sesame")).await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(body["data"][0]["id"], "smollm2");
    let (status, _) = send("GET", "/v1/models/smollm2", None, Some("sesame")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send("GET", "/v1/models/other", None, Some("sesame")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_quantized_kv_cache_keeps_batching() {
    let kv = lmx::KvOptions { kv_bits: Some(8), quantized_kv_start: 0, ..Default::default() };
    let (m, tok) = lmx::load(&crate::default_model()).expect("the default model");
    let mut opts = crate::options();
    opts.engine.kv = kv;
    opts.api_key = None;
    let router = lmx_server::router(m, tok, opts, None, None);
    let questions = ["What is the capital of France?", "Name a fruit.", "What color is the sky?", "Who wrote Hamlet?"];
    let requests = questions.iter().map(|q| {
        let router = router.clone();
        async move {
            let req = axum::http::Request::builder()
                .method("POST")
                .uri("/v1/chat/completions")
                .header("content-type", "application/json")
                .body(axum::body::Body::from(chat(q, json!({"max_tokens": 12})).to_string()))
                .expect("a request");
            let response = tower::ServiceExt::oneshot(router, req).await.expect("an answer");
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("a body");
            serde_json::from_slice::<Value>(&bytes).expect("JSON")
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    let (model, tokenizer) = model();
    for (q, a) in questions.iter().zip(&answers) {
        let prompt = tokenizer.chat_prompt(&[lmx::Message::new("user", *q)], None).expect("a prompt");
        let mut cache = lmx::PromptCache::with_options(&**model, kv).expect("a quantized cache");
        let params = lmx::GenerateParams { max_tokens: 12, ..Default::default() };
        let alone: String = lmx::stream_generate(model, tokenizer, &prompt, &mut cache, params).map(|r| r.expect("a step").text).collect();
        assert_eq!(a["choices"][0]["message"]["content"].as_str(), Some(alone.as_str()), "{q}");
    }
}

#[tokio::test]
async fn a_draft_model_decodes_speculatively_to_the_same_answer() {
    let (m, tok) = lmx::load(&crate::default_model()).expect("the default model");
    let (draft, _) = lmx::load(&crate::default_model()).expect("the draft");
    let mut opts = crate::options();
    opts.api_key = None;
    let router = lmx_server::router(m, tok, opts, None, Some(lmx_server::Draft { model: std::sync::Arc::new(draft), num_draft_tokens: 3 }));
    let questions = ["What is the capital of France?", "Name a fruit."];
    let requests = questions.iter().map(|q| {
        let router = router.clone();
        async move {
            let req = axum::http::Request::builder().method("POST").uri("/v1/chat/completions").body(axum::body::Body::from(chat(q, json!({"max_tokens": 16})).to_string())).expect("a request");
            let response = tower::ServiceExt::oneshot(router, req).await.expect("an answer");
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("a body");
            serde_json::from_slice::<Value>(&bytes).expect("JSON")
        }
    });
    let answers = futures_util::future::join_all(requests).await;
    for (q, a) in questions.iter().zip(&answers) {
        assert_eq!(a["choices"][0]["message"]["content"].as_str(), Some(library_answer(q, 16).as_str()), "{a}");
    }
}
