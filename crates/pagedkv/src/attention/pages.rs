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

use half::{bf16, f16};

use crate::codec::scalar::{code_bits, data_bytes, fp8_table, get_f16};
use crate::codec::{Codec, Role, VALUE_GROUP};
use crate::error::Result;
use crate::storage::PageRef;

use super::lut::FibTables;

/// Geometry of one kv head's pass: `group` query heads of `d` elements, blocks of `bs`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub group: usize,
    pub d: usize,
    pub bs: usize,
}

/// Buffers reused across pages.
#[derive(Debug, Default, Clone)]
pub(super) struct PageScratch {
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

/// f16 → f32 in plain integer and float operations that vectorize (the `half` crate converts
/// 8 at a time behind a function call): the exponent and mantissa bits moved into f32
/// position and rescaled by 2¹¹², exact for normals and subnormals; infinities and NaNs get
/// the all-ones exponent. Bit-identical to `f16::to_f32` (tested on all 65,536 codes).
#[inline(always)]
pub(super) fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked on the line above).
        return unsafe { f16_to_f32_avx512(src, dst) };
    }
    f16_to_f32_portable(src, dst)
}

/// Sixteen conversions per instruction (`vcvtph2ps`), the portable loop for the tail.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn f16_to_f32_avx512(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::{_mm256_loadu_si256, _mm512_cvtph_ps, _mm512_storeu_ps};
    let len = src.len().min(dst.len());
    let whole = len / 16 * 16;
    for i in (0..whole).step_by(16) {
        // SAFETY: i + 16 ≤ len ≤ both lengths, so the 16 halves read and 16 floats written
        // are in bounds; unaligned loads and stores are used.
        unsafe {
            let halves = _mm256_loadu_si256(src.as_ptr().add(i).cast());
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(halves));
        }
    }
    f16_to_f32_portable(&src[whole..len], &mut dst[whole..len]);
}

#[inline(always)]
fn f16_to_f32_portable(src: &[f16], dst: &mut [f32]) {
    const RESCALE: f32 = 5.192_297e33; // 2^112
    for (o, h) in dst.iter_mut().zip(src) {
        let bits = h.to_bits() as u32;
        let magnitude = bits & 0x7FFF;
        let finite = f32::from_bits(magnitude << 13) * RESCALE;
        let special = f32::from_bits((magnitude << 13) | 0x7F80_0000);
        let value = if magnitude >= 0x7C00 { special } else { finite };
        *o = f32::from_bits(value.to_bits() | ((bits & 0x8000) << 16));
    }
}

/// Little-endian f16 values stored as bytes (any alignment) → f32, resizing `out`.
#[inline(always)]
fn f16_bytes_to_f32(bytes: &[u8], out: &mut Vec<f32>) {
    let len = bytes.len() / 2;
    out.resize(len, 0.0);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked on the line above); lengths are checked inside.
        done = unsafe { x86::f16_bytes_to_f32_16(bytes, out) };
    }
    for (i, o) in out.iter_mut().enumerate().skip(done) {
        *o = get_f16(bytes, i);
    }
}

/// bf16 → f32: the bits are f32's upper half.
#[inline(always)]
pub(super) fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    for (o, h) in dst.iter_mut().zip(src) {
        *o = f32::from_bits((h.to_bits() as u32) << 16);
    }
}

/// Asks the CPU to start loading a page into cache. Pages of one kv head lie `kv_heads` pages
/// apart, and hardware prefetchers stop at 4 KiB boundaries, so without this each page begins
/// with a stall on memory.
#[inline(always)]
pub(super) fn prefetch(page: PageRef) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let (ptr, bytes) = match page {
            PageRef::F32(p) | PageRef::F32T(p) => {
                (p.as_ptr().cast::<i8>(), std::mem::size_of_val(p))
            }
            PageRef::F16(p) | PageRef::F16T(p) => {
                (p.as_ptr().cast::<i8>(), std::mem::size_of_val(p))
            }
            PageRef::Bf16(p) | PageRef::Bf16T(p) => {
                (p.as_ptr().cast::<i8>(), std::mem::size_of_val(p))
            }
            PageRef::Packed { bytes, .. } => (bytes.as_ptr().cast::<i8>(), bytes.len()),
        };
        for offset in (0..bytes).step_by(64) {
            // SAFETY: `offset < bytes`, so the address lies inside the borrowed page; a
            // prefetch only hints the cache and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = page;
}

/// Dot product with 16 independent partial sums, so the compiler keeps them in vector lanes.
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// How far scores may exceed the running reference point before it moves: weights up to
/// e⁸ ≈ 3000 stay far from f32's range, and the running sums are rescaled (an exponential and
/// a pass over the accumulators) only when a block's maximum jumps, not on every new maximum.
pub(super) const LAZY_MAX_SLACK: f32 = 8.0;

/// The softmax reference point after a block whose largest score is `block_max`.
#[inline(always)]
pub(super) fn lazy_max(max_in: f32, block_max: f32) -> f32 {
    if block_max > max_in + LAZY_MAX_SLACK || max_in == f32::NEG_INFINITY {
        max_in.max(block_max)
    } else {
        max_in
    }
}

/// `x ← eˣ` for scores shifted by the softmax reference point (x ≤ 8, or −∞), branch-free so it
/// vectorizes: x = n·ln2 + r with |r| ≤ ln2/2, eʳ by a degree-6 polynomial (Cephes' expf
/// coefficients), 2ⁿ put in the exponent bits. Relative error below 3·10⁻⁷; below −87 the
/// result is 0 (f32 would be subnormal there; softmax weights that small do not count).
#[inline(always)]
pub(super) fn exp_in_place(xs: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    for x in xs.iter_mut() {
        let v = x.max(-87.0);
        let n = (v * LOG2E + 0.5).floor();
        let r = v - n * LN2_HI - n * LN2_LO;
        let p = 1.987_569_1e-4;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 1.666_666_5e-1;
        let p = p * r + 0.5;
        let e = p * r * r + r + 1.0;
        let scaled = e * f32::from_bits((((n as i32) + 127) << 23) as u32);
        *x = if *x < -87.0 { 0.0 } else { scaled };
    }
}

#[inline(always)]
pub(super) fn axpy(acc: &mut [f32], p: f32, v: &[f32]) {
    acc.iter_mut().zip(v).for_each(|(a, x)| *a += p * x);
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
) -> Option<&'a [f32]> {
    match page {
        PageRef::F32(p) => Some(&p[..len]),
        PageRef::F16(p) => {
            buffer.resize(len, 0.0);
            f16_to_f32(&p[..len], buffer);
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
fn key_columns<'a>(page: PageRef<'a>, buffer: &'a mut Vec<f32>) -> Option<&'a [f32]> {
    match page {
        PageRef::F32T(p) => Some(p),
        PageRef::F16T(p) => {
            buffer.resize(p.len(), 0.0);
            f16_to_f32(p, buffer);
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
    if bs == LANES && columns.len() >= d * LANES && x86::available() {
        // SAFETY: AVX-512F, AVX2 and F16C are present (checked on this line); lengths are checked
        // inside.
        return unsafe { x86::column_scores_16(columns, shape, q, scale, scores) };
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

/// `scores[g·bs + t] = scale·⟨q_g, k_t⟩` for the first `n` tokens of a key page.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn key_scores(
    page: PageRef,
    n: usize,
    shape: Shape,
    q: &[f32],
    scale: f32,
    scores: &mut [f32],
    scratch: &mut PageScratch,
    fib: &mut FibTables,
) -> Result<()> {
    let Shape { d, bs, .. } = shape;
    #[cfg(target_arch = "x86_64")]
    if bs == 16 && x86::available() {
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
    let PageScratch { page: buffer, .. } = scratch;
    if let Some(columns) = key_columns(page, buffer) {
        column_scores(columns, shape, q, scale, scores);
        return Ok(());
    }
    let PageScratch { page: buffer, .. } = scratch;
    let Some(rows) = full_precision_rows(page, n * d, buffer) else {
        let PageRef::Packed { codec, bytes, .. } = page else {
            unreachable!("every other page kind has rows")
        };
        return packed_key_scores(codec, bytes, n, shape, q, scale, scores, scratch, fib);
    };
    for (g, qg) in q.chunks_exact(d).enumerate() {
        for (t, key) in rows.chunks_exact(d).enumerate() {
            scores[g * bs + t] = dot(qg, key) * scale;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn packed_key_scores(
    codec: Codec,
    bytes: &[u8],
    n: usize,
    shape: Shape,
    q: &[f32],
    scale: f32,
    scores: &mut [f32],
    scratch: &mut PageScratch,
    fib: &mut FibTables,
) -> Result<()> {
    let Shape { group, d, bs } = shape;
    match codec {
        Codec::Int8 | Codec::Int4 | Codec::Int2 => {
            // channel-major codes: scales folded into the query, zero points into a constant,
            // then the block's scores column by column like a full-precision page
            let (codes, params) = bytes.split_at(data_bytes(codec, Role::Key, bs, d));
            scratch.folded.resize(group * d, 0.0);
            scratch.bias.resize(group, 0.0);
            #[cfg(target_arch = "x86_64")]
            let folded_in_registers = bs == 16 && d.is_multiple_of(16) && x86::available() && {
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
            let done = bs == 16 && x86::available() && {
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
            let (codes, params) = bytes.split_at(data_bytes(codec, Role::Key, bs, d));
            f16_bytes_to_f32(&params[..2 * d], &mut scratch.scale);
            scratch.folded.resize(group * d, 0.0);
            for (g, qg) in q.chunks_exact(d).enumerate() {
                let folded = &mut scratch.folded[g * d..(g + 1) * d];
                for ((f, x), s) in folded.iter_mut().zip(qg).zip(&scratch.scale) {
                    *f = x * s * scale;
                }
            }
            #[cfg(target_arch = "x86_64")]
            if bs == 16 && x86::available() {
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
            let table = fp8_table(codec);
            scratch.page.resize(d * bs, 0.0);
            for (o, c) in scratch.page.iter_mut().zip(codes) {
                *o = table[*c as usize];
            }
            column_scores(&scratch.page, shape, &scratch.folded, 1.0, scores);
            Ok(())
        }
        Codec::FibQuant { .. } => fib.key_scores(codec, bytes, n, shape, q, scale, scores),
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
    f16_bytes_to_f32(&params[..4 * d], &mut scratch.pairs);
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
    fib: &mut FibTables,
) -> Result<()> {
    let Shape { d, .. } = shape;
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(64) && x86::available() {
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
    let PageScratch { page: buffer, .. } = scratch;
    let Some(rows) = full_precision_rows(page, n * d, buffer) else {
        let PageRef::Packed { codec, bytes, .. } = page else {
            unreachable!("full-precision pages have rows")
        };
        return packed_values(codec, bytes, n, shape, probs, acc, scratch, fib);
    };
    weighted_rows(rows, n, shape, probs, acc);
    Ok(())
}

/// `acc_g += Σ_t probs[g·bs + t]·row_t`, sixteen channels at a time held in registers across
/// the block's tokens.
#[inline(always)]
fn weighted_rows(rows: &[f32], n: usize, shape: Shape, probs: &[f32], acc: &mut [f32]) {
    const LANES: usize = 16;
    let Shape { group, d, bs } = shape;
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(64) && x86::available() {
        // SAFETY: AVX-512F, AVX2 and F16C are present (checked on this line); lengths are checked
        // inside.
        return unsafe { x86::weighted_rows_64(rows, n, shape, probs, acc) };
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

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn packed_values(
    codec: Codec,
    bytes: &[u8],
    n: usize,
    shape: Shape,
    probs: &[f32],
    acc: &mut [f32],
    scratch: &mut PageScratch,
    fib: &mut FibTables,
) -> Result<()> {
    let Shape { group, d, bs } = shape;
    match codec {
        Codec::Int8 | Codec::Int4 | Codec::Int2 => {
            let (codes, params) = bytes.split_at(data_bytes(codec, Role::Value, bs, d));
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if d.is_multiple_of(64) && VALUE_GROUP == 32 && has!("avx512f") && has!("f16c") {
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
            let (codes, params) = bytes.split_at(data_bytes(codec, Role::Value, bs, d));
            #[cfg(target_arch = "x86_64")]
            if d.is_multiple_of(64) && x86::available() {
                // the per-token scales folded into the weights
                f16_bytes_to_f32(&params[..2 * bs], &mut scratch.scale);
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
                // SAFETY: AVX-512F, AVX2 and F16C are present (checked above); lengths are
                // checked inside.
                unsafe {
                    if codec == Codec::Fp8E4m3 {
                        x86::weighted_rows_64_e4m3(codes, n, shape, weights, acc)
                    } else {
                        x86::weighted_rows_64_e5m2(codes, n, shape, weights, acc)
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
        Codec::FibQuant { .. } => fib.accumulate(codec, bytes, n, shape, probs),
        Codec::F32 | Codec::F16 | Codec::Bf16 => {
            decode_packed(codec, crate::Role::Value, bytes, shape, scratch)?;
            weighted_rows(&scratch.page, n, shape, probs, acc);
            Ok(())
        }
    }
}

/// One block's online-softmax step for a query head: the first `n` scores become their
/// weights `exp(s − reference)`, and are added into `lanes`, the running sum kept spread over 16
/// lanes (summed once at the end of the pass). The reference point moves (see [`lazy_max`])
/// only when the block exceeds it by more than the slack; then `lanes` is rescaled and the
/// correction returned for the caller's accumulators. Returns (reference, correction).
#[inline(always)]
pub(super) fn softmax_step(
    scores: &mut [f32],
    n: usize,
    max_in: f32,
    lanes: &mut [f32; 16],
) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if scores.len() == 16 && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked on this line).
        return unsafe { x86::softmax_step_16(scores, n, max_in, lanes) };
    }
    let block = &mut scores[..n];
    let block_max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let new_max = lazy_max(max_in, block_max);
    block.iter_mut().for_each(|s| *s -= new_max);
    exp_in_place(block);
    let correction = correction(max_in, new_max);
    lanes[0] = lanes[0] * correction + block.iter().sum::<f32>();
    (new_max, correction)
}

/// The factor that moves sums from reference point `old` to `new` (1 when it did not move).
#[inline(always)]
fn correction(old: f32, new: f32) -> f32 {
    if old == new {
        1.0
    } else {
        (old - new).exp()
    }
}

/// The hot loops written with AVX-512 intrinsics: the compiler keeps array accumulators in
/// memory, so the adds wait on store forwarding; here every accumulator is a register and
/// independent chains interleave. Fused multiply-add, so results differ from the portable loops
/// in the last bits (both are tested against the f64 reference).
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use super::Shape;

    /// Sixteen consecutive elements starting at element `i` of a page as f32: f32 loaded,
    /// f16 converted by `vcvtph2ps`, bf16 widened and shifted, u8 and u4 codes (two per byte,
    /// low nibble first; `i` even) widened to integers and converted — in registers, so no
    /// page is ever converted into memory first.
    macro_rules! load16 {
        (f32, $p:expr, $i:expr) => {
            _mm512_loadu_ps($p.cast::<f32>().add($i))
        };
        (f16, $p:expr, $i:expr) => {
            _mm512_cvtph_ps(_mm256_loadu_si256($p.cast::<u16>().add($i).cast()))
        };
        (bf16, $p:expr, $i:expr) => {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256($p.cast::<u16>().add($i).cast()),
            )))
        };
        (u8, $p:expr, $i:expr) => {
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                $p.cast::<u8>().add($i).cast(),
            )))
        };
        // e5m2 is the upper byte of an f16
        (e5m2, $p:expr, $i:expr) => {
            _mm512_cvtph_ps(_mm256_slli_epi16::<8>(_mm256_cvtepu8_epi16(
                _mm_loadu_si128($p.cast::<u8>().add($i).cast()),
            )))
        };
        // e4m3 (s eeee mmm, bias 7) placed in an f16 (bias 15) is the value × 2⁻⁸, subnormals
        // included; the ×2⁸ follows the conversion (NaN codes are never stored)
        (e4m3, $p:expr, $i:expr) => {{
            let b = _mm256_cvtepu8_epi16(_mm_loadu_si128($p.cast::<u8>().add($i).cast()));
            let magnitude = _mm256_slli_epi16::<7>(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)));
            let sign = _mm256_slli_epi16::<8>(_mm256_and_si256(b, _mm256_set1_epi16(0x80)));
            _mm512_mul_ps(
                _mm512_cvtph_ps(_mm256_or_si256(magnitude, sign)),
                _mm512_set1_ps(256.0),
            )
        }};
        (u4, $p:expr, $i:expr) => {{
            let x = _mm_loadl_epi64($p.cast::<u8>().add($i / 2).cast());
            let low = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(x, low);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(x), low);
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)))
        }};
        // four codes per byte, lowest bits first (`i` a multiple of 4): each byte copied to
        // four lanes, each lane shifted by its position
        (u2, $p:expr, $i:expr) => {{
            let x = _mm_loadu_si32($p.cast::<u8>().add($i / 4).cast());
            let spread = _mm_shuffle_epi8(
                x,
                _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
            );
            let shifts = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6);
            let codes = _mm512_and_si512(
                _mm512_srlv_epi32(_mm512_cvtepu8_epi32(spread), shifts),
                _mm512_set1_epi32(3),
            );
            _mm512_cvtepi32_ps(codes)
        }};
    }

    /// Converts the whole groups of sixteen f16 values in `bytes` (unaligned) into `out`;
    /// returns how many values were converted.
    #[target_feature(enable = "avx512f")]
    pub(super) fn f16_bytes_to_f32_16(bytes: &[u8], out: &mut [f32]) -> usize {
        let whole = (bytes.len() / 2).min(out.len()) / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: values i .. i + 16 lie within both `bytes` (2 bytes each) and `out`.
            unsafe {
                let halves = _mm256_loadu_si256(bytes.as_ptr().add(2 * i).cast());
                _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_cvtph_ps(halves));
            }
        }
        whole
    }

    /// Sixty-four consecutive elements starting at element `i` as four registers (`load16` four
    /// times; int4 rows unpacked 64 codes at once with 256-bit operations).
    macro_rules! load64 {
        (u4, $p:expr, $i:expr) => {{
            let x = _mm256_loadu_si256($p.cast::<u8>().add($i / 2).cast());
            let low = _mm256_set1_epi8(0x0F);
            let lo = _mm256_and_si256(x, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), low);
            // per 128-bit lane: unpacklo = channels 0..15 (lane 1: 32..47), unpackhi = 16..31
            let a = _mm256_unpacklo_epi8(lo, hi);
            let b = _mm256_unpackhi_epi8(lo, hi);
            let f = |x: __m128i| _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(x));
            [
                f(_mm256_castsi256_si128(a)),
                f(_mm256_castsi256_si128(b)),
                f(_mm256_extracti128_si256::<1>(a)),
                f(_mm256_extracti128_si256::<1>(b)),
            ]
        }};
        ($kind:tt, $p:expr, $i:expr) => {
            [
                load16!($kind, $p, $i),
                load16!($kind, $p, $i + 16),
                load16!($kind, $p, $i + 32),
                load16!($kind, $p, $i + 48),
            ]
        };
    }

    /// `column_scores` for blocks of 16 read straight from a channel-major page of `$elem`
    /// (`$per` elements per stored item): per channel one column register, FMAs into one
    /// accumulator per query head (up to four heads at a time, independent chains).
    macro_rules! column_scores_16 {
        ($name:ident, $kind:tt, $elem:ty, $per:expr) => {
            #[target_feature(enable = "avx512f,avx2,f16c")]
            pub(super) fn $name(
                columns: &[$elem],
                shape: Shape,
                q: &[f32],
                scale: f32,
                scores: &mut [f32],
            ) {
                let Shape { group, d, .. } = shape;
                assert!(columns.len() * $per >= d * 16);
                assert!(q.len() >= group * d && scores.len() >= group * 16);
                let scale_v = _mm512_set1_ps(scale);
                let ptr = columns.as_ptr();
                let even = d / 2 * 2;
                for first in (0..group).step_by(4) {
                    let heads = (group - first).min(4);
                    with_heads!(heads, H, {
                        // even and odd channels in separate accumulators: two dependency chains
                        // per head, so the FMAs' latency does not bound the loop
                        let mut acc = [[_mm512_setzero_ps(); 2]; 4];
                        for c in (0..even).step_by(2) {
                            // SAFETY: elements c·16 .. c·16 + 32 lie below d·16 ≤ the page's
                            // elements (asserted above).
                            let columns = unsafe {
                                [
                                    load16!($kind, ptr, c * 16),
                                    load16!($kind, ptr, c * 16 + 16),
                                ]
                            };
                            for (h, a) in acc.iter_mut().enumerate().take(H) {
                                let row = (first + h) * d + c;
                                for (i, (a, column)) in a.iter_mut().zip(columns).enumerate() {
                                    *a = _mm512_fmadd_ps(_mm512_set1_ps(q[row + i]), column, *a);
                                }
                            }
                        }
                        if even < d {
                            // SAFETY: as above, for the last channel.
                            let column = unsafe { load16!($kind, ptr, even * 16) };
                            for (h, a) in acc.iter_mut().enumerate().take(H) {
                                let qv = _mm512_set1_ps(q[(first + h) * d + even]);
                                a[0] = _mm512_fmadd_ps(qv, column, a[0]);
                            }
                        }
                        for (h, a) in acc.iter().enumerate().take(H) {
                            let out = &mut scores[(first + h) * 16..(first + h + 1) * 16];
                            let sum = _mm512_add_ps(a[0], a[1]);
                            // SAFETY: `out` holds exactly 16 floats.
                            unsafe {
                                _mm512_storeu_ps(out.as_mut_ptr(), _mm512_mul_ps(sum, scale_v))
                            };
                        }
                    });
                }
            }
        };
    }
    column_scores_16!(column_scores_16, f32, f32, 1);
    column_scores_16!(column_scores_16_f16, f16, half::f16, 1);
    column_scores_16!(column_scores_16_bf16, bf16, half::bf16, 1);
    column_scores_16!(column_scores_16_u8, u8, u8, 1);
    column_scores_16!(column_scores_16_u4, u4, u8, 2);
    column_scores_16!(column_scores_16_u2, u2, u8, 4);
    column_scores_16!(column_scores_16_e4m3, e4m3, u8, 1);
    column_scores_16!(column_scores_16_e5m2, e5m2, u8, 1);

    /// `fold_int_key_params` sixteen channels at a time (head_dim a multiple of 16): the
    /// (scale, zero) pairs converted by `vcvtph2ps` and split by one permute each, products
    /// and the zero-point dots in registers.
    #[target_feature(enable = "avx512f,avx2,f16c")]
    pub(super) fn fold_int_key_params(
        params: &[u8],
        q: &[f32],
        shape: Shape,
        scale: f32,
        folded: &mut [f32],
        bias: &mut [f32],
    ) {
        let Shape { group, d, .. } = shape;
        assert!(d.is_multiple_of(16) && params.len() >= 4 * d);
        assert!(q.len() >= group * d && folded.len() >= group * d && bias.len() >= group);
        let scale_v = _mm512_set1_ps(scale);
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        let mut dots = [_mm512_setzero_ps(); 16];
        // sixteen heads' dots in registers; any further ones summed as they come
        let heads = group.min(16);
        bias[heads..group].iter_mut().for_each(|b| *b = 0.0);
        for c in (0..d).step_by(16) {
            // SAFETY: bytes 4c .. 4c + 64 lie within the 4·d bytes of parameters (asserted).
            let (a, b) = unsafe {
                let at = params.as_ptr().add(4 * c);
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(at.cast())),
                    _mm512_cvtph_ps(_mm256_loadu_si256(at.add(32).cast())),
                )
            };
            let s = _mm512_mul_ps(_mm512_permutex2var_ps(a, even, b), scale_v);
            let z = _mm512_mul_ps(_mm512_permutex2var_ps(a, odd, b), scale_v);
            for g in 0..group {
                // SAFETY: g·d + c + 16 ≤ group·d ≤ q.len(), folded.len() (asserted above).
                unsafe {
                    let x = _mm512_loadu_ps(q.as_ptr().add(g * d + c));
                    _mm512_storeu_ps(folded.as_mut_ptr().add(g * d + c), _mm512_mul_ps(x, s));
                    if g < heads {
                        dots[g] = _mm512_fmadd_ps(x, z, dots[g]);
                    } else {
                        bias[g] += _mm512_reduce_add_ps(_mm512_mul_ps(x, z));
                    }
                }
            }
        }
        for (g, b) in bias.iter_mut().enumerate().take(heads) {
            *b = _mm512_reduce_add_ps(dots[g]);
        }
    }

    /// AVX-512F with AVX2 and F16C, which every kernel of this module may use.
    pub(super) fn available() -> bool {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx2") && has!("f16c")
    }

    /// `softmax_step` for blocks of 16 (the scores past `n` are ignored). The exponential is
    /// the polynomial of `exp_in_place`, in registers, with the power of two applied by
    /// `vscalefps`; no horizontal operation unless the reference point moves.
    #[target_feature(enable = "avx512f")]
    pub(super) fn softmax_step_16(
        scores: &mut [f32],
        n: usize,
        max_in: f32,
        lanes: &mut [f32; 16],
    ) -> (f32, f32) {
        assert!(scores.len() >= 16 && n <= 16);
        let mask: __mmask16 = ((1u32 << n) - 1) as __mmask16;
        // SAFETY: `scores` holds at least 16 floats (asserted above).
        let s = unsafe { _mm512_loadu_ps(scores.as_ptr()) };
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let visible = _mm512_mask_blend_ps(mask, neg_inf, s);
        // the horizontal maximum only when some score passes the slack (or on the first block)
        let bound = _mm512_set1_ps(max_in + super::LAZY_MAX_SLACK);
        let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(visible, bound);
        let new_max = if over != 0 || max_in == f32::NEG_INFINITY {
            super::lazy_max(max_in, _mm512_reduce_max_ps(visible))
        } else {
            max_in
        };
        let x = _mm512_sub_ps(visible, _mm512_set1_ps(new_max));
        let e = _mm512_maskz_mov_ps(mask, exp_shifted(x));
        // SAFETY: as for the load.
        unsafe { _mm512_mask_storeu_ps(scores.as_mut_ptr(), mask, e) };
        let correction = super::correction(max_in, new_max);
        // SAFETY: `lanes` holds 16 floats.
        unsafe {
            let sums = _mm512_loadu_ps(lanes.as_ptr());
            let sums = _mm512_fmadd_ps(sums, _mm512_set1_ps(correction), e);
            _mm512_storeu_ps(lanes.as_mut_ptr(), sums);
        }
        (new_max, correction)
    }

    /// `eˣ` of sixteen scores shifted by the softmax reference point (x ≤ 8, or −∞): the
    /// polynomial of `exp_in_place`, the power of two applied by `vscalefps`; below −87 (and
    /// for −∞) exactly 0.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(in crate::attention) fn exp_shifted(x: __m512) -> __m512 {
        let floor_x = _mm512_set1_ps(-87.0);
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, floor_x);
        let v = _mm512_max_ps(x, floor_x);
        let k =
            _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
                v,
                _mm512_set1_ps(std::f32::consts::LOG2_E),
                _mm512_set1_ps(0.5),
            ));
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693_359_4), v);
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let r2 = _mm512_mul_ps(r, r);
        let e = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
        _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(e, k))
    }

    /// `weighted_rows` for head_dim a multiple of 64, read straight from a token-major page of
    /// `$elem`: a token's 64 channels are loaded (and converted) once into four registers and
    /// serve up to four query heads, each with four accumulator registers.
    macro_rules! weighted_rows_64 {
        ($name:ident, $kind:tt, $elem:ty) => {
            #[target_feature(enable = "avx512f,avx2,f16c")]
            pub(super) fn $name(
                rows: &[$elem],
                n: usize,
                shape: Shape,
                probs: &[f32],
                acc: &mut [f32],
            ) {
                let Shape { group, d, bs } = shape;
                assert!(rows.len() >= n * d && probs.len() >= group * bs && acc.len() >= group * d);
                assert!(n <= bs && d.is_multiple_of(64));
                let ptr = rows.as_ptr();
                for chunk in (0..d).step_by(64) {
                    for first in (0..group).step_by(4) {
                        let heads = (group - first).min(4);
                        with_heads!(heads, H, {
                            let mut a = [[_mm512_setzero_ps(); 4]; 4];
                            for t in 0..n {
                                let row = t * d + chunk;
                                // SAFETY: row + 64 ≤ t·d + d ≤ n·d ≤ rows.len() (asserted above).
                                let v = unsafe {
                                    [
                                        load16!($kind, ptr, row),
                                        load16!($kind, ptr, row + 16),
                                        load16!($kind, ptr, row + 32),
                                        load16!($kind, ptr, row + 48),
                                    ]
                                };
                                for (h, a) in a.iter_mut().enumerate().take(H) {
                                    let p = _mm512_set1_ps(probs[(first + h) * bs + t]);
                                    for (a, v) in a.iter_mut().zip(&v) {
                                        *a = _mm512_fmadd_ps(p, *v, *a);
                                    }
                                }
                            }
                            for (h, a) in a.iter().enumerate().take(H) {
                                let base = (first + h) * d + chunk;
                                for (i, a) in a.iter().enumerate() {
                                    // SAFETY: base + 16·i + 16 ≤ (first + h + 1)·d ≤ acc.len().
                                    unsafe {
                                        let out = acc.as_mut_ptr().add(base + 16 * i);
                                        _mm512_storeu_ps(
                                            out,
                                            _mm512_add_ps(*a, _mm512_loadu_ps(out)),
                                        );
                                    }
                                }
                            }
                        });
                    }
                }
            }
        };
    }
    /// The (scale, zero) pairs of two consecutive channel groups for tokens 0..16 of an integer
    /// value page, as four 16-lane vectors (s₀, z₀, s₁, z₁), lanes past `n` zero: one masked
    /// gather of each token's four f16, converted and transposed by permutes.
    ///
    /// # Safety
    /// AVX-512F and F16C must be present, and 8 bytes readable at `at + 4·groups·t` for t < n.
    #[inline(always)]
    unsafe fn chunk_params(at: *const u8, groups: usize, n: usize) -> [__m512; 4] {
        let stride = (4 * groups) as i32;
        let tokens = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(stride),
        );
        let mask = ((1u32 << n) - 1) as u16;
        let zero = _mm512_setzero_si512();
        // SAFETY: lanes t < n read 8 bytes at `at + stride·t` (the caller's contract); the
        // others are masked off and read nothing.
        let (lo, hi) = unsafe {
            (
                _mm512_mask_i32gather_epi64::<1>(
                    zero,
                    mask as u8,
                    _mm512_castsi512_si256(tokens),
                    at.cast(),
                ),
                _mm512_mask_i32gather_epi64::<1>(
                    zero,
                    (mask >> 8) as u8,
                    _mm512_extracti64x4_epi64::<1>(tokens),
                    at.cast(),
                ),
            )
        };
        // each register: four tokens × (s₀, z₀, s₁, z₁)
        let x = [
            _mm512_cvtph_ps(_mm512_castsi512_si256(lo)),
            _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(lo)),
            _mm512_cvtph_ps(_mm512_castsi512_si256(hi)),
            _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(hi)),
        ];
        by_component(x, |t| t)
    }

    /// Four registers of four tokens × four components each (token t's components at lanes
    /// 4·(t mod 4) .. of register t / 4) transposed into one register per component, token t
    /// in lane `lane(t)` (a permutation of 0..16).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(in crate::attention) fn by_component(
        x: [__m512; 4],
        lane: impl Fn(usize) -> usize,
    ) -> [__m512; 4] {
        // component k of eight tokens in the low half, component k + 1 in the high half
        let pick = |k: i32| {
            let index: [i32; 16] = std::array::from_fn(|i| (i as i32 % 8) * 4 + k + i as i32 / 8);
            // SAFETY: 16 i32 read from a local array.
            unsafe { _mm512_loadu_si512(index.as_ptr().cast()) }
        };
        // `first` holds tokens 0..8 of components k and k + 1, `second` tokens 8..16
        let join = |component: i32| {
            let mut index = [0i32; 16];
            for t in 0..16usize {
                let from = if t < 8 { t } else { 16 + t - 8 } as i32;
                index[lane(t)] = from + 8 * component;
            }
            // SAFETY: 16 i32 read from a local array.
            unsafe { _mm512_loadu_si512(index.as_ptr().cast()) }
        };
        let (low, high) = (join(0), join(1));
        let mut out = [_mm512_setzero_ps(); 4];
        for k in [0, 2] {
            let first = _mm512_permutex2var_ps(x[0], pick(k), x[1]);
            let second = _mm512_permutex2var_ps(x[2], pick(k), x[3]);
            out[k as usize] = _mm512_permutex2var_ps(first, low, second);
            out[k as usize + 1] = _mm512_permutex2var_ps(first, high, second);
        }
        out
    }

    /// Integer value pages (token-major codes, an f16 (scale, zero) per token and group of 32
    /// channels), head_dim a multiple of 64: `acc += Σ_t (p·s)·x_t + (Σ_t p·z)` per group. A
    /// token's codes are widened once and serve every query head (up to four at a time);
    /// `$per` codes per byte.
    macro_rules! int_weighted_rows_64 {
        ($name:ident, $kind:tt, $per:expr) => {
            #[target_feature(enable = "avx512f,avx2,f16c")]
            pub(super) fn $name(
                codes: &[u8],
                params: &[u8],
                n: usize,
                shape: Shape,
                probs: &[f32],
                acc: &mut [f32],
            ) {
                let Shape { group, d, bs } = shape;
                let groups = d / 32;
                let per = $per;
                assert!(d.is_multiple_of(64) && n <= bs && bs == 16);
                assert!(codes.len() * per >= n * d && params.len() >= n * groups * 4);
                assert!(probs.len() >= group * bs && acc.len() >= group * d);
                let ptr = codes.as_ptr();
                for chunk in (0..d).step_by(64) {
                    // SAFETY: token t's four parameters of this chunk lie at
                    // 4·(t·groups + chunk/32) + 8 ≤ n·groups·4 ≤ params.len() for t < n.
                    let [s0, z0, s1, z1] =
                        unsafe { chunk_params(params.as_ptr().add(chunk / 32 * 4), groups, n) };
                    for first in (0..group).step_by(4) {
                        let heads = (group - first).min(4);
                        with_heads!(heads, H, {
                            let mut a = [[_mm512_setzero_ps(); 4]; 4];
                            // per head and token: p·s of both groups; Σ p·z of both groups
                            let mut w = [[[0f32; 16]; 2]; 4];
                            let mut zeros = [[0f32; 2]; 4];
                            for h in 0..H {
                                let at = (first + h) * bs;
                                // SAFETY: at + 16 ≤ group·bs ≤ probs.len() (asserted above).
                                let p = unsafe { _mm512_loadu_ps(probs.as_ptr().add(at)) };
                                let p = _mm512_maskz_mov_ps(((1u32 << n) - 1) as __mmask16, p);
                                // SAFETY: each array holds 16 floats.
                                unsafe {
                                    _mm512_storeu_ps(w[h][0].as_mut_ptr(), _mm512_mul_ps(p, s0));
                                    _mm512_storeu_ps(w[h][1].as_mut_ptr(), _mm512_mul_ps(p, s1));
                                }
                                zeros[h] = [
                                    _mm512_reduce_add_ps(_mm512_mul_ps(p, z0)),
                                    _mm512_reduce_add_ps(_mm512_mul_ps(p, z1)),
                                ];
                            }
                            for t in 0..n {
                                // SAFETY: element t·d + chunk + 64 ≤ n·d ≤ the page's elements.
                                let v = unsafe { load64!($kind, ptr, t * d + chunk) };
                                for h in 0..H {
                                    let (w0, w1) =
                                        (_mm512_set1_ps(w[h][0][t]), _mm512_set1_ps(w[h][1][t]));
                                    a[h][0] = _mm512_fmadd_ps(w0, v[0], a[h][0]);
                                    a[h][1] = _mm512_fmadd_ps(w0, v[1], a[h][1]);
                                    a[h][2] = _mm512_fmadd_ps(w1, v[2], a[h][2]);
                                    a[h][3] = _mm512_fmadd_ps(w1, v[3], a[h][3]);
                                }
                            }
                            for h in 0..H {
                                let base = (first + h) * d + chunk;
                                for (i, v) in a[h].iter().enumerate() {
                                    let z = _mm512_set1_ps(zeros[h][i / 2]);
                                    // SAFETY: base + 16·i + 16 ≤ (first + h + 1)·d ≤ acc.len().
                                    unsafe {
                                        let out = acc.as_mut_ptr().add(base + 16 * i);
                                        let sum = _mm512_add_ps(
                                            _mm512_add_ps(*v, z),
                                            _mm512_loadu_ps(out),
                                        );
                                        _mm512_storeu_ps(out, sum);
                                    }
                                }
                            }
                        });
                    }
                }
            }
        };
    }
    int_weighted_rows_64!(int_weighted_rows_64_u8, u8, 1);
    int_weighted_rows_64!(int_weighted_rows_64_u4, u4, 2);
    int_weighted_rows_64!(int_weighted_rows_64_u2, u2, 4);

    weighted_rows_64!(weighted_rows_64, f32, f32);
    weighted_rows_64!(weighted_rows_64_f16, f16, half::f16);
    weighted_rows_64!(weighted_rows_64_bf16, bf16, half::bf16);
    weighted_rows_64!(weighted_rows_64_e4m3, e4m3, u8);
    weighted_rows_64!(weighted_rows_64_e5m2, e5m2, u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact_on_every_code() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut ours = vec![0f32; all.len()];
        let mut portable = vec![0f32; all.len()];
        f16_to_f32(&all, &mut ours);
        f16_to_f32_portable(&all, &mut portable);
        for ((h, o), p) in all.iter().zip(&ours).zip(&portable) {
            let want = h.to_f32();
            for got in [o, p] {
                assert!(
                    want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()),
                    "{:#06x}: {want} vs {got}",
                    h.to_bits()
                );
            }
        }
        let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let mut ours = vec![0f32; all.len()];
        bf16_to_f32(&all, &mut ours);
        for (h, o) in all.iter().zip(&ours) {
            let want = h.to_f32();
            assert!(want.to_bits() == o.to_bits() || (want.is_nan() && o.is_nan()));
        }
    }

    /// fp8 codes widened in registers (e5m2 as the upper byte of an f16, e4m3 placed in an f16
    /// and scaled by 2⁸) equal the decode tables on every code but NaN.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fp8_codes_widen_in_registers_exactly() {
        if !x86::available() {
            return;
        }
        for codec in [Codec::Fp8E4m3, Codec::Fp8E5m2] {
            let table = fp8_table(codec);
            // infinities and NaNs are never stored (encoding refuses them): zero codes instead,
            // so the other channels' 0 × x stays 0
            let codes: Vec<u8> = (0..=255u8)
                .map(|c| if table[c as usize].is_finite() { c } else { 0 })
                .collect();
            let shape = Shape {
                group: 1,
                d: 16,
                bs: 16,
            };
            for c in 0..16 {
                let mut q = vec![0f32; 16];
                q[c] = 1.0;
                let mut scores = vec![0f32; 16];
                // SAFETY: the features were checked above; 16 channels × 16 tokens of codes.
                unsafe {
                    if codec == Codec::Fp8E4m3 {
                        x86::column_scores_16_e4m3(&codes, shape, &q, 1.0, &mut scores)
                    } else {
                        x86::column_scores_16_e5m2(&codes, shape, &q, 1.0, &mut scores)
                    }
                };
                for (t, got) in scores.iter().enumerate() {
                    let want = table[c * 16 + t];
                    if want.is_finite() {
                        assert_eq!(*got, want, "{codec} code {}", c * 16 + t);
                    }
                }
            }
        }
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -100.0 + i as f32 * 0.0005;
            let mut v = [x];
            exp_in_place(&mut v);
            let want = (x as f64).exp();
            let rel = ((v[0] as f64 - want) / want.max(f64::MIN_POSITIVE)).abs();
            if want > 1e-30 {
                worst = worst.max(rel);
            }
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        let mut edge = [f32::NEG_INFINITY, -200.0, 0.0];
        exp_in_place(&mut edge);
        assert_eq!(edge, [0.0, 0.0, 1.0]);
    }
}
