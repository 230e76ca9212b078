//! The manager's invariants, checked by tests after every operation.

use super::KvCacheManager;
use crate::block::BlockId;

impl KvCacheManager {
    /// Checks the manager's invariants (pool structure, ref count = number of tables holding the
    /// block, no block twice in a table, table shapes, prefix keys of committed blocks and of
    /// the cached blocks tables hold); the first violation is returned.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        self.pool.check_invariants()?;
        let bs = self.layout.block_size();
        let mut holders = vec![0u32; self.pool.num_blocks()];
        for (id, table) in &self.seqs {
            if table.blocks.len() * bs < table.tokens.len() {
                return Err(format!("{id:?} has more tokens than block capacity"));
            }
            if table.hashes.len() != table.tokens.len() / bs {
                return Err(format!(
                    "{id:?} has {} keys for {} tokens",
                    table.hashes.len(),
                    table.tokens.len()
                ));
            }
            let keys = self.chain_from(table.root, &table.tokens[..table.hashes.len() * bs]);
            if keys.last() != table.hashes.last() {
                return Err(format!("{id:?} has a stale prefix key"));
            }
            for (i, block) in table.blocks.iter().enumerate() {
                if table.blocks[..i].contains(block) {
                    return Err(format!("{id:?} holds {block:?} twice"));
                }
                // a cached block holds the prefix its key names: this table's, where it holds it
                let cached = self.pool.block_hash(*block).map_err(|e| e.to_string())?;
                if let (Some(key), Some(own)) = (cached, table.hashes.get(i)) {
                    if key != *own {
                        return Err(format!("{id:?} holds {block:?}, cached for another prefix"));
                    }
                }
                holders[block.index()] += 1;
            }
        }
        for blocks in self.pins.values() {
            for block in blocks {
                holders[block.index()] += 1;
            }
        }
        for i in 0..self.pool.num_blocks() {
            let block = BlockId(i as u32);
            if self.storage.is_open(block)
                && self.pool.ref_count(block) == Ok(0)
                && self.pool.block_hash(block) == Ok(None)
            {
                return Err(format!(
                    "block {i} holds staging but has no owner and no key"
                ));
            }
        }
        for (i, holders) in holders.iter().enumerate() {
            let refs = self
                .pool
                .ref_count(BlockId(i as u32))
                .map_err(|e| e.to_string())?;
            if refs != *holders {
                return Err(format!(
                    "block {i}: ref count {refs} but {holders} tables hold it"
                ));
            }
        }
        Ok(())
    }
}
