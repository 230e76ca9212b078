//! One kv head's query group over a range of blocks: the loop that reads each block in its
//! codec (whole-block kernel or page readers), sink rows, split keys and the online softmax.

use super::pages::{accumulate_values, key_scores, prefetch_page, Fetch, ScaledQuery, Shape};
use super::softmax::softmax_step;
#[cfg(target_arch = "x86_64")]
use super::{block_kernel, fast_kernel};
use super::{AttentionPath, Context, Partial, Scratch, Simd};
use crate::block::BlockId;
use crate::codec::Role;
use crate::error::Result;
#[cfg(target_arch = "x86_64")]
use crate::layout::KvLayout;
#[cfg(target_arch = "x86_64")]
use crate::storage::HeadPages;
use crate::storage::{KvStorage, PageRef};

/// How far ahead of the block being read a pass prefetches pages, in bytes of both pages.
const PREFETCH_BYTES: usize = 8192;

/// Most blocks a whole-block kernel reads in one call.
#[cfg(target_arch = "x86_64")]
const RUN_BLOCKS: usize = 32;

/// Which whole-block kernel reads a pass's full blocks.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kernel {
    /// The exact path's AVX-512 kernel (slices of 16 tokens).
    Avx512,
    /// The fast path's kernel (AVX-512 VNNI and VBMI).
    Fast,
    /// The exact path's AVX2 kernel (slices of 8 tokens): AVX2 machines, and blocks of 8 on
    /// AVX-512 ones.
    Avx2,
    /// The fast path's AVX2 kernel (the AVX2 kernel with integer key products): where the
    /// exact path reads with [`Kernel::Avx2`].
    FastAvx2,
}

/// The whole-block kernel a pass reads its full blocks with: page kinds, geometry and kernel.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub(super) struct WholeBlock {
    keys: usize,
    values: usize,
    head_dim: usize,
    block_size: usize,
    pub(super) kernel: Kernel,
}

#[cfg(target_arch = "x86_64")]
impl WholeBlock {
    fn enter(self, group: usize, acc: &mut [f32]) {
        let d = self.head_dim;
        match self.kernel {
            // the fast kernel reads values as the exact one does, into the same lanes
            Kernel::Fast | Kernel::Avx512 => block_kernel::enter(self.values, group, d, acc),
            // outputs in channel order throughout
            Kernel::Avx2 | Kernel::FastAvx2 => {}
        }
    }

    fn leave(self, group: usize, zeros: &mut [block_kernel::ZeroSums], acc: &mut [f32]) {
        let d = self.head_dim;
        match self.kernel {
            Kernel::Fast | Kernel::Avx512 => block_kernel::leave(self.values, group, d, zeros, acc),
            Kernel::Avx2 | Kernel::FastAvx2 => block_kernel::add_zero_sums(group, d, zeros, acc),
        }
    }

    /// Reads a run of full blocks (key and value pages each), prefetching the pages `fetch`
    /// names ahead of the one being read.
    ///
    /// # Safety
    /// [`whole_block`] chose `self` (so the CPU has the kernel's features).
    unsafe fn attend(
        self,
        group: usize,
        pages: &[(&[u8], &[u8])],
        fetch: Fetch,
        q: &[f32],
        run: &mut block_kernel::Running,
    ) {
        let (kb, vb) = (self.keys, self.values);
        let blocks = block_kernel::Blocks {
            pages,
            tokens: self.block_size,
            head_dim: self.head_dim,
            fetch,
            heads: group,
            q,
        };
        // SAFETY: the caller's contract.
        let done = unsafe {
            match self.kernel {
                Kernel::Fast => fast_kernel::dispatch(kb, vb, &blocks, run),
                Kernel::Avx512 => block_kernel::dispatch(kb, vb, &blocks, run),
                Kernel::Avx2 => {
                    block_kernel::avx2::dispatch(kb, vb, &blocks, run, AttentionPath::Exact)
                }
                Kernel::FastAvx2 => {
                    block_kernel::avx2::dispatch(kb, vb, &blocks, run, AttentionPath::Fast)
                }
            }
        };
        assert!(done, "whole_block chose a pair its kernel reads");
    }
}

/// The whole-block kernel the full blocks of `layer` go through, if any: a pair of page kinds
/// one is built for, a geometry a kernel serves (head_dim 64 or 128, blocks of whole 16-token
/// slices on AVX-512, of 8-token slices on AVX2 and for blocks of 8 on AVX-512; any group), no
/// per-layer key transform (`plain`), the CPU able; the fast path's kernel when `path` asks
/// for it and it reads the pair.
#[cfg(target_arch = "x86_64")]
pub(super) fn whole_block(
    layout: &KvLayout,
    layer: usize,
    simd: Simd,
    plain: bool,
    path: AttentionPath,
) -> Option<WholeBlock> {
    let (head_dim, block_size) = (layout.head_dim(), layout.block_size());
    let keys = block_kernel::kind(layout.key_codec(layer))?;
    let values = block_kernel::kind(layout.value_codec(layer))?;
    if !plain || !block_kernel::supported(keys, values) {
        return None;
    }
    let wide = block_kernel::serves(head_dim, block_size);
    // full-precision pairs measured about 4% faster through the AVX2 page loops than through
    // the AVX2 kernel (`bench attention --simd avx2`, f16 at 1,024 and 8,192 tokens)
    let narrow = block_kernel::avx2::serves(head_dim, block_size)
        && !(block_kernel::full(keys) && block_kernel::full(values));
    let kernel = match simd {
        Simd::Avx512
            if wide
                && path == AttentionPath::Fast
                && fast_kernel::supported(keys, values)
                && fast_kernel::available() =>
        {
            Kernel::Fast
        }
        Simd::Avx512 if wide && block_kernel::available() => Kernel::Avx512,
        Simd::Avx512 | Simd::Avx2
            if narrow
                && path == AttentionPath::Fast
                && fast_kernel::supported(keys, values)
                && block_kernel::avx2::available() =>
        {
            Kernel::FastAvx2
        }
        Simd::Avx512 | Simd::Avx2 if narrow && block_kernel::avx2::available() => Kernel::Avx2,
        _ => return None,
    };
    Some(WholeBlock {
        keys,
        values,
        head_dim,
        block_size,
        kernel,
    })
}

/// One kv head's query group over a range of the context's blocks.
#[derive(Clone, Copy)]
pub(super) struct Pass<'a> {
    pub(super) storage: &'a KvStorage,
    pub(super) layer: usize,
    pub(super) head: usize,
    pub(super) ctx: Context<'a>,
    /// The group's query rows (`group × d`).
    pub(super) q: &'a [f32],
    pub(super) scale: f32,
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

    /// Runs at dispatch level `simd` (one this CPU can run: the callers check).
    pub(super) fn run(
        &self,
        blocks: std::ops::Range<usize>,
        partial: &mut Partial,
        scratch: &mut Scratch,
        simd: Simd,
    ) -> Result<()> {
        #[cfg(target_arch = "x86_64")]
        match simd {
            Simd::Avx512 if simd.available() => {
                // SAFETY: AVX-512F, AVX2, FMA and F16C are present (`available`).
                return unsafe { self.run_avx512(blocks, partial, scratch) };
            }
            Simd::Avx2 if simd.available() => {
                // SAFETY: AVX2, FMA and F16C are present (`available`).
                return unsafe { self.run_avx2(blocks, partial, scratch) };
            }
            _ => {}
        }
        self.body(blocks, partial, scratch, Simd::Portable)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    fn run_avx512(
        &self,
        blocks: std::ops::Range<usize>,
        partial: &mut Partial,
        scratch: &mut Scratch,
    ) -> Result<()> {
        self.body(blocks, partial, scratch, Simd::Avx512)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn run_avx2(
        &self,
        blocks: std::ops::Range<usize>,
        partial: &mut Partial,
        scratch: &mut Scratch,
    ) -> Result<()> {
        self.body(blocks, partial, scratch, Simd::Avx2)
    }

    /// The pass, built for the level `simd` names: it chooses the hand-written loops (the
    /// whole-block kernel and the AVX-512 page loops) only at that level.
    #[inline(always)]
    fn body(
        &self,
        blocks: std::ops::Range<usize>,
        partial: &mut Partial,
        scratch: &mut Scratch,
        simd: Simd,
    ) -> Result<()> {
        let layout = self.storage.layout();
        let (d, bs, group) = (layout.head_dim(), layout.block_size(), layout.group_size());
        let shape = Shape { group, d, bs, simd };
        let Scratch {
            scores,
            pages,
            lanes,
            split_tables,
            #[cfg(target_arch = "x86_64")]
            scaled_q,
            #[cfg(target_arch = "x86_64")]
            zeros,
            path,
            prefetch,
            ..
        } = scratch;
        scores.resize(group * bs, 0.0);
        lanes.clear();
        lanes.resize(group, [0.0; 16]);
        partial.reset(group, d);
        let Partial { max, sum, acc } = partial;
        // no zero-point sums carried over from a pass that ended early (an error)
        #[cfg(target_arch = "x86_64")]
        {
            zeros.clear();
            zeros.resize(group, Default::default());
        }
        pages.fib.start_head();
        // normalized keys: sealed pages score the mean's term besides their codes
        let key_norm = layout.key_norm(self.layer);
        let key_split = layout.key_split(self.layer);
        let mut split_ready = false;
        // pages are asked for about 8 KiB ahead of the block being read: far enough to hide
        // a miss to memory behind the reading of the blocks between
        let fetch = Fetch::of(*prefetch, layout, self.layer, PREFETCH_BYTES);
        let ahead = fetch.ahead;
        // the whole-block kernel of this layer's pages, if any (no per-layer key transform)
        #[cfg(target_arch = "x86_64")]
        let plain = key_norm.is_none() && key_split.is_none();
        #[cfg(target_arch = "x86_64")]
        let kernel = whole_block(layout, self.layer, simd, plain, *path);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = path;
        // the kernel's pages: packed pages of a compressed kind, or the typed pages of an
        // all-f16/bf16 layout (channel-major keys); a packed f16 page (a layer overridden
        // inside a compressed layout) is token-major and read apart, as is the open block's
        // staging
        #[cfg(target_arch = "x86_64")]
        let kernel_pages = match kernel {
            Some(k) => {
                let keys = self.storage.head_pages(self.layer, self.head, Role::Key)?;
                let values = self
                    .storage
                    .head_pages(self.layer, self.head, Role::Value)?;
                let readable = |pages: &HeadPages, kind| pages.packed != block_kernel::full(kind);
                (readable(&keys, k.keys) && readable(&values, k.values)).then_some((keys, values))
            }
            None => None,
        };
        // inside a run of such blocks (outputs in the kernel's lanes, zero sums pending)
        #[cfg(target_arch = "x86_64")]
        let mut in_run = false;
        // the kernel's query, scaled once per pass (only when the kernel will read it)
        #[cfg(target_arch = "x86_64")]
        if kernel_pages.is_some() {
            scaled_q.clear();
            scaled_q.extend(self.q.iter().map(|x| x * self.scale));
        }
        // full blocks the kernel reads, gathered into runs of consecutive ones and read in
        // one call each (dispatch once per run, and the kernel prefetches within the run)
        #[cfg(target_arch = "x86_64")]
        let mut pending: [(&[u8], &[u8]); RUN_BLOCKS] = [(&[], &[]); RUN_BLOCKS];
        #[cfg(target_arch = "x86_64")]
        let mut pending_len = 0;
        #[cfg(target_arch = "x86_64")]
        let flush = |run_pages: &[(&[u8], &[u8])],
                     in_run: &mut bool,
                     max: &mut Vec<f32>,
                     lanes: &mut Vec<[f32; 16]>,
                     acc: &mut Vec<f32>,
                     zeros: &mut [block_kernel::ZeroSums]|
         -> Result<()> {
            let Some(kernel) = kernel else { return Ok(()) };
            if run_pages.is_empty() {
                return Ok(());
            }
            if !std::mem::replace(in_run, true) {
                kernel.enter(group, acc);
            }
            let mut run = block_kernel::Running {
                max,
                lanes,
                acc,
                zeros,
            };
            // SAFETY: `whole_block` chose the kernel (the features are present); lengths are
            // checked inside.
            unsafe { kernel.attend(group, run_pages, fetch, scaled_q, &mut run) };
            Ok(())
        };
        for block_idx in blocks {
            let block = self.ctx.blocks[block_idx];
            let start = block_idx * bs;
            if start >= self.ctx.len {
                break;
            }
            let n = (self.ctx.len - start).min(bs);
            // the whole-block kernels prefetch their runs' pages themselves
            #[cfg(target_arch = "x86_64")]
            let prefetched_by_kernel = kernel_pages.is_some();
            #[cfg(not(target_arch = "x86_64"))]
            let prefetched_by_kernel = false;
            if let (Some(next), false) =
                (self.ctx.blocks.get(block_idx + ahead), prefetched_by_kernel)
            {
                if start + ahead * bs < self.ctx.len {
                    if fetch.keys {
                        prefetch_page(self.storage.key_page(self.layer, *next, self.head)?);
                    }
                    if fetch.values {
                        prefetch_page(self.storage.value_page(self.layer, *next, self.head)?);
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            {
                // a sealed, full block goes with the run the kernel reads (a first block whose
                // sink tokens are kept apart does not)
                let pair = kernel_pages
                    .filter(|_| n == bs && !(block_idx == 0 && self.sink_rows(block).is_some()))
                    .and_then(|(keys, values)| Some((keys.sealed(block)?, values.sealed(block)?)));
                if let Some(page_pair) = pair {
                    // read with the run it belongs to, once the run ends
                    pending[pending_len] = page_pair;
                    pending_len += 1;
                    if pending_len == pending.len() {
                        flush(&pending, &mut in_run, max, lanes, acc, zeros)?;
                        pending_len = 0;
                    }
                    continue;
                }
                flush(
                    &pending[..std::mem::take(&mut pending_len)],
                    &mut in_run,
                    max,
                    lanes,
                    acc,
                    zeros,
                )?;
                if let (true, Some(kernel)) = (std::mem::take(&mut in_run), kernel) {
                    kernel.leave(group, zeros, acc);
                }
            }
            let keys = self.storage.key_page(self.layer, block, self.head)?;
            let values = self.storage.value_page(self.layer, block, self.head)?;
            match (key_split, keys) {
                (Some(plan), PageRef::Packed { bytes, .. }) => {
                    if !split_ready {
                        plan.query_tables(self.head, self.q, split_tables);
                        split_ready = true;
                    }
                    plan.scores(bytes, n, split_tables, self.scale, bs, scores)?;
                }
                _ => {
                    let query = ScaledQuery {
                        rows: self.q,
                        scale: self.scale,
                    };
                    key_scores(keys, n, shape, query, scores, pages)?
                }
            }
            if let (Some(norm), PageRef::Packed { .. }) = (key_norm, keys) {
                let fib = &mut pages.fib;
                fib.prepare_mean_scores(norm, self.layer, self.head, self.q, shape);
                fib.add_mean_scores(norm, start, n, shape, self.scale, scores);
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
                let (new_max, correction) = softmax_step(
                    &mut scores[g * bs..(g + 1) * bs],
                    n,
                    max[g],
                    &mut lanes[g],
                    simd,
                );
                max[g] = new_max;
                if correction != 1.0 {
                    acc[g * d..(g + 1) * d]
                        .iter_mut()
                        .for_each(|a| *a *= correction);
                    pages.fib.rescale(g, group, correction);
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
            accumulate_values(values, n, shape, scores, acc, pages)?;
        }
        #[cfg(target_arch = "x86_64")]
        {
            flush(&pending[..pending_len], &mut in_run, max, lanes, acc, zeros)?;
            if let (true, Some(kernel)) = (in_run, kernel) {
                kernel.leave(group, zeros, acc);
            }
        }
        pages.fib.finish(shape, acc);
        for (s, l) in sum.iter_mut().zip(lanes.iter()) {
            *s = l.iter().sum();
        }
        Ok(())
    }
}
