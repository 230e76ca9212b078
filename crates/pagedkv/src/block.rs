//! The block pool: one arena of block ids, reference counts, an intrusive free queue and the
//! prefix-cache map (DESIGN §3–4; the shape of vLLM v1's `BlockPool`).
//!
//! ```text
//!  head ─▶ [7] ⇄ [2] ⇄ [9] ⇄ ... ⇄ [4] ◀─ tail      free queue, threaded through BlockMeta.prev/next
//!          least recently freed      most recently freed
//! ```
//!
//! Invariant: `ref_count == 0` ⇔ the block is in the free queue. A freed block keeps its prefix
//! key ("cached") until the queue hands it out again; only then is its map entry dropped (lazy
//! eviction). Every operation is O(1) per block; none scans the pool.

use std::collections::HashMap;

use crate::error::{KvError, Result};
use crate::prefix::{BlockHash, KeyHashBuilder, PrefixStats};

/// Index of a block in the pool; the same id addresses the block in every layer's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl BlockId {
    /// The id as an array index.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Link value meaning "no neighbour".
const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct BlockMeta {
    ref_count: u32,
    /// Prefix key while the block is full and registered in the map.
    hash: Option<BlockHash>,
    prev: u32,
    next: u32,
}

/// Counts of blocks by state; `free + cached + owned == total` always.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCounts {
    /// In the free queue with no prefix key.
    pub free: usize,
    /// In the free queue, still holding a prefix key (reusable until evicted).
    pub cached: usize,
    /// Held by at least one sequence.
    pub owned: usize,
}

/// Fixed pool of `num_blocks` ids with O(1) allocate, retain, release and prefix lookup.
#[derive(Debug, Clone)]
pub struct BlockPool {
    metas: Vec<BlockMeta>,
    head: u32,
    tail: u32,
    queue_len: usize,
    cached: HashMap<BlockHash, BlockId, KeyHashBuilder>,
    stats: PrefixStats,
    /// Evicted cached blocks not yet taken, recorded only while `record_evictions` is set.
    evicted: Vec<(BlockId, BlockHash)>,
    record_evictions: bool,
}

impl BlockPool {
    /// A pool whose blocks are all free, queued in id order.
    pub fn new(num_blocks: usize) -> Result<Self> {
        if num_blocks == 0 {
            return Err(KvError::ZeroDimension {
                field: "num_blocks",
            });
        }
        if num_blocks >= NIL as usize {
            return Err(KvError::TooLarge {
                field: "num_blocks",
                value: num_blocks,
                max: NIL as usize - 1,
            });
        }
        let n = num_blocks as u32;
        let metas = (0..n)
            .map(|i| BlockMeta {
                ref_count: 0,
                hash: None,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == n { NIL } else { i + 1 },
            })
            .collect();
        Ok(Self {
            metas,
            head: 0,
            tail: n - 1,
            queue_len: num_blocks,
            cached: HashMap::default(),
            stats: PrefixStats::default(),
            evicted: Vec::new(),
            record_evictions: false,
        })
    }

    /// Total blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.metas.len()
    }

    /// Blocks that can be handed out now: free ones plus cached ones that would be evicted.
    pub fn num_available(&self) -> usize {
        self.queue_len
    }

    /// Reference count of a block.
    pub fn ref_count(&self, id: BlockId) -> Result<u32> {
        Ok(self.meta(id)?.ref_count)
    }

    /// Prefix key of a block, if it is registered in the prefix map.
    pub fn block_hash(&self, id: BlockId) -> Result<Option<BlockHash>> {
        Ok(self.meta(id)?.hash)
    }

    /// Prefix-cache counters.
    pub fn stats(&self) -> PrefixStats {
        self.stats
    }

    /// Starts (or stops) recording evicted cached blocks for [`take_evicted`](Self::take_evicted).
    pub(crate) fn record_evictions(&mut self, on: bool) {
        self.record_evictions = on;
        self.evicted.clear();
    }

    /// The cached blocks handed out (evicted) since the last call, with their former keys;
    /// their data is intact until the new owner writes, so they can be demoted to a tier.
    pub(crate) fn take_evicted(&mut self) -> Vec<(BlockId, BlockHash)> {
        std::mem::take(&mut self.evicted)
    }

    pub(crate) fn record_lookups(&mut self, hits: u64, misses: u64) {
        self.stats.hits += hits;
        self.stats.misses += misses;
    }

    /// Takes one block from the front of the free queue (evicting its prefix key if it had one);
    /// the caller owns it with ref count 1.
    pub fn allocate_one(&mut self) -> Result<BlockId> {
        if self.head == NIL {
            return Err(KvError::OutOfBlocks { needed: 1, free: 0 });
        }
        let id = BlockId(self.head);
        self.unlink(id);
        let meta = &mut self.metas[id.index()];
        meta.ref_count = 1;
        if let Some(hash) = meta.hash.take() {
            // The map may point at another block with the same key; drop only our own entry.
            if self.cached.get(&hash) == Some(&id) {
                self.cached.remove(&hash);
                if self.record_evictions {
                    self.evicted.push((id, hash));
                }
            }
            self.stats.evictions += 1;
        }
        Ok(id)
    }

    /// Allocates `n` blocks, all or nothing, appending them to `out`.
    pub fn allocate(&mut self, n: usize, out: &mut Vec<BlockId>) -> Result<()> {
        if n > self.queue_len {
            return Err(KvError::OutOfBlocks {
                needed: n,
                free: self.queue_len,
            });
        }
        out.reserve(n);
        for _ in 0..n {
            out.push(self.allocate_one()?);
        }
        Ok(())
    }

    /// Adds an owner to a block; a block with no owner leaves the free queue (a prefix hit).
    pub fn retain(&mut self, id: BlockId) -> Result<()> {
        let ref_count = self.meta(id)?.ref_count;
        if ref_count == 0 {
            self.unlink(id);
        }
        self.metas[id.index()].ref_count =
            ref_count.checked_add(1).ok_or(KvError::SizeOverflow {
                what: "block ref count",
            })?;
        Ok(())
    }

    /// Drops an owner; a block left with none goes to the back of the free queue, keeping its
    /// data and prefix key. Releasing a block that has no owner is an error, never a wrap.
    pub fn release(&mut self, id: BlockId) -> Result<()> {
        let meta = self.meta(id)?;
        if meta.ref_count == 0 {
            return Err(KvError::InvalidBlock(id));
        }
        let remaining = meta.ref_count - 1;
        self.metas[id.index()].ref_count = remaining;
        if remaining == 0 {
            self.push_back(id);
        }
        Ok(())
    }

    /// The block cached under `hash`, if any (whether owned or in the free queue).
    pub fn lookup(&self, hash: BlockHash) -> Option<BlockId> {
        self.cached.get(&hash).copied()
    }

    /// Registers a full, owned block under its prefix key. If the key is already mapped (another
    /// sequence computed the same prefix), the existing block stays the cached one and this block
    /// remains unregistered. Returns whether the block was registered.
    pub fn register(&mut self, id: BlockId, hash: BlockHash) -> Result<bool> {
        let meta = self.meta(id)?;
        if meta.ref_count == 0 {
            return Err(KvError::InvalidBlock(id));
        }
        if meta.hash.is_some() || self.cached.contains_key(&hash) {
            return Ok(false);
        }
        self.metas[id.index()].hash = Some(hash);
        self.cached.insert(hash, id);
        Ok(true)
    }

    /// The free queue from front (next to be handed out) to back. For tests and inspection.
    pub fn free_queue(&self) -> impl Iterator<Item = BlockId> + '_ {
        let mut cursor = self.head;
        std::iter::from_fn(move || {
            if cursor == NIL {
                return None;
            }
            let id = BlockId(cursor);
            cursor = self.metas[id.index()].next;
            Some(id)
        })
    }

    /// Entries of the prefix map. For tests and inspection.
    pub fn cached_entries(&self) -> impl Iterator<Item = (BlockHash, BlockId)> + '_ {
        self.cached.iter().map(|(h, id)| (*h, *id))
    }

    /// Counts blocks by state (scans the pool; for reports and tests, not hot paths).
    pub fn counts(&self) -> PoolCounts {
        let mut counts = PoolCounts {
            free: 0,
            cached: 0,
            owned: 0,
        };
        for meta in &self.metas {
            match (meta.ref_count, meta.hash) {
                (0, None) => counts.free += 1,
                (0, Some(_)) => counts.cached += 1,
                _ => counts.owned += 1,
            }
        }
        counts
    }

    /// Checks the pool's own invariants; returns a description of the first violation.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        let mut seen = vec![false; self.metas.len()];
        let mut prev = NIL;
        let mut walked = 0;
        for id in self.free_queue() {
            if std::mem::replace(&mut seen[id.index()], true) {
                return Err(format!("{id:?} appears twice in the free queue"));
            }
            let meta = &self.metas[id.index()];
            if meta.ref_count != 0 {
                return Err(format!(
                    "{id:?} is queued with ref count {}",
                    meta.ref_count
                ));
            }
            if meta.prev != prev {
                return Err(format!("{id:?} has a broken prev link"));
            }
            prev = id.0;
            walked += 1;
        }
        if prev != self.tail {
            return Err("tail does not end the queue".into());
        }
        if walked != self.queue_len {
            return Err(format!("queue_len {} but {walked} queued", self.queue_len));
        }
        for (i, meta) in self.metas.iter().enumerate() {
            if meta.ref_count == 0 && !seen[i] {
                return Err(format!("block {i} has no owner and is not queued"));
            }
            if let Some(hash) = meta.hash {
                if self.cached.get(&hash) != Some(&BlockId(i as u32)) {
                    return Err(format!(
                        "block {i} holds a key the map does not point back from"
                    ));
                }
            }
        }
        for (hash, id) in &self.cached {
            if self.metas[id.index()].hash != Some(*hash) {
                return Err(format!("map entry for {id:?} does not match its key"));
            }
        }
        let counts = self.counts();
        if counts.free + counts.cached + counts.owned != self.metas.len() {
            return Err("free + cached + owned != total".into());
        }
        Ok(())
    }

    fn meta(&self, id: BlockId) -> Result<&BlockMeta> {
        self.metas.get(id.index()).ok_or(KvError::InvalidBlock(id))
    }

    /// Removes a queued block from the free queue in O(1).
    fn unlink(&mut self, id: BlockId) {
        let BlockMeta { prev, next, .. } = self.metas[id.index()];
        debug_assert_eq!(
            self.metas[id.index()].ref_count,
            0,
            "unlinking an owned block"
        );
        if prev == NIL {
            self.head = next;
        } else {
            self.metas[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.metas[next as usize].prev = prev;
        }
        let meta = &mut self.metas[id.index()];
        meta.prev = NIL;
        meta.next = NIL;
        self.queue_len -= 1;
    }

    fn push_back(&mut self, id: BlockId) {
        let old_tail = self.tail;
        {
            let meta = &mut self.metas[id.index()];
            meta.prev = old_tail;
            meta.next = NIL;
        }
        if old_tail == NIL {
            self.head = id.0;
        } else {
            self.metas[old_tail as usize].next = id.0;
        }
        self.tail = id.0;
        self.queue_len += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefix::hash_block;

    fn queue(pool: &BlockPool) -> Vec<u32> {
        pool.free_queue().map(|b| b.0).collect()
    }

    #[test]
    fn allocation_pops_front_and_release_pushes_back() {
        let mut pool = BlockPool::new(4).unwrap();
        assert_eq!(queue(&pool), [0, 1, 2, 3]);
        let mut got = Vec::new();
        pool.allocate(2, &mut got).unwrap();
        assert_eq!(got, [BlockId(0), BlockId(1)]);
        assert_eq!(queue(&pool), [2, 3]);
        pool.release(BlockId(1)).unwrap();
        pool.release(BlockId(0)).unwrap();
        assert_eq!(queue(&pool), [2, 3, 1, 0]);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn out_of_blocks_changes_nothing() {
        let mut pool = BlockPool::new(3).unwrap();
        let mut got = Vec::new();
        pool.allocate(2, &mut got).unwrap();
        let before = queue(&pool);
        let mut more = Vec::new();
        assert_eq!(
            pool.allocate(2, &mut more),
            Err(KvError::OutOfBlocks { needed: 2, free: 1 })
        );
        assert!(more.is_empty());
        assert_eq!(queue(&pool), before);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn double_release_and_bad_ids_are_errors() {
        let mut pool = BlockPool::new(2).unwrap();
        let id = pool.allocate_one().unwrap();
        pool.release(id).unwrap();
        assert_eq!(pool.release(id), Err(KvError::InvalidBlock(id)));
        assert_eq!(
            pool.release(BlockId(7)),
            Err(KvError::InvalidBlock(BlockId(7)))
        );
        assert_eq!(
            pool.retain(BlockId(2)),
            Err(KvError::InvalidBlock(BlockId(2)))
        );
        assert!(BlockPool::new(0).is_err());
        pool.check_invariants().unwrap();
    }

    #[test]
    fn cached_block_is_reused_then_evicted_lazily() {
        let mut pool = BlockPool::new(2).unwrap();
        let extra = BlockHash::of_bytes(b"t");
        let hash = hash_block(None, extra, &[1, 2]);
        let a = pool.allocate_one().unwrap();
        assert!(pool.register(a, hash).unwrap());
        pool.release(a).unwrap();
        // still cached: a prefix hit takes it out of the middle of the queue
        assert_eq!(pool.lookup(hash), Some(a));
        pool.retain(a).unwrap();
        assert_eq!(queue(&pool), [1]);
        pool.release(a).unwrap();
        assert_eq!(queue(&pool), [1, 0]);
        // two allocations reach the cached block: its key is evicted
        pool.allocate_one().unwrap();
        pool.allocate_one().unwrap();
        assert_eq!(pool.lookup(hash), None);
        assert_eq!(pool.stats().evictions, 1);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn second_block_with_same_key_is_not_registered() {
        let mut pool = BlockPool::new(2).unwrap();
        let hash = hash_block(None, BlockHash::of_bytes(b"t"), &[3]);
        let a = pool.allocate_one().unwrap();
        let b = pool.allocate_one().unwrap();
        assert!(pool.register(a, hash).unwrap());
        assert!(!pool.register(b, hash).unwrap());
        assert_eq!(pool.lookup(hash), Some(a));
        pool.release(b).unwrap();
        pool.release(a).unwrap();
        pool.check_invariants().unwrap();
    }
}
