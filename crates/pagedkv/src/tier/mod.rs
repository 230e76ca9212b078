//! Tiers below the block pool (DESIGN §8): a host tier (payloads in memory) and a disk tier
//! (one file per payload, written to a temporary file and renamed into place), each with a byte
//! capacity and least-recently-used demotion: what the host tier evicts goes to disk, and what
//! the disk tier evicts is gone. Payloads (`payload`) are checked on the way back in.

pub mod disk;
pub mod host;
pub mod payload;
pub mod remote;

use std::collections::{BTreeMap, HashMap};

pub use disk::DiskTier;
pub use host::HostTier;
pub use remote::{FetchedRun, RemoteError, RemoteKey, RemoteStats, RemoteStore, RunCut};

use crate::error::Result;

/// Name of a stored payload (a block's prefix key, or a swapped sequence's block).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TierKey(pub u128);

/// Which tier below the pool holds a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TierLevel {
    /// Host memory.
    Host,
    /// Local disk.
    Disk,
    /// A store shared between engines ([`RemoteStore`]; never in a [`TieredStore`]).
    Remote,
}

/// Recency order of keys: O(log n) touch and oldest-first eviction.
#[derive(Debug, Default, Clone)]
struct Lru {
    clock: u64,
    stamp_of: HashMap<TierKey, u64>,
    by_stamp: BTreeMap<u64, TierKey>,
}

impl Lru {
    fn touch(&mut self, key: TierKey) {
        self.clock += 1;
        if let Some(old) = self.stamp_of.insert(key, self.clock) {
            self.by_stamp.remove(&old);
        }
        self.by_stamp.insert(self.clock, key);
    }

    fn remove(&mut self, key: TierKey) {
        if let Some(old) = self.stamp_of.remove(&key) {
            self.by_stamp.remove(&old);
        }
    }

    fn oldest(&self) -> Option<TierKey> {
        self.by_stamp.values().next().copied()
    }
}

/// Host tier over an optional disk tier: `put` stores in memory and demotes the least recently
/// used payloads to disk when memory is over capacity; `take` looks in memory, then on disk.
#[derive(Debug)]
pub struct TieredStore {
    /// The host tier.
    pub host: HostTier,
    /// The disk tier, if any.
    pub disk: Option<DiskTier>,
}

impl TieredStore {
    /// A store with a host tier of `host_bytes` and no disk tier.
    pub fn in_memory(host_bytes: u64) -> Self {
        Self {
            host: HostTier::new(host_bytes),
            disk: None,
        }
    }

    /// Stores a payload; what no longer fits in memory moves to disk (or is dropped without
    /// one). Returns the keys dropped altogether. If the disk fails, its error is returned and
    /// nothing is lost: the payload is stored, and what was to move to disk stays in memory,
    /// over capacity, until a later `put` moves it.
    pub fn put(&mut self, key: TierKey, payload: Vec<u8>) -> Result<Vec<TierKey>> {
        let mut dropped = Vec::new();
        let mut leaving = self.host.put(key, payload).into_iter();
        while let Some((old, bytes)) = leaving.next() {
            let Some(disk) = self.disk.as_mut() else {
                dropped.push(old);
                continue;
            };
            match disk.put(old, &bytes) {
                Ok(evicted) => dropped.extend(evicted),
                Err(failure) => {
                    self.host.keep(old, bytes);
                    for (old, bytes) in leaving {
                        self.host.keep(old, bytes);
                    }
                    return Err(failure);
                }
            }
        }
        Ok(dropped)
    }

    /// Removes and returns a payload from memory or disk.
    pub fn take(&mut self, key: TierKey) -> Result<Option<Vec<u8>>> {
        if let Some(bytes) = self.host.take(key) {
            return Ok(Some(bytes));
        }
        match self.disk.as_mut() {
            Some(disk) => {
                let bytes = disk.get(key)?;
                if bytes.is_some() {
                    disk.remove(key)?;
                }
                Ok(bytes)
            }
            None => Ok(None),
        }
    }

    /// A copy of a payload from memory or disk, left in place.
    pub fn get(&mut self, key: TierKey) -> Result<Option<Vec<u8>>> {
        if let Some(bytes) = self.host.get(key) {
            return Ok(Some(bytes.to_vec()));
        }
        match self.disk.as_mut() {
            Some(disk) => disk.get(key),
            None => Ok(None),
        }
    }

    /// The tier holding a payload, if any (nothing is read or reordered).
    pub fn locate(&self, key: TierKey) -> Option<TierLevel> {
        if self.host.contains(key) {
            Some(TierLevel::Host)
        } else if self.disk.as_ref().is_some_and(|d| d.contains(key)) {
            Some(TierLevel::Disk)
        } else {
            None
        }
    }

    /// Whether a payload is stored in either tier.
    pub fn contains(&self, key: TierKey) -> bool {
        self.host.contains(key) || self.disk.as_ref().is_some_and(|d| d.contains(key))
    }
}
