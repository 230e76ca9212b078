//! Widening stored f16 and bf16 elements to f32, exactly.

use half::{bf16, f16};

use super::Simd;
use crate::codec::scalar::get_f16;

/// f16 → f32 in plain integer and float operations that vectorize (the `half` crate converts
/// 8 at a time behind a function call): the exponent and mantissa bits moved into f32
/// position and rescaled by 2¹¹², exact for normals and subnormals; infinities and NaNs get
/// the all-ones exponent. Bit-identical to `f16::to_f32` (tested on all 65,536 codes).
#[inline(always)]
pub(super) fn f16_to_f32(src: &[f16], dst: &mut [f32], simd: Simd) {
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx512 {
        // SAFETY: AVX-512F is present (a pass runs at a level only where the CPU has it).
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
pub(super) fn f16_bytes_to_f32(bytes: &[u8], out: &mut Vec<f32>, simd: Simd) {
    let len = bytes.len() / 2;
    out.resize(len, 0.0);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx512 {
        // SAFETY: AVX-512F is present (a pass runs at a level only where the CPU has it);
        // lengths are checked inside.
        done = unsafe { super::pages::x86::f16_bytes_to_f32_16(bytes, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx2 {
        // SAFETY: F16C and AVX are present (a pass runs at a level only where the CPU has
        // it); lengths are checked inside.
        done = unsafe { super::pages::avx2::f16_bytes_to_f32_8(bytes, out) };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact_on_every_code() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut ours = vec![0f32; all.len()];
        let mut portable = vec![0f32; all.len()];
        f16_to_f32(&all, &mut ours, Simd::widest());
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
}
