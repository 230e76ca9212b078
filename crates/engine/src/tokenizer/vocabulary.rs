//! Builds a `tokenizers::Tokenizer` from a GGUF file's `tokenizer.ggml.*` metadata, for the two
//! tokenizer models llama.cpp writes:
//! - `gpt2`: byte-level BPE from the tokens and merges, split first by the pre-tokenizer that
//!   `tokenizer.ggml.pre` names (SmolLM, GPT-2, Llama 3, Qwen2; an unknown name is an error,
//!   never a guess);
//! - `llama`: SentencePiece (Llama 2, Mistral, TinyLlama): spaces become `▁`, one is put before
//!   the text, pieces merge by their scores, and characters without a piece fall back to
//!   `<0xNN>` byte tokens. The `tokenizers` crate runs it as BPE whose merges are derived from
//!   the scores, as Hugging Face's own converter does.
//!
//! Control tokens become special tokens; user-defined tokens are matched in any text.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{EngineError, Result};

/// llama.cpp's token types.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;
const TOKEN_TYPE_BYTE: i64 = 6;

/// SentencePiece's word boundary.
const SPACE_MARK: &str = "\u{2581}";

/// Llama 3's split: contractions, letters with one leading non-letter, numbers of up to three
/// digits, punctuation runs, newlines, other whitespace (from its tokenizer.json).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: Llama 3's with every digit alone (from its tokenizer.json).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer and what it needs from the metadata besides.
pub(super) struct Vocabulary {
    pub tokenizer: Tokenizer,
    pub tokens: Vec<String>,
    /// The names of the control tokens (special tokens).
    pub controls: Vec<String>,
    /// Whether prompts start with the beginning-of-sequence token.
    pub add_bos: bool,
}

pub(super) fn metadata<'a>(ct: &'a Content, key: &str) -> Result<&'a Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| EngineError::Tokenizer(format!("missing GGUF metadata `{key}`")))
}

fn string(ct: &Content, key: &str) -> Result<String> {
    metadata(ct, key)?
        .to_string()
        .cloned()
        .map_err(|_| EngineError::Tokenizer(format!("`{key}` is not a string")))
}

fn strings(ct: &Content, key: &str) -> Result<Vec<String>> {
    let err = || EngineError::Tokenizer(format!("`{key}` is not an array of strings"));
    metadata(ct, key)?
        .to_vec()
        .map_err(|_| err())?
        .iter()
        .map(|s| s.to_string().cloned().map_err(|_| err()))
        .collect()
}

/// An optional boolean; present, it must be one.
fn flag(ct: &Content, key: &str) -> Result<Option<bool>> {
    ct.metadata
        .get(key)
        .map(|v| {
            v.to_bool()
                .map_err(|_| EngineError::Tokenizer(format!("`{key}` is not a boolean")))
        })
        .transpose()
}

pub(super) fn integer(v: &Value) -> Option<i64> {
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

/// Each token's llama.cpp type (normal when the file has none).
fn token_types(ct: &Content, count: usize) -> Result<Vec<i64>> {
    let Some(v) = ct.metadata.get("tokenizer.ggml.token_type") else {
        return Ok(vec![1; count]);
    };
    let err = || {
        EngineError::Tokenizer(
            "`tokenizer.ggml.token_type` is not an array of integers of one per token".into(),
        )
    };
    let types = v
        .to_vec()
        .map_err(|_| err())?
        .iter()
        .map(|t| integer(t).ok_or_else(err))
        .collect::<Result<Vec<_>>>()?;
    if types.len() != count {
        return Err(err());
    }
    Ok(types)
}

fn tokenizer_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

impl Vocabulary {
    /// Reads the tokenizer of a GGUF file.
    pub(super) fn from_gguf(ct: &Content) -> Result<Self> {
        let model = string(ct, "tokenizer.ggml.model")?;
        let tokens = strings(ct, "tokenizer.ggml.tokens")?;
        let types = token_types(ct, tokens.len())?;
        // without `add_bos_token`, llama.cpp starts SentencePiece and Llama 3 prompts with bos
        let (mut tokenizer, default_bos) = match model.as_str() {
            "gpt2" => {
                let pre = match ct.metadata.get("tokenizer.ggml.pre") {
                    Some(_) => string(ct, "tokenizer.ggml.pre")?,
                    None => "default".to_string(),
                };
                (byte_level_bpe(ct, &tokens, &pre)?, is_llama3(&pre))
            }
            "llama" => (sentencepiece(ct, &tokens, &types)?, true),
            other => {
                return Err(EngineError::Tokenizer(format!(
                    "unsupported tokenizer model `{other}` (supported: gpt2 byte-level BPE, llama SentencePiece)"
                )))
            }
        };
        // control tokens are special (their names in plain text stay text); user-defined ones
        // are matched in any text, as Hugging Face's and llama.cpp's tokenizers do
        let of_type = |wanted: i64| {
            types
                .iter()
                .zip(&tokens)
                .filter(move |(t, _)| **t == wanted)
                .map(|(_, name)| name.clone())
        };
        let controls: Vec<String> = of_type(TOKEN_TYPE_CONTROL).collect();
        let added: Vec<AddedToken> = of_type(TOKEN_TYPE_USER_DEFINED)
            .map(|name| AddedToken::from(name, false))
            .collect();
        tokenizer.add_tokens(added).map_err(tokenizer_error)?;
        let specials: Vec<AddedToken> = controls
            .iter()
            .map(|name| AddedToken::from(name.clone(), true))
            .collect();
        tokenizer
            .add_special_tokens(specials)
            .map_err(tokenizer_error)?;
        let add_bos = flag(ct, "tokenizer.ggml.add_bos_token")?.unwrap_or(default_bos);
        Ok(Self {
            tokenizer,
            tokens,
            controls,
            add_bos,
        })
    }
}

/// The names llama.cpp gives Llama 3's pre-tokenizer.
fn is_llama3(pre: &str) -> bool {
    matches!(pre, "llama-bpe" | "llama3" | "llama-v3")
}

/// Byte-level BPE with the pre-tokenizer `tokenizer.ggml.pre` names.
fn byte_level_bpe(ct: &Content, tokens: &[String], pre: &str) -> Result<Tokenizer> {
    let merges = strings(ct, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| EngineError::Tokenizer(format!("malformed merge `{m}`")))
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    // Llama 3 takes a pre-token that is a whole token as it is, merges or not (as its
    // tokenizer.json and llama.cpp do)
    let llama3 = is_llama3(pre);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(llama3)
        .build()
        .map_err(tokenizer_error)?;
    let mut tokenizer = Tokenizer::new(bpe);
    // after a regex split, the byte-level step only maps bytes to characters
    let bytes_only = ByteLevel::new(false, true, false);
    let split = |pattern: &str| -> Result<Sequence> {
        let split = Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tokenizer_error)?;
        Ok(Sequence::new(vec![split.into(), bytes_only.into()]))
    };
    match pre {
        // SmolLM: every digit is its own pre-token, then GPT-2's byte-level split
        "smollm" => {
            tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])));
        }
        "gpt2" | "default" => {
            tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
        _ if llama3 => {
            tokenizer.with_pre_tokenizer(Some(split(LLAMA3_SPLIT)?));
        }
        // DeepSeek-R1's Qwen distillations name Qwen2's tokenizer so
        "qwen2" | "deepseek-r1-qwen" => {
            tokenizer
                .with_normalizer(Some(NFC))
                .map_err(tokenizer_error)?;
            tokenizer.with_pre_tokenizer(Some(split(QWEN2_SPLIT)?));
        }
        other => {
            return Err(EngineError::Tokenizer(format!(
                "unsupported pre-tokenizer `{other}` (supported: smollm, gpt2, default, llama-bpe, qwen2)"
            )))
        }
    }
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

/// SentencePiece as BPE: merges from every way a piece splits into two pieces, the piece of
/// higher score merging first.
fn sentencepiece(ct: &Content, tokens: &[String], types: &[i64]) -> Result<Tokenizer> {
    let scores: Vec<f32> = metadata(ct, "tokenizer.ggml.scores")?
        .to_vec()
        .ok()
        .and_then(|v| {
            v.iter()
                .map(|s| s.to_f32().ok())
                .collect::<Option<Vec<_>>>()
        })
        .filter(|s| s.len() == tokens.len())
        .ok_or_else(|| {
            EngineError::Tokenizer(
                "`tokenizer.ggml.scores` is not an array of one f32 per token".into(),
            )
        })?;
    // only normal and user-defined pieces take part in merges; control and byte tokens are
    // reached by name
    let mergeable = |id: usize| !matches!(types[id], TOKEN_TYPE_CONTROL | TOKEN_TYPE_BYTE);
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(i as u32);
    }
    let mut ranked: Vec<(f32, u32, u32, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if !mergeable(id) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                if mergeable(l as usize) && mergeable(r as usize) {
                    ranked.push((scores[id], l, r, id));
                }
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges = ranked
        .iter()
        .map(|(_, l, r, _)| (tokens[*l as usize].clone(), tokens[*r as usize].clone()))
        .collect();
    let unknown = match ct.metadata.get("tokenizer.ggml.unknown_token_id") {
        None => 0,
        Some(v) => integer(v).ok_or_else(|| {
            EngineError::Tokenizer("`tokenizer.ggml.unknown_token_id` is not an integer".into())
        })?,
    };
    let unknown = usize::try_from(unknown)
        .ok()
        .and_then(|i| tokens.get(i))
        .ok_or_else(|| {
            EngineError::Tokenizer(format!("unknown token {unknown} is outside the vocabulary"))
        })?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unknown.clone())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(tokenizer_error)?;
    let mut tokenizer = Tokenizer::new(bpe);
    let space_prefix = flag(ct, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let mut normalizers = Vec::new();
    if space_prefix {
        normalizers.push(Prepend::new(SPACE_MARK.to_string()).into());
    }
    normalizers.push(
        Replace::new(" ", SPACE_MARK)
            .map_err(tokenizer_error)?
            .into(),
    );
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(tokenizer_error)?;
    let mut decoders = vec![
        Replace::new(SPACE_MARK, " ")
            .map_err(tokenizer_error)?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}
