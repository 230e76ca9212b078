//! Model runner for pagedkv: Llama-family GGUF models (architectures `llama` and `qwen2`;
//! SmolLM2-135M-Instruct by default) whose attention reads the paged cache, their tokenizers,
//! sampling and a continuous-batching scheduler (DESIGN §9).
#![warn(missing_docs)]

pub mod allocate;
pub mod calibrate;
pub mod chat_template;
pub mod config;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod fingerprint;
pub mod model;
pub mod profile;
pub mod qgemm;
mod rope;
pub mod sampler;
pub mod scheduler;
pub mod tokenizer;

pub use config::{Architecture, ModelConfig, RopeScaling, RopeStyle};
pub use error::{EngineError, Result};
pub use fingerprint::ModelFingerprint;
pub use model::{BatchItem, Logits, Model, WeightMode};
pub use profile::KvProfile;
pub use sampler::{Sampler, SamplingParams, TokenLogprobs};
pub use scheduler::{
    Event, FinishReason, Preemption, Request, Scheduler, SchedulerConfig, SchedulerStats,
};
pub use tokenizer::{ChatMessage, GgufTokenizer};
