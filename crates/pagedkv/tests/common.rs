//! Helpers shared by the manager tests: a small layout and K/V contents that are a pure function
//! of the token prefix, so prefix-cache hits must hold exactly what a fresh computation writes.

#![allow(dead_code)]

use pagedkv::{
    BlockHash, BlockId, BlockTable, Codec, KvCacheManager, KvLayout, LayoutSpec, PrefixStats, SeqId,
};

pub const BLOCK: usize = 4;

/// The small geometry with int8 K/V (head_dim 32, one value group).
pub fn int8_layout() -> KvLayout {
    let mut spec = LayoutSpec::new(2, 2, 4, 32, Codec::Int8);
    spec.block_size = BLOCK;
    KvLayout::new(spec).unwrap()
}

pub fn small_layout() -> KvLayout {
    let mut spec = LayoutSpec::new(2, 2, 4, 4, Codec::F32);
    spec.block_size = BLOCK;
    KvLayout::new(spec).unwrap()
}

fn mix(a: u64, b: u64) -> u64 {
    // splitmix64 finalizer over the pair: cheap, well spread
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Running hash of each prefix: `hashes[p]` names tokens[..=p].
pub fn prefix_hashes(tokens: &[u32]) -> Vec<u64> {
    let mut h = 0x1234_5678;
    tokens
        .iter()
        .map(|t| {
            h = mix(h, *t as u64 + 1);
            h
        })
        .collect()
}

/// The K and V rows a "model" writes at a position whose prefix hash is `h`.
pub fn rows(layout: &KvLayout, layer: usize, h: u64) -> (Vec<f32>, Vec<f32>) {
    let w = layout.token_width();
    let k = (0..w)
        .map(|e| (mix(h, (layer * 1000 + e) as u64) % 2001) as f32 - 1000.0)
        .collect();
    let v = (0..w)
        .map(|e| (mix(h, (layer * 1000 + e + 500) as u64) % 2001) as f32 - 1000.0)
        .collect();
    (k, v)
}

/// Writes and commits `tokens` after the sequence's committed ones (space must be reserved).
pub fn write_and_commit(m: &mut KvCacheManager, seq: SeqId, tokens: &[u32]) {
    let start = m.table(seq).unwrap().len();
    let mut all = m.table(seq).unwrap().tokens().to_vec();
    all.extend_from_slice(tokens);
    let hashes = prefix_hashes(&all);
    let layout = m.layout().clone();
    for (pos, h) in hashes.iter().enumerate().skip(start) {
        for layer in 0..layout.layers() {
            let (k, v) = rows(&layout, layer, *h);
            m.write_token(seq, layer, pos, &k, &v).unwrap();
        }
    }
    m.commit(seq, tokens).unwrap();
}

/// Checks that every committed position of `seq` holds the rows of its prefix exactly.
pub fn check_contents(m: &KvCacheManager, seq: SeqId) -> Result<(), String> {
    check_contents_within(m, seq, 0.0)
}

/// Checks that every committed position of `seq` holds the rows of its prefix within `tolerance`
/// (0 for exact codecs; for int8, rows span [-1000, 1000], so half a step is 2000/255/2).
pub fn check_contents_within(m: &KvCacheManager, seq: SeqId, tolerance: f32) -> Result<(), String> {
    let layout = m.layout().clone();
    let table = m.table(seq).map_err(|e| e.to_string())?;
    let hashes = prefix_hashes(table.tokens());
    let (mut k, mut v) = (
        vec![0.0; layout.token_width()],
        vec![0.0; layout.token_width()],
    );
    for (pos, h) in hashes.iter().enumerate() {
        for layer in 0..layout.layers() {
            m.read_token(seq, layer, pos, &mut k, &mut v)
                .map_err(|e| e.to_string())?;
            let (ek, ev) = rows(&layout, layer, *h);
            let err = k
                .iter()
                .zip(&ek)
                .chain(v.iter().zip(&ev))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            if err > tolerance {
                return Err(format!(
                    "{seq:?} position {pos} layer {layer} holds the wrong K/V (error {err})"
                ));
            }
        }
    }
    Ok(())
}

/// Everything observable about the cache's state, for "a failed call changed nothing" checks.
#[derive(Debug, PartialEq)]
pub struct Fingerprint {
    queue: Vec<BlockId>,
    tables: Vec<(SeqId, BlockTable)>,
    cached: Vec<(BlockHash, BlockId)>,
    stats: PrefixStats,
}

pub fn fingerprint(m: &KvCacheManager) -> Fingerprint {
    let mut tables: Vec<_> = m.sequences().map(|(id, t)| (id, t.clone())).collect();
    tables.sort_by_key(|(id, _)| *id);
    let mut cached: Vec<_> = m.pool().cached_entries().collect();
    cached.sort();
    Fingerprint {
        queue: m.pool().free_queue().collect(),
        tables,
        cached,
        stats: m.prefix_stats(),
    }
}
