//! The kernel against the f64 reference, per codec, geometry and path.

use super::*;
use crate::codec::{Codec, Role};
use crate::layout::{KvLayout, LayoutSpec};

fn filled(
    codec: Codec,
    kv_heads: usize,
    query_heads: usize,
    tokens: usize,
) -> (KvStorage, Vec<BlockId>) {
    let mut spec = LayoutSpec::new(1, kv_heads, query_heads, 32, codec);
    spec.block_size = 4;
    let layout = KvLayout::new(spec).unwrap();
    let blocks: Vec<BlockId> = (0..tokens.div_ceil(4) as u32).rev().map(BlockId).collect();
    let mut s = KvStorage::new(layout.clone(), blocks.len()).unwrap();
    let mut x = 0.37f32;
    let mut next = || {
        x = (x * 9.1 + 0.3).fract();
        x * 4.0 - 2.0
    };
    for pos in 0..tokens {
        let k: Vec<f32> = (0..layout.token_width()).map(|_| next()).collect();
        let v: Vec<f32> = (0..layout.token_width()).map(|_| next()).collect();
        s.write_token(0, blocks[pos / 4], pos % 4, &k, &v).unwrap();
        if pos % 4 == 3 {
            // full blocks are sealed; the last, partial one stays open (f32 staging)
            s.seal(blocks[pos / 4], pos / 4 * 4).unwrap();
        }
    }
    (s, blocks)
}

/// A one-layer storage of `layout` holding `tokens` tokens of smooth test rows, full blocks
/// sealed (the last, partial one open), in a block table of descending ids; the first key
/// scaled by `first_key`.
fn filled_layout(layout: KvLayout, tokens: usize, first_key: f32) -> (KvStorage, Vec<BlockId>) {
    let (width, bs) = (layout.token_width(), layout.block_size());
    let blocks: Vec<BlockId> = (0..tokens.div_ceil(bs) as u32).rev().map(BlockId).collect();
    let mut s = KvStorage::new(layout, blocks.len()).unwrap();
    for pos in 0..tokens {
        let boost = if pos == 0 { first_key } else { 1.0 };
        let k: Vec<f32> = (0..width)
            .map(|i| ((pos * 13 + i * 7) as f32 * 0.031).sin() * 2.0 * boost)
            .collect();
        let v: Vec<f32> = (0..width)
            .map(|i| ((pos * 5 + i * 3) as f32 * 0.017).cos())
            .collect();
        s.write_token(0, blocks[pos / bs], pos % bs, &k, &v)
            .unwrap();
        if pos % bs == bs - 1 {
            s.seal(blocks[pos / bs], pos / bs * bs).unwrap();
        }
    }
    (s, blocks)
}

/// The dispatch levels this CPU runs, printed under the test's name (`--nocapture` shows
/// them), with the levels it cannot run, whose kernels this machine leaves untested.
fn levels(test: &str) -> Vec<Simd> {
    let ran = Simd::levels();
    let missing: Vec<Simd> = Simd::ALL.into_iter().filter(|l| !ran.contains(l)).collect();
    println!("{test}: ran {ran:?}; not on this CPU: {missing:?}");
    ran
}

/// Attention of `q` over the first `len` positions at every level in `levels`, each within
/// 1e-4 of the f64 reference; returns the output of the widest.
fn every_level_matches_the_reference(
    levels: &[Simd],
    s: &KvStorage,
    blocks: &[BlockId],
    len: usize,
    q: &[f32],
    scale: f32,
    what: &str,
) -> Vec<f32> {
    let ctx = Context { blocks, len };
    let mut slow = vec![0.0; q.len()];
    attend_reference(s, 0, ctx, q, scale, &mut slow).unwrap();
    let mut out = vec![0.0; q.len()];
    for &level in levels {
        let mut scratch = Scratch::at(level).unwrap();
        attend(s, 0, ctx, q, scale, &mut out, &mut scratch).unwrap();
        assert_close(&out, &slow, &format!("{what}, {level}"));
    }
    out
}

fn every_codec() -> Vec<Codec> {
    let mut all = Codec::FIXED.to_vec();
    all.extend([
        Codec::FibQuant { k: 2, n: 256 },
        Codec::FibQuant { k: 4, n: 256 },
        Codec::FibQuant { k: 2, n: 16 },
    ]);
    all
}

fn assert_close(fast: &[f32], slow: &[f32], what: &str) {
    let scale = slow.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    for (a, b) in fast.iter().zip(slow) {
        assert!((a - b).abs() <= 1e-4 * scale, "{what}: {a} vs {b}");
    }
}

/// Decode (one query over the whole context) and prefill (one query per position, each
/// seeing the positions up to its own: the causal mask) against the f64 reference, for every
/// codec, MHA / GQA 9:3 / MQA, contexts that are and are not whole blocks, and length 1.
#[test]
fn kernel_matches_reference_for_every_codec_mha_gqa_mqa_decode_and_prefill() {
    let levels = levels("kernel_matches_reference");
    for codec in every_codec() {
        for (kv, qh) in [(3, 3), (3, 9), (1, 4)] {
            for tokens in [1, 3, 4, 13] {
                let (s, blocks) = filled(codec, kv, qh, tokens);
                for len in 1..=tokens {
                    let q: Vec<f32> = (0..qh * 32)
                        .map(|i| ((i * 7 % 11 + len) as f32 - 5.0) / 3.0)
                        .collect();
                    let what = format!("{codec} {kv}/{qh} {tokens} tokens, position {len}");
                    every_level_matches_the_reference(&levels, &s, &blocks, len, &q, 0.35, &what);
                }
            }
        }
    }
}

/// Normalized FibQuant keys (a RoPE-rotated mean removed): the kernel
/// scores them as the reference's restored reconstruction, in decode, prefill and split-K,
/// with FibQuant or other values.
#[test]
fn normalized_keys_match_the_reference() {
    let levels = levels("normalized_keys");
    use crate::key_norm::KeyNorm;
    let (kv, qh) = (3, 9);
    let fib = Codec::FibQuant { k: 4, n: 256 };
    // the table path (blocks of 4) and the AVX-512 path (blocks of 16, head_dim 64)
    // and split keys (the pairs' bits allocated by a plan)
    for (((d, bs), value), split_keys) in [(32, 4), (64, 16)]
        .into_iter()
        .flat_map(|g| [fib, Codec::F16, Codec::Int4].map(|v| (g, v)))
        .flat_map(|c| [(c, false), (c, true)])
    {
        let means: Vec<f32> = (0..kv * d)
            .map(|i| ((i * 5 % 7) as f32 - 3.0) * 1.5)
            .collect();
        let mut spec = LayoutSpec::new(1, kv, qh, d, fib);
        spec.value_codec = value;
        spec.block_size = bs;
        let norm = KeyNorm::new(1, kv, d, bs, 10_000.0, means.clone()).unwrap();
        spec.key_norm = Some(std::sync::Arc::new(norm));
        if split_keys {
            let pairs = kv * d / 2;
            let keys: Vec<f64> = (0..pairs).map(|i| 1.0 + (i * 13 % 17) as f64).collect();
            let queries: Vec<f64> = (0..pairs).map(|i| 0.5 + (i * 5 % 7) as f64).collect();
            let plan = crate::SplitPlan::fit(fib, d, &keys, &queries).unwrap();
            let split = crate::KeySplit::new(kv, d, vec![Some(plan)]).unwrap();
            spec.key_split = Some(std::sync::Arc::new(split));
        }
        let layout = KvLayout::new(spec).unwrap();
        assert_eq!(layout.key_split(0).is_some(), split_keys);
        let tokens = bs * 40 + 3;
        let blocks: Vec<BlockId> = (0..tokens.div_ceil(bs) as u32).map(BlockId).collect();
        let mut s = KvStorage::new(layout.clone(), blocks.len()).unwrap();
        let mut shift = vec![0f32; d];
        for pos in 0..tokens {
            let mut k: Vec<f32> = (0..kv * d)
                .map(|i| ((pos * 31 + i * 7) as f32 * 0.01).sin())
                .collect();
            let v: Vec<f32> = (0..kv * d)
                .map(|i| ((pos * 17 + i * 5) as f32 * 0.02).cos())
                .collect();
            for h in 0..kv {
                layout.key_norm(0).unwrap().shift(0, h, pos, &mut shift);
                k[h * d..(h + 1) * d]
                    .iter_mut()
                    .zip(&shift)
                    .for_each(|(x, m)| *x += m);
            }
            s.write_token(0, blocks[pos / bs], pos % bs, &k, &v)
                .unwrap();
            if pos % bs == bs - 1 {
                s.seal(blocks[pos / bs], pos / bs * bs).unwrap();
            }
        }
        for len in [1, 5, 64, tokens] {
            let q: Vec<f32> = (0..qh * d)
                .map(|i| ((i + len) as f32 * 0.37).cos())
                .collect();
            let ctx = Context {
                blocks: &blocks,
                len,
            };
            let what = format!("{fib}/{value} normalized keys (split {split_keys}), length {len}");
            let (mut split, mut slow) = (vec![0.0; qh * d], vec![0.0; qh * d]);
            every_level_matches_the_reference(&levels, &s, &blocks, len, &q, 0.3, &what);
            attend_split(&s, 0, ctx, &q, 0.3, &mut split).unwrap();
            attend_reference(&s, 0, ctx, &q, 0.3, &mut slow).unwrap();
            assert_close(&split, &slow, &format!("{what}, split"));
        }
    }
}

/// The split-K parallel kernel merges block ranges into exactly the sequential result.
#[test]
fn split_context_merges_to_the_same_output() {
    for codec in every_codec() {
        let mut spec = LayoutSpec::new(1, 3, 9, 32, codec);
        spec.block_size = 4;
        let layout = KvLayout::new(spec).unwrap();
        let tokens: usize = 4 * 70 + 3;
        let blocks: Vec<BlockId> = (0..tokens.div_ceil(4) as u32).map(BlockId).collect();
        let mut s = KvStorage::new(layout.clone(), blocks.len()).unwrap();
        for pos in 0..tokens {
            let k: Vec<f32> = (0..96)
                .map(|i| ((pos * 31 + i * 7) as f32 * 0.01).sin() * 3.0)
                .collect();
            let v: Vec<f32> = (0..96)
                .map(|i| ((pos * 17 + i * 5) as f32 * 0.02).cos())
                .collect();
            s.write_token(0, blocks[pos / 4], pos % 4, &k, &v).unwrap();
            if pos % 4 == 3 {
                s.seal(blocks[pos / 4], pos / 4 * 4).unwrap();
            }
        }
        let q: Vec<f32> = (0..9 * 32).map(|i| (i as f32 * 0.21).cos()).collect();
        // 30 tokens: one range per kv head, run on the calling thread; all tokens: nine
        // ranges, run on rayon's pool
        for len in [30, tokens] {
            let ctx = Context {
                blocks: &blocks,
                len,
            };
            let (mut one, mut split, mut slow) = (vec![0.0; 288], vec![0.0; 288], vec![0.0; 288]);
            attend(&s, 0, ctx, &q, 0.3, &mut one, &mut Scratch::default()).unwrap();
            attend_split(&s, 0, ctx, &q, 0.3, &mut split).unwrap();
            attend_reference(&s, 0, ctx, &q, 0.3, &mut slow).unwrap();
            assert_close(&split, &slow, &format!("{codec} {len} split"));
            // same ranges, same merge order: one thread or many, the same bits
            assert_eq!(one, split, "{codec} {len}");
            assert_close(&one, &slow, &format!("{codec} {len} one pass"));
        }
    }
}

/// Sink tokens kept in f16 beside a sealed first block (scored and weighted from those rows,
/// the block's other tokens from their codes), at SmolLM2's geometry where the AVX-512 loops
/// run: fast, portable and split passes against the reference, and different from the same
/// cache without sinks (the rows are used). The first token's key is large, as an attention
/// sink's score is.
#[test]
fn sink_rows_beside_a_sealed_block_match_the_reference() {
    let levels = levels("sink_rows");
    let (d, kv, qh, tokens): (usize, usize, usize, usize) = (64, 3, 9, 16 * 3 + 5);
    for codec in every_codec() {
        let mut outputs = Vec::new();
        for sinks in [0, 4] {
            let mut spec = LayoutSpec::new(1, kv, qh, d, codec);
            spec.block_size = 16;
            spec.sink_tokens = sinks;
            let (s, blocks) = filled_layout(KvLayout::new(spec).unwrap(), tokens, 3.0);
            let has_rows = s.sink_rows(0, blocks[0], 2, Role::Value).is_some();
            assert_eq!(has_rows, sinks > 0 && !codec.is_full_precision(), "{codec}");
            let q: Vec<f32> = (0..qh * d).map(|i| (i as f32 * 0.11).sin()).collect();
            for len in [3, 16, 40, tokens] {
                let ctx = Context {
                    blocks: &blocks,
                    len,
                };
                let what = format!("{codec} sinks {sinks} len {len}");
                let fast =
                    every_level_matches_the_reference(&levels, &s, &blocks, len, &q, 0.125, &what);
                let (mut split, mut slow) = (vec![0.0; qh * d], vec![0.0; qh * d]);
                attend_split(&s, 0, ctx, &q, 0.125, &mut split).unwrap();
                attend_reference(&s, 0, ctx, &q, 0.125, &mut slow).unwrap();
                assert_close(&split, &slow, &format!("{what} split"));
                if len == tokens {
                    outputs.push(fast);
                }
            }
        }
        if !codec.is_full_precision() {
            assert_ne!(outputs[0], outputs[1], "{codec}: the sink rows are read");
        }
    }
}

/// SmolLM2's geometry (blocks of 16, head_dim 64, 9/3 heads), where the AVX-512 loops
/// (block scores, softmax step, value accumulation) run: against the reference and the
/// portable build, for full blocks, partial ones and a single token.
#[test]
fn simd_loops_match_the_reference_at_smollm_geometry() {
    let levels = levels("simd_loops");
    // head_dim 64 as SmolLM2, and 128 (two 64-channel chunks, eight FibQuant chunks); a
    // group of 20 query heads (more than the 16 whose key terms stay in registers, and a
    // last group of 4 heads after 16)
    for (d, kv, qh) in [(64, 3, 9), (128, 3, 9), (64, 1, 20)] {
        for codec in every_codec() {
            let mut spec = LayoutSpec::new(1, kv, qh, d, codec);
            spec.block_size = 16;
            let tokens: usize = 16 * 5 + 7;
            let (s, blocks) = filled_layout(KvLayout::new(spec).unwrap(), tokens, 1.0);
            for len in [1, 9, 16, 17, 40, tokens] {
                let q: Vec<f32> = (0..qh * d)
                    .map(|i| ((i + len) as f32 * 0.11).sin() * 1.5)
                    .collect();
                let what = format!("{codec} d {d} {kv}/{qh} len {len}");
                every_level_matches_the_reference(&levels, &s, &blocks, len, &q, 0.125, &what);
            }
        }
    }
}

#[test]
fn blocks_read_in_one_call_match_the_reference() {
    // the whole-block kernels run at the AVX-512 and AVX2 levels: `levels` says which ran
    let levels = levels("blocks_read_in_one_call");
    // every pair of f16, bf16, integer and fp8 key and value codecs (the kernels' pairs and
    // the ones they leave to the page readers); groups of 1 (MHA), 3 (GQA), 4 (MQA, the most
    // heads read in one turn) and 9 (MQA, three turns); keys growing
    // along the context so the softmax reference point moves inside a run of blocks
    let ints = [
        Codec::F16,
        Codec::Bf16,
        Codec::Int8,
        Codec::Int4,
        Codec::Int2,
        Codec::Fp8E4m3,
        Codec::Fp8E5m2,
    ];
    let d = 64;
    for (key_codec, value_codec) in ints.iter().flat_map(|k| ints.iter().map(move |v| (*k, *v))) {
        for (kv, qh) in [(3, 3), (3, 9), (1, 4), (1, 9)] {
            let mut spec = LayoutSpec::new(1, kv, qh, d, key_codec);
            spec.value_codec = value_codec;
            spec.block_size = 16;
            let layout = KvLayout::new(spec).unwrap();
            let width = layout.token_width();
            let tokens: usize = 16 * 6 + 5;
            let blocks: Vec<BlockId> = (0..tokens.div_ceil(16) as u32).map(BlockId).collect();
            let mut s = KvStorage::new(layout, blocks.len()).unwrap();
            for pos in 0..tokens {
                let growth = 1.0 + pos as f32 * 0.08;
                let k: Vec<f32> = (0..width)
                    .map(|i| ((pos * 13 + i * 7) as f32 * 0.031).sin() * 2.0 * growth)
                    .collect();
                let v: Vec<f32> = (0..width)
                    .map(|i| ((pos * 5 + i * 3) as f32 * 0.017).cos() + 0.3)
                    .collect();
                s.write_token(0, blocks[pos / 16], pos % 16, &k, &v)
                    .unwrap();
                if pos % 16 == 15 {
                    s.seal(blocks[pos / 16], pos / 16 * 16).unwrap();
                }
            }
            let q: Vec<f32> = (0..qh * d).map(|i| (i as f32 * 0.23).sin() * 1.5).collect();
            for len in [1, 16, 40, 80, tokens] {
                let what = format!("{key_codec}/{value_codec} {kv}/{qh} len {len}");
                every_level_matches_the_reference(&levels, &s, &blocks, len, &q, 0.125, &what);
            }
        }
    }
}

/// A full-precision layer inside a compressed layout (a per-layer override) is read from its
/// packed pages like any other.
#[test]
fn an_overridden_full_precision_layer_matches_the_reference() {
    for high in [Codec::F32, Codec::F16, Codec::Bf16] {
        let mut spec = LayoutSpec::new(2, 3, 9, 32, Codec::Int4);
        spec.block_size = 4;
        spec.layer_overrides = vec![crate::LayerOverride {
            layers: crate::LayerSet::of([1]).unwrap(),
            key_codec: high,
            value_codec: high,
        }];
        let layout = KvLayout::new(spec).unwrap();
        let blocks: Vec<BlockId> = (0..4).map(BlockId).collect();
        let mut s = KvStorage::new(layout, 4).unwrap();
        for pos in 0..14 {
            let k: Vec<f32> = (0..96)
                .map(|i| ((pos * 7 + i) as f32 * 0.13).sin())
                .collect();
            for layer in 0..2 {
                s.write_token(layer, blocks[pos / 4], pos % 4, &k, &k)
                    .unwrap();
            }
            if pos % 4 == 3 {
                s.seal(blocks[pos / 4], pos / 4 * 4).unwrap();
            }
        }
        assert!(matches!(
            s.key_page(1, blocks[0], 0).unwrap(),
            crate::PageRef::Packed { .. }
        ));
        let q: Vec<f32> = (0..9 * 32).map(|i| (i as f32 * 0.07).cos()).collect();
        let ctx = Context {
            blocks: &blocks,
            len: 14,
        };
        let (mut fast, mut slow) = (vec![0.0; 288], vec![0.0; 288]);
        attend(&s, 1, ctx, &q, 0.3, &mut fast, &mut Scratch::default()).unwrap();
        attend_reference(&s, 1, ctx, &q, 0.3, &mut slow).unwrap();
        assert_close(&fast, &slow, &format!("{high} layer in int4"));
    }
}

/// One scratch reused across codecs, heads and lengths gives the same results as fresh ones.
#[test]
fn scratch_reuse_does_not_leak_state() {
    let mut scratch = Scratch::default();
    for codec in every_codec() {
        let (s, blocks) = filled(codec, 3, 9, 13);
        let q: Vec<f32> = (0..9 * 32).map(|i| (i as f32 * 0.13).sin()).collect();
        let ctx = Context {
            blocks: &blocks,
            len: 13,
        };
        let (mut reused, mut fresh) = (vec![0.0; 9 * 32], vec![0.0; 9 * 32]);
        attend(&s, 0, ctx, &q, 0.2, &mut reused, &mut scratch).unwrap();
        attend(&s, 0, ctx, &q, 0.2, &mut fresh, &mut Scratch::default()).unwrap();
        assert_eq!(reused, fresh, "{codec}");
    }
}

#[test]
fn bad_shapes_are_errors() {
    let (s, blocks) = filled(Codec::F32, 3, 9, 5);
    let q = vec![0.0; 9 * 32];
    let mut out = vec![0.0; 9 * 32];
    let ctx = |len| Context {
        blocks: &blocks,
        len,
    };
    assert!(matches!(
        attend(&s, 0, ctx(0), &q, 1.0, &mut out, &mut Scratch::default()),
        Err(KvError::IndexOutOfRange { .. })
    ));
    assert!(matches!(
        attend(&s, 0, ctx(9), &q, 1.0, &mut out, &mut Scratch::default()),
        Err(KvError::IndexOutOfRange { .. })
    ));
    assert!(matches!(
        attend(
            &s,
            0,
            ctx(5),
            &q[1..],
            1.0,
            &mut out,
            &mut Scratch::default()
        ),
        Err(KvError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        attend_reference(&s, 0, ctx(5), &q, 1.0, &mut out[2..]),
        Err(KvError::ShapeMismatch { .. })
    ));
}

/// A block table naming a block the storage does not have is an error at every level, also
/// where a whole-block kernel would read the blocks (sealed int4 pages at SmolLM2's geometry,
/// and f16 at blocks of 8), not a panic.
#[test]
fn a_block_outside_the_storage_is_an_error_on_every_path() {
    let levels = levels("a_block_outside_the_storage");
    for (codec, bs) in [(Codec::Int4, 16), (Codec::Int8, 8), (Codec::F16, 16)] {
        let mut spec = LayoutSpec::new(1, 3, 9, 64, codec);
        spec.block_size = bs;
        let (s, mut blocks) = filled_layout(KvLayout::new(spec).unwrap(), 3 * bs, 1.0);
        blocks[1] = BlockId(99);
        let q = vec![0.5; 9 * 64];
        let mut out = vec![0.0; 9 * 64];
        let ctx = Context {
            blocks: &blocks,
            len: 3 * bs,
        };
        for &simd in &levels {
            for path in [AttentionPath::Exact, AttentionPath::Fast] {
                let dispatch = Dispatch {
                    simd,
                    path,
                    prefetch: Prefetch::default(),
                };
                let mut scratch = Scratch::with(dispatch).unwrap();
                let result = attend(&s, 0, ctx, &q, 0.125, &mut out, &mut scratch);
                assert!(
                    matches!(result, Err(KvError::InvalidBlock(BlockId(99)))),
                    "{codec}, blocks of {bs}, {simd}, {path}: {result:?}"
                );
            }
        }
    }
}

/// Which pages are prefetched changes no bit of the output: full-precision, compressed and
/// mixed layouts, whole-block kernels and page readers (blocks of 16 and 24), every level and
/// path, one call and split-K; and each role's pages are prefetched by their own codec, by
/// default exactly the compressed codecs' pages.
#[test]
fn prefetching_changes_no_bit_of_the_output() {
    let levels = levels("prefetching_changes_no_bit");
    for codec in Codec::FIXED {
        assert_eq!(
            Prefetch::default().fetches(codec),
            !codec.is_full_precision()
        );
        assert!(Prefetch::All.fetches(codec) && !Prefetch::Off.fetches(codec));
    }
    // each role by its own codec: f16 keys beside int8 values
    let mut spec = LayoutSpec::new(1, 3, 9, 64, Codec::F16);
    spec.value_codec = Codec::Int8;
    let mixed = KvLayout::new(spec).unwrap();
    let fetch = |prefetch| {
        let f = super::pages::Fetch::of(prefetch, &mixed, 0, 8192);
        (f.keys, f.values)
    };
    assert_eq!(fetch(Prefetch::Compressed), (false, true));
    assert_eq!(fetch(Prefetch::All), (true, true));
    assert_eq!(fetch(Prefetch::Off), (false, false));
    let pairs = [
        (Codec::F16, Codec::F16),
        (Codec::Int4, Codec::Int4),
        (Codec::F16, Codec::Int8),
    ];
    for ((key_codec, value_codec), bs) in pairs.into_iter().flat_map(|p| [(p, 16), (p, 24)]) {
        let mut spec = LayoutSpec::new(1, 3, 9, 64, key_codec);
        spec.value_codec = value_codec;
        spec.block_size = bs;
        let tokens = 40 * bs + 5;
        let (s, blocks) = filled_layout(KvLayout::new(spec).unwrap(), tokens, 1.0);
        let q: Vec<f32> = (0..9 * 64)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0)
            .collect();
        let ctx = Context {
            blocks: &blocks,
            len: tokens,
        };
        for &simd in &levels {
            for path in [AttentionPath::Exact, AttentionPath::Fast] {
                let outputs: Vec<(Vec<f32>, Vec<f32>)> = Prefetch::ALL
                    .into_iter()
                    .map(|prefetch| {
                        let dispatch = Dispatch {
                            simd,
                            path,
                            prefetch,
                        };
                        let (mut one, mut split) = (vec![0.0; q.len()], vec![0.0; q.len()]);
                        let mut scratch = Scratch::with(dispatch).unwrap();
                        attend(&s, 0, ctx, &q, 0.125, &mut one, &mut scratch).unwrap();
                        attend_split_at(dispatch, &s, 0, ctx, &q, 0.125, &mut split).unwrap();
                        (one, split)
                    })
                    .collect();
                for other in &outputs[1..] {
                    assert_eq!(
                        &outputs[0], other,
                        "{key_codec}/{value_codec}, blocks of {bs}, {simd}, {path}"
                    );
                }
            }
        }
    }
}

/// Llama-family geometries (head_dim 128 with 32/8 and 28/4 heads, head_dim 64 with 32/4 and
/// 14/2), blocks of 8, 16, 32, 64 and an odd size, every codec: decode over two sealed blocks
/// and an open one, at every level this CPU runs, against the f64 reference; a whole-block
/// kernel reads the blocks of 8, 16, 32 and 64 of every codec it has at the AVX-512 and AVX2
/// levels (the test says which).
#[test]
fn every_geometry_and_block_size_matches_the_reference() {
    let levels = levels("every_geometry_and_block_size");
    for (d, qh, kv) in [(128, 32, 8), (128, 28, 4), (64, 32, 4), (64, 14, 2)] {
        for bs in [8, 16, 32, 64, 7] {
            for codec in every_codec() {
                let mut spec = LayoutSpec::new(1, kv, qh, d, codec);
                spec.block_size = bs;
                let layout = KvLayout::new(spec).unwrap();
                #[cfg(target_arch = "x86_64")]
                for &simd in &levels {
                    use pass::Kernel;
                    let kernel = pass::whole_block(&layout, 0, simd, true, AttentionPath::Exact);
                    // blocks of whole 8-token slices at head_dim 64 and 128 are read whole: by
                    // the AVX-512 kernel in slices of 16 where they divide the block, else by
                    // the AVX2 one
                    // (full-precision pages not by the AVX2 one: the page loops are faster there)
                    let read = !matches!(codec, Codec::F32 | Codec::FibQuant { .. });
                    let full = matches!(codec, Codec::F16 | Codec::Bf16);
                    let expected = match simd {
                        Simd::Avx512 if read && bs % 16 == 0 => Some(Kernel::Avx512),
                        Simd::Avx512 | Simd::Avx2 if read && !full && bs % 8 == 0 => {
                            Some(Kernel::Avx2)
                        }
                        _ => None,
                    };
                    assert_eq!(
                        kernel.map(|k| k.kernel),
                        expected,
                        "{codec} d {d} blocks of {bs}, {simd}: the whole-block kernel reads"
                    );
                }
                let tokens = 2 * bs + 3;
                let (s, blocks) = filled_layout(layout, tokens, 1.0);
                let q: Vec<f32> = (0..qh * d)
                    .map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0)
                    .collect();
                for len in [1, bs, tokens] {
                    let what =
                        format!("{codec} d {d} heads {qh}/{kv} blocks of {bs}, length {len}");
                    every_level_matches_the_reference(&levels, &s, &blocks, len, &q, 0.1, &what);
                }
            }
        }
    }
}

/// The fast path against the f64 reference on the codec's reconstruction, within its contract
/// (2e-3 of the output's scale): every integer key/value pair at the fast kernels' geometries
/// (head_dim 64 and 128, blocks of 8, 16, 32 and 64), groups of 1 to 8, keys with outlier
/// channels (a few channels 30× the rest: the case where an 8-bit query fails), contexts of
/// whole blocks and not, decode and split-K; other codecs (read on the exact path) too.
/// Asserts which fast kernel reads each geometry at each level and prints whether each ran.
#[test]
fn fast_path_meets_its_contract_at_every_level() {
    #[cfg(target_arch = "x86_64")]
    let kernel = super::fast_kernel::available();
    #[cfg(not(target_arch = "x86_64"))]
    let kernel = false;
    #[cfg(target_arch = "x86_64")]
    let narrow_kernel = super::block_kernel::avx2::available();
    #[cfg(not(target_arch = "x86_64"))]
    let narrow_kernel = false;
    let levels = levels("fast_path_meets_its_contract");
    println!(
        "fast_path_meets_its_contract: the AVX-512 VNNI/VBMI fast kernel ran: {kernel}; \
         the AVX2 one: {narrow_kernel}"
    );
    let integers = [Codec::Int8, Codec::Int4, Codec::Int2];
    let mut pairs: Vec<(Codec, Codec)> = integers
        .iter()
        .flat_map(|k| integers.iter().map(move |v| (*k, *v)))
        .collect();
    pairs.extend([
        (Codec::F16, Codec::Int4),
        (Codec::Fp8E4m3, Codec::Fp8E4m3),
        (
            Codec::FibQuant { k: 4, n: 256 },
            Codec::FibQuant { k: 4, n: 256 },
        ),
    ]);
    let geometries = [
        (64, 16, 3, 3),
        (64, 16, 6, 3),
        (64, 16, 9, 3),
        (64, 16, 8, 2),
        (64, 32, 14, 2),
        (128, 16, 28, 4),
        (128, 64, 32, 8),
        (128, 32, 8, 8),
        (64, 8, 9, 3),
        (128, 8, 28, 4),
    ];
    for (key_codec, value_codec) in pairs {
        for (d, bs, qh, kv) in geometries {
            let mut spec = LayoutSpec::new(1, kv, qh, d, key_codec);
            spec.value_codec = value_codec;
            spec.block_size = bs;
            let layout = KvLayout::new(spec).unwrap();
            let integer = integers.contains(&key_codec) && integers.contains(&value_codec);
            for &simd in &levels {
                let read = fast_kernel_reads(&layout, 0, simd);
                // a fast kernel reads every integer pair at these geometries on its CPUs: the
                // AVX-512 one blocks of 16-token slices, the AVX2 one the rest and every
                // block at the AVX2 level
                let expected = match simd {
                    Simd::Avx512 if bs % 16 == 0 => kernel,
                    Simd::Avx512 | Simd::Avx2 => narrow_kernel,
                    Simd::Portable => false,
                };
                assert_eq!(
                    read,
                    integer && expected,
                    "{key_codec}/{value_codec} d {d} blocks of {bs}, {simd}: the fast kernel reads"
                );
            }
            let width = layout.token_width();
            let tokens: usize = bs * 9 + 5;
            let blocks: Vec<BlockId> = (0..tokens.div_ceil(bs) as u32).rev().map(BlockId).collect();
            let mut s = KvStorage::new(layout, blocks.len()).unwrap();
            for pos in 0..tokens {
                let k: Vec<f32> = (0..width)
                    .map(|i| {
                        let outlier = if i % d == 5 || i % d == 40 { 30.0 } else { 1.0 };
                        ((pos * 13 + i * 7) as f32 * 0.031).sin() * outlier + 0.2
                    })
                    .collect();
                let v: Vec<f32> = (0..width)
                    .map(|i| ((pos * 5 + i * 3) as f32 * 0.017).cos() + (i % 7) as f32 * 0.1)
                    .collect();
                s.write_token(0, blocks[pos / bs], pos % bs, &k, &v)
                    .unwrap();
                if pos % bs == bs - 1 {
                    s.seal(blocks[pos / bs], pos / bs * bs).unwrap();
                }
            }
            let q: Vec<f32> = (0..qh * d)
                .map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0 + if i % d == 40 { 2.0 } else { 0.0 })
                .collect();
            for len in [bs, bs * 5, tokens] {
                let ctx = Context {
                    blocks: &blocks,
                    len,
                };
                let mut slow = vec![0.0; q.len()];
                let scale = 1.0 / (d as f32).sqrt();
                attend_reference(&s, 0, ctx, &q, scale, &mut slow).unwrap();
                let what = format!(
                    "{key_codec}/{value_codec} d {d} blocks of {bs} heads {qh}/{kv}, length {len}"
                );
                for &simd in &levels {
                    let dispatch = Dispatch {
                        simd,
                        path: AttentionPath::Fast,
                        prefetch: Prefetch::default(),
                    };
                    let mut out = vec![0.0; q.len()];
                    let mut scratch = Scratch::with(dispatch).unwrap();
                    attend(&s, 0, ctx, &q, scale, &mut out, &mut scratch).unwrap();
                    assert_within(&out, &slow, 2e-3, &format!("{what}, {simd}"));
                    let mut split = vec![0.0; q.len()];
                    attend_split_at(dispatch, &s, 0, ctx, &q, scale, &mut split).unwrap();
                    assert_eq!(out, split, "{what}, {simd}: split-K gives the same bits");
                }
            }
        }
    }
}

fn assert_within(fast: &[f32], slow: &[f32], bound: f32, what: &str) {
    let scale = slow.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let worst = fast
        .iter()
        .zip(slow)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0f32, f32::max);
    assert!(
        worst <= bound,
        "{what}: error {worst:.2e} of the output's scale"
    );
}
