//! The typed and packed arenas of one layer's keys or values, and the borrowed pages read
//! from them.

use half::{bf16, f16};

use crate::codec::scalar::decode_page;
use crate::codec::{Codec, Role};
use crate::error::Result;

/// One layer's keys or values.
#[derive(Debug, Clone)]
pub(super) enum Arena {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
    /// Packed pages of a codec, `page_bytes` each.
    Packed(Vec<u8>),
}

/// A borrowed page in its stored form. Rows are token-major (`[token][dim]`) except the key
/// pages of full-precision arenas, which are channel-major (`[dim][token]`): attention then
/// scores a whole block per channel with one vector FMA, instead of one horizontal sum per
/// token.
#[derive(Debug, Clone, Copy)]
pub enum PageRef<'a> {
    /// f32 elements, token-major (values; the staging rows of an open block).
    F32(&'a [f32]),
    /// f16 elements, token-major.
    F16(&'a [f16]),
    /// bf16 elements, token-major.
    Bf16(&'a [bf16]),
    /// A key page of f32 elements, channel-major.
    F32T(&'a [f32]),
    /// A key page of f16 elements, channel-major.
    F16T(&'a [f16]),
    /// A key page of bf16 elements, channel-major.
    Bf16T(&'a [bf16]),
    /// A sealed, packed page.
    Packed {
        /// Its codec.
        codec: Codec,
        /// Keys or values (the codecs group them differently).
        role: Role,
        /// The page's bytes.
        bytes: &'a [u8],
    },
}

impl PageRef<'_> {
    /// Writes the first `len` elements (whole tokens) of the page as f32 into `out[..len]`.
    pub fn to_f32(&self, block_size: usize, head_dim: usize, out: &mut [f32]) -> Result<()> {
        let len = out.len();
        match self {
            PageRef::F32(s) => out.copy_from_slice(&s[..len]),
            PageRef::F16(s) => s[..len].iter().zip(out).for_each(|(x, o)| *o = x.to_f32()),
            PageRef::Bf16(s) => s[..len].iter().zip(out).for_each(|(x, o)| *o = x.to_f32()),
            PageRef::F32T(s) => untranspose(s, block_size, head_dim, out, |x| *x),
            PageRef::F16T(s) => untranspose(s, block_size, head_dim, out, |x| x.to_f32()),
            PageRef::Bf16T(s) => untranspose(s, block_size, head_dim, out, |x| x.to_f32()),
            // sealed blocks are full, so attention always asks for the whole page
            PageRef::Packed { codec, role, bytes } if len == block_size * head_dim => {
                decode_page(*codec, *role, bytes, block_size, head_dim, out)?;
            }
            PageRef::Packed { codec, role, bytes } => {
                let mut full = vec![0f32; block_size * head_dim];
                decode_page(*codec, *role, bytes, block_size, head_dim, &mut full)?;
                out.copy_from_slice(&full[..len]);
            }
        }
        Ok(())
    }
}

/// Token-major rows (`out`: whole tokens) from a channel-major page of `block_size` columns.
fn untranspose<T>(
    page: &[T],
    block_size: usize,
    head_dim: usize,
    out: &mut [f32],
    to_f32: impl Fn(&T) -> f32,
) {
    for (t, row) in out.chunks_exact_mut(head_dim).enumerate() {
        for (c, o) in row.iter_mut().enumerate() {
            *o = to_f32(&page[c * block_size + t]);
        }
    }
}

impl Arena {
    pub(super) fn typed(codec: Codec, elements: usize) -> Self {
        match codec {
            Codec::F32 => Arena::F32(vec![0.0; elements]),
            Codec::F16 => Arena::F16(vec![f16::ZERO; elements]),
            _ => Arena::Bf16(vec![bf16::ZERO; elements]),
        }
    }

    pub(super) fn write(&mut self, offset: usize, src: &[f32]) {
        let range = offset..offset + src.len();
        match self {
            Arena::F32(a) => a[range].copy_from_slice(src),
            Arena::F16(a) => a[range]
                .iter_mut()
                .zip(src)
                .for_each(|(o, x)| *o = f16::from_f32(*x)),
            Arena::Bf16(a) => a[range]
                .iter_mut()
                .zip(src)
                .for_each(|(o, x)| *o = bf16::from_f32(*x)),
            Arena::Packed(_) => unreachable!("packed arenas are written by sealing"),
        }
    }

    /// Writes `src` with a stride: element c at `offset + c·stride` (a key into its channel
    /// columns).
    pub(super) fn write_strided(&mut self, offset: usize, stride: usize, src: &[f32]) {
        match self {
            Arena::F32(a) => src
                .iter()
                .enumerate()
                .for_each(|(c, x)| a[offset + c * stride] = *x),
            Arena::F16(a) => src
                .iter()
                .enumerate()
                .for_each(|(c, x)| a[offset + c * stride] = f16::from_f32(*x)),
            Arena::Bf16(a) => src
                .iter()
                .enumerate()
                .for_each(|(c, x)| a[offset + c * stride] = bf16::from_f32(*x)),
            Arena::Packed(_) => unreachable!("packed arenas are written by sealing"),
        }
    }

    pub(super) fn element_bytes(&self) -> usize {
        match self {
            Arena::F32(_) => 4,
            Arena::F16(_) | Arena::Bf16(_) => 2,
            Arena::Packed(_) => 1,
        }
    }

    /// Loads little-endian elements from `bytes` at element `offset` (typed arenas).
    pub(super) fn load_le(&mut self, offset: usize, bytes: &[u8]) {
        match self {
            Arena::F32(a) => a[offset..]
                .iter_mut()
                .zip(bytes.chunks_exact(4))
                .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            Arena::F16(a) => a[offset..]
                .iter_mut()
                .zip(bytes.chunks_exact(2))
                .for_each(|(o, b)| *o = f16::from_le_bytes([b[0], b[1]])),
            Arena::Bf16(a) => a[offset..]
                .iter_mut()
                .zip(bytes.chunks_exact(2))
                .for_each(|(o, b)| *o = bf16::from_le_bytes([b[0], b[1]])),
            Arena::Packed(a) => a[offset..offset + bytes.len()].copy_from_slice(bytes),
        }
    }

    pub(super) fn slice(&self, offset: usize, len: usize) -> &[u8] {
        match self {
            Arena::Packed(a) => &a[offset..offset + len],
            _ => unreachable!("typed arenas are read through PageRef"),
        }
    }

    pub(super) fn copy_within(&mut self, src: usize, len: usize, dst: usize) {
        match self {
            Arena::F32(a) => a.copy_within(src..src + len, dst),
            Arena::F16(a) => a.copy_within(src..src + len, dst),
            Arena::Bf16(a) => a.copy_within(src..src + len, dst),
            Arena::Packed(a) => a.copy_within(src..src + len, dst),
        }
    }
}
