//! Per-layer arenas of K and V addressed by block id (DESIGN §2), for the full-precision codecs.
//!
//! ```text
//!  keys[layer]:  [block 0: head 0 page | head 1 page | ...][block 1: ...] ...
//!  page:         [slot 0: d0 .. d(h-1)][slot 1] ... [slot block_size-1]
//!  element offset = ((block · kv_heads + head) · block_size + slot) · head_dim + dim
//! ```
//!
//! A block's data for one layer is contiguous (`kv_heads` pages), so copy-on-write is one
//! `copy_within` per layer and arena.

use half::{bf16, f16};

use crate::block::BlockId;
use crate::codec::Codec;
use crate::error::{KvError, Result};
use crate::layout::KvLayout;

/// One layer's keys or values in the element type of its codec.
#[derive(Debug, Clone)]
enum Arena {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

/// A borrowed page (or any run of elements) in its stored element type.
#[derive(Debug, Clone, Copy)]
pub enum PageRef<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
    /// bf16 elements.
    Bf16(&'a [bf16]),
}

impl PageRef<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            PageRef::F32(s) => s.len(),
            PageRef::F16(s) => s.len(),
            PageRef::Bf16(s) => s.len(),
        }
    }
    /// True when the page has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Converts element `i` to f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            PageRef::F32(s) => s[i],
            PageRef::F16(s) => s[i].to_f32(),
            PageRef::Bf16(s) => s[i].to_f32(),
        }
    }
    /// Converts all elements into `out` (which must have the same length).
    pub fn to_f32(&self, out: &mut [f32]) {
        match self {
            PageRef::F32(s) => out.copy_from_slice(s),
            PageRef::F16(s) => s.iter().zip(out).for_each(|(x, o)| *o = x.to_f32()),
            PageRef::Bf16(s) => s.iter().zip(out).for_each(|(x, o)| *o = x.to_f32()),
        }
    }
}

impl Arena {
    fn new(codec: Codec, elements: usize) -> Result<Self> {
        Ok(match codec {
            Codec::F32 => Arena::F32(vec![0.0; elements]),
            Codec::F16 => Arena::F16(vec![f16::ZERO; elements]),
            Codec::Bf16 => Arena::Bf16(vec![bf16::ZERO; elements]),
            other => {
                return Err(KvError::UnsupportedCodec {
                    codec: other.to_string(),
                    reason: "the block arena stores full-precision codecs only",
                })
            }
        })
    }

    fn write(&mut self, offset: usize, src: &[f32]) {
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
        }
    }

    fn slice(&self, offset: usize, len: usize) -> PageRef<'_> {
        let range = offset..offset + len;
        match self {
            Arena::F32(a) => PageRef::F32(&a[range]),
            Arena::F16(a) => PageRef::F16(&a[range]),
            Arena::Bf16(a) => PageRef::Bf16(&a[range]),
        }
    }

    fn copy_within(&mut self, src: usize, len: usize, dst: usize) {
        match self {
            Arena::F32(a) => a.copy_within(src..src + len, dst),
            Arena::F16(a) => a.copy_within(src..src + len, dst),
            Arena::Bf16(a) => a.copy_within(src..src + len, dst),
        }
    }
}

/// K and V arenas of every layer for `num_blocks` blocks.
#[derive(Debug, Clone)]
pub struct KvStorage {
    layout: KvLayout,
    num_blocks: usize,
    keys: Vec<Arena>,
    values: Vec<Arena>,
}

impl KvStorage {
    /// Allocates zeroed arenas. Both codecs must be full precision (f32, f16, bf16).
    pub fn new(layout: KvLayout, num_blocks: usize) -> Result<Self> {
        let elements = num_blocks
            .checked_mul(layout.kv_heads())
            .and_then(|n| n.checked_mul(layout.page_elements()))
            .ok_or(KvError::SizeOverflow {
                what: "arena elements",
            })?;
        let mut keys = Vec::with_capacity(layout.layers());
        let mut values = Vec::with_capacity(layout.layers());
        for _ in 0..layout.layers() {
            keys.push(Arena::new(layout.key_codec(), elements)?);
            values.push(Arena::new(layout.value_codec(), elements)?);
        }
        Ok(Self {
            layout,
            num_blocks,
            keys,
            values,
        })
    }

    /// The layout of the stored data.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Elements of one block in one layer's arena.
    fn block_elements(&self) -> usize {
        self.layout.kv_heads() * self.layout.page_elements()
    }

    fn check(&self, layer: usize, block: BlockId) -> Result<()> {
        if layer >= self.layout.layers() {
            return Err(KvError::IndexOutOfRange {
                what: "layer",
                index: layer,
                limit: self.layout.layers(),
            });
        }
        if block.index() >= self.num_blocks {
            return Err(KvError::InvalidBlock(block));
        }
        Ok(())
    }

    /// Writes one token's K and V (each `kv_heads × head_dim`, head-major) into `slot` of `block`.
    pub fn write_token(
        &mut self,
        layer: usize,
        block: BlockId,
        slot: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        self.check(layer, block)?;
        let width = self.layout.token_width();
        for (what, got) in [("key row", k.len()), ("value row", v.len())] {
            if got != width {
                return Err(KvError::ShapeMismatch {
                    what,
                    expected: width,
                    got,
                });
            }
        }
        if slot >= self.layout.block_size() {
            return Err(KvError::IndexOutOfRange {
                what: "slot",
                index: slot,
                limit: self.layout.block_size(),
            });
        }
        let d = self.layout.head_dim();
        for head in 0..self.layout.kv_heads() {
            let offset = self.page_offset(block, head) + slot * d;
            self.keys[layer].write(offset, &k[head * d..(head + 1) * d]);
            self.values[layer].write(offset, &v[head * d..(head + 1) * d]);
        }
        Ok(())
    }

    /// Reads one token's K and V back as f32 (head-major), e.g. for tests and tiers.
    pub fn read_token(
        &self,
        layer: usize,
        block: BlockId,
        slot: usize,
        k: &mut [f32],
        v: &mut [f32],
    ) -> Result<()> {
        self.check(layer, block)?;
        let width = self.layout.token_width();
        for (what, got) in [("key row", k.len()), ("value row", v.len())] {
            if got != width {
                return Err(KvError::ShapeMismatch {
                    what,
                    expected: width,
                    got,
                });
            }
        }
        let d = self.layout.head_dim();
        for head in 0..self.layout.kv_heads() {
            let offset = self.page_offset(block, head) + slot * d;
            self.keys[layer]
                .slice(offset, d)
                .to_f32(&mut k[head * d..(head + 1) * d]);
            self.values[layer]
                .slice(offset, d)
                .to_f32(&mut v[head * d..(head + 1) * d]);
        }
        Ok(())
    }

    /// The key page of (layer, block, kv head): `block_size × head_dim` contiguous elements.
    pub fn key_page(&self, layer: usize, block: BlockId, head: usize) -> Result<PageRef<'_>> {
        self.check_page(layer, block, head)?;
        Ok(self.keys[layer].slice(self.page_offset(block, head), self.layout.page_elements()))
    }

    /// The value page of (layer, block, kv head).
    pub fn value_page(&self, layer: usize, block: BlockId, head: usize) -> Result<PageRef<'_>> {
        self.check_page(layer, block, head)?;
        Ok(self.values[layer].slice(self.page_offset(block, head), self.layout.page_elements()))
    }

    /// Copies every layer's K and V of `src` into `dst` (copy-on-write).
    pub fn copy_block(&mut self, src: BlockId, dst: BlockId) -> Result<()> {
        self.check(0, src)?;
        self.check(0, dst)?;
        let len = self.block_elements();
        for arena in self.keys.iter_mut().chain(self.values.iter_mut()) {
            arena.copy_within(src.index() * len, len, dst.index() * len);
        }
        Ok(())
    }

    fn check_page(&self, layer: usize, block: BlockId, head: usize) -> Result<()> {
        self.check(layer, block)?;
        if head >= self.layout.kv_heads() {
            return Err(KvError::IndexOutOfRange {
                what: "kv head",
                index: head,
                limit: self.layout.kv_heads(),
            });
        }
        Ok(())
    }

    fn page_offset(&self, block: BlockId, head: usize) -> usize {
        (block.index() * self.layout.kv_heads() + head) * self.layout.page_elements()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::LayoutSpec;

    fn layout(codec: Codec) -> KvLayout {
        let mut spec = LayoutSpec::new(2, 2, 4, 4, codec);
        spec.block_size = 2;
        KvLayout::new(spec).unwrap()
    }

    #[test]
    fn token_lands_in_its_page_and_slot() {
        let mut s = KvStorage::new(layout(Codec::F32), 3).unwrap();
        let k: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let v: Vec<f32> = (0..8).map(|x| -(x as f32)).collect();
        s.write_token(1, BlockId(2), 1, &k, &v).unwrap();
        let PageRef::F32(page) = s.key_page(1, BlockId(2), 1).unwrap() else {
            panic!()
        };
        assert_eq!(page, &[0.0, 0.0, 0.0, 0.0, 4.0, 5.0, 6.0, 7.0]);
        let (mut k2, mut v2) = (vec![0.0; 8], vec![0.0; 8]);
        s.read_token(1, BlockId(2), 1, &mut k2, &mut v2).unwrap();
        assert_eq!((k2, v2), (k, v));
        // other layers and blocks untouched
        assert!(
            matches!(s.key_page(0, BlockId(2), 1).unwrap(), PageRef::F32(p) if p.iter().all(|x| *x == 0.0))
        );
    }

    #[test]
    fn f16_storage_rounds_and_copy_block_copies_all_layers() {
        let mut s = KvStorage::new(layout(Codec::F16), 2).unwrap();
        let k = [1.0, 0.1, -2.5, 3.0, 4.0, 5.0, 6.0, 7.0];
        for layer in 0..2 {
            s.write_token(layer, BlockId(0), 0, &k, &k).unwrap();
        }
        s.copy_block(BlockId(0), BlockId(1)).unwrap();
        let (mut k2, mut v2) = (vec![0.0; 8], vec![0.0; 8]);
        s.read_token(1, BlockId(1), 0, &mut k2, &mut v2).unwrap();
        assert_eq!(k2[1], f16::from_f32(0.1).to_f32());
        assert_eq!(k2[2], -2.5);
        assert_eq!(k2, v2);
    }

    #[test]
    fn bad_indices_and_shapes_are_errors() {
        let mut s = KvStorage::new(layout(Codec::F32), 2).unwrap();
        let row = [0.0; 8];
        assert!(matches!(
            s.write_token(2, BlockId(0), 0, &row, &row),
            Err(KvError::IndexOutOfRange { what: "layer", .. })
        ));
        assert_eq!(
            s.write_token(0, BlockId(2), 0, &row, &row),
            Err(KvError::InvalidBlock(BlockId(2)))
        );
        assert!(matches!(
            s.write_token(0, BlockId(0), 2, &row, &row),
            Err(KvError::IndexOutOfRange { what: "slot", .. })
        ));
        assert!(matches!(
            s.write_token(0, BlockId(0), 0, &row[..7], &row),
            Err(KvError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            s.key_page(0, BlockId(0), 2),
            Err(KvError::IndexOutOfRange {
                what: "kv head",
                ..
            })
        ));
        assert!(matches!(
            KvStorage::new(layout(Codec::Int8), 2),
            Err(KvError::UnsupportedCodec { .. })
        ));
    }
}
