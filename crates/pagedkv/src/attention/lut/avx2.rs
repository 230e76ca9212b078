//! The FibQuant page loops of [`super::x86`] for AVX2 machines: each token's rotated vector is
//! assembled from its codewords eight coordinates at a time (two 4-coordinate codewords or
//! four 2-coordinate ones, one load each) and serves every query head of the group. Keys: a
//! token's products stay spread over eight lanes per head and eight tokens' partial sums are
//! folded by horizontal adds into one register of their scores. Values: summed in the rotated
//! space with the weights `p·ν`, rotated back once per pass.

use std::arch::x86_64::*;

use super::super::pages::{ScaledQuery, Shape};
use super::x86::check;
use crate::codec::vector::PAGE_HEADER;

/// Eight rotated coordinates from the codeword indices at `idx`: two codewords of 4
/// coordinates (`K` = 4) or four of 2 (`K` = 2).
///
/// # Safety
/// AVX must be present; `idx` must point at 8 / `K` readable indices, each below the number of
/// codewords in `words` (`K` floats each).
#[inline(always)]
unsafe fn chunk8<const K: usize>(words: *const f32, idx: *const u8) -> __m256 {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let at = |j: usize| words.add(*idx.add(j) as usize * K);
        if K == 4 {
            _mm256_loadu2_m128(at(1), at(0))
        } else {
            let pair = |a: usize| {
                let lo = _mm_load_sd(at(a).cast());
                _mm_castpd_ps(_mm_loadh_pd(lo, at(a + 1).cast()))
            };
            _mm256_set_m128(pair(2), pair(0))
        }
    }
}

/// Eight registers of partial sums (one per token) summed into one register of the eight
/// tokens' totals, in token order.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn sum8(x: &[__m256; 8]) -> __m256 {
    let pairs = [
        _mm256_hadd_ps(x[0], x[1]),
        _mm256_hadd_ps(x[2], x[3]),
        _mm256_hadd_ps(x[4], x[5]),
        _mm256_hadd_ps(x[6], x[7]),
    ];
    // halves of tokens 0–3, then of tokens 4–7, 128-bit lane by 128-bit lane
    let (low, high) = (
        _mm256_hadd_ps(pairs[0], pairs[1]),
        _mm256_hadd_ps(pairs[2], pairs[3]),
    );
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(low, high),
        _mm256_permute2f128_ps::<0x31>(low, high),
    )
}

/// `scores[g·16 + t] = scale·ν_t·⟨(Πq)_g, ĉ_t⟩` for the first `n` tokens of a page.
///
/// # Safety
/// As for [`super::x86::fib_scores_16`], with AVX2, FMA and F16C in place of AVX-512F.
#[target_feature(enable = "avx2,fma,f16c")]
pub(in crate::attention) unsafe fn fib_scores_16<const K: usize>(
    bytes: &[u8],
    largest: f32,
    n: usize,
    shape: Shape,
    words: &[f32],
    rotated: ScaledQuery,
    scores: &mut [f32],
) {
    let Shape { group, d, bs, .. } = shape;
    let ScaledQuery {
        rows: rotated_q,
        scale,
    } = rotated;
    let (code_bytes, nu) = check::<K>(bytes, largest, n, shape, words);
    assert!(rotated_q.len() >= group * d && scores.len() >= group * bs);
    let (w, q) = (words.as_ptr(), rotated_q.as_ptr());
    let codes = bytes[PAGE_HEADER..].as_ptr();
    for first in (0..group).step_by(4) {
        let heads = (group - first).min(4);
        with_heads!(heads, H, {
            let mut partials = [[[_mm256_setzero_ps(); 8]; 2]; 4];
            for t in 0..n {
                let code = codes.wrapping_add(t * code_bytes);
                let mut acc = [_mm256_setzero_ps(); 4];
                for j in 0..d / 8 {
                    // SAFETY: indices of chunk j of token t lie in its code; each is below the
                    // codebook size (the caller's contract).
                    let v = unsafe { chunk8::<K>(w, code.add(1 + 8 / K * j)) };
                    for (h, acc) in acc.iter_mut().enumerate().take(H) {
                        // SAFETY: (first + h)·d + 8j + 8 ≤ group·d ≤ rotated_q.len().
                        let qv = unsafe { _mm256_loadu_ps(q.add((first + h) * d + 8 * j)) };
                        *acc = _mm256_fmadd_ps(qv, v, *acc);
                    }
                }
                for (h, acc) in acc.iter().enumerate().take(H) {
                    partials[h][t / 8][t % 8] = *acc;
                }
            }
            for (h, halves) in partials.iter().enumerate().take(H) {
                let out = &mut scores[(first + h) * bs..(first + h) * bs + 16];
                for (i, half) in halves.iter().enumerate() {
                    // SAFETY: `nu` holds 16 floats, `out` 16.
                    unsafe {
                        let nu = _mm256_loadu_ps(nu.as_ptr().add(8 * i));
                        let totals =
                            _mm256_mul_ps(sum8(half), _mm256_mul_ps(nu, _mm256_set1_ps(scale)));
                        _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), totals);
                    }
                }
            }
        });
    }
}

/// `acc_g += Σ_t probs[g·16 + t]·ν_t·ĉ_t` (rotated space) over the first `n` tokens.
///
/// # Safety
/// As for [`fib_scores_16`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(in crate::attention) unsafe fn fib_values_16<const K: usize>(
    bytes: &[u8],
    largest: f32,
    n: usize,
    shape: Shape,
    words: &[f32],
    probs: &[f32],
    acc: &mut [f32],
) {
    let Shape { group, d, bs, .. } = shape;
    let (code_bytes, nu) = check::<K>(bytes, largest, n, shape, words);
    assert!(probs.len() >= group * bs && acc.len() >= group * d);
    let w = words.as_ptr();
    let codes = bytes[PAGE_HEADER..].as_ptr();
    for first in (0..group).step_by(4) {
        let heads = (group - first).min(4);
        with_heads!(heads, H, {
            // p·ν per head and token, formed once per block
            let mut weights = [[0f32; 16]; 4];
            for (h, weights) in weights.iter_mut().enumerate().take(H) {
                for (t, w) in weights.iter_mut().enumerate().take(n) {
                    *w = probs[(first + h) * bs + t] * nu[t];
                }
            }
            // two chunks of 8 rotated coordinates per pass over the tokens
            for chunks in (0..d / 8).step_by(2) {
                let count = (d / 8 - chunks).min(2);
                let mut a = [[_mm256_setzero_ps(); 2]; 4];
                // t indexes both the codes and every head's weights
                #[allow(clippy::needless_range_loop)]
                for t in 0..n {
                    let code = codes.wrapping_add(t * code_bytes);
                    for c in 0..count {
                        let j = chunks + c;
                        // SAFETY: as in `fib_scores_16`.
                        let v = unsafe { chunk8::<K>(w, code.add(1 + 8 / K * j)) };
                        for (h, a) in a.iter_mut().enumerate().take(H) {
                            a[c] = _mm256_fmadd_ps(_mm256_set1_ps(weights[h][t]), v, a[c]);
                        }
                    }
                }
                for (h, a) in a.iter().enumerate().take(H) {
                    for (c, a) in a.iter().enumerate().take(count) {
                        let at = (first + h) * d + 8 * (chunks + c);
                        // SAFETY: at + 8 ≤ group·d ≤ acc.len() (asserted above).
                        unsafe {
                            let out = acc.as_mut_ptr().add(at);
                            _mm256_storeu_ps(out, _mm256_add_ps(*a, _mm256_loadu_ps(out)));
                        }
                    }
                }
            }
        });
    }
}
