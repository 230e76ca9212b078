//! A bounded record of prefix keys that recently left the cache altogether (DESIGN §11), so
//! that a miss can be explained as "evicted, this long ago" rather than "never seen".
//!
//! Keys are salted like the blocks they name, so the log answers only for the caller's own
//! prefixes. Oldest entries leave first once `capacity` keys are recorded.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use crate::prefix::{BlockHash, KeyHashBuilder};

/// Recently evicted prefix keys and when they left.
#[derive(Debug, Clone)]
pub struct EvictionLog {
    capacity: usize,
    /// Recording order by stamp; an entry whose stamp differs from `at`'s was superseded.
    order: VecDeque<(BlockHash, u64)>,
    at: HashMap<BlockHash, (u64, Instant), KeyHashBuilder>,
    next_stamp: u64,
}

impl EvictionLog {
    /// A log remembering at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            order: VecDeque::new(),
            at: HashMap::default(),
            next_stamp: 0,
        }
    }

    /// Records that `key` left the cache at `when`.
    pub fn record(&mut self, key: BlockHash, when: Instant) {
        if self.capacity == 0 {
            return;
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.at.insert(key, (stamp, when));
        self.order.push_back((key, stamp));
        while self.at.len() > self.capacity || self.order.len() > 2 * self.capacity {
            let Some((old, stamp)) = self.order.pop_front() else {
                break;
            };
            if self.at.get(&old).map(|e| e.0) == Some(stamp) {
                self.at.remove(&old);
            }
        }
    }

    /// When `key` was last evicted, if the log still remembers it.
    pub fn evicted_at(&self, key: BlockHash) -> Option<Instant> {
        self.at.get(&key).map(|e| e.1)
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// True when no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_most_recent_keys_only() {
        let mut log = EvictionLog::new(2);
        let now = Instant::now();
        let keys: Vec<BlockHash> = (0..3u128).map(BlockHash).collect();
        for key in &keys {
            log.record(*key, now);
        }
        assert_eq!(log.len(), 2);
        assert_eq!(log.evicted_at(keys[0]), None);
        assert_eq!(log.evicted_at(keys[2]), Some(now));
        // re-recording a key refreshes it; the superseded entry does not evict it later
        log.record(keys[1], now);
        log.record(BlockHash(9), now);
        assert!(log.evicted_at(keys[1]).is_some());
        assert_eq!(log.evicted_at(keys[2]), None);
        assert!(EvictionLog::new(0).is_empty());
    }
}
