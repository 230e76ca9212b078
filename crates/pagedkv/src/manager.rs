//! The cache manager: block pool + prefix cache + block tables + storage (DESIGN §3–4).
//!
//! A step of a sequence goes through three calls, each all-or-nothing:
//! 1. [`KvCacheManager::reserve`] makes room for `n` more tokens (new blocks, and a private copy
//!    of a shared, partly filled last block: copy-on-write);
//! 2. [`KvCacheManager::write_token`] stores each layer's K and V at the new positions;
//! 3. [`KvCacheManager::commit`] records their token ids; every block that becomes full gets its
//!    chained prefix key and is offered to the prefix cache.
//!
//! A new request starts with [`KvCacheManager::admit`], which takes the longest chain of cached
//! blocks for its prompt and reserves the rest under the admission watermark.

use std::collections::HashMap;

use crate::block::{BlockId, BlockPool, PoolCounts};
use crate::error::{KvError, Result};
use crate::eviction_log::EvictionLog;
use crate::layout::KvLayout;
use crate::prefix::{hash_block, BlockHash, CacheSalt, PrefixStats};
use crate::prefix_report::{MissReason, PrefixReport};
use crate::storage::KvStorage;
use crate::table::{BlockTable, SeqId};
use crate::tier::{payload, RemoteStore, TierLevel, TieredStore};

mod invariants;
mod prefix_lookup;
mod swap;

use prefix_lookup::RemoteStop;
pub use swap::SwappedOut;

/// Prefix keys remembered after they leave the cache, to explain misses as evictions.
const EVICTION_LOG_KEYS: usize = 1 << 16;

/// Result of admitting a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Leading prompt tokens whose K/V came from the prefix cache (already committed).
    pub cached_tokens: usize,
    /// Where they came from, and why the chain stopped.
    pub report: PrefixReport,
}

/// A pinned prefix: its blocks are held (never evicted) until [`KvCacheManager::unpin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PinId(pub u64);

/// Owns every block of one cache and the sequences using them.
#[derive(Debug)]
pub struct KvCacheManager {
    layout: KvLayout,
    pool: BlockPool,
    storage: KvStorage,
    seqs: HashMap<SeqId, BlockTable>,
    extra: BlockHash,
    watermark_blocks: usize,
    /// Distinguishes the payload keys of successive swaps of one sequence.
    swap_nonce: u64,
    /// Where evicted prefix blocks go, to be found again by later prompts.
    prefix_tier: Option<TieredStore>,
    /// A store shared with other engines: sealed blocks are published there, and prompts
    /// continue their chains there once the local tiers stop matching.
    remote: Option<Box<dyn RemoteStore>>,
    /// Keys that left the cache altogether (explains misses).
    eviction_log: EvictionLog,
    /// Payloads the prefix tier dropped altogether.
    tier_evictions: u64,
    /// Blocks held by each pin.
    pins: HashMap<PinId, Vec<BlockId>>,
    /// How many pins hold each pinned block.
    pinned: HashMap<BlockId, u32>,
    next_pin: u64,
}

impl KvCacheManager {
    /// A cache of `num_blocks` blocks. `extra` names whatever besides tokens and layout changes
    /// the stored K/V (the model, usually); the layout's codecs are always part of the key.
    pub fn new(layout: KvLayout, num_blocks: usize, extra: &[u8]) -> Result<Self> {
        let mut pool = BlockPool::new(num_blocks)?;
        // evicted keys are always taken: to demote them to a tier, or into the eviction log
        pool.record_evictions(true);
        let mut key = layout.digest_bytes();
        let storage = KvStorage::new(layout.clone(), num_blocks)?;
        key.push(0);
        key.extend_from_slice(extra);
        Ok(Self {
            layout,
            pool,
            storage,
            seqs: HashMap::new(),
            extra: BlockHash::of_bytes(&key),
            watermark_blocks: 0,
            swap_nonce: 0,
            prefix_tier: None,
            remote: None,
            eviction_log: EvictionLog::new(EVICTION_LOG_KEYS),
            tier_evictions: 0,
            pins: HashMap::new(),
            pinned: HashMap::new(),
            next_pin: 0,
        })
    }

    /// A cache holding as many blocks as fit in `budget_bytes` for this layout.
    pub fn with_budget(layout: KvLayout, budget_bytes: u64, extra: &[u8]) -> Result<Self> {
        let blocks = layout.blocks_in_budget(budget_bytes);
        let blocks = usize::try_from(blocks).map_err(|_| KvError::SizeOverflow {
            what: "block count",
        })?;
        Self::new(layout, blocks, extra)
    }

    /// Gives the prefix cache a lower tier: a cached block evicted from the pool is written
    /// there under its prefix key, and a later prompt whose chain continues past the pool's
    /// blocks brings it back instead of recomputing it.
    pub fn set_prefix_tier(&mut self, store: TieredStore) {
        self.prefix_tier = Some(store);
    }

    /// Gives the cache a store shared with other engines (DESIGN §12): every block sealed
    /// from now on is offered to it, and admission continues a prompt's chain there.
    pub fn set_remote_store(&mut self, store: Box<dyn RemoteStore>) {
        self.remote = Some(store);
    }

    /// The prefix cache's lower tier, if any.
    pub fn prefix_tier(&self) -> Option<&TieredStore> {
        self.prefix_tier.as_ref()
    }

    /// Blocks kept in reserve at admission so running sequences can still grow.
    pub fn set_watermark_blocks(&mut self, blocks: usize) {
        self.watermark_blocks = blocks;
    }

    /// The cache's layout.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }
    /// The block pool (read-only view).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }
    /// The K/V arenas, for attention kernels.
    pub fn storage(&self) -> &KvStorage {
        &self.storage
    }
    /// Prefix-cache counters.
    pub fn prefix_stats(&self) -> PrefixStats {
        self.pool.stats()
    }
    /// Blocks by state.
    pub fn counts(&self) -> PoolCounts {
        self.pool.counts()
    }
    /// Free plus evictable blocks.
    pub fn num_available_blocks(&self) -> usize {
        self.pool.num_available()
    }
    /// Registered sequences.
    pub fn sequences(&self) -> impl Iterator<Item = (SeqId, &BlockTable)> {
        self.seqs.iter().map(|(id, t)| (*id, t))
    }
    /// The block table of a sequence.
    pub fn table(&self, seq: SeqId) -> Result<&BlockTable> {
        self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))
    }
    /// Payloads the prefix tier dropped altogether (beyond its capacity).
    pub fn tier_evictions(&self) -> u64 {
        self.tier_evictions
    }
    /// Blocks held by pins.
    pub fn pinned_blocks(&self) -> usize {
        self.pinned.len()
    }

    /// Prefix key of a chain of full blocks, as the cache computes it (for tests and tiers).
    pub fn prefix_key(&self, tokens: &[u32]) -> Option<BlockHash> {
        self.prefix_keys_salted(tokens, None).last().copied()
    }

    /// Chained prefix keys of every full block of `tokens`, as the cache computes them.
    pub fn prefix_keys(&self, tokens: &[u32]) -> Vec<BlockHash> {
        self.prefix_keys_salted(tokens, None)
    }

    /// Chained prefix keys of every full block of `tokens` under a tenant's salt.
    pub fn prefix_keys_salted(&self, tokens: &[u32], salt: Option<CacheSalt>) -> Vec<BlockHash> {
        self.chain_from(CacheSalt::root(salt), tokens)
    }

    fn chain_from(&self, root: Option<BlockHash>, tokens: &[u32]) -> Vec<BlockHash> {
        let mut parent = root;
        tokens
            .chunks_exact(self.layout.block_size())
            .map(|block| {
                let key = hash_block(parent, self.extra, block);
                parent = Some(key);
                key
            })
            .collect()
    }

    /// Whether a block with this prefix key is in the prefix cache.
    pub fn is_cached(&self, key: BlockHash) -> bool {
        self.pool.lookup(key).is_some()
    }

    /// Blocks the free queue would have to supply to admit `prompt` (prefix hits excluded, but
    /// hits on blocks with no owner counted, since taking them removes them from the queue).
    pub fn blocks_to_admit(&self, prompt: &[u32]) -> usize {
        self.blocks_to_admit_salted(prompt, None)
    }

    /// [`blocks_to_admit`](Self::blocks_to_admit) under a tenant's salt.
    pub fn blocks_to_admit_salted(&self, prompt: &[u32], salt: Option<CacheSalt>) -> usize {
        self.queue_demand(prompt, &self.match_prefix(prompt, CacheSalt::root(salt)).0)
    }

    fn queue_demand(&self, prompt: &[u32], hits: &[BlockId]) -> usize {
        let idle_hits = hits
            .iter()
            .filter(|b| self.pool.ref_count(**b) == Ok(0))
            .count();
        self.layout.blocks_for_tokens(prompt.len()) - hits.len() + idle_hits
    }

    /// Whether `prompt` would be admitted now (its blocks plus the watermark fit).
    pub fn can_admit(&self, prompt: &[u32]) -> bool {
        self.can_admit_salted(prompt, None)
    }

    /// [`can_admit`](Self::can_admit) under a tenant's salt.
    pub fn can_admit_salted(&self, prompt: &[u32], salt: Option<CacheSalt>) -> bool {
        self.blocks_to_admit_salted(prompt, salt) + self.watermark_blocks
            <= self.pool.num_available()
    }

    /// Registers a new sequence for `prompt`: takes the longest chain of cached full blocks (at
    /// most up to the prompt's last token, which is always computed so the model has logits) and
    /// reserves blocks for the rest. Refused with `OutOfBlocks` (changing nothing) unless the
    /// blocks plus the watermark fit.
    pub fn admit(&mut self, seq: SeqId, prompt: &[u32]) -> Result<Admission> {
        self.admit_salted(seq, prompt, None)
    }

    /// [`admit`](Self::admit) under a tenant's salt: the sequence finds and leaves blocks only
    /// under keys chained from the salt.
    pub fn admit_salted(
        &mut self,
        seq: SeqId,
        prompt: &[u32],
        salt: Option<CacheSalt>,
    ) -> Result<Admission> {
        if self.seqs.contains_key(&seq) {
            return Err(KvError::SequenceExists(seq));
        }
        if prompt.is_empty() {
            return Err(KvError::EmptyPrompt(seq));
        }
        let root = CacheSalt::root(salt);
        let (hits, hashes) = self.match_prefix(prompt, root);
        let needed = self.queue_demand(prompt, &hits) + self.watermark_blocks;
        if needed > self.pool.num_available() {
            return Err(KvError::OutOfBlocks {
                needed,
                free: self.pool.num_available(),
            });
        }
        let bs = self.layout.block_size();
        // the chain may continue in the prefix tier: those blocks come back instead of being
        // recomputed (they take fresh blocks, so the demand above already counts them)
        let parent = hashes.last().copied().or(root);
        let (mut from_tier, damaged) = self.match_prefix_in_tier(prompt, hits.len(), parent)?;
        let mut remote_stop = RemoteStop::Miss;
        if !damaged {
            let matched = hits.len() + from_tier.len();
            let parent = from_tier.last().map(|t| t.0).or(parent);
            let (remote, stop) = self.match_prefix_in_remote(prompt, matched, parent, root);
            from_tier.extend(remote);
            remote_stop = stop;
        }
        let found = hits.len() + from_tier.len();
        let matchable = (prompt.len() - 1) / bs;
        self.pool
            .record_lookups(found as u64, (matchable - found) as u64);
        let pool_hits = hits.len();
        let levels: Vec<TierLevel> = from_tier.iter().map(|t| t.2).collect();
        let last_found = from_tier.last().map(|t| t.0).or(parent);
        let report = PrefixReport::new(bs, matchable, pool_hits, &levels, || {
            if damaged {
                return MissReason::Damaged;
            }
            match remote_stop {
                RemoteStop::Damaged => MissReason::Damaged,
                RemoteStop::Unavailable => MissReason::StoreUnavailable,
                RemoteStop::OutOfTime => MissReason::StoreTimedOut,
                RemoteStop::Miss => self.miss_reason(prompt, found, last_found),
            }
        });
        for block in &hits {
            self.pool.retain(*block)?;
        }
        let mut table = BlockTable {
            blocks: hits,
            tokens: prompt[..pool_hits * bs].to_vec(),
            hashes,
            root,
            reused: 0,
        };
        let fresh = self.layout.blocks_for_tokens(prompt.len()) - table.blocks.len();
        self.pool.allocate(fresh, &mut table.blocks)?;
        self.demote_evicted()?;
        for (i, (hash, bytes, _)) in from_tier.iter().enumerate() {
            let block = table.blocks[pool_hits + i];
            let storage = &self.storage;
            let decoded =
                payload::decode(&self.layout, bytes, |kind| storage.block_image_bytes(kind))?;
            self.storage
                .import_block(block, decoded.kind, decoded.image)?;
            self.pool.register(block, *hash)?;
            table.hashes.push(*hash);
            let at = (pool_hits + i) * bs;
            table.tokens.extend_from_slice(&prompt[at..at + bs]);
        }
        table.reused = found;
        self.seqs.insert(seq, table);
        Ok(Admission {
            cached_tokens: found * bs,
            report,
        })
    }

    /// Holds the pool's cached blocks of `prompt`'s chain (every full block found, in order) so
    /// they are never evicted until [`unpin`](Self::unpin). Returns the pin and its tokens.
    pub fn pin_prefix(
        &mut self,
        prompt: &[u32],
        salt: Option<CacheSalt>,
    ) -> Result<(PinId, usize)> {
        let bs = self.layout.block_size();
        let mut blocks = Vec::new();
        for hash in self.prefix_keys_salted(prompt, salt) {
            match self.pool.lookup(hash) {
                Some(block) => blocks.push(block),
                None => break,
            }
        }
        for block in &blocks {
            self.pool.retain(*block)?;
            *self.pinned.entry(*block).or_insert(0) += 1;
        }
        let id = PinId(self.next_pin);
        self.next_pin += 1;
        let tokens = blocks.len() * bs;
        self.pins.insert(id, blocks);
        Ok((id, tokens))
    }

    /// Releases a pin's blocks (they stay cached until evicted as usual).
    pub fn unpin(&mut self, pin: PinId) -> Result<()> {
        let blocks = self.pins.remove(&pin).ok_or(KvError::UnknownPin(pin.0))?;
        for block in blocks.iter().rev() {
            self.pool.release(*block)?;
            if let Some(count) = self.pinned.get_mut(block) {
                *count -= 1;
                if *count == 0 {
                    self.pinned.remove(block);
                }
            }
        }
        Ok(())
    }

    /// Makes room for `n` more tokens after the committed ones: allocates blocks as needed and,
    /// if the partly filled last block is shared, replaces it by a private copy (all layers).
    pub fn reserve(&mut self, seq: SeqId, n: usize) -> Result<()> {
        let bs = self.layout.block_size();
        let table = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        let target = table
            .tokens
            .len()
            .checked_add(n)
            .ok_or(KvError::SizeOverflow {
                what: "sequence length",
            })?;
        let grow = self
            .layout
            .blocks_for_tokens(target)
            .saturating_sub(table.blocks.len());
        let open_slot = table.tokens.len() % bs;
        let shared_tail = if n > 0 && open_slot != 0 {
            let tail = table.blocks[table.tokens.len() / bs];
            (self.pool.ref_count(tail)? > 1).then_some(tail)
        } else {
            None
        };
        let needed = grow + usize::from(shared_tail.is_some());
        if needed > self.pool.num_available() {
            return Err(KvError::OutOfBlocks {
                needed,
                free: self.pool.num_available(),
            });
        }
        if let Some(shared) = shared_tail {
            let copy = self.pool.allocate_one()?;
            self.demote_evicted()?;
            self.storage.copy_block(shared, copy)?;
            self.pool.release(shared)?;
            let table = self
                .seqs
                .get_mut(&seq)
                .ok_or(KvError::UnknownSequence(seq))?;
            let idx = table.tokens.len() / bs;
            table.blocks[idx] = copy;
        }
        let table = self
            .seqs
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        self.pool.allocate(grow, &mut table.blocks)?;
        self.demote_evicted()?;
        Ok(())
    }

    /// `SharedBlockWrite` if another sequence holds `block` (a fork shared it; a `reserve` copies
    /// it): rows are written and committed only into blocks of one sequence.
    fn check_unshared(pool: &BlockPool, seq: SeqId, block: BlockId) -> Result<()> {
        if pool.ref_count(block)? > 1 {
            return Err(KvError::SharedBlockWrite { seq, block });
        }
        Ok(())
    }

    /// Writes one token's K and V for one layer at position `pos`, which must be reserved and not
    /// yet committed (committed positions may be shared and are read-only), in a block no other
    /// sequence holds (after a fork, `reserve` again first).
    pub fn write_token(
        &mut self,
        seq: SeqId,
        layer: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let table = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        let bs = self.layout.block_size();
        let capacity = table.blocks.len() * bs;
        if pos < table.tokens.len() || pos >= capacity {
            return Err(KvError::PositionNotWritable {
                seq,
                pos,
                committed: table.tokens.len(),
                capacity,
            });
        }
        if !k.iter().chain(v).all(|x| x.is_finite()) {
            return Err(KvError::NonFinite { what: "K/V row" });
        }
        let block = table.blocks[pos / bs];
        Self::check_unshared(&self.pool, seq, block)?;
        self.storage.write_token(layer, block, pos % bs, k, v)
    }

    /// Reads one committed or written token's K and V back as f32 (for tests and inspection).
    pub fn read_token(
        &self,
        seq: SeqId,
        layer: usize,
        pos: usize,
        k: &mut [f32],
        v: &mut [f32],
    ) -> Result<()> {
        let table = self.table(seq)?;
        let bs = self.layout.block_size();
        let limit = table.blocks.len() * bs;
        if pos >= limit {
            return Err(KvError::IndexOutOfRange {
                what: "position",
                index: pos,
                limit,
            });
        }
        self.storage
            .read_token(layer, table.blocks[pos / bs], pos, k, v)
    }

    /// Records the token ids of the next `tokens.len()` written positions. Blocks that become full
    /// get their chained prefix key and are offered to the prefix cache.
    pub fn commit(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        let bs = self.layout.block_size();
        let table = self
            .seqs
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        let capacity = table.blocks.len() * bs;
        let end = table.tokens.len() + tokens.len();
        if end > capacity {
            return Err(KvError::PositionNotWritable {
                seq,
                pos: end - 1,
                committed: table.tokens.len(),
                capacity,
            });
        }
        // rows written before a fork are the parent's until its next `reserve` copies the block
        if !tokens.is_empty() {
            let first = table.tokens.len() / bs;
            for block in &table.blocks[first..end.div_ceil(bs)] {
                Self::check_unshared(&self.pool, seq, *block)?;
            }
        }
        table.tokens.extend_from_slice(tokens);
        let mut sealed = Vec::new();
        for block_idx in table.hashes.len()..table.tokens.len() / bs {
            let parent = table.hashes.last().copied().or(table.root);
            let hash = hash_block(
                parent,
                self.extra,
                &table.tokens[block_idx * bs..(block_idx + 1) * bs],
            );
            table.hashes.push(hash);
            self.pool.register(table.blocks[block_idx], hash)?;
            // a full block is sealed — encoded once with the layout's codecs — when it leaves
            // the recent window (a first block keeps its sink rows in f16 beside its pages)
            if let Some(old) = block_idx.checked_sub(self.layout.recent_blocks()) {
                self.storage.seal(table.blocks[old], old * bs)?;
                if old >= table.reused {
                    sealed.push((table.blocks[old], table.hashes[old], table.root));
                }
            }
        }
        self.publish_registered(sealed)
    }

    /// Publishes the blocks that are the cached ones for their keys (a block that computed a
    /// prefix another block already holds stays private: the other was published).
    fn publish_registered(
        &mut self,
        mut sealed: Vec<(BlockId, BlockHash, Option<BlockHash>)>,
    ) -> Result<()> {
        if self.remote.is_none() {
            return Ok(());
        }
        sealed.retain(|(block, hash, _)| self.pool.block_hash(*block) == Ok(Some(*hash)));
        self.publish(&sealed)
    }

    /// Registers `child` as a copy of `parent` sharing the blocks that hold its committed tokens
    /// (ref counts + 1); blocks the parent reserved beyond them stay the parent's. A partly
    /// filled block is shared, with any slots the parent reserved in it: either sequence's
    /// next `reserve` (of at least one token) copies it, and until then writing or committing
    /// into it is an error ([`KvError::SharedBlockWrite`]).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<()> {
        if self.seqs.contains_key(&child) {
            return Err(KvError::SequenceExists(child));
        }
        let mut table = self.table(parent)?.clone();
        let holding = self.layout.blocks_for_tokens(table.tokens.len());
        table.blocks.truncate(holding);
        for block in &table.blocks {
            self.pool.retain(*block)?;
        }
        table.reused = table.hashes.len();
        self.seqs.insert(child, table);
        Ok(())
    }

    /// Removes a sequence and releases its blocks, tail first, so that the head of a shared
    /// prefix is the last to be evicted.
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        // full blocks still in the recent window are sealed before they join the prefix cache
        let table = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        let bs = self.layout.block_size();
        let full = table.tokens.len() / bs;
        let first = full.saturating_sub(self.layout.recent_blocks());
        let mut sealed = Vec::new();
        // (the recent window's blocks: commit has not sealed, so not published, them)
        for i in first..full {
            self.storage.seal(table.blocks[i], i * bs)?;
            if i >= table.reused {
                sealed.push((table.blocks[i], table.hashes[i], table.root));
            }
        }
        self.publish_registered(sealed)?;
        let table = self
            .seqs
            .remove(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        for block in table.blocks.iter().rev() {
            self.pool.release(*block)?;
            // a partial block never enters the prefix cache: its staging can go now
            if self.pool.ref_count(*block)? == 0 && self.pool.block_hash(*block)?.is_none() {
                self.storage.discard(*block);
            }
        }
        Ok(())
    }
}
