//! Generated text split into what the APIs report separately: answer text, reasoning
//! (between `<think>` and `</think>`) and tool calls (in the model's own markup, parsed by
//! [`ToolFormat`]). Text that may be the start of a marker is held back until it cannot be,
//! so a stream never shows half a marker.

use serde_json::{json, Value};

/// How a model family writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ToolFormat {
    /// Hermes / Qwen: `<tool_call>{"name": .., "arguments": {..}}</tool_call>`, one block
    /// per call. Also lmx's format for templates that know no tools.
    Hermes,
    /// Mistral: `[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]` to the end, or
    /// `[TOOL_CALLS]name[ARGS]{..}` (newer templates).
    Mistral,
    /// Llama 3.1+: `<|python_tag|>` or a bare `{"name": .., "parameters": {..}}` answer.
    Llama3,
}

impl ToolFormat {
    /// The format a chat template's source implies.
    pub(crate) fn detect(template_source: &str) -> Self {
        if template_source.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if template_source.contains("<|python_tag|>") || template_source.contains("ipython") {
            ToolFormat::Llama3
        } else {
            ToolFormat::Hermes
        }
    }

    /// The marker opening a call, and the one closing it (None: the call runs to the end).
    fn markers(self) -> (&'static str, Option<&'static str>) {
        match self {
            ToolFormat::Hermes => ("<tool_call>", Some("</tool_call>")),
            ToolFormat::Mistral => ("[TOOL_CALLS]", None),
            ToolFormat::Llama3 => ("<|python_tag|>", None),
        }
    }
}

/// A parsed tool call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

impl ToolCall {
    /// OpenAI's `tool_calls[]` entry.
    pub(crate) fn openai(&self) -> Value {
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// A piece of output.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Piece {
    Content(String),
    Reasoning(String),
    ToolCall(ToolCall),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    Reasoning,
    Tool,
}

const THINK: (&str, &str) = ("<think>", "</think>");

/// Splits a stream of text deltas into [`Piece`]s.
pub(crate) struct Splitter {
    mode: Mode,
    held: String,
    /// Text of the current tool call.
    call: String,
    tools: Option<ToolFormat>,
    think: bool,
    next_id: usize,
    id_prefix: String,
    /// Whitespace-only answer text, held until more text comes: around tool calls it is
    /// dropped.
    blank: String,
    /// Calls reported so far.
    calls: usize,
}

impl Splitter {
    /// `tools`: the format to parse calls in (None when the request has no tools);
    /// `think`: whether the model writes `<think>` blocks; `in_reasoning`: the prompt left a
    /// think block open.
    pub(crate) fn new(tools: Option<ToolFormat>, think: bool, in_reasoning: bool) -> Self {
        let id_prefix = format!("call_{}", crate::openai::random_id(12));
        Self { mode: if in_reasoning { Mode::Reasoning } else { Mode::Normal }, held: String::new(), call: String::new(), tools, think, next_id: 0, id_prefix, blank: String::new(), calls: 0 }
    }

    fn markers(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        match self.mode {
            Mode::Normal => {
                if self.think {
                    m.push(THINK.0);
                }
                if let Some(f) = self.tools {
                    m.push(f.markers().0);
                }
            }
            Mode::Reasoning => m.push(THINK.1),
            Mode::Tool => m.extend(self.tools.and_then(|f| f.markers().1)),
        }
        m
    }

    /// Takes a delta; returns what can be reported now.
    pub(crate) fn push(&mut self, delta: &str) -> Vec<Piece> {
        self.held.push_str(delta);
        let mut out = Vec::new();
        loop {
            let markers = self.markers();
            let found = markers.iter().filter_map(|m| self.held.find(m).map(|at| (at, *m))).min();
            match found {
                Some((at, marker)) => {
                    let before = self.held[..at].to_string();
                    self.held.drain(..at + marker.len());
                    self.emit(before, &mut out);
                    self.switch(marker, &mut out);
                }
                None => {
                    // Keep the longest tail that may begin a marker.
                    let keep = (1..=self.held.len())
                        .rev()
                        .find(|&n| self.held.is_char_boundary(self.held.len() - n) && markers.iter().any(|m| m.len() > n && m.starts_with(&self.held[self.held.len() - n..])))
                        .unwrap_or(0);
                    let now = self.held[..self.held.len() - keep].to_string();
                    self.held.drain(..self.held.len() - keep);
                    self.emit(now, &mut out);
                    return out;
                }
            }
        }
    }

    /// The end of the text: flushes what was held and closes an open call.
    pub(crate) fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.held);
        self.emit(rest, &mut out);
        if self.mode == Mode::Tool {
            let call = std::mem::take(&mut self.call);
            self.parse_calls(&call, false, &mut out);
        }
        let blank = std::mem::take(&mut self.blank);
        if self.calls == 0 && !blank.is_empty() {
            out.push(Piece::Content(blank));
        }
        out
    }

    fn emit(&mut self, text: String, out: &mut Vec<Piece>) {
        if text.is_empty() {
            return;
        }
        match self.mode {
            Mode::Normal if text.trim().is_empty() => self.blank.push_str(&text),
            Mode::Normal => {
                let blank = std::mem::take(&mut self.blank);
                out.push(Piece::Content(blank + &text));
            }
            Mode::Reasoning => out.push(Piece::Reasoning(text)),
            Mode::Tool => self.call.push_str(&text),
        }
    }

    fn switch(&mut self, marker: &str, out: &mut Vec<Piece>) {
        self.mode = match (self.mode, marker) {
            (Mode::Normal, m) if m == THINK.0 => Mode::Reasoning,
            (Mode::Reasoning, _) => Mode::Normal,
            (Mode::Normal, _) => {
                self.blank.clear();
                Mode::Tool
            }
            (Mode::Tool, _) => {
                let call = std::mem::take(&mut self.call);
                self.parse_calls(&call, true, out);
                Mode::Normal
            }
        };
    }

    fn new_call(&mut self, name: String, arguments: &Value) -> ToolCall {
        self.next_id += 1;
        self.calls += 1;
        let arguments = match arguments {
            Value::String(s) => s.clone(),
            Value::Null => "{}".to_string(),
            v => v.to_string(),
        };
        ToolCall { id: format!("{}_{}", self.id_prefix, self.next_id), name, arguments }
    }

    /// Parses the text of one call block (one object, a list, or Mistral's `name[ARGS]{..}`;
    /// `closed`: its end marker was seen); text that is no call is reported as content as
    /// it came, not dropped.
    fn parse_calls(&mut self, text: &str, closed: bool, out: &mut Vec<Piece>) {
        let calls = parse_call_text(text.trim());
        match calls {
            Some(calls) => {
                for (name, args) in calls {
                    let call = self.new_call(name, &args);
                    out.push(Piece::ToolCall(call));
                }
            }
            None => {
                let (open, close) = self.tools.map_or(("", None), |f| f.markers());
                let close = if closed { close.unwrap_or("") } else { "" };
                out.push(Piece::Content(format!("{open}{text}{close}")));
            }
        }
    }

    /// A whole answer that is a bare JSON call (Llama 3 without `<|python_tag|>`): the calls,
    /// or None when the text is not one.
    pub(crate) fn bare_calls(&mut self, text: &str) -> Option<Vec<ToolCall>> {
        let calls = parse_call_text(text.trim())?;
        Some(calls.into_iter().map(|(name, args)| self.new_call(name, &args)).collect())
    }
}

/// `{"name", "arguments" | "parameters"}`, a list of those, or `name[ARGS]{..}`.
fn parse_call_text(text: &str) -> Option<Vec<(String, Value)>> {
    let one = |v: &Value| -> Option<(String, Value)> {
        let name = v.get("name")?.as_str()?.to_string();
        let args = v.get("arguments").or_else(|| v.get("parameters")).cloned().unwrap_or(json!({}));
        Some((name, args))
    };
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        return match &v {
            Value::Array(items) if !items.is_empty() => items.iter().map(one).collect(),
            Value::Object(_) => one(&v).map(|c| vec![c]),
            _ => None,
        };
    }
    let (name, args) = text.split_once("[ARGS]")?;
    let args: Value = serde_json::from_str(args.trim()).ok()?;
    let name = name.trim();
    (!name.is_empty() && !name.contains(char::is_whitespace)).then(|| vec![(name.to_string(), args)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &mut Splitter, deltas: &[&str]) -> Vec<Piece> {
        let mut out: Vec<Piece> = deltas.iter().flat_map(|d| s.push(d)).collect();
        out.extend(s.finish());
        // Merge neighbouring text pieces of one kind: how deltas are cut does not matter.
        let mut merged: Vec<Piece> = Vec::new();
        for p in out {
            match (merged.last_mut(), p) {
                (Some(Piece::Content(a)), Piece::Content(b)) => a.push_str(&b),
                (Some(Piece::Reasoning(a)), Piece::Reasoning(b)) => a.push_str(&b),
                (_, p) => merged.push(p),
            }
        }
        merged
    }

    fn names(pieces: &[Piece]) -> Vec<String> {
        pieces
            .iter()
            .map(|p| match p {
                Piece::Content(t) => format!("C:{t}"),
                Piece::Reasoning(t) => format!("R:{t}"),
                Piece::ToolCall(c) => format!("T:{}:{}", c.name, c.arguments),
            })
            .collect()
    }

    #[test]
    fn hermes_calls_split_across_deltas() {
        let mut s = Splitter::new(Some(ToolFormat::Hermes), true, false);
        let out = run(&mut s, &["<thi", "nk>plan</th", "ink>Sure. <tool", "_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_", "call>"]);
        assert_eq!(names(&out), ["R:plan", "C:Sure. ", "T:get_weather:{\"city\":\"Paris\"}"]);
    }

    #[test]
    fn a_partial_marker_is_held_then_released() {
        let mut s = Splitter::new(Some(ToolFormat::Hermes), false, false);
        assert_eq!(s.push("a <tool"), vec![Piece::Content("a ".into())]);
        assert_eq!(s.push("box>"), vec![Piece::Content("<toolbox>".into())]);
    }

    #[test]
    fn a_broken_call_stays_text() {
        let mut s = Splitter::new(Some(ToolFormat::Hermes), false, false);
        let out = run(&mut s, &["<tool_call>{not json</tool_call>"]);
        assert_eq!(names(&out), ["C:<tool_call>{not json</tool_call>"]);
    }

    #[test]
    fn blank_text_around_calls_is_dropped_but_kept_alone() {
        let mut s = Splitter::new(Some(ToolFormat::Hermes), false, false);
        let out = run(&mut s, &["\n", "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>", "\n"]);
        assert_eq!(names(&out), ["T:f:{}"]);
        let mut s = Splitter::new(Some(ToolFormat::Hermes), false, false);
        assert_eq!(names(&run(&mut s, &["a", "\n", "b"])), ["C:a\nb"]);
        let mut s = Splitter::new(None, false, false);
        assert_eq!(names(&run(&mut s, &[" ", "\n"])), ["C: \n"]);
    }

    #[test]
    fn a_call_cut_short_stays_as_written() {
        let mut s = Splitter::new(Some(ToolFormat::Hermes), false, false);
        let out = run(&mut s, &["<tool_call>\n{\"name\": \"f\", \"argu"]);
        assert_eq!(names(&out), ["C:<tool_call>\n{\"name\": \"f\", \"argu"]);
    }

    #[test]
    fn mistral_both_spellings() {
        let mut s = Splitter::new(Some(ToolFormat::Mistral), false, false);
        let out = run(&mut s, &["[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"x\": 1}}, {\"name\": \"b\", \"arguments\": {}}]"]);
        assert_eq!(names(&out), ["T:a:{\"x\":1}", "T:b:{}"]);
        let mut s = Splitter::new(Some(ToolFormat::Mistral), false, false);
        let out = run(&mut s, &["[TOOL_CALLS]get_time[ARGS]{\"tz\": \"UTC\"}"]);
        assert_eq!(names(&out), ["T:get_time:{\"tz\":\"UTC\"}"]);
    }

    #[test]
    fn llama3_python_tag_and_bare_json() {
        let mut s = Splitter::new(Some(ToolFormat::Llama3), false, false);
        let out = run(&mut s, &["<|python_tag|>{\"name\": \"f\", \"parameters\": {\"a\": \"b\"}}"]);
        assert_eq!(names(&out), ["T:f:{\"a\":\"b\"}"]);
        let mut s = Splitter::new(Some(ToolFormat::Llama3), false, false);
        let calls = s.bare_calls("{\"name\": \"f\", \"parameters\": {}}").expect("a call");
        assert_eq!(calls[0].name, "f");
        assert!(s.bare_calls("Paris is the capital.").is_none());
    }

    #[test]
    fn the_format_follows_the_template() {
        // Fragments of the templates Qwen 2.5, Mistral and Llama 3.1 ship.
        assert_eq!(ToolFormat::detect("{%- if tools %}<tools>{{ tool | tojson }}</tools> ... <tool_call>\n{\"name\": <function-name>}</tool_call>"), ToolFormat::Hermes);
        assert_eq!(ToolFormat::detect("{%- if message.tool_calls %}[TOOL_CALLS][{%- for tool in message.tool_calls %}"), ToolFormat::Mistral);
        assert_eq!(ToolFormat::detect("{%- if builtin_tools is defined %}<|python_tag|>{%- endif %} ipython"), ToolFormat::Llama3);
        assert_eq!(ToolFormat::detect("{% for message in messages %}{{ message.content }}{% endfor %}"), ToolFormat::Hermes);
    }

    #[test]
    fn no_tools_means_plain_text() {
        let mut s = Splitter::new(None, false, false);
        let out = run(&mut s, &["<tool_call>{\"name\": \"x\"}</tool_call>"]);
        assert_eq!(names(&out), ["C:<tool_call>{\"name\": \"x\"}</tool_call>"]);
    }
}
