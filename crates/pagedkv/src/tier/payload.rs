//! The stored form of one block outside the pool (DESIGN §8): a versioned header naming the
//! layout, the block's prefix key and tokens, the block image, and a checksum over everything.
//!
//! ```text
//!  offset  size  field
//!       0     4  magic "PKVB"
//!       4     2  format version (3: FibQuant pages with one-byte norms), little-endian
//!       6     1  flags: bit 0 open (f32 staging rows), bit 1 has a prefix key, bit 2 sink rows
//!       7     1  0
//!       8     8  layout digest (xxh3-64 of the layout's digest bytes: geometry and codecs)
//!      16    16  prefix key of the block (0 without one)
//!      32     4  token count n
//!      36  4·n   token ids
//!       …     4  image length m
//!       …     m  block image (`KvStorage::export_block`)
//!   end-8     8  xxh3-64 of every byte before it
//! ```
//!
//! Decoding checks, cheapest first: length, checksum, magic, version, layout, then the shape of
//! the body; anything else is a typed error and never reaches the pool.

use xxhash_rust::xxh3::xxh3_64;

use crate::layout::KvLayout;
use crate::prefix::BlockHash;
use crate::storage::ImageKind;

const MAGIC: &[u8; 4] = b"PKVB";
/// Current format version.
pub const VERSION: u16 = 3;
const FIXED_HEADER: usize = 36;
const CHECKSUM: usize = 8;

/// Why a block payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Too short to hold header and checksum.
    #[error("block payload truncated: {len} bytes")]
    Truncated {
        /// Its length.
        len: usize,
    },
    /// The checksum does not match: corrupted (or truncated or extended) bytes.
    #[error("block payload checksum mismatch (corrupted data)")]
    Checksum,
    /// Not a pagedkv block payload.
    #[error("not a pagedkv block payload (bad magic)")]
    BadMagic,
    /// A format version this build does not read.
    #[error("unsupported block payload version {found} (this build reads {VERSION})")]
    Version {
        /// The version found.
        found: u16,
    },
    /// Written for another layout (geometry or codecs).
    #[error(
        "block payload belongs to another layout (digest {found:#018x}, ours {expected:#018x})"
    )]
    ForeignLayout {
        /// The payload's layout digest.
        found: u64,
        /// Ours.
        expected: u64,
    },
    /// Fields inconsistent with each other or with the layout.
    #[error("malformed block payload: {0}")]
    Malformed(&'static str),
}

/// A decoded block payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockPayload<'a> {
    /// What the image holds: f32 staging rows (open) or pages, and sink rows.
    pub kind: ImageKind,
    /// Its prefix key, if it is a full, committed block.
    pub hash: Option<BlockHash>,
    /// Token ids stored in the block.
    pub tokens: Vec<u32>,
    /// The block image.
    pub image: &'a [u8],
}

/// xxh3-64 of the layout's digest bytes: the payload's layout check.
pub fn layout_digest(layout: &KvLayout) -> u64 {
    xxh3_64(&layout.digest_bytes())
}

/// Encodes a block payload.
pub fn encode(
    layout: &KvLayout,
    kind: ImageKind,
    hash: Option<BlockHash>,
    tokens: &[u32],
    image: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_HEADER + 4 * tokens.len() + 4 + image.len() + CHECKSUM);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(u8::from(kind.open) | (u8::from(hash.is_some()) << 1) | (u8::from(kind.sinks) << 2));
    out.push(0);
    out.extend_from_slice(&layout_digest(layout).to_le_bytes());
    out.extend_from_slice(&hash.map_or(0, |h| h.0).to_le_bytes());
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    out.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    out.extend_from_slice(&(image.len() as u32).to_le_bytes());
    out.extend_from_slice(image);
    let checksum = xxh3_64(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    out
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Decodes and checks a payload for `layout`; `image_bytes(kind)` is the image length the
/// storage expects.
pub fn decode<'a>(
    layout: &KvLayout,
    payload: &'a [u8],
    image_bytes: impl Fn(ImageKind) -> usize,
) -> Result<BlockPayload<'a>, PayloadError> {
    if payload.len() < FIXED_HEADER + 4 + CHECKSUM {
        return Err(PayloadError::Truncated { len: payload.len() });
    }
    let (content, checksum) = payload.split_at(payload.len() - CHECKSUM);
    let stored = u64::from_le_bytes(checksum.try_into().expect("8 bytes"));
    if xxh3_64(content) != stored {
        return Err(PayloadError::Checksum);
    }
    if &content[..4] != MAGIC {
        return Err(PayloadError::BadMagic);
    }
    let version = u16::from_le_bytes([content[4], content[5]]);
    if version != VERSION {
        return Err(PayloadError::Version { found: version });
    }
    let flags = content[6];
    if flags & !0b111 != 0 || content[7] != 0 {
        return Err(PayloadError::Malformed("unknown flags"));
    }
    let digest = u64::from_le_bytes(content[8..16].try_into().expect("8 bytes"));
    let expected = layout_digest(layout);
    if digest != expected {
        return Err(PayloadError::ForeignLayout {
            found: digest,
            expected,
        });
    }
    let kind = ImageKind {
        open: flags & 1 != 0,
        sinks: flags & 4 != 0,
    };
    let raw_hash = u128::from_le_bytes(content[16..32].try_into().expect("16 bytes"));
    let hash = match (flags & 2 != 0, raw_hash) {
        (true, h) => Some(BlockHash(h)),
        (false, 0) => None,
        (false, _) => return Err(PayloadError::Malformed("prefix key without its flag")),
    };
    let count = u32_at(content, 32).ok_or(PayloadError::Malformed("token count"))? as usize;
    if count > layout.block_size() {
        return Err(PayloadError::Malformed("more tokens than a block holds"));
    }
    // a keyed block is full; its tokens are recorded (swap) or left out (prefix demotion,
    // where the key alone names them)
    if hash.is_some() && count != layout.block_size() && count != 0 {
        return Err(PayloadError::Malformed("a keyed block must be full"));
    }
    let tokens_end = FIXED_HEADER + 4 * count;
    let tokens = content
        .get(FIXED_HEADER..tokens_end)
        .ok_or(PayloadError::Malformed("token ids"))?
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let image_len =
        u32_at(content, tokens_end).ok_or(PayloadError::Malformed("image length"))? as usize;
    let image = &content[tokens_end + 4..];
    if image.len() != image_len || image_len != image_bytes(kind) {
        return Err(PayloadError::Malformed(
            "image length does not match the layout",
        ));
    }
    Ok(BlockPayload {
        kind,
        hash,
        tokens,
        image,
    })
}
