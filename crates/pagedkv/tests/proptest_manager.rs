//! Random sequences of admit (prefix match) / append (after a fork the reserve copies a shared,
//! partly filled block: copy-on-write) / fork / free / swap out and in (blocks still cached are
//! shared again, the others imported) against a small pool, so eviction happens constantly.
//! After every step: the
//! manager's invariants (free + cached + owned = total, ref count = tables holding the block, no
//! block twice in the free queue or in a table, map entries and block keys agree, a cached block
//! a table holds is cached under that table's key), every prefix-map entry holds the K/V of its
//! prefix, and every sequence reads back what was written for it.
//!
//! Cases: 1,000 by default; set `PAGEDKV_PROPTEST_CASES` for longer local runs.

mod common;

use std::collections::HashMap;

use common::*;
use pagedkv::tier::TieredStore;
use pagedkv::{BlockHash, KvCacheManager, KvError, SeqId, SwappedOut};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Admit { base: usize, suffix: Vec<u32> },
    Append { seq: usize, tokens: Vec<u32> },
    Fork { seq: usize },
    Free { seq: usize },
    SwapOut { seq: usize },
    SwapIn { which: usize },
}

fn op() -> impl Strategy<Value = Op> {
    // a tiny vocabulary makes independent sequences produce identical blocks
    let tokens = |max| prop::collection::vec(0u32..3, 0..max);
    prop_oneof![
        3 => (0usize..3, tokens(10)).prop_map(|(base, suffix)| Op::Admit { base, suffix }),
        4 => (any::<usize>(), prop::collection::vec(0u32..3, 1..7)).prop_map(|(seq, tokens)| Op::Append { seq, tokens }),
        1 => any::<usize>().prop_map(|seq| Op::Fork { seq }),
        2 => any::<usize>().prop_map(|seq| Op::Free { seq }),
        2 => any::<usize>().prop_map(|seq| Op::SwapOut { seq }),
        2 => any::<usize>().prop_map(|which| Op::SwapIn { which }),
    ]
}

const BASES: [[u32; 9]; 3] = [
    [5, 6, 7, 8, 9, 10, 11, 12, 13],
    [5, 6, 7, 8, 20, 21, 22, 23, 24],
    [30, 31, 32, 33, 34, 35, 36, 37, 38],
];

struct Harness {
    m: KvCacheManager,
    /// Exact codec (f32): contents must read back bit for bit; otherwise within int8's bound.
    exact: bool,
    /// The reference model: each live sequence's committed tokens.
    live: Vec<(SeqId, Vec<u32>)>,
    /// Sequences swapped out to `store`, with their committed tokens.
    swapped: Vec<(SwappedOut, Vec<u32>)>,
    store: TieredStore,
    /// Every full-block key ever produced, with the prefix it names.
    known: HashMap<BlockHash, Vec<u32>>,
    next_id: u64,
}

impl Harness {
    fn new(m: KvCacheManager, exact: bool) -> Self {
        Self {
            m,
            exact,
            live: Vec::new(),
            swapped: Vec::new(),
            store: TieredStore::in_memory(1 << 30),
            known: HashMap::new(),
            next_id: 0,
        }
    }

    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Admit { base, suffix } => {
                let mut prompt = BASES[base].to_vec();
                prompt.extend(suffix);
                let seq = SeqId(self.next_id);
                self.next_id += 1;
                let before = fingerprint(&self.m);
                match self.m.admit(seq, &prompt) {
                    Ok(adm) => {
                        prop_assert_eq!(adm.cached_tokens % BLOCK, 0);
                        prop_assert_eq!(
                            self.m.table(seq).unwrap().tokens(),
                            &prompt[..adm.cached_tokens]
                        );
                        write_and_commit(&mut self.m, seq, &prompt[adm.cached_tokens..]);
                        self.live.push((seq, prompt));
                    }
                    Err(KvError::OutOfBlocks { .. }) => {
                        prop_assert_eq!(fingerprint(&self.m), before)
                    }
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
            Op::Append { seq, tokens } => {
                if self.live.is_empty() {
                    return Ok(());
                }
                let idx = seq % self.live.len();
                let id = self.live[idx].0;
                let before = fingerprint(&self.m);
                match self.m.reserve(id, tokens.len()) {
                    Ok(()) => {
                        write_and_commit(&mut self.m, id, &tokens);
                        self.live[idx].1.extend(tokens);
                    }
                    Err(KvError::OutOfBlocks { .. }) => {
                        prop_assert_eq!(fingerprint(&self.m), before)
                    }
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
            Op::Fork { seq } => {
                if self.live.is_empty() {
                    return Ok(());
                }
                let (parent, tokens) = self.live[seq % self.live.len()].clone();
                let child = SeqId(self.next_id);
                self.next_id += 1;
                self.m
                    .fork(parent, child)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                self.live.push((child, tokens));
            }
            Op::Free { seq } => {
                if self.live.is_empty() {
                    return Ok(());
                }
                let (id, _) = self.live.swap_remove(seq % self.live.len());
                self.m
                    .free(id)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(self.m.free(id), Err(KvError::UnknownSequence(id)));
            }
            Op::SwapOut { seq } => {
                if self.live.is_empty() {
                    return Ok(());
                }
                let (id, tokens) = self.live.swap_remove(seq % self.live.len());
                let swapped = self
                    .m
                    .swap_out(id, &mut self.store)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                self.swapped.push((swapped, tokens));
            }
            Op::SwapIn { which } => {
                if self.swapped.is_empty() {
                    return Ok(());
                }
                let idx = which % self.swapped.len();
                let before = fingerprint(&self.m);
                match self.m.swap_in(&self.swapped[idx].0, &mut self.store) {
                    Ok(()) => {
                        let (swapped, tokens) = self.swapped.swap_remove(idx);
                        self.live.push((swapped.seq(), tokens));
                    }
                    Err(KvError::OutOfBlocks { .. }) => {
                        prop_assert_eq!(fingerprint(&self.m), before)
                    }
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
        }
        self.check()
    }

    fn check(&mut self) -> Result<(), TestCaseError> {
        self.m.check_invariants().map_err(TestCaseError::fail)?;
        let layout = self.m.layout().clone();
        for (id, tokens) in &self.live {
            let table = self.m.table(*id).unwrap();
            prop_assert_eq!(table.tokens(), &tokens[..]);
            for (i, hash) in table.hashes().iter().enumerate() {
                self.known.insert(*hash, tokens[..(i + 1) * BLOCK].to_vec());
            }
            if self.exact {
                check_contents(&self.m, *id).map_err(TestCaseError::fail)?;
            } else {
                check_contents_within(&self.m, *id, 2000.0 / 255.0 / 2.0 * 1.01)
                    .map_err(TestCaseError::fail)?;
            }
        }
        if !self.exact {
            return Ok(());
        }
        // every prefix-map entry points at a block that holds exactly that prefix's K/V
        let (mut k, mut v) = (
            vec![0.0; layout.token_width()],
            vec![0.0; layout.token_width()],
        );
        for (hash, block) in self.m.pool().cached_entries() {
            let prefix = self
                .known
                .get(&hash)
                .ok_or_else(|| TestCaseError::fail("unknown key in map"))?;
            let hashes = prefix_hashes(prefix);
            for slot in 0..BLOCK {
                let pos = prefix.len() - BLOCK + slot;
                for layer in 0..layout.layers() {
                    self.m
                        .storage()
                        .read_token(layer, block, slot, &mut k, &mut v)
                        .unwrap();
                    prop_assert!(
                        (k.clone(), v.clone()) == rows(&layout, layer, hashes[pos]),
                        "cached {:?} holds wrong data",
                        block
                    );
                }
            }
        }
        Ok(())
    }
}

fn cases() -> u32 {
    std::env::var("PAGEDKV_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn manager_matches_model(ops in prop::collection::vec(op(), 1..60), blocks in 6usize..20, watermark in 0usize..2) {
        let mut m = KvCacheManager::new(small_layout(), blocks, b"proptest").unwrap();
        m.set_watermark_blocks(watermark);
        let mut h = Harness::new(m, true);
        for op in ops {
            h.step(op)?;
        }
        // draining every sequence returns every block to the queue
        for (id, _) in std::mem::take(&mut h.live) {
            h.m.free(id).unwrap();
        }
        prop_assert_eq!(h.m.pool().num_available(), blocks);
        h.check()?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases() / 4, ..ProptestConfig::default() })]

    /// The same operations on an int8 layout: full blocks are sealed (encoded) on commit, partial
    /// ones live in staging; structure and staging ownership are checked after every step, and
    /// every sequence reads back within int8's error bound.
    #[test]
    fn compressed_manager_matches_model(ops in prop::collection::vec(op(), 1..60), blocks in 6usize..20) {
        let mut m = KvCacheManager::new(int8_layout(), blocks, b"proptest").unwrap();
        m.set_watermark_blocks(0);
        let mut h = Harness::new(m, false);
        for op in ops {
            h.step(op)?;
        }
        for (id, _) in std::mem::take(&mut h.live) {
            h.m.free(id).unwrap();
        }
        prop_assert_eq!(h.m.storage().open_blocks(), 0);
        h.check()?;
    }
}
