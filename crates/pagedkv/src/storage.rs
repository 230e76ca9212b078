//! Per-layer arenas of K and V addressed by block id (DESIGN §2, §5).
//!
//! ```text
//!  keys[layer]:  [head 0: block 0 page | block 1 page | ...][head 1: ...] ...
//!  page:         full-precision values: [slot 0: d0 .. d(h-1)][slot 1] ... [slot block_size-1]
//!                full-precision keys:   channel-major, [d0: slot 0 .. slot block_size-1][d1] ...
//!                compressed:            the codec's packed page (`codec::scalar`), page_bytes long
//! ```
//!
//! Pages are head-major (DESIGN §2 writes `[block][kv_head]`): attention walks one kv head's
//! blocks in order, and with the head's pages adjacent a sequence that holds a run of blocks is
//! read as one stream the hardware prefetchers follow — f16 decode attention at 8k–32k contexts
//! went from about 60% to about 70–80% of the machine's read bandwidth.
//!
//! Full-precision layouts (both codecs f32/f16/bf16) write tokens straight into typed arenas.
//! A layout with a compressed codec keeps each block that is being written ("open") in f32
//! staging — one slot holds every layer's K and V of one block — and encodes it into the packed
//! arenas when it fills ([`KvStorage::seal`]), so quantization never re-encodes a block and never
//! waits on a partial group. Reads of an open block see the staging rows; reads of a sealed block
//! see the codec's reconstruction — except, in a layout with sink tokens, the first tokens of a
//! sequence's first block, whose rows stay beside the sealed block in f16 (a few kilobytes per
//! sequence: the attention sink carries most of the softmax mass, and its key error alone cost
//! FibQuant half of its perplexity increase on SmolLM2).

use half::f16;

use crate::block::BlockId;
use crate::codec::scalar::encode_page;
use crate::codec::{Codec, Role};
use crate::error::{KvError, Result};
use crate::layout::KvLayout;

mod arena;
mod head_pages;
mod image;
mod staging;
#[cfg(test)]
mod tests;

use arena::Arena;
pub use arena::PageRef;
pub(crate) use head_pages::HeadPages;
pub use image::ImageKind;
use staging::{Staging, NO_SLOT};

/// K and V arenas of every layer for `num_blocks` blocks.
#[derive(Debug, Clone)]
pub struct KvStorage {
    layout: KvLayout,
    num_blocks: usize,
    keys: Vec<Arena>,
    values: Vec<Arena>,
    /// Present for layouts with a compressed codec.
    staging: Option<Staging>,
    /// Per block, the f16 rows of its sink tokens once it is sealed (layouts with sinks only;
    /// see [`KvLayout::sink_tokens`]): `[layer][K, V][kv head][token][dim]`.
    sinks: Vec<Option<Box<[f16]>>>,
}

impl KvStorage {
    /// Allocates zeroed arenas for the layout's codecs.
    pub fn new(layout: KvLayout, num_blocks: usize) -> Result<Self> {
        let codecs =
            (0..layout.layers()).flat_map(|l| [layout.key_codec(l), layout.value_codec(l)]);
        for codec in codecs {
            // build (or fetch) the shared quantizer now: a bad profile fails here, not mid-run
            if let Some(profile) = codec.fibquant_profile(layout.head_dim()) {
                fibquant::FibQuant::shared(profile)?;
            }
        }
        let overflow = KvError::SizeOverflow { what: "arena size" };
        let pages = num_blocks
            .checked_mul(layout.kv_heads())
            .ok_or(overflow.clone())?;
        // one compressed layer makes every layer stage its open blocks: one path for all
        let compressed = !layout.is_full_precision();
        let arena = |codec: Codec, page_bytes: usize| -> Result<Arena> {
            Ok(if compressed {
                Arena::Packed(vec![
                    0u8;
                    pages.checked_mul(page_bytes).ok_or(overflow.clone())?
                ])
            } else {
                Arena::typed(
                    codec,
                    pages
                        .checked_mul(layout.page_elements())
                        .ok_or(overflow.clone())?,
                )
            })
        };
        let mut keys = Vec::with_capacity(layout.layers());
        let mut values = Vec::with_capacity(layout.layers());
        for l in 0..layout.layers() {
            keys.push(arena(layout.key_codec(l), layout.key_page_bytes(l))?);
            values.push(arena(layout.value_codec(l), layout.value_page_bytes(l))?);
        }
        let staging = compressed.then(|| Staging {
            slot_of: vec![NO_SLOT; num_blocks],
            slot_len: layout.layers() * 2 * layout.kv_heads() * layout.page_elements(),
            ..Staging::default()
        });
        let sinks = if layout.sink_tokens() > 0 {
            vec![None; num_blocks]
        } else {
            Vec::new()
        };
        Ok(Self {
            layout,
            num_blocks,
            keys,
            values,
            staging,
            sinks,
        })
    }

    /// The layout of the stored data.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Whether `block` is open (being written, in f32 staging).
    pub fn is_open(&self, block: BlockId) -> bool {
        self.staging
            .as_ref()
            .is_some_and(|s| s.slot(block).is_some())
    }

    /// The f16 sink rows (`sink_tokens × head_dim`, token-major) of (layer, kv head) kept
    /// beside sealed `block`, if it holds any (a sequence's first block in a layout with sinks).
    pub fn sink_rows(
        &self,
        layer: usize,
        block: BlockId,
        head: usize,
        role: Role,
    ) -> Option<&[f16]> {
        let rows = self.sinks.get(block.index())?.as_deref()?;
        if self.is_open(block) || layer >= self.layout.layers() || head >= self.layout.kv_heads() {
            return None;
        }
        let len = self.layout.sink_tokens() * self.layout.head_dim();
        let at = self.sink_offset(layer, role, head);
        Some(&rows[at..at + len])
    }

    /// Offset of (layer, K or V, head) inside a block's sink rows.
    fn sink_offset(&self, layer: usize, role: Role, head: usize) -> usize {
        let l = &self.layout;
        let kv = usize::from(role == Role::Value);
        ((layer * 2 + kv) * l.kv_heads() + head) * l.sink_tokens() * l.head_dim()
    }

    fn set_sinks(&mut self, block: BlockId, rows: Option<Box<[f16]>>) {
        if let Some(entry) = self.sinks.get_mut(block.index()) {
            *entry = rows;
        }
    }

    /// Open blocks currently holding staging memory.
    pub fn open_blocks(&self) -> usize {
        self.staging
            .as_ref()
            .map_or(0, |s| s.slot_of.iter().filter(|x| **x != NO_SLOT).count())
    }

    fn check(&self, layer: usize, block: BlockId) -> Result<()> {
        self.check_layer(layer)?;
        if block.index() >= self.num_blocks {
            return Err(KvError::InvalidBlock(block));
        }
        Ok(())
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.layout.layers() {
            return Err(KvError::IndexOutOfRange {
                what: "layer",
                index: layer,
                limit: self.layout.layers(),
            });
        }
        Ok(())
    }

    fn check_head(&self, head: usize) -> Result<()> {
        if head >= self.layout.kv_heads() {
            return Err(KvError::IndexOutOfRange {
                what: "kv head",
                index: head,
                limit: self.layout.kv_heads(),
            });
        }
        Ok(())
    }

    fn check_rows(&self, k: usize, v: usize) -> Result<()> {
        let width = self.layout.token_width();
        for (what, got) in [("key row", k), ("value row", v)] {
            if got != width {
                return Err(KvError::ShapeMismatch {
                    what,
                    expected: width,
                    got,
                });
            }
        }
        Ok(())
    }

    /// Offset of (layer, K or V, head, slot 0) inside a staging slot.
    fn staging_offset(&self, slot: usize, layer: usize, role: Role, head: usize) -> usize {
        let l = &self.layout;
        let kv = usize::from(role == Role::Value);
        slot * self.staging.as_ref().map_or(0, |s| s.slot_len)
            + ((layer * 2 + kv) * l.kv_heads() + head) * l.page_elements()
    }

    /// Writes one token's K and V (each `kv_heads × head_dim`, head-major) into `slot` of `block`.
    /// In a compressed layout this opens the block (f32 staging) until it is sealed.
    pub fn write_token(
        &mut self,
        layer: usize,
        block: BlockId,
        slot: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        self.check(layer, block)?;
        self.check_rows(k.len(), v.len())?;
        if slot >= self.layout.block_size() {
            return Err(KvError::IndexOutOfRange {
                what: "slot",
                index: slot,
                limit: self.layout.block_size(),
            });
        }
        let d = self.layout.head_dim();
        if let Some(staging) = self.staging.as_mut() {
            let s = staging.open(block);
            for head in 0..self.layout.kv_heads() {
                for (role, src) in [(Role::Key, k), (Role::Value, v)] {
                    let offset = self.staging_offset(s, layer, role, head) + slot * d;
                    let staging = self.staging.as_mut().expect("checked above");
                    staging.rows[offset..offset + d]
                        .copy_from_slice(&src[head * d..(head + 1) * d]);
                }
            }
            return Ok(());
        }
        let bs = self.layout.block_size();
        for head in 0..self.layout.kv_heads() {
            let page = self.typed_offset(block, head);
            self.keys[layer].write_strided(page + slot, bs, &k[head * d..(head + 1) * d]);
            self.values[layer].write(page + slot * d, &v[head * d..(head + 1) * d]);
        }
        Ok(())
    }

    /// Encodes an open block's pages (every layer, head, K and V) with the layout's codecs and
    /// releases its staging. `start` is the position of the block's first token in its
    /// sequence (normalized keys depend on it). A no-op for full-precision layouts and for blocks
    /// not open.
    pub fn seal(&mut self, block: BlockId, start: usize) -> Result<()> {
        self.check(0, block)?;
        let Some(slot) = self.staging.as_ref().and_then(|s| s.slot(block)) else {
            return Ok(());
        };
        let l = self.layout.clone();
        // the sink rows first: a row beyond f16 fails before any page is encoded
        let sink_rows = if start == 0 && l.sink_tokens() > 0 {
            Some(self.sink_rows_of(slot)?)
        } else {
            None
        };
        for layer in 0..l.layers() {
            for head in 0..l.kv_heads() {
                for role in [Role::Key, Role::Value] {
                    let src = self.staging_offset(slot, layer, role, head);
                    let page = self.page_index(block, head);
                    let (codec, page_bytes, arena) = match role {
                        Role::Key => (
                            l.key_codec(layer),
                            l.key_page_bytes(layer),
                            &mut self.keys[layer],
                        ),
                        Role::Value => (
                            l.value_codec(layer),
                            l.value_page_bytes(layer),
                            &mut self.values[layer],
                        ),
                    };
                    let Arena::Packed(bytes) = arena else {
                        unreachable!("compressed layouts use packed arenas")
                    };
                    let dst = page * page_bytes;
                    let mut rows =
                        &self.staging.as_ref().expect("open").rows[src..src + l.page_elements()];
                    let normalized;
                    if let (Some(norm), Role::Key) = (l.key_norm(layer), role) {
                        let mut x = rows.to_vec();
                        norm.normalize(layer, head, start, &mut x);
                        normalized = x;
                        rows = &normalized;
                    }
                    let out = &mut bytes[dst..dst + page_bytes];
                    match (l.key_split(layer), role) {
                        (Some(plan), Role::Key) => plan.encode_page(head, rows, out)?,
                        _ => encode_page(codec, role, rows, l.block_size(), l.head_dim(), out)?,
                    }
                }
            }
        }
        self.set_sinks(block, sink_rows);
        self.staging.as_mut().expect("open").close(block);
        Ok(())
    }

    /// The f16 sink rows of the open block in staging `slot` (see [`Self::sink_rows`]).
    fn sink_rows_of(&self, slot: usize) -> Result<Box<[f16]>> {
        let l = &self.layout;
        let rows = &self.staging.as_ref().expect("an open block").rows;
        let (n, d) = (l.sink_tokens(), l.head_dim());
        let mut out = Vec::with_capacity(l.sink_bytes() / 2);
        for layer in 0..l.layers() {
            for role in [Role::Key, Role::Value] {
                for head in 0..l.kv_heads() {
                    let src = self.staging_offset(slot, layer, role, head);
                    out.extend(rows[src..src + n * d].iter().map(|x| f16::from_f32(*x)));
                }
            }
        }
        if out.iter().any(|x| !x.is_finite()) {
            return Err(KvError::ValueOutOfRange {
                codec: "f16 (sink rows)".to_string(),
                max: f16::MAX.to_f32(),
            });
        }
        Ok(out.into_boxed_slice())
    }

    /// Drops an open block's staging without encoding it (the block was freed while partial).
    pub fn discard(&mut self, block: BlockId) {
        self.set_sinks(block, None);
        if let Some(s) = self.staging.as_mut() {
            if block.index() < self.num_blocks {
                s.close(block);
            }
        }
    }

    /// Reads the token at position `pos` of its sequence (in `block`, slot `pos % block_size`)
    /// back as f32, head-major: staging rows if the block is open, the codec's reconstruction
    /// if sealed.
    pub fn read_token(
        &self,
        layer: usize,
        block: BlockId,
        pos: usize,
        k: &mut [f32],
        v: &mut [f32],
    ) -> Result<()> {
        self.check(layer, block)?;
        self.check_rows(k.len(), v.len())?;
        let (d, bs) = (self.layout.head_dim(), self.layout.block_size());
        let slot = pos % bs;
        let mut page = vec![0f32; bs * d];
        for head in 0..self.layout.kv_heads() {
            for (role, dst) in [(Role::Key, &mut *k), (Role::Value, &mut *v)] {
                self.page_to_f32(layer, block, head, role, pos - slot, &mut page)?;
                dst[head * d..(head + 1) * d].copy_from_slice(&page[slot * d..(slot + 1) * d]);
            }
        }
        Ok(())
    }

    /// The vectors of one page (`block_size × head_dim`, token-major) as attention sees them:
    /// the codec's reconstruction, restored from the key normalization if there is one. `start`
    /// is the position of the block's first token.
    pub fn page_to_f32(
        &self,
        layer: usize,
        block: BlockId,
        head: usize,
        role: Role,
        start: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let (d, bs) = (self.layout.head_dim(), self.layout.block_size());
        let page = self.page(layer, block, head, role)?;
        match (self.layout.key_split(layer), role, page) {
            (Some(plan), Role::Key, PageRef::Packed { bytes, .. }) => {
                plan.decode_page(head, bytes, &mut out[..bs * d])?
            }
            _ => page.to_f32(bs, d, out)?,
        }
        if let (Some(norm), Role::Key, PageRef::Packed { .. }) =
            (self.layout.key_norm(layer), role, page)
        {
            norm.restore(layer, head, start, &mut out[..bs * d]);
        }
        if let Some(rows) = self.sink_rows(layer, block, head, role) {
            out.iter_mut().zip(rows).for_each(|(o, x)| *o = x.to_f32());
        }
        Ok(())
    }

    /// The key page of (layer, block, kv head).
    pub fn key_page(&self, layer: usize, block: BlockId, head: usize) -> Result<PageRef<'_>> {
        self.page(layer, block, head, Role::Key)
    }

    /// The value page of (layer, block, kv head).
    pub fn value_page(&self, layer: usize, block: BlockId, head: usize) -> Result<PageRef<'_>> {
        self.page(layer, block, head, Role::Value)
    }

    fn page(&self, layer: usize, block: BlockId, head: usize, role: Role) -> Result<PageRef<'_>> {
        self.check(layer, block)?;
        self.check_head(head)?;
        let l = &self.layout;
        let arena = if role == Role::Key {
            &self.keys[layer]
        } else {
            &self.values[layer]
        };
        if let Some(staging) = &self.staging {
            if let Some(slot) = staging.slot(block) {
                let offset = self.staging_offset(slot, layer, role, head);
                return Ok(PageRef::F32(
                    &staging.rows[offset..offset + l.page_elements()],
                ));
            }
            let (codec, page_bytes) = match role {
                Role::Key => (l.key_codec(layer), l.key_page_bytes(layer)),
                Role::Value => (l.value_codec(layer), l.value_page_bytes(layer)),
            };
            let offset = self.page_index(block, head) * page_bytes;
            return Ok(PageRef::Packed {
                codec,
                role,
                bytes: arena.slice(offset, page_bytes),
            });
        }
        let (offset, len) = (self.typed_offset(block, head), l.page_elements());
        let key = role == Role::Key;
        Ok(match arena {
            Arena::F32(a) if key => PageRef::F32T(&a[offset..offset + len]),
            Arena::F16(a) if key => PageRef::F16T(&a[offset..offset + len]),
            Arena::Bf16(a) if key => PageRef::Bf16T(&a[offset..offset + len]),
            Arena::F32(a) => PageRef::F32(&a[offset..offset + len]),
            Arena::F16(a) => PageRef::F16(&a[offset..offset + len]),
            Arena::Bf16(a) => PageRef::Bf16(&a[offset..offset + len]),
            Arena::Packed(_) => unreachable!("typed layouts have typed arenas"),
        })
    }

    /// Copies every layer's K and V of `src` into `dst` (copy-on-write): the staging rows of an
    /// open block (dst becomes open), or the stored pages of a sealed one.
    pub fn copy_block(&mut self, src: BlockId, dst: BlockId) -> Result<()> {
        self.check(0, src)?;
        self.check(0, dst)?;
        if let Some(staging) = self.staging.as_mut() {
            if let Some(from) = staging.slot(src) {
                let to = staging.open(dst);
                let len = staging.slot_len;
                staging
                    .rows
                    .copy_within(from * len..(from + 1) * len, to * len);
                self.set_sinks(dst, None);
                return Ok(());
            }
            staging.close(dst);
        }
        let sink_rows = self.sinks.get(src.index()).cloned().flatten();
        self.set_sinks(dst, sink_rows);
        let (l, num_blocks) = (self.layout.clone(), self.num_blocks);
        for (arenas, role) in [(&mut self.keys, Role::Key), (&mut self.values, Role::Value)] {
            for (layer, arena) in arenas.iter_mut().enumerate() {
                let page_len = match role {
                    Role::Key => l.key_page_bytes(layer),
                    Role::Value => l.value_page_bytes(layer),
                };
                let page_len = match arena {
                    Arena::Packed(_) => page_len,
                    _ => l.page_elements(),
                };
                for head in 0..l.kv_heads() {
                    let (from, to) = (
                        head * num_blocks + src.index(),
                        head * num_blocks + dst.index(),
                    );
                    arena.copy_within(from * page_len, page_len, to * page_len);
                }
            }
        }
        Ok(())
    }

    fn typed_offset(&self, block: BlockId, head: usize) -> usize {
        self.page_index(block, head) * self.layout.page_elements()
    }

    /// Where a (block, kv head) page lies in a layer's arena, in pages (head-major, see the
    /// module notes).
    fn page_index(&self, block: BlockId, head: usize) -> usize {
        head * self.num_blocks + block.index()
    }
}
