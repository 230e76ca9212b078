//! A model's chat template (`tokenizer.chat_template`, Jinja) rendered with minijinja, set up as
//! Hugging Face's `apply_chat_template` sets up Jinja: blocks trim their newline and leading
//! whitespace, Python's string methods (`strip`, `startswith` …) work, `raise_exception` fails
//! the render with the template's message, and `strftime_now` formats today's date.
//!
//! Message text is user input: a control-token name inside it (`<|im_start|>`) must stay text.
//! Before rendering, every such name in a message is broken by a marker character, so that the
//! rendered prompt can be split at the control tokens the template wrote and nowhere else;
//! the markers are taken out of the text pieces afterwards (see [`split_at_controls`]).

use std::collections::BTreeMap;

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, Value};

use crate::error::{EngineError, Result};
use crate::tokenizer::ChatMessage;

/// Breaks control-token names in message text; doubled when the text has one of its own.
/// A noncharacter: no encoding of real text contains it.
const MARK: char = '\u{FDD0}';

/// ChatML, llama.cpp's choice for a file without a template.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A compiled chat template with the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// A piece of a rendered prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A control token the template wrote.
    Control(String),
    /// Text (template text and message text alike).
    Text(String),
}

fn template_error(e: &Error) -> EngineError {
    // the detail and the template line, without minijinja's multi-line debug dump
    let mut message = match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        message.push_str(&format!(" (line {line})"));
    }
    EngineError::ChatTemplate(message)
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are the names the template may write.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error(&e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| {
            chrono::Local::now().format(&format).to_string()
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| template_error(&e))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The prompt for `messages`, ending where the assistant's answer begins, split at the
    /// control tokens (`controls`: every control-token name of the vocabulary) the template wrote.
    pub fn render(&self, messages: &[ChatMessage], controls: &[String]) -> Result<Vec<Piece>> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                let mut map = BTreeMap::new();
                map.insert("role", Value::from(m.role.as_str()));
                map.insert("content", Value::from(break_controls(&m.content, controls)));
                Value::from(map)
            })
            .collect();
        let mut context = BTreeMap::new();
        context.insert("messages", Value::from(messages));
        context.insert("add_generation_prompt", Value::from(true));
        context.insert("bos_token", Value::from(self.bos_token.as_str()));
        context.insert("eos_token", Value::from(self.eos_token.as_str()));
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| template_error(&e))?;
        let rendered = template
            .render(Value::from(context))
            .map_err(|e| template_error(&e))?;
        Ok(split_at_controls(&rendered, controls))
    }
}

/// `text` with the marker doubled where it occurs and put after the first character of every
/// control-token name in it.
fn break_controls(text: &str, controls: &[String]) -> String {
    let escaped = text.replace(MARK, &format!("{MARK}{MARK}"));
    let mut out = String::with_capacity(escaped.len());
    let mut rest = escaped.as_str();
    'scan: while !rest.is_empty() {
        for name in controls {
            if !name.is_empty() && rest.starts_with(name.as_str()) {
                let first = name.chars().next().map_or(0, char::len_utf8);
                out.push_str(&rest[..first]);
                out.push(MARK);
                out.push_str(&rest[first..name.len()]);
                rest = &rest[name.len()..];
                continue 'scan;
            }
        }
        let c = rest.chars().next().map_or(0, char::len_utf8);
        out.push_str(&rest[..c]);
        rest = &rest[c..];
    }
    out
}

/// Splits a rendered prompt at the control-token names in it (the longest at each place), and
/// undoes [`break_controls`] in the text between them: a doubled marker is one marker of the
/// user's, a single one is removed.
pub fn split_at_controls(rendered: &str, controls: &[String]) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = rendered;
    while !rest.is_empty() {
        let control = controls
            .iter()
            .filter(|name| !name.is_empty() && rest.starts_with(name.as_str()))
            .max_by_key(|name| name.len());
        if let Some(name) = control {
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(Piece::Control(name.clone()));
            rest = &rest[name.len()..];
            continue;
        }
        let mut chars = rest.chars();
        match chars.next() {
            Some(MARK) if chars.next() == Some(MARK) => {
                text.push(MARK);
                rest = &rest[2 * MARK.len_utf8()..];
            }
            Some(MARK) => rest = &rest[MARK.len_utf8()..],
            Some(c) => {
                text.push(c);
                rest = &rest[c.len_utf8()..];
            }
            None => break,
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controls() -> Vec<String> {
        ["<|im_start|>", "<|im_end|>", "<|im"]
            .map(String::from)
            .to_vec()
    }

    fn user(content: &str) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }

    #[test]
    fn control_names_in_messages_stay_text_and_markers_survive() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let content = format!("a<|im_end|>b{MARK}c{MARK}{MARK}<|im_start|>");
        let pieces = t.render(&[user(&content)], &controls()).unwrap();
        assert_eq!(
            pieces,
            [
                Piece::Control("<|im_start|>".into()),
                Piece::Text(format!("user\n{content}")),
                Piece::Control("<|im_end|>".into()),
                Piece::Text("\n".into()),
                Piece::Control("<|im_start|>".into()),
                Piece::Text("assistant\n".into()),
            ]
        );
    }

    #[test]
    fn template_errors_are_errors_with_their_message() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let e = t
            .render(&[user("hi")], &controls())
            .unwrap_err()
            .to_string();
        assert!(e.contains("roles must alternate"), "{e}");
        let e = ChatTemplate::new("{% for %}", "", "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("chat template"), "{e}");
    }

    #[test]
    fn python_string_methods_and_block_trimming_work() {
        let source = "{% for m in messages %}\n  {{ m.content.strip().upper() }}|{{ m.role.startswith('us') }}\n{% endfor %}";
        let t = ChatTemplate::new(source, "", "").unwrap();
        let pieces = t.render(&[user("  hi  ")], &[]).unwrap();
        // as Python's Jinja: lstrip_blocks strips before block tags only; booleans print as Python's
        assert_eq!(pieces, [Piece::Text("  HI|True\n".into())]);
    }
}
