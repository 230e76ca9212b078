//! Where the parts of a scalar codec's page lie: its codes, then the parameters that turn
//! codes back into values (DESIGN §5). The one description the encoder (`scalar`), the page
//! readers and the whole-block kernel (`attention`) and the size accounting ([`Codec::page_bytes`])
//! all read, so none of them can disagree about an offset. A `const fn`, so the whole-block
//! kernel's offsets are compile-time constants.
//!
//! ```text
//!  page = [codes][parameters]
//!  f32/f16/bf16   codes: the elements, little-endian                      parameters: none
//!  int8/int4/int2 codes: 8, 4 or 2 bits each, packed along the stored axis (a key channel's
//!                 tokens, a value token's channels), low bits first
//!                 keys:   [scale f16, zero f16] per channel
//!                 values: [scale f16, zero f16] per token and group of VALUE_GROUP channels
//!  fp8 e4m3/e5m2  codes: one byte each        keys: f16 scale per channel; values: per token
//! ```

use super::{Codec, Role, VALUE_GROUP};

/// What follows a page's codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Params {
    /// Nothing: the codes are the elements (f32, f16, bf16).
    None,
    /// An f16 (scale, zero) pair per key channel (integer codecs).
    ChannelPairs,
    /// An f16 scale per key channel (fp8).
    ChannelScales,
    /// An f16 (scale, zero) pair per value token and group of [`VALUE_GROUP`] channels
    /// (integer codecs), token by token.
    TokenGroupPairs,
    /// An f16 scale per value token (fp8).
    TokenScales,
}

/// One page of a scalar codec: `block_size` tokens × `head_dim` elements of one role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLayout {
    /// Bytes of the codes, at the start of the page.
    pub code_bytes: usize,
    /// What the parameters after the codes are.
    pub params: Params,
    /// Bytes of the parameters.
    pub param_bytes: usize,
}

impl PageLayout {
    /// The layout of a page of a scalar codec; `None` for FibQuant (whose pages the
    /// `vector` module describes) or when the sizes overflow.
    pub const fn scalar(
        codec: Codec,
        role: Role,
        block_size: usize,
        head_dim: usize,
    ) -> Option<Self> {
        let Some(elements) = block_size.checked_mul(head_dim) else {
            return None;
        };
        let (code_bytes, params) = match codec {
            Codec::F32 => (elements.checked_mul(4), Params::None),
            Codec::F16 | Codec::Bf16 => (elements.checked_mul(2), Params::None),
            Codec::Fp8E4m3 | Codec::Fp8E5m2 => match role {
                Role::Key => (Some(elements), Params::ChannelScales),
                Role::Value => (Some(elements), Params::TokenScales),
            },
            Codec::Int8 | Codec::Int4 | Codec::Int2 => {
                let per_byte = 8 / code_bits(codec);
                match role {
                    Role::Key => (
                        head_dim.checked_mul(block_size.div_ceil(per_byte)),
                        Params::ChannelPairs,
                    ),
                    Role::Value => (
                        block_size.checked_mul(head_dim.div_ceil(per_byte)),
                        Params::TokenGroupPairs,
                    ),
                }
            }
            Codec::FibQuant { .. } => return None,
        };
        let param_bytes = match params {
            Params::None => Some(0),
            Params::ChannelPairs => head_dim.checked_mul(4),
            Params::ChannelScales => head_dim.checked_mul(2),
            Params::TokenGroupPairs => match block_size.checked_mul(head_dim.div_ceil(VALUE_GROUP))
            {
                Some(pairs) => pairs.checked_mul(4),
                None => None,
            },
            Params::TokenScales => block_size.checked_mul(2),
        };
        match (code_bytes, param_bytes) {
            (Some(code_bytes), Some(param_bytes))
                if code_bytes.checked_add(param_bytes).is_some() =>
            {
                Some(Self {
                    code_bytes,
                    params,
                    param_bytes,
                })
            }
            _ => None,
        }
    }

    /// Bytes of one token's parameters in a page of `head_dim` channels whose parameters are
    /// per token (a value page); 0 for other pages.
    pub const fn token_param_bytes(&self, head_dim: usize) -> usize {
        match self.params {
            Params::TokenGroupPairs => head_dim.div_ceil(VALUE_GROUP) * 4,
            Params::TokenScales => 2,
            Params::None | Params::ChannelPairs | Params::ChannelScales => 0,
        }
    }

    /// Bytes of the whole page.
    pub const fn page_bytes(&self) -> usize {
        self.code_bytes + self.param_bytes
    }

    /// The page's codes and its parameters; an error if `page` is shorter than
    /// [`Self::page_bytes`].
    pub fn split<'a>(&self, page: &'a [u8]) -> crate::Result<(&'a [u8], &'a [u8])> {
        match page.split_at_checked(self.code_bytes) {
            Some((codes, rest)) if rest.len() >= self.param_bytes => {
                Ok((codes, &rest[..self.param_bytes]))
            }
            _ => Err(crate::KvError::ShapeMismatch {
                what: "page bytes",
                expected: self.page_bytes(),
                got: page.len(),
            }),
        }
    }
}

/// Bits of one stored code of an integer or fp8 codec: int4 and int2 pack several per byte.
pub const fn code_bits(codec: Codec) -> usize {
    match codec {
        Codec::Int4 => 4,
        Codec::Int2 => 2,
        _ => 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm_pages_match_the_design_table() {
        let page = |codec, role| PageLayout::scalar(codec, role, 16, 64).unwrap();
        assert_eq!(page(Codec::F16, Role::Key).page_bytes(), 2048);
        assert_eq!(
            page(Codec::Int8, Role::Key),
            PageLayout {
                code_bytes: 1024,
                params: Params::ChannelPairs,
                param_bytes: 256
            }
        );
        assert_eq!(page(Codec::Int4, Role::Value).code_bytes, 512);
        assert_eq!(page(Codec::Int4, Role::Value).param_bytes, 16 * 2 * 4);
        assert_eq!(page(Codec::Int2, Role::Key).code_bytes, 64 * 4);
        assert_eq!(page(Codec::Fp8E4m3, Role::Value).param_bytes, 32);
        let fib = Codec::FibQuant { k: 4, n: 256 };
        assert_eq!(PageLayout::scalar(fib, Role::Key, 16, 64), None);
        assert_eq!(
            PageLayout::scalar(Codec::F32, Role::Key, usize::MAX, 2),
            None
        );
    }

    #[test]
    fn a_short_page_is_an_error_not_a_panic() {
        let layout = PageLayout::scalar(Codec::Int4, Role::Key, 16, 64).unwrap();
        let page = vec![7u8; layout.page_bytes()];
        let (codes, params) = layout.split(&page).unwrap();
        assert_eq!((codes.len(), params.len()), (512, 256));
        for short in [0, 100, 512, layout.page_bytes() - 1] {
            assert!(matches!(
                layout.split(&page[..short]),
                Err(crate::KvError::ShapeMismatch { .. })
            ));
        }
    }
}
