//! Activations quantized per row and block of 32 to i8 with an f32 scale, as the weight
//! kernels read them.

use super::{ShapeError, BLOCK};

/// Activations quantized per row and block.
#[derive(Debug, Clone, Default)]
pub struct QActivations {
    pub(super) rows: usize,
    pub(super) k: usize,
    pub(super) q: Vec<i8>,
    pub(super) scale: Vec<f32>,
    /// Σ q per (row, block): undoes the +128 offset of the 8-bit weights, adds Q4_1's minimum.
    pub(super) sum: Vec<i32>,
}

/// 1.5·2^23: adding and subtracting it rounds an f32 of magnitude < 2^22 to the nearest integer,
/// ties to even, with two plain additions (the x86-64 baseline has no rounding instruction, so
/// `round` and `round_ties_even` become library calls that stop the loop from vectorizing).
const ROUNDING_MAGIC: f32 = 12_582_912.0;

/// Quantizes one block to i8 with `scale = max|x| / 127`, rounding half to even.
pub(super) fn quantize_block(x: &[f32], out: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut sum = 0i32;
    for (o, v) in out.iter_mut().zip(x) {
        let q = (((v * inv) + ROUNDING_MAGIC) - ROUNDING_MAGIC).clamp(-127.0, 127.0) as i8;
        *o = q;
        sum += q as i32;
    }
    (scale, sum)
}

impl QActivations {
    /// Quantizes `rows` rows of width `k` (a multiple of 32), reusing this buffer.
    pub fn quantize(&mut self, x: &[f32], rows: usize, k: usize) -> Result<(), ShapeError> {
        if !k.is_multiple_of(BLOCK) || rows.checked_mul(k) != Some(x.len()) {
            return Err(ShapeError::Activations {
                rows,
                k,
                len: x.len(),
            });
        }
        let blocks = k / BLOCK;
        self.rows = rows;
        self.k = k;
        self.q.resize(rows * k, 0);
        self.scale.resize(rows * blocks, 0.0);
        self.sum.resize(rows * blocks, 0);
        let simd = quantize_simd_available();
        for (i, (src, dst)) in x
            .chunks_exact(BLOCK)
            .zip(self.q.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            #[cfg(target_arch = "x86_64")]
            let quantized = if simd {
                // SAFETY: the features were checked by `quantize_simd_available`.
                unsafe { quantize_block_avx512(src, dst) }
            } else {
                quantize_block(src, dst)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let quantized = {
                let _ = simd;
                quantize_block(src, dst)
            };
            (self.scale[i], self.sum[i]) = quantized;
        }
        Ok(())
    }
}

impl QActivations {
    /// Asserts what the kernels' unchecked reads rely on: activations of width `k` (the
    /// weights' inputs), their codes, scales and sums all there, and `dst` holding 16 outputs
    /// per row.
    pub(super) fn assert_fits(&self, k: usize, dst: &[f32]) {
        let blocks = k / BLOCK;
        assert!(self.k == k && self.q.len() >= self.rows * k && dst.len() >= self.rows * 16);
        assert!(self.scale.len() >= self.rows * blocks && self.sum.len() >= self.rows * blocks);
    }

    /// Bytes `4t .. 4t + 4` of row `row`'s block `b`, as the kernels broadcast them.
    ///
    /// # Safety
    /// `row < rows`, `b < k / 32`, `t < 8`.
    #[inline(always)]
    pub(super) unsafe fn q_word(&self, row: usize, b: usize, t: usize) -> i32 {
        debug_assert!(row < self.rows && (b + 1) * BLOCK <= self.k && t < BLOCK / 4);
        // SAFETY: inside `q` (rows × k bytes) by the caller's contract.
        unsafe {
            self.q
                .as_ptr()
                .add(row * self.k + b * BLOCK + 4 * t)
                .cast::<i32>()
                .read_unaligned()
        }
    }

    /// Row `row`'s block `b`: its scale and the sum of its codes.
    ///
    /// # Safety
    /// `row < rows`, `b < k / 32`.
    #[inline(always)]
    pub(super) unsafe fn block_scale_and_sum(&self, row: usize, b: usize) -> (f32, i32) {
        let at = row * (self.k / BLOCK) + b;
        debug_assert!(at < self.scale.len() && at < self.sum.len());
        // SAFETY: rows · k/32 entries each (resized by `quantize`), by the caller's contract.
        unsafe { (*self.scale.get_unchecked(at), *self.sum.get_unchecked(at)) }
    }
}

/// Whether [`quantize_block_avx512`] runs: where the products run the AVX-512 VNNI kernels (its
/// features are theirs in part), so that `PAGEDKV_FORCE_SCALAR` turns both off.
fn quantize_simd_available() -> bool {
    super::vnni_available()
}

/// [`quantize_block`] on 32 values in two registers, bit for bit: the maximum is exact in any
/// order, and converting with the default rounding mode rounds half to even as the magic
/// constant does. A block holding an infinity or NaN, or so small that `1 / scale` overflows,
/// goes to the scalar twin: its clamping of infinities and NaN the conversion does not share.
///
/// # Safety
/// AVX-512F and AVX-512BW present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(x: &[f32], out: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    assert!(x.len() == BLOCK && out.len() == BLOCK);
    // SAFETY: 32 floats at x (asserted).
    let (a, b) = unsafe {
        (
            _mm512_loadu_ps(x.as_ptr()),
            _mm512_loadu_ps(x.as_ptr().add(16)),
        )
    };
    let (abs_a, abs_b) = (_mm512_abs_ps(a), _mm512_abs_ps(b));
    let inf = _mm512_set1_ps(f32::INFINITY);
    let not_finite = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(abs_a, inf)
        | _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(abs_b, inf);
    if not_finite != 0 {
        return quantize_block(x, out);
    }
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(abs_a, abs_b));
    let scale = amax / 127.0;
    if scale > 0.0 && !(1.0 / scale).is_finite() {
        return quantize_block(x, out);
    }
    let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
    let limit = _mm512_set1_epi32(127);
    let to_int = |v| {
        let q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
        _mm512_max_epi32(
            _mm512_min_epi32(q, limit),
            _mm512_sub_epi32(_mm512_setzero_si512(), limit),
        )
    };
    let (qa, qb) = (to_int(a), to_int(b));
    // SAFETY: 32 bytes at out (asserted): 16 each.
    unsafe {
        _mm_storeu_si128(out.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128(out.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi8(qb));
    }
    (scale, _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        let x: Vec<f32> = [127.0, -0.5, 0.5, 1.5, 2.5, -1.5, 3.49, -3.51]
            .into_iter()
            .chain(std::iter::repeat_n(0.0, 24))
            .collect();
        let mut q = [0i8; BLOCK];
        let (scale, sum) = quantize_block(&x, &mut q);
        assert_eq!(scale, 1.0);
        assert_eq!(&q[..8], &[127, 0, 0, 2, 2, -2, 3, -4]);
        assert_eq!(sum, 127 + 2 + 2 - 2 + 3 - 4);
    }

    #[test]
    fn simd_quantization_is_the_scalar_one_bit_for_bit() {
        let simd = quantize_simd_available();
        println!(
            "{}",
            if simd {
                "compared the AVX-512 quantizer with the scalar one"
            } else {
                "no AVX-512 VNNI on this CPU: only the scalar quantizer was run"
            }
        );
        let mut seed = 5u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let mut blocks: Vec<Vec<f32>> = (0..200)
            .map(|i| (0..BLOCK).map(|_| next() * 10f32.powi(i % 7 - 3)).collect())
            .collect();
        // ties, zeros, extremes and values that are not finite
        blocks.push([127.0, -0.5, 0.5, 1.5, 2.5, -1.5, 3.49, -3.51].repeat(4));
        blocks.push(vec![0.0; BLOCK]);
        blocks.push([f32::MAX, -f32::MAX, 1.0, f32::MIN_POSITIVE].repeat(8));
        blocks.push([f32::NAN, 1.0, -2.0, 0.25].repeat(8));
        blocks.push([f32::INFINITY, 1.0, -2.0, 0.25].repeat(8));
        // so small that 1 / scale overflows to infinity
        blocks.push([1e-38, -1e-38, 0.0, 3e-39].repeat(8));
        for block in &blocks {
            let (mut scalar, mut vector) = ([0i8; BLOCK], [0i8; BLOCK]);
            let expected = quantize_block(block, &mut scalar);
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: features checked by `quantize_simd_available`.
                let got = unsafe { quantize_block_avx512(block, &mut vector) };
                assert_eq!(
                    (got.0.to_bits(), got.1, vector),
                    (expected.0.to_bits(), expected.1, scalar),
                    "{block:?}"
                );
            }
            let _ = (&mut vector, expected);
        }
    }
}
