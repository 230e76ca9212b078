//! A shared block tier on Redis, or any server speaking its protocol (Valkey, …), for pagedkv
//! (DESIGN §12): engines publish the blocks they seal and fetch the ones others sealed.
//!
//! - Keys: `pagedkv:{payload format}:{model fingerprint}:{layout digest}:{salt}:{prefix key}`;
//!   values: the block payload of `pagedkv::tier::payload`, unchanged (checked by the cache
//!   before it reaches the pool).
//! - Writes are write-behind: [`RemoteStore::publish`] only queues (bounded); a writer thread
//!   sends `SET key value NX [PX ttl]`. A full queue drops the write and counts it.
//! - Reads: `MGET` of the next run of keys, in chunks, stopping at the first miss or when the
//!   admission's fetch budget ([`RedisConfig::fetch_budget`]) has run out.
//! - Faults cost only hits: every call has a timeout; after a failure a circuit breaker
//!   answers "unavailable" at once, and tries the store again after a backoff that doubles up
//!   to [`MAX_BACKOFF`]. Nothing here returns an error to a client of the engine.
//! - Eviction is Redis's own (`maxmemory` with an LRU policy).

pub mod local_server;

use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagedkv::tier::payload;
use pagedkv::tier::{FetchedRun, RemoteError, RemoteKey, RemoteStats, RemoteStore, RunCut};
use pagedkv::{BlockHash, KvLayout};

pub use local_server::LocalRedis;

/// First wait after a failure before the store is tried again.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between tries while the store stays down.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Errors of setting the tier up (never of using it).
#[derive(Debug, thiserror::Error)]
pub enum RedisTierError {
    /// The URL is not a Redis URL.
    #[error("invalid shared-tier URL `{url}`: {reason}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The writer thread could not be started.
    #[error("cannot start the shared tier's writer thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// How long an admission's fetch may take by default (see [`RedisConfig::fetch_budget`]).
pub const DEFAULT_FETCH_BUDGET: Duration = Duration::from_millis(200);

/// Settings of a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://HOST:PORT[/DB]`.
    pub url: String,
    /// The key prefix naming the payload format, model and layout.
    pub namespace: String,
    /// Budget of every call: connecting, reading, writing.
    pub timeout: Duration,
    /// Budget of a whole fetch at admission (its first round trip always goes): the longest a
    /// slow store can hold up an admission beyond one call.
    pub fetch_budget: Duration,
    /// Writes waiting for the writer thread; beyond, writes are dropped.
    pub queue_capacity: usize,
    /// Expiry of published blocks (`None`: until Redis evicts them).
    pub ttl: Option<Duration>,
    /// Keys fetched per round trip.
    pub keys_per_fetch: usize,
}

impl RedisConfig {
    /// Settings for the blocks of one model (`model` names it: its fingerprint) in one layout.
    pub fn new(url: &str, model: &str, layout: &KvLayout) -> Self {
        let digest = BlockHash::of_bytes(&layout.digest_bytes());
        Self {
            url: url.to_string(),
            namespace: format!("pagedkv:{}:{model}:{:032x}", payload::VERSION, digest.0),
            timeout: Duration::from_millis(200),
            fetch_budget: DEFAULT_FETCH_BUDGET,
            queue_capacity: 1024,
            ttl: None,
            keys_per_fetch: 16,
        }
    }

    /// The Redis key of a block.
    pub fn key(&self, key: &RemoteKey) -> String {
        match key.salt {
            Some(salt) => format!("{}:{:032x}:{:032x}", self.namespace, salt.0, key.prefix.0),
            None => format!("{}:none:{:032x}", self.namespace, key.prefix.0),
        }
    }
}

/// Open or closed: whether calls go to the store now.
#[derive(Debug)]
struct Breaker {
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Breaker {
    fn new() -> Self {
        Self {
            retry_at: None,
            backoff: INITIAL_BACKOFF,
        }
    }

    fn is_open(&self) -> bool {
        self.retry_at.is_some_and(|t| Instant::now() < t)
    }

    fn trip(&mut self) {
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    fn reset(&mut self) {
        self.retry_at = None;
        self.backoff = INITIAL_BACKOFF;
    }
}

/// Why a call did not reach the store.
#[derive(Debug)]
enum LinkError {
    /// The breaker is open: the call was not tried.
    Open,
    /// The call was tried and the store is unreachable (refused, timed out, dropped).
    Failed(String),
    /// The store answered with an error reply (e.g. `OOM` under `maxmemory` with
    /// `noeviction`): it is up, the call failed.
    Refused(String),
}

impl From<LinkError> for RemoteError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Open => RemoteError::Unavailable("circuit open after a failure".into()),
            LinkError::Failed(reason) | LinkError::Refused(reason) => {
                RemoteError::Unavailable(reason)
            }
        }
    }
}

/// A connection made on demand, with every call under the timeout, behind a breaker.
struct Link {
    client: redis::Client,
    timeout: Duration,
    connection: Option<redis::Connection>,
    breaker: Breaker,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("connected", &self.connection.is_some())
            .field("breaker", &self.breaker)
            .finish()
    }
}

impl Link {
    /// Runs `call` on the connection (connecting first if needed). A kept connection that
    /// fails to reach the store is replaced once and the call retried (it may be stale: the
    /// store restarted); if that fails too, the connection is dropped and the breaker opens.
    /// An error reply from the store fails only the call.
    fn run<T>(
        &mut self,
        mut call: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, LinkError> {
        if self.breaker.is_open() {
            return Err(LinkError::Open);
        }
        let kept = self.connection.is_some();
        let mut result = self.connect().and_then(|c| call(c).map_err(classify));
        if kept && matches!(result, Err(LinkError::Failed(_))) {
            self.connection = None;
            result = self.connect().and_then(|c| call(c).map_err(classify));
        }
        match &result {
            Ok(_) => self.breaker.reset(),
            Err(LinkError::Failed(_)) => {
                self.connection = None;
                self.breaker.trip();
            }
            Err(LinkError::Refused(_) | LinkError::Open) => {}
        }
        result
    }

    fn connect(&mut self) -> Result<&mut redis::Connection, LinkError> {
        if self.connection.is_none() {
            let unreachable = |e: redis::RedisError| LinkError::Failed(e.to_string());
            let c = self
                .client
                .get_connection_with_timeout(self.timeout)
                .map_err(unreachable)?;
            c.set_read_timeout(Some(self.timeout))
                .and_then(|()| c.set_write_timeout(Some(self.timeout)))
                .map_err(unreachable)?;
            self.connection = Some(c);
        }
        self.connection
            .as_mut()
            .ok_or_else(|| LinkError::Failed("no connection".to_string()))
    }
}

/// Whether an error means the store is unreachable, or only that it refused the call.
fn classify(e: redis::RedisError) -> LinkError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        LinkError::Failed(e.to_string())
    } else {
        LinkError::Refused(e.to_string())
    }
}

/// A [`RemoteStore`] on Redis. Dropping it waits for the writes already queued.
#[derive(Debug)]
pub struct RedisStore {
    config: RedisConfig,
    reader: Link,
    /// `None` only while dropping.
    writes: Option<SyncSender<(String, Vec<u8>)>>,
    writer: Option<std::thread::JoinHandle<()>>,
    stats: Arc<RemoteStats>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        // closing the queue ends the writer once it has sent (or dropped) what is queued
        self.writes.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl RedisStore {
    /// A store on `config.url`. Succeeds when the store is down (the tier then answers
    /// "unavailable" until it is up); fails only on a malformed URL. See [`RedisStore::is_up`].
    pub fn connect(config: RedisConfig) -> Result<Self, RedisTierError> {
        let bad_url = |e: redis::RedisError| RedisTierError::BadUrl {
            url: config.url.clone(),
            reason: e.to_string(),
        };
        let client = redis::Client::open(config.url.as_str()).map_err(bad_url)?;
        let stats = Arc::new(RemoteStats::default());
        let (writes, queue) = sync_channel(config.queue_capacity);
        let writer = Link {
            client: client.clone(),
            timeout: config.timeout,
            connection: None,
            breaker: Breaker::new(),
        };
        let (writer_stats, ttl) = (stats.clone(), config.ttl);
        let writer = std::thread::Builder::new()
            .name("pagedkv-redis-writer".into())
            .spawn(move || write_behind(queue, writer, ttl, &writer_stats))?;
        let mut store = Self {
            reader: Link {
                client,
                timeout: config.timeout,
                connection: None,
                breaker: Breaker::new(),
            },
            config,
            writes: Some(writes),
            writer: Some(writer),
            stats,
        };
        let up = store
            .reader
            .run(|c| redis::cmd("PING").query::<String>(c))
            .is_ok();
        store.stats.up.store(up, Ordering::Relaxed);
        Ok(store)
    }

    /// The store's counters (shared: they keep counting after the store moves into a cache).
    pub fn stats(&self) -> Arc<RemoteStats> {
        self.stats.clone()
    }

    /// Whether the store answered its last call.
    pub fn is_up(&self) -> bool {
        self.stats.up.load(Ordering::Relaxed)
    }

    /// The settings.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// Records a call's outcome: the store is up after a success, down after a failure
    /// (counted in `errors`); a call the breaker refused changes nothing.
    fn note<T>(&self, result: &Result<T, LinkError>, errors: &std::sync::atomic::AtomicU64) {
        match result {
            Ok(_) => self.stats.up.store(true, Ordering::Relaxed),
            Err(LinkError::Failed(_)) => {
                self.stats.up.store(false, Ordering::Relaxed);
                RemoteStats::bump(errors);
            }
            Err(LinkError::Refused(_)) => {
                self.stats.up.store(true, Ordering::Relaxed);
                RemoteStats::bump(errors);
            }
            Err(LinkError::Open) => {}
        }
    }
}

impl RemoteStore for RedisStore {
    fn publish(&mut self, key: RemoteKey, payload: Vec<u8>) {
        let Some(writes) = &self.writes else {
            return;
        };
        match writes.try_send((self.config.key(&key), payload)) {
            Ok(()) => {}
            // a full queue (or a writer gone) drops the write: never block a decode step
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                RemoteStats::bump(&self.stats.writes_dropped)
            }
        }
    }

    fn fetch_run(&mut self, keys: &[RemoteKey]) -> Result<FetchedRun, RemoteError> {
        // one budget for the whole run: a slow store costs at most that per admission
        let deadline = Instant::now() + self.config.fetch_budget;
        let mut payloads = Vec::new();
        for chunk in keys.chunks(self.config.keys_per_fetch.max(1)) {
            // (a later round trip follows only a first that found every key)
            if !payloads.is_empty() && Instant::now() >= deadline {
                RemoteStats::bump(&self.stats.budget_cuts);
                return Ok(FetchedRun::cut_short(payloads, RunCut::OutOfTime));
            }
            let names: Vec<String> = chunk.iter().map(|k| self.config.key(k)).collect();
            let result = self.reader.run(|c| {
                redis::cmd("MGET")
                    .arg(&names)
                    .query::<Vec<Option<Vec<u8>>>>(c)
            });
            self.note(&result, &self.stats.read_errors);
            let values = match result {
                Ok(values) => values,
                // the failure is counted above; what came before it is still good
                Err(e) if payloads.is_empty() => return Err(e.into()),
                Err(LinkError::Open | LinkError::Failed(_) | LinkError::Refused(_)) => {
                    return Ok(FetchedRun::cut_short(payloads, RunCut::Unavailable))
                }
            };
            for value in values {
                match value {
                    Some(bytes) => {
                        RemoteStats::bump(&self.stats.hits);
                        payloads.push(bytes);
                    }
                    None => {
                        RemoteStats::bump(&self.stats.misses);
                        return Ok(FetchedRun::cut_short(payloads, RunCut::Missing));
                    }
                }
            }
        }
        Ok(FetchedRun::whole(payloads))
    }

    fn probe_run(&mut self, keys: &[RemoteKey]) -> Result<usize, RemoteError> {
        let names: Vec<String> = keys.iter().map(|k| self.config.key(k)).collect();
        let result = self.reader.run(|c| {
            let mut pipe = redis::pipe();
            for name in &names {
                pipe.cmd("EXISTS").arg(name);
            }
            pipe.query::<Vec<bool>>(c)
        });
        self.note(&result, &self.stats.read_errors);
        Ok(result?.iter().take_while(|present| **present).count())
    }

    fn delete(&mut self, key: RemoteKey) {
        RemoteStats::bump(&self.stats.damaged);
        let name = self.config.key(&key);
        let result = self
            .reader
            .run(|c| redis::cmd("DEL").arg(&name).query::<i64>(c));
        self.note(&result, &self.stats.delete_errors);
    }
}

/// The writer thread: `SET NX` each queued payload; while the store is down, queued writes
/// are dropped (and counted) rather than retried.
fn write_behind(
    queue: Receiver<(String, Vec<u8>)>,
    mut link: Link,
    ttl: Option<Duration>,
    stats: &RemoteStats,
) {
    while let Ok((key, value)) = queue.recv() {
        let result = link.run(|c| {
            let mut set = redis::cmd("SET");
            set.arg(&key).arg(value.as_slice()).arg("NX");
            if let Some(ttl) = ttl {
                set.arg("PX").arg(ttl.as_millis() as u64);
            }
            // NX answers nil when the key exists: another engine published it first
            set.query::<Option<String>>(c)
        });
        match result {
            Ok(_) => {
                stats.up.store(true, Ordering::Relaxed);
                RemoteStats::bump(&stats.writes);
            }
            Err(LinkError::Failed(_)) => {
                stats.up.store(false, Ordering::Relaxed);
                RemoteStats::bump(&stats.write_errors);
                RemoteStats::bump(&stats.writes_dropped);
            }
            Err(LinkError::Refused(_)) => {
                RemoteStats::bump(&stats.write_errors);
                RemoteStats::bump(&stats.writes_dropped);
            }
            Err(LinkError::Open) => RemoteStats::bump(&stats.writes_dropped),
        }
    }
}
