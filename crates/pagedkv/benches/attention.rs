//! `attention` benchmark (issue: paged attention): one decode step's attention for one layer of
//! SmolLM2's geometry (9 query heads, 3 kv heads, head_dim 64, blocks of 16) per codec and
//! context, with `ferrum-kv` 0.18.4's CPU `paged_attention` on the same geometry and context in
//! the same run as the baseline. `pagedkv bench attention` adds the machine's bandwidth.
//!
//! Run: `cargo bench -p pagedkv --bench attention`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrum_kv::{
    AllocationRequest, DataType, Device, PagedKvCacheConfig, PagedKvCacheHandle,
    PagedKvCacheManager, RequestId,
};
use pagedkv::attention::{attend, attend_split, Context, Scratch};
use pagedkv::codec::synthetic::gaussian;
use pagedkv::{BlockId, Codec, KvLayout, KvStorage, LayoutSpec};

const Q_HEADS: usize = 9;
const KV_HEADS: usize = 3;
const D: usize = 64;
const BS: usize = 16;

fn ours(codec: Codec, context: usize) -> (KvStorage, Vec<BlockId>) {
    let layout = KvLayout::new(LayoutSpec::new(1, KV_HEADS, Q_HEADS, D, codec)).unwrap();
    let blocks: Vec<BlockId> = (0..context.div_ceil(BS) as u32).map(BlockId).collect();
    let mut storage = KvStorage::new(layout, blocks.len()).unwrap();
    let kv = gaussian(2 * KV_HEADS * D * context, 3);
    for pos in 0..context {
        let (k, v) = kv[pos * 2 * KV_HEADS * D..][..2 * KV_HEADS * D].split_at(KV_HEADS * D);
        storage
            .write_token(0, blocks[pos / BS], pos % BS, k, v)
            .unwrap();
        if pos % BS == BS - 1 {
            storage.seal(blocks[pos / BS], pos / BS * BS).unwrap();
        }
    }
    (storage, blocks)
}

fn ferrum(context: usize) -> (PagedKvCacheManager, RequestId) {
    let config = PagedKvCacheConfig {
        block_size: BS,
        max_gpu_blocks: context.div_ceil(BS) + 1,
        max_cpu_blocks: 1,
        num_layers: 1,
        num_heads: KV_HEADS,
        head_dim: D,
        ..Default::default()
    };
    let manager = PagedKvCacheManager::new(Device::CPU, config).unwrap();
    let request = AllocationRequest {
        request_id: RequestId::new(),
        initial_tokens: context,
        max_sequence_length: context,
        num_layers: 1,
        num_heads: KV_HEADS,
        head_dim: D,
        device: Device::CPU,
        dtype: DataType::FP32,
        priority: ferrum_types::Priority::Normal,
    };
    let id = request.request_id.clone();
    let handle = manager.allocate_sync(&request).unwrap();
    let handle = handle
        .as_any()
        .downcast_ref::<PagedKvCacheHandle>()
        .unwrap();
    let kv = gaussian(2 * KV_HEADS * D * context, 3);
    for pos in 0..context {
        let (k, v) = kv[pos * 2 * KV_HEADS * D..][..2 * KV_HEADS * D].split_at(KV_HEADS * D);
        manager.write_kv(handle, 0, pos, k, v).unwrap();
    }
    (manager, id)
}

fn bench(c: &mut Criterion) {
    let q = gaussian(Q_HEADS * D, 9);
    let threads = rayon::current_num_threads();
    for context in [512usize, 2048, 8192] {
        let mut group = c.benchmark_group(format!("attention_decode_ctx{context}"));
        group.throughput(Throughput::Elements(context as u64));
        let (manager, id) = ferrum(context);
        let handle = ferrum_kv::KvCacheManagerInterface::get_handle(&manager, id).unwrap();
        let handle = handle
            .as_any()
            .downcast_ref::<PagedKvCacheHandle>()
            .unwrap();
        group.bench_function("ferrum-kv-0.18.4 (f32, 1 thread)", |b| {
            b.iter(|| {
                ferrum_kv::attention::paged_attention(
                    black_box(&q),
                    1,
                    Q_HEADS,
                    KV_HEADS,
                    D,
                    &manager,
                    handle,
                    0,
                    context,
                )
                .unwrap()
            })
        });
        for codec in [
            Codec::F32,
            Codec::F16,
            Codec::Int8,
            Codec::Int4,
            Codec::FibQuant { k: 4, n: 256 },
        ] {
            let (storage, blocks) = ours(codec, context);
            let ctx = Context {
                blocks: &blocks,
                len: context,
            };
            let mut out = vec![0f32; Q_HEADS * D];
            let mut scratch = Scratch::default();
            group.bench_function(format!("{codec} (1 thread)"), |b| {
                b.iter(|| {
                    attend(
                        &storage,
                        0,
                        ctx,
                        black_box(&q),
                        0.125,
                        &mut out,
                        &mut scratch,
                    )
                    .unwrap()
                })
            });
            group.bench_function(format!("{codec} ({threads} threads, split)"), |b| {
                b.iter(|| attend_split(&storage, 0, ctx, black_box(&q), 0.125, &mut out).unwrap())
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
