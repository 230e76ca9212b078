//! The one error type of the library. Every variant carries the facts a caller needs to act
//! (how many blocks were missing, which sequence, which field), never a string to parse.

use crate::block::BlockId;
use crate::table::SeqId;

/// Errors returned by `pagedkv`. A failed operation leaves the cache exactly as it was.
#[derive(Debug, thiserror::Error, PartialEq, Clone)]
pub enum KvError {
    /// A layout field that must be positive was zero.
    #[error("invalid layout: `{field}` must be greater than zero")]
    ZeroDimension {
        /// The offending field.
        field: &'static str,
    },
    /// Grouped-query attention needs every kv head to serve the same number of query heads.
    #[error(
        "invalid layout: query_heads ({query_heads}) is not a multiple of kv_heads ({kv_heads})"
    )]
    QueryHeadsNotMultiple {
        /// Query heads requested.
        query_heads: usize,
        /// Key/value heads requested.
        kv_heads: usize,
    },
    /// A size computed from the layout does not fit the machine's integers.
    #[error("size overflow while computing {what}")]
    SizeOverflow {
        /// The quantity being computed.
        what: &'static str,
    },
    /// A layout field is larger than the library supports.
    #[error("invalid layout: `{field}` = {value} exceeds the supported maximum {max}")]
    TooLarge {
        /// The offending field.
        field: &'static str,
        /// The value given.
        value: usize,
        /// The largest accepted value.
        max: usize,
    },
    /// The codec name is not one the library knows.
    #[error("unknown codec `{name}`; valid codecs: {valid}")]
    UnknownCodec {
        /// The name given.
        name: String,
        /// Comma-separated list of valid names.
        valid: String,
    },
    /// The codec exists but this component cannot store it yet.
    #[error("codec `{codec}` is not supported here: {reason}")]
    UnsupportedCodec {
        /// Codec name.
        codec: String,
        /// Why.
        reason: &'static str,
    },
    /// An attention dispatch level was asked for that this CPU cannot run.
    #[error("this CPU cannot run the {level} attention kernels")]
    UnsupportedCpu {
        /// The level asked for.
        level: String,
    },
    /// Not enough free (or evictable) blocks; nothing was allocated.
    #[error("out of KV blocks: needed {needed}, free {free}")]
    OutOfBlocks {
        /// Blocks the operation needed.
        needed: usize,
        /// Blocks that were free or evictable.
        free: usize,
    },
    /// No sequence with this id is registered.
    #[error("unknown sequence {0:?}")]
    UnknownSequence(SeqId),
    /// No pin with this id is held.
    #[error("unknown pin {0}")]
    UnknownPin(u64),
    /// A sequence with this id already exists.
    #[error("sequence {0:?} already exists")]
    SequenceExists(SeqId),
    /// The block id is outside the pool or not in the state the operation requires.
    #[error("invalid block {0:?}")]
    InvalidBlock(BlockId),
    /// A slice had the wrong length for the layout.
    #[error("shape mismatch for {what}: expected {expected}, got {got}")]
    ShapeMismatch {
        /// What was being passed.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Length received.
        got: usize,
    },
    /// An index (layer, head, position) is outside its range.
    #[error("{what} index {index} out of range (limit {limit})")]
    IndexOutOfRange {
        /// What kind of index.
        what: &'static str,
        /// The index given.
        index: usize,
        /// The exclusive upper bound.
        limit: usize,
    },
    /// Writing K/V at a position that is already committed (possibly shared) or not reserved.
    #[error("position {pos} of {seq:?} is not writable: committed {committed}, reserved up to {capacity}")]
    PositionNotWritable {
        /// The sequence.
        seq: SeqId,
        /// The position given.
        pos: usize,
        /// Tokens already committed (read-only).
        committed: usize,
        /// Token capacity of the reserved blocks.
        capacity: usize,
    },
    /// Writing or committing K/V in a block another sequence also holds (after a fork, before
    /// a `reserve` made a private copy).
    #[error(
        "{seq:?} writes into {block:?}, which another sequence shares since a fork: reserve again for a private copy"
    )]
    SharedBlockWrite {
        /// The sequence.
        seq: SeqId,
        /// The shared block.
        block: BlockId,
    },
    /// Input contained NaN or infinity.
    #[error("non-finite value (NaN or infinity) in {what}")]
    NonFinite {
        /// What was being passed.
        what: &'static str,
    },
    /// A key normalization that cannot serve the layout (geometry, means or scales).
    #[error("invalid key normalization: {0}")]
    InvalidKeyNorm(String),
    /// A value is too large for the codec's f16 scales and zero points.
    #[error("value out of range for codec `{codec}`: magnitudes above {max} cannot be stored")]
    ValueOutOfRange {
        /// Codec name.
        codec: String,
        /// The largest accepted magnitude.
        max: f32,
    },
    /// The FibQuant quantizer refused a vector or a code.
    #[error(transparent)]
    FibQuant(#[from] fibquant::FibQuantError),
    /// A block payload from a tier was refused.
    #[error(transparent)]
    Payload(#[from] crate::tier::payload::PayloadError),
    /// A tier's file operation failed.
    #[error("tier I/O on {path}: {message}")]
    Io {
        /// The file or directory.
        path: String,
        /// The operating system's message.
        message: String,
    },
    /// A swapped-out sequence's payloads are missing from the tiers.
    #[error("swapped-out block {index} of {seq:?} is missing from the tiers")]
    SwappedBlockMissing {
        /// The sequence.
        seq: crate::table::SeqId,
        /// Index of the block in its table.
        index: usize,
    },
    /// A prompt must hold at least one token.
    #[error("empty prompt for {0:?}")]
    EmptyPrompt(SeqId),
}

/// Result alias for the library.
pub type Result<T> = std::result::Result<T, KvError>;
