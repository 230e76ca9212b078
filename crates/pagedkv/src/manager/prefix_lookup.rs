//! Finding a prompt's cached prefix: the pool's prefix cache, then the local tiers, then the
//! shared store; publishing sealed blocks; explaining where a chain stopped.

use std::time::Instant;

use super::KvCacheManager;
use crate::block::BlockId;
use crate::error::Result;
use crate::prefix::{hash_block, BlockHash, CacheSalt};
use crate::prefix_report::{MissReason, PrefixReport};
use crate::tier::{payload, RemoteError, RemoteKey, RunCut, TierKey, TierLevel};

/// A block found below the pool: its key, its payload, and the tier it came from.
pub(super) type FetchedBlock = (BlockHash, Vec<u8>, TierLevel);

/// Why a chain stopped in the shared store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RemoteStop {
    /// A key had no payload (or there is no store).
    Miss,
    /// A payload failed its checks.
    Damaged,
    /// The store did not answer.
    Unavailable,
    /// The fetch's time budget ran out.
    OutOfTime,
}

impl KvCacheManager {
    /// What `prompt` would find in the cache now, changing nothing (a dry run of admission:
    /// tier payloads are located, not read, so a damaged one, or a fetch cut by the shared
    /// tier's time budget, shows only at admission).
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
    pub(super) fn remote_keys(
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
    pub(super) fn match_prefix_in_remote(
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
        let run = match store.fetch_run(&keys) {
            Ok(run) => run,
            Err(RemoteError::Unavailable(_)) => return (Vec::new(), RemoteStop::Unavailable),
        };
        let mut found = Vec::with_capacity(run.payloads.len());
        for (key, bytes) in keys.iter().zip(run.payloads) {
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
        let stop = match run.cut {
            None | Some(RunCut::Missing) => RemoteStop::Miss,
            Some(RunCut::Unavailable) => RemoteStop::Unavailable,
            Some(RunCut::OutOfTime) => RemoteStop::OutOfTime,
        };
        (found, stop)
    }

    /// Offers sealed, registered blocks to the shared store, if there is one.
    pub(super) fn publish(
        &mut self,
        blocks: &[(BlockId, BlockHash, Option<BlockHash>)],
    ) -> Result<()> {
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
    pub(super) fn miss_reason(
        &self,
        prompt: &[u32],
        missed: usize,
        parent: Option<BlockHash>,
    ) -> MissReason {
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

    /// Writes the cached blocks the pool just evicted to the prefix tier, under their keys
    /// (their data is intact until the new owner writes); without a tier they are simply gone.
    pub(super) fn demote_evicted(&mut self) -> Result<()> {
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
    pub(super) fn match_prefix_in_tier(
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
                    .is_ok_and(|p| !p.kind.open && storage.holds(p.kind) && p.hash == Some(hash));
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
    pub(super) fn match_prefix(
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
}
