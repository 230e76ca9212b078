//! Prefix-cache keys and counters (DESIGN §4).
//!
//! A full block's key chains its parent's key, so equal keys mean equal whole prefixes:
//! `key = xxh3_128(parent key | extra | token ids)`. `extra` names everything else that changes the
//! stored bytes (model, codecs, geometry), so a cache built for one codec never serves another.

use xxhash_rust::xxh3::Xxh3;

/// 128-bit key of a full block and its whole prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u128);

impl BlockHash {
    /// Hashes arbitrary bytes into a key, e.g. the `extra` description of model and codecs.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self(xxhash_rust::xxh3::xxh3_128(bytes))
    }
}

/// A tenant's cache salt: it stands in for the parent of a sequence's first block, so every key
/// of the chain depends on it. Sequences with different salts never share or find each other's
/// blocks (vLLM's `cache_salt`, which closes the timing side channel of a shared prefix cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheSalt(BlockHash);

impl CacheSalt {
    /// The salt of an opaque tenant string.
    pub fn new(salt: &str) -> Self {
        let mut bytes = b"pagedkv-cache-salt\0".to_vec();
        bytes.extend_from_slice(salt.as_bytes());
        Self(BlockHash::of_bytes(&bytes))
    }

    /// The key that a first block's hash chains from: none without a salt.
    pub fn root(salt: Option<CacheSalt>) -> Option<BlockHash> {
        salt.map(|s| s.0)
    }
}

/// Key of one full block: chained over its parent (`None` for the first block), the extra key,
/// and its token ids (little-endian u32).
pub fn hash_block(parent: Option<BlockHash>, extra: BlockHash, tokens: &[u32]) -> BlockHash {
    let mut hasher = Xxh3::new();
    match parent {
        // a tag byte keeps "no parent" distinct from any parent value
        None => hasher.update(&[0]),
        Some(p) => {
            hasher.update(&[1]);
            hasher.update(&p.0.to_le_bytes());
        }
    }
    hasher.update(&extra.0.to_le_bytes());
    for t in tokens {
        hasher.update(&t.to_le_bytes());
    }
    BlockHash(hasher.digest128())
}

/// Hasher for maps keyed by [`BlockHash`]: the key is already a uniform 128-bit hash, so its
/// low 64 bits serve directly (no second hashing pass on every lookup).
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for non-u128 keys; fold the bytes so the hasher stays correct anyway.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

/// `BuildHasher` for [`KeyHasher`].
pub type KeyHashBuilder = std::hash::BuildHasherDefault<KeyHasher>;

/// Prefix-cache counters, in blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Full prompt blocks found in the cache.
    pub hits: u64,
    /// Full prompt blocks looked up and not found (computed instead).
    pub misses: u64,
    /// Cached blocks whose key was dropped because the pool reused them.
    pub evictions: u64,
}

impl PrefixStats {
    /// Hits over lookups; 0 when nothing was looked up.
    pub fn hit_rate(&self) -> f64 {
        let lookups = self.hits + self.misses;
        if lookups == 0 {
            0.0
        } else {
            self.hits as f64 / lookups as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_chain_and_depend_on_everything() {
        let extra = BlockHash::of_bytes(b"model;f16");
        let a = hash_block(None, extra, &[1, 2, 3, 4]);
        assert_eq!(a, hash_block(None, extra, &[1, 2, 3, 4]));
        assert_ne!(a, hash_block(None, extra, &[1, 2, 3, 5]));
        assert_ne!(
            a,
            hash_block(None, BlockHash::of_bytes(b"model;int4"), &[1, 2, 3, 4])
        );
        let b = hash_block(Some(a), extra, &[5, 6, 7, 8]);
        let other_parent = hash_block(None, extra, &[9, 9, 9, 9]);
        assert_ne!(b, hash_block(Some(other_parent), extra, &[5, 6, 7, 8]));
        assert_ne!(b, hash_block(None, extra, &[5, 6, 7, 8]));
    }

    #[test]
    fn salts_separate_first_blocks() {
        let extra = BlockHash::of_bytes(b"model;f16");
        let plain = hash_block(None, extra, &[1, 2]);
        let a = hash_block(CacheSalt::root(Some(CacheSalt::new("a"))), extra, &[1, 2]);
        let b = hash_block(CacheSalt::root(Some(CacheSalt::new("b"))), extra, &[1, 2]);
        assert_ne!(a, plain);
        assert_ne!(a, b);
        assert_eq!(CacheSalt::root(None), None);
    }
}
