//! Preemption by swap: a sequence's blocks written to the tiers and read back.

use super::KvCacheManager;
use crate::block::BlockId;
use crate::error::{KvError, Result};
use crate::prefix::BlockHash;
use crate::table::{BlockTable, SeqId};
use crate::tier::{payload, TierKey, TieredStore};

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

impl KvCacheManager {
    /// Drops the payloads of a swapped-out sequence that will not resume (cancelled).
    pub fn discard_swapped(&mut self, swapped: &SwappedOut, store: &mut TieredStore) -> Result<()> {
        for key in &swapped.keys {
            store.take(*key)?;
        }
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
    /// All or nothing: after `OutOfBlocks` or a refused payload (also an image of a kind the
    /// layout cannot hold) nothing has changed; after a tier's failure while evicted blocks
    /// are demoted, no sequence holds the blocks it took and the store keeps every payload.
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
            if !self.storage.holds(block.kind) {
                return Err(payload::PayloadError::Malformed(
                    "block image of a kind this layout cannot hold",
                )
                .into());
            }
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
        // every hit is held before anything is allocated: an idle hit is still in the free
        // queue, and allocating first could evict it and hand its slot to another block
        for b in hits.iter().flatten() {
            self.pool.retain(*b)?;
        }
        let mut blocks = Vec::with_capacity(decoded.len());
        if let Err(e) = self.fill_swapped_in(&decoded, &hits, &mut blocks) {
            // (images were checked above: what fails here is a tier, while evicted blocks are
            // demoted) give back what was held and allocated, tail first as `free` does; the
            // new blocks have no key yet, so their staging goes
            for i in (0..hits.len()).rev() {
                let Some(b) = hits[i].or_else(|| blocks.get(i).copied()) else {
                    continue;
                };
                self.pool.release(b)?;
                if self.pool.ref_count(b)? == 0 && self.pool.block_hash(b)?.is_none() {
                    self.storage.discard(b);
                }
            }
            return Err(e);
        }
        // keys last: a block is offered to the prefix cache only once every image is in
        for ((block, hit), b) in decoded.iter().zip(&hits).zip(&blocks) {
            if let (None, Some(h)) = (hit, block.hash) {
                self.pool.register(*b, h)?;
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

    /// Swap-in's second half: the hits in order, and a fresh block for each miss, filled with
    /// its image (not yet registered). On failure `blocks` holds the blocks shared or allocated
    /// so far.
    fn fill_swapped_in(
        &mut self,
        decoded: &[payload::BlockPayload<'_>],
        hits: &[Option<BlockId>],
        blocks: &mut Vec<BlockId>,
    ) -> Result<()> {
        for (block, hit) in decoded.iter().zip(hits) {
            match hit {
                Some(b) => blocks.push(*b),
                None => {
                    let b = self.pool.allocate_one()?;
                    blocks.push(b);
                    self.demote_evicted()?;
                    self.storage.import_block(b, block.kind, block.image)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ImageKind;
    use crate::{Codec, KvLayout, LayoutSpec};

    #[test]
    fn an_image_the_layout_cannot_hold_is_refused_before_anything_changes() {
        let mut spec = LayoutSpec::new(2, 2, 4, 32, Codec::Int8);
        spec.block_size = 4;
        let mut m = KvCacheManager::new(KvLayout::new(spec).unwrap(), 8, b"swap-refused").unwrap();
        // six tokens: a sealed, cached block (a hit on swap-in) and an open one (imported)
        let (seq, tokens) = (SeqId(1), (0..6).collect::<Vec<u32>>());
        m.admit(seq, &tokens[..1]).unwrap();
        m.reserve(seq, tokens.len() - 1).unwrap();
        let width = m.layout().token_width();
        for pos in 0..tokens.len() {
            for layer in 0..2 {
                let (k, v) = (vec![0.5 + pos as f32; width], vec![-0.25; width]);
                m.write_token(seq, layer, pos, &k, &v).unwrap();
            }
        }
        m.commit(seq, &tokens).unwrap();
        let mut store = TieredStore::in_memory(1 << 30);
        let swapped = m.swap_out(seq, &mut store).unwrap();
        let available = m.num_available_blocks();
        // the open block's payload, re-encoded as an image no storage takes: open, with sinks
        let key = *swapped.keys.last().unwrap();
        let good = store.get(key).unwrap().unwrap();
        let storage = m.storage();
        let open = payload::decode(m.layout(), &good, |k| storage.block_image_bytes(k)).unwrap();
        let kind = ImageKind {
            open: true,
            sinks: true,
        };
        let bad = payload::encode(m.layout(), kind, open.hash, &open.tokens, open.image);
        store.put(key, bad).unwrap();
        assert!(matches!(
            m.swap_in(&swapped, &mut store),
            Err(KvError::Payload(_))
        ));
        assert!(m.table(seq).is_err());
        assert_eq!(m.num_available_blocks(), available, "nothing taken");
        m.check_invariants().unwrap();
        assert_eq!(m.storage().open_blocks(), 0, "no staging left behind");
        // the payloads are still there: with the good image back, the sequence comes back
        store.put(key, good).unwrap();
        m.swap_in(&swapped, &mut store).unwrap();
        m.check_invariants().unwrap();
    }
}
