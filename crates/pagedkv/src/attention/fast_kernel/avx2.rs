//! The fast path's key side for the AVX2 whole-block kernel
//! ([`crate::attention::block_kernel::avx2`], slices of 8 tokens, values read exactly), on
//! AVX2 machines and for blocks of 8 on AVX-512 ones: keys scored by integer dot products.
//!
//! - The key scales fold into the query as on the exact path; the folded query is rounded to
//!   16-bit integers, one scale per head and block (an 8-bit query fails the contract on
//!   outlier channels: `docs/query-quantization-simulation.py`).
//! - `vpmaddwd` multiplies two channels' 16-bit codes by their two query integers per 32-bit
//!   lane (a lane is a token) and adds the pair: 16 products per instruction where an FMA
//!   does 8, and the sum goes to `vpaddd`, which the multiply pipes do not serve. AVX2 has no
//!   integer multiply-add; with AVX-VNNI `vpdpwssd` would fuse the two, but it is not
//!   needed here.
//! - A lane's codes are put in place by one byte shuffle from two broadcast columns and,
//!   for packed codes, one mask: a code keeps the place its nibble or crumb has in its byte
//!   (×1, ×16; ×1, ×4, ×16, ×64), undone once per slice with the query's scale.
//!
//! Sums fit 32 bits: a pair's products at most 2 · 32767 · 255 < 2²⁴, 64 pairs at head_dim
//! 128 < 2³¹.

use std::arch::x86_64::*;

use crate::attention::block_kernel::avx2::{pairs8, SliceScores8, SLICE};
use crate::attention::block_kernel::{bits, Pages, MAX_HEADS};
use crate::attention::block_kernel::{INT4, INT8};

use super::key_place;

/// Largest magnitude of a rounded query.
const UNIT: f32 = 32767.0;

/// Where token `t`'s code of a channel sits in a column's slice: its byte.
const fn code_byte(kind: usize, t: usize) -> usize {
    t * bits(kind) / 8
}

/// The byte shuffle putting two channels' codes of token `t` in lane `t` (first channel in
/// the low 16 bits), from the two channels' slices broadcast and blended so that each
/// 128-bit half holds the first's bytes from byte 0 and the second's from [`second`] on;
/// and the mask keeping each code's field at its place.
const fn shuffle_and_mask(kind: usize) -> ([u8; 32], [u8; 32]) {
    let (mut shuffle, mut mask) = ([0x80u8; 32], [0u8; 32]);
    let field = ((1u32 << bits(kind)) - 1) as u8;
    let mut t = 0;
    while t < SLICE {
        let at = 4 * t;
        let byte = code_byte(kind, t) as u8;
        shuffle[at] = byte;
        shuffle[at + 2] = second(kind) as u8 + byte;
        let place = field << (bits(kind) * (t % (8 / bits(kind))));
        mask[at] = place;
        mask[at + 2] = place;
        t += 1;
    }
    (shuffle, mask)
}

/// The byte of each 128-bit half where the second channel's slice starts after the blend.
const fn second(kind: usize) -> usize {
    match kind {
        INT8 => 8,
        INT4 => 4,
        _ => 2,
    }
}

/// Two adjacent key channels' codes of a slice of 8 tokens (`at`: the first channel's, the
/// second's `column` bytes further) as 16-bit integers, channel `c` in the low half of lane
/// `t` and `c + 1` in the high half, each at its place.
///
/// # Safety
/// AVX2 present; the slice's `8·bits(KB)/8` bytes readable at `at` and `at + column`.
#[inline(always)]
unsafe fn code_pair<const KB: usize>(
    at: *const u8,
    column: usize,
    shuffle: __m256i,
    mask: __m256i,
) -> __m256i {
    // SAFETY: each read is the slice's bytes of one of the two columns (the caller's
    // contract).
    let both = unsafe {
        match KB {
            INT8 => _mm256_blend_epi32::<0b1100_1100>(
                _mm256_set1_epi64x(at.cast::<i64>().read_unaligned()),
                _mm256_set1_epi64x(at.add(column).cast::<i64>().read_unaligned()),
            ),
            INT4 => _mm256_blend_epi32::<0b1010_1010>(
                _mm256_set1_epi32(at.cast::<i32>().read_unaligned()),
                _mm256_set1_epi32(at.add(column).cast::<i32>().read_unaligned()),
            ),
            _ => _mm256_blend_epi16::<0b1010_1010>(
                _mm256_set1_epi16(at.cast::<i16>().read_unaligned()),
                _mm256_set1_epi16(at.add(column).cast::<i16>().read_unaligned()),
            ),
        }
    };
    let codes = _mm256_shuffle_epi8(both, shuffle);
    if KB == INT8 {
        codes
    } else {
        _mm256_and_si256(codes, mask)
    }
}

/// The fast path's AVX2 key side: a channel-major page of `KB` codes scored with integer dot
/// products on the folded query rounded to 16 bits, token t in lane t.
pub(in crate::attention) struct IntegerKeys8<'a, const KB: usize, const H: usize, const D: usize> {
    /// `H × D` query rows, already multiplied by the softmax scale.
    q: &'a [f32],
    /// Per head, the block's folded query rounded to integers of at most [`UNIT`].
    query: [[i16; D]; MAX_HEADS],
    /// Per head: the value of one step of the rounded query, per lane with the codes'
    /// places undone.
    steps: [__m256; MAX_HEADS],
    /// `q · z` per head in every lane: the key zero points' share of every score.
    bias: [__m256; MAX_HEADS],
    codes: *const u8,
    /// Bytes of one channel's column (the block's tokens).
    column: usize,
    /// The byte shuffle and the mask of [`code_pair`] for `KB` (kept in the key side: built
    /// where the compiler sees them as constants, it merged the shuffle with the loads into
    /// a slower sequence).
    shuffle: __m256i,
    mask: __m256i,
    /// 1 / the codes' places, per token lane.
    unplace: __m256,
}

impl<'a, const KB: usize, const H: usize, const D: usize> IntegerKeys8<'a, KB, H, D> {
    /// The key side of the `H` query rows `q` (already multiplied by the softmax scale).
    ///
    /// # Safety
    /// AVX2 present.
    #[inline(always)]
    pub(in crate::attention) unsafe fn new(q: &'a [f32]) -> Self {
        assert!(q.len() >= H * D);
        let (shuffle, mask) = const { shuffle_and_mask(KB) };
        let unplace: [f32; SLICE] = std::array::from_fn(|t| 1.0 / key_place(KB, t) as f32);
        // SAFETY (each load): read from a local array of its length; AVX2 present (the
        // caller's contract).
        unsafe {
            Self {
                q,
                query: [[0; D]; MAX_HEADS],
                steps: [_mm256_setzero_ps(); MAX_HEADS],
                bias: [_mm256_setzero_ps(); MAX_HEADS],
                codes: std::ptr::null(),
                column: 0,
                shuffle: _mm256_loadu_si256(shuffle.as_ptr().cast()),
                mask: _mm256_loadu_si256(mask.as_ptr().cast()),
                unplace: _mm256_loadu_ps(unplace.as_ptr()),
            }
        }
    }
}

impl<const KB: usize, const H: usize, const D: usize> SliceScores8 for IntegerKeys8<'_, KB, H, D> {
    // (a head's index serves its query row, its folded registers and its sums alike)
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn enter_block(&mut self, keys: &[u8], layout: &Pages) {
        assert!(keys.len() >= layout.key.page_bytes());
        let (kp, q) = (keys.as_ptr(), self.q);
        // scales folded into the query, zero points into a bias; the largest magnitudes
        let mut folded = [[_mm256_setzero_ps(); 16]; MAX_HEADS];
        let mut bias = [_mm256_setzero_ps(); MAX_HEADS];
        let mut largest = [_mm256_setzero_ps(); MAX_HEADS];
        let sign = _mm256_set1_ps(-0.0);
        for i in 0..D / 8 {
            // SAFETY: the (scale, zero) pairs of channels 8i .. 8i + 8 lie at code_bytes +
            // 32i .. + 32 inside the page (its length asserted).
            let (s, z) = unsafe { pairs8(kp.add(layout.key.code_bytes + 32 * i)) };
            for h in 0..H {
                // SAFETY: h·D + 8i + 8 ≤ H·D ≤ q.len() (asserted).
                let x = unsafe { _mm256_loadu_ps(q.as_ptr().add(h * D + 8 * i)) };
                folded[h][i] = _mm256_mul_ps(x, s);
                bias[h] = _mm256_fmadd_ps(x, z, bias[h]);
                largest[h] = _mm256_max_ps(largest[h], _mm256_andnot_ps(sign, folded[h][i]));
            }
        }
        for h in 0..H {
            // SAFETY: the kernel's features (the caller's contract).
            let m = unsafe { across::<true>(largest[h]) };
            // one scale per head: its largest magnitude ↦ UNIT (none for a query of zeros,
            // or one too small to scale: its scores are the bias)
            let up = _mm256_div_ps(_mm256_set1_ps(UNIT), m);
            let scalable = _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_GT_OQ>(m, _mm256_setzero_ps()),
                _mm256_cmp_ps::<_CMP_LT_OQ>(up, _mm256_set1_ps(f32::INFINITY)),
            );
            let up = _mm256_and_ps(up, scalable);
            let step = _mm256_and_ps(_mm256_mul_ps(m, _mm256_set1_ps(1.0 / UNIT)), scalable);
            for i in 0..D / 16 {
                let low = _mm256_cvtps_epi32(_mm256_mul_ps(folded[h][2 * i], up));
                let high = _mm256_cvtps_epi32(_mm256_mul_ps(folded[h][2 * i + 1], up));
                // packing interleaves the halves: 64-bit pieces back in order
                let packed =
                    _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(low, high));
                // SAFETY: 16 i16 written at 16i .. 16i + 16 ≤ D.
                unsafe {
                    _mm256_storeu_si256(self.query[h].as_mut_ptr().add(16 * i).cast(), packed)
                };
            }
            self.steps[h] = _mm256_mul_ps(self.unplace, step);
            // SAFETY: as above.
            self.bias[h] = unsafe { across::<false>(bias[h]) };
        }
        self.codes = kp;
        self.column = layout.tokens * bits(KB) / 8;
    }

    // (a head's index serves its rounded query and its sums alike)
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn scores(&self, slice: usize) -> [__m256; MAX_HEADS] {
        // SAFETY: the slice's codes start inside each column (slice < the block's slices).
        let kp = unsafe { self.codes.add(code_byte(KB, slice * SLICE)) };
        let mut dots = [_mm256_setzero_si256(); MAX_HEADS];
        for c in (0..D).step_by(2) {
            // SAFETY: channels c and c + 1 < D; their slices lie inside their columns.
            let codes = unsafe {
                code_pair::<KB>(
                    kp.add(c * self.column),
                    self.column,
                    self.shuffle,
                    self.mask,
                )
            };
            for h in 0..H {
                // SAFETY: c + 2 ≤ D: two i16 of the head's row read as one 32-bit word.
                let pair = unsafe { self.query[h].as_ptr().add(c).cast::<i32>().read_unaligned() };
                let products = _mm256_madd_epi16(codes, _mm256_set1_epi32(pair));
                dots[h] = _mm256_add_epi32(dots[h], products);
            }
        }
        // (a loop, not a closure: a closure would not carry the kernel's target features)
        let mut scores = [_mm256_setzero_ps(); MAX_HEADS];
        for h in 0..H {
            scores[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[h]), self.steps[h], self.bias[h]);
        }
        scores
    }
}

/// `x`'s eight lanes folded by the largest (`LARGEST`) or the sum, in every lane.
///
/// # Safety
/// AVX present.
#[inline(always)]
unsafe fn across<const LARGEST: bool>(x: __m256) -> __m256 {
    // (a function, not a closure: a closure would not carry the kernel's target features)
    #[inline(always)]
    unsafe fn op<const LARGEST: bool>(a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX present (the caller's contract).
        unsafe {
            if LARGEST {
                _mm256_max_ps(a, b)
            } else {
                _mm256_add_ps(a, b)
            }
        }
    }
    // SAFETY: as above.
    unsafe {
        let x = op::<LARGEST>(x, _mm256_permute2f128_ps::<1>(x, x));
        let x = op::<LARGEST>(x, _mm256_permute_ps::<0x4E>(x));
        op::<LARGEST>(x, _mm256_permute_ps::<0xB1>(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::attention::block_kernel::INT2;

    /// Code `i` of `bits`-bit codes packed lowest bits first.
    fn code(bytes: &[u8], bits: usize, i: usize) -> u8 {
        (bytes[i * bits / 8] >> (i * bits % 8)) & ((1u16 << bits) - 1) as u8
    }

    #[test]
    fn code_pairs_gather_codes_into_token_lanes_exactly_on_avx2_cpus() {
        if !crate::attention::block_kernel::avx2::available() {
            println!("code_pairs_gather_codes: no AVX2 on this CPU, not run");
            return;
        }
        println!("code_pairs_gather_codes: ran the AVX2 fast kernel's code shuffles");
        const D: usize = 64;
        let bytes: Vec<u8> = (0..64 * 64 + 8).map(|i| (i * 97 + i / 7) as u8).collect();
        for kind in [INT8, INT4, INT2] {
            let b = bits(kind);
            for tokens in [8, 16, 32, 64] {
                let column = tokens * b / 8;
                let (shuffle, mask) = shuffle_and_mask(kind);
                for slice in 0..tokens / SLICE {
                    for c in (0..D).step_by(2) {
                        let at = bytes[code_byte(kind, slice * SLICE) + c * column..].as_ptr();
                        let mut lanes = [0u32; 8];
                        // SAFETY: AVX2 present (checked above); `bytes` holds both columns'
                        // slices; 32 bytes read from each local array and written to `lanes`.
                        unsafe {
                            let (s, m) = (
                                _mm256_loadu_si256(shuffle.as_ptr().cast()),
                                _mm256_loadu_si256(mask.as_ptr().cast()),
                            );
                            let pair = match kind {
                                INT8 => code_pair::<INT8>(at, column, s, m),
                                INT4 => code_pair::<INT4>(at, column, s, m),
                                _ => code_pair::<INT2>(at, column, s, m),
                            };
                            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), pair);
                        }
                        for (l, lane) in lanes.iter().enumerate() {
                            let t = slice * SLICE + l;
                            let place = key_place(kind, l);
                            let of = |j: usize| u32::from(code(&bytes, b, (c + j) * tokens + t));
                            let want = (of(0) * place) | ((of(1) * place) << 16);
                            assert_eq!(
                                *lane,
                                want,
                                "{b}-bit codes, block {tokens}: channels {c}, {}, token {t}",
                                c + 1
                            );
                        }
                    }
                }
            }
        }
    }
}
