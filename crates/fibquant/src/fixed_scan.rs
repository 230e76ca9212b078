//! The encoder's nearest-codeword search in fixed point.
//!
//! Block coordinates are rounded to steps of 2⁻¹³, codewords to 2⁻¹⁴, and each codeword's
//! score is computed in 32-bit integers: `s_i = ⌊‖c_i‖²·2²⁶⌉ − Σ_j x̂_j·ĉ_ij` with
//! `x̂ = ⌊x·2¹³⌉`, `ĉ = ⌊c·2¹⁴⌉` (`s_i ≈ 2²⁶·(‖c_i‖² − 2⟨x, c_i⟩)`, the squared distance less
//! ‖x‖²). The score's low bits are then replaced by the codeword's index, so one integer
//! minimum keeps both the smallest score and the first index holding it (no compare and
//! blend per codeword); the bits lost (8 for 256 codewords: 2⁻¹⁸ of the unit; 12 for 4,096:
//! 2⁻¹⁴) are below the rounding of the coordinates (about 2⁻¹³). Codebooks above 4,096
//! codewords are searched exactly instead ([`crate::Codebook::nearest_blocks`]). Integer sums
//! do not depend on their order, so every path — AVX-512 VNNI, AVX2, portable — returns the
//! same index, and a lane
//! multiplies two coordinates per instruction (`vpdpwssds`, `vpmaddwd`) where the float
//! search of [`crate::scan`] spends a multiply and a subtraction on each. A block whose two
//! nearest codewords are nearer each other than the rounding may take either; codebook
//! refinement keeps the exact float search.
//!
//! Coordinates are clamped to ±1 (a rotated unit vector's blocks are within it), which bounds
//! every sum below 2³¹ for k ≤ 8: inputs outside the unit ball give a meaningless index,
//! never an overflow or a panic, and still the same one on every path.

use crate::rotation::Isa;

/// Fraction bits of a rounded block coordinate.
const X_BITS: i32 = 13;
/// Fraction bits of a rounded codeword coordinate.
const C_BITS: i32 = 14;
/// Fraction bits of a score: a product of the two, halved (the score's −2⟨x, c⟩).
const SCORE_BITS: i32 = X_BITS + C_BITS - 1;
/// A padding codeword's score: above every real one (those lie within ±1.5·2³⁰).
const PADDING: i32 = i32::MAX;
/// Coordinate pairs a SIMD lane holds at most (k ≤ 8).
const MAX_PAIRS: usize = 4;
/// Blocks per AVX-512 register (one per 32-bit lane).
const LANES: usize = 16;

/// `v` rounded to `bits` fraction bits, clamped to ±1 (NaN gives 0).
#[inline(always)]
fn rounded(v: f32, bits: i32) -> i16 {
    let one = (1 << bits) as f32;
    (v * one).round_ties_even().clamp(-one, one) as i16
}

/// Two rounded coordinates in one 32-bit lane, the first in the low half (the order
/// `vpmaddwd` pairs them in).
#[inline(always)]
fn pair(lo: i16, hi: i16) -> i32 {
    (lo as u16 as u32 | (hi as u16 as u32) << 16) as i32
}

/// A codebook's codewords in fixed point, laid out for the search: per pair of coordinates a
/// row of `stride` lanes (the pair of codeword i, negated, at i), and the norms' row; the
/// padding up to `stride` has zero coordinates and the [`PADDING`] score.
#[derive(Debug, Clone, PartialEq)]
pub struct FixedCodebook {
    k: usize,
    stride: usize,
    pairs: Vec<i32>,
    norms: Vec<i32>,
    /// 0, 1, …, stride − 1: a codeword's index as a memory operand the SIMD loops broadcast.
    numbers: Vec<i32>,
    /// The low bits of a score that carry the codeword's index.
    index_mask: i32,
}

impl FixedCodebook {
    /// The fixed-point form of `words` (row-major codewords of k coordinates), padded to
    /// `stride` ≥ N codewords.
    pub fn new(k: usize, words: &[f32], stride: usize) -> Self {
        let n = words.len() / k;
        assert!(k > 0 && stride >= n && stride.is_multiple_of(LANES));
        let pair_count = k.div_ceil(2);
        let mut pairs = vec![0i32; pair_count * stride];
        let mut norms = vec![PADDING; stride];
        for (i, word) in words.chunks_exact(k).enumerate() {
            let coordinate = |j: usize| word.get(j).map_or(0, |c| rounded(-c, C_BITS));
            for p in 0..pair_count {
                pairs[p * stride + i] = pair(coordinate(2 * p), coordinate(2 * p + 1));
            }
            let norm: f64 = word.iter().map(|c| f64::from(*c).powi(2)).sum();
            norms[i] = (norm * f64::from(1u32 << SCORE_BITS))
                .round()
                .min(f64::from(1u32 << 29)) as i32;
        }
        Self {
            k,
            stride,
            pairs,
            norms,
            numbers: (0..stride as i32).collect(),
            index_mask: ((1u64 << crate::index_bits(stride)) - 1) as i32,
        }
    }

    /// The index of the nearest codeword of each block of `blocks` (consecutive blocks of k)
    /// into `out`, with the widest instructions the CPU has.
    pub fn nearest_blocks(&self, blocks: &[f32], out: &mut [u16]) {
        self.nearest_blocks_with(blocks, out, Isa::widest());
    }

    /// As [`Self::nearest_blocks`] with the instructions `isa` allows, where the CPU has them
    /// (AVX-512 needs VNNI and BW as well, else the AVX2 loop runs); returns the level that
    /// ran. Every level gives the same indices.
    pub fn nearest_blocks_with(&self, blocks: &[f32], out: &mut [u16], isa: Isa) -> Isa {
        let k = self.k;
        check_blocks(k, blocks, out);
        #[cfg(target_arch = "x86_64")]
        if k <= 2 * MAX_PAIRS {
            let vnni = || {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            };
            let avx2 = std::arch::is_x86_feature_detected!("avx2");
            if isa == Isa::Avx512 && vnni() {
                // SAFETY (each arm): the CPU supports AVX-512F, BW and VNNI, checked above.
                match k.div_ceil(2) {
                    1 => unsafe { x86::nearest_blocks_vnni::<1>(self, blocks, out) },
                    2 => unsafe { x86::nearest_blocks_vnni::<2>(self, blocks, out) },
                    3 => unsafe { x86::nearest_blocks_vnni::<3>(self, blocks, out) },
                    _ => unsafe { x86::nearest_blocks_vnni::<4>(self, blocks, out) },
                }
                return Isa::Avx512;
            }
            if isa != Isa::Portable && avx2 {
                // SAFETY (each arm): the CPU supports AVX2, checked above.
                match k.div_ceil(2) {
                    1 => unsafe { x86::nearest_blocks_avx2::<1>(self, blocks, out) },
                    2 => unsafe { x86::nearest_blocks_avx2::<2>(self, blocks, out) },
                    3 => unsafe { x86::nearest_blocks_avx2::<3>(self, blocks, out) },
                    _ => unsafe { x86::nearest_blocks_avx2::<4>(self, blocks, out) },
                }
                return Isa::Avx2;
            }
        }
        let _ = isa;
        self.nearest_blocks_portable(blocks, out);
        Isa::Portable
    }

    /// The scalar twin: the same integer scores, block by block.
    fn nearest_blocks_portable(&self, blocks: &[f32], out: &mut [u16]) {
        let pair_count = self.k.div_ceil(2);
        let mut lanes = vec![0i32; pair_count];
        for (index, block) in out.iter_mut().zip(blocks.chunks_exact(self.k)) {
            for (p, lane) in lanes.iter_mut().enumerate() {
                let coordinate = |j: usize| block.get(j).map_or(0, |x| rounded(*x, X_BITS));
                *lane = pair(coordinate(2 * p), coordinate(2 * p + 1));
            }
            let mut best = i32::MAX;
            for i in 0..self.stride {
                let mut score = self.norms[i];
                for (p, lane) in lanes.iter().enumerate() {
                    score =
                        score.wrapping_add(pair_product(*lane, self.pairs[p * self.stride + i]));
                }
                best = best.min(score & !self.index_mask | self.numbers[i]);
            }
            *index = (best & self.index_mask) as u16;
        }
    }

    /// The blocks of `group` (up to `W` blocks of k) as rounded coordinate pairs, one row of
    /// `W` lanes per pair (block b in lane b; missing blocks and coordinates are 0). Inlined
    /// so that the SIMD callers round with their own instructions (no `rintf` call).
    #[inline(always)]
    fn lanes<const W: usize>(&self, group: &[f32]) -> [[i32; W]; MAX_PAIRS] {
        let k = self.k;
        let mut coordinates = [[0i16; 2 * MAX_PAIRS]; W];
        for (row, block) in coordinates.iter_mut().zip(group.chunks_exact(k)) {
            for (c, x) in row.iter_mut().zip(block) {
                *c = rounded(*x, X_BITS);
            }
        }
        let mut lanes = [[0i32; W]; MAX_PAIRS];
        for (b, row) in coordinates.iter().enumerate() {
            for (p, lane) in lanes.iter_mut().enumerate() {
                lane[b] = pair(row[2 * p], row[2 * p + 1]);
            }
        }
        lanes
    }
}

/// Panics unless `blocks` holds one block of k coordinates per index of `out` (a caller's
/// mistake, not input).
pub(crate) fn check_blocks(k: usize, blocks: &[f32], out: &[u16]) {
    assert_eq!(
        blocks.len(),
        k * out.len(),
        "blocks of {k} for {} indices",
        out.len()
    );
}

/// `vpmaddwd` on one lane: the sum of the two 16-bit products, wrapping.
fn pair_product(a: i32, b: i32) -> i32 {
    let (a0, a1) = (a as i16 as i32, (a >> 16) as i16 as i32);
    let (b0, b1) = (b as i16 as i32, (b >> 16) as i16 as i32);
    (a0 * b0).wrapping_add(a1 * b1)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{FixedCodebook, LANES, MAX_PAIRS};

    /// Sixteen blocks per register, one per lane, the codewords in turn: per codeword its
    /// norm broadcast, one `vpdpwssds` per coordinate pair, the index put in the score's low
    /// bits (an and and an or, one `vpternlogd`) and the running minimum (`vpminsd`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) fn nearest_blocks_vnni<const P: usize>(
        book: &FixedCodebook,
        blocks: &[f32],
        out: &mut [u16],
    ) {
        let (k, stride) = (book.k, book.stride);
        assert!(k.div_ceil(2) == P && P <= MAX_PAIRS && book.pairs.len() == P * stride);
        assert!(book.norms.len() == stride && book.numbers.len() == stride);
        assert!(blocks.len() == k * out.len());
        // two registers of blocks per pass over the codewords share its broadcasts
        for (groups, out) in blocks.chunks(2 * LANES * k).zip(out.chunks_mut(2 * LANES)) {
            let x: [[__m512i; MAX_PAIRS]; 2] = std::array::from_fn(|g| {
                let group = groups.get(g * LANES * k..).unwrap_or(&[]);
                let group = &group[..group.len().min(LANES * k)];
                if k == 2 * P && group.len() == LANES * k {
                    // SAFETY: the CPU has AVX-512F and BW (this function's features).
                    unsafe { rounded_pairs::<P>(group) }
                } else {
                    let lanes = book.lanes::<LANES>(group);
                    // SAFETY: each row of `lanes` holds 16 i32.
                    std::array::from_fn(|p| unsafe { _mm512_loadu_si512(lanes[p].as_ptr().cast()) })
                }
            });
            let mut best = [_mm512_set1_epi32(i32::MAX); 2];
            let score_bits = _mm512_set1_epi32(!book.index_mask);
            for i in 0..stride {
                // SAFETY: i < stride = norms.len() = numbers.len() and p·stride + i <
                // pairs.len() for p < P (asserted above).
                let norm = _mm512_set1_epi32(unsafe { *book.norms.get_unchecked(i) });
                let mut score = [norm; 2];
                for p in 0..P {
                    // SAFETY: in bounds, see above.
                    let c = _mm512_set1_epi32(unsafe { *book.pairs.get_unchecked(p * stride + i) });
                    for (score, x) in score.iter_mut().zip(&x) {
                        // the saturating form, since LLVM splits chained `vpdpwssd`s into
                        // `vpmaddwd` + `vpaddd` (its broadcast operand then a separate load);
                        // the sums never reach the bounds (module doc), so it adds as the
                        // others do
                        *score = _mm512_dpwssds_epi32(*score, x[p], c);
                    }
                }
                // SAFETY: in bounds, see above.
                let number = _mm512_set1_epi32(unsafe { *book.numbers.get_unchecked(i) });
                for (best, score) in best.iter_mut().zip(score) {
                    let key = _mm512_or_si512(_mm512_and_si512(score, score_bits), number);
                    *best = _mm512_min_epi32(*best, key);
                }
            }
            let mask = _mm512_set1_epi32(book.index_mask);
            let mut indices = [0u32; 2 * LANES];
            for (g, best) in best.iter().enumerate() {
                // SAFETY: 16 u32 written to a local array of 32, at 0 or 16.
                unsafe {
                    _mm512_storeu_si512(
                        indices.as_mut_ptr().add(g * LANES).cast(),
                        _mm512_and_si512(*best, mask),
                    )
                };
            }
            for (o, i) in out.iter_mut().zip(indices) {
                *o = i as u16;
            }
        }
    }

    /// Sixteen whole blocks of k = 2·P coordinates as [`super::rounded`] pairs, one register
    /// per pair (block b in lane b): sixteen coordinates rounded per instruction, then the
    /// pairs dealt out to their registers. The clamp keeps NaN (as `vminps` passes on its
    /// second operand), which converts to `0x8000_0000` and truncates to 0, as the scalar
    /// rounding gives.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and BW (inlined into [`nearest_blocks_vnni`], which
    /// enables them).
    #[inline(always)]
    unsafe fn rounded_pairs<const P: usize>(group: &[f32]) -> [__m512i; MAX_PAIRS] {
        assert!(group.len() == 2 * P * LANES);
        let one = _mm512_set1_ps((1 << super::X_BITS) as f32);
        let minus_one = _mm512_set1_ps(-((1 << super::X_BITS) as f32));
        // the pairs in block order: block b's pair p at b·P + p
        let mut stream = [0i32; MAX_PAIRS * LANES];
        for (c, chunk) in group.chunks_exact(LANES).enumerate() {
            // SAFETY: a chunk holds 16 floats; 8 pairs are stored at 8·c < 8·2·MAX_PAIRS.
            unsafe {
                let v = _mm512_mul_ps(_mm512_loadu_ps(chunk.as_ptr()), one);
                let v = _mm512_max_ps(minus_one, _mm512_min_ps(one, v));
                // rounded to nearest-even whatever the MXCSR says, as `round_ties_even`
                let rounded = _mm512_cvt_roundps_epi32::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(v);
                let halves = _mm512_cvtepi32_epi16(rounded);
                _mm256_storeu_si256(stream.as_mut_ptr().add(8 * c).cast(), halves);
            }
        }
        let mut x = [_mm512_setzero_si512(); MAX_PAIRS];
        match P {
            // SAFETY (each arm): the loads read the first 16·P of `stream`'s 64 lanes.
            1 => x[0] = unsafe { _mm512_loadu_si512(stream.as_ptr().cast()) },
            2 => unsafe {
                let (lo, hi) = (
                    _mm512_loadu_si512(stream.as_ptr().cast()),
                    _mm512_loadu_si512(stream.as_ptr().add(LANES).cast()),
                );
                let even =
                    _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                x[0] = _mm512_permutex2var_epi32(lo, even, hi);
                x[1] =
                    _mm512_permutex2var_epi32(lo, _mm512_add_epi32(even, _mm512_set1_epi32(1)), hi);
            },
            _ => {
                for (p, x) in x.iter_mut().enumerate().take(P) {
                    let lane: [i32; LANES] = std::array::from_fn(|b| stream[b * P + p]);
                    // SAFETY: 16 i32 read from a local array.
                    *x = unsafe { _mm512_loadu_si512(lane.as_ptr().cast()) };
                }
            }
        }
        x
    }

    /// Eight blocks per register, otherwise as [`nearest_blocks_vnni`]: `vpmaddwd` and an
    /// add per coordinate pair, an and and an or for the index, `vpminsd`.
    #[target_feature(enable = "avx2")]
    pub(super) fn nearest_blocks_avx2<const P: usize>(
        book: &FixedCodebook,
        blocks: &[f32],
        out: &mut [u16],
    ) {
        const WIDTH: usize = 8;
        let (k, stride) = (book.k, book.stride);
        assert!(k.div_ceil(2) == P && P <= MAX_PAIRS && book.pairs.len() == P * stride);
        assert!(book.norms.len() == stride && book.numbers.len() == stride);
        assert!(blocks.len() == k * out.len());
        for (group, out) in blocks.chunks(WIDTH * k).zip(out.chunks_mut(WIDTH)) {
            let lanes = book.lanes::<WIDTH>(group);
            // SAFETY: each row of `lanes` holds 8 i32.
            let x: [__m256i; MAX_PAIRS] =
                std::array::from_fn(|p| unsafe { _mm256_loadu_si256(lanes[p].as_ptr().cast()) });
            let mut best = _mm256_set1_epi32(i32::MAX);
            let score_bits = _mm256_set1_epi32(!book.index_mask);
            for i in 0..stride {
                // SAFETY: as in the AVX-512 loop.
                let mut score = _mm256_set1_epi32(unsafe { *book.norms.get_unchecked(i) });
                for (p, x) in x.iter().enumerate().take(P) {
                    // SAFETY: as in the AVX-512 loop.
                    let c = unsafe { *book.pairs.get_unchecked(p * stride + i) };
                    score = _mm256_add_epi32(score, _mm256_madd_epi16(*x, _mm256_set1_epi32(c)));
                }
                // SAFETY: as in the AVX-512 loop.
                let number = _mm256_set1_epi32(unsafe { *book.numbers.get_unchecked(i) });
                let key = _mm256_or_si256(_mm256_and_si256(score, score_bits), number);
                best = _mm256_min_epi32(best, key);
            }
            let best_index = _mm256_and_si256(best, _mm256_set1_epi32(book.index_mask));
            let mut indices = [0u32; WIDTH];
            // SAFETY: 8 u32 written to a local array.
            unsafe { _mm256_storeu_si256(indices.as_mut_ptr().cast(), best_index) };
            for (o, i) in out.iter_mut().zip(indices) {
                *o = i as u16;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(state: &mut u64) -> f32 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    /// Every level the CPU has against the portable twin, k = 1 … 9 (9: portable on every
    /// level), block counts that are and are not whole registers, planted duplicate codewords
    /// and inputs outside the unit ball; and the fixed-point answer is a nearest codeword to
    /// within the rounding.
    #[test]
    fn every_level_gives_the_portable_indices() {
        let mut ran = Vec::new();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for (k, (n, stride)) in (1..=9).flat_map(|k| [(k, (100usize, 112usize)), (k, (256, 256))]) {
            let mut words: Vec<f32> = (0..n * k)
                .map(|_| random(&mut state) / (k as f32).sqrt())
                .collect();
            // codeword 70 repeats codeword 7: ties go to 7
            let seventh = words[7 * k..8 * k].to_vec();
            words[70 * k..71 * k].copy_from_slice(&seventh);
            let book = FixedCodebook::new(k, &words, stride);
            for count in [1, 8, 16, 21, 48] {
                let mut blocks: Vec<f32> = (0..count * k)
                    .map(|_| random(&mut state) / (k as f32).sqrt())
                    .collect();
                blocks[..k].copy_from_slice(&seventh);
                if count > 2 {
                    // outside the unit ball, infinite, NaN: clamped or zero, on every path
                    blocks[k..2 * k].fill(3.0);
                    blocks[k] = -f32::INFINITY;
                    blocks[2 * k] = f32::NAN;
                    if k > 1 {
                        blocks[2 * k + 1] = -7.5;
                    }
                }
                let mut want = vec![0u16; count];
                book.nearest_blocks_with(&blocks, &mut want, Isa::Portable);
                // of two equal codewords the first (another may round to as near)
                assert_ne!(want[0], 70, "k {k}: the second of two equal codewords");
                for isa in [Isa::Avx512, Isa::Avx2] {
                    let mut got = vec![u16::MAX; count];
                    let level = book.nearest_blocks_with(&blocks, &mut got, isa);
                    ran.push(level);
                    assert_eq!(got, want, "k {k}, {count} blocks, {isa:?} ran {level:?}");
                }
                // nearest within the rounding, for the blocks inside the unit ball
                let inside = |b: &usize| *b == 0 || *b > 2 || count <= 2;
                for (b, block) in blocks
                    .chunks_exact(k)
                    .enumerate()
                    .filter(|(b, _)| inside(b))
                {
                    let distance = |i: usize| -> f32 {
                        words[i * k..(i + 1) * k]
                            .iter()
                            .zip(block)
                            .map(|(c, x)| (c - x) * (c - x))
                            .sum()
                    };
                    let best = (0..n).map(distance).fold(f32::INFINITY, f32::min);
                    let chosen = distance(want[b] as usize);
                    assert!(chosen - best <= 1e-3, "k {k}: {chosen} vs {best}");
                }
            }
        }
        ran.sort_by_key(|isa| *isa as u8);
        ran.dedup();
        println!("fixed-point search ran {ran:?} against the portable twin");
    }
}
