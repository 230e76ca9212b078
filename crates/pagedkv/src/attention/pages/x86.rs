//! The hot loops written with AVX-512 intrinsics: the compiler keeps array accumulators in
//! memory, so the adds wait on store forwarding; here every accumulator is a register and
//! independent chains interleave. Fused multiply-add, so results differ from the portable loops
//! in the last bits (both are tested against the f64 reference).

use std::arch::x86_64::*;

use super::Shape;
use crate::attention::softmax::{correction, lazy_max, EXP_POLY, LAZY_MAX_SLACK, LN2_HI, LN2_LO};

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
pub(in crate::attention) fn f16_bytes_to_f32_16(bytes: &[u8], out: &mut [f32]) -> usize {
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
        pub(in crate::attention) fn $name(
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
                        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), _mm512_mul_ps(sum, scale_v)) };
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
pub(in crate::attention) fn fold_int_key_params(
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

/// `softmax_step` for blocks of 16 (the scores past `n` are ignored). The exponential is
/// the polynomial of `exp_in_place`, in registers, with the power of two applied by
/// `vscalefps`; no horizontal operation unless the reference point moves.
#[target_feature(enable = "avx512f")]
pub(in crate::attention) fn softmax_step_16(
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
    let bound = _mm512_set1_ps(max_in + LAZY_MAX_SLACK);
    let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(visible, bound);
    let new_max = if over != 0 || max_in == f32::NEG_INFINITY {
        lazy_max(max_in, _mm512_reduce_max_ps(visible))
    } else {
        max_in
    };
    let x = _mm512_sub_ps(visible, _mm512_set1_ps(new_max));
    let e = _mm512_maskz_mov_ps(mask, exp_shifted(x));
    // SAFETY: as for the load.
    unsafe { _mm512_mask_storeu_ps(scores.as_mut_ptr(), mask, e) };
    let correction = correction(max_in, new_max);
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
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
        v,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
        _mm512_set1_ps(0.5),
    ));
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_HI), v);
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
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
        pub(in crate::attention) fn $name(
            rows: &[$elem],
            n: usize,
            shape: Shape,
            probs: &[f32],
            acc: &mut [f32],
        ) {
            let Shape { group, d, bs, .. } = shape;
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
                                    _mm512_storeu_ps(out, _mm512_add_ps(*a, _mm512_loadu_ps(out)));
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
        pub(in crate::attention) fn $name(
            codes: &[u8],
            params: &[u8],
            n: usize,
            shape: Shape,
            probs: &[f32],
            acc: &mut [f32],
        ) {
            let Shape { group, d, bs, .. } = shape;
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
                                    let sum =
                                        _mm512_add_ps(_mm512_add_ps(*v, z), _mm512_loadu_ps(out));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::scalar::fp8_table;
    use crate::codec::Codec;

    /// fp8 codes widened in registers (e5m2 as the upper byte of an f16, e4m3 placed in an f16
    /// and scaled by 2⁸) equal the decode tables on every code but NaN. These loops exist only
    /// for AVX-512: on a CPU without it there is nothing to run, and the test says so.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fp8_codes_widen_in_registers_exactly_on_avx512_cpus() {
        if !crate::attention::Simd::Avx512.available() {
            println!("no AVX-512 on this CPU: the AVX-512 fp8 loops were not run");
            return;
        }
        println!("ran the AVX-512 fp8 loops");
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
                simd: crate::attention::Simd::Avx512,
            };
            for c in 0..16 {
                let mut q = vec![0f32; 16];
                q[c] = 1.0;
                let mut scores = vec![0f32; 16];
                // SAFETY: the features were checked above; 16 channels × 16 tokens of codes.
                unsafe {
                    if codec == Codec::Fp8E4m3 {
                        column_scores_16_e4m3(&codes, shape, &q, 1.0, &mut scores)
                    } else {
                        column_scores_16_e5m2(&codes, shape, &q, 1.0, &mut scores)
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
}
