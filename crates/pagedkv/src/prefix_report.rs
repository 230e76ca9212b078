//! What a prompt found in the prefix cache, where, and why not more (DESIGN §11).
//!
//! A prompt's *cacheable* blocks are its full blocks before the one holding its last token (that
//! token is always computed, so the model has logits). Each is served by the pool, a tier, or
//! not at all; the chain stops at the first block not found, and the report says why.

use std::time::Duration;

use crate::tier::TierLevel;

/// Why the chain of cached blocks stopped where it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissReason {
    /// Every cacheable block was served.
    None,
    /// The first missed block was never cached (under this salt), or is forgotten.
    NoEntry,
    /// The prompt has no full block to share: it is shorter than a block (plus its last token).
    PartialBlock,
    /// The first missed block was cached and evicted from every tier this long ago.
    Evicted {
        /// Time since the eviction.
        ago: Duration,
    },
    /// A tier held the block but its payload was refused (checksum, version, layout); it was
    /// dropped and the block computed again.
    Damaged,
    /// The chain might have continued in the shared store, but the store did not answer.
    StoreUnavailable,
    /// The shared store was still answering when the admission's fetch budget ran out; the
    /// chain might have continued there.
    StoreTimedOut,
}

impl MissReason {
    /// The reason's wire name: `none`, `no_entry`, `partial_block`, `evicted`, `damaged`,
    /// `store_unavailable`, `store_timed_out`.
    pub fn name(&self) -> &'static str {
        match self {
            MissReason::None => "none",
            MissReason::NoEntry => "no_entry",
            MissReason::PartialBlock => "partial_block",
            MissReason::Evicted { .. } => "evicted",
            MissReason::Damaged => "damaged",
            MissReason::StoreUnavailable => "store_unavailable",
            MissReason::StoreTimedOut => "store_timed_out",
        }
    }
}

/// Where a prompt's cached tokens came from, and where the chain stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixReport {
    /// Tokens per block.
    pub block_size: usize,
    /// Tokens in the prompt's cacheable blocks.
    pub cacheable_tokens: usize,
    /// Tokens served by blocks in the pool.
    pub pool_tokens: usize,
    /// Tokens served from the host tier.
    pub host_tokens: usize,
    /// Tokens served from the disk tier.
    pub disk_tokens: usize,
    /// Tokens served from the shared store.
    pub remote_tokens: usize,
    /// Index of the first block not served (for `PartialBlock`, the block holding the prompt's
    /// end); `None` when every cacheable block was served.
    pub first_missed_block: Option<usize>,
    /// Why the chain stopped there.
    pub reason: MissReason,
}

impl PrefixReport {
    /// Tokens served from any cache level.
    pub fn cached_tokens(&self) -> usize {
        self.pool_tokens + self.host_tokens + self.disk_tokens + self.remote_tokens
    }

    /// A report for `matchable` cacheable blocks of which the first `pool` came from the pool and
    /// the next ones from the tiers in `tiers`; `miss` explains a stop before `matchable`.
    pub(crate) fn new(
        block_size: usize,
        matchable: usize,
        pool: usize,
        tiers: &[TierLevel],
        miss: impl FnOnce() -> MissReason,
    ) -> Self {
        let count = |level| tiers.iter().filter(|t| **t == level).count() * block_size;
        let found = pool + tiers.len();
        let (first_missed_block, reason) = if found < matchable {
            (Some(found), miss())
        } else if matchable == 0 {
            (Some(0), MissReason::PartialBlock)
        } else {
            (None, MissReason::None)
        };
        Self {
            block_size,
            cacheable_tokens: matchable * block_size,
            pool_tokens: pool * block_size,
            host_tokens: count(TierLevel::Host),
            disk_tokens: count(TierLevel::Disk),
            remote_tokens: count(TierLevel::Remote),
            first_missed_block,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_count_tiers_and_name_the_stop() {
        let tiers = [TierLevel::Host, TierLevel::Disk, TierLevel::Remote];
        let r = PrefixReport::new(16, 5, 1, &tiers, || MissReason::NoEntry);
        assert_eq!((r.pool_tokens, r.host_tokens, r.disk_tokens), (16, 16, 16));
        assert_eq!(r.remote_tokens, 16);
        assert_eq!(r.cached_tokens(), 64);
        assert_eq!(r.first_missed_block, Some(4));
        assert_eq!(r.reason.name(), "no_entry");
        let all = PrefixReport::new(16, 2, 2, &[], || unreachable!());
        assert_eq!(
            (all.first_missed_block, all.reason),
            (None, MissReason::None)
        );
        let short = PrefixReport::new(16, 0, 0, &[], || unreachable!());
        assert_eq!(short.reason, MissReason::PartialBlock);
        assert_eq!(short.cacheable_tokens, 0);
    }
}
