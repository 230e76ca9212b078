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

use half::{bf16, f16};

use crate::block::BlockId;
use crate::codec::scalar::{decode_page, encode_page};
use crate::codec::{Codec, Role};
use crate::error::{KvError, Result};
use crate::layout::KvLayout;

/// No staging slot.
const NO_SLOT: u32 = u32::MAX;

/// One layer's keys or values.
#[derive(Debug, Clone)]
enum Arena {
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
    fn typed(codec: Codec, elements: usize) -> Self {
        match codec {
            Codec::F32 => Arena::F32(vec![0.0; elements]),
            Codec::F16 => Arena::F16(vec![f16::ZERO; elements]),
            _ => Arena::Bf16(vec![bf16::ZERO; elements]),
        }
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
            Arena::Packed(_) => unreachable!("packed arenas are written by sealing"),
        }
    }

    /// Writes `src` with a stride: element c at `offset + c·stride` (a key into its channel
    /// columns).
    fn write_strided(&mut self, offset: usize, stride: usize, src: &[f32]) {
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

    fn element_bytes(&self) -> usize {
        match self {
            Arena::F32(_) => 4,
            Arena::F16(_) | Arena::Bf16(_) => 2,
            Arena::Packed(_) => 1,
        }
    }

    /// Loads little-endian elements from `bytes` at element `offset` (typed arenas).
    fn load_le(&mut self, offset: usize, bytes: &[u8]) {
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

    fn slice(&self, offset: usize, len: usize) -> &[u8] {
        match self {
            Arena::Packed(a) => &a[offset..offset + len],
            _ => unreachable!("typed arenas are read through PageRef"),
        }
    }

    fn copy_within(&mut self, src: usize, len: usize, dst: usize) {
        match self {
            Arena::F32(a) => a.copy_within(src..src + len, dst),
            Arena::F16(a) => a.copy_within(src..src + len, dst),
            Arena::Bf16(a) => a.copy_within(src..src + len, dst),
            Arena::Packed(a) => a.copy_within(src..src + len, dst),
        }
    }
}

/// f32 staging for open blocks of a compressed layout: slots of
/// `[layer][K|V][kv_head][token][dim]`, taken on first write and returned when the block is
/// sealed or discarded.
#[derive(Debug, Clone, Default)]
struct Staging {
    rows: Vec<f32>,
    free: Vec<u32>,
    slot_of: Vec<u32>,
    slot_len: usize,
}

impl Staging {
    fn slot(&self, block: BlockId) -> Option<usize> {
        match self.slot_of[block.index()] {
            NO_SLOT => None,
            s => Some(s as usize),
        }
    }

    fn open(&mut self, block: BlockId) -> usize {
        if let Some(s) = self.slot(block) {
            return s;
        }
        let slot = self.free.pop().unwrap_or_else(|| {
            let s = (self.rows.len() / self.slot_len) as u32;
            self.rows.resize(self.rows.len() + self.slot_len, 0.0);
            s
        });
        self.slot_of[block.index()] = slot;
        slot as usize
    }

    fn close(&mut self, block: BlockId) {
        if let Some(s) = self.slot(block) {
            self.free.push(s as u32);
            self.slot_of[block.index()] = NO_SLOT;
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
    /// Present for layouts with a compressed codec.
    staging: Option<Staging>,
    /// Per block, the f16 rows of its sink tokens once it is sealed (layouts with sinks only;
    /// see [`KvLayout::sink_tokens`]): `[layer][K, V][kv head][token][dim]`.
    sinks: Vec<Option<Box<[f16]>>>,
}

/// What a block image holds besides its pages (see [`KvStorage::export_block`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageKind {
    /// The block was open: the image holds f32 staging rows instead of pages.
    pub open: bool,
    /// The sealed block holds sink rows, appended after its pages.
    pub sinks: bool,
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

    /// Bytes of one block's image of that kind (see [`export_block`](Self::export_block)).
    pub fn block_image_bytes(&self, kind: ImageKind) -> usize {
        let sinks = if kind.sinks && !kind.open {
            self.layout.sink_bytes()
        } else {
            0
        };
        sinks + self.page_image_bytes(kind.open)
    }

    fn page_image_bytes(&self, open: bool) -> usize {
        let l = &self.layout;
        (0..l.layers())
            .map(|layer| {
                let per_role = |role: Role| -> usize {
                    if open {
                        l.page_elements() * 4
                    } else if self.staging.is_some() {
                        match role {
                            Role::Key => l.key_page_bytes(layer),
                            Role::Value => l.value_page_bytes(layer),
                        }
                    } else {
                        l.page_elements() * self.keys[layer].element_bytes()
                    }
                };
                l.kv_heads() * (per_role(Role::Key) + per_role(Role::Value))
            })
            .sum()
    }

    /// The stored bytes of one block, every layer (keys then values, head by head) as they lie:
    /// the f32 staging rows of an open block, else the arena pages (little-endian elements or
    /// packed codes), then a sealed block's sink rows if it has any (f16, little-endian).
    /// Returns what the image holds. [`import_block`](Self::import_block) puts the same bytes
    /// back, bit for bit.
    pub fn export_block(&self, block: BlockId, out: &mut Vec<u8>) -> Result<ImageKind> {
        self.check(0, block)?;
        out.clear();
        let l = self.layout.clone();
        let open = self.is_open(block);
        let sink_rows = if open {
            None
        } else {
            self.sinks.get(block.index()).and_then(|s| s.as_deref())
        };
        for layer in 0..l.layers() {
            for role in [Role::Key, Role::Value] {
                for head in 0..l.kv_heads() {
                    match self.page(layer, block, head, role)? {
                        PageRef::F32(p) | PageRef::F32T(p) => {
                            out.extend(p.iter().flat_map(|x| x.to_le_bytes()))
                        }
                        PageRef::F16(p) | PageRef::F16T(p) => {
                            out.extend(p.iter().flat_map(|x| x.to_le_bytes()))
                        }
                        PageRef::Bf16(p) | PageRef::Bf16T(p) => {
                            out.extend(p.iter().flat_map(|x| x.to_le_bytes()))
                        }
                        PageRef::Packed { bytes, .. } => out.extend_from_slice(bytes),
                    }
                }
            }
        }
        if let Some(rows) = sink_rows {
            out.extend(rows.iter().flat_map(|x| x.to_le_bytes()));
        }
        Ok(ImageKind {
            open,
            sinks: sink_rows.is_some(),
        })
    }

    /// Writes a block image made by [`export_block`](Self::export_block) of a storage with the
    /// same layout into `block`, open (staging) or sealed as it was. A wrong length is an error
    /// and changes nothing.
    pub fn import_block(&mut self, block: BlockId, kind: ImageKind, bytes: &[u8]) -> Result<()> {
        self.check(0, block)?;
        let open = kind.open;
        if open && self.staging.is_none() {
            return Err(KvError::ShapeMismatch {
                what: "open block image for a full-precision layout",
                expected: 0,
                got: bytes.len(),
            });
        }
        if kind.sinks && (open || self.layout.sink_tokens() == 0) {
            return Err(KvError::ShapeMismatch {
                what: "sink rows in a block image (open, or a layout without sinks)",
                expected: 0,
                got: self.layout.sink_bytes(),
            });
        }
        let expected = self.block_image_bytes(kind);
        if bytes.len() != expected {
            return Err(KvError::ShapeMismatch {
                what: "block image bytes",
                expected,
                got: bytes.len(),
            });
        }
        let l = self.layout.clone();
        let (pages, sink_bytes) = bytes.split_at(self.page_image_bytes(open));
        let sink_rows = kind.sinks.then(|| {
            sink_bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]))
                .collect::<Box<[f16]>>()
        });
        self.set_sinks(block, sink_rows);
        let mut rest = pages;
        let mut take = |n: usize| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head
        };
        if open {
            let slot = self.staging.as_mut().expect("checked above").open(block);
            for layer in 0..l.layers() {
                for role in [Role::Key, Role::Value] {
                    for head in 0..l.kv_heads() {
                        let offset = self.staging_offset(slot, layer, role, head);
                        let src = take(l.page_elements() * 4);
                        let rows = &mut self.staging.as_mut().expect("open").rows;
                        for (o, b) in rows[offset..offset + l.page_elements()]
                            .iter_mut()
                            .zip(src.chunks_exact(4))
                        {
                            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        }
                    }
                }
            }
            return Ok(());
        }
        if let Some(staging) = self.staging.as_mut() {
            staging.close(block);
        }
        for layer in 0..l.layers() {
            for role in [Role::Key, Role::Value] {
                for head in 0..l.kv_heads() {
                    let page = self.page_index(block, head);
                    let arena = match role {
                        Role::Key => &mut self.keys[layer],
                        Role::Value => &mut self.values[layer],
                    };
                    match arena {
                        Arena::Packed(a) => {
                            let len = match role {
                                Role::Key => l.key_page_bytes(layer),
                                Role::Value => l.value_page_bytes(layer),
                            };
                            let offset = page * len;
                            a[offset..offset + len].copy_from_slice(take(len));
                        }
                        typed => {
                            let len = l.page_elements();
                            let offset = page * len;
                            typed.load_le(offset, take(len * typed.element_bytes()));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Open blocks currently holding staging memory.
    pub fn open_blocks(&self) -> usize {
        self.staging
            .as_ref()
            .map_or(0, |s| s.slot_of.iter().filter(|x| **x != NO_SLOT).count())
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
        if head >= self.layout.kv_heads() {
            return Err(KvError::IndexOutOfRange {
                what: "kv head",
                index: head,
                limit: self.layout.kv_heads(),
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::LayoutSpec;

    fn layout(codec: Codec) -> KvLayout {
        let mut spec = LayoutSpec::new(2, 2, 4, 32, codec);
        spec.block_size = 2;
        KvLayout::new(spec).unwrap()
    }

    fn row(seed: f32) -> Vec<f32> {
        (0..64)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 3.0)
            .collect()
    }

    #[test]
    fn token_lands_in_its_page_and_slot() {
        let mut s = KvStorage::new(layout(Codec::F32), 3).unwrap();
        let (k, v) = (row(1.0), row(2.0));
        s.write_token(1, BlockId(2), 1, &k, &v).unwrap();
        // keys channel-major: channel c of slot 1 at c·block_size + 1; values token-major
        let PageRef::F32T(page) = s.key_page(1, BlockId(2), 1).unwrap() else {
            panic!()
        };
        for c in 0..32 {
            assert_eq!(page[c * 2 + 1], k[32 + c]);
            assert_eq!(page[c * 2], 0.0);
        }
        let PageRef::F32(page) = s.value_page(1, BlockId(2), 1).unwrap() else {
            panic!()
        };
        assert_eq!(&page[32..64], &v[32..64]);
        assert!(page[..32].iter().all(|x| *x == 0.0));
        let (mut k2, mut v2) = (vec![0.0; 64], vec![0.0; 64]);
        s.read_token(1, BlockId(2), 1, &mut k2, &mut v2).unwrap();
        assert_eq!((k2, v2), (k, v));
    }

    #[test]
    fn f16_storage_rounds_and_copy_block_copies_all_layers() {
        let mut s = KvStorage::new(layout(Codec::F16), 2).unwrap();
        let k = row(0.5);
        for layer in 0..2 {
            s.write_token(layer, BlockId(0), 0, &k, &k).unwrap();
        }
        s.copy_block(BlockId(0), BlockId(1)).unwrap();
        let (mut k2, mut v2) = (vec![0.0; 64], vec![0.0; 64]);
        s.read_token(1, BlockId(1), 0, &mut k2, &mut v2).unwrap();
        assert_eq!(k2[1], f16::from_f32(k[1]).to_f32());
        assert_eq!(k2, v2);
    }

    #[test]
    fn compressed_blocks_stage_in_f32_then_seal_to_the_codec() {
        for codec in [
            Codec::Int8,
            Codec::Int4,
            Codec::Fp8E4m3,
            Codec::FibQuant { k: 2, n: 256 },
        ] {
            let mut s = KvStorage::new(layout(codec), 3).unwrap();
            let rows = [row(0.1), row(0.9)];
            for (slot, r) in rows.iter().enumerate() {
                for layer in 0..2 {
                    s.write_token(layer, BlockId(1), slot, r, r).unwrap();
                }
            }
            assert!(s.is_open(BlockId(1)));
            let (mut k, mut v) = (vec![0.0; 64], vec![0.0; 64]);
            s.read_token(1, BlockId(1), 1, &mut k, &mut v).unwrap();
            assert_eq!(k, rows[1], "open blocks read back exactly");
            // CoW of an open block copies the staging rows
            s.copy_block(BlockId(1), BlockId(2)).unwrap();
            assert!(s.is_open(BlockId(2)));
            s.seal(BlockId(1), 0).unwrap();
            assert!(!s.is_open(BlockId(1)));
            s.read_token(1, BlockId(1), 1, &mut k, &mut v).unwrap();
            let err = k
                .iter()
                .zip(&rows[1])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                err > 0.0 && err < 0.5,
                "{codec}: sealed pages hold the codec's reconstruction (err {err})"
            );
            assert!(matches!(
                s.key_page(0, BlockId(1), 0).unwrap(),
                PageRef::Packed { .. }
            ));
            // a sealed block copied stays sealed; discarding an open block frees its staging
            s.copy_block(BlockId(1), BlockId(0)).unwrap();
            assert!(!s.is_open(BlockId(0)));
            s.discard(BlockId(2));
            assert_eq!(s.open_blocks(), 0);
        }
    }

    #[test]
    fn a_layer_override_stores_that_layer_in_its_own_codec() {
        // layer 0 in f16 inside an int4 layout: layer 0 reads back at f16 precision once sealed
        let mut spec = layout(Codec::Int4).spec().clone();
        spec.layer_overrides = vec![crate::LayerOverride {
            layers: crate::LayerSet::of([0]).unwrap(),
            key_codec: Codec::F16,
            value_codec: Codec::F16,
        }];
        let mut s = KvStorage::new(KvLayout::new(spec).unwrap(), 2).unwrap();
        let r = row(0.37);
        for slot in 0..2 {
            for layer in 0..2 {
                s.write_token(layer, BlockId(0), slot, &r, &r).unwrap();
            }
        }
        s.seal(BlockId(0), 0).unwrap();
        let (mut k0, mut v0, mut k1, mut v1) =
            (vec![0.0; 64], vec![0.0; 64], vec![0.0; 64], vec![0.0; 64]);
        s.read_token(0, BlockId(0), 1, &mut k0, &mut v0).unwrap();
        s.read_token(1, BlockId(0), 1, &mut k1, &mut v1).unwrap();
        let max_err = |a: &[f32]| {
            a.iter()
                .zip(&r)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert!(max_err(&k0) <= 1e-3 * 4.0, "f16 layer: {}", max_err(&k0));
        assert!(max_err(&v1) > max_err(&v0), "the int4 layer is coarser");
        assert!(matches!(
            s.key_page(0, BlockId(0), 0).unwrap(),
            PageRef::Packed {
                codec: Codec::F16,
                ..
            }
        ));
    }

    /// Sink rows are f16: a sink token beyond its range (here in f32 keys, which the codec
    /// itself would store) is an error before any page is encoded, and the block stays open.
    #[test]
    fn a_sink_row_beyond_f16_is_an_error_that_keeps_the_block_open() {
        let mut spec = layout(Codec::Int8).spec().clone();
        spec.key_codec = Codec::F32;
        spec.sink_tokens = 1;
        let mut s = KvStorage::new(KvLayout::new(spec).unwrap(), 2).unwrap();
        let mut big = row(0.1);
        big[3] = 1e6;
        for layer in 0..2 {
            s.write_token(layer, BlockId(0), 0, &big, &row(0.2))
                .unwrap();
            s.write_token(layer, BlockId(0), 1, &row(0.3), &row(0.4))
                .unwrap();
        }
        assert!(matches!(
            s.seal(BlockId(0), 0),
            Err(KvError::ValueOutOfRange { .. })
        ));
        assert!(s.is_open(BlockId(0)));
        // sealed as a later block (no sink rows), the same rows are stored
        s.seal(BlockId(0), 2).unwrap();
        assert!(!s.is_open(BlockId(0)));
        assert!(s.sink_rows(0, BlockId(0), 0, Role::Key).is_none());
    }

    #[test]
    fn bad_indices_and_shapes_are_errors() {
        let mut s = KvStorage::new(layout(Codec::F32), 2).unwrap();
        let r = vec![0.0; 64];
        assert!(matches!(
            s.write_token(2, BlockId(0), 0, &r, &r),
            Err(KvError::IndexOutOfRange { what: "layer", .. })
        ));
        assert_eq!(
            s.write_token(0, BlockId(2), 0, &r, &r),
            Err(KvError::InvalidBlock(BlockId(2)))
        );
        assert!(matches!(
            s.write_token(0, BlockId(0), 2, &r, &r),
            Err(KvError::IndexOutOfRange { what: "slot", .. })
        ));
        assert!(matches!(
            s.write_token(0, BlockId(0), 0, &r[..7], &r),
            Err(KvError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            s.key_page(0, BlockId(0), 2),
            Err(KvError::IndexOutOfRange {
                what: "kv head",
                ..
            })
        ));
        let mut spec = LayoutSpec::new(1, 1, 1, 48, Codec::FibQuant { k: 2, n: 16 });
        spec.block_size = 2;
        assert!(matches!(
            KvLayout::new(spec),
            Err(KvError::UnsupportedCodec { .. })
        ));
    }
}
