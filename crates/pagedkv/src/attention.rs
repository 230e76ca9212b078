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

/// The (key kind, value kind) pairs the exact path's whole-block kernels (`block_kernel` and
/// its AVX2 twin) are built for, listed once: integer kinds in any pair, f16 with f16, bf16
/// with bf16, fp8 kinds with each other. (f16 beside an integer codec is a packed,
/// token-major page, which the kernels do not read.) Hands the list to `$callback!` after its
/// own arguments.
#[allow(unused_macros)] // used by the x86-64 kernels only
macro_rules! exact_pairs {
    ($callback:ident!($($args:tt)*)) => {
        $callback!($($args)*;
            INT8 / INT8, INT8 / INT4, INT8 / INT2,
            INT4 / INT8, INT4 / INT4, INT4 / INT2,
            INT2 / INT8, INT2 / INT4, INT2 / INT2,
            F16 / F16, BF16 / BF16,
            E4M3 / E4M3, E4M3 / E5M2, E5M2 / E4M3, E5M2 / E5M2
        )
    };
}

/// Whether (`$kb`, `$vb`) is one of the listed pairs.
#[allow(unused_macros)] // used by the x86-64 kernels only
macro_rules! pair_listed {
    ($kb:expr, $vb:expr; $($k:ident / $v:ident),*) => {
        matches!(($kb, $vb), $(($k, $v))|*)
    };
}

/// Calls `$run::<K, V, D>($args)` for the listed pair (`$kb`, `$vb`) at head_dim `$d` (64, or
/// else 128); true if the pair is listed, else false with nothing done. Inside an `unsafe fn`
/// whose contract is the kernel's features.
#[allow(unused_macros)] // used by the x86-64 kernels only
macro_rules! dispatch_pairs {
    ($run:ident, ($kb:expr, $vb:expr, $d:expr), $args:tt; $($k:ident / $v:ident),*) => {
        match ($kb, $vb, $d) {
            $(($k, $v, 64) => {
                // SAFETY: the features are present (the caller's contract).
                unsafe { $run::<$k, $v, 64> $args };
                true
            }
            ($k, $v, _) => {
                // SAFETY: as above.
                unsafe { $run::<$k, $v, 128> $args };
                true
            })*
            _ => false,
        }
    };
}

/// The integer (key kind, value kind) pairs, which the fast kernels read (the exact path's
/// list, `exact_pairs!`, holds them too). Hands the list to `$callback!` after its own
/// arguments.
#[allow(unused_macros)] // used by the x86-64 kernels only
macro_rules! integer_pairs {
    ($callback:ident!($($args:tt)*)) => {
        $callback!($($args)*;
            INT8 / INT8, INT8 / INT4, INT8 / INT2,
            INT4 / INT8, INT4 / INT4, INT4 / INT2,
            INT2 / INT8, INT2 / INT4, INT2 / INT2
        )
    };
}

#[cfg(target_arch = "x86_64")]
mod block_kernel;
mod convert;
#[cfg(target_arch = "x86_64")]
mod fast_kernel;
mod lut;
mod pages;
mod pass;
mod reference;
mod simd;
mod softmax;
#[cfg(test)]
mod tests;

pub use reference::attend_reference;
pub use simd::Simd;

/// The arithmetic compressed pages are read with (issue 22's accuracy contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AttentionPath {
    /// f32 arithmetic on the codes: within 1e-4 of the f64 reference on the codec's
    /// reconstruction (DESIGN §7). The oracle of every other path.
    #[default]
    Exact,
    /// Integer dot products for the keys where a kernel for the pages exists (int8, int4 and
    /// int2 keys and values at head_dim 64 or 128: blocks of whole 16-token slices on AVX-512
    /// VNNI and VBMI, of whole 8-token slices on AVX2): the query, with the key scales folded
    /// in, rounded to 16-bit integers per block and head; values as on the exact path. Within
    /// 2e-3 of the output's scale; every other page is read as on the exact path.
    Fast,
}

impl std::fmt::Display for AttentionPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttentionPath::Exact => "exact",
            AttentionPath::Fast => "fast",
        })
    }
}

/// Whether [`AttentionPath::Fast`] reads layer `layer` of `layout` with its own kernel at
/// level `simd` (elsewhere it reads pages as the exact path does).
pub fn fast_kernel_reads(layout: &crate::layout::KvLayout, layer: usize, simd: Simd) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let plain = layout.key_norm(layer).is_none() && layout.key_split(layer).is_none();
        pass::whole_block(layout, layer, simd, plain, AttentionPath::Fast)
            .is_some_and(|k| matches!(k.kernel, pass::Kernel::Fast | pass::Kernel::FastAvx2))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (layout, layer, simd);
        false
    }
}

/// Which pages a pass asks the cache for in software, a few blocks ahead of reading them.
///
/// Measured on an AMD Zen 4 (`pagedkv bench attention --prefetch all` against the default,
/// docs/performance.md): full-precision pages, read near the memory's speed, took 1.2–1.8×
/// as long with software prefetches as without, the CPU's own prefetcher following their
/// streams better alone; int8 and fp8 pages, whose arithmetic is slower per byte, took
/// 0.8–0.9× the time with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Prefetch {
    /// Pages of compressed codecs; full-precision pages (f32, f16, bf16) are left to the
    /// CPU's prefetcher.
    #[default]
    Compressed,
    /// Every page.
    All,
    /// None: the CPU's prefetcher alone.
    Off,
}

impl Prefetch {
    /// Every policy.
    pub const ALL: [Prefetch; 3] = [Prefetch::Compressed, Prefetch::All, Prefetch::Off];

    /// Whether pages of `codec` are prefetched in software.
    pub fn fetches(self, codec: crate::Codec) -> bool {
        match self {
            Prefetch::Compressed => !codec.is_full_precision(),
            Prefetch::All => true,
            Prefetch::Off => false,
        }
    }
}

impl std::fmt::Display for Prefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Prefetch::Compressed => "compressed",
            Prefetch::All => "all",
            Prefetch::Off => "off",
        })
    }
}

/// Where and how passes run: the SIMD level, the arithmetic and the software prefetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dispatch {
    /// The instruction sets passes may use.
    pub simd: Simd,
    /// The arithmetic of compressed pages.
    pub path: AttentionPath,
    /// The pages prefetched in software.
    pub prefetch: Prefetch,
}

impl Dispatch {
    /// The widest level this CPU has, on `path`, with the default prefetch.
    pub fn widest(path: AttentionPath) -> Self {
        Self {
            simd: Simd::widest(),
            path,
            prefetch: Prefetch::default(),
        }
    }
}

use crate::block::BlockId;
use crate::error::{KvError, Result};
use crate::storage::KvStorage;

use pages::PageScratch;
use pass::Pass;

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
    /// A pass's state, and the heads' merged state (kept: a call must not allocate).
    partial: Partial,
    merged: Partial,
    pages: PageScratch,
    /// Running softmax sums per query head, spread over 16 lanes.
    lanes: Vec<[f32; 16]>,
    /// Split keys: the pass's query tables (see [`crate::SplitPlan::query_tables`]).
    split_tables: Vec<f32>,
    /// Blocks read in one call (`block_kernel`): the query times the softmax scale, and the
    /// values' pending zero-point sums.
    #[cfg(target_arch = "x86_64")]
    scaled_q: Vec<f32>,
    #[cfg(target_arch = "x86_64")]
    zeros: Vec<block_kernel::ZeroSums>,
    /// The dispatch level passes run at; `None`: the widest this CPU has.
    simd: Option<Simd>,
    path: AttentionPath,
    prefetch: Prefetch,
}

impl Scratch {
    /// Buffers whose passes run at `simd` (an error if this CPU cannot run it): how tests run
    /// every path the machine has.
    pub fn at(simd: Simd) -> Result<Self> {
        Ok(Self {
            simd: Some(simd.check()?),
            ..Self::default()
        })
    }

    /// Buffers whose passes run as `dispatch` says (an error if this CPU cannot run its level).
    pub fn with(dispatch: Dispatch) -> Result<Self> {
        Ok(Self {
            path: dispatch.path,
            prefetch: dispatch.prefetch,
            ..Self::at(dispatch.simd)?
        })
    }

    /// Buffers whose passes take `path`, at the widest level this CPU has.
    pub fn on(path: AttentionPath) -> Self {
        Self {
            path,
            ..Self::default()
        }
    }

    /// The level passes with these buffers run at.
    pub fn simd(&self) -> Simd {
        self.simd.unwrap_or_else(Simd::widest)
    }

    /// The arithmetic passes with these buffers use.
    pub fn path(&self) -> AttentionPath {
        self.path
    }

    /// Passes with these buffers take `path` from now on.
    pub fn set_path(&mut self, path: AttentionPath) {
        self.path = path;
    }

    /// The pages passes with these buffers prefetch in software.
    pub fn prefetch(&self) -> Prefetch {
        self.prefetch
    }

    /// Passes with these buffers prefetch the pages `prefetch` names from now on.
    pub fn set_prefetch(&mut self, prefetch: Prefetch) {
        self.prefetch = prefetch;
    }

    /// Passes with these buffers run as `dispatch` says from now on; an error, and nothing
    /// changed, if this CPU cannot run its level.
    pub fn set_dispatch(&mut self, dispatch: Dispatch) -> Result<()> {
        self.simd = Some(dispatch.simd.check()?);
        self.path = dispatch.path;
        self.prefetch = dispatch.prefetch;
        Ok(())
    }
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

    /// Floats [`Self::store`] writes for `group` heads of `d` elements.
    fn slot_len(group: usize, d: usize) -> usize {
        group * (2 + d)
    }

    /// Copies the state into `slot` ([`Self::slot_len`] floats): maxima, sums, outputs.
    fn store(&self, slot: &mut [f32]) {
        let group = self.max.len();
        slot[..group].copy_from_slice(&self.max);
        slot[group..2 * group].copy_from_slice(&self.sum);
        slot[2 * group..].copy_from_slice(&self.acc);
    }

    /// The state [`Self::store`] wrote into `slot`.
    fn load(&mut self, slot: &[f32], group: usize, d: usize) {
        self.reset(group, d);
        self.max.copy_from_slice(&slot[..group]);
        self.sum.copy_from_slice(&slot[group..2 * group]);
        self.acc.copy_from_slice(&slot[2 * group..]);
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
/// softmax, at the scratch's dispatch level: the widest this CPU has unless it was made with
/// [`Scratch::at`] ([`attend_portable`] is the baseline build). Single-threaded: callers run
/// many queries in parallel, or use [`attend_split`] for one long one.
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
    let simd = scratch.simd();
    Query::new(storage, layer, ctx, q, scale).attend_heads(out, scratch, simd)
}

/// [`attend`] without SIMD beyond the baseline target (as with a [`Scratch::at`]
/// `Simd::Portable`), whatever the scratch's level.
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
    Query::new(storage, layer, ctx, q, scale).attend_heads(out, scratch, Simd::Portable)
}

/// One query token (every query head) over a context: what every pass of it shares.
#[derive(Clone, Copy)]
struct Query<'a> {
    storage: &'a KvStorage,
    layer: usize,
    ctx: Context<'a>,
    /// `query_heads × head_dim`.
    q: &'a [f32],
    scale: f32,
}

impl<'a> Query<'a> {
    fn new(
        storage: &'a KvStorage,
        layer: usize,
        ctx: Context<'a>,
        q: &'a [f32],
        scale: f32,
    ) -> Self {
        Self {
            storage,
            layer,
            ctx,
            q,
            scale,
        }
    }

    /// The pass of kv `head`'s query group.
    fn pass(&self, head: usize) -> Pass<'a> {
        let group_width = self.storage.layout().group_size() * self.storage.layout().head_dim();
        Pass {
            storage: self.storage,
            layer: self.layer,
            head,
            ctx: self.ctx,
            q: &self.q[head * group_width..(head + 1) * group_width],
            scale: self.scale,
        }
    }

    fn attend_heads(&self, out: &mut [f32], scratch: &mut Scratch, simd: Simd) -> Result<()> {
        let layout = self.storage.layout();
        let (d, group) = (layout.head_dim(), layout.group_size());
        let blocks = self.ctx.len.div_ceil(layout.block_size());
        let mut partial = std::mem::take(&mut scratch.partial);
        let mut merged = std::mem::take(&mut scratch.merged);
        for head in 0..layout.kv_heads() {
            let pass = self.pass(head);
            // the same block ranges and merge order as `attend_split`, so both give the same bits
            for (i, range) in ranges(blocks).enumerate() {
                pass.run(range, &mut partial, scratch, simd)?;
                if i == 0 {
                    std::mem::swap(&mut merged, &mut partial);
                } else {
                    merged.merge(&partial, d);
                }
            }
            merged.write(d, &mut out[head * group * d..(head + 1) * group * d]);
        }
        scratch.partial = partial;
        scratch.merged = merged;
        Ok(())
    }
}

thread_local! {
    /// The buffers [`attend_split_at`] runs its items with on this thread.
    static SPLIT_BUFFERS: std::cell::RefCell<(Scratch, Partial)> = Default::default();
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
    attend_split_at(
        Dispatch::widest(AttentionPath::Exact),
        storage,
        layer,
        ctx,
        q,
        scale,
        out,
    )
}

/// [`attend_split`] as `dispatch` says (an error if this CPU cannot run its level).
pub fn attend_split_at(
    dispatch: Dispatch,
    storage: &KvStorage,
    layer: usize,
    ctx: Context,
    q: &[f32],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    use rayon::prelude::*;
    let simd = dispatch.simd.check()?;
    check(storage, &ctx, q, out)?;
    let layout = storage.layout();
    let (d, group, heads) = (layout.head_dim(), layout.group_size(), layout.kv_heads());
    let blocks = ctx.len.div_ceil(layout.block_size());
    let items: Vec<(usize, std::ops::Range<usize>)> = (0..heads)
        .flat_map(|h| ranges(blocks).map(move |r| (h, r)))
        .collect();
    let query = Query::new(storage, layer, ctx, q, scale);
    // each item's partial state in one slot of one buffer, the buffers of each thread reused
    // from call to call: a call per layer and token must not allocate per item
    let slot_len = Partial::slot_len(group, d);
    let mut slots = vec![0f32; items.len() * slot_len];
    let run = |slot: &mut [f32], (head, range): &(usize, std::ops::Range<usize>)| {
        SPLIT_BUFFERS.with(|cell| {
            let (scratch, partial) = &mut *cell.borrow_mut();
            scratch.path = dispatch.path;
            scratch.prefetch = dispatch.prefetch;
            query
                .pass(*head)
                .run(range.clone(), partial, scratch, simd)?;
            partial.store(slot);
            Ok::<(), KvError>(())
        })
    };
    // a context of a few ranges runs on the calling thread, without rayon: handing it to a
    // worker costs more than the work (ranges and merge order are the same either way)
    if items.len() <= MIN_RANGES_PER_TASK {
        for (slot, item) in slots.chunks_mut(slot_len).zip(&items) {
            run(slot, item)?;
        }
    } else {
        slots
            .par_chunks_mut(slot_len)
            .zip(items.par_iter())
            .with_min_len(MIN_RANGES_PER_TASK)
            .try_for_each(|(slot, item)| run(slot, item))?;
    }
    let (mut merged, mut part) = (Partial::default(), Partial::default());
    for head in 0..heads {
        let mut slots_of_head = slots
            .chunks(slot_len)
            .zip(&items)
            .filter(|(_, (h, _))| *h == head)
            .map(|(slot, _)| slot);
        let Some(first) = slots_of_head.next() else {
            continue;
        };
        merged.load(first, group, d);
        for slot in slots_of_head {
            part.load(slot, group, d);
            merged.merge(&part, d);
        }
        merged.write(d, &mut out[head * group * d..(head + 1) * group * d]);
    }
    Ok(())
}
