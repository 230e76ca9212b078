//! The engine's error type.

use std::path::PathBuf;

/// Errors of the model runner, tokenizer and scheduler.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The KV cache refused an operation.
    #[error(transparent)]
    Kv(#[from] pagedkv::KvError),
    /// candle failed (reading GGUF tensors, matmul).
    #[error("model computation failed: {}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
    /// The 8-bit matrix kernel was given shapes it cannot multiply.
    #[error(transparent)]
    Shape(#[from] crate::qgemm::ShapeError),
    /// A file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The model file is not the GGUF this engine runs, or is damaged.
    #[error("model file {path}: {reason}")]
    BadModel {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A KV profile is damaged, of another version, or made for another model.
    #[error("KV profile {path}: {reason}")]
    BadProfile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Fetching the model failed.
    #[error("fetching the model failed: {0}")]
    Fetch(String),
    /// The tokenizer could not be built or failed on input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The model's chat template does not compile, or failed on a conversation (its own
    /// `raise_exception`, e.g. roles that do not alternate).
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A prompt does not fit the model's context or the cache.
    #[error("prompt of {tokens} tokens does not fit: limit {limit}")]
    PromptTooLong {
        /// Prompt length in tokens.
        tokens: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// An argument is invalid (e.g. a negative temperature).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Result alias for the engine.
pub type Result<T> = std::result::Result<T, EngineError>;

/// candle's message without the backtrace that its `WithBacktrace` variant prints when
/// `RUST_BACKTRACE` is set: users get the cause, not a stack.
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other.to_string(),
    }
}
