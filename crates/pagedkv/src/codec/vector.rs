//! FibQuant pages (DESIGN §5–6): each token's vector is one FibQuant code, its norm stored as
//! one byte against the page's largest norm.
//!
//! ```text
//!  page = [ν_max f16][token 0: norm byte | indices][token 1: ...] ... [token block_size-1]
//!  ν_t  = ν_max · 2^(−byte/16)          (byte 255: a zero vector)
//! ```
//!
//! Keys and values use the same layout. A FibQuant code on its own carries an f16 norm
//! (16 bits per vector: 0.25 bits per element at d = 64, a tenth of fibquant-k4n256's rate);
//! here the page's largest norm is the reference and each token keeps its log-ratio to it in
//! sixteenths of an octave: at most 2.2% off (relative squared error +1.6e-4 against the
//! direction's 9.5e-2 at fibquant-k4n256) over a range of 2^15.9 within a page, for 8 + 1
//! bits per vector (0.14 bits per element instead of 0.25). Norms further below the page's
//! largest are clamped to the bottom of that range. The quantizer (codebook and rotation) of a
//! profile is built once per process and shared by every page and cache.

use fibquant::FibQuant;
use half::f16;

use super::Codec;
use crate::error::{KvError, Result};

/// Bytes before the first code: the page's largest norm, f16.
pub(crate) const PAGE_HEADER: usize = 2;
/// Norm byte of a zero vector.
const ZERO: u8 = 255;
/// Steps of the norm byte per octave.
const STEPS: f64 = 16.0;
/// `2^(−i/16)` for i in 0..16.
const FRACTIONS: [f32; 16] = [
    1.0,
    0.957_603_3,
    0.917_004_04,
    0.878_126_1,
    0.840_896_4,
    0.805_245_2,
    0.771_105_4,
    0.738_413_1,
    std::f32::consts::FRAC_1_SQRT_2,
    0.677_127_8,
    0.648_419_8,
    0.620_928_9,
    0.594_603_6,
    0.569_394_3,
    0.545_253_9,
    0.522_136_9,
];

/// Bytes of one token's code in a page: the crate's code with a one-byte norm.
pub(crate) fn token_bytes(q: &FibQuant) -> usize {
    q.code_bytes() - 1
}

/// Bytes of a page of `tokens` codes of `profile`.
pub(crate) fn page_bytes(profile: fibquant::Profile, tokens: usize) -> Option<usize> {
    let token = fibquant::code_bytes(profile.d, profile.k, profile.n) - 1;
    token.checked_mul(tokens)?.checked_add(PAGE_HEADER)
}

/// The page's largest norm from its header; a negative or non-finite one means a corrupt page.
#[inline(always)]
pub(crate) fn page_norm(page: &[u8]) -> Result<f32> {
    let norm = f16::from_le_bytes([page[0], page[1]]).to_f32();
    if norm.is_finite() && norm >= 0.0 {
        Ok(norm)
    } else {
        Err(KvError::FibQuant(fibquant::FibQuantError::NonFinite))
    }
}

/// A token's norm from the page's largest and its norm byte.
#[inline(always)]
pub(crate) fn token_norm(page_norm: f32, byte: u8) -> f32 {
    if byte == ZERO {
        return 0.0;
    }
    // 2^(−byte/16) = 2^(−⌊byte/16⌋) · 2^(−(byte mod 16)/16); the power of two is built exactly
    let octave = f32::from_bits((127 - (byte >> 4) as u32) << 23);
    page_norm * FRACTIONS[(byte & 15) as usize] * octave
}

/// The norm byte of a vector of norm `norm` in a page whose largest is `page_norm`.
pub(crate) fn norm_byte(page_norm: f32, norm: f64) -> u8 {
    if norm == 0.0 || page_norm == 0.0 {
        return ZERO;
    }
    let steps = (STEPS * (page_norm as f64 / norm).log2()).round();
    steps.clamp(0.0, (ZERO - 1) as f64) as u8
}

/// The shared quantizer of a FibQuant `codec` at `head_dim`.
pub(crate) fn quantizer(codec: Codec, head_dim: usize) -> Result<std::sync::Arc<FibQuant>> {
    let profile = codec
        .fibquant_profile(head_dim)
        .ok_or(KvError::UnsupportedCodec {
            codec: codec.to_string(),
            reason: "not a FibQuant codec",
        })?;
    Ok(FibQuant::shared(profile)?)
}

/// Encodes `rows` (block_size × head_dim) token by token into `out` (`page_bytes` long).
pub(crate) fn encode_page(
    codec: Codec,
    rows: &[f32],
    head_dim: usize,
    out: &mut [u8],
) -> Result<()> {
    let q = quantizer(codec, head_dim)?;
    let code_bytes = q.code_bytes();
    let tokens = rows.len() / head_dim;
    // the crate's codes (f16 norm first) give the indices and refuse non-finite rows and
    // norms beyond f16
    let mut codes = vec![0u8; tokens * code_bytes];
    q.encode_rows(rows, &mut codes)?;
    // their f16 norms (relative error 2⁻¹¹) are far finer than the norm byte's steps
    let norm_of = |code: &[u8]| f16::from_le_bytes([code[0], code[1]]);
    let largest = codes
        .chunks_exact(code_bytes)
        .map(norm_of)
        .fold(f16::ZERO, f16::max);
    out[..PAGE_HEADER].copy_from_slice(&largest.to_le_bytes());
    for (code, token) in codes
        .chunks_exact(code_bytes)
        .zip(out[PAGE_HEADER..].chunks_exact_mut(code_bytes - 1))
    {
        token[0] = norm_byte(largest.to_f32(), norm_of(code).to_f64());
        token[1..].copy_from_slice(&code[2..]);
    }
    Ok(())
}

/// Decodes a page token by token into `out` (block_size × head_dim).
pub(crate) fn decode_page(
    codec: Codec,
    page: &[u8],
    head_dim: usize,
    out: &mut [f32],
) -> Result<()> {
    let q = quantizer(codec, head_dim)?;
    let code_bytes = q.code_bytes();
    let largest = page_norm(page)?;
    // each token decoded at unit norm, then scaled by its own
    let mut code = vec![0u8; code_bytes];
    code[..2].copy_from_slice(&f16::ONE.to_le_bytes());
    for (token, row) in page[PAGE_HEADER..]
        .chunks_exact(code_bytes - 1)
        .zip(out.chunks_exact_mut(head_dim))
    {
        code[2..].copy_from_slice(&token[1..]);
        q.decode_rows(&code, row)?;
        let norm = token_norm(largest, token[0]);
        row.iter_mut().for_each(|x| *x *= norm);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_bytes_round_trip_within_a_32nd_of_an_octave() {
        assert_eq!(token_norm(3.0, 0), 3.0);
        assert_eq!(token_norm(3.0, 16), 1.5);
        assert_eq!(token_norm(3.0, ZERO), 0.0);
        for (i, f) in FRACTIONS.iter().enumerate() {
            assert!((*f as f64 - 2f64.powf(-(i as f64) / 16.0)).abs() < 1e-7);
        }
        let largest = 7.25f32;
        let mut worst = 0f64;
        for i in 0..20_000 {
            // norms from the page's largest down to 2^−15 of it
            let norm = largest as f64 * 2f64.powf(-15.0 * i as f64 / 20_000.0);
            let back = token_norm(largest, norm_byte(largest, norm)) as f64;
            worst = worst.max((back / norm).log2().abs());
        }
        assert!(worst <= 1.0 / 32.0 + 1e-6, "{worst}");
        // far below the range: clamped, never above the page's largest or negative
        let tiny = token_norm(largest, norm_byte(largest, 1e-12));
        assert!(tiny > 0.0 && tiny < largest * 2e-5);
        assert_eq!(norm_byte(largest, 0.0), ZERO);
        assert_eq!(norm_byte(0.0, 0.0), ZERO);
    }

    #[test]
    fn pages_keep_directions_and_norms() {
        let codec = Codec::FibQuant { k: 2, n: 256 };
        let profile = codec.fibquant_profile(64).unwrap();
        let rows: Vec<f32> = (0..16 * 64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * (1.0 + (i / 64) as f32))
            .collect();
        let mut page = vec![0u8; page_bytes(profile, 16).unwrap()];
        assert_eq!(page.len(), 2 + 16 * 33);
        encode_page(codec, &rows, 64, &mut page).unwrap();
        let mut back = vec![0f32; rows.len()];
        decode_page(codec, &page, 64, &mut back).unwrap();
        for (x, y) in rows.chunks_exact(64).zip(back.chunks_exact(64)) {
            let err: f32 = x.iter().zip(y).map(|(a, b)| (a - b).powi(2)).sum();
            let norm: f32 = x.iter().map(|a| a * a).sum();
            assert!(err / norm < 0.02, "{}", err / norm);
        }
        // a corrupt header is an error, not a page of NaNs
        page[..2].copy_from_slice(&f16::NAN.to_le_bytes());
        assert!(decode_page(codec, &page, 64, &mut back).is_err());
        page[..2].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        assert!(decode_page(codec, &page, 64, &mut back).is_err());
    }
}
