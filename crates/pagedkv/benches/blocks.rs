//! `blocks` benchmark (issue: foundation): block-manager operations, with `ferrum-kv` 0.18.4's
//! block pool measured in the same run as the baseline for allocate+free.
//!
//! Run: `cargo bench -p pagedkv --bench blocks`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pagedkv::{BlockPool, Codec, KvCacheManager, KvLayout, LayoutSpec, SeqId};

/// The manager's cost does not depend on the K/V size, so a tiny layout keeps 100k blocks cheap.
fn tiny_layout() -> KvLayout {
    KvLayout::new(LayoutSpec::new(1, 1, 1, 8, Codec::F16)).unwrap()
}

fn alloc_free(c: &mut Criterion) {
    let mut group = c.benchmark_group("alloc_free_per_block");
    group.throughput(Throughput::Elements(1));
    let mut pool = BlockPool::new(4096).unwrap();
    group.bench_function("pagedkv", |b| {
        b.iter(|| {
            let id = pool.allocate_one().unwrap();
            pool.release(black_box(id)).unwrap();
        })
    });
    let ferrum =
        ferrum_kv::BlockPool::new(ferrum_kv::Device::CPU, 16, ferrum_kv::DataType::FP16, 4096)
            .unwrap();
    group.bench_function("ferrum-kv-0.18.4", |b| {
        b.iter(|| {
            let alloc = ferrum.allocate().unwrap();
            ferrum.deallocate(black_box(alloc.physical_id)).unwrap();
        })
    });
    group.finish();
}

fn append_and_fork(c: &mut Criterion) {
    let layout = tiny_layout();
    let mut group = c.benchmark_group("sequence");
    group.throughput(Throughput::Elements(1));
    group.bench_function("append_per_token", |b| {
        let mut m = KvCacheManager::new(layout.clone(), 1 << 16, b"bench").unwrap();
        let seq = SeqId(0);
        m.admit(seq, &[1]).unwrap();
        m.commit(seq, &[1]).unwrap();
        let mut token = 0u32;
        b.iter(|| {
            if m.table(seq).unwrap().len() >= 60_000 {
                m.free(seq).unwrap();
                m.admit(seq, &[1]).unwrap();
                m.commit(seq, &[1]).unwrap();
            }
            token = token.wrapping_add(1);
            m.reserve(seq, 1).unwrap();
            m.commit(seq, &[black_box(token)]).unwrap();
        })
    });
    group.bench_function("fork_1024_tokens", |b| {
        let mut m = KvCacheManager::new(layout.clone(), 4096, b"bench").unwrap();
        let prompt: Vec<u32> = (0..1024).collect();
        m.admit(SeqId(0), &prompt).unwrap();
        m.commit(SeqId(0), &prompt).unwrap();
        b.iter(|| {
            m.fork(SeqId(0), SeqId(1)).unwrap();
            m.free(SeqId(1)).unwrap();
        })
    });
    group.finish();
}

/// Fills the prefix cache with `blocks` cached (freed, still hashed) blocks.
fn cache_with(layout: KvLayout, blocks: usize) -> KvCacheManager {
    let mut m = KvCacheManager::new(layout.clone(), blocks + 64, b"bench").unwrap();
    let per_seq = 64 * layout.block_size();
    for s in 0..blocks / 64 {
        let tokens: Vec<u32> = (0..per_seq as u32)
            .map(|t| t + (s * per_seq) as u32)
            .collect();
        m.admit(SeqId(s as u64), &tokens).unwrap();
        m.commit(SeqId(s as u64), &tokens).unwrap();
        m.free(SeqId(s as u64)).unwrap();
    }
    assert_eq!(m.counts().cached, blocks / 64 * 64);
    m
}

fn prefix_match(c: &mut Criterion) {
    let layout = tiny_layout();
    let mut group = c.benchmark_group("prefix_match_per_block");
    const MATCHED: usize = 16;
    group.throughput(Throughput::Elements(MATCHED as u64));
    for cached in [1_024usize, 102_400] {
        let mut m = cache_with(layout.clone(), cached);
        // a prompt that hits the first 16 blocks of a cached sequence in the middle of the pool
        let mid = (cached / 64 / 2) * 64 * layout.block_size();
        let mut prompt: Vec<u32> =
            (mid as u32..(mid + MATCHED * layout.block_size()) as u32).collect();
        prompt.push(u32::MAX);
        group.bench_function(format!("{}k_cached", cached / 1024), |b| {
            b.iter_batched(
                || (),
                |_| {
                    let adm = m.admit(SeqId(u64::MAX), black_box(&prompt)).unwrap();
                    assert_eq!(adm.cached_tokens, MATCHED * layout.block_size());
                    m.free(SeqId(u64::MAX)).unwrap();
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, alloc_free, append_and_fork, prefix_match);
criterion_main!(benches);
