//! Constrained decoding with llguidance: `response_format` (JSON object or JSON schema) and
//! `tool_choice` (`required` or a named function) become a grammar that masks, at every
//! step, the tokens that cannot continue it, so the output always parses and validates.
//!
//! Why llguidance (over outlines-core): it computes each step's mask lazily from a token
//! trie and an Earley parser (tens of microseconds a token, no ahead-of-time index over the
//! vocabulary, which outlines-core builds per schema and which grows with schema size), it
//! supports recursive schemas, `$ref`, and grammars mixing text and JSON (Lark with `%json`),
//! which tool calls in a model's own markup need; llama.cpp, vLLM and SGLang use it.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use lmx::{Constraint, ConstraintFactory, TokenizerWrapper};
use serde_json::{json, Value};

use crate::output::ToolFormat;

/// The vocabulary as llguidance sees it, and the tokenizer for text it must tokenize.
struct Env {
    trie: TokTrie,
    tokenizer: Arc<TokenizerWrapper>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.tokenize_with_greedy_fallback(s, |text| self.tokenizer.encode(text, false).unwrap_or_default())
    }
}

/// Builds grammars into per-sequence constraints for one model's vocabulary.
pub(crate) struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// For `tokenizer`'s vocabulary padded to the model's `vocab` logits; `eos` ends a
    /// finished grammar.
    pub(crate) fn new(tokenizer: Arc<TokenizerWrapper>, vocab: usize, eos: &[u32]) -> Result<Self, String> {
        let bytes = tokenizer.token_bytes().map_err(|e| e.to_string())?;
        let mut words: Vec<Vec<u8>> = bytes
            .into_iter()
            .take(vocab)
            .map(|(b, special)| {
                let mut w = Vec::with_capacity(b.len() + 1);
                if special {
                    w.push(TokTrie::SPECIAL_TOKEN_MARKER);
                }
                w.extend(b);
                w
            })
            .collect();
        // Rows of the embedding without a token (padding) can only be reached by id.
        while words.len() < vocab {
            let mut w = format!(".<[{}]>", words.len()).into_bytes();
            w[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(w);
        }
        let first = *eos.first().ok_or("the model has no end-of-sequence token")?;
        let info = TokRxInfo::new(vocab as u32, first);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(Env { trie, tokenizer });
        let factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        Ok(Self { factory })
    }

    /// Compiles `grammar` (errors name what is wrong with it) into a factory of per-sequence
    /// constraints.
    pub(crate) fn constraint(&self, grammar: TopLevelGrammar) -> Result<ConstraintFactory, String> {
        let parser = self.factory.create_parser(grammar).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(ConstraintFactory(Arc::new(move || Ok(Box::new(Guided(matcher.deep_clone())) as Box<dyn Constraint>))))
    }

    /// The id of `text` when it is one special token of the vocabulary.
    fn special_id(&self, text: &str) -> Option<u32> {
        let trie = self.factory.tok_env().tok_trie();
        let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
        marked.extend_from_slice(text.as_bytes());
        trie.token_id(&marked)
    }

    /// A Lark literal for a marker: the special token by id when it is one, else its text.
    fn literal(&self, text: &str) -> String {
        match self.special_id(text) {
            Some(id) => format!("<[{id}]>"),
            None => serde_json::to_string(text).unwrap_or_default(),
        }
    }

    /// The grammar of a tool call in `format` to one of `tools` (OpenAI's list): every call
    /// names a function of the list (or `only`) and its arguments follow its `parameters`;
    /// several calls when `parallel` (small models otherwise repeat a call until the token
    /// limit, which is why llama.cpp's server also defaults to one).
    pub(crate) fn tool_call(&self, format: ToolFormat, tools: &[Value], only: Option<&str>, parallel: bool) -> TopLevelGrammar {
        let key = if format == ToolFormat::Llama3 { "parameters" } else { "arguments" };
        let calls: Vec<Value> = tools
            .iter()
            .filter_map(|t| t.get("function"))
            .filter(|f| only.is_none_or(|n| f.get("name").and_then(Value::as_str) == Some(n)))
            .map(|f| {
                let params = f.get("parameters").filter(|p| p.is_object()).cloned().unwrap_or(json!({"type": "object"}));
                json!({"type": "object", "properties": {"name": {"const": f.get("name")}, key: params}, "required": ["name", key], "additionalProperties": false})
            })
            .collect();
        let call = json!({"anyOf": calls});
        let lark = match format {
            ToolFormat::Hermes => {
                let more = if parallel { " (\"\\n\" call)*" } else { "" };
                format!("start: call{more}\ncall: {} \"\\n\" %json {} \"\\n\" {}\n", self.literal("<tool_call>"), compact(call), self.literal("</tool_call>"))
            }
            ToolFormat::Mistral => {
                let mut list = json!({"type": "array", "items": call, "minItems": 1});
                if !parallel {
                    list["maxItems"] = json!(1);
                }
                format!("start: {} %json {}\n", self.literal("[TOOL_CALLS]"), compact(list))
            }
            ToolFormat::Llama3 => format!("start: %json {}\n", compact(call)),
        };
        TopLevelGrammar::from_lark(lark)
    }
}

/// JSON as Python's `json.dumps` writes it (", " and ": ", no newlines): a model cannot pad
/// its output with endless whitespace, which small models otherwise do.
pub(crate) fn compact(mut schema: Value) -> Value {
    if let Value::Bool(true) = schema {
        schema = json!({});
    }
    if let Some(obj) = schema.as_object_mut() {
        obj.insert("x-guidance".into(), json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
    }
    schema
}

/// The grammar of a JSON schema (`response_format`, `text.format`).
pub(crate) fn json_schema(schema: Value) -> TopLevelGrammar {
    TopLevelGrammar::from_json_schema(compact(schema))
}

/// One sequence's position in its grammar.
struct Guided(Matcher);

impl Constraint for Guided {
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self.0.compute_mask_or_eos().map_err(|e| e.to_string())?;
        for (i, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    fn accept(&mut self, token: u32) -> Result<(), String> {
        if self.0.is_stopped() {
            return Ok(());
        }
        self.0.consume_token(token).map_err(|e| e.to_string())
    }
}
