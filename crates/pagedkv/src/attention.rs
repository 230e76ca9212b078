//! Paged attention over the cache (DESIGN §7): a scalar f64 reference (the test oracle) and the
//! f32 kernel the model runs. One pass per kv head over the sequence's blocks serves every query
//! head of its GQA group; softmax is computed online, one block at a time, so no score vector of
//! the whole context is ever built.
//!
//! Query head `j` reads kv head `j / group` (the Llama `repeat_kv` convention), so the query rows
//! of one kv head are contiguous in `q`: `q[(h·group + g)·head_dim ..]`.

use half::slice::HalfFloatSliceExt;

use crate::block::BlockId;
use crate::error::{KvError, Result};
use crate::storage::{KvStorage, PageRef};

/// The part of a sequence one query attends to: its block table and the number of positions
/// visible to the query (causal limit), `1 ..= blocks.len() · block_size`.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The sequence's block table.
    pub blocks: &'a [BlockId],
    /// Positions `0 .. len` are attended to.
    pub len: usize,
}

/// Reusable buffers of the f32 kernel, sized on first use.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    scores: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    page: Vec<f32>,
}

fn check(storage: &KvStorage, ctx: &Context, q: &[f32], out: &[f32]) -> Result<()> {
    let layout = storage.layout();
    let width = layout.query_heads() * layout.head_dim();
    if q.len() != width {
        return Err(KvError::ShapeMismatch {
            what: "query",
            expected: width,
            got: q.len(),
        });
    }
    if out.len() != width {
        return Err(KvError::ShapeMismatch {
            what: "attention output",
            expected: width,
            got: out.len(),
        });
    }
    let capacity = ctx.blocks.len() * layout.block_size();
    if ctx.len == 0 || ctx.len > capacity {
        return Err(KvError::IndexOutOfRange {
            what: "context length",
            index: ctx.len,
            limit: capacity + 1,
        });
    }
    Ok(())
}

/// Dot product with 16 independent partial sums, so the compiler can keep them in vector lanes
/// (a single running sum forces strictly sequential float adds).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (a_main, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_main, b_tail) = b.split_at(a_main.len());
    for (ca, cb) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline]
fn axpy(acc: &mut [f32], p: f32, v: &[f32]) {
    acc.iter_mut().zip(v).for_each(|(a, x)| *a += p * x);
}

/// The first `len` elements of a page as f32: borrowed for f32 pages (and open blocks' staging),
/// converted in bulk (F16C where available) or decoded by the codec into `buf` otherwise. One
/// page at a time, never the whole context; fused per-codec reading is the kernel work of
/// DESIGN §7.
fn page_f32<'a>(
    page: PageRef<'a>,
    len: usize,
    bs: usize,
    d: usize,
    buf: &'a mut Vec<f32>,
) -> Result<&'a [f32]> {
    Ok(match page {
        PageRef::F32(p) => &p[..len],
        PageRef::F16(p) => {
            buf.resize(len, 0.0);
            p[..len].convert_to_f32_slice(buf);
            buf
        }
        PageRef::Bf16(p) => {
            buf.resize(len, 0.0);
            p[..len].convert_to_f32_slice(buf);
            buf
        }
        packed @ PageRef::Packed { .. } => {
            buf.resize(len, 0.0);
            packed.to_f32(bs, d, buf)?;
            buf
        }
    })
}

/// Attention of one query token (all query heads) over `ctx`, written to `out`
/// (`query_heads × head_dim`). f32 arithmetic, stored elements converted in registers.
pub fn attend(
    storage: &KvStorage,
    layer: usize,
    ctx: Context,
    q: &[f32],
    scale: f32,
    out: &mut [f32],
    scratch: &mut Scratch,
) -> Result<()> {
    check(storage, &ctx, q, out)?;
    let layout = storage.layout();
    let (d, bs, group) = (layout.head_dim(), layout.block_size(), layout.group_size());
    scratch.scores.resize(group * bs, 0.0);
    scratch.acc.resize(group * d, 0.0);
    scratch.max.resize(group, 0.0);
    scratch.sum.resize(group, 0.0);
    for head in 0..layout.kv_heads() {
        let qs = &q[head * group * d..(head + 1) * group * d];
        scratch.acc.fill(0.0);
        scratch.max.fill(f32::NEG_INFINITY);
        scratch.sum.fill(0.0);
        for (block_idx, block) in ctx.blocks.iter().enumerate() {
            let start = block_idx * bs;
            if start >= ctx.len {
                break;
            }
            let n = (ctx.len - start).min(bs);
            let keys = page_f32(
                storage.key_page(layer, *block, head)?,
                n * d,
                bs,
                d,
                &mut scratch.page,
            )?;
            for (g, qg) in qs.chunks_exact(d).enumerate() {
                for (t, key) in keys.chunks_exact(d).enumerate() {
                    scratch.scores[g * bs + t] = dot(qg, key) * scale;
                }
            }
            // online softmax: rescale the running sums once per block
            for g in 0..group {
                let scores = &mut scratch.scores[g * bs..g * bs + n];
                let block_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let new_max = scratch.max[g].max(block_max);
                let correction = (scratch.max[g] - new_max).exp();
                scratch.max[g] = new_max;
                scratch.sum[g] *= correction;
                scratch.acc[g * d..(g + 1) * d]
                    .iter_mut()
                    .for_each(|a| *a *= correction);
                for s in scores.iter_mut() {
                    *s = (*s - new_max).exp();
                    scratch.sum[g] += *s;
                }
            }
            let values = page_f32(
                storage.value_page(layer, *block, head)?,
                n * d,
                bs,
                d,
                &mut scratch.page,
            )?;
            for g in 0..group {
                let probs = &scratch.scores[g * bs..g * bs + n];
                let acc = &mut scratch.acc[g * d..(g + 1) * d];
                for (p, v) in probs.iter().zip(values.chunks_exact(d)) {
                    axpy(acc, *p, v);
                }
            }
        }
        for g in 0..group {
            let inv = 1.0 / scratch.sum[g];
            let dst = &mut out[(head * group + g) * d..(head * group + g + 1) * d];
            dst.iter_mut()
                .zip(&scratch.acc[g * d..(g + 1) * d])
                .for_each(|(o, a)| *o = a * inv);
        }
    }
    Ok(())
}

/// The oracle: the same attention on the stored values (the codec's reconstruction) with f64
/// accumulation and a plain two-pass softmax.
pub fn attend_reference(
    storage: &KvStorage,
    layer: usize,
    ctx: Context,
    q: &[f32],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    check(storage, &ctx, q, out)?;
    let layout = storage.layout();
    let (d, bs) = (layout.head_dim(), layout.block_size());
    // every visible token's K and V per kv head, as f32
    let mut keys = vec![vec![0f32; ctx.len * d]; layout.kv_heads()];
    let mut values = vec![vec![0f32; ctx.len * d]; layout.kv_heads()];
    let mut page = vec![0f32; bs * d];
    for head in 0..layout.kv_heads() {
        for (block_idx, block) in ctx.blocks.iter().enumerate().take(ctx.len.div_ceil(bs)) {
            let n = (ctx.len - block_idx * bs).min(bs);
            let span = block_idx * bs * d..(block_idx * bs + n) * d;
            storage
                .key_page(layer, *block, head)?
                .to_f32(bs, d, &mut page)?;
            keys[head][span.clone()].copy_from_slice(&page[..n * d]);
            storage
                .value_page(layer, *block, head)?
                .to_f32(bs, d, &mut page)?;
            values[head][span].copy_from_slice(&page[..n * d]);
        }
    }
    for qh in 0..layout.query_heads() {
        let head = qh / layout.group_size();
        let qv = &q[qh * d..(qh + 1) * d];
        let scores: Vec<f64> = keys[head]
            .chunks_exact(d)
            .map(|k| {
                qv.iter()
                    .zip(k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = vec![0f64; d];
        for (w, v) in weights.iter().zip(values[head].chunks_exact(d)) {
            for (a, x) in acc.iter_mut().zip(v) {
                *a += w * *x as f64;
            }
        }
        for (o, a) in out[qh * d..(qh + 1) * d].iter_mut().zip(&acc) {
            *o = (a / total) as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Codec;
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
        let mut s = KvStorage::new(layout, blocks.len()).unwrap();
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
                s.seal(blocks[pos / 4]).unwrap();
            }
        }
        (s, blocks)
    }

    #[test]
    fn kernel_matches_reference_for_mha_gqa_mqa() {
        for codec in Codec::FIXED {
            for (kv, qh) in [(3, 3), (3, 9), (1, 4)] {
                for tokens in [1, 3, 4, 13] {
                    let (s, blocks) = filled(codec, kv, qh, tokens);
                    let q: Vec<f32> = (0..qh * 32)
                        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0)
                        .collect();
                    let ctx = Context {
                        blocks: &blocks,
                        len: tokens,
                    };
                    let (mut fast, mut slow) = (vec![0.0; qh * 32], vec![0.0; qh * 32]);
                    attend(&s, 0, ctx, &q, 0.35, &mut fast, &mut Scratch::default()).unwrap();
                    attend_reference(&s, 0, ctx, &q, 0.35, &mut slow).unwrap();
                    let scale = slow.iter().fold(0f32, |m, x| m.max(x.abs()));
                    for (a, b) in fast.iter().zip(&slow) {
                        assert!(
                            (a - b).abs() <= 1e-5 * scale.max(1.0),
                            "{codec} {kv}/{qh} {tokens}: {a} vs {b}"
                        );
                    }
                }
            }
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
}
