//! Per-sequence block tables (DESIGN §3).

use crate::block::BlockId;
use crate::prefix::BlockHash;

/// Identifies a sequence (a request, or a branch of one after a fork).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// What one sequence owns: its blocks in order, the token ids whose K/V are committed, and the
/// chained prefix keys of its full blocks.
///
/// Invariants: `hashes.len() == tokens.len() / block_size`, and
/// `blocks.len() * block_size >= tokens.len()` (blocks may be reserved beyond the committed tokens).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    pub(crate) blocks: Vec<BlockId>,
    pub(crate) tokens: Vec<u32>,
    pub(crate) hashes: Vec<BlockHash>,
    /// The salt's root key that the first block chains from (`None`: unsalted).
    pub(crate) root: Option<BlockHash>,
    /// Leading full blocks the sequence did not compute (cache hits at admission, restored
    /// by a swap, shared by a fork): already published to a shared store, never again.
    pub(crate) reused: usize,
}

impl BlockTable {
    /// Block ids in sequence order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }
    /// Token ids whose K/V are committed.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    /// Number of committed tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    /// True when no token is committed.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// Prefix keys of the full blocks.
    pub fn hashes(&self) -> &[BlockHash] {
        &self.hashes
    }
}
