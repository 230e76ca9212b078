//! State shared by the HTTP handlers and the engine thread.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use pagedkv_engine::GgufTokenizer;
use tokio::sync::Notify;

use crate::engine::Command;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::ServerConfig;

/// What exists once the model is loaded.
pub struct Ready {
    /// The model's tokenizer (handlers tokenize and detokenize).
    pub tokenizer: GgufTokenizer,
    /// The model's context in tokens.
    pub context_len: usize,
    /// Tokens one sequence can hold with every pin held: no request may ask for more.
    pub pool_tokens: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Vocabulary size (token ids in prompts must be below it).
    pub vocab: usize,
    /// The metrics.
    pub metrics: Metrics,
}

/// Shared between handlers and the engine thread.
pub struct Shared {
    /// Set once the model has loaded.
    pub ready: OnceLock<Ready>,
    /// Set when loading failed or the engine stopped on an error.
    pub failed: OnceLock<String>,
    /// Notified when `failed` is set.
    pub stopped: Notify,
    /// Requests accepted and not yet admitted (the admission queue).
    pub waiting: AtomicUsize,
    /// Set while the server drains on shutdown: no new requests.
    pub draining: AtomicBool,
    /// Next request id.
    pub next_id: AtomicU64,
}

impl Shared {
    pub(crate) fn new() -> Self {
        Self {
            ready: OnceLock::new(),
            failed: OnceLock::new(),
            stopped: Notify::new(),
            waiting: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
        }
    }
}

/// The handlers' state.
pub struct AppState {
    /// Shared with the engine.
    pub shared: std::sync::Arc<Shared>,
    /// The server's settings.
    pub config: ServerConfig,
    /// Commands to the engine; taken (closed) when the server stops.
    pub commands: Mutex<Option<std::sync::mpsc::Sender<Command>>>,
}

impl AppState {
    /// The loaded model's state, or 503 while loading, draining or stopped.
    pub fn ready(&self) -> Result<&Ready, ApiError> {
        if let Some(reason) = self.shared.failed.get() {
            return Err(ApiError::unavailable(format!(
                "the engine stopped: {reason}"
            )));
        }
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        self.shared
            .ready
            .get()
            .ok_or_else(|| ApiError::unavailable("the model is loading"))
    }

    /// Sends a command to the engine.
    pub fn send(&self, command: Command) -> Result<(), ApiError> {
        let stopped = || ApiError::unavailable("the engine has stopped");
        let guard = self.commands.lock().map_err(|_| stopped())?;
        guard
            .as_ref()
            .ok_or_else(stopped)?
            .send(command)
            .map_err(|_| stopped())
    }

    /// Reserves `n` places in the admission queue, or 429 when it is full.
    pub fn enqueue(&self, n: usize) -> Result<(), ApiError> {
        let limit = self.config.max_queued_requests;
        let before = self.shared.waiting.fetch_add(n, Ordering::SeqCst);
        if before + n > limit {
            self.shared.waiting.fetch_sub(n, Ordering::SeqCst);
            if let Some(ready) = self.shared.ready.get() {
                ready
                    .metrics
                    .aborted
                    .get_or_create(&vec![("reason", "queue_full")])
                    .inc();
            }
            return Err(ApiError::queue_full(limit));
        }
        Ok(())
    }
}
