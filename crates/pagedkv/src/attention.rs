//! Paged attention over the cache (DESIGN §7): a scalar f64 reference (the test oracle) and the
//! f32 kernel the model runs. One pass per kv head over the sequence's blocks serves every query
//! head of its GQA group; softmax is computed online, one block at a time, so no score vector of
//! the whole context is ever built.
//!
//! Query head `j` reads kv head `j / group` (the Llama `repeat_kv` convention), so the query rows
//! of one kv head are contiguous in `q`: `q[(h·group + g)·head_dim ..]`.

#[allow(unused_macros)] // used by the x86-64 kernels only
/// Runs `$body` with `$h` a constant equal to `$heads` (1 to 4), so that loops over the
/// heads of a group unroll with no count checks.
macro_rules! with_heads {
    ($heads:expr, $h:ident, $body:block) => {
        match $heads {
            1 => {
                const $h: usize = 1;
                $body
            }
            2 => {
                const $h: usize = 2;
                $body
            }
            3 => {
                const $h: usize = 3;
                $body
            }
            _ => {
                const $h: usize = 4;
                $body
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod block_kernel;
mod lut;
mod pages;

use crate::block::BlockId;
use crate::codec::Role;
use crate::error::{KvError, Result};
use crate::storage::{KvStorage, PageRef};

use lut::FibTables;
use pages::{accumulate_values, key_scores, prefetch, softmax_step, PageScratch, Shape};

/// The part of a sequence one query attends to: its block table and the number of positions
/// visible to the query (causal limit), `1 ..= blocks.len() · block_size`.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The sequence's block table.
    pub blocks: &'a [BlockId],
    /// Positions `0 .. len` are attended to.
    pub len: usize,
}

/// Reusable buffers of the kernel, sized on first use.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    scores: Vec<f32>,
    partial: Partial,
    pages: PageScratch,
    fib: FibTables,
    /// Running softmax sums per query head, spread over 16 lanes.
    lanes: Vec<[f32; 16]>,
    /// Split keys: the pass's query tables (see [`crate::SplitPlan::query_tables`]).
    split_tables: Vec<f32>,
    /// Blocks read in one call (`block_kernel`): the query times the softmax scale, and the
    /// values' pending zero-point sums.
    #[cfg(target_arch = "x86_64")]
    scaled_q: Vec<f32>,
    #[cfg(target_arch = "x86_64")]
    zeros: block_kernel::ZeroSums,
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
    if q.iter().any(|x| !x.is_finite()) {
        return Err(KvError::NonFinite { what: "query" });
    }
    Ok(())
}

/// Online-softmax state of one kv head's query group over some blocks: running maximum, sum
/// of exponentials and unnormalized output per query head. Partial states of disjoint block
/// ranges merge exactly (flash-decoding's split-K).
#[derive(Debug, Default, Clone)]
pub struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

impl Partial {
    fn reset(&mut self, group: usize, d: usize) {
        self.max.clear();
        self.max.resize(group, f32::NEG_INFINITY);
        self.sum.clear();
        self.sum.resize(group, 0.0);
        self.acc.clear();
        self.acc.resize(group * d, 0.0);
    }

    /// Folds `other` (another block range of the same heads) into `self`.
    fn merge(&mut self, other: &Partial, d: usize) {
        for g in 0..self.max.len() {
            let max = self.max[g].max(other.max[g]);
            if max == f32::NEG_INFINITY {
                continue;
            }
            let (a, b) = ((self.max[g] - max).exp(), (other.max[g] - max).exp());
            self.sum[g] = self.sum[g] * a + other.sum[g] * b;
            self.acc[g * d..(g + 1) * d]
                .iter_mut()
                .zip(&other.acc[g * d..(g + 1) * d])
                .for_each(|(x, y)| *x = *x * a + y * b);
            self.max[g] = max;
        }
    }

    /// Writes the normalized outputs of the group into `out` (`group × d`).
    fn write(&self, d: usize, out: &mut [f32]) {
        for (g, dst) in out.chunks_exact_mut(d).enumerate() {
            let inv = 1.0 / self.sum[g];
            dst.iter_mut()
                .zip(&self.acc[g * d..(g + 1) * d])
                .for_each(|(o, a)| *o = a * inv);
        }
    }
}

/// Attention of one query token (all query heads) over `ctx`, written to `out`
/// (`query_heads × head_dim`): each page read in its codec (see `pages`, `lut`), online
/// softmax, on the widest SIMD the CPU offers (runtime detection; [`attend_portable`] is the
/// same code built for the baseline target). Single-threaded: callers run many queries in
/// parallel, or use [`attend_split`] for one long one.
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
    attend_heads(storage, layer, ctx, q, scale, out, scratch, true)
}

/// [`attend`] without SIMD beyond the baseline target: the fallback, and the twin the SIMD
/// builds are tested against.
pub fn attend_portable(
    storage: &KvStorage,
    layer: usize,
    ctx: Context,
    q: &[f32],
    scale: f32,
    out: &mut [f32],
    scratch: &mut Scratch,
) -> Result<()> {
    check(storage, &ctx, q, out)?;
    attend_heads(storage, layer, ctx, q, scale, out, scratch, false)
}

#[allow(clippy::too_many_arguments)]
fn attend_heads(
    storage: &KvStorage,
    layer: usize,
    ctx: Context,
    q: &[f32],
    scale: f32,
    out: &mut [f32],
    scratch: &mut Scratch,
    simd: bool,
) -> Result<()> {
    let layout = storage.layout();
    let (d, group) = (layout.head_dim(), layout.group_size());
    let blocks = ctx.len.div_ceil(layout.block_size());
    let mut partial = std::mem::take(&mut scratch.partial);
    let mut merged = Partial::default();
    for head in 0..layout.kv_heads() {
        let span = head * group * d..(head + 1) * group * d;
        let pass = Pass {
            storage,
            layer,
            head,
            ctx,
            q: &q[span.clone()],
            scale,
        };
        // the same block ranges and merge order as `attend_split`, so both give the same bits
        for (i, range) in ranges(blocks).enumerate() {
            pass.run(range, &mut partial, scratch, simd)?;
            if i == 0 {
                std::mem::swap(&mut merged, &mut partial);
            } else {
                merged.merge(&partial, d);
            }
        }
        merged.write(d, &mut out[span]);
    }
    scratch.partial = partial;
    Ok(())
}

/// Blocks per work item of a pass. Fixed, not derived from the thread count, so that the
/// arithmetic (and thus every output bit) is the same whether ranges run on one thread or
/// many, and a sequence decodes identically alone or in a batch.
const RANGE_BLOCKS: usize = 32;

/// Work items (ranges) per rayon task of [`attend_split`].
const MIN_RANGES_PER_TASK: usize = 4;

/// The block ranges a pass is cut into, in merge order.
fn ranges(blocks: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..blocks.div_ceil(RANGE_BLOCKS).max(1))
        .map(move |i| i * RANGE_BLOCKS..((i + 1) * RANGE_BLOCKS).min(blocks))
}

/// Attention of one query token with its context split over threads: work items are
/// (kv head, range of `RANGE_BLOCKS` blocks) run on rayon's pool; partial
/// states are merged exactly. For decode of few sequences over long contexts, where one
/// thread per query leaves cores idle.
pub fn attend_split(
    storage: &KvStorage,
    layer: usize,
    ctx: Context,
    q: &[f32],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    use rayon::prelude::*;
    check(storage, &ctx, q, out)?;
    let layout = storage.layout();
    let (d, group, heads) = (layout.head_dim(), layout.group_size(), layout.kv_heads());
    let blocks = ctx.len.div_ceil(layout.block_size());
    let items: Vec<(usize, std::ops::Range<usize>)> = (0..heads)
        .flat_map(|h| ranges(blocks).map(move |r| (h, r)))
        .collect();
    let run = |scratch: &mut Scratch, (head, range): &(usize, std::ops::Range<usize>)| {
        let span = head * group * d..(head + 1) * group * d;
        let pass = Pass {
            storage,
            layer,
            head: *head,
            ctx,
            q: &q[span],
            scale,
        };
        let mut partial = Partial::default();
        pass.run(range.clone(), &mut partial, scratch, true)
            .map(|()| (*head, partial))
    };
    // a context of a few ranges runs on the calling thread, without rayon: handing it to a
    // worker costs more than the work (ranges and merge order are the same either way)
    let partials = if items.len() <= MIN_RANGES_PER_TASK {
        let mut scratch = Scratch::default();
        items
            .iter()
            .map(|item| run(&mut scratch, item))
            .collect::<Result<Vec<_>>>()?
    } else {
        items
            .par_iter()
            .with_min_len(MIN_RANGES_PER_TASK)
            .map_init(Scratch::default, run)
            .collect::<Result<Vec<_>>>()?
    };
    for head in 0..heads {
        let mut merged: Option<Partial> = None;
        for (_, p) in partials.iter().filter(|(h, _)| *h == head) {
            match merged.as_mut() {
                None => merged = Some(p.clone()),
                Some(m) => m.merge(p, d),
            }
        }
        if let Some(m) = merged {
            m.write(d, &mut out[head * group * d..(head + 1) * group * d]);
        }
    }
    Ok(())
}

/// How far ahead of the block being read a pass prefetches pages, in bytes of both pages.
const PREFETCH_BYTES: usize = 8192;

/// One kv head's query group over a range of the context's blocks.
#[derive(Clone, Copy)]
struct Pass<'a> {
    storage: &'a KvStorage,
    layer: usize,
    head: usize,
    ctx: Context<'a>,
    /// The group's query rows (`group × d`).
    q: &'a [f32],
    scale: f32,
}

impl Pass<'_> {
    /// The f16 key and value rows of the sink tokens a sealed `block` keeps, if any.
    fn sink_rows(&self, block: BlockId) -> Option<(&[half::f16], &[half::f16])> {
        let keys = self
            .storage
            .sink_rows(self.layer, block, self.head, Role::Key)?;
        let values = self
            .storage
            .sink_rows(self.layer, block, self.head, Role::Value)?;
        Some((keys, values))
    }

    /// The page kinds (keys, values) when this pass's full blocks go through
    /// [`block_kernel`]: a pair of codecs it is built for, SmolLM2's geometry, no per-layer
    /// key transform (`plain`), the CPU able.
    #[cfg(target_arch = "x86_64")]
    fn block_kernel_kinds(&self, simd: bool, plain: bool) -> Option<(usize, usize)> {
        let layout = self.storage.layout();
        let fits = simd
            && plain
            && layout.head_dim() == block_kernel::D
            && layout.block_size() == block_kernel::BS
            && layout.group_size() <= 4
            && block_kernel::available();
        if !fits {
            return None;
        }
        let kb = block_kernel::kind(layout.key_codec(self.layer))?;
        let vb = block_kernel::kind(layout.value_codec(self.layer))?;
        block_kernel::supported(kb, vb).then_some((kb, vb))
    }

    /// Runs on the widest SIMD available when `simd`, else on the baseline target.
    fn run(
        &self,
        blocks: std::ops::Range<usize>,
        partial: &mut Partial,
        scratch: &mut Scratch,
        simd: bool,
    ) -> Result<()> {
        #[cfg(target_arch = "x86_64")]
        if simd {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx2") && has!("f16c") {
                // SAFETY: AVX-512F, AVX2 and F16C are present (checked on the line above).
                return unsafe { self.run_avx512(blocks, partial, scratch) };
            }
            if has!("avx2") && has!("f16c") {
                // SAFETY: AVX2 and F16C are present (checked on the line above).
                return unsafe { self.run_avx2(blocks, partial, scratch) };
            }
        }
        self.body(blocks, partial, scratch, false)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    fn run_avx512(
        &self,
        blocks: std::ops::Range<usize>,
        partial: &mut Partial,
        scratch: &mut Scratch,
    ) -> Result<()> {
        self.body(blocks, partial, scratch, true)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn run_avx2(
        &self,
        blocks: std::ops::Range<usize>,
        partial: &mut Partial,
        scratch: &mut Scratch,
    ) -> Result<()> {
        self.body(blocks, partial, scratch, false)
    }

    /// The pass; `simd` lets whole-block kernels beyond the page readers run (AVX-512 builds).
    #[inline(always)]
    fn body(
        &self,
        blocks: std::ops::Range<usize>,
        partial: &mut Partial,
        scratch: &mut Scratch,
        simd: bool,
    ) -> Result<()> {
        let layout = self.storage.layout();
        let (d, bs, group) = (layout.head_dim(), layout.block_size(), layout.group_size());
        let shape = Shape { group, d, bs };
        let Scratch {
            scores,
            pages,
            fib,
            lanes,
            split_tables,
            #[cfg(target_arch = "x86_64")]
            scaled_q,
            #[cfg(target_arch = "x86_64")]
            zeros,
            ..
        } = scratch;
        scores.resize(group * bs, 0.0);
        lanes.clear();
        lanes.resize(group, [0.0; 16]);
        partial.reset(group, d);
        let Partial { max, sum, acc } = partial;
        fib.start_head();
        // normalized keys: sealed pages score the mean's term besides their codes
        let key_norm = layout.key_norm(self.layer);
        let key_split = layout.key_split(self.layer);
        let mut split_ready = false;
        // pages are asked for about 8 KiB ahead of the block being read: far enough to hide
        // a miss to memory behind the reading of the blocks between
        let block_bytes = layout.key_page_bytes(self.layer) + layout.value_page_bytes(self.layer);
        let ahead = (PREFETCH_BYTES / block_bytes.max(1)).clamp(1, 8);
        // full blocks of the page kinds `block_kernel` reads: one call each
        #[cfg(target_arch = "x86_64")]
        let kernel_kinds = self.block_kernel_kinds(simd, key_norm.is_none() && key_split.is_none());
        #[cfg(not(target_arch = "x86_64"))]
        let _ = simd;
        #[cfg(target_arch = "x86_64")]
        // inside a run of such blocks (outputs in the kernel's lanes, zero sums pending)
        let mut in_run = false;
        // the kernel's query, scaled once per pass (only when the kernel will read it)
        #[cfg(target_arch = "x86_64")]
        if kernel_kinds.is_some() {
            scaled_q.clear();
            scaled_q.extend(self.q.iter().map(|x| x * self.scale));
        }
        for block_idx in blocks {
            let block = self.ctx.blocks[block_idx];
            let start = block_idx * bs;
            if start >= self.ctx.len {
                break;
            }
            let n = (self.ctx.len - start).min(bs);
            if let Some(next) = self.ctx.blocks.get(block_idx + ahead) {
                if start + ahead * bs < self.ctx.len {
                    prefetch(self.storage.key_page(self.layer, *next, self.head)?);
                    prefetch(self.storage.value_page(self.layer, *next, self.head)?);
                }
            }
            let keys = self.storage.key_page(self.layer, block, self.head)?;
            let values = self.storage.value_page(self.layer, block, self.head)?;
            #[cfg(target_arch = "x86_64")]
            {
                // a sealed page of the kind, or f16/bf16 pages of an all-f16/bf16 layout
                // (channel-major keys); a packed f16 page (a layer overridden inside a
                // compressed layout) is token-major and read apart, as is the open block's
                // staging
                let bytes = |page, kind| match page {
                    PageRef::Packed { codec, bytes, .. }
                        if !block_kernel::full(kind) && block_kernel::kind(codec) == Some(kind) =>
                    {
                        Some(bytes)
                    }
                    PageRef::F16T(elements) | PageRef::F16(elements)
                        if kind == block_kernel::F16 =>
                    {
                        Some(bytemuck::cast_slice::<half::f16, u8>(elements))
                    }
                    PageRef::Bf16T(elements) | PageRef::Bf16(elements)
                        if kind == block_kernel::BF16 =>
                    {
                        Some(bytemuck::cast_slice::<half::bf16, u8>(elements))
                    }
                    _ => None,
                };
                let pages =
                    kernel_kinds.and_then(|(kb, vb)| Some((bytes(keys, kb)?, bytes(values, vb)?)));
                if let (Some((kb, vb)), Some((key_bytes, value_bytes))) = (kernel_kinds, pages) {
                    if n == bs && !(block_idx == 0 && self.sink_rows(block).is_some()) {
                        if !std::mem::replace(&mut in_run, true) {
                            block_kernel::enter(vb, group, acc);
                        }
                        let mut run = block_kernel::Running {
                            max,
                            lanes,
                            acc,
                            zeros,
                        };
                        // SAFETY: `block_kernel_kinds` answered only with the features present;
                        // lengths are checked inside.
                        let done = unsafe {
                            block_kernel::dispatch(
                                kb,
                                vb,
                                group,
                                key_bytes,
                                value_bytes,
                                scaled_q,
                                &mut run,
                            )
                        };
                        if done {
                            continue;
                        }
                    }
                }
                if let (true, Some((_, vb))) = (std::mem::take(&mut in_run), kernel_kinds) {
                    block_kernel::leave(vb, group, zeros, acc);
                }
            }
            match (key_split, keys) {
                (Some(plan), PageRef::Packed { bytes, .. }) => {
                    if !split_ready {
                        plan.query_tables(self.head, self.q, split_tables);
                        split_ready = true;
                    }
                    plan.scores(bytes, n, split_tables, self.scale, bs, scores)?;
                }
                _ => key_scores(keys, n, shape, self.q, self.scale, scores, pages, fib)?,
            }
            if let (Some(norm), PageRef::Packed { .. }) = (key_norm, keys) {
                let (q, layer, head) = (self.q, self.layer, self.head);
                fib.add_mean_scores(norm, layer, head, q, start, n, shape, self.scale, scores);
            }
            // a sealed first block's sink tokens are scored and weighted from their f16 rows
            let sinks = if block_idx == 0 {
                self.sink_rows(block)
            } else {
                None
            };
            if let Some((sink_keys, _)) = sinks {
                for (g, q) in self.q.chunks_exact(d).enumerate() {
                    for (t, k) in sink_keys.chunks_exact(d).take(n).enumerate() {
                        let dot: f32 = q.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum();
                        scores[g * bs + t] = dot * self.scale;
                    }
                }
            }
            // online softmax: the running sums rescaled only when the reference point moves
            for g in 0..group {
                let (new_max, correction) =
                    softmax_step(&mut scores[g * bs..(g + 1) * bs], n, max[g], &mut lanes[g]);
                max[g] = new_max;
                if correction != 1.0 {
                    acc[g * d..(g + 1) * d]
                        .iter_mut()
                        .for_each(|a| *a *= correction);
                    fib.rescale(g, group, correction);
                }
            }
            if let Some((_, sink_values)) = sinks {
                for g in 0..group {
                    let acc = &mut acc[g * d..(g + 1) * d];
                    for (t, v) in sink_values.chunks_exact(d).take(n).enumerate() {
                        let w = std::mem::take(&mut scores[g * bs + t]);
                        acc.iter_mut()
                            .zip(v)
                            .for_each(|(a, x)| *a += w * x.to_f32());
                    }
                }
            }
            accumulate_values(values, n, shape, scores, acc, pages, fib)?;
        }
        #[cfg(target_arch = "x86_64")]
        if let (true, Some((_, vb))) = (in_run, kernel_kinds) {
            block_kernel::leave(vb, group, zeros, acc);
        }
        fib.finish(shape, acc);
        for (s, l) in sum.iter_mut().zip(lanes.iter()) {
            *s = l.iter().sum();
        }
        Ok(())
    }
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
            let start = block_idx * bs;
            storage.page_to_f32(layer, *block, head, Role::Key, start, &mut page)?;
            keys[head][span.clone()].copy_from_slice(&page[..n * d]);
            storage.page_to_f32(layer, *block, head, Role::Value, start, &mut page)?;
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

    /// A storage of `layout` (blocks of 16) holding `tokens` tokens of smooth test rows, full
    /// blocks sealed, in a block table of descending ids; the first key scaled by `first_key`.
    fn filled_16(layout: KvLayout, tokens: usize, first_key: f32) -> (KvStorage, Vec<BlockId>) {
        let width = layout.token_width();
        let blocks: Vec<BlockId> = (0..tokens.div_ceil(16) as u32).rev().map(BlockId).collect();
        let mut s = KvStorage::new(layout, blocks.len()).unwrap();
        for pos in 0..tokens {
            let boost = if pos == 0 { first_key } else { 1.0 };
            let k: Vec<f32> = (0..width)
                .map(|i| ((pos * 13 + i * 7) as f32 * 0.031).sin() * 2.0 * boost)
                .collect();
            let v: Vec<f32> = (0..width)
                .map(|i| ((pos * 5 + i * 3) as f32 * 0.017).cos())
                .collect();
            s.write_token(0, blocks[pos / 16], pos % 16, &k, &v)
                .unwrap();
            if pos % 16 == 15 {
                s.seal(blocks[pos / 16], pos / 16 * 16).unwrap();
            }
        }
        (s, blocks)
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
        for codec in every_codec() {
            for (kv, qh) in [(3, 3), (3, 9), (1, 4)] {
                for tokens in [1, 3, 4, 13] {
                    let (s, blocks) = filled(codec, kv, qh, tokens);
                    for len in 1..=tokens {
                        let q: Vec<f32> = (0..qh * 32)
                            .map(|i| ((i * 7 % 11 + len) as f32 - 5.0) / 3.0)
                            .collect();
                        let ctx = Context {
                            blocks: &blocks,
                            len,
                        };
                        let (mut fast, mut slow) = (vec![0.0; qh * 32], vec![0.0; qh * 32]);
                        let mut portable = vec![0.0; qh * 32];
                        attend(&s, 0, ctx, &q, 0.35, &mut fast, &mut Scratch::default()).unwrap();
                        attend_portable(
                            &s,
                            0,
                            ctx,
                            &q,
                            0.35,
                            &mut portable,
                            &mut Scratch::default(),
                        )
                        .unwrap();
                        attend_reference(&s, 0, ctx, &q, 0.35, &mut slow).unwrap();
                        let what = format!("{codec} {kv}/{qh} {tokens} tokens, position {len}");
                        assert_close(&fast, &slow, &what);
                        assert_close(&portable, &slow, &what);
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
                let (mut fast, mut split, mut slow) =
                    (vec![0.0; qh * d], vec![0.0; qh * d], vec![0.0; qh * d]);
                let mut portable = vec![0.0; qh * d];
                attend(&s, 0, ctx, &q, 0.3, &mut fast, &mut Scratch::default()).unwrap();
                attend_portable(&s, 0, ctx, &q, 0.3, &mut portable, &mut Scratch::default())
                    .unwrap();
                attend_split(&s, 0, ctx, &q, 0.3, &mut split).unwrap();
                attend_reference(&s, 0, ctx, &q, 0.3, &mut slow).unwrap();
                let what =
                    format!("{fib}/{value} normalized keys (split {split_keys}), length {len}");
                assert_close(&fast, &slow, &what);
                assert_close(&portable, &slow, &what);
                assert_close(&split, &slow, &what);
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
                let (mut one, mut split, mut slow) =
                    (vec![0.0; 288], vec![0.0; 288], vec![0.0; 288]);
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
        let (d, kv, qh, tokens): (usize, usize, usize, usize) = (64, 3, 9, 16 * 3 + 5);
        for codec in every_codec() {
            let mut outputs = Vec::new();
            for sinks in [0, 4] {
                let mut spec = LayoutSpec::new(1, kv, qh, d, codec);
                spec.block_size = 16;
                spec.sink_tokens = sinks;
                let (s, blocks) = filled_16(KvLayout::new(spec).unwrap(), tokens, 3.0);
                let has_rows = s.sink_rows(0, blocks[0], 2, Role::Value).is_some();
                assert_eq!(has_rows, sinks > 0 && !codec.is_full_precision(), "{codec}");
                let q: Vec<f32> = (0..qh * d).map(|i| (i as f32 * 0.11).sin()).collect();
                for len in [3, 16, 40, tokens] {
                    let ctx = Context {
                        blocks: &blocks,
                        len,
                    };
                    let mut out = [vec![0.0; qh * d], vec![0.0; qh * d], vec![0.0; qh * d]];
                    let [fast, portable, slow] = &mut out;
                    let mut split = vec![0.0; qh * d];
                    attend(&s, 0, ctx, &q, 0.125, fast, &mut Scratch::default()).unwrap();
                    attend_portable(&s, 0, ctx, &q, 0.125, portable, &mut Scratch::default())
                        .unwrap();
                    attend_split(&s, 0, ctx, &q, 0.125, &mut split).unwrap();
                    attend_reference(&s, 0, ctx, &q, 0.125, slow).unwrap();
                    let what = format!("{codec} sinks {sinks} len {len}");
                    assert_close(fast, slow, &format!("{what} simd"));
                    assert_close(portable, slow, &format!("{what} portable"));
                    assert_close(&split, slow, &format!("{what} split"));
                    if len == tokens {
                        outputs.push(fast.clone());
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
        // head_dim 64 as SmolLM2, and 128 (two 64-channel chunks, eight FibQuant chunks); a
        // group of 20 query heads (more than the 16 whose key terms stay in registers, and a
        // last group of 4 heads after 16)
        for (d, kv, qh) in [(64, 3, 9), (128, 3, 9), (64, 1, 20)] {
            for codec in every_codec() {
                let mut spec = LayoutSpec::new(1, kv, qh, d, codec);
                spec.block_size = 16;
                let tokens: usize = 16 * 5 + 7;
                let (s, blocks) = filled_16(KvLayout::new(spec).unwrap(), tokens, 1.0);
                for len in [1, 9, 16, 17, 40, tokens] {
                    let q: Vec<f32> = (0..qh * d)
                        .map(|i| ((i + len) as f32 * 0.11).sin() * 1.5)
                        .collect();
                    let ctx = Context {
                        blocks: &blocks,
                        len,
                    };
                    let mut out = [vec![0.0; qh * d], vec![0.0; qh * d], vec![0.0; qh * d]];
                    let [fast, portable, slow] = &mut out;
                    attend(&s, 0, ctx, &q, 0.125, fast, &mut Scratch::default()).unwrap();
                    attend_portable(&s, 0, ctx, &q, 0.125, portable, &mut Scratch::default())
                        .unwrap();
                    attend_reference(&s, 0, ctx, &q, 0.125, slow).unwrap();
                    assert_close(
                        fast,
                        slow,
                        &format!("{codec} d {d} {kv}/{qh} len {len} simd"),
                    );
                    assert_close(
                        portable,
                        slow,
                        &format!("{codec} d {d} {kv}/{qh} len {len} portable"),
                    );
                }
            }
        }
    }

    #[test]
    fn blocks_read_in_one_call_match_the_reference() {
        // every pair of f16, bf16, integer and fp8 key and value codecs; groups of 1 (MHA),
        // 3 (GQA), 4 (MQA, the widest group read in one call) and 9 (MQA past it); keys growing
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
        for (key_codec, value_codec) in ints.iter().flat_map(|k| ints.iter().map(move |v| (*k, *v)))
        {
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
                    let ctx = Context {
                        blocks: &blocks,
                        len,
                    };
                    let (mut fast, mut slow) = (vec![0.0; qh * d], vec![0.0; qh * d]);
                    attend(&s, 0, ctx, &q, 0.125, &mut fast, &mut Scratch::default()).unwrap();
                    attend_reference(&s, 0, ctx, &q, 0.125, &mut slow).unwrap();
                    let what = format!("{key_codec}/{value_codec} {kv}/{qh} len {len}");
                    assert_close(&fast, &slow, &what);
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
}
