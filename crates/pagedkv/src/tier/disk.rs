//! The disk tier: one file per payload in a directory, up to a byte capacity, least recently
//! used out first. A payload is written to a temporary file, flushed, then renamed over the
//! final name, so a crash or an interrupted write leaves the previous payload (or none), never
//! a torn one; whatever is read back is checked by its own checksum anyway.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Lru, TierKey};
use crate::error::{KvError, Result};

/// Payload files under one directory.
#[derive(Debug)]
pub struct DiskTier {
    dir: PathBuf,
    capacity: u64,
    used: u64,
    sizes: HashMap<TierKey, u64>,
    lru: Lru,
}

fn io_error(path: &Path, e: std::io::Error) -> KvError {
    KvError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

impl DiskTier {
    /// A tier in `dir` (created if missing) holding at most `capacity_bytes`. Payload files
    /// already there are adopted (oldest first by name order); leftover temporary files of
    /// interrupted writes are deleted.
    pub fn open(dir: impl Into<PathBuf>, capacity_bytes: u64) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        let mut tier = Self {
            dir: dir.clone(),
            capacity: capacity_bytes,
            used: 0,
            sizes: HashMap::new(),
            lru: Lru::default(),
        };
        let mut found = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| io_error(&dir, e))? {
            let entry = entry.map_err(|e| io_error(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            } else if let Some(hex) = name.strip_suffix(".pkvb") {
                if let Ok(key) = u128::from_str_radix(hex, 16) {
                    let len = entry
                        .metadata()
                        .map_err(|e| io_error(&entry.path(), e))?
                        .len();
                    found.push((TierKey(key), len));
                }
            }
        }
        found.sort();
        for (key, len) in found {
            tier.sizes.insert(key, len);
            tier.used += len;
            tier.lru.touch(key);
        }
        Ok(tier)
    }

    fn path(&self, key: TierKey) -> PathBuf {
        self.dir.join(format!("{:032x}.pkvb", key.0))
    }

    fn temp_path(&self, key: TierKey) -> PathBuf {
        self.dir.join(format!("{:032x}.tmp", key.0))
    }

    /// Stores `payload` under `key` (atomically replacing an older one) and returns the keys
    /// evicted to stay within capacity.
    pub fn put(&mut self, key: TierKey, payload: &[u8]) -> Result<Vec<TierKey>> {
        let (temp, path) = (self.temp_path(key), self.path(key));
        let mut file = fs::File::create(&temp).map_err(|e| io_error(&temp, e))?;
        file.write_all(payload).map_err(|e| io_error(&temp, e))?;
        file.sync_all().map_err(|e| io_error(&temp, e))?;
        drop(file);
        fs::rename(&temp, &path).map_err(|e| io_error(&path, e))?;
        if let Some(old) = self.sizes.insert(key, payload.len() as u64) {
            self.used -= old;
        }
        self.used += payload.len() as u64;
        self.lru.touch(key);
        let mut evicted = Vec::new();
        while self.used > self.capacity {
            let Some(oldest) = self.lru.oldest() else {
                break;
            };
            self.remove(oldest)?;
            evicted.push(oldest);
        }
        Ok(evicted)
    }

    /// The payload under `key`, if stored (read whole; the caller checks it).
    pub fn get(&mut self, key: TierKey) -> Result<Option<Vec<u8>>> {
        if !self.sizes.contains_key(&key) {
            return Ok(None);
        }
        let path = self.path(key);
        let bytes = fs::read(&path).map_err(|e| io_error(&path, e))?;
        self.lru.touch(key);
        Ok(Some(bytes))
    }

    /// Deletes the payload under `key` (nothing if absent).
    pub fn remove(&mut self, key: TierKey) -> Result<()> {
        if let Some(len) = self.sizes.remove(&key) {
            self.used -= len;
            self.lru.remove(key);
            let path = self.path(key);
            fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
        }
        Ok(())
    }

    /// Whether `key` is stored.
    pub fn contains(&self, key: TierKey) -> bool {
        self.sizes.contains_key(&key)
    }

    /// Bytes stored.
    pub fn used_bytes(&self) -> u64 {
        self.used
    }
}
