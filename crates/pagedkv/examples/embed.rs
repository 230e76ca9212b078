//! Embedding pagedkv in another engine: a layout for your model, a cache manager, prompts
//! admitted with prefix reuse, K/V written and committed, attention over the paged (int4)
//! cache, a fork with copy-on-write, and a host tier below the pool.
//!
//! Run it with `cargo run --release -p pagedkv --example embed`; the test suite runs it too
//! (`tests/examples.rs`). The "model" here writes deterministic K/V: a real engine writes the
//! rows its attention layers compute.

use pagedkv::attention::{self, Context, Scratch};
use pagedkv::tier::TieredStore;
use pagedkv::{Codec, KvCacheManager, KvLayout, LayoutSpec, SeqId};

/// What a model would compute for `token` at `pos` in `layer`: one row of K and one of V.
fn kv_row(layout: &KvLayout, layer: usize, pos: usize, token: u32) -> (Vec<f32>, Vec<f32>) {
    let row = |salt: usize| -> Vec<f32> {
        (0..layout.token_width())
            .map(|e| {
                ((token as usize * 31 + pos * 7 + layer * 13 + e * 3 + salt) % 97) as f32 / 48.0
                    - 1.0
            })
            .collect()
    };
    (row(0), row(1))
}

/// Writes and commits a sequence's tokens after its committed ones (room must be reserved).
fn compute(cache: &mut KvCacheManager, seq: SeqId, tokens: &[u32]) -> pagedkv::Result<()> {
    let start = cache.table(seq)?.len();
    let layout = cache.layout().clone();
    for (i, token) in tokens.iter().enumerate() {
        for layer in 0..layout.layers() {
            let (k, v) = kv_row(&layout, layer, start + i, *token);
            cache.write_token(seq, layer, start + i, &k, &v)?;
        }
    }
    cache.commit(seq, tokens)
}

pub fn main() -> Result<(), Box<dyn std::error::Error>> {
    // a model with 4 layers, 2 kv heads and 4 query heads of 64 channels; int4 K/V in blocks of 16
    let layout = KvLayout::new(LayoutSpec::new(4, 2, 4, 64, Codec::Int4))?;
    let mut cache = KvCacheManager::with_budget(layout.clone(), 4 << 20, b"my-model v1")?;
    // cached blocks evicted from the pool wait in 16 MiB of host memory
    cache.set_prefix_tier(TieredStore::in_memory(16 << 20));
    println!(
        "{} blocks of {} tokens, {:.0} KV bytes per token",
        cache.pool().num_blocks(),
        layout.block_size(),
        layout.kv_bytes_per_token()
    );

    // two prompts sharing a 48-token system prompt
    let system: Vec<u32> = (1..=48).collect();
    let first: Vec<u32> = system.iter().copied().chain([100, 101, 102]).collect();
    let second: Vec<u32> = system.iter().copied().chain([200, 201]).collect();

    let a = SeqId(1);
    let admitted = cache.admit(a, &first)?; // nothing cached yet: room for every token
    compute(&mut cache, a, &first[admitted.cached_tokens..])?;
    let b = SeqId(2);
    let admitted = cache.admit(b, &second)?; // the system prompt's 3 full blocks come from `a`
    println!(
        "second prompt: {} of {} tokens from the cache ({:?})",
        admitted.cached_tokens,
        second.len(),
        admitted.report.reason
    );
    assert_eq!(admitted.cached_tokens, 48);
    compute(&mut cache, b, &second[admitted.cached_tokens..])?;

    // attention for the next token of `b`: one query per query head, over the paged cache
    let (heads, d) = (layout.query_heads(), layout.head_dim());
    let q: Vec<f32> = (0..heads * d)
        .map(|i| (i % 11) as f32 / 10.0 - 0.5)
        .collect();
    let mut out = vec![0f32; heads * d];
    let table = cache.table(b)?;
    let ctx = Context {
        blocks: table.blocks(),
        len: table.len(),
    };
    attention::attend(
        cache.storage(),
        0,
        ctx,
        &q,
        1.0 / (d as f32).sqrt(),
        &mut out,
        &mut Scratch::default(),
    )?;
    println!("attention output, head 0: {:.4?}", &out[..4]);

    // a fork shares the blocks holding its tokens; reserving copies the shared last block
    let c = SeqId(3);
    cache.fork(b, c)?;
    cache.reserve(c, 1)?;
    compute(&mut cache, c, &[300])?;
    cache.reserve(b, 1)?;
    compute(&mut cache, b, &[400])?;
    println!(
        "after the fork: {} and {} tokens, blocks {:?} and {:?}",
        cache.table(b)?.len(),
        cache.table(c)?.len(),
        cache.table(b)?.blocks(),
        cache.table(c)?.blocks()
    );

    for seq in [a, b, c] {
        cache.free(seq)?;
    }
    cache
        .check_invariants()
        .map_err(|_| pagedkv::KvError::InvalidBlock(pagedkv::BlockId(0)))?;
    println!("prefix cache: {:?}", cache.prefix_stats());
    Ok(())
}
