//! pagedkv: the KV-cache layer of an LLM inference engine.
//!
//! It decides where every key and value vector lives ([`KvLayout`], [`KvStorage`]), shares them
//! between sequences ([`BlockPool`], prefix cache, copy-on-write fork), and is driven through
//! [`KvCacheManager`]. See `DESIGN.md` §2–4 for the data layout and algorithms.
#![warn(missing_docs)]

pub mod attention;
pub mod block;
pub mod calibration;
pub mod codec;
pub mod error;
pub mod eviction_log;
pub mod key_norm;
pub mod key_split;
pub mod layout;
pub mod manager;
pub mod prefix;
pub mod prefix_report;
pub mod storage;
pub mod table;
pub mod tier;

/// The README's Rust code, compiled and run as a doctest so the front page's example stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

pub use block::{BlockId, BlockPool, PoolCounts};
pub use calibration::KeyNormFit;
pub use codec::{Codec, Role};
pub use error::{KvError, Result};
pub use key_norm::KeyNorm;
pub use key_split::{KeySplit, SplitPlan};
pub use layout::{AttentionKind, KvLayout, LayerOverride, LayerSet, LayoutSpec};
pub use manager::{Admission, KvCacheManager, PinId, SwappedOut};
pub use prefix::{hash_block, BlockHash, CacheSalt, PrefixStats};
pub use prefix_report::{MissReason, PrefixReport};
pub use storage::{ImageKind, KvStorage, PageRef};
pub use table::{BlockTable, SeqId};
