//! A model's chat template (`tokenizer.chat_template`, Jinja) rendered with minijinja, set up as
//! Hugging Face's `apply_chat_template` sets up Jinja: blocks trim their newline and leading
//! whitespace, Python's string methods (`strip`, `startswith` …) work, `raise_exception` fails
//! the render with the template's message, and `strftime_now` formats today's date.
//!
//! Message text is user input: a control-token name inside it (`<|im_start|>`) must stay text.
//! Before rendering, every character of every such name in a message is escaped by a marker
//! character before it, so that the rendered prompt can be split at the control tokens the
//! template wrote and nowhere else; the markers are taken out of the text pieces afterwards
//! (see [`ControlNames::split`]).

use std::collections::{BTreeMap, HashMap};

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, Value};

use crate::error::{EngineError, Result};
use crate::tokenizer::ChatMessage;

/// Escapes the character after it in message text (a marker of the user's own is escaped too).
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
    /// control tokens (`controls`: the vocabulary's) the template wrote.
    pub fn render(&self, messages: &[ChatMessage], controls: &ControlNames) -> Result<Vec<Piece>> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                let mut map = BTreeMap::new();
                map.insert("role", Value::from(m.role.as_str()));
                map.insert("content", Value::from(controls.escape(&m.content)));
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
        Ok(controls.split(&rendered))
    }
}

/// The control-token names of a vocabulary, by first character, longest first.
#[derive(Debug, Clone, Default)]
pub struct ControlNames {
    by_first: HashMap<char, Vec<String>>,
}

impl ControlNames {
    /// An index of `names` (empty names are ignored).
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        let mut by_first: HashMap<char, Vec<String>> = HashMap::new();
        for name in names {
            if let Some(first) = name.chars().next() {
                by_first.entry(first).or_default().push(name);
            }
        }
        for names in by_first.values_mut() {
            names.sort_by_key(|n| std::cmp::Reverse(n.len()));
            names.dedup();
        }
        Self { by_first }
    }

    /// The longest name that `text` starts with.
    fn at(&self, text: &str) -> Option<&str> {
        let first = text.chars().next()?;
        self.by_first
            .get(&first)?
            .iter()
            .find(|name| text.starts_with(name.as_str()))
            .map(String::as_str)
    }

    /// `text` with a marker before every character of every control-token name in it, and
    /// before every marker of its own. [`Self::split`] starts no control token at an escaped
    /// character, and no name survives unescaped: one would start at a character the scan
    /// looked at and found no name at.
    pub fn escape(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            let taken = match self.at(rest) {
                Some(name) => name,
                None if c == MARK => &rest[..c.len_utf8()],
                None => {
                    out.push(c);
                    rest = &rest[c.len_utf8()..];
                    continue;
                }
            };
            for c in taken.chars() {
                out.push(MARK);
                out.push(c);
            }
            rest = &rest[taken.len()..];
        }
        out
    }

    /// Splits a rendered prompt at the control-token names in it (the longest at each place)
    /// that start at an unescaped character, and takes the markers out of the text between.
    pub fn split(&self, rendered: &str) -> Vec<Piece> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut rest = rendered;
        while let Some(c) = rest.chars().next() {
            if c == MARK {
                // the escaped character is text, whatever it is (a lone marker at the end: dropped)
                rest = &rest[c.len_utf8()..];
                if let Some(escaped) = rest.chars().next() {
                    text.push(escaped);
                    rest = &rest[escaped.len_utf8()..];
                }
                continue;
            }
            if let Some(name) = self.at(rest) {
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Control(name.to_string()));
                rest = &rest[name.len()..];
                continue;
            }
            text.push(c);
            rest = &rest[c.len_utf8()..];
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controls() -> ControlNames {
        ControlNames::new(["<|im_start|>", "<|im_end|>", "<|im", "im_", "#"].map(String::from))
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
        let content = format!("a<|im_end|>b{MARK}c{MARK}{MARK}<|im_start|># x{MARK}");
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
    fn any_text_escaped_splits_back_to_itself() {
        let names = controls();
        // every mix of names, their fragments, markers and other characters, up to 5 parts
        let parts = [
            "<|im_start|>",
            "<|im_end|>",
            "<|im",
            "im_",
            "#",
            "<|",
            "_end|>",
            "x",
            "\u{FDD0}",
            "é",
        ];
        let mut texts = vec![String::new()];
        for _ in 0..5 {
            texts = texts
                .iter()
                .flat_map(|t| parts.iter().map(move |p| format!("{t}{p}")))
                .collect();
            for t in &texts {
                let pieces = names.split(&names.escape(t));
                assert_eq!(pieces, [Piece::Text(t.clone())], "{t:?}");
            }
        }
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
        let pieces = t
            .render(&[user("  hi  ")], &ControlNames::default())
            .unwrap();
        // as Python's Jinja: lstrip_blocks strips before block tags only; booleans print as Python's
        assert_eq!(pieces, [Piece::Text("  HI|True\n".into())]);
    }
}
