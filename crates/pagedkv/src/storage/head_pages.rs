//! One kv head's stored pages of one layer and role as bytes, for the whole-block attention
//! kernels: a pass over a run of sealed blocks takes each block's page by arithmetic, where
//! [`KvStorage::key_page`] checks the block and builds a [`super::PageRef`] per call (which
//! cost the pass more than its own work at SmolLM2's geometry).

use super::{Arena, KvStorage, Staging};
use crate::block::BlockId;
use crate::codec::Role;
use crate::error::Result;

/// The pages of (layer, kv head, role), consecutive blocks adjacent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadPages<'a> {
    bytes: &'a [u8],
    page_bytes: usize,
    staging: Option<&'a Staging>,
    /// Packed pages of the layer's codec; else the layout's full-precision elements (key
    /// pages channel-major, value pages token-major).
    pub packed: bool,
}

impl<'a> HeadPages<'a> {
    /// The stored page of `block`, if it is sealed: `None` for an open block (its rows are in
    /// staging) or one outside the storage.
    #[inline]
    pub fn sealed(&self, block: BlockId) -> Option<&'a [u8]> {
        // in range first: the staging's slot table is indexed by block
        let start = block.index().checked_mul(self.page_bytes)?;
        let page = self.bytes.get(start..start.checked_add(self.page_bytes)?)?;
        match self.staging.and_then(|s| s.slot(block)) {
            Some(_) => None,
            None => Some(page),
        }
    }
}

impl KvStorage {
    /// The pages of kv head `head` of `layer`'s keys or values.
    pub(crate) fn head_pages(
        &self,
        layer: usize,
        head: usize,
        role: Role,
    ) -> Result<HeadPages<'_>> {
        self.check_layer(layer)?;
        self.check_head(head)?;
        let (arena, page_bytes) = match role {
            Role::Key => (&self.keys[layer], self.layout.key_page_bytes(layer)),
            Role::Value => (&self.values[layer], self.layout.value_page_bytes(layer)),
        };
        // the head's pages, in the arena's order (`page_index`)
        let pages = self.page_index(BlockId(0), head)..self.page_index(BlockId(0), head + 1);
        let page_elements = self.layout.page_elements();
        let typed = pages.start * page_elements..pages.end * page_elements;
        let (bytes, page_bytes, packed): (&[u8], usize, bool) = match arena {
            Arena::Packed(a) => {
                let bytes = pages.start * page_bytes..pages.end * page_bytes;
                (&a[bytes], page_bytes, true)
            }
            Arena::F32(a) => (bytemuck::cast_slice(&a[typed]), 4 * page_elements, false),
            Arena::F16(a) => (bytemuck::cast_slice(&a[typed]), 2 * page_elements, false),
            Arena::Bf16(a) => (bytemuck::cast_slice(&a[typed]), 2 * page_elements, false),
        };
        Ok(HeadPages {
            bytes,
            page_bytes,
            staging: self.staging.as_ref(),
            packed,
        })
    }
}
