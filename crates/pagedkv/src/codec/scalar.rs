//! Page encode/decode for every codec: the scalar ones here, FibQuant pages in `vector`. Scalar
//! codecs of one page (`block_size` tokens × `head_dim`, token-major f32 rows), DESIGN §5.
//!
//! Where codes and parameters lie in a page: [`super::page_layout`].
//!
//! Integer codecs are asymmetric: `x̂ = q·scale + zero` with `zero` the group minimum rounded
//! down to f16 and `scale` rounded up to f16, so every input lies inside the grid and the error is
//! at most half a step: `|x − x̂| ≤ scale/2` (plus f32 rounding). FP8 scales map the group's
//! largest magnitude onto the format's largest finite value (rounded up, so nothing saturates):
//! relative error ≤ 2⁻⁴ (e4m3) or 2⁻³ (e5m2), plus half the smallest subnormal step near zero.
//! Rounding is to nearest, ties to even. NaN or infinity in the input is an error.

use float8::{F8E4M3, F8E5M2};
use half::{bf16, f16};

pub(crate) use super::page_layout::code_bits;
use super::page_layout::PageLayout;
use super::{Codec, Role, VALUE_GROUP};
use crate::error::{KvError, Result};

/// Largest magnitude a scalar codec accepts: scales and zero points are f16.
pub const MAX_MAGNITUDE: f32 = 60_000.0;

/// Smallest f16 ≥ `v` (v finite, |v| ≤ 65504).
fn f16_up(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.to_f32() >= v {
        return h;
    }
    // step one ulp towards +inf
    if h.is_sign_negative() && h.to_f32() != 0.0 {
        f16::from_bits(h.to_bits() - 1)
    } else if h.to_f32() == 0.0 {
        f16::from_bits(1)
    } else {
        f16::from_bits(h.to_bits() + 1)
    }
}

/// Largest f16 ≤ `v`.
fn f16_down(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.to_f32() <= v {
        return h;
    }
    if h.is_sign_positive() && h.to_f32() != 0.0 {
        f16::from_bits(h.to_bits() - 1)
    } else if h.to_f32() == 0.0 {
        f16::from_bits(0x8001)
    } else {
        f16::from_bits(h.to_bits() + 1)
    }
}

fn put_f16(out: &mut [u8], idx: usize, v: f16) {
    out[idx * 2..idx * 2 + 2].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn get_f16(bytes: &[u8], idx: usize) -> f32 {
    f16::from_le_bytes([bytes[idx * 2], bytes[idx * 2 + 1]]).to_f32()
}

/// Levels of an integer codec: q ∈ 0..=levels.
fn levels(codec: Codec) -> u32 {
    (1 << code_bits(codec)) - 1
}

/// The page layout of a scalar codec (sizes already checked by [`check_page`]).
fn page_layout(codec: Codec, role: Role, block_size: usize, head_dim: usize) -> Result<PageLayout> {
    PageLayout::scalar(codec, role, block_size, head_dim)
        .ok_or(KvError::SizeOverflow { what: "page bytes" })
}

/// Asymmetric (scale, zero) covering `[min, max]` with `levels` steps, both as f16.
fn affine_params(min: f32, max: f32, levels: u32) -> (f16, f16) {
    let zero = f16_down(min);
    let scale = f16_up((max - zero.to_f32()) / levels as f32);
    (scale, zero)
}

/// `round((x − zero)/scale)` clamped to `0..=levels`, ties to even. The rounding adds and
/// subtracts 2²³ (exact for 0 ≤ v < 2²³ under IEEE round-to-nearest-even), which vectorizes
/// where `round_ties_even` would be a library call per element on baseline x86-64. A zero scale
/// (every element equals `zero`) gives 0/0 = NaN, which the saturating cast turns into code 0.
#[inline(always)]
fn quantize(x: f32, scale: f32, zero: f32, levels: u32) -> u8 {
    const ROUND: f32 = 8_388_608.0;
    let v = ((x - zero) / scale).clamp(0.0, levels as f32);
    ((v + ROUND) - ROUND) as u8
}

/// Integer codes and parameters of one page: keys per channel over the block's tokens (running
/// minima and maxima across rows), values per token in groups of `VALUE_GROUP` channels.
fn encode_int(
    codec: Codec,
    role: Role,
    rows: &[f32],
    head_dim: usize,
    codes: &mut [u8],
    params: &mut [u8],
) {
    let lv = levels(codec);
    match role {
        Role::Key => {
            let mut lo = vec![f32::INFINITY; head_dim];
            let mut hi = vec![f32::NEG_INFINITY; head_dim];
            for row in rows.chunks_exact(head_dim) {
                for ((l, h), x) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
                    *l = l.min(*x);
                    *h = h.max(*x);
                }
            }
            let mut scale = vec![0f32; head_dim];
            let mut zero = vec![0f32; head_dim];
            for c in 0..head_dim {
                let (s, z) = affine_params(lo[c], hi[c], lv);
                put_f16(params, 2 * c, s);
                put_f16(params, 2 * c + 1, z);
                (scale[c], zero[c]) = (s.to_f32(), z.to_f32());
            }
            for (row, out) in rows
                .chunks_exact(head_dim)
                .zip(codes.chunks_exact_mut(head_dim))
            {
                for (((q, x), s), z) in out.iter_mut().zip(row).zip(&scale).zip(&zero) {
                    *q = quantize(*x, *s, *z, lv);
                }
            }
        }
        Role::Value => {
            let groups = head_dim.div_ceil(VALUE_GROUP);
            for (t, (row, out)) in rows
                .chunks_exact(head_dim)
                .zip(codes.chunks_exact_mut(head_dim))
                .enumerate()
            {
                for (g, (xs, qs)) in row
                    .chunks(VALUE_GROUP)
                    .zip(out.chunks_mut(VALUE_GROUP))
                    .enumerate()
                {
                    let (min, max) = xs
                        .iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), x| {
                            (lo.min(*x), hi.max(*x))
                        });
                    let (s, z) = affine_params(min, max, lv);
                    put_f16(params, 2 * (t * groups + g), s);
                    put_f16(params, 2 * (t * groups + g) + 1, z);
                    let (s, z) = (s.to_f32(), z.to_f32());
                    for (q, x) in qs.iter_mut().zip(xs) {
                        *q = quantize(*x, s, z, lv);
                    }
                }
            }
        }
    }
}

/// The groups of one page that share one parameter set, as element indices. Keys: one group per
/// channel, spanning every token. Values: per token, per `value_group` channels (32 for the
/// integer codecs, the whole row for fp8).
fn for_each_group(
    role: Role,
    block_size: usize,
    head_dim: usize,
    value_group: usize,
    mut f: impl FnMut(usize, &mut dyn Iterator<Item = usize>),
) {
    match role {
        Role::Key => {
            for c in 0..head_dim {
                f(c, &mut (0..block_size).map(move |t| t * head_dim + c));
            }
        }
        Role::Value => {
            let groups = head_dim.div_ceil(value_group);
            for t in 0..block_size {
                for g in 0..groups {
                    let range = t * head_dim + g * value_group
                        ..t * head_dim + ((g + 1) * value_group).min(head_dim);
                    f(t * groups + g, &mut range.into_iter());
                }
            }
        }
    }
}

/// Largest finite value of the format (OCP FP8: e4m3 code 0x7E = 448, e5m2 code 0x7B = 57344).
/// Not the `float8` crate's `MAX` constants: in 0.7.0 they are one code short (416, 49152).
fn fp8_max(codec: Codec) -> f32 {
    if codec == Codec::Fp8E4m3 {
        448.0
    } else {
        57_344.0
    }
}

fn fp8_encode(codec: Codec, x: f32) -> u8 {
    if codec == Codec::Fp8E4m3 {
        F8E4M3::from_f32(x).to_bits()
    } else {
        F8E5M2::from_f32(x).to_bits()
    }
}

/// Decode table of an fp8 format: all 256 codes as f32, built once per process (page decoding
/// and attention both look codes up in it).
pub fn fp8_table(codec: Codec) -> &'static [f32; 256] {
    static E4M3: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    static E5M2: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    if codec == Codec::Fp8E4m3 {
        E4M3.get_or_init(|| std::array::from_fn(|code| F8E4M3::from_bits(code as u8).to_f32()))
    } else {
        E5M2.get_or_init(|| std::array::from_fn(|code| F8E5M2::from_bits(code as u8).to_f32()))
    }
}

fn check_page(
    codec: Codec,
    role: Role,
    block_size: usize,
    head_dim: usize,
    rows: usize,
    bytes: usize,
) -> Result<()> {
    let elements = block_size * head_dim;
    if rows != elements {
        return Err(KvError::ShapeMismatch {
            what: "page rows",
            expected: elements,
            got: rows,
        });
    }
    let expected = codec.page_bytes(role, block_size, head_dim)?;
    if bytes != expected {
        return Err(KvError::ShapeMismatch {
            what: "page bytes",
            expected,
            got: bytes,
        });
    }
    Ok(())
}

/// True when no value is NaN or infinite: a reduction without an early exit, which
/// vectorizes (`all` stops at the first bad value and so checks one value at a time).
fn all_finite(values: &[f32]) -> bool {
    values.iter().fold(true, |finite, x| finite & x.is_finite())
}

/// Encodes one page of f32 rows (`block_size × head_dim`, token-major) into `out`, which must be
/// exactly `codec.page_bytes(role, …)` long. FibQuant pages are encoded by the fibquant crate.
pub fn encode_page(
    codec: Codec,
    role: Role,
    rows: &[f32],
    block_size: usize,
    head_dim: usize,
    out: &mut [u8],
) -> Result<()> {
    check_page(codec, role, block_size, head_dim, rows.len(), out.len())?;
    if !all_finite(rows) {
        return Err(KvError::NonFinite {
            what: "page to encode",
        });
    }
    if !codec.is_full_precision()
        && !matches!(codec, Codec::FibQuant { .. })
        && rows.iter().any(|x| x.abs() > MAX_MAGNITUDE)
    {
        return Err(KvError::ValueOutOfRange {
            codec: codec.to_string(),
            max: MAX_MAGNITUDE,
        });
    }
    if let Codec::FibQuant { .. } = codec {
        return super::vector::encode_page(codec, rows, head_dim, out);
    }
    let data_len = page_layout(codec, role, block_size, head_dim)?.code_bytes;
    let (data, params) = out.split_at_mut(data_len);
    match codec {
        Codec::F32 => rows
            .iter()
            .zip(data.chunks_exact_mut(4))
            .for_each(|(x, o)| o.copy_from_slice(&x.to_le_bytes())),
        Codec::F16 => rows
            .iter()
            .zip(data.chunks_exact_mut(2))
            .for_each(|(x, o)| o.copy_from_slice(&f16::from_f32(*x).to_le_bytes())),
        Codec::Bf16 => rows
            .iter()
            .zip(data.chunks_exact_mut(2))
            .for_each(|(x, o)| o.copy_from_slice(&bf16::from_f32(*x).to_le_bytes())),
        Codec::Int8 | Codec::Int4 | Codec::Int2 => {
            let mut codes = vec![0u8; rows.len()];
            encode_int(codec, role, rows, head_dim, &mut codes, params);
            pack_codes(codec, role, &codes, block_size, head_dim, data);
        }
        Codec::Fp8E4m3 | Codec::Fp8E5m2 => {
            // the largest magnitude per channel (keys) or per token (values)
            let groups = if role == Role::Key {
                head_dim
            } else {
                block_size
            };
            let mut amax = vec![0f32; groups];
            for (t, row) in rows.chunks_exact(head_dim).enumerate() {
                if role == Role::Key {
                    amax.iter_mut()
                        .zip(row)
                        .for_each(|(m, x)| *m = m.max(x.abs()));
                } else {
                    amax[t] = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                }
            }
            let top = fp8_max(codec);
            let mut inv = vec![0f32; groups];
            for (g, (m, i)) in amax.iter().zip(inv.iter_mut()).enumerate() {
                let scale = if *m > 0.0 { f16_up(m / top) } else { f16::ONE };
                put_f16(params, g, scale);
                *i = 1.0 / scale.to_f32();
            }
            let mut codes = vec![0u8; rows.len()];
            for (t, (row, out)) in rows
                .chunks_exact(head_dim)
                .zip(codes.chunks_exact_mut(head_dim))
                .enumerate()
            {
                for (c, (x, o)) in row.iter().zip(out.iter_mut()).enumerate() {
                    let inv = if role == Role::Key { inv[c] } else { inv[t] };
                    // x·(1/s) may round just past the top code; the crate saturates to it
                    *o = fp8_encode(codec, x * inv);
                }
            }
            pack_codes(codec, role, &codes, block_size, head_dim, data);
        }
        Codec::FibQuant { .. } => unreachable!("dispatched before the split"),
    }
    Ok(())
}

/// Integer pages: codes unpacked a row at a time, then `q·scale + zero` with the row's (values)
/// or the channel's (keys) parameters, in plain loops the compiler vectorizes.
/// Stores one-byte codes (token-major, `t·d + c`; integer or fp8) in a page's data part. Keys
/// are stored channel-major — a channel's codes over the block's tokens side by side, so
/// attention scores a whole block with one vector operation per channel; values stay
/// token-major. Int4 packs two codes per byte, low nibble first (two tokens of a key channel,
/// two channels of a value row); int2 packs four, lowest bits first.
fn pack_codes(codec: Codec, role: Role, codes: &[u8], bs: usize, d: usize, data: &mut [u8]) {
    let code = |i: usize, j: usize| match role {
        // i: channel, j: token
        Role::Key if j < bs => codes[j * d + i],
        // i: token, j: channel
        Role::Value if j < d => codes[i * d + j],
        // padding of an odd count in the last byte
        _ => 0,
    };
    let (outer, inner) = match role {
        Role::Key => (d, bs),
        Role::Value => (bs, d),
    };
    let bits = code_bits(codec);
    let per_byte = 8 / bits;
    let row = inner.div_ceil(per_byte);
    for i in 0..outer {
        for (b, byte) in data[i * row..(i + 1) * row].iter_mut().enumerate() {
            *byte = (0..per_byte).fold(0, |acc, k| acc | code(i, per_byte * b + k) << (bits * k));
        }
    }
}

/// The inverse of [`pack_codes`]: one code per element, token-major.
pub(crate) fn unpack_codes(
    codec: Codec,
    role: Role,
    data: &[u8],
    bs: usize,
    d: usize,
    out: &mut [u8],
) {
    let (outer, inner) = match role {
        Role::Key => (d, bs),
        Role::Value => (bs, d),
    };
    let bits = code_bits(codec);
    let per_byte = 8 / bits;
    let mask = ((1u16 << bits) - 1) as u8;
    let row = inner.div_ceil(per_byte);
    for i in 0..outer {
        let bytes = &data[i * row..(i + 1) * row];
        for j in 0..inner {
            let q = (bytes[j / per_byte] >> (bits * (j % per_byte))) & mask;
            let at = match role {
                Role::Key => j * d + i,
                Role::Value => i * d + j,
            };
            out[at] = q;
        }
    }
}

fn decode_int(
    codec: Codec,
    role: Role,
    data: &[u8],
    params: &[u8],
    head_dim: usize,
    out: &mut [f32],
) {
    let block_size = out.len() / head_dim;
    let mut all = vec![0u8; out.len()];
    unpack_codes(codec, role, data, block_size, head_dim, &mut all);
    let groups = head_dim.div_ceil(VALUE_GROUP);
    // per-channel (keys) parameters are shared by every row of the page
    let (mut scale, mut zero) = (vec![0f32; head_dim], vec![0f32; head_dim]);
    if role == Role::Key {
        for c in 0..head_dim {
            scale[c] = get_f16(params, 2 * c);
            zero[c] = get_f16(params, 2 * c + 1);
        }
    }
    for (t, row) in out.chunks_exact_mut(head_dim).enumerate() {
        let codes = &all[t * head_dim..(t + 1) * head_dim];
        row.iter_mut().zip(codes).for_each(|(o, q)| *o = *q as f32);
        if role == Role::Value {
            for g in 0..groups {
                let (s, z) = (
                    get_f16(params, 2 * (t * groups + g)),
                    get_f16(params, 2 * (t * groups + g) + 1),
                );
                let end = ((g + 1) * VALUE_GROUP).min(head_dim);
                row[g * VALUE_GROUP..end]
                    .iter_mut()
                    .for_each(|x| *x = *x * s + z);
            }
        } else {
            for ((x, s), z) in row.iter_mut().zip(&scale).zip(&zero) {
                *x = *x * s + z;
            }
        }
    }
}

/// Decodes one page into f32 rows (`block_size × head_dim`, token-major).
pub fn decode_page(
    codec: Codec,
    role: Role,
    page: &[u8],
    block_size: usize,
    head_dim: usize,
    out: &mut [f32],
) -> Result<()> {
    check_page(codec, role, block_size, head_dim, out.len(), page.len())?;
    if let Codec::FibQuant { .. } = codec {
        return super::vector::decode_page(codec, page, head_dim, out);
    }
    let data_len = page_layout(codec, role, block_size, head_dim)?.code_bytes;
    let (data, params) = page.split_at(data_len);
    match codec {
        Codec::F32 => data
            .chunks_exact(4)
            .zip(out.iter_mut())
            .for_each(|(b, o)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Codec::F16 => data
            .chunks_exact(2)
            .zip(out.iter_mut())
            .for_each(|(b, o)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        Codec::Bf16 => data
            .chunks_exact(2)
            .zip(out.iter_mut())
            .for_each(|(b, o)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        Codec::Int8 | Codec::Int4 | Codec::Int2 => {
            decode_int(codec, role, data, params, head_dim, out)
        }
        Codec::Fp8E4m3 | Codec::Fp8E5m2 => {
            let table = fp8_table(codec);
            let mut codes = vec![0u8; out.len()];
            unpack_codes(codec, role, data, block_size, head_dim, &mut codes);
            for_each_group(role, block_size, head_dim, head_dim, |g, idx| {
                let scale = get_f16(params, g);
                for i in idx {
                    out[i] = table[codes[i] as usize] * scale;
                }
            });
        }
        Codec::FibQuant { .. } => unreachable!("dispatched before the split"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::synthetic::{gaussian, outliers};

    const BS: usize = 16;

    fn round_trip(codec: Codec, role: Role, rows: &[f32], d: usize) -> (Vec<u8>, Vec<f32>) {
        let mut page = vec![0u8; codec.page_bytes(role, BS, d).unwrap()];
        encode_page(codec, role, rows, BS, d, &mut page).unwrap();
        let mut back = vec![0f32; rows.len()];
        decode_page(codec, role, &page, BS, d, &mut back).unwrap();
        (page, back)
    }

    /// The worst-case error each codec states, per element, from the page's own parameters.
    fn bound(codec: Codec, role: Role, page: &[u8], rows: &[f32], d: usize) -> Vec<f32> {
        let params = &page[page_layout(codec, role, BS, d).unwrap().code_bytes..];
        let mut b = vec![0f32; rows.len()];
        match codec {
            Codec::F32 => {}
            Codec::F16 => rows
                .iter()
                .zip(&mut b)
                .for_each(|(x, o)| *o = x.abs() * 2f32.powi(-11) + 2f32.powi(-25)),
            Codec::Bf16 => rows
                .iter()
                .zip(&mut b)
                .for_each(|(x, o)| *o = x.abs() * 2f32.powi(-8)),
            Codec::Int8 | Codec::Int4 | Codec::Int2 => {
                for_each_group(role, BS, d, VALUE_GROUP, |g, idx| {
                    let scale = get_f16(params, 2 * g);
                    for i in idx {
                        b[i] = 0.5 * scale * (1.0 + 1e-5) + 1e-6 * rows[i].abs();
                    }
                })
            }
            Codec::Fp8E4m3 | Codec::Fp8E5m2 => {
                let (rel, sub) = if codec == Codec::Fp8E4m3 {
                    (2f32.powi(-4), 2f32.powi(-10))
                } else {
                    (2f32.powi(-3), 2f32.powi(-17))
                };
                for_each_group(role, BS, d, d, |g, idx| {
                    let scale = get_f16(params, g);
                    for i in idx {
                        b[i] = rel * (1.0 + 1e-5) * rows[i].abs() + sub * scale * (1.0 + 1e-5);
                    }
                });
            }
            Codec::FibQuant { .. } => unreachable!(),
        }
        b
    }

    const SCALAR: [Codec; 8] = Codec::FIXED;

    #[test]
    fn round_trip_errors_stay_within_stated_bounds() {
        for codec in SCALAR {
            for role in [Role::Key, Role::Value] {
                for d in [64, 128, 40] {
                    for (name, rows) in [
                        ("gaussian", gaussian(BS * d, d as u64)),
                        ("outliers", outliers(BS, d, d as u64 + 7)),
                    ] {
                        let (page, back) = round_trip(codec, role, &rows, d);
                        let b = bound(codec, role, &page, &rows, d);
                        for i in 0..rows.len() {
                            let err = (rows[i] - back[i]).abs();
                            assert!(err <= b[i], "{codec} {role:?} d={d} {name}: element {i}: |{} - {}| = {err} > {}", rows[i], back[i], b[i]);
                        }
                    }
                }
            }
        }
    }

    /// Odd block sizes and head sizes: int4 (int2) keys pack two (four) tokens of a channel per
    /// byte and values two (four) channels of a token, each padded on its own axis.
    #[test]
    fn odd_shapes_round_trip_in_both_packings() {
        for (bs, d) in [(3, 5), (1, 7), (5, 2), (6, 3)] {
            let rows = gaussian(bs * d, 11);
            for codec in [Codec::Int2, Codec::Int4, Codec::Int8] {
                for role in [Role::Key, Role::Value] {
                    let mut page = vec![0u8; codec.page_bytes(role, bs, d).unwrap()];
                    encode_page(codec, role, &rows, bs, d, &mut page).unwrap();
                    let mut back = vec![0f32; rows.len()];
                    decode_page(codec, role, &page, bs, d, &mut back).unwrap();
                    let range = rows.iter().fold(0f32, |m, x| m.max(x.abs())) * 2.0;
                    let step = range / levels(codec) as f32;
                    for (a, b) in rows.iter().zip(&back) {
                        assert!(
                            (a - b).abs() <= step * 0.51 + 1e-3,
                            "{codec} {role:?} {bs}×{d}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn constant_and_zero_pages_are_exact() {
        for codec in [Codec::Int8, Codec::Int4, Codec::Int2] {
            for role in [Role::Key, Role::Value] {
                for v in [0.0f32, 1.5, -3.25] {
                    let rows = vec![v; BS * 64];
                    let (_, back) = round_trip(codec, role, &rows, 64);
                    assert!(
                        back.iter().all(|x| *x == v),
                        "{codec} {role:?} constant {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        for codec in SCALAR {
            let mut rows = gaussian(BS * 64, 1);
            let mut page = vec![0u8; codec.page_bytes(Role::Key, BS, 64).unwrap()];
            rows[5] = f32::NAN;
            assert_eq!(
                encode_page(codec, Role::Key, &rows, BS, 64, &mut page),
                Err(KvError::NonFinite {
                    what: "page to encode"
                })
            );
            rows[5] = f32::INFINITY;
            assert!(encode_page(codec, Role::Key, &rows, BS, 64, &mut page).is_err());
            rows[5] = 1.0;
            assert!(matches!(
                encode_page(codec, Role::Key, &rows[1..], BS, 64, &mut page),
                Err(KvError::ShapeMismatch { .. })
            ));
            assert!(matches!(
                encode_page(codec, Role::Value, &rows, BS, 64, &mut page[1..]),
                Err(KvError::ShapeMismatch { .. })
            ));
            if !codec.is_full_precision() {
                rows[5] = 1e6;
                assert!(matches!(
                    encode_page(codec, Role::Key, &rows, BS, 64, &mut page),
                    Err(KvError::ValueOutOfRange { .. })
                ));
            }
        }
    }

    /// fp8 decoding by the formula of the OCP FP8 formats, independent of the crate.
    fn fp8_by_formula(code: u8, exp_bits: u32, man_bits: u32, e4m3: bool) -> f32 {
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let exp = ((code as u32) >> man_bits) & ((1 << exp_bits) - 1);
        let man = (code as u32) & ((1 << man_bits) - 1);
        let bias = (1 << (exp_bits - 1)) - 1;
        let all_ones = (1 << exp_bits) - 1;
        if e4m3 && exp == all_ones && man == (1 << man_bits) - 1 {
            return f32::NAN;
        }
        if !e4m3 && exp == all_ones {
            return if man == 0 {
                sign * f32::INFINITY
            } else {
                f32::NAN
            };
        }
        let frac = man as f32 / (1 << man_bits) as f32;
        if exp == 0 {
            sign * frac * 2f32.powi(1 - bias)
        } else {
            sign * (1.0 + frac) * 2f32.powi(exp as i32 - bias)
        }
    }

    #[test]
    fn fp8_tables_agree_with_the_reference_crate_on_all_256_codes() {
        for (codec, e, m, e4m3) in [(Codec::Fp8E4m3, 4, 3, true), (Codec::Fp8E5m2, 5, 2, false)] {
            let table = fp8_table(codec);
            for code in 0..=255u8 {
                let formula = fp8_by_formula(code, e, m, e4m3);
                let ours = table[code as usize];
                if formula.is_nan() {
                    assert!(ours.is_nan(), "{codec} code {code:#04x}");
                    continue;
                }
                assert_eq!(
                    ours.to_bits(),
                    formula.to_bits(),
                    "{codec} code {code:#04x}"
                );
                if formula.is_finite() {
                    // encoding a representable value gives its code back (±0 both map to their own sign)
                    assert_eq!(fp8_encode(codec, ours), code, "{codec} re-encode of {ours}");
                }
            }
        }
        assert_eq!(fp8_table(Codec::Fp8E4m3)[0x7E], fp8_max(Codec::Fp8E4m3));
        assert_eq!(fp8_table(Codec::Fp8E5m2)[0x7B], fp8_max(Codec::Fp8E5m2));
        // values past the top saturate to it (the scale is rounded up, so only rounding reaches it)
        assert_eq!(fp8_encode(Codec::Fp8E4m3, 470.0), 0x7E);
        assert_eq!(fp8_encode(Codec::Fp8E5m2, 60_000.0), 0x7B);
    }

    #[test]
    fn f16_directed_rounding() {
        for v in [0.1f32, -0.1, 1e-7, -1e-7, 3.0, 65000.0, 0.0] {
            assert!(f16_up(v).to_f32() >= v && f16_down(v).to_f32() <= v, "{v}");
            assert!(
                f16_up(v).to_f32() - f16_down(v).to_f32() <= v.abs() * 2f32.powi(-10) + 6e-8,
                "{v}"
            );
        }
    }
}
