//! `pagedkv serve`: an OpenAI-compatible HTTP server over the pagedkv engine whose prefix cache
//! explains itself (DESIGN §11).
//!
//! One engine thread owns the model, the scheduler and the cache ([`engine`]); axum handlers on
//! tokio validate and tokenize requests ([`request`]), submit them over a channel and turn the
//! tokens they get back into OpenAI responses or server-sent events ([`routes`], [`text`]).
#![warn(missing_docs)]

pub mod engine;
pub mod error;
pub mod metrics;
pub mod report;
pub mod request;
pub mod routes;
pub mod state;
pub mod stream;
pub mod text;

use std::future::Future;
use std::sync::{Arc, Mutex};

use pagedkv::tier::RemoteStats;
use pagedkv::KvCacheManager;
use pagedkv_engine::{GgufTokenizer, Model, SchedulerConfig};

use crate::engine::EngineLimits;
use crate::metrics::Metrics;
use crate::state::{AppState, Ready, Shared};

/// Any error a model loader reports.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the engine thread serves: the model, its tokenizer, and the cache for it.
pub struct Loaded {
    /// The model.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: GgufTokenizer,
    /// The KV cache (its layout must be the model's).
    pub cache: KvCacheManager,
    /// The counters of the cache's shared store, if it has one (exported as metrics).
    pub remote_stats: Option<Arc<RemoteStats>>,
}

/// Loads the model on the engine thread (so the server answers `/health` while it loads).
pub type Loader = Box<dyn FnOnce() -> Result<Loaded, BoxError> + Send>;

/// The server's settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model id clients name in `model` and `/v1/models` lists.
    pub model_name: String,
    /// Requests accepted but not yet admitted; beyond it, 429.
    pub max_queued_requests: usize,
    /// Largest request body in bytes; beyond it, 413.
    pub max_body_bytes: usize,
    /// Bearer token of the cache admin routes (`None`: those routes are disabled).
    pub admin_token: Option<String>,
    /// A request header whose value, when present, is the request's cache salt.
    pub salt_from_header: Option<String>,
    /// Most bytes of cache that pins may hold.
    pub pin_budget_bytes: u64,
    /// Scheduler limits.
    pub scheduler: SchedulerConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            model_name: "SmolLM2-135M-Instruct".to_string(),
            max_queued_requests: 256,
            max_body_bytes: 4 << 20,
            admin_token: None,
            salt_from_header: None,
            pin_budget_bytes: 64 << 20,
            scheduler: SchedulerConfig::default(),
        }
    }
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The model could not be loaded.
    #[error("loading the model failed: {0}")]
    Load(String),
    /// The engine stopped on an error.
    #[error("the engine failed: {0}")]
    Engine(String),
    /// The listener or the connection handling failed.
    #[error("serving HTTP failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves on `listener` until `shutdown` resolves, then drains: no new requests, those running
/// finish, and the engine thread stops. The model is loaded by `loader` on the engine thread,
/// inside `pool` (where the model's parallel work runs).
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: ServerConfig,
    loader: Loader,
    pool: rayon::ThreadPool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let shared = Arc::new(Shared::new());
    let (commands, receiver) = std::sync::mpsc::channel();
    let limits = config.scheduler;
    let pin_budget = config.pin_budget_bytes;
    let state = Arc::new(AppState {
        shared: shared.clone(),
        config,
        commands: Mutex::new(Some(commands)),
    });
    let engine_shared = shared.clone();
    let engine = std::thread::Builder::new()
        .name("pagedkv-engine".into())
        .spawn(move || {
            let result =
                pool.install(|| run_engine(loader, limits, pin_budget, receiver, &engine_shared));
            if let Err(e) = &result {
                let _ = engine_shared.failed.set(e.to_string());
                // a permit, not a wake-up: the server may not be waiting yet
                engine_shared.stopped.notify_one();
            }
            result
        })?;
    let watched = shared.clone();
    let draining = shared.clone();
    let stop = async move {
        tokio::select! {
            () = shutdown => {}
            () = watched.stopped.notified() => {}
        }
        draining
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    };
    axum::serve(listener, routes::router(state.clone()))
        .with_graceful_shutdown(stop)
        .await?;
    // every connection is closed: close the command channel so the engine stops when idle
    if let Ok(mut commands) = state.commands.lock() {
        commands.take();
    }
    let joined = tokio::task::spawn_blocking(move || engine.join())
        .await
        .map_err(|e| ServerError::Engine(e.to_string()))?;
    match joined {
        Ok(result) => result,
        Err(_) => Err(ServerError::Engine("the engine thread panicked".into())),
    }
}

fn run_engine(
    loader: Loader,
    scheduler: SchedulerConfig,
    pin_budget_bytes: u64,
    commands: std::sync::mpsc::Receiver<engine::Command>,
    shared: &Arc<Shared>,
) -> Result<(), ServerError> {
    let Loaded {
        model,
        tokenizer,
        cache,
        remote_stats,
    } = loader().map_err(|e| ServerError::Load(e.to_string()))?;
    let layout = cache.layout();
    let block_size = layout.block_size();
    let block_bytes = layout.block_bytes().max(1) as u64;
    let metrics = Metrics::new(
        &layout.key_codec(0).to_string(),
        &layout.value_codec(0).to_string(),
        block_size,
    );
    metrics
        .kv_bytes_per_token
        .set(layout.kv_bytes_per_token().round() as i64);
    // pins may hold at most half the pool, and every request is sized to fit beside them, so
    // a request that was accepted always fits when it runs alone
    let pool_blocks = cache.pool().num_blocks();
    let pin_budget_blocks = usize::try_from(pin_budget_bytes / block_bytes)
        .unwrap_or(usize::MAX)
        .min(pool_blocks / 2);
    let ready = Ready {
        tokenizer,
        context_len: model.config().context_len,
        pool_tokens: (pool_blocks - pin_budget_blocks) * block_size,
        block_size,
        vocab: model.config().vocab,
        metrics,
    };
    let limits = EngineLimits {
        scheduler,
        pin_budget_blocks,
        remote_stats,
    };
    let ready = shared.ready.get_or_init(|| ready);
    engine::run(
        &model,
        cache,
        limits,
        commands,
        shared.clone(),
        &ready.metrics,
    )
    .map_err(|e| ServerError::Engine(e.to_string()))
}
