//! Chat templates: the Jinja templates shipped in `tokenizer_config.json` or
//! `chat_template.jinja`, rendered with minijinja configured as transformers configures Jinja2
//! (`trim_blocks`, `lstrip_blocks`, loop controls, Python string methods, `raise_exception`,
//! `strftime_now`).

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::error::{IoError, Result};

/// One chat message. `content` is plain text; tool calls and other keys ride in `extra`.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self { role: role.to_string(), content: content.into() }
    }
}

/// A compiled chat template plus the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat_template";

/// Template instructions one rendering may run.
pub const TEMPLATE_FUEL: u64 = 10_000_000;

impl ChatTemplate {
    /// Compiles `source`.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // A template from a downloaded model must not loop forever or build gigabytes: one
        // rendering may run this many template instructions (a long chat takes thousands).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> { Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg)) });
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        env.add_template_owned(NAME, source.to_string()).map_err(|e| IoError::Template(e.to_string()))?;
        Ok(Self { env, source: source.to_string(), bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (any serializable list of message objects). `tools` is the OpenAI
    /// tool list or None; `extra` holds additional template variables (MLX LM's
    /// `--chat-template-config`, e.g. `{"enable_thinking": false}`).
    pub fn render<M: Serialize>(&self, messages: &[M], add_generation_prompt: bool, tools: Option<&serde_json::Value>, extra: Option<&serde_json::Value>) -> Result<String> {
        let tmpl = self.env.get_template(NAME).map_err(|e| IoError::Template(e.to_string()))?;
        let mut ctx = serde_json::Map::new();
        if let Some(serde_json::Value::Object(extra)) = extra {
            ctx.extend(extra.clone());
        }
        ctx.insert("messages".into(), serde_json::to_value(messages).map_err(|e| IoError::Template(e.to_string()))?);
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("bos_token".into(), self.bos_token.clone().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().into());
        if let Some(tools) = tools {
            ctx.insert("tools".into(), tools.clone());
        }
        tmpl.render(Value::from_serialize(&ctx)).map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            IoError::Template(msg)
        })
    }
}

/// `strftime_now(fmt)` for templates (Llama 3.1 prints today's date): UTC, with the few
/// directives chat templates use (%d %m %Y %y %b %B %H %M %S).
fn strftime_now(fmt: &str) -> std::result::Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let tod = secs.rem_euclid(86_400);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('%') => out.push('%'),
            other => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: unsupported directive %{}", other.unwrap_or(' ')))),
        }
    }
    Ok(out)
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_like_transformers() {
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").expect("compiles");
        let out = t.render(&[Message::new("user", "Hi")], true, None, None).expect("renders");
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn raise_exception_and_python_methods() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip().upper() }}{{ bos_token }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").expect("compiles");
        assert_eq!(t.render(&[Message::new("user", " hi ")], false, None, None).expect("renders"), "HI<s>");
        let err = t.render(&[Message::new("system", "x")], false, None, None).expect_err("raises").to_string();
        assert!(err.contains("first must be user"), "{err}");
    }

    #[test]
    fn tools_and_extra_variables_reach_the_template() {
        let src = "{% if tools %}{{ tools | length }} tools{% endif %}{% if enable_thinking is defined %} think={{ enable_thinking }}{% endif %}";
        let t = ChatTemplate::new(src, "", "").expect("compiles");
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
        let extra = serde_json::json!({"enable_thinking": false});
        let out = t.render::<Message>(&[], false, Some(&tools), Some(&extra)).expect("renders");
        assert_eq!(out, "1 tools think=False");
    }

    /// A template that would loop for ever (or build a huge text) stops with an error.
    #[test]
    fn runaway_templates_stop() {
        let t = ChatTemplate::new("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "", "").expect("compiles");
        let err = t.render::<Message>(&[], false, None, None).expect_err("runs out of fuel").to_string();
        assert!(err.contains("fuel"), "{err}");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_543), (2026, 3, 31));
    }
}
