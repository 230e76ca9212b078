//! FibQuant pages (DESIGN §5–6): each token's vector is one FibQuant code.
//!
//! ```text
//!  page = [token 0: ν f16 | indices][token 1: ...] ... [token block_size-1]
//! ```
//!
//! Keys and values use the same per-token layout. The quantizer (codebook and rotation) of a
//! profile is built once per process and shared by every page and cache.

use fibquant::FibQuant;

use super::Codec;
use crate::error::{KvError, Result};

fn quantizer(codec: Codec, head_dim: usize) -> Result<std::sync::Arc<FibQuant>> {
    let profile = codec
        .fibquant_profile(head_dim)
        .ok_or(KvError::UnsupportedCodec {
            codec: codec.to_string(),
            reason: "not a FibQuant codec",
        })?;
    Ok(FibQuant::shared(profile)?)
}

/// Encodes `rows` (block_size × head_dim) token by token into `out`.
pub(crate) fn encode_page(
    codec: Codec,
    rows: &[f32],
    head_dim: usize,
    out: &mut [u8],
) -> Result<()> {
    Ok(quantizer(codec, head_dim)?.encode_rows(rows, out)?)
}

/// Decodes a page token by token into `out` (block_size × head_dim).
pub(crate) fn decode_page(
    codec: Codec,
    page: &[u8],
    head_dim: usize,
    out: &mut [f32],
) -> Result<()> {
    Ok(quantizer(codec, head_dim)?.decode_rows(page, out)?)
}
