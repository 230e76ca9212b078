//! Reading one page where it lies, per codec: the key scores of a block for every query head
//! of a GQA group, and the probability-weighted sum of its values (DESIGN §7).
//!
//! - f32: read directly; f16/bf16: converted in bulk into a page-sized buffer in L1;
//! - int8/int4 keys: the channel scales fold into the query, `q·(s⊙x + z) = (q⊙s)·x + q·z`,
//!   so the dot runs on the codes; values: `p·(s·x + z) = (p·s)·x + p·z` per group of 32;
//! - fp8: the 256-entry decode table inside the dot, scales folded the same way;
//! - FibQuant: never decoded (see [`super::lut`]).
//!
//! Every function is `#[inline(always)]` so the SIMD build of the kernel compiles them with
//! its target features.

use crate::codec::scalar::{code_bits, fp8_table, get_f16};
use crate::codec::PageLayout;
use crate::codec::{Codec, Role, VALUE_GROUP};
use crate::error::{KvError, Result};
use crate::storage::PageRef;

use super::convert::{bf16_to_f32, f16_bytes_to_f32, f16_to_f32};
use super::lut::FibTables;
use super::softmax::{axpy, dot};
use super::Simd;

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(super) mod x86;

/// Geometry of one kv head's pass: `group` query heads of `d` elements, blocks of `bs`; and
/// the level it runs at.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub group: usize,
    pub d: usize,
    pub bs: usize,
    /// The dispatch level of the pass: the hand-written AVX-512 loops run only at `Avx512`.
    pub simd: Simd,
}

/// The query rows a key page is scored against (`group × d`), and the factor every score is
/// multiplied by (the softmax scale).
#[derive(Debug, Clone, Copy)]
pub(super) struct ScaledQuery<'a> {
    pub rows: &'a [f32],
    pub scale: f32,
}

/// Buffers reused across pages.
#[derive(Debug, Default, Clone)]
pub(super) struct PageScratch {
    /// FibQuant's query tables and rotated value sums (kept across the blocks of a pass).
    pub fib: FibTables,
    /// A converted page (f16/bf16, or a packed full-precision page).
    page: Vec<f32>,
    /// Query rows with key scales folded in (`group × d`), and their constant terms.
    folded: Vec<f32>,
    bias: Vec<f32>,
    /// One unpacked row of int4 codes.
    codes: Vec<u8>,
    /// Parameters of an integer key page: as stored (scale, zero pairs), then split.
    pairs: Vec<f32>,
    scale: Vec<f32>,
    zero: Vec<f32>,
}

/// Asks the CPU to start loading a page into cache, a few blocks before it is read: compressed
/// pages measured faster with it, full-precision pages slower, their streams better followed
/// by the CPU's own prefetcher (docs/performance.md, "Software prefetch"; [`Fetch::of`]).
#[inline(always)]
pub(super) fn prefetch_page(page: PageRef) {
    let bytes: &[u8] = match page {
        PageRef::F32(p) | PageRef::F32T(p) => bytemuck::cast_slice(p),
        PageRef::F16(p) | PageRef::F16T(p) => bytemuck::cast_slice(p),
        PageRef::Bf16(p) | PageRef::Bf16T(p) => bytemuck::cast_slice(p),
        PageRef::Packed { bytes, .. } => bytes,
    };
    prefetch_bytes(bytes);
}

/// [`prefetch_page`] of a page's bytes.
#[inline(always)]
pub(super) fn prefetch_bytes(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for offset in (0..bytes.len()).step_by(64) {
            // SAFETY: `offset < bytes.len()`, so the address lies inside the borrowed page; a
            // prefetch only hints the cache and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().add(offset).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// What a pass prefetches in software: which of a block's two pages, `ahead` blocks before
/// reading them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fetch {
    pub ahead: usize,
    pub keys: bool,
    pub values: bool,
}

impl Fetch {
    /// The pages of `layer` that `prefetch` names (by the codec of each role), asked for
    /// about `bytes` ahead of the block being read.
    pub(super) fn of(
        prefetch: crate::attention::Prefetch,
        layout: &crate::layout::KvLayout,
        layer: usize,
        bytes: usize,
    ) -> Self {
        let block_bytes = layout.key_page_bytes(layer) + layout.value_page_bytes(layer);
        Self {
            ahead: (bytes / block_bytes.max(1)).clamp(1, 8),
            keys: prefetch.fetches(layout.key_codec(layer)),
            values: prefetch.fetches(layout.value_codec(layer)),
        }
    }
}

/// Prefetches the pages `fetch` names of `runs[i + fetch.ahead]` while `runs[i]` is read (at
/// `i` = 0, those of blocks 0 ..= `fetch.ahead`): what a whole-block kernel calls for each
/// block of its run.
#[inline(always)]
pub(super) fn prefetch_run(runs: &[(&[u8], &[u8])], i: usize, fetch: Fetch) {
    if !fetch.keys && !fetch.values {
        return;
    }
    let ahead = fetch.ahead;
    let first = if i == 0 { 0 } else { i + ahead };
    for (keys, values) in runs.iter().take(i + ahead + 1).skip(first) {
        if fetch.keys {
            prefetch_bytes(keys);
        }
        if fetch.values {
            prefetch_bytes(values);
        }
    }
}

/// Channel-major integer key codes as f32 columns (`d × bs`) in `out`.
#[inline(always)]
fn int_key_columns(codec: Codec, codes: &[u8], bs: usize, d: usize, out: &mut Vec<f32>) {
    out.resize(d * bs, 0.0);
    match code_bits(codec) {
        8 => out.iter_mut().zip(codes).for_each(|(o, c)| *o = *c as f32),
        4 => packed_columns::<4>(codes, bs, out),
        _ => packed_columns::<2>(codes, bs, out),
    }
}

/// Columns of `BITS`-bit codes (lowest bits first, each column padded to whole bytes) as f32.
#[inline(always)]
fn packed_columns<const BITS: usize>(codes: &[u8], bs: usize, out: &mut [f32]) {
    let per_byte = 8 / BITS;
    let mask = ((1u16 << BITS) - 1) as u8;
    if bs.is_multiple_of(per_byte) {
        for (chunk, b) in out.chunks_exact_mut(per_byte).zip(codes) {
            for (k, o) in chunk.iter_mut().enumerate() {
                *o = ((b >> (BITS * k)) & mask) as f32;
            }
        }
    } else {
        let row = bs.div_ceil(per_byte);
        for (c, column) in out.chunks_exact_mut(bs).enumerate() {
            for (t, o) in column.iter_mut().enumerate() {
                *o = ((codes[c * row + t / per_byte] >> (BITS * (t % per_byte))) & mask) as f32;
            }
        }
    }
}

/// Token `t`'s row of one-byte codes: int8 and fp8 rows as stored, int4 and int2 rows unpacked
/// into `buffer`.
#[inline(always)]
fn code_row<'a>(
    codec: Codec,
    codes: &'a [u8],
    t: usize,
    d: usize,
    buffer: &'a mut Vec<u8>,
) -> &'a [u8] {
    let bits = code_bits(codec);
    let row = d.div_ceil(8 / bits);
    let bytes = &codes[t * row..(t + 1) * row];
    match bits {
        8 => bytes,
        4 => unpack_row::<4>(bytes, d, buffer),
        _ => unpack_row::<2>(bytes, d, buffer),
    }
}

/// Unpacks a row of `BITS`-bit codes (lowest bits first) into `out` (`d` codes).
#[inline(always)]
fn unpack_row<'a, const BITS: usize>(row: &[u8], d: usize, out: &'a mut Vec<u8>) -> &'a [u8] {
    let per_byte = 8 / BITS;
    let mask = ((1u16 << BITS) - 1) as u8;
    out.resize(d.next_multiple_of(per_byte), 0);
    for (chunk, b) in out.chunks_exact_mut(per_byte).zip(row) {
        for (k, o) in chunk.iter_mut().enumerate() {
            *o = (b >> (BITS * k)) & mask;
        }
    }
    out.truncate(d);
    out
}

/// The first `len` elements of a full-precision page as f32 (borrowed, or converted into
/// `buffer`); None for packed pages.
#[inline(always)]
fn full_precision_rows<'a>(
    page: PageRef<'a>,
    len: usize,
    buffer: &'a mut Vec<f32>,
    simd: Simd,
) -> Option<&'a [f32]> {
    match page {
        PageRef::F32(p) => Some(&p[..len]),
        PageRef::F16(p) => {
            buffer.resize(len, 0.0);
            f16_to_f32(&p[..len], buffer, simd);
            Some(buffer)
        }
        PageRef::Bf16(p) => {
            buffer.resize(len, 0.0);
            bf16_to_f32(&p[..len], buffer);
            Some(buffer)
        }
        _ => None,
    }
}

/// A channel-major key page as f32 columns (`d × bs`, borrowed or converted into `buffer`).
#[inline(always)]
fn key_columns<'a>(page: PageRef<'a>, buffer: &'a mut Vec<f32>, simd: Simd) -> Option<&'a [f32]> {
    match page {
        PageRef::F32T(p) => Some(p),
        PageRef::F16T(p) => {
            buffer.resize(p.len(), 0.0);
            f16_to_f32(p, buffer, simd);
            Some(buffer)
        }
        PageRef::Bf16T(p) => {
            buffer.resize(p.len(), 0.0);
            bf16_to_f32(p, buffer);
            Some(buffer)
        }
        _ => None,
    }
}

/// Scores of a whole block from channel-major keys: per query head, one vector FMA per
/// channel over the block's tokens (16 at a time in registers), no horizontal sums. Tokens
/// past the context get scores too; callers read only the first `n`.
#[inline(always)]
fn column_scores(columns: &[f32], shape: Shape, q: &[f32], scale: f32, scores: &mut [f32]) {
    const LANES: usize = 16;
    let Shape { d, bs, .. } = shape;
    #[cfg(target_arch = "x86_64")]
    if bs == LANES && columns.len() >= d * LANES && shape.simd == Simd::Avx512 {
        // SAFETY: AVX-512F, AVX2 and F16C are present (checked on this line); lengths are checked
        // inside.
        return unsafe { x86::column_scores_16(columns, shape, q, scale, scores) };
    }
    #[cfg(target_arch = "x86_64")]
    if bs == LANES && columns.len() >= d * LANES && shape.simd == Simd::Avx2 {
        // SAFETY: AVX2, FMA and F16C are present (checked on this line); lengths are checked
        // inside.
        return unsafe { avx2::column_scores_16(columns, shape, q, scale, scores) };
    }
    if bs == LANES {
        // the default block size: each channel's column is one register, no bounds checks
        let (columns, _) = columns.as_chunks::<LANES>();
        for (g, qg) in q.chunks_exact(d).enumerate() {
            let mut acc = [0f32; LANES];
            for (qc, column) in qg.iter().zip(columns) {
                for t in 0..LANES {
                    acc[t] += qc * column[t];
                }
            }
            for (o, a) in scores[g * bs..(g + 1) * bs].iter_mut().zip(&acc) {
                *o = a * scale;
            }
        }
        return;
    }
    for (g, qg) in q.chunks_exact(d).enumerate() {
        let out = &mut scores[g * bs..(g + 1) * bs];
        for start in (0..bs).step_by(LANES) {
            if start + LANES <= bs {
                let mut acc = [0f32; LANES];
                for (c, qc) in qg.iter().enumerate() {
                    let column = &columns[c * bs + start..c * bs + start + LANES];
                    for t in 0..LANES {
                        acc[t] += qc * column[t];
                    }
                }
                for (o, a) in out[start..start + LANES].iter_mut().zip(&acc) {
                    *o = a * scale;
                }
            } else {
                let tail = &mut out[start..];
                tail.fill(0.0);
                for (c, qc) in qg.iter().enumerate() {
                    axpy(tail, *qc, &columns[c * bs + start..(c + 1) * bs]);
                }
                tail.iter_mut().for_each(|o| *o *= scale);
            }
        }
    }
}

/// Where a scalar codec's page keeps its codes and parameters.
#[inline(always)]
fn page_layout(codec: Codec, role: Role, shape: Shape) -> Result<PageLayout> {
    PageLayout::scalar(codec, role, shape.bs, shape.d).ok_or(KvError::UnsupportedCodec {
        codec: codec.to_string(),
        reason: "no scalar page layout",
    })
}

/// `scores[g·bs + t] = scale·⟨q_g, k_t⟩` for the first `n` tokens of a key page.
#[inline(always)]
pub(super) fn key_scores(
    page: PageRef,
    n: usize,
    shape: Shape,
    query: ScaledQuery,
    scores: &mut [f32],
    scratch: &mut PageScratch,
) -> Result<()> {
    let Shape { d, bs, .. } = shape;
    let ScaledQuery { rows: q, scale } = query;
    #[cfg(target_arch = "x86_64")]
    if bs == 16 && shape.simd == Simd::Avx512 {
        // SAFETY (each call): AVX-512F, AVX2 and F16C are present (checked above); lengths are
        // checked inside.
        match page {
            PageRef::F16T(p) => {
                unsafe { x86::column_scores_16_f16(p, shape, q, scale, scores) };
                return Ok(());
            }
            PageRef::Bf16T(p) => {
                unsafe { x86::column_scores_16_bf16(p, shape, q, scale, scores) };
                return Ok(());
            }
            _ => {}
        }
    }
    #[cfg(target_arch = "x86_64")]
    if bs == 16 && shape.simd == Simd::Avx2 {
        // SAFETY (each call): AVX2, FMA and F16C are present (checked above); lengths are
        // checked inside.
        match page {
            PageRef::F16T(p) => {
                unsafe { avx2::column_scores_16_f16(p, shape, q, scale, scores) };
                return Ok(());
            }
            PageRef::Bf16T(p) => {
                unsafe { avx2::column_scores_16_bf16(p, shape, q, scale, scores) };
                return Ok(());
            }
            _ => {}
        }
    }
    let PageScratch { page: buffer, .. } = scratch;
    if let Some(columns) = key_columns(page, buffer, shape.simd) {
        column_scores(columns, shape, q, scale, scores);
        return Ok(());
    }
    let PageScratch { page: buffer, .. } = scratch;
    let Some(rows) = full_precision_rows(page, n * d, buffer, shape.simd) else {
        let PageRef::Packed { codec, bytes, .. } = page else {
            unreachable!("every other page kind has rows")
        };
        return packed_key_scores(codec, bytes, n, shape, query, scores, scratch);
    };
    for (g, qg) in q.chunks_exact(d).enumerate() {
        for (t, key) in rows.chunks_exact(d).enumerate() {
            scores[g * bs + t] = dot(qg, key) * scale;
        }
    }
    Ok(())
}

#[inline(always)]
fn packed_key_scores(
    codec: Codec,
    bytes: &[u8],
    n: usize,
    shape: Shape,
    query: ScaledQuery,
    scores: &mut [f32],
    scratch: &mut PageScratch,
) -> Result<()> {
    let Shape { group, d, bs, .. } = shape;
    let ScaledQuery { rows: q, scale } = query;
    match codec {
        Codec::Int8 | Codec::Int4 | Codec::Int2 => {
            // channel-major codes: scales folded into the query, zero points into a constant,
            // then the block's scores column by column like a full-precision page
            let (codes, params) = page_layout(codec, Role::Key, shape)?.split(bytes)?;
            scratch.folded.resize(group * d, 0.0);
            scratch.bias.resize(group, 0.0);
            #[cfg(target_arch = "x86_64")]
            let folded_in_registers =
                bs == 16 && d.is_multiple_of(16) && shape.simd == Simd::Avx512 && {
                    let (folded, bias) = (&mut scratch.folded, &mut scratch.bias);
                    // SAFETY: AVX-512F, AVX2 and F16C are present (checked on the line above);
                    // lengths are checked inside.
                    unsafe { x86::fold_int_key_params(params, q, shape, scale, folded, bias) };
                    true
                };
            #[cfg(not(target_arch = "x86_64"))]
            let folded_in_registers = false;
            if !folded_in_registers {
                fold_int_key_params(params, q, shape, scale, scratch);
            }
            let folded = &scratch.folded;
            #[cfg(target_arch = "x86_64")]
            let done = bs == 16 && shape.simd == Simd::Avx512 && {
                // SAFETY: AVX-512F, AVX2 and F16C are present (checked on the line above);
                // lengths are checked inside.
                unsafe {
                    match codec {
                        Codec::Int8 => x86::column_scores_16_u8(codes, shape, folded, 1.0, scores),
                        Codec::Int4 => x86::column_scores_16_u4(codes, shape, folded, 1.0, scores),
                        _ => x86::column_scores_16_u2(codes, shape, folded, 1.0, scores),
                    }
                };
                true
            };
            #[cfg(target_arch = "x86_64")]
            let done = done
                || bs == 16 && shape.simd == Simd::Avx2 && {
                    // SAFETY: AVX2, FMA and F16C are present (checked on the line above);
                    // lengths are checked inside.
                    unsafe {
                        match codec {
                            Codec::Int8 => {
                                avx2::column_scores_16_u8(codes, shape, folded, 1.0, scores)
                            }
                            Codec::Int4 => {
                                avx2::column_scores_16_u4(codes, shape, folded, 1.0, scores)
                            }
                            _ => avx2::column_scores_16_u2(codes, shape, folded, 1.0, scores),
                        }
                    };
                    true
                };
            #[cfg(not(target_arch = "x86_64"))]
            let done = false;
            if !done {
                int_key_columns(codec, codes, bs, d, &mut scratch.page);
                column_scores(&scratch.page, shape, &scratch.folded, 1.0, scores);
            }
            for (g, bias) in scratch.bias.iter().enumerate() {
                scores[g * bs..g * bs + n]
                    .iter_mut()
                    .for_each(|s| *s += bias);
            }
            Ok(())
        }
        Codec::Fp8E4m3 | Codec::Fp8E5m2 => {
            // channel-major codes; per-channel scales folded into the query
            let (codes, params) = page_layout(codec, Role::Key, shape)?.split(bytes)?;
            f16_bytes_to_f32(params, &mut scratch.scale, shape.simd);
            scratch.folded.resize(group * d, 0.0);
            for (g, qg) in q.chunks_exact(d).enumerate() {
                let folded = &mut scratch.folded[g * d..(g + 1) * d];
                for ((f, x), s) in folded.iter_mut().zip(qg).zip(&scratch.scale) {
                    *f = x * s * scale;
                }
            }
            #[cfg(target_arch = "x86_64")]
            if bs == 16 && shape.simd == Simd::Avx512 {
                let folded = &scratch.folded;
                // SAFETY: AVX-512F, AVX2 and F16C are present (checked above); lengths are
                // checked inside.
                unsafe {
                    if codec == Codec::Fp8E4m3 {
                        x86::column_scores_16_e4m3(codes, shape, folded, 1.0, scores)
                    } else {
                        x86::column_scores_16_e5m2(codes, shape, folded, 1.0, scores)
                    }
                };
                return Ok(());
            }
            #[cfg(target_arch = "x86_64")]
            if bs == 16 && shape.simd == Simd::Avx2 {
                let folded = &scratch.folded;
                // SAFETY: AVX2, FMA and F16C are present (checked above); lengths are checked
                // inside.
                unsafe {
                    if codec == Codec::Fp8E4m3 {
                        avx2::column_scores_16_e4m3(codes, shape, folded, 1.0, scores)
                    } else {
                        avx2::column_scores_16_e5m2(codes, shape, folded, 1.0, scores)
                    }
                };
                return Ok(());
            }
            let table = fp8_table(codec);
            scratch.page.resize(d * bs, 0.0);
            for (o, c) in scratch.page.iter_mut().zip(codes) {
                *o = table[*c as usize];
            }
            column_scores(&scratch.page, shape, &scratch.folded, 1.0, scores);
            Ok(())
        }
        Codec::FibQuant { .. } => scratch
            .fib
            .key_scores(codec, bytes, n, shape, query, scores),
        Codec::F32 | Codec::F16 | Codec::Bf16 => {
            // a full-precision layer inside a compressed layout: decode the page, then dot
            decode_packed(codec, crate::Role::Key, bytes, shape, scratch)?;
            for (g, qg) in q.chunks_exact(d).enumerate() {
                for (t, key) in scratch.page.chunks_exact(d).take(n).enumerate() {
                    scores[g * bs + t] = dot(qg, key) * scale;
                }
            }
            Ok(())
        }
    }
}

/// Integer key parameters folded into the query: `folded_g = scale·q_g ⊙ s` and
/// `bias_g = scale·⟨q_g, z⟩` from the page's per-channel f16 (scale, zero) pairs.
#[inline(always)]
fn fold_int_key_params(
    params: &[u8],
    q: &[f32],
    shape: Shape,
    scale: f32,
    scratch: &mut PageScratch,
) {
    let d = shape.d;
    f16_bytes_to_f32(params, &mut scratch.pairs, shape.simd);
    scratch.scale.resize(d, 0.0);
    scratch.zero.resize(d, 0.0);
    for ((s, z), sz) in scratch
        .scale
        .iter_mut()
        .zip(scratch.zero.iter_mut())
        .zip(scratch.pairs.chunks_exact(2))
    {
        (*s, *z) = (sz[0] * scale, sz[1] * scale);
    }
    for (g, qg) in q.chunks_exact(d).enumerate() {
        let folded = &mut scratch.folded[g * d..(g + 1) * d];
        for ((f, x), s) in folded.iter_mut().zip(qg).zip(&scratch.scale) {
            *f = x * s;
        }
        scratch.bias[g] = dot(qg, &scratch.zero);
    }
}

/// Decodes a packed full-precision page (a layer overridden to f32/f16/bf16 inside a
/// compressed layout) into `scratch.page`, token-major.
#[inline(always)]
fn decode_packed(
    codec: Codec,
    role: crate::Role,
    bytes: &[u8],
    shape: Shape,
    scratch: &mut PageScratch,
) -> Result<()> {
    let Shape { d, bs, .. } = shape;
    scratch.page.resize(bs * d, 0.0);
    crate::codec::scalar::decode_page(codec, role, bytes, bs, d, &mut scratch.page)
}

/// `acc_g += Σ_t probs[g·bs + t] · v_t` over the first `n` tokens of a value page.
#[inline(always)]
pub(super) fn accumulate_values(
    page: PageRef,
    n: usize,
    shape: Shape,
    probs: &[f32],
    acc: &mut [f32],
    scratch: &mut PageScratch,
) -> Result<()> {
    let Shape { d, .. } = shape;
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(64) && shape.simd == Simd::Avx512 {
        // SAFETY (each call): AVX-512F, AVX2 and F16C are present (checked above); lengths are
        // checked inside.
        match page {
            PageRef::F16(p) => {
                unsafe { x86::weighted_rows_64_f16(p, n, shape, probs, acc) };
                return Ok(());
            }
            PageRef::Bf16(p) => {
                unsafe { x86::weighted_rows_64_bf16(p, n, shape, probs, acc) };
                return Ok(());
            }
            _ => {}
        }
    }
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(16) && shape.simd == Simd::Avx2 {
        // SAFETY (each call): AVX2, FMA and F16C are present (checked above); lengths are
        // checked inside.
        match page {
            PageRef::F16(p) => {
                unsafe { avx2::weighted_rows_16_f16(p, n, shape, probs, acc) };
                return Ok(());
            }
            PageRef::Bf16(p) => {
                unsafe { avx2::weighted_rows_16_bf16(p, n, shape, probs, acc) };
                return Ok(());
            }
            _ => {}
        }
    }
    let PageScratch { page: buffer, .. } = scratch;
    let Some(rows) = full_precision_rows(page, n * d, buffer, shape.simd) else {
        let PageRef::Packed { codec, bytes, .. } = page else {
            unreachable!("full-precision pages have rows")
        };
        return packed_values(codec, bytes, n, shape, probs, acc, scratch);
    };
    weighted_rows(rows, n, shape, probs, acc);
    Ok(())
}

/// `acc_g += Σ_t probs[g·bs + t]·row_t`, sixteen channels at a time held in registers across
/// the block's tokens.
#[inline(always)]
fn weighted_rows(rows: &[f32], n: usize, shape: Shape, probs: &[f32], acc: &mut [f32]) {
    const LANES: usize = 16;
    let Shape { group, d, bs, .. } = shape;
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(64) && shape.simd == Simd::Avx512 {
        // SAFETY: AVX-512F, AVX2 and F16C are present (checked on this line); lengths are checked
        // inside.
        return unsafe { x86::weighted_rows_64(rows, n, shape, probs, acc) };
    }
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(16) && shape.simd == Simd::Avx2 {
        // SAFETY: AVX2, FMA and F16C are present (checked on this line); lengths are checked
        // inside.
        return unsafe { avx2::weighted_rows_16(rows, n, shape, probs, acc) };
    }
    if d.is_multiple_of(LANES) {
        // rows as arrays of whole registers: no bounds checks in the token loop
        let (chunks, _) = rows[..n * d].as_chunks::<LANES>();
        let per_row = d / LANES;
        for g in 0..group {
            let probs = &probs[g * bs..g * bs + n];
            let (acc, _) = acc[g * d..(g + 1) * d].as_chunks_mut::<LANES>();
            for (i, a_out) in acc.iter_mut().enumerate() {
                let mut a = *a_out;
                for (p, row) in probs.iter().zip(chunks.chunks_exact(per_row)) {
                    let v = &row[i];
                    for lane in 0..LANES {
                        a[lane] += p * v[lane];
                    }
                }
                *a_out = a;
            }
        }
        return;
    }
    for g in 0..group {
        let probs = &probs[g * bs..g * bs + n];
        let acc = &mut acc[g * d..(g + 1) * d];
        for start in (0..d).step_by(LANES) {
            if start + LANES <= d {
                let mut a = [0f32; LANES];
                a.copy_from_slice(&acc[start..start + LANES]);
                for (p, row) in probs.iter().zip(rows.chunks_exact(d)) {
                    let v = &row[start..start + LANES];
                    for i in 0..LANES {
                        a[i] += p * v[i];
                    }
                }
                acc[start..start + LANES].copy_from_slice(&a);
            } else {
                for (p, row) in probs.iter().zip(rows.chunks_exact(d)) {
                    axpy(&mut acc[start..], *p, &row[start..]);
                }
            }
        }
    }
}

#[inline(always)]
fn packed_values(
    codec: Codec,
    bytes: &[u8],
    n: usize,
    shape: Shape,
    probs: &[f32],
    acc: &mut [f32],
    scratch: &mut PageScratch,
) -> Result<()> {
    let Shape { group, d, bs, .. } = shape;
    match codec {
        Codec::Int8 | Codec::Int4 | Codec::Int2 => {
            let (codes, params) = page_layout(codec, Role::Value, shape)?.split(bytes)?;
            #[cfg(target_arch = "x86_64")]
            {
                // the loop reads the parameters of 16 tokens at a time: blocks of 16 only
                let fits = bs == 16 && d.is_multiple_of(64) && VALUE_GROUP == 32;
                if fits && shape.simd == Simd::Avx512 {
                    // SAFETY: AVX-512F and F16C are present (checked on the line above);
                    // lengths are checked inside.
                    unsafe {
                        match codec {
                            Codec::Int8 => {
                                x86::int_weighted_rows_64_u8(codes, params, n, shape, probs, acc)
                            }
                            Codec::Int4 => {
                                x86::int_weighted_rows_64_u4(codes, params, n, shape, probs, acc)
                            }
                            _ => x86::int_weighted_rows_64_u2(codes, params, n, shape, probs, acc),
                        }
                    };
                    return Ok(());
                }
            }
            #[cfg(target_arch = "x86_64")]
            if d.is_multiple_of(32) && VALUE_GROUP == 32 && shape.simd == Simd::Avx2 {
                // SAFETY: AVX2, FMA and F16C are present (checked on the line above); lengths
                // are checked inside.
                unsafe {
                    match codec {
                        Codec::Int8 => {
                            avx2::int_weighted_rows_16_u8(codes, params, n, shape, probs, acc)
                        }
                        Codec::Int4 => {
                            avx2::int_weighted_rows_16_u4(codes, params, n, shape, probs, acc)
                        }
                        _ => avx2::int_weighted_rows_16_u2(codes, params, n, shape, probs, acc),
                    }
                };
                return Ok(());
            }
            let groups = d.div_ceil(VALUE_GROUP);
            for t in 0..n {
                let row = code_row(codec, codes, t, d, &mut scratch.codes);
                for g in 0..group {
                    let p = probs[g * bs + t];
                    let acc = &mut acc[g * d..(g + 1) * d];
                    for (chunk, (a, x)) in acc
                        .chunks_mut(VALUE_GROUP)
                        .zip(row.chunks(VALUE_GROUP))
                        .enumerate()
                        .map(|(i, pair)| (t * groups + i, pair))
                    {
                        let (w, pz) = (
                            p * get_f16(params, 2 * chunk),
                            p * get_f16(params, 2 * chunk + 1),
                        );
                        a.iter_mut()
                            .zip(x)
                            .for_each(|(a, x)| *a += w * *x as f32 + pz);
                    }
                }
            }
            Ok(())
        }
        Codec::Fp8E4m3 | Codec::Fp8E5m2 => {
            let (codes, params) = page_layout(codec, Role::Value, shape)?.split(bytes)?;
            #[cfg(target_arch = "x86_64")]
            let fits = match shape.simd {
                Simd::Avx512 => d.is_multiple_of(64),
                Simd::Avx2 => d.is_multiple_of(16),
                Simd::Portable => false,
            };
            #[cfg(target_arch = "x86_64")]
            if fits {
                // the per-token scales folded into the weights
                f16_bytes_to_f32(params, &mut scratch.scale, shape.simd);
                scratch.folded.resize(group * bs, 0.0);
                for (w, p) in scratch
                    .folded
                    .chunks_exact_mut(bs)
                    .zip(probs.chunks_exact(bs))
                {
                    for ((w, p), s) in w.iter_mut().zip(p).zip(&scratch.scale) {
                        *w = p * s;
                    }
                }
                let weights = &scratch.folded;
                // SAFETY: the level's features are present (`fits` names a level, and a pass
                // runs at one only where the CPU has it); lengths are checked inside.
                unsafe {
                    match (shape.simd, codec) {
                        (Simd::Avx512, Codec::Fp8E4m3) => {
                            x86::weighted_rows_64_e4m3(codes, n, shape, weights, acc)
                        }
                        (Simd::Avx512, _) => {
                            x86::weighted_rows_64_e5m2(codes, n, shape, weights, acc)
                        }
                        (_, Codec::Fp8E4m3) => {
                            avx2::weighted_rows_16_e4m3(codes, n, shape, weights, acc)
                        }
                        _ => avx2::weighted_rows_16_e5m2(codes, n, shape, weights, acc),
                    }
                };
                return Ok(());
            }
            let table = fp8_table(codec);
            for t in 0..n {
                let row = &codes[t * d..(t + 1) * d];
                let s = get_f16(params, t);
                for g in 0..group {
                    let w = probs[g * bs + t] * s;
                    acc[g * d..(g + 1) * d]
                        .iter_mut()
                        .zip(row)
                        .for_each(|(a, c)| *a += w * table[*c as usize]);
                }
            }
            Ok(())
        }
        Codec::FibQuant { .. } => scratch.fib.accumulate(codec, bytes, n, shape, probs),
        Codec::F32 | Codec::F16 | Codec::Bf16 => {
            decode_packed(codec, crate::Role::Value, bytes, shape, scratch)?;
            weighted_rows(&scratch.page, n, shape, probs, acc);
            Ok(())
        }
    }
}
