//! Block-manager behaviour with exact block ids, and every error path leaving state unchanged.

mod common;

use common::*;
use pagedkv::{BlockId, KvCacheManager, KvError, SeqId};

fn manager(blocks: usize) -> KvCacheManager {
    KvCacheManager::new(small_layout(), blocks, b"test-model").unwrap()
}

fn ids(v: &[u32]) -> Vec<BlockId> {
    v.iter().map(|i| BlockId(*i)).collect()
}

#[test]
fn admit_allocates_and_prefix_hits_share_blocks() {
    let mut m = manager(8);
    let prompt: Vec<u32> = (0..10).collect();
    assert_eq!(m.admit(SeqId(1), &prompt).unwrap().cached_tokens, 0);
    assert_eq!(m.table(SeqId(1)).unwrap().blocks(), ids(&[0, 1, 2]));
    write_and_commit(&mut m, SeqId(1), &prompt);
    // the same 8-token prefix followed by something else: two blocks hit
    let mut other = prompt[..8].to_vec();
    other.extend([99, 98, 97]);
    assert_eq!(m.admit(SeqId(2), &other).unwrap().cached_tokens, 8);
    assert_eq!(m.table(SeqId(2)).unwrap().blocks(), ids(&[0, 1, 3]));
    assert_eq!(m.pool().ref_count(BlockId(0)).unwrap(), 2);
    write_and_commit(&mut m, SeqId(2), &other[8..]);
    check_contents(&m, SeqId(2)).unwrap();
    let stats = m.prefix_stats();
    // seq 1 looked up 2 full blocks and missed both; seq 2 hit both
    assert_eq!((stats.hits, stats.misses), (2, 2));
    m.check_invariants().unwrap();
}

#[test]
fn last_prompt_token_is_always_computed() {
    let mut m = manager(8);
    let prompt: Vec<u32> = (0..8).collect();
    m.admit(SeqId(1), &prompt).unwrap();
    write_and_commit(&mut m, SeqId(1), &prompt);
    // an identical prompt may reuse only the first block: the second holds the last token
    assert_eq!(m.admit(SeqId(2), &prompt).unwrap().cached_tokens, 4);
    m.check_invariants().unwrap();
}

#[test]
fn freed_prefix_stays_cached_until_evicted_tail_first() {
    let mut m = manager(4);
    let prompt: Vec<u32> = (0..12).collect();
    m.admit(SeqId(1), &prompt).unwrap();
    write_and_commit(&mut m, SeqId(1), &prompt);
    m.free(SeqId(1)).unwrap();
    // freed tail first: queue is [3, 2, 1, 0], blocks 0..2 still cached
    assert_eq!(
        m.pool().free_queue().collect::<Vec<_>>(),
        ids(&[3, 2, 1, 0])
    );
    assert_eq!(m.counts().cached, 3);
    // a new, unrelated 8-token request takes 3 then 2: evicting the tail of the old prefix
    m.admit(SeqId(2), &[50, 51, 52, 53, 54, 55, 56, 57])
        .unwrap();
    assert_eq!(m.table(SeqId(2)).unwrap().blocks(), ids(&[3, 2]));
    assert_eq!(m.prefix_stats().evictions, 1);
    // the head of the old prefix is still there
    let again: Vec<u32> = (0..5).collect();
    assert_eq!(m.admit(SeqId(3), &again).unwrap().cached_tokens, 4);
    m.check_invariants().unwrap();
}

#[test]
fn fork_then_write_copies_the_shared_block() {
    let mut m = manager(8);
    let prompt: Vec<u32> = (0..6).collect();
    m.admit(SeqId(1), &prompt).unwrap();
    write_and_commit(&mut m, SeqId(1), &prompt);
    m.fork(SeqId(1), SeqId(2)).unwrap();
    assert_eq!(m.pool().ref_count(BlockId(1)).unwrap(), 2);
    m.reserve(SeqId(2), 1).unwrap();
    // the child got a private copy of the partly filled block 1
    assert_eq!(m.table(SeqId(2)).unwrap().blocks(), ids(&[0, 2]));
    assert_eq!(m.pool().ref_count(BlockId(1)).unwrap(), 1);
    write_and_commit(&mut m, SeqId(2), &[77]);
    m.reserve(SeqId(1), 1).unwrap();
    write_and_commit(&mut m, SeqId(1), &[88]);
    check_contents(&m, SeqId(1)).unwrap();
    check_contents(&m, SeqId(2)).unwrap();
    m.check_invariants().unwrap();
}

#[test]
fn a_fork_shares_committed_blocks_only_and_a_shared_block_is_never_written() {
    let mut m = manager(8);
    let prompt: Vec<u32> = (0..4).collect();
    m.admit(SeqId(1), &prompt[..1]).unwrap();
    m.reserve(SeqId(1), 3).unwrap();
    write_and_commit(&mut m, SeqId(1), &prompt);
    // the parent reserves a block it has not written yet, then forks
    m.reserve(SeqId(1), 2).unwrap();
    m.fork(SeqId(1), SeqId(2)).unwrap();
    assert_eq!(m.table(SeqId(2)).unwrap().blocks(), ids(&[0]));
    assert_eq!(
        m.pool().ref_count(BlockId(1)).unwrap(),
        1,
        "the reserved block stays the parent's"
    );
    m.reserve(SeqId(2), 2).unwrap();
    write_and_commit(&mut m, SeqId(2), &[77, 78]);
    write_and_commit(&mut m, SeqId(1), &[88, 89]);
    check_contents(&m, SeqId(1)).unwrap();
    check_contents(&m, SeqId(2)).unwrap();
    m.check_invariants().unwrap();
    // a partly filled block both hold: writing after the fork, before a new `reserve`, is refused
    m.fork(SeqId(1), SeqId(3)).unwrap();
    m.reserve(SeqId(1), 1).unwrap();
    m.reserve(SeqId(3), 1).unwrap();
    let width = m.layout().token_width();
    let row = vec![0.0; width];
    m.fork(SeqId(3), SeqId(4)).unwrap();
    let shared = m.table(SeqId(4)).unwrap().blocks()[1];
    let refused = m.write_token(SeqId(3), 0, 6, &row, &row);
    assert_eq!(
        refused,
        Err(KvError::SharedBlockWrite {
            seq: SeqId(3),
            block: shared
        })
    );
    // rows written before a fork cannot be committed into the block it shared
    m.reserve(SeqId(4), 1).unwrap();
    m.write_token(SeqId(4), 0, 6, &row, &row).unwrap();
    m.fork(SeqId(4), SeqId(5)).unwrap();
    let tail = m.table(SeqId(5)).unwrap().blocks()[1];
    assert_eq!(
        m.commit(SeqId(4), &[9]),
        Err(KvError::SharedBlockWrite {
            seq: SeqId(4),
            block: tail
        })
    );
    m.check_invariants().unwrap();
}

#[test]
fn running_out_of_blocks_changes_nothing() {
    let mut m = manager(3);
    let prompt: Vec<u32> = (0..6).collect();
    m.admit(SeqId(1), &prompt).unwrap();
    write_and_commit(&mut m, SeqId(1), &prompt);
    let before = fingerprint(&m);
    assert_eq!(
        m.admit(SeqId(2), &[9; 9]),
        Err(KvError::OutOfBlocks { needed: 3, free: 1 })
    );
    assert_eq!(
        m.reserve(SeqId(1), 7),
        Err(KvError::OutOfBlocks { needed: 2, free: 1 })
    );
    assert_eq!(fingerprint(&m), before);

    // copy-on-write of the shared tail plus one more block: 2 needed, 1 free
    m.fork(SeqId(1), SeqId(2)).unwrap();
    let before = fingerprint(&m);
    assert_eq!(
        m.reserve(SeqId(2), 3),
        Err(KvError::OutOfBlocks { needed: 2, free: 1 })
    );
    assert_eq!(fingerprint(&m), before);
    m.reserve(SeqId(2), 2).unwrap();
    // seq 1's tail is private again (ref 1): growing within it needs no block, past it one
    m.reserve(SeqId(1), 2).unwrap();
    assert_eq!(
        m.reserve(SeqId(1), 3),
        Err(KvError::OutOfBlocks { needed: 1, free: 0 })
    );
    m.check_invariants().unwrap();
}

#[test]
fn watermark_holds_back_admission_only() {
    let mut m = manager(4);
    m.set_watermark_blocks(2);
    assert!(!m.can_admit(&[1; 9]));
    assert_eq!(
        m.admit(SeqId(1), &[1; 9]),
        Err(KvError::OutOfBlocks { needed: 5, free: 4 })
    );
    assert!(m.can_admit(&[1; 8]));
    m.admit(SeqId(1), &[1; 8]).unwrap();
    // a running sequence may grow into the reserve
    m.reserve(SeqId(1), 8).unwrap();
    m.check_invariants().unwrap();
}

#[test]
fn evictable_cached_blocks_count_as_free_for_admission() {
    let mut m = manager(3);
    let prompt: Vec<u32> = (0..12).collect();
    m.admit(SeqId(1), &prompt).unwrap();
    write_and_commit(&mut m, SeqId(1), &prompt);
    m.free(SeqId(1)).unwrap();
    assert_eq!(m.counts().cached, 3);
    assert!(m.can_admit(&[7; 12]));
    m.admit(SeqId(2), &[7; 12]).unwrap();
    assert_eq!(m.prefix_stats().evictions, 3);
    m.check_invariants().unwrap();
}

#[test]
fn unknown_sequences_and_bad_positions_are_errors() {
    let mut m = manager(4);
    let ghost = SeqId(42);
    let row = vec![0.0; small_layout().token_width()];
    assert_eq!(m.reserve(ghost, 1), Err(KvError::UnknownSequence(ghost)));
    assert_eq!(m.commit(ghost, &[1]), Err(KvError::UnknownSequence(ghost)));
    assert_eq!(m.free(ghost), Err(KvError::UnknownSequence(ghost)));
    assert_eq!(
        m.fork(ghost, SeqId(1)),
        Err(KvError::UnknownSequence(ghost))
    );
    assert_eq!(
        m.write_token(ghost, 0, 0, &row, &row),
        Err(KvError::UnknownSequence(ghost))
    );
    assert_eq!(m.admit(SeqId(1), &[]), Err(KvError::EmptyPrompt(SeqId(1))));

    m.admit(SeqId(1), &[1, 2, 3]).unwrap();
    assert_eq!(
        m.admit(SeqId(1), &[1]),
        Err(KvError::SequenceExists(SeqId(1)))
    );
    write_and_commit(&mut m, SeqId(1), &[1, 2]);
    let snapshot = fingerprint(&m);
    // committed positions are read-only; positions past the reservation are not writable
    assert!(matches!(
        m.write_token(SeqId(1), 0, 1, &row, &row),
        Err(KvError::PositionNotWritable { .. })
    ));
    assert!(matches!(
        m.write_token(SeqId(1), 0, 4, &row, &row),
        Err(KvError::PositionNotWritable { .. })
    ));
    assert!(matches!(
        m.commit(SeqId(1), &[5, 6, 7]),
        Err(KvError::PositionNotWritable { .. })
    ));
    let mut nan = row.clone();
    nan[1] = f32::NAN;
    assert_eq!(
        m.write_token(SeqId(1), 0, 2, &nan, &row),
        Err(KvError::NonFinite { what: "K/V row" })
    );
    assert!(matches!(
        m.write_token(SeqId(1), 0, 2, &row[1..], &row),
        Err(KvError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        m.write_token(SeqId(1), 5, 2, &row, &row),
        Err(KvError::IndexOutOfRange { .. })
    ));
    assert_eq!(fingerprint(&m), snapshot);

    // no double free through the public API: the second free names an unknown sequence
    m.free(SeqId(1)).unwrap();
    assert_eq!(m.free(SeqId(1)), Err(KvError::UnknownSequence(SeqId(1))));
    m.check_invariants().unwrap();
}

#[test]
fn compressed_layout_seals_full_blocks_and_frees_staging() {
    let mut spec = pagedkv::LayoutSpec::new(2, 2, 4, 32, pagedkv::Codec::Int8);
    spec.block_size = 4;
    let layout = pagedkv::KvLayout::new(spec).unwrap();
    let mut m = KvCacheManager::new(layout.clone(), 8, b"t").unwrap();
    let row = vec![0.25f32; layout.token_width()];
    let prompt: Vec<u32> = (0..6).collect();
    m.admit(SeqId(1), &prompt).unwrap();
    for pos in 0..6 {
        for layer in 0..2 {
            m.write_token(SeqId(1), layer, pos, &row, &row).unwrap();
        }
    }
    m.commit(SeqId(1), &prompt).unwrap();
    // block 0 is full and sealed; block 1 holds 2 tokens and is open
    assert_eq!(m.storage().open_blocks(), 1);
    m.free(SeqId(1)).unwrap();
    assert_eq!(m.storage().open_blocks(), 0);
    m.check_invariants().unwrap();
}

/// Recent window: the last `recent_tokens` (in whole blocks) behind the open block stay in
/// full precision and read back exactly; a block is sealed when it leaves the window, and the
/// window's blocks are sealed when the sequence is freed, before they serve as cached prefix.
#[test]
fn recent_window_blocks_seal_when_they_leave_it_and_on_free() {
    let mut spec = int8_layout().spec().clone();
    spec.recent_tokens = 5; // two blocks of 4
    let layout = pagedkv::KvLayout::new(spec).unwrap();
    assert_eq!(layout.recent_blocks(), 2);
    let mut m = KvCacheManager::new(layout, 8, b"recent").unwrap();
    let prompt: Vec<u32> = (0..14).map(|t| t + 70).collect();
    let a = SeqId(1);
    m.admit(a, &prompt[..1]).unwrap();
    m.reserve(a, prompt.len()).unwrap();
    write_and_commit(&mut m, a, &prompt);
    let blocks = m.table(a).unwrap().blocks().to_vec();
    // blocks 0..3 are full: 0 and 1 have left the window, 2 and 3 are in it, 3 (2 tokens) open
    let open: Vec<bool> = blocks.iter().map(|b| m.storage().is_open(*b)).collect();
    assert_eq!(open, [false, true, true, true]);
    let hashes = prefix_hashes(&prompt);
    let (mut k, mut v) = (vec![0.0; 64], vec![0.0; 64]);
    for pos in [4, 9, 13] {
        m.read_token(a, 0, pos, &mut k, &mut v).unwrap();
        assert_eq!(
            k,
            rows(m.layout(), 0, hashes[pos]).0,
            "position {pos} is exact"
        );
    }
    check_contents_within(&m, a, 2000.0 / 255.0 / 2.0 * 1.01).unwrap();
    m.check_invariants().unwrap();
    m.free(a).unwrap();
    m.check_invariants().unwrap();
    // the full blocks are sealed now; the partial one is gone
    assert!(blocks[..3].iter().all(|b| !m.storage().is_open(*b)));
    assert_eq!(m.storage().open_blocks(), 0);
    let b = SeqId(2);
    assert_eq!(m.admit(b, &prompt).unwrap().cached_tokens, 12);
    m.free(b).unwrap();
    m.check_invariants().unwrap();
}

/// Sink tokens: the first block is sealed like any other, and the rows of its first tokens stay
/// beside it in f16 (exact here: the rows are integers), while its other tokens and later blocks
/// hold the codec's reconstruction; as a cached prefix it keeps them for the next sequence, and a
/// block reused later in a sequence holds no stale sink rows.
#[test]
fn sink_rows_stay_beside_the_sealed_first_block_through_the_prefix_cache() {
    let mut spec = int8_layout().spec().clone();
    spec.sink_tokens = 2;
    let layout = pagedkv::KvLayout::new(spec).unwrap();
    let mut m = KvCacheManager::new(layout, 6, b"sinks").unwrap();
    let prompt: Vec<u32> = (0..9).map(|t| t + 40).collect();
    let a = SeqId(1);
    m.admit(a, &prompt[..1]).unwrap();
    m.reserve(a, prompt.len()).unwrap();
    write_and_commit(&mut m, a, &prompt);
    let blocks = m.table(a).unwrap().blocks().to_vec();
    assert!(blocks[..2].iter().all(|b| !m.storage().is_open(*b)));
    let hashes = prefix_hashes(&prompt);
    let sink_exact = |m: &KvCacheManager, seq| {
        let (mut k, mut v) = (vec![0.0; 64], vec![0.0; 64]);
        for layer in 0..2 {
            for (pos, hash) in hashes.iter().enumerate().take(2) {
                m.read_token(seq, layer, pos, &mut k, &mut v).unwrap();
                assert_eq!((k.clone(), v.clone()), rows(m.layout(), layer, *hash));
            }
        }
    };
    sink_exact(&m, a);
    // the block's third token is int8's reconstruction, not exact
    let (mut k, mut v) = (vec![0.0; 64], vec![0.0; 64]);
    m.read_token(a, 0, 2, &mut k, &mut v).unwrap();
    assert_ne!(k, rows(m.layout(), 0, hashes[2]).0);
    check_contents_within(&m, a, 2000.0 / 255.0 / 2.0 * 1.01).unwrap();
    m.free(a).unwrap();
    m.check_invariants().unwrap();
    // the cached first block serves the next sequence with its sink rows
    let b = SeqId(2);
    assert_eq!(m.admit(b, &prompt).unwrap().cached_tokens, 8);
    sink_exact(&m, b);
    m.free(b).unwrap();
    // evict everything: the old first block now holds a later block of another sequence
    let other: Vec<u32> = (0..23).map(|t| t + 900).collect();
    let c = SeqId(3);
    m.admit(c, &other).unwrap();
    write_and_commit(&mut m, c, &other);
    let at = m
        .table(c)
        .unwrap()
        .blocks()
        .iter()
        .position(|x| *x == blocks[0]);
    let at = at.expect("every block is in use");
    assert!(at > 0, "the old first block went elsewhere");
    assert!(m
        .storage()
        .sink_rows(0, blocks[0], 0, pagedkv::Role::Key)
        .is_none());
    check_contents_within(&m, c, 2000.0 / 255.0 / 2.0 * 1.01).unwrap();
    m.check_invariants().unwrap();
    m.free(c).unwrap();
    m.check_invariants().unwrap();
}
