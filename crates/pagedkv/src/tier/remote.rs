//! A shared store of block payloads below the local tiers (DESIGN §12): many engine processes
//! publish the blocks they compute and fetch the ones others computed. The store itself (Redis,
//! or anything speaking its protocol) lives outside this crate, behind [`RemoteStore`], so the
//! core builds without a network client.
//!
//! Faults cost only cache hits: an implementation answers [`RemoteError::Unavailable`] instead of
//! waiting on a store that is down, and the cache then computes the blocks itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::prefix::BlockHash;

/// Where a block's payload lives in the shared store: its tenant's salt (the root its key chain
/// starts from) and its chained prefix key. The implementation adds the payload format, the
/// model fingerprint and the layout digest to the name, so another model or codec never reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteKey {
    /// The salt's root key, `None` without a salt.
    pub salt: Option<BlockHash>,
    /// The block's prefix key.
    pub prefix: BlockHash,
}

/// Why a shared store did not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    /// The store is down, timed out, or its circuit breaker is open: treat as a miss.
    #[error("the shared store is unavailable: {0}")]
    Unavailable(String),
}

/// What a fetch of consecutive keys returned: the payloads of the leading keys, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedRun {
    /// One payload per leading key.
    pub payloads: Vec<Vec<u8>>,
    /// Why the run ended before the last key; `None` when every key had a payload.
    pub cut: Option<RunCut>,
}

impl FetchedRun {
    /// Every key's payload.
    pub fn whole(payloads: Vec<Vec<u8>>) -> Self {
        Self {
            payloads,
            cut: None,
        }
    }

    /// The payloads of the keys before the run was cut, and why it was.
    pub fn cut_short(payloads: Vec<Vec<u8>>, why: RunCut) -> Self {
        Self {
            payloads,
            cut: Some(why),
        }
    }
}

/// Why a fetch ended before its last key. The payloads before the cut are good either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunCut {
    /// The next key has no payload.
    Missing,
    /// The store stopped answering partway (or refused a call).
    Unavailable,
    /// The fetch's time budget ran out with keys left to ask for.
    OutOfTime,
}

/// A store shared between engines. Calls come from the engine's thread between steps, so an
/// implementation must bound the time each takes (a timeout per call) and never block on
/// writes.
pub trait RemoteStore: Send + std::fmt::Debug {
    /// Offers a sealed block's payload for publication. Must not block: a write that cannot be
    /// queued is dropped (and counted by the implementation).
    fn publish(&mut self, key: RemoteKey, payload: Vec<u8>);

    /// The payloads stored under consecutive `keys`, in order, up to the first key that has
    /// none, and why the run ended early if it did. Fails only when nothing could be fetched.
    fn fetch_run(&mut self, keys: &[RemoteKey]) -> Result<FetchedRun, RemoteError>;

    /// How many leading `keys` have a payload, without transferring them (a dry run's lookup).
    fn probe_run(&mut self, keys: &[RemoteKey]) -> Result<usize, RemoteError>;

    /// Removes a payload that failed its checks, so no engine reads it again.
    fn delete(&mut self, key: RemoteKey);
}

/// Counters of a shared store, shared with whoever reports them (the server's metrics).
#[derive(Debug, Default)]
pub struct RemoteStats {
    /// Blocks fetched.
    pub hits: AtomicU64,
    /// Fetches that ended at a missing key.
    pub misses: AtomicU64,
    /// Fetches cut short by their time budget.
    pub budget_cuts: AtomicU64,
    /// Failed reads (timeouts, connection errors).
    pub read_errors: AtomicU64,
    /// Failed writes.
    pub write_errors: AtomicU64,
    /// Failed deletes.
    pub delete_errors: AtomicU64,
    /// Payloads published.
    pub writes: AtomicU64,
    /// Writes dropped because the write queue was full (or the store down).
    pub writes_dropped: AtomicU64,
    /// Damaged payloads deleted.
    pub damaged: AtomicU64,
    /// Whether the store answered its last call.
    pub up: AtomicBool,
}

impl RemoteStats {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
