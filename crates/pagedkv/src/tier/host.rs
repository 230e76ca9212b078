//! The host tier: payloads in memory, up to a byte capacity, least recently used out first.

use std::collections::HashMap;

use super::{Lru, TierKey};

/// Payloads held in host memory.
#[derive(Debug, Default)]
pub struct HostTier {
    capacity: u64,
    used: u64,
    entries: HashMap<TierKey, Vec<u8>>,
    lru: Lru,
}

impl HostTier {
    /// An empty tier holding at most `capacity_bytes` of payloads.
    pub fn new(capacity_bytes: u64) -> Self {
        Self {
            capacity: capacity_bytes,
            ..Self::default()
        }
    }

    /// Stores `payload` under `key` (replacing an older one) and returns what had to leave to
    /// stay within capacity, oldest first — possibly the new payload itself if it alone is
    /// larger than the tier.
    pub fn put(&mut self, key: TierKey, payload: Vec<u8>) -> Vec<(TierKey, Vec<u8>)> {
        self.keep(key, payload);
        let mut evicted = Vec::new();
        while self.used > self.capacity {
            let Some(oldest) = self.lru.oldest() else {
                break;
            };
            let bytes = self.take(oldest).expect("listed keys are stored");
            evicted.push((oldest, bytes));
        }
        evicted
    }

    /// Holds `payload` under `key` (replacing an older one) whatever the capacity, as the most
    /// recently used: how payloads [`HostTier::put`] evicted come back when they cannot move
    /// on (a disk tier failing), rather than being lost.
    pub fn keep(&mut self, key: TierKey, payload: Vec<u8>) {
        self.take(key);
        self.used += payload.len() as u64;
        self.entries.insert(key, payload);
        self.lru.touch(key);
    }

    /// The payload under `key`, marked as recently used.
    pub fn get(&mut self, key: TierKey) -> Option<&[u8]> {
        if self.entries.contains_key(&key) {
            self.lru.touch(key);
        }
        self.entries.get(&key).map(Vec::as_slice)
    }

    /// Removes and returns the payload under `key`.
    pub fn take(&mut self, key: TierKey) -> Option<Vec<u8>> {
        let bytes = self.entries.remove(&key)?;
        self.used -= bytes.len() as u64;
        self.lru.remove(key);
        Some(bytes)
    }

    /// Whether `key` is stored.
    pub fn contains(&self, key: TierKey) -> bool {
        self.entries.contains_key(&key)
    }

    /// Bytes stored.
    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    /// Payloads stored.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_leaves_first() {
        let mut tier = HostTier::new(10);
        assert!(tier.put(TierKey(1), vec![1; 4]).is_empty());
        assert!(tier.put(TierKey(2), vec![2; 4]).is_empty());
        tier.get(TierKey(1));
        let out = tier.put(TierKey(3), vec![3; 4]);
        assert_eq!(out, vec![(TierKey(2), vec![2; 4])]);
        assert_eq!(tier.used_bytes(), 8);
        assert_eq!(tier.take(TierKey(1)), Some(vec![1; 4]));
        // a payload larger than the tier pushes everything out, itself last
        let out = tier.put(TierKey(4), vec![4; 11]);
        assert_eq!(
            out.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            [TierKey(3), TierKey(4)]
        );
        assert!(tier.is_empty() && tier.used_bytes() == 0);
    }
}
