//! Block images: one block's stored bytes, every layer, for tiers and swap (exported and
//! imported bit for bit).

use half::f16;

use super::{Arena, KvStorage, PageRef};
use crate::block::BlockId;
use crate::codec::Role;
use crate::error::{KvError, Result};

/// What a block image holds besides its pages (see [`KvStorage::export_block`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageKind {
    /// The block was open: the image holds f32 staging rows instead of pages.
    pub open: bool,
    /// The sealed block holds sink rows, appended after its pages.
    pub sinks: bool,
}

impl KvStorage {
    /// Whether a block image of this kind fits this layout: open images need staging (a
    /// compressed layout), sink rows a sealed block of a layout that keeps sinks.
    pub fn holds(&self, kind: ImageKind) -> bool {
        let open_ok = !kind.open || self.staging.is_some();
        let sinks_ok = !kind.sinks || (!kind.open && self.layout.sink_tokens() > 0);
        open_ok && sinks_ok
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
        if !self.holds(kind) {
            return Err(KvError::ShapeMismatch {
                what: "block image of a kind this layout cannot hold (open in a full-precision \
                       layout, or sink rows when open or in a layout without sinks)",
                expected: 0,
                got: bytes.len(),
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
}
