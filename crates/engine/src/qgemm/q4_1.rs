//! Q4_1 weight matrices read as the GGUF file stores them: 4-bit codes with an f16 scale and
//! minimum per 32 weights (`w = d·q + m`), multiplied with 8-bit activations by `vpdpbusd`
//! (AVX-512 VNNI) or `vpmaddubsw` (AVX2).
//!
//! The codes are unsigned, as both instructions want their first operand, so no offset needs undoing;
//! the minimum adds `m · Σ x` per block, and the activations' block sums are already there.
//! A group's blocks are repacked so that each 32-bit lane belongs to a different output column:
//!
//! ```text
//!  group g = columns 16g .. 16g+15, block b = inputs 32b .. 32b+31            (320 bytes)
//!  [j = 0..4][lane = column 0..16][4 bytes: the file's qs[4j .. 4j+4]]         256 bytes
//!  [lane] d as f16, then [lane] m as f16                                        2 × 32 bytes
//! ```
//!
//! A byte's low nibble is input `4j + i` and its high nibble input `16 + 4j + i` (the file's
//! own pairing), so one load gives two of the 8-bit kernel's registers after a mask and a
//! shift. Half the 8-bit layout's bytes per weight (0.625 against 1.125): single-sequence
//! decode reads every weight once per token, so it runs at the speed of these bytes.

use super::{simd_group, GroupedWeights, Kernel, QActivations, ShapeError, BLOCK, LANES};
use half::f16;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{__m256, __m256i, __m512, __m512i};

/// Bytes of one Q4_1 block in the file: d, m (f16 each), 16 bytes of codes.
const FILE_BLOCK: usize = 20;
/// Bytes of one (group, block) in the repacked layout.
const PACKED: usize = LANES * (BLOCK / 2 + 4);
/// Where the scales and minimums start in a (group, block).
const SCALES_AT: usize = LANES * BLOCK / 2;
const MINS_AT: usize = SCALES_AT + 2 * LANES;

/// A weight matrix `[n outputs × k inputs]` of Q4_1 blocks, repacked.
#[derive(Debug, Clone)]
pub struct Q4Weights {
    n: usize,
    k: usize,
    packed: Vec<u8>,
}

impl Q4Weights {
    /// Repacks the file's Q4_1 data of a matrix of `n` rows (outputs) by `k` columns (inputs):
    /// row-major, `k / 32` blocks of 20 bytes per row.
    pub fn from_q4_1(data: &[u8], n: usize, k: usize) -> Result<Self, ShapeError> {
        if n == 0 || k == 0 || !n.is_multiple_of(LANES) || !k.is_multiple_of(BLOCK) {
            return Err(ShapeError::Weights { n, k });
        }
        let expected = n
            .checked_mul(k / BLOCK)
            .and_then(|blocks| blocks.checked_mul(FILE_BLOCK));
        if expected != Some(data.len()) {
            return Err(ShapeError::Data {
                expected: expected.unwrap_or(usize::MAX),
                got: data.len(),
            });
        }
        let blocks = k / BLOCK;
        let mut packed = vec![0u8; n / LANES * blocks * PACKED];
        for col in 0..n {
            let (g, lane) = (col / LANES, col % LANES);
            for b in 0..blocks {
                let src = &data[(col * blocks + b) * FILE_BLOCK..][..FILE_BLOCK];
                let dst = &mut packed[(g * blocks + b) * PACKED..][..PACKED];
                dst[SCALES_AT + 2 * lane..][..2].copy_from_slice(&src[0..2]);
                dst[MINS_AT + 2 * lane..][..2].copy_from_slice(&src[2..4]);
                for j in 0..4 {
                    dst[(j * LANES + lane) * 4..][..4].copy_from_slice(&src[4 + 4 * j..][..4]);
                }
            }
        }
        Ok(Self { n, k, packed })
    }

    /// Column `lane`'s (d, m) in (group, block) `at` (its byte offset).
    fn scale_and_min(&self, at: usize, lane: usize) -> (f32, f32) {
        let read = |offset: usize| {
            let bytes = [self.packed[at + offset], self.packed[at + offset + 1]];
            f16::from_le_bytes(bytes).to_f32()
        };
        (read(SCALES_AT + 2 * lane), read(MINS_AT + 2 * lane))
    }

    /// The scalar twin of the SIMD kernel: the same integer sums, and per (row, column) the
    /// same f32 operations in the same order (`d · s`, then a fused multiply-add for the codes
    /// and one for the minimum, per block).
    fn group_scalar(&self, g: usize, x: &QActivations, dst: &mut [f32]) {
        assert_eq!(x.k, self.k, "activations as wide as the inputs");
        let blocks = self.k / BLOCK;
        for r in 0..x.rows {
            for lane in 0..LANES {
                let mut acc = 0f32;
                for b in 0..blocks {
                    let at = (g * blocks + b) * PACKED;
                    let xq = &x.q[r * self.k + b * BLOCK..][..BLOCK];
                    let mut dot = 0i32;
                    for j in 0..4 {
                        for i in 0..4 {
                            let byte = self.packed[at + (j * LANES + lane) * 4 + i];
                            dot += (byte & 0x0F) as i32 * xq[4 * j + i] as i32;
                            dot += (byte >> 4) as i32 * xq[16 + 4 * j + i] as i32;
                        }
                    }
                    let (d, m) = self.scale_and_min(at, lane);
                    let s = x.scale[r * blocks + b];
                    acc = (dot as f32).mul_add(d * s, acc);
                    acc = m.mul_add(s * x.sum[r * blocks + b] as f32, acc);
                }
                dst[r * LANES + lane] = acc;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
// SAFETY: `check_group` asserts the group's blocks exist; `registers` reads no more.
unsafe impl super::tiles::Layout for Q4Weights {
    /// The block's 16 scales d and 16 minimums m.
    type Params = (__m512, __m512);

    fn inputs(&self) -> usize {
        self.k
    }

    fn check_group(&self, g: usize) {
        assert!(self.packed.len() >= (g + 1) * self.k / BLOCK * PACKED);
    }

    #[inline(always)]
    unsafe fn registers(&self, g: usize, b: usize) -> ([__m512i; 8], Self::Params) {
        use std::arch::x86_64::*;
        // SAFETY: (g, b)'s 320 bytes lie inside `packed` (checked group, b < blocks: the
        // caller's contract); AVX-512F and BW present (512-bit loads, masks, conversions).
        unsafe {
            let at = self.packed.as_ptr().add((g * self.k / BLOCK + b) * PACKED);
            let nibble = _mm512_set1_epi8(0x0F);
            // inputs 4t .. 4t+4 for t = 0..8: low nibbles of the 4 registers, then high
            let bytes: [__m512i; 4] =
                std::array::from_fn(|j| _mm512_loadu_si512(at.add(64 * j).cast()));
            let registers = std::array::from_fn(|t| {
                if t < 4 {
                    _mm512_and_si512(bytes[t], nibble)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16::<4>(bytes[t - 4]), nibble)
                }
            });
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(at.add(SCALES_AT).cast()));
            let m = _mm512_cvtph_ps(_mm256_loadu_si256(at.add(MINS_AT).cast()));
            (registers, (d, m))
        }
    }

    #[inline(always)]
    unsafe fn accumulate(
        acc: __m512,
        dot: __m512i,
        (d, m): Self::Params,
        s: f32,
        sum: i32,
    ) -> __m512 {
        use std::arch::x86_64::*;
        // SAFETY: AVX-512F present (the caller's contract).
        unsafe {
            // Σ (d·q + m)·s·x = d·s·Σ q·x + m·(s·Σx), in the scalar twin's order
            let ds = _mm512_mul_ps(d, _mm512_set1_ps(s));
            let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), ds, acc);
            _mm512_fmadd_ps(m, _mm512_set1_ps(s * sum as f32), acc)
        }
    }
}

#[cfg(target_arch = "x86_64")]
// SAFETY: as the AVX-512 layout: `check_group` asserts the group's blocks exist.
unsafe impl super::tiles_avx2::Avx2Layout for Q4Weights {
    /// The 8 columns' scales d and minimums m.
    type Params = (__m256, __m256);

    fn inputs(&self) -> usize {
        self.k
    }

    fn check_group(&self, g: usize) {
        super::tiles::Layout::check_group(self, g);
    }

    #[inline(always)]
    unsafe fn params(&self, g: usize, b: usize, h: usize) -> (__m256, __m256) {
        use std::arch::x86_64::*;
        // SAFETY: the (group, block)'s 8 + 8 f16 of this half lie inside `packed` (the
        // caller's contract); F16C present.
        unsafe {
            let at = self
                .packed
                .as_ptr()
                .add((g * self.k / BLOCK + b) * PACKED + 16 * h);
            (
                _mm256_cvtph_ps(_mm_loadu_si128(at.add(SCALES_AT).cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(at.add(MINS_AT).cast())),
            )
        }
    }

    #[inline(always)]
    unsafe fn register(&self, g: usize, b: usize, t: usize, h: usize) -> __m256i {
        use std::arch::x86_64::*;
        let at = (g * self.k / BLOCK + b) * PACKED + 64 * (t % 4) + 32 * h;
        // SAFETY: 32 of the (group, block)'s code bytes (the caller's contract); AVX2 present.
        unsafe {
            let bytes = _mm256_loadu_si256(self.packed.as_ptr().add(at).cast());
            let bytes = if t < 4 {
                bytes
            } else {
                _mm256_srli_epi16::<4>(bytes)
            };
            _mm256_and_si256(bytes, _mm256_set1_epi8(0x0F))
        }
    }

    /// Codes ≤ 15 against activations ≥ −128: a pair is at most 2·15·128, no saturation.
    #[inline(always)]
    unsafe fn dot(w: __m256i, x: __m256i) -> __m256i {
        use std::arch::x86_64::*;
        // SAFETY: AVX2 present (the caller's contract).
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)) }
    }

    #[inline(always)]
    unsafe fn accumulate(
        acc: __m256,
        dot: __m256i,
        (d, m): Self::Params,
        s: f32,
        sum: i32,
    ) -> __m256 {
        use std::arch::x86_64::*;
        // SAFETY: AVX2 and FMA present (the caller's contract).
        unsafe {
            // as the AVX-512 layout and the scalar twin
            let ds = _mm256_mul_ps(d, _mm256_set1_ps(s));
            let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), ds, acc);
            _mm256_fmadd_ps(m, _mm256_set1_ps(s * sum as f32), acc)
        }
    }
}

impl GroupedWeights for Q4Weights {
    fn n(&self) -> usize {
        self.n
    }
    fn k(&self) -> usize {
        self.k
    }
    fn group(&self, g: usize, x: &QActivations, dst: &mut [f32], kernel: Kernel) {
        if !simd_group(self, g, x, dst, kernel) {
            self.group_scalar(g, x, dst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::matmul_many;
    use super::super::tests::{
        bit_identical_on_every_kernel_and_row_by_row, data, within_the_f64_reference,
    };
    use super::*;

    /// A Q4_1 matrix in the file's format from seeded values, and its dequantized f32 values.
    fn q4_1_matrix(n: usize, k: usize, seed: u32) -> (Vec<u8>, Vec<f32>) {
        let values = data(n * k, seed);
        let (mut file, mut exact) = (Vec::new(), Vec::new());
        for block in values.chunks_exact(BLOCK) {
            let (lo, hi) = block
                .iter()
                .fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
            let d = f16::from_f32((hi - lo) / 15.0);
            let m = f16::from_f32(lo);
            let q: Vec<u8> = block
                .iter()
                .map(|v| ((v - m.to_f32()) / d.to_f32()).round().clamp(0.0, 15.0) as u8)
                .collect();
            file.extend_from_slice(&d.to_le_bytes());
            file.extend_from_slice(&m.to_le_bytes());
            file.extend((0..16).map(|i| q[i] | (q[i + 16] << 4)));
            exact.extend(q.iter().map(|q| d.to_f32() * *q as f32 + m.to_f32()));
        }
        (file, exact)
    }

    #[test]
    fn matches_the_dequantized_weights_within_activation_rounding() {
        let (n, k, rows) = (48, 96, 5);
        let (file, w) = q4_1_matrix(n, k, 7);
        let weights = Q4Weights::from_q4_1(&file, n, k).unwrap();
        let x = data(rows * k, 8);
        let mut acts = QActivations::default();
        acts.quantize(&x, rows, k).unwrap();
        let mut out = [Vec::new()];
        matmul_many(&[&weights], &acts, &mut out).unwrap();
        // the activations' 8-bit rounding only: ≤ 0.5% of Σ|x·w|
        within_the_f64_reference(&out[0], &x, &w, (rows, n, k), 0.005);
    }

    #[test]
    fn simd_and_scalar_are_bit_identical_and_rows_independent() {
        // 15 rows: tiles of 8, 4, 2 and 1
        const ROWS: usize = 15;
        let (n, k) = (64, 128);
        let (file, _) = q4_1_matrix(n, k, 9);
        let w = Q4Weights::from_q4_1(&file, n, k).unwrap();
        bit_identical_on_every_kernel_and_row_by_row(&w, &data(ROWS * k, 10), ROWS, "Q4_1");
    }

    #[test]
    fn bad_shapes_are_rejected() {
        let (file, _) = q4_1_matrix(16, 64, 1);
        assert!(Q4Weights::from_q4_1(&file, 16, 64).is_ok());
        assert_eq!(
            Q4Weights::from_q4_1(&file[1..], 16, 64).unwrap_err(),
            ShapeError::Data {
                expected: 640,
                got: 639
            }
        );
        assert!(Q4Weights::from_q4_1(&file, 32, 32).is_ok()); // same bytes, another shape
        assert_eq!(
            Q4Weights::from_q4_1(&file, 8, 128).unwrap_err(),
            ShapeError::Weights { n: 8, k: 128 }
        );
        assert_eq!(
            Q4Weights::from_q4_1(&file, 16, 48).unwrap_err(),
            ShapeError::Weights { n: 16, k: 48 }
        );
        // a shape whose byte count overflows is refused, not wrapped
        assert!(Q4Weights::from_q4_1(&file, usize::MAX - 15, 64).is_err());
    }
}
