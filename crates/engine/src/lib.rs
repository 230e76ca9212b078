//! Model runner for pagedkv: SmolLM2-135M-Instruct (GGUF, Llama architecture) whose attention
//! reads the paged cache, its tokenizer, sampling and a continuous-batching scheduler
//! (DESIGN §9).
#![warn(missing_docs)]

pub mod allocate;
pub mod calibrate;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod fingerprint;
pub mod model;
pub mod qgemm;
pub mod sampler;
pub mod scheduler;
pub mod tokenizer;

pub use error::{EngineError, Result};
pub use fingerprint::ModelFingerprint;
pub use model::{BatchItem, Logits, Model, ModelConfig, WeightMode};
pub use sampler::{Sampler, SamplingParams, TokenLogprobs};
pub use scheduler::{
    Event, FinishReason, Preemption, Request, Scheduler, SchedulerConfig, SchedulerStats,
};
pub use tokenizer::{ChatMessage, GgufTokenizer};
