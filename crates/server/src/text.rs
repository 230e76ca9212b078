//! Generated tokens to text, as a stream: incremental detokenization and stop strings.
//!
//! Byte-level BPE tokens can end inside a UTF-8 character, so text is released only once it
//! decodes whole (the offsets scheme of Hugging Face's text-generation-inference: decode a short
//! window of tokens and release what it adds beyond the window's previous text). Stop strings
//! may span token boundaries, so the tail of the text that could still begin a stop string is
//! held back until the next token shows whether it does; a matched stop string is never
//! released.

use pagedkv_engine::GgufTokenizer;

/// Turns one choice's tokens into released text.
pub struct TextStream {
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    stops: Vec<String>,
    /// Decoded text not yet released (it may begin a stop string).
    held: String,
    stopped: bool,
}

/// What a token released.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Text to send to the client.
    pub text: String,
    /// A stop string matched: the choice is finished, nothing after it is released.
    pub stopped: bool,
}

impl TextStream {
    /// A stream for a choice that stops at any of `stops` (empty strings are not allowed).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            tokens: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a generated token; returns the text it releases.
    pub fn push(&mut self, tokenizer: &GgufTokenizer, token: u32) -> Released {
        if self.stopped {
            return Released {
                text: String::new(),
                stopped: true,
            };
        }
        self.tokens.push(token);
        if let Some(new) = self.decoded_tail(tokenizer) {
            if !new.ends_with('\u{FFFD}') {
                self.held.push_str(&new);
                self.prefix_offset = self.read_offset;
                self.read_offset = self.tokens.len();
            }
        }
        self.release()
    }

    /// The text the tokens after `read_offset` add to the decoded window, if they add any.
    /// Generated ids come from the model's vocabulary, so decoding them does not fail; if it
    /// did, nothing would be released (rather than text twice).
    fn decoded_tail(&self, tokenizer: &GgufTokenizer) -> Option<String> {
        let window = &self.tokens[self.prefix_offset..];
        let before = tokenizer
            .decode(&window[..self.read_offset - self.prefix_offset], true)
            .ok()?;
        let after = tokenizer.decode(window, true).ok()?;
        (after.len() > before.len() && after.is_char_boundary(before.len()))
            .then(|| after[before.len()..].to_string())
    }

    /// Releases everything left: the held text and the tokens that never decoded whole (a
    /// character cut by the end), unless a stop string ends it first.
    pub fn finish(&mut self, tokenizer: &GgufTokenizer) -> String {
        if self.stopped {
            return String::new();
        }
        if let Some(rest) = self.decoded_tail(tokenizer) {
            self.held.push_str(&rest);
            self.read_offset = self.tokens.len();
        }
        let released = self.release();
        if released.stopped {
            return released.text;
        }
        released.text + &std::mem::take(&mut self.held)
    }

    fn release(&mut self) -> Released {
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let text = self.held[..at].to_string();
            self.held.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        // hold back the longest tail that is a proper prefix of some stop string
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Released {
            text,
            stopped: false,
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on a char
/// boundary.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let longest = text.len().min(stop.len().saturating_sub(1));
    (1..=longest)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.as_bytes().starts_with(&text.as_bytes()[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::longest_suffix_prefix;

    #[test]
    fn suffix_prefix_overlaps() {
        assert_eq!(longest_suffix_prefix("hello wor", "world"), 3);
        assert_eq!(longest_suffix_prefix("hello", "world"), 0);
        assert_eq!(longest_suffix_prefix("ab", "abc"), 2);
        // a whole stop string is a match, not a held prefix
        assert_eq!(longest_suffix_prefix("abc", "abc"), 0);
        assert_eq!(longest_suffix_prefix("é", "éa"), "é".len());
    }
}
