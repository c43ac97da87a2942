//! `config.json`, `generation_config.json` and `tokenizer_config.json`: reading them and the few
//! values lmx needs outside a model file (model_type, EOS ids, special tokens, context length).

use std::path::Path;

use serde_json::Value;

use crate::error::{IoError, Result};

/// Reads a JSON file.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| IoError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| IoError::Json { path: path.to_path_buf(), msg: format!("invalid JSON: {e}") })
}

/// True when `path` does not exist. Anything else that stops us from seeing it (a permission
/// problem, an unreadable folder) is an error naming it, not "not found".
pub fn is_missing(path: &Path) -> Result<bool> {
    path.try_exists().map(|found| !found).map_err(|e| IoError::io(path, e))
}

/// Reads a JSON file if it exists.
pub fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !is_missing(path)? {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// Writes a JSON file (pretty-printed, as transformers does).
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| IoError::Json { path: path.to_path_buf(), msg: e.to_string() })?;
    std::fs::write(path, text + "\n").map_err(|e| IoError::io(path, e))
}

/// Token ids under `key` (a number or a list of numbers).
pub fn token_ids(value: &Value, key: &str) -> Vec<u32> {
    match value.get(key) {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|n| n as u32).collect(),
        _ => Vec::new(),
    }
}

/// A special-token string from tokenizer_config.json, which stores either a string or an
/// `AddedToken` object with `content`.
pub fn special_token(tokenizer_config: &Value, key: &str) -> Option<String> {
    match tokenizer_config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The chat template source from tokenizer_config.json: a string, or a list of named
/// templates of which `tool_use` is taken when tools are given and `default` otherwise.
pub fn chat_template_source(tokenizer_config: &Value, with_tools: bool) -> Option<String> {
    match tokenizer_config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => {
            let named = |name: &str| list.iter().find(|t| t.get("name").and_then(Value::as_str) == Some(name)).and_then(|t| t.get("template")?.as_str().map(str::to_string));
            (if with_tools { named("tool_use") } else { None }).or_else(|| named("default"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_and_tokens_in_every_spelling() {
        assert_eq!(token_ids(&json!({"eos_token_id": 2}), "eos_token_id"), vec![2]);
        assert_eq!(token_ids(&json!({"eos_token_id": [1, 9]}), "eos_token_id"), vec![1, 9]);
        assert!(token_ids(&json!({}), "eos_token_id").is_empty());
        assert_eq!(special_token(&json!({"eos_token": {"content": "</s>"}}), "eos_token").as_deref(), Some("</s>"));
        let cfg = json!({"chat_template": [{"name": "default", "template": "A"}, {"name": "tool_use", "template": "B"}]});
        assert_eq!(chat_template_source(&cfg, false).as_deref(), Some("A"));
        assert_eq!(chat_template_source(&cfg, true).as_deref(), Some("B"));
    }
}
