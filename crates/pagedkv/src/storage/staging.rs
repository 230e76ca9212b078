//! f32 staging slots of the blocks being written in a compressed layout.

use crate::block::BlockId;

/// No staging slot.
pub(super) const NO_SLOT: u32 = u32::MAX;

/// f32 staging for open blocks of a compressed layout: slots of
/// `[layer][K|V][kv_head][token][dim]`, taken on first write and returned when the block is
/// sealed or discarded.
#[derive(Debug, Clone, Default)]
pub(super) struct Staging {
    pub(super) rows: Vec<f32>,
    pub(super) free: Vec<u32>,
    pub(super) slot_of: Vec<u32>,
    pub(super) slot_len: usize,
}

impl Staging {
    pub(super) fn slot(&self, block: BlockId) -> Option<usize> {
        match self.slot_of[block.index()] {
            NO_SLOT => None,
            s => Some(s as usize),
        }
    }

    pub(super) fn open(&mut self, block: BlockId) -> usize {
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

    pub(super) fn close(&mut self, block: BlockId) {
        if let Some(s) = self.slot(block) {
            self.free.push(s as u32);
            self.slot_of[block.index()] = NO_SLOT;
        }
    }
}
