//! The page loops of [`super::x86`] for AVX2 machines (256-bit registers, 16 of them, FMA and
//! F16C): eight lanes per register, and fewer accumulators so that none spills. Each page
//! element is loaded and converted in registers once and serves every query head of the group.

use std::arch::x86_64::*;

use super::Shape;
use crate::attention::softmax::{EXP_POLY, LN2_HI, LN2_LO};

/// Eight consecutive elements starting at element `i` of a page as f32: f32 loaded, f16
/// converted by `vcvtph2ps`, bf16 widened and shifted, one-byte codes widened and converted.
macro_rules! load8 {
    (f32, $p:expr, $i:expr) => {
        _mm256_loadu_ps($p.cast::<f32>().add($i))
    };
    (f16, $p:expr, $i:expr) => {
        _mm256_cvtph_ps(_mm_loadu_si128($p.cast::<u16>().add($i).cast()))
    };
    (bf16, $p:expr, $i:expr) => {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
            _mm_loadu_si128($p.cast::<u16>().add($i).cast()),
        )))
    };
    (u8, $p:expr, $i:expr) => {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
            $p.cast::<u8>().add($i).cast(),
        )))
    };
    // e5m2 is the upper byte of an f16
    (e5m2, $p:expr, $i:expr) => {
        _mm256_cvtph_ps(_mm_slli_epi16::<8>(_mm_cvtepu8_epi16(_mm_loadl_epi64(
            $p.cast::<u8>().add($i).cast(),
        ))))
    };
    // e4m3 (s eeee mmm, bias 7) placed in an f16 (bias 15) is the value × 2⁻⁸, subnormals
    // included; the ×2⁸ follows the conversion (NaN codes are never stored)
    (e4m3, $p:expr, $i:expr) => {{
        let b = _mm_cvtepu8_epi16(_mm_loadl_epi64($p.cast::<u8>().add($i).cast()));
        let magnitude = _mm_slli_epi16::<7>(_mm_and_si128(b, _mm_set1_epi16(0x7F)));
        let sign = _mm_slli_epi16::<8>(_mm_and_si128(b, _mm_set1_epi16(0x80)));
        _mm256_mul_ps(
            _mm256_cvtph_ps(_mm_or_si128(magnitude, sign)),
            _mm256_set1_ps(256.0),
        )
    }};
    // two codes per byte, low nibble first (`i` even)
    (u4, $p:expr, $i:expr) => {{
        let x = _mm_cvtsi32_si128($p.cast::<u8>().add($i / 2).cast::<i32>().read_unaligned());
        let low = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(x, low);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(x), low);
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)))
    }};
    // four codes per byte, lowest bits first (`i` a multiple of 4): each byte in four lanes,
    // each lane shifted by its position
    (u2, $p:expr, $i:expr) => {{
        let x = _mm_cvtsi32_si128(i32::from(
            $p.cast::<u8>().add($i / 4).cast::<u16>().read_unaligned(),
        ));
        let spread = _mm_shuffle_epi8(
            x,
            _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
        );
        let shifts = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
        let codes = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_cvtepu8_epi32(spread), shifts),
            _mm256_set1_epi32(3),
        );
        _mm256_cvtepi32_ps(codes)
    }};
}

/// Converts the whole groups of eight f16 values in `bytes` (unaligned) into `out`; returns
/// how many values were converted.
#[target_feature(enable = "avx2,f16c")]
pub(in crate::attention) fn f16_bytes_to_f32_8(bytes: &[u8], out: &mut [f32]) -> usize {
    let whole = (bytes.len() / 2).min(out.len()) / 8 * 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: values i .. i + 8 lie within both `bytes` (2 bytes each) and `out`.
        unsafe {
            let halves = _mm_loadu_si128(bytes.as_ptr().add(2 * i).cast());
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(halves));
        }
    }
    whole
}

/// The f16 pair at `bytes[4i ..]` (a (scale, zero) pair) as f32.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn f16_pair(bytes: &[u8], i: usize) -> (f32, f32) {
    let pair: [u8; 4] = bytes[4 * i..4 * i + 4].try_into().expect("four bytes");
    let x = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes(pair)));
    (_mm_cvtss_f32(x), _mm_cvtss_f32(_mm_movehdup_ps(x)))
}

/// `column_scores` for blocks of 16 read straight from a channel-major page of `$elem`: per
/// channel two column registers (tokens 0..8, 8..16), FMAs into two accumulators per query
/// head (up to four heads at a time).
macro_rules! column_scores_16 {
    ($name:ident, $kind:tt, $elem:ty, $per:expr) => {
        #[target_feature(enable = "avx2,fma,f16c")]
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
            let scale_v = _mm256_set1_ps(scale);
            let ptr = columns.as_ptr();
            for first in (0..group).step_by(4) {
                let heads = (group - first).min(4);
                with_heads!(heads, H, {
                    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                    for c in 0..d {
                        // SAFETY: elements 16c .. 16c + 16 lie below 16·d ≤ the page's
                        // elements (asserted above).
                        let column =
                            unsafe { [load8!($kind, ptr, c * 16), load8!($kind, ptr, c * 16 + 8)] };
                        for (h, a) in acc.iter_mut().enumerate().take(H) {
                            let qc = _mm256_set1_ps(q[(first + h) * d + c]);
                            a[0] = _mm256_fmadd_ps(qc, column[0], a[0]);
                            a[1] = _mm256_fmadd_ps(qc, column[1], a[1]);
                        }
                    }
                    for (h, a) in acc.iter().enumerate().take(H) {
                        let out = &mut scores[(first + h) * 16..(first + h + 1) * 16];
                        // SAFETY: `out` holds exactly 16 floats.
                        unsafe {
                            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_mul_ps(a[0], scale_v));
                            _mm256_storeu_ps(out.as_mut_ptr().add(8), _mm256_mul_ps(a[1], scale_v));
                        }
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

/// `weighted_rows` for head_dim a multiple of 16, read straight from a token-major page of
/// `$elem`: sixteen channels of a token are loaded (and converted) once into two registers
/// and serve up to four query heads, each with two accumulators.
macro_rules! weighted_rows_16 {
    ($name:ident, $kind:tt, $elem:ty) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(in crate::attention) fn $name(
            rows: &[$elem],
            n: usize,
            shape: Shape,
            probs: &[f32],
            acc: &mut [f32],
        ) {
            let Shape { group, d, bs, .. } = shape;
            assert!(rows.len() >= n * d && probs.len() >= group * bs && acc.len() >= group * d);
            assert!(n <= bs && d.is_multiple_of(16));
            let ptr = rows.as_ptr();
            for chunk in (0..d).step_by(16) {
                for first in (0..group).step_by(4) {
                    let heads = (group - first).min(4);
                    with_heads!(heads, H, {
                        let mut a = [[_mm256_setzero_ps(); 2]; 4];
                        for t in 0..n {
                            let row = t * d + chunk;
                            // SAFETY: row + 16 ≤ t·d + d ≤ n·d ≤ rows.len() (asserted above).
                            let v =
                                unsafe { [load8!($kind, ptr, row), load8!($kind, ptr, row + 8)] };
                            for (h, a) in a.iter_mut().enumerate().take(H) {
                                let p = _mm256_set1_ps(probs[(first + h) * bs + t]);
                                a[0] = _mm256_fmadd_ps(p, v[0], a[0]);
                                a[1] = _mm256_fmadd_ps(p, v[1], a[1]);
                            }
                        }
                        for (h, a) in a.iter().enumerate().take(H) {
                            let base = (first + h) * d + chunk;
                            for (i, a) in a.iter().enumerate() {
                                // SAFETY: base + 8i + 8 ≤ (first + h + 1)·d ≤ acc.len().
                                unsafe {
                                    let out = acc.as_mut_ptr().add(base + 8 * i);
                                    _mm256_storeu_ps(out, _mm256_add_ps(*a, _mm256_loadu_ps(out)));
                                }
                            }
                        }
                    });
                }
            }
        }
    };
}
weighted_rows_16!(weighted_rows_16, f32, f32);
weighted_rows_16!(weighted_rows_16_f16, f16, half::f16);
weighted_rows_16!(weighted_rows_16_bf16, bf16, half::bf16);
weighted_rows_16!(weighted_rows_16_e4m3, e4m3, u8);
weighted_rows_16!(weighted_rows_16_e5m2, e5m2, u8);

/// Integer value pages (token-major codes, `$per` per byte; an f16 (scale, zero) per token and
/// group of 32 channels), head_dim a multiple of 32: `acc += Σ_t (p·s)·x_t + Σ_t p·z` per
/// group, sixteen channels of a token widened once for up to four query heads.
macro_rules! int_weighted_rows_16 {
    ($name:ident, $kind:tt, $per:expr) => {
        #[target_feature(enable = "avx2,fma,f16c")]
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
            assert!(d.is_multiple_of(32) && n <= bs);
            assert!(codes.len() * $per >= n * d && params.len() >= n * groups * 4);
            assert!(probs.len() >= group * bs && acc.len() >= group * d);
            let ptr = codes.as_ptr();
            for chunk in (0..d).step_by(16) {
                let g = chunk / 32;
                for first in (0..group).step_by(4) {
                    let heads = (group - first).min(4);
                    with_heads!(heads, H, {
                        let mut a = [[_mm256_setzero_ps(); 2]; 4];
                        let mut zero = [0f32; 4];
                        for t in 0..n {
                            let (s, z) = f16_pair(params, t * groups + g);
                            let row = t * d + chunk;
                            // SAFETY: code row + 16 ≤ n·d ≤ codes.len()·$per (asserted above).
                            let v =
                                unsafe { [load8!($kind, ptr, row), load8!($kind, ptr, row + 8)] };
                            for (h, a) in a.iter_mut().enumerate().take(H) {
                                let p = probs[(first + h) * bs + t];
                                let w = _mm256_set1_ps(p * s);
                                a[0] = _mm256_fmadd_ps(w, v[0], a[0]);
                                a[1] = _mm256_fmadd_ps(w, v[1], a[1]);
                                zero[h] += p * z;
                            }
                        }
                        for (h, a) in a.iter().enumerate().take(H) {
                            let base = (first + h) * d + chunk;
                            let z = _mm256_set1_ps(zero[h]);
                            for (i, a) in a.iter().enumerate() {
                                // SAFETY: base + 8i + 8 ≤ (first + h + 1)·d ≤ acc.len().
                                unsafe {
                                    let out = acc.as_mut_ptr().add(base + 8 * i);
                                    let sum =
                                        _mm256_add_ps(_mm256_add_ps(*a, z), _mm256_loadu_ps(out));
                                    _mm256_storeu_ps(out, sum);
                                }
                            }
                        }
                    });
                }
            }
        }
    };
}
int_weighted_rows_16!(int_weighted_rows_16_u8, u8, 1);
int_weighted_rows_16!(int_weighted_rows_16_u4, u4, 2);
int_weighted_rows_16!(int_weighted_rows_16_u2, u2, 4);

/// `eˣ` of eight scores shifted by the softmax reference point (x ≤ 8, or −∞): the polynomial
/// of `exp_in_place`, 2ⁿ built in the exponent bits; below −87 (and for −∞) exactly 0.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(in crate::attention) fn exp8(x: __m256) -> __m256 {
    let floor_x = _mm256_set1_ps(-87.0);
    let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, floor_x);
    let v = _mm256_max_ps(x, floor_x);
    let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm256_fmadd_ps(
        v,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(LN2_HI), v);
    let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    // k ∈ [−126, 13]: 2ᵏ is the biased exponent k + 127 in place
    let power = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(k),
        _mm256_set1_epi32(127),
    ));
    _mm256_and_ps(_mm256_mul_ps(e, _mm256_castsi256_ps(power)), keep)
}

/// `softmax_step` for blocks of 16 (the scores past `n` are ignored) in two registers; no
/// horizontal operation unless the reference point moves.
#[target_feature(enable = "avx2,fma")]
pub(in crate::attention) fn softmax_step_16(
    scores: &mut [f32],
    n: usize,
    max_in: f32,
    lanes: &mut [f32; 16],
) -> (f32, f32) {
    use crate::attention::softmax::{correction, lazy_max, LAZY_MAX_SLACK};
    assert!(scores.len() >= 16 && n <= 16);
    let count = _mm256_set1_epi32(n as i32);
    let visible = [
        _mm256_cmpgt_epi32(count, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
        _mm256_cmpgt_epi32(count, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15)),
    ]
    .map(|m| _mm256_castsi256_ps(m));
    let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
    // SAFETY: `scores` holds at least 16 floats (asserted above).
    let s = unsafe {
        [
            _mm256_loadu_ps(scores.as_ptr()),
            _mm256_loadu_ps(scores.as_ptr().add(8)),
        ]
    };
    let s = [
        _mm256_blendv_ps(neg_inf, s[0], visible[0]),
        _mm256_blendv_ps(neg_inf, s[1], visible[1]),
    ];
    let bound = _mm256_set1_ps(max_in + LAZY_MAX_SLACK);
    let over = _mm256_movemask_ps(_mm256_or_ps(
        _mm256_cmp_ps::<_CMP_GT_OQ>(s[0], bound),
        _mm256_cmp_ps::<_CMP_GT_OQ>(s[1], bound),
    ));
    let new_max = if over != 0 || max_in == f32::NEG_INFINITY {
        let m = _mm256_max_ps(s[0], s[1]);
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        lazy_max(max_in, _mm_cvtss_f32(m))
    } else {
        max_in
    };
    let shift = _mm256_set1_ps(new_max);
    let e = [
        _mm256_and_ps(exp8(_mm256_sub_ps(s[0], shift)), visible[0]),
        _mm256_and_ps(exp8(_mm256_sub_ps(s[1], shift)), visible[1]),
    ];
    let correction = correction(max_in, new_max);
    let c = _mm256_set1_ps(correction);
    // SAFETY: `scores` holds at least 16 floats, `lanes` 16 (the scores past n are written too:
    // zeros, which no reader uses).
    unsafe {
        _mm256_storeu_ps(scores.as_mut_ptr(), e[0]);
        _mm256_storeu_ps(scores.as_mut_ptr().add(8), e[1]);
        let sums = [
            _mm256_loadu_ps(lanes.as_ptr()),
            _mm256_loadu_ps(lanes.as_ptr().add(8)),
        ];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_fmadd_ps(sums[0], c, e[0]));
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), _mm256_fmadd_ps(sums[1], c, e[1]));
    }
    (new_max, correction)
}
