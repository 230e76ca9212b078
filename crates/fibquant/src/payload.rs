//! The versioned, checksummed payload of a run of FibQuant codes (DESIGN §6), for storing codes
//! outside a process that built the same quantizer.
//!
//! ```text
//!  offset  size  field
//!       0     4  magic "FQPL"
//!       4     2  format version (2), little-endian
//!       6     4  d        10  1  k        11  1  rotation (0 Hadamard, 1 Haar)
//!      12     4  N        16  8  seed
//!      24     8  codebook digest (xxh3-64 of the codewords' f32 bytes)
//!      32     4  vector count
//!      36     …  count × code_bytes codes
//!     end-8   8  xxh3-64 of every byte before it
//! ```
//!
//! A payload is accepted only by a quantizer with the same profile and codebook; anything
//! truncated, extended, corrupted or foreign is a typed error, never a panic.

use xxhash_rust::xxh3::xxh3_64;

use crate::{Codebook, FibQuant, Profile, RotationKind};

const MAGIC: &[u8; 4] = b"FQPL";
/// Current format version.
pub const VERSION: u16 = 2;
const HEADER: usize = 36;
const CHECKSUM: usize = 8;

/// Why a payload was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Shorter than header plus checksum.
    #[error("payload truncated: {len} bytes")]
    Truncated {
        /// Its length.
        len: usize,
    },
    /// The checksum does not match the content.
    #[error("payload checksum mismatch")]
    Checksum,
    /// Not a FibQuant payload.
    #[error("not a FibQuant payload (bad magic)")]
    BadMagic,
    /// A format version this build does not read.
    #[error("unsupported payload version {found} (this build reads {VERSION})")]
    Version {
        /// The version found.
        found: u16,
    },
    /// Written by a quantizer with another profile.
    #[error("payload profile {found:?} does not match this quantizer's {expected:?}")]
    ForeignProfile {
        /// The payload's profile.
        found: Profile,
        /// Ours.
        expected: Profile,
    },
    /// A rotation code this build does not know.
    #[error("unknown rotation code {code} in payload header")]
    BadRotation {
        /// The byte found.
        code: u8,
    },
    /// Same profile, different codebook (another build or version of the construction).
    #[error("payload codebook digest {found:#018x} does not match {expected:#018x}")]
    CodebookMismatch {
        /// The payload's digest.
        found: u64,
        /// Ours.
        expected: u64,
    },
    /// The body is not `count × code_bytes` long.
    #[error("payload body is {got} bytes, expected {expected}")]
    Length {
        /// Expected body length.
        expected: usize,
        /// Actual body length.
        got: usize,
    },
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

const CODEBOOK_MAGIC: &[u8; 4] = b"FQCB";
const CODEBOOK_HEADER: usize = 12;

/// Serializes a codebook: magic "FQCB", version (u16), k (u8), 0 (u8), N (u32), the N·k
/// codewords as little-endian f32, then xxh3-64 of every byte before it (which doubles as the
/// codebook's digest on disk).
pub fn codebook_to_bytes(codebook: &Codebook) -> Vec<u8> {
    let mut out = Vec::with_capacity(CODEBOOK_HEADER + codebook.words().len() * 4 + CHECKSUM);
    out.extend_from_slice(CODEBOOK_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(codebook.k() as u8);
    out.push(0);
    out.extend_from_slice(&(codebook.len() as u32).to_le_bytes());
    out.extend(codebook.words().iter().flat_map(|w| w.to_le_bytes()));
    let checksum = xxh3_64(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    out
}

/// Reads a codebook written by [`codebook_to_bytes`]; anything else is a typed error.
pub fn codebook_from_bytes(bytes: &[u8]) -> Result<Codebook, PayloadError> {
    if bytes.len() < CODEBOOK_HEADER + CHECKSUM {
        return Err(PayloadError::Truncated { len: bytes.len() });
    }
    let (content, checksum) = bytes.split_at(bytes.len() - CHECKSUM);
    if xxh3_64(content) != u64_at(checksum, 0) {
        return Err(PayloadError::Checksum);
    }
    if &content[..4] != CODEBOOK_MAGIC {
        return Err(PayloadError::BadMagic);
    }
    let version = u16_at(content, 4);
    if version != VERSION {
        return Err(PayloadError::Version { found: version });
    }
    let (k, n) = (content[6] as usize, u32_at(content, 8) as usize);
    let body = &content[CODEBOOK_HEADER..];
    let expected = n.saturating_mul(k).saturating_mul(4);
    if !(1..=8).contains(&k) || !(2..=65_536).contains(&n) || body.len() != expected {
        return Err(PayloadError::Length {
            expected,
            got: body.len(),
        });
    }
    let words: Vec<f32> = body
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if !words.iter().all(|w| w.is_finite()) {
        return Err(PayloadError::Checksum);
    }
    Ok(Codebook::from_words(k, words))
}

impl FibQuant {
    /// Digest of the codebook: xxh3-64 of its codewords' little-endian f32 bytes.
    pub fn codebook_digest(&self) -> u64 {
        let bytes: Vec<u8> = self
            .codebook
            .words()
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        xxh3_64(&bytes)
    }

    /// Wraps `codes` (a whole number of codes of this quantizer) in a payload.
    pub fn to_payload(&self, codes: &[u8]) -> Result<Vec<u8>, PayloadError> {
        let code = self.code_bytes();
        if !codes.len().is_multiple_of(code) {
            return Err(PayloadError::Length {
                expected: codes.len() / code * code,
                got: codes.len(),
            });
        }
        let p = self.profile;
        let mut out = Vec::with_capacity(HEADER + codes.len() + CHECKSUM);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(p.d as u32).to_le_bytes());
        out.push(p.k as u8);
        out.push(p.rotation.code());
        out.extend_from_slice(&(p.n as u32).to_le_bytes());
        out.extend_from_slice(&p.seed.to_le_bytes());
        out.extend_from_slice(&self.codebook_digest().to_le_bytes());
        out.extend_from_slice(&((codes.len() / code) as u32).to_le_bytes());
        out.extend_from_slice(codes);
        let checksum = xxh3_64(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        Ok(out)
    }

    /// Checks a payload and returns its codes. Checks run cheapest-first on untrusted bytes:
    /// length, checksum, then header fields against this quantizer.
    pub fn from_payload<'a>(&self, payload: &'a [u8]) -> Result<&'a [u8], PayloadError> {
        if payload.len() < HEADER + CHECKSUM {
            return Err(PayloadError::Truncated { len: payload.len() });
        }
        let (content, checksum) = payload.split_at(payload.len() - CHECKSUM);
        if xxh3_64(content) != u64_at(checksum, 0) {
            return Err(PayloadError::Checksum);
        }
        if &content[..4] != MAGIC {
            return Err(PayloadError::BadMagic);
        }
        let version = u16_at(content, 4);
        if version != VERSION {
            return Err(PayloadError::Version { found: version });
        }
        let found = Profile {
            d: u32_at(content, 6) as usize,
            k: content[10] as usize,
            n: u32_at(content, 12) as usize,
            seed: u64_at(content, 16),
            rotation: RotationKind::from_code(content[11])
                .ok_or(PayloadError::BadRotation { code: content[11] })?,
        };
        if found != self.profile {
            return Err(PayloadError::ForeignProfile {
                found,
                expected: self.profile,
            });
        }
        let digest = u64_at(content, 24);
        if digest != self.codebook_digest() {
            return Err(PayloadError::CodebookMismatch {
                found: digest,
                expected: self.codebook_digest(),
            });
        }
        let count = u32_at(content, 32) as usize;
        let body = &content[HEADER..];
        let expected = count.saturating_mul(self.code_bytes());
        if body.len() != expected {
            return Err(PayloadError::Length {
                expected,
                got: body.len(),
            });
        }
        Ok(body)
    }
}
