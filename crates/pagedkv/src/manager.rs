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
use std::time::Instant;

use crate::block::{BlockId, BlockPool, PoolCounts};
use crate::error::{KvError, Result};
use crate::eviction_log::EvictionLog;
use crate::layout::KvLayout;
use crate::prefix::{hash_block, BlockHash, CacheSalt, PrefixStats};
use crate::prefix_report::{MissReason, PrefixReport};
use crate::storage::KvStorage;
use crate::table::{BlockTable, SeqId};
use crate::tier::{payload, RemoteError, RemoteKey, RemoteStore, TierKey, TierLevel, TieredStore};

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

/// A block found below the pool: its key, its payload, and the tier it came from.
type FetchedBlock = (BlockHash, Vec<u8>, TierLevel);

/// Why a chain stopped in the shared store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RemoteStop {
    /// A key had no payload (or there is no store).
    Miss,
    /// A payload failed its checks.
    Damaged,
    /// The store did not answer.
    Unavailable,
}

/// A pinned prefix: its blocks are held (never evicted) until [`KvCacheManager::unpin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PinId(pub u64);

/// A sequence swapped out of the pool: what its block table held, and the tier keys of its
/// blocks' payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwappedOut {
    seq: SeqId,
    root: Option<BlockHash>,
    tokens: Vec<u32>,
    hashes: Vec<BlockHash>,
    keys: Vec<TierKey>,
    bytes: u64,
}

impl SwappedOut {
    /// The sequence.
    pub fn seq(&self) -> SeqId {
        self.seq
    }
    /// Payload bytes written to the tiers.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    /// Committed tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
}

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
        let (mut from_tier, mut damaged) = self.match_prefix_in_tier(prompt, hits.len(), parent)?;
        let mut unavailable = false;
        if !damaged {
            let matched = hits.len() + from_tier.len();
            let parent = from_tier.last().map(|t| t.0).or(parent);
            let (remote, stop) = self.match_prefix_in_remote(prompt, matched, parent, root);
            from_tier.extend(remote);
            damaged = stop == RemoteStop::Damaged;
            unavailable = stop == RemoteStop::Unavailable;
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
                MissReason::Damaged
            } else if unavailable {
                MissReason::StoreUnavailable
            } else {
                self.miss_reason(prompt, found, last_found)
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

    /// What `prompt` would find in the cache now, changing nothing (a dry run of admission:
    /// tier payloads are located, not read, so a damaged one shows only at admission).
    pub fn lookup_prefix(&mut self, prompt: &[u32], salt: Option<CacheSalt>) -> PrefixReport {
        let bs = self.layout.block_size();
        let root = CacheSalt::root(salt);
        let (hits, hashes) = self.match_prefix(prompt, root);
        let matchable = prompt.len().saturating_sub(1) / bs;
        let mut levels = Vec::new();
        let mut parent = hashes.last().copied().or(root);
        if let Some(store) = &self.prefix_tier {
            for chunk in prompt.chunks_exact(bs).take(matchable).skip(hits.len()) {
                let hash = hash_block(parent, self.extra, chunk);
                let Some(level) = store.locate(TierKey(hash.0)) else {
                    break;
                };
                levels.push(level);
                parent = Some(hash);
            }
        }
        let mut unavailable = false;
        let matched = hits.len() + levels.len();
        let keys = self.remote_keys(prompt, matched, parent, root);
        if let (Some(store), false) = (self.remote.as_mut(), keys.is_empty()) {
            match store.probe_run(&keys) {
                Ok(found) => {
                    levels.extend(std::iter::repeat_n(TierLevel::Remote, found));
                    parent = found
                        .checked_sub(1)
                        .map_or(parent, |i| Some(keys[i].prefix));
                }
                Err(RemoteError::Unavailable(_)) => unavailable = true,
            }
        }
        let found = hits.len() + levels.len();
        PrefixReport::new(bs, matchable, hits.len(), &levels, || {
            if unavailable {
                MissReason::StoreUnavailable
            } else {
                self.miss_reason(prompt, found, parent)
            }
        })
    }

    /// Shared-store keys of `prompt`'s cacheable blocks after the first `matched`, chained
    /// from `parent`.
    fn remote_keys(
        &self,
        prompt: &[u32],
        matched: usize,
        mut parent: Option<BlockHash>,
        root: Option<BlockHash>,
    ) -> Vec<RemoteKey> {
        let bs = self.layout.block_size();
        let matchable = prompt.len().saturating_sub(1) / bs;
        prompt
            .chunks_exact(bs)
            .take(matchable)
            .skip(matched)
            .map(|chunk| {
                let prefix = hash_block(parent, self.extra, chunk);
                parent = Some(prefix);
                RemoteKey { salt: root, prefix }
            })
            .collect()
    }

    /// Continues a chain of `matched` blocks in the shared store: the checked payloads of the
    /// following blocks, and why the run stopped. A damaged payload is deleted from the store.
    fn match_prefix_in_remote(
        &mut self,
        prompt: &[u32],
        matched: usize,
        parent: Option<BlockHash>,
        root: Option<BlockHash>,
    ) -> (Vec<FetchedBlock>, RemoteStop) {
        let keys = self.remote_keys(prompt, matched, parent, root);
        let Some(store) = self.remote.as_mut() else {
            return (Vec::new(), RemoteStop::Miss);
        };
        if keys.is_empty() {
            return (Vec::new(), RemoteStop::Miss);
        }
        let payloads = match store.fetch_run(&keys) {
            Ok(payloads) => payloads,
            Err(RemoteError::Unavailable(_)) => return (Vec::new(), RemoteStop::Unavailable),
        };
        let mut found = Vec::with_capacity(payloads.len());
        for (key, bytes) in keys.iter().zip(payloads) {
            let storage = &self.storage;
            let usable =
                payload::decode(&self.layout, &bytes, |kind| storage.block_image_bytes(kind))
                    .is_ok_and(|p| !p.kind.open && p.hash == Some(key.prefix));
            if !usable {
                store.delete(*key);
                return (found, RemoteStop::Damaged);
            }
            found.push((key.prefix, bytes, TierLevel::Remote));
        }
        (found, RemoteStop::Miss)
    }

    /// Offers sealed, registered blocks to the shared store, if there is one.
    fn publish(&mut self, blocks: &[(BlockId, BlockHash, Option<BlockHash>)]) -> Result<()> {
        let Some(store) = self.remote.as_mut() else {
            return Ok(());
        };
        let mut image = Vec::new();
        for (block, prefix, salt) in blocks {
            let kind = self.storage.export_block(*block, &mut image)?;
            if kind.open {
                continue;
            }
            let bytes = payload::encode(&self.layout, kind, Some(*prefix), &[], &image);
            store.publish(
                RemoteKey {
                    salt: *salt,
                    prefix: *prefix,
                },
                bytes,
            );
        }
        Ok(())
    }

    /// Why the chain of `prompt` stopped at block `missed` (its parent key `parent`): evicted
    /// (the log remembers the block's key) or no entry.
    fn miss_reason(&self, prompt: &[u32], missed: usize, parent: Option<BlockHash>) -> MissReason {
        let bs = self.layout.block_size();
        let Some(chunk) = prompt.chunks_exact(bs).nth(missed) else {
            return MissReason::NoEntry;
        };
        match self
            .eviction_log
            .evicted_at(hash_block(parent, self.extra, chunk))
        {
            Some(at) => MissReason::Evicted { ago: at.elapsed() },
            None => MissReason::NoEntry,
        }
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

    /// Drops the payloads of a swapped-out sequence that will not resume (cancelled).
    pub fn discard_swapped(&mut self, swapped: &SwappedOut, store: &mut TieredStore) -> Result<()> {
        for key in &swapped.keys {
            store.take(*key)?;
        }
        Ok(())
    }

    /// Writes the cached blocks the pool just evicted to the prefix tier, under their keys
    /// (their data is intact until the new owner writes); without a tier they are simply gone.
    fn demote_evicted(&mut self) -> Result<()> {
        let evicted = self.pool.take_evicted();
        if evicted.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let Some(store) = self.prefix_tier.as_mut() else {
            for (_, hash) in evicted {
                self.eviction_log.record(hash, now);
            }
            return Ok(());
        };
        let mut image = Vec::new();
        for (block, hash) in evicted {
            let kind = self.storage.export_block(block, &mut image)?;
            if kind.open {
                continue; // an open block stays in the pool's staging only
            }
            let bytes = payload::encode(&self.layout, kind, Some(hash), &[], &image);
            for dropped in store.put(TierKey(hash.0), bytes)? {
                self.tier_evictions += 1;
                self.eviction_log.record(BlockHash(dropped.0), now);
            }
        }
        Ok(())
    }

    /// Continues a prefix chain of `matched` blocks (last key `parent`) in the prefix tier:
    /// the payloads of the following blocks, checked, as long as they are found, and whether
    /// the chain stopped at a damaged payload.
    fn match_prefix_in_tier(
        &mut self,
        prompt: &[u32],
        matched: usize,
        mut parent: Option<BlockHash>,
    ) -> Result<(Vec<FetchedBlock>, bool)> {
        let Some(store) = self.prefix_tier.as_mut() else {
            return Ok((Vec::new(), false));
        };
        let bs = self.layout.block_size();
        let matchable = prompt.len().saturating_sub(1) / bs;
        let mut found = Vec::new();
        for chunk in prompt.chunks_exact(bs).take(matchable).skip(matched) {
            let hash = hash_block(parent, self.extra, chunk);
            let Some(level) = store.locate(TierKey(hash.0)) else {
                break;
            };
            let Some(bytes) = store.get(TierKey(hash.0))? else {
                break;
            };
            let storage = &self.storage;
            let usable =
                payload::decode(&self.layout, &bytes, |kind| storage.block_image_bytes(kind))
                    .is_ok_and(|p| !p.kind.open && p.hash == Some(hash));
            if !usable {
                // a damaged or foreign payload is dropped and the block recomputed
                store.take(TierKey(hash.0))?;
                return Ok((found, true));
            }
            found.push((hash, bytes, level));
            parent = Some(hash);
        }
        Ok((found, false))
    }

    /// Longest chain of cached blocks for the prompt's full blocks, excluding a block that would
    /// hold the prompt's last token.
    fn match_prefix(
        &self,
        prompt: &[u32],
        root: Option<BlockHash>,
    ) -> (Vec<BlockId>, Vec<BlockHash>) {
        let bs = self.layout.block_size();
        let matchable = prompt.len().saturating_sub(1) / bs;
        let mut blocks = Vec::new();
        let mut hashes = Vec::new();
        let mut parent = root;
        for chunk in prompt.chunks_exact(bs).take(matchable) {
            let hash = hash_block(parent, self.extra, chunk);
            match self.pool.lookup(hash) {
                Some(block) => {
                    blocks.push(block);
                    hashes.push(hash);
                    parent = Some(hash);
                }
                None => break,
            }
        }
        (blocks, hashes)
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

    /// Writes one token's K and V for one layer at position `pos`, which must be reserved and not
    /// yet committed (committed positions may be shared and are read-only).
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

    /// Registers `child` as a copy of `parent` sharing all its blocks (ref counts + 1). The first
    /// write either makes into a shared, partly filled block copies it first.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<()> {
        if self.seqs.contains_key(&child) {
            return Err(KvError::SequenceExists(child));
        }
        let mut table = self.table(parent)?.clone();
        for block in &table.blocks {
            self.pool.retain(*block)?;
        }
        table.reused = table.hashes.len();
        self.seqs.insert(child, table);
        Ok(())
    }

    /// Moves a sequence out of the pool (swap preemption): each block holding its tokens is
    /// written to `store` as a checked payload, then the sequence is freed (its full blocks stay
    /// in the prefix cache until evicted). If the store cannot keep every payload, nothing of
    /// the sequence is left in it and the sequence stays in the pool (error: the caller falls
    /// back to recompute).
    pub fn swap_out(&mut self, seq: SeqId, store: &mut TieredStore) -> Result<SwappedOut> {
        let table = self.table(seq)?.clone();
        let bs = self.layout.block_size();
        let used_blocks = self.layout.blocks_for_tokens(table.tokens.len());
        self.swap_nonce += 1;
        let mut keys = Vec::with_capacity(used_blocks);
        let mut image = Vec::new();
        let mut bytes = 0u64;
        for (i, block) in table.blocks.iter().take(used_blocks).enumerate() {
            let kind = self.storage.export_block(*block, &mut image)?;
            let end = ((i + 1) * bs).min(table.tokens.len());
            let payload = payload::encode(
                &self.layout,
                kind,
                table.hashes.get(i).copied(),
                &table.tokens[i * bs..end],
                &image,
            );
            bytes += payload.len() as u64;
            let mut name = self.swap_nonce.to_le_bytes().to_vec();
            name.extend_from_slice(&seq.0.to_le_bytes());
            name.extend_from_slice(&(i as u64).to_le_bytes());
            let key = TierKey(BlockHash::of_bytes(&name).0);
            let dropped = store.put(key, payload)?;
            keys.push(key);
            if dropped.iter().any(|d| keys.contains(d)) {
                for key in &keys {
                    store.take(*key)?;
                }
                return Err(KvError::OutOfBlocks {
                    needed: used_blocks,
                    free: i,
                });
            }
        }
        self.free(seq)?;
        Ok(SwappedOut {
            seq,
            root: table.root,
            tokens: table.tokens,
            hashes: table.hashes,
            keys,
            bytes,
        })
    }

    /// Brings a swapped-out sequence back: every payload is read and checked first, then blocks
    /// still in the prefix cache are shared and the others allocated and filled bit for bit.
    /// All or nothing: `OutOfBlocks` (or a refused payload) leaves pool and store unchanged.
    pub fn swap_in(&mut self, swapped: &SwappedOut, store: &mut TieredStore) -> Result<()> {
        let seq = swapped.seq;
        if self.seqs.contains_key(&seq) {
            return Err(KvError::SequenceExists(seq));
        }
        let bs = self.layout.block_size();
        let mut payloads = Vec::with_capacity(swapped.keys.len());
        for (index, key) in swapped.keys.iter().enumerate() {
            let bytes = store
                .get(*key)?
                .ok_or(KvError::SwappedBlockMissing { seq, index })?;
            payloads.push(bytes);
        }
        let mut decoded = Vec::with_capacity(payloads.len());
        for (i, bytes) in payloads.iter().enumerate() {
            let storage = &self.storage;
            let block =
                payload::decode(&self.layout, bytes, |kind| storage.block_image_bytes(kind))?;
            let end = ((i + 1) * bs).min(swapped.tokens.len());
            if block.tokens != swapped.tokens[i * bs..end]
                || block.hash != swapped.hashes.get(i).copied()
            {
                return Err(payload::PayloadError::Malformed(
                    "payload does not belong to this sequence",
                )
                .into());
            }
            decoded.push(block);
        }
        // cached full blocks are shared; an idle one leaves the free queue like a fresh one
        let hits: Vec<Option<BlockId>> = decoded
            .iter()
            .map(|b| b.hash.and_then(|h| self.pool.lookup(h)))
            .collect();
        let needed = hits
            .iter()
            .filter(|h| h.is_none_or(|b| self.pool.ref_count(b) == Ok(0)))
            .count();
        if needed > self.pool.num_available() {
            return Err(KvError::OutOfBlocks {
                needed,
                free: self.pool.num_available(),
            });
        }
        let mut blocks = Vec::with_capacity(decoded.len());
        for (block, hit) in decoded.iter().zip(&hits) {
            match hit {
                Some(b) => {
                    self.pool.retain(*b)?;
                    blocks.push(*b);
                }
                None => {
                    let b = self.pool.allocate_one()?;
                    self.demote_evicted()?;
                    self.storage.import_block(b, block.kind, block.image)?;
                    if let Some(h) = block.hash {
                        self.pool.register(b, h)?;
                    }
                    blocks.push(b);
                }
            }
        }
        self.seqs.insert(
            seq,
            BlockTable {
                blocks,
                tokens: swapped.tokens.clone(),
                hashes: swapped.hashes.clone(),
                root: swapped.root,
                reused: swapped.hashes.len(),
            },
        );
        for key in &swapped.keys {
            store.take(*key)?;
        }
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

    /// Checks the manager's invariants (pool structure, ref count = number of tables holding the
    /// block, table shapes, prefix keys of committed blocks); the first violation is returned.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.pool.check_invariants()?;
        let bs = self.layout.block_size();
        let mut holders = vec![0u32; self.pool.num_blocks()];
        for (id, table) in &self.seqs {
            if table.blocks.len() * bs < table.tokens.len() {
                return Err(format!("{id:?} has more tokens than block capacity"));
            }
            if table.hashes.len() != table.tokens.len() / bs {
                return Err(format!(
                    "{id:?} has {} keys for {} tokens",
                    table.hashes.len(),
                    table.tokens.len()
                ));
            }
            let keys = self.chain_from(table.root, &table.tokens[..table.hashes.len() * bs]);
            if keys.last() != table.hashes.last() {
                return Err(format!("{id:?} has a stale prefix key"));
            }
            for block in &table.blocks {
                holders[block.index()] += 1;
            }
        }
        for blocks in self.pins.values() {
            for block in blocks {
                holders[block.index()] += 1;
            }
        }
        for i in 0..self.pool.num_blocks() {
            let block = BlockId(i as u32);
            if self.storage.is_open(block)
                && self.pool.ref_count(block) == Ok(0)
                && self.pool.block_hash(block) == Ok(None)
            {
                return Err(format!(
                    "block {i} holds staging but has no owner and no key"
                ));
            }
        }
        for (i, holders) in holders.iter().enumerate() {
            let refs = self
                .pool
                .ref_count(BlockId(i as u32))
                .map_err(|e| e.to_string())?;
            if refs != *holders {
                return Err(format!(
                    "block {i}: ref count {refs} but {holders} tables hold it"
                ));
            }
        }
        Ok(())
    }
}
