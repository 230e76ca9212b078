//! The model's tokenizer, built from GGUF metadata (files carry no tokenizer.json) with the
//! `tokenizers` crate (see [`vocabulary`] for the tokenizer models and pre-tokenizers), and its
//! stop tokens and beginning-of-sequence token. Checked against llama.cpp's and Hugging Face's
//! ids in the tests.

mod vocabulary;

use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use tokenizers::Tokenizer;

use crate::chat_template::{ChatTemplate, ControlNames, Piece, CHATML};
use crate::error::{EngineError, Result};
use vocabulary::{integer, metadata, Vocabulary};

/// The system turn SmolLM2's chat template inserts when a conversation has none.
pub const DEFAULT_SYSTEM: &str =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

/// Names of control tokens that end a turn in the chat formats of the supported models.
const END_OF_TURN: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<|endoftext|>",
];

/// A chat message for [`GgufTokenizer::chat_prompt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The text.
    pub content: String,
}

/// Tokenizer of a GGUF model, with and without special-token parsing.
#[derive(Clone)]
pub struct GgufTokenizer {
    /// Text is plain text: `<|im_start|>` in it is spelled out, not a control token.
    plain: Tokenizer,
    /// Control-token names in the text become their ids (for chat prompts).
    special: Tokenizer,
    /// The beginning-of-sequence token, when prompts start with it.
    bos: Option<u32>,
    stop: Vec<u32>,
    token_count: usize,
    /// The file's chat template (ChatML when it has none).
    template: Arc<ChatTemplate>,
    /// Names of the control tokens, where rendered chat prompts are split.
    controls: ControlNames,
}

/// A token id from the metadata, checked against the vocabulary before narrowing (2³² + 5
/// must not become token 5).
fn token_id(ct: &Content, key: &str, name: &str, count: usize) -> Result<Option<u32>> {
    let Some(value) = ct.metadata.get(key) else {
        return Ok(None);
    };
    let id = integer(value)
        .ok_or_else(|| EngineError::Tokenizer(format!("`{key}` is not an integer")))?;
    u32::try_from(id)
        .ok()
        .filter(|i| (*i as usize) < count)
        .map(Some)
        .ok_or_else(|| {
            EngineError::Tokenizer(format!(
                "{name} token {id} is outside the vocabulary of {count} tokens"
            ))
        })
}

impl GgufTokenizer {
    /// Builds the tokenizer from the metadata of a GGUF file.
    pub fn from_gguf(ct: &Content) -> Result<Self> {
        let Vocabulary {
            tokenizer,
            tokens,
            controls,
            add_bos,
        } = Vocabulary::from_gguf(ct)?;
        let count = tokens.len();
        // eos is required (generation must be able to end); bos is optional
        metadata(ct, "tokenizer.ggml.eos_token_id")?;
        let eos = token_id(ct, "tokenizer.ggml.eos_token_id", "eos", count)?;
        let bos = token_id(ct, "tokenizer.ggml.bos_token_id", "bos", count)?;
        if add_bos && bos.is_none() {
            return Err(EngineError::Tokenizer(
                "prompts start with a bos token, but the file names none".into(),
            ));
        }
        let mut stop: Vec<u32> = eos.into_iter().collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            stop.extend(token_id(ct, key, "end-of-turn", count)?);
        }
        stop.extend(
            tokens
                .iter()
                .enumerate()
                .filter(|(_, t)| END_OF_TURN.contains(&t.as_str()))
                .map(|(i, _)| i as u32),
        );
        stop.sort_unstable();
        stop.dedup();
        let source = match ct.metadata.get("tokenizer.chat_template") {
            None => CHATML.to_string(),
            Some(v) => v.to_string().cloned().map_err(|_| {
                EngineError::ChatTemplate("`tokenizer.chat_template` is not a string".into())
            })?,
        };
        let name = |id: Option<u32>| id.map_or("", |i| tokens[i as usize].as_str());
        let template = ChatTemplate::new(&source, name(bos), name(eos))?;
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        Ok(Self {
            plain,
            special: tokenizer,
            bos: bos.filter(|_| add_bos),
            stop,
            token_count: count,
            template: Arc::new(template),
            controls: ControlNames::new(controls),
        })
    }

    /// Token ids of plain text (control-token names in it are not special).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Self::ids(&self.plain, text)
    }

    /// Token ids of text in which control-token names (`<|im_start|>`) are special tokens.
    pub fn encode_with_specials(&self, text: &str) -> Result<Vec<u32>> {
        Self::ids(&self.special, text)
    }

    fn ids(t: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        let enc = t
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of token ids; special tokens are kept unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if let Some(bad) = ids.iter().find(|id| **id as usize >= self.token_count) {
            return Err(EngineError::Tokenizer(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        self.special
            .decode(ids, skip_special)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// Tokens that end a generation: `eos`, the file's end-of-turn tokens, and control tokens
    /// named like one (`<|im_end|>`, `<|eot_id|>` …).
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop.contains(&id)
    }

    /// All stop tokens.
    pub fn stop_tokens(&self) -> Vec<u32> {
        self.stop.clone()
    }

    /// The beginning-of-sequence token, when the model's prompts start with one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// Token ids of a plain-text prompt: the beginning-of-sequence token when the model wants
    /// one, then the text.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.token_count
    }

    /// The prompt of a conversation: the model's chat template (`tokenizer.chat_template`,
    /// ChatML when the file has none) rendered with the messages, ending where the assistant's
    /// answer begins. The template writes any beginning-of-sequence token itself, as Hugging
    /// Face's `apply_chat_template` does. Message text is user input: control-token names
    /// inside it stay plain text.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for piece in self.template.render(messages, &self.controls)? {
            match piece {
                Piece::Control(name) => ids.extend(self.encode_with_specials(&name)?),
                Piece::Text(text) => ids.extend(self.encode(&text)?),
            }
        }
        Ok(ids)
    }
}
