//! Datasets in MLX LM's formats (`mlx_lm/tuner/datasets.py`), detected per record:
//! `{"messages": [...], "tools"?}` (chat), `{"prompt", "completion", "tools"?}` and `{"text"}`.
//! Every problem names the file and line.

use std::path::{Path, PathBuf};

use lmx_io::{ChatTemplate, Tokenizer};
use serde_json::Value;

/// A bad dataset file or record.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line is not a JSON object of a known format.
    #[error("{path}:{line}: {msg}")]
    Record { path: PathBuf, line: usize, msg: String },
    /// The file has no usable example.
    #[error("{0}: no usable example (expected JSON lines with \"text\", \"prompt\"/\"completion\" or \"messages\")")]
    Empty(PathBuf),
    /// Tokenizing or rendering the chat template failed.
    #[error("{path}:{line}: {source}")]
    Tokenize {
        path: PathBuf,
        line: usize,
        #[source]
        source: lmx_io::IoError,
    },
}

/// One training record.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Plain text: trained on every token.
    Text(String),
    /// A prompt and its completion, rendered as a user/assistant chat.
    Completion { prompt: String, completion: String, tools: Option<Value> },
    /// A whole chat (OpenAI fine-tuning format), optionally with tools.
    Chat { messages: Vec<Value>, tools: Option<Value> },
}

/// A record with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The record.
    pub record: Record,
    /// Its file.
    pub path: PathBuf,
    /// Its 1-based line.
    pub line: usize,
}

fn parse_record(v: &Value) -> Result<Record, String> {
    let Value::Object(o) = v else { return Err("expected a JSON object".into()) };
    let tools = o.get("tools").cloned();
    if let Some(m) = o.get("messages") {
        let messages = m.as_array().ok_or("\"messages\" must be a list")?;
        if messages.is_empty() {
            return Err("\"messages\" is empty".into());
        }
        for (i, msg) in messages.iter().enumerate() {
            if msg.get("role").and_then(Value::as_str).is_none() {
                return Err(format!("message {i} has no \"role\" string"));
            }
        }
        return Ok(Record::Chat { messages: messages.clone(), tools });
    }
    if let (Some(p), Some(c)) = (o.get("prompt"), o.get("completion")) {
        let (Some(p), Some(c)) = (p.as_str(), c.as_str()) else { return Err("\"prompt\" and \"completion\" must be strings".into()) };
        return Ok(Record::Completion { prompt: p.into(), completion: c.into(), tools });
    }
    if let Some(t) = o.get("text") {
        return t.as_str().map(|t| Record::Text(t.into())).ok_or_else(|| "\"text\" must be a string".into());
    }
    let keys: Vec<&String> = o.keys().collect();
    Err(format!("unknown format with keys {keys:?}; use {{\"text\"}}, {{\"prompt\", \"completion\"}} or {{\"messages\"}}"))
}

/// Reads one JSONL split (`train.jsonl` ...). Blank lines are skipped; any other bad line is
/// an error naming file and line; a file with no example is an error.
pub fn load_split(path: &Path) -> Result<Vec<Example>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    parse_split(&text, path)
}

/// Parses the text of a JSONL split read from `path` (named in errors), as [`load_split`].
pub fn parse_split(text: &str, path: &Path) -> Result<Vec<Example>, DataError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| DataError::Record { path: path.to_path_buf(), line: i + 1, msg };
        let v: Value = serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let record = parse_record(&v).map_err(err)?;
        out.push(Example { record, path: path.to_path_buf(), line: i + 1 });
    }
    if out.is_empty() {
        return Err(DataError::Empty(path.to_path_buf()));
    }
    Ok(out)
}

/// Token ids of an example and the number of leading prompt tokens (`--mask-prompt` keeps them
/// out of the loss; 0 when not masking), as MLX LM computes them: text gets the EOS token
/// appended; chats and completions are rendered by the chat template, the prompt being
/// everything before the last message.
pub fn tokenize(ex: &Example, tokenizer: &Tokenizer, template: Option<&ChatTemplate>, eos_token_id: u32, mask_prompt: bool) -> Result<(Vec<u32>, usize), DataError> {
    let wrap = |source: lmx_io::IoError| DataError::Tokenize { path: ex.path.clone(), line: ex.line, source };
    let chat = |messages: &[Value], tools: Option<&Value>| -> Result<(Vec<u32>, usize), DataError> {
        let t = template.ok_or_else(|| wrap(lmx_io::IoError::Template("the model has no chat template, so chat and prompt/completion data cannot be rendered; use {\"text\"} records".into())))?;
        let full = t.render(messages, false, tools, None).map_err(wrap)?;
        let tokens = tokenizer.encode(&full, false).map_err(wrap)?;
        if !mask_prompt {
            return Ok((tokens, 0));
        }
        let last_is_assistant = messages.last().and_then(|m| m.get("role")).and_then(Value::as_str) == Some("assistant");
        let prompt = t.render(&messages[..messages.len() - 1], last_is_assistant, tools, None).map_err(wrap)?;
        let offset = tokenizer.encode(&prompt, false).map_err(wrap)?.len();
        Ok((tokens, offset))
    };
    match &ex.record {
        Record::Text(text) => {
            let mut tokens = tokenizer.encode(text, true).map_err(wrap)?;
            if tokens.last() != Some(&eos_token_id) {
                tokens.push(eos_token_id);
            }
            Ok((tokens, 0))
        }
        Record::Completion { prompt, completion, tools } => {
            let messages = [serde_json::json!({"role": "user", "content": prompt}), serde_json::json!({"role": "assistant", "content": completion})];
            chat(&messages, tools.as_ref())
        }
        Record::Chat { messages, tools } => chat(messages, tools.as_ref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("lmx-tune-{name}-{}.jsonl", std::process::id()));
        std::fs::write(&p, text).expect("write");
        p
    }

    fn tokenizer() -> Tokenizer {
        let json = serde_json::json!({"version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 1, "content": "<eos>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<eos>": 1, "user": 2, "assistant": 3, "hi": 4, "there": 5, "|": 6, ":": 7}, "unk_token": "<unk>"}});
        Tokenizer::from_json(&json).expect("tokenizer")
    }

    const TEMPLATE: &str = "{% for m in messages %}{{ m.role }}: {{ m.content }} | {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";

    #[test]
    fn formats_are_detected_per_record() {
        let p = write("formats", "{\"text\": \"hi\"}\n\n{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": []}\n");
        let ex = load_split(&p).expect("loads");
        assert_eq!(ex.len(), 3);
        assert_eq!(ex[0].record, Record::Text("hi".into()));
        assert!(matches!(ex[1].record, Record::Completion { .. }));
        assert!(matches!(&ex[2].record, Record::Chat { tools: Some(_), .. }));
        assert_eq!(ex[2].line, 4);
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let p = write("bad", "{\"text\": \"ok\"}\n{not json\n");
        let err = load_split(&p).expect_err("bad json").to_string();
        assert!(err.contains(&format!("{}:2", p.display())) && err.contains("invalid JSON"), "{err}");
        let p = write("unknown", "{\"question\": \"q\", \"answer\": \"a\"}\n");
        let err = load_split(&p).expect_err("unknown").to_string();
        assert!(err.contains(":1:") && err.contains("question") && err.contains("messages"), "{err}");
        let p = write("empty", "\n\n");
        assert!(load_split(&p).expect_err("empty").to_string().contains("no usable example"));
    }

    #[test]
    fn tokenize_appends_eos_and_masks_the_prompt() {
        let tok = tokenizer();
        let tmpl = ChatTemplate::new(TEMPLATE, "", "<eos>").expect("template");
        let p = write("tok", "{\"text\": \"hi there\"}\n{\"prompt\": \"hi\", \"completion\": \"there\"}\n");
        let ex = load_split(&p).expect("loads");
        assert_eq!(tokenize(&ex[0], &tok, Some(&tmpl), 1, true).expect("text"), (vec![4, 5, 1], 0));
        // "user: hi | assistant: there |" with the prompt "user: hi | assistant:" masked.
        let (tokens, offset) = tokenize(&ex[1], &tok, Some(&tmpl), 1, true).expect("completion");
        assert_eq!(tokens, vec![2, 7, 4, 6, 3, 7, 5, 6]);
        assert_eq!(offset, 6);
        assert_eq!(tokenize(&ex[1], &tok, Some(&tmpl), 1, false).expect("unmasked").1, 0);
        let err = tokenize(&ex[1], &tok, None, 1, true).expect_err("no template").to_string();
        assert!(err.contains(":2:") && err.contains("chat template"), "{err}");
    }
}
