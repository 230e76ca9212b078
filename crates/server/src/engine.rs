//! The engine thread (DESIGN §11): it owns the model, the scheduler and the cache. HTTP
//! handlers send it [`Command`]s; between steps it drains them, cancels requests whose client
//! has gone (their event channel is closed), expires pins, runs one scheduler step and sends
//! each request its events.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagedkv::tier::RemoteStats;
use pagedkv::{Admission, CacheSalt, KvCacheManager, PinId, PrefixReport};
use pagedkv_engine::{
    EngineError, Event, FinishReason, Model, Request, Scheduler, SchedulerConfig, SchedulerStats,
    TokenLogprobs,
};
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::state::Shared;
use crate::stream::finish_reason;

/// A request for the engine thread.
pub enum Command {
    /// Run a request; its events go to `events`.
    Generate(Box<Submission>),
    /// What a prompt would find in the cache (a dry run).
    Lookup {
        /// Prompt tokens.
        prompt: Vec<u32>,
        /// Tenant salt.
        salt: Option<CacheSalt>,
        /// Where the report goes.
        reply: oneshot::Sender<PrefixReport>,
    },
    /// Stop a request that needs no more tokens (a stop string matched).
    Cancel {
        /// The request.
        id: u64,
    },
    /// Release every pin; replies with how many there were.
    UnpinAll {
        /// Where the count goes.
        reply: oneshot::Sender<usize>,
    },
}

/// A request with where its events go.
pub struct Submission {
    /// The scheduler's request.
    pub request: Request,
    /// The request's event channel; closing it cancels the request.
    pub events: mpsc::UnboundedSender<GenEvent>,
    /// When set, the prompt's blocks are pinned this long once it has run.
    pub pin_ttl: Option<Duration>,
    /// When the HTTP request arrived.
    pub arrived: Instant,
}

/// What a request hears from the engine.
#[derive(Debug)]
pub enum GenEvent {
    /// First admission: cached tokens and where they came from.
    Admitted(Admission),
    /// A generated token.
    Token {
        /// The token.
        token: u32,
        /// Log-probabilities, when asked for.
        logprobs: Option<TokenLogprobs>,
    },
    /// The request is done.
    Finished(FinishReason),
    /// A pin request's prompt is pinned: tokens held.
    Pinned(usize),
    /// The request failed.
    Failed(ApiError),
}

struct Active {
    events: mpsc::UnboundedSender<GenEvent>,
    arrived: Instant,
    last_token: Option<Instant>,
    admitted: bool,
    /// For a pin request only: what to pin, and for how long, once it has run.
    pin: Option<PinOrder>,
}

/// A prompt to pin when its request finishes.
struct PinOrder {
    ttl: Duration,
    prompt: Vec<u32>,
    salt: Option<CacheSalt>,
}

/// Limits of the engine loop, and what it reports besides the cache.
#[derive(Debug, Clone)]
pub struct EngineLimits {
    /// Scheduler limits.
    pub scheduler: SchedulerConfig,
    /// Most blocks pins may hold.
    pub pin_budget_blocks: usize,
    /// The shared store's counters, if the cache has one.
    pub remote_stats: Option<Arc<RemoteStats>>,
}

/// Runs the engine until every command sender is gone and nothing is left to run.
pub fn run(
    model: &Model,
    cache: KvCacheManager,
    limits: EngineLimits,
    commands: Receiver<Command>,
    shared: Arc<Shared>,
    metrics: &Metrics,
) -> Result<(), EngineError> {
    let mut engine = Engine {
        scheduler: Scheduler::new(model, cache, limits.scheduler)?,
        remote_seen: Vec::new(),
        active: HashMap::new(),
        pins: Vec::new(),
        limits,
        shared,
        metrics,
        last: Counters::default(),
    };
    loop {
        if engine.scheduler.is_idle() {
            // nothing to run: sleep until a command arrives or a pin expires
            let wait = engine
                .pins
                .iter()
                .map(|p| p.1.saturating_duration_since(Instant::now()))
                .min()
                .unwrap_or(Duration::from_secs(1));
            match commands.recv_timeout(wait) {
                Ok(command) => engine.handle(command)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
        while let Ok(command) = commands.try_recv() {
            engine.handle(command)?;
        }
        engine.expire_pins()?;
        engine.cancel_abandoned()?;
        if !engine.scheduler.is_idle() {
            match engine.scheduler.step() {
                Ok(events) => engine.dispatch(events)?,
                Err(e) => engine.fail_all(&e)?,
            }
        }
        engine.update_gauges();
    }
}

/// Scheduler and cache counters at the last metrics update (metrics take the differences).
#[derive(Default)]
struct Counters {
    stats: SchedulerStats,
    pool_evictions: u64,
    tier_evictions: u64,
}

struct Engine<'m> {
    scheduler: Scheduler<'m>,
    active: HashMap<u64, Active>,
    pins: Vec<(PinId, Instant)>,
    limits: EngineLimits,
    shared: Arc<Shared>,
    metrics: &'m Metrics,
    last: Counters,
    /// The shared store's counters at the last metrics update.
    remote_seen: Vec<u64>,
}

impl Engine<'_> {
    fn handle(&mut self, command: Command) -> Result<(), EngineError> {
        match command {
            Command::Generate(submission) => self.submit(*submission),
            Command::Lookup {
                prompt,
                salt,
                reply,
            } => {
                // the asker may have gone; nothing to do then
                let _ = reply.send(self.scheduler.cache_mut().lookup_prefix(&prompt, salt));
            }
            Command::Cancel { id } => {
                if self.scheduler.cancel(id)? {
                    self.release(id);
                    self.metrics
                        .finished
                        .get_or_create(&vec![("reason", "stop")])
                        .inc();
                }
            }
            Command::UnpinAll { reply } => {
                let count = self.pins.len();
                for (pin, _) in std::mem::take(&mut self.pins) {
                    self.scheduler.cache_mut().unpin(pin)?;
                }
                // the metrics show the change before the client hears of it
                self.update_gauges();
                let _ = reply.send(count);
            }
        }
        Ok(())
    }

    fn submit(&mut self, s: Submission) {
        let id = s.request.id;
        let prompt_len = s.request.prompt.len();
        let active = Active {
            events: s.events,
            arrived: s.arrived,
            last_token: None,
            admitted: false,
            pin: s.pin_ttl.map(|ttl| PinOrder {
                ttl,
                prompt: s.request.prompt.clone(),
                salt: s.request.salt,
            }),
        };
        match self.scheduler.submit(s.request) {
            Ok(()) => {
                self.metrics.prompt_tokens.inc_by(prompt_len as u64);
                self.active.insert(id, active);
            }
            Err(e) => {
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                self.metrics
                    .aborted
                    .get_or_create(&vec![("reason", "invalid")])
                    .inc();
                let _ = active.events.send(GenEvent::Failed(refusal(&e)));
            }
        }
    }

    /// Cancels requests whose client closed its event channel (disconnected, or a stop string
    /// ended the choice).
    fn cancel_abandoned(&mut self) -> Result<(), EngineError> {
        let gone: Vec<u64> = self
            .active
            .iter()
            .filter(|(_, a)| a.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.scheduler.cancel(id)?;
            self.forget(id, "client_disconnected");
        }
        Ok(())
    }

    /// Drops a request's record; counts it as aborted for `reason`.
    fn forget(&mut self, id: u64, reason: &'static str) {
        if self.release(id).is_some() {
            self.metrics
                .aborted
                .get_or_create(&vec![("reason", reason)])
                .inc();
        }
    }

    /// Drops a request's record, giving back its place in the admission queue if it still
    /// held one.
    fn release(&mut self, id: u64) -> Option<Active> {
        let a = self.active.remove(&id)?;
        if !a.admitted {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        Some(a)
    }

    fn dispatch(&mut self, events: Vec<Event>) -> Result<(), EngineError> {
        let now = Instant::now();
        for event in events {
            match event {
                Event::Admitted { id, admission } => {
                    let Some(a) = self.active.get_mut(&id) else {
                        continue;
                    };
                    if a.admitted {
                        continue; // the scheduler reports a request's first admission only
                    }
                    a.admitted = true;
                    self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    let r = &admission.report;
                    self.metrics
                        .prefix_queried_tokens
                        .inc_by(r.cacheable_tokens as u64);
                    for (tier, tokens) in [
                        ("pool", r.pool_tokens),
                        ("host", r.host_tokens),
                        ("disk", r.disk_tokens),
                        ("remote", r.remote_tokens),
                    ] {
                        self.metrics
                            .prefix_hit_tokens
                            .get_or_create(&vec![("tier", tier)])
                            .inc_by(tokens as u64);
                    }
                    let _ = a.events.send(GenEvent::Admitted(admission));
                }
                Event::Token {
                    id,
                    token,
                    logprobs,
                } => {
                    let Some(a) = self.active.get_mut(&id) else {
                        continue;
                    };
                    self.metrics.generated_tokens.inc();
                    match a.last_token {
                        None => self
                            .metrics
                            .time_to_first_token
                            .observe((now - a.arrived).as_secs_f64()),
                        Some(t) => self
                            .metrics
                            .inter_token_latency
                            .observe((now - t).as_secs_f64()),
                    }
                    a.last_token = Some(now);
                    // a closed channel is noticed (and the request cancelled) before next step
                    let _ = a.events.send(GenEvent::Token { token, logprobs });
                }
                Event::Finished { id, reason } => {
                    let Some(a) = self.active.remove(&id) else {
                        continue;
                    };
                    let label = finish_reason(reason);
                    self.metrics
                        .finished
                        .get_or_create(&vec![("reason", label)])
                        .inc();
                    if let Some(order) = &a.pin {
                        let pinned = self.pin(&order.prompt, order.salt, now + order.ttl)?;
                        self.update_gauges();
                        let _ = a.events.send(pinned);
                    }
                    let _ = a.events.send(GenEvent::Finished(reason));
                }
                Event::Preempted { .. } => {}
            }
        }
        Ok(())
    }

    /// Pins a prompt's cached blocks until `expires`, within the pin budget.
    fn pin(
        &mut self,
        prompt: &[u32],
        salt: Option<CacheSalt>,
        expires: Instant,
    ) -> Result<GenEvent, EngineError> {
        let cache = self.scheduler.cache_mut();
        let (pin, tokens) = cache.pin_prefix(prompt, salt)?;
        if cache.pinned_blocks() > self.limits.pin_budget_blocks {
            cache.unpin(pin)?;
            return Ok(GenEvent::Failed(ApiError::invalid(
                "prompt",
                format!(
                    "pinning this prompt would exceed the pin budget of {} blocks",
                    self.limits.pin_budget_blocks
                ),
            )));
        }
        self.pins.push((pin, expires));
        Ok(GenEvent::Pinned(tokens))
    }

    fn expire_pins(&mut self) -> Result<(), EngineError> {
        let now = Instant::now();
        let (expired, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pins)
            .into_iter()
            .partition(|p| p.1 <= now);
        self.pins = kept;
        for (pin, _) in expired {
            self.scheduler.cache_mut().unpin(pin)?;
        }
        Ok(())
    }

    /// A step failed (a defect, not a client's doing): every request ends with the error and
    /// the engine goes on with an empty queue.
    fn fail_all(&mut self, e: &EngineError) -> Result<(), EngineError> {
        let ids: Vec<u64> = self.active.keys().copied().collect();
        for id in ids {
            self.scheduler.cancel(id)?;
            if let Some(a) = self.active.get(&id) {
                let _ = a
                    .events
                    .send(GenEvent::Failed(ApiError::unavailable(format!(
                        "the engine failed: {e}"
                    ))));
            }
            self.forget(id, "error");
        }
        Ok(())
    }

    fn update_gauges(&mut self) {
        let m = self.metrics;
        let cache = self.scheduler.cache();
        let counts = cache.counts();
        let pinned = cache.pinned_blocks();
        for (state, n) in [
            ("free", counts.free),
            ("cached", counts.cached),
            ("in_use", counts.owned - pinned.min(counts.owned)),
            ("pinned", pinned),
        ] {
            m.blocks
                .get_or_create(&vec![("state", state)])
                .set(n as i64);
        }
        m.requests
            .get_or_create(&vec![("state", "running")])
            .set(self.scheduler.num_running() as i64);
        m.requests
            .get_or_create(&vec![("state", "waiting")])
            .set(self.scheduler.num_waiting() as i64);
        let stats = self.scheduler.stats();
        let pool_evictions = cache.prefix_stats().evictions;
        let tier_evictions = cache.tier_evictions();
        let last = &self.last;
        m.forward_steps
            .inc_by((stats.steps - last.stats.steps) as u64);
        let swaps = stats.swaps - last.stats.swaps;
        let preemptions = stats.preemptions - last.stats.preemptions;
        m.preemptions
            .get_or_create(&vec![("kind", "swap")])
            .inc_by(swaps as u64);
        m.preemptions
            .get_or_create(&vec![("kind", "recompute")])
            .inc_by((preemptions - swaps) as u64);
        m.evicted_blocks
            .get_or_create(&vec![("tier", "pool")])
            .inc_by(pool_evictions - last.pool_evictions);
        m.evicted_blocks
            .get_or_create(&vec![("tier", "tier")])
            .inc_by(tier_evictions - last.tier_evictions);
        self.last = Counters {
            stats,
            pool_evictions,
            tier_evictions,
        };
        self.update_remote();
    }

    fn update_remote(&mut self) {
        let Some(r) = &self.limits.remote_stats else {
            return;
        };
        let now = [
            ("hit_blocks", &r.hits),
            ("misses", &r.misses),
            ("fetch_budget_cuts", &r.budget_cuts),
            ("writes", &r.writes),
            ("writes_dropped", &r.writes_dropped),
            ("damaged", &r.damaged),
            ("read_errors", &r.read_errors),
            ("write_errors", &r.write_errors),
            ("delete_errors", &r.delete_errors),
        ];
        self.remote_seen.resize(now.len(), 0);
        for ((kind, counter), seen) in now.iter().zip(self.remote_seen.iter_mut()) {
            let value = RemoteStats::get(counter);
            self.metrics
                .remote
                .get_or_create(&vec![("kind", *kind)])
                .inc_by(value - *seen);
            *seen = value;
        }
        self.metrics
            .remote_up
            .set(i64::from(r.up.load(Ordering::Relaxed)));
    }
}

/// The client-facing error for a request the scheduler refused at submission.
fn refusal(e: &EngineError) -> ApiError {
    match e {
        EngineError::PromptTooLong { .. } => ApiError::context_length("prompt", e.to_string()),
        _ => ApiError::invalid("prompt", e.to_string()),
    }
}
