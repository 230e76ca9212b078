//! Codec names and their storage cost (DESIGN §5).
//!
//! A codec says how one page — the keys or the values of one (layer, kv head) in one block — is
//! stored. This module is the single place that knows each codec's name and its exact byte size,
//! so capacity planning and the prefix-hash `extra` key agree with the arenas.

pub mod page_layout;
pub mod scalar;
pub mod synthetic;
pub mod vector;

use std::fmt;
use std::str::FromStr;

use crate::error::{KvError, Result};
pub use page_layout::{PageLayout, Params};

/// Whether a page holds keys or values: the quantized codecs group them differently
/// (keys per channel over the block's tokens, values per token, as KIVI does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Key vectors.
    Key,
    /// Value vectors.
    Value,
}

/// Seed of every FibQuant codebook and rotation in the cache.
pub const FIBQUANT_SEED: u64 = 0x5EED_F1B0;

/// Group size of the per-token value scales of the integer codecs.
pub const VALUE_GROUP: usize = 32;

/// The codecs the library knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// IEEE f32, stored as is.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// FP8 e4m3 with scales (per channel for keys, per token for values).
    Fp8E4m3,
    /// FP8 e5m2 with scales.
    Fp8E5m2,
    /// 8-bit asymmetric integers with f16 scale and zero point.
    Int8,
    /// 4-bit asymmetric integers, two per byte, with f16 scale and zero point.
    Int4,
    /// 2-bit asymmetric integers, four per byte, with f16 scale and zero point (KIVI-2's
    /// grouping: keys per channel, values per token).
    Int2,
    /// FibQuant vector quantization: blocks of `k` coordinates, `n` codewords.
    FibQuant {
        /// Coordinates per codeword.
        k: u8,
        /// Codebook size.
        n: u32,
    },
}

impl Codec {
    /// Every fixed codec name, for error messages and help text.
    pub const FIXED: [Codec; 8] = [
        Codec::F32,
        Codec::F16,
        Codec::Bf16,
        Codec::Fp8E4m3,
        Codec::Fp8E5m2,
        Codec::Int8,
        Codec::Int4,
        Codec::Int2,
    ];

    /// The list of valid names as shown to users.
    pub fn valid_names() -> String {
        let mut names: Vec<String> = Self::FIXED.iter().map(|c| c.to_string()).collect();
        names.push("fibquant-k{K}n{N} (e.g. fibquant-k2n256, fibquant-k4n256)".to_string());
        names.join(", ")
    }

    /// True for codecs whose pages are stored as plain floats (no sealing step needed).
    pub fn is_full_precision(self) -> bool {
        matches!(self, Codec::F32 | Codec::F16 | Codec::Bf16)
    }

    /// Bytes of one page: `block_size` tokens of `head_dim` elements for one (layer, kv head).
    pub fn page_bytes(self, role: Role, block_size: usize, head_dim: usize) -> Result<usize> {
        let bytes = match self {
            Codec::FibQuant { .. } => self
                .fibquant_profile(head_dim)
                .and_then(|profile| vector::page_bytes(profile, block_size)),
            _ => PageLayout::scalar(self, role, block_size, head_dim).map(|l| l.page_bytes()),
        };
        bytes.ok_or(KvError::SizeOverflow { what: "page bytes" })
    }

    /// Storage cost in bits per stored element, scales and norms included.
    pub fn bits_per_element(self, role: Role, block_size: usize, head_dim: usize) -> Result<f64> {
        let bytes = self.page_bytes(role, block_size, head_dim)?;
        Ok(bytes as f64 * 8.0 / (block_size * head_dim) as f64)
    }

    /// Checks that the codec can store vectors of `head_dim` elements.
    pub fn check_head_dim(self, head_dim: usize) -> Result<()> {
        if let Codec::FibQuant { k, .. } = self {
            if !head_dim.is_multiple_of(k as usize) {
                return Err(KvError::UnsupportedCodec {
                    codec: self.to_string(),
                    reason: "head_dim must be a multiple of the FibQuant block size k",
                });
            }
            if !head_dim.is_power_of_two() {
                return Err(KvError::UnsupportedCodec {
                    codec: self.to_string(),
                    reason: "FibQuant's fast rotation needs a power-of-two head_dim",
                });
            }
        }
        Ok(())
    }

    /// The FibQuant profile of this codec for vectors of `head_dim` (one fixed seed, so every
    /// cache of the same codec shares codebook and rotation).
    pub fn fibquant_profile(self, head_dim: usize) -> Option<fibquant::Profile> {
        match self {
            Codec::FibQuant { k, n } => Some(fibquant::Profile::new(
                head_dim,
                k as usize,
                n as usize,
                FIBQUANT_SEED,
            )),
            _ => None,
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::F32 => f.write_str("f32"),
            Codec::F16 => f.write_str("f16"),
            Codec::Bf16 => f.write_str("bf16"),
            Codec::Fp8E4m3 => f.write_str("fp8-e4m3"),
            Codec::Fp8E5m2 => f.write_str("fp8-e5m2"),
            Codec::Int8 => f.write_str("int8"),
            Codec::Int4 => f.write_str("int4"),
            Codec::Int2 => f.write_str("int2"),
            Codec::FibQuant { k, n } => write!(f, "fibquant-k{k}n{n}"),
        }
    }
}

impl FromStr for Codec {
    type Err = KvError;

    fn from_str(name: &str) -> Result<Self> {
        let unknown = || KvError::UnknownCodec {
            name: name.to_string(),
            valid: Codec::valid_names(),
        };
        if let Some(fixed) = Self::FIXED.iter().find(|c| c.to_string() == name) {
            return Ok(*fixed);
        }
        let rest = name.strip_prefix("fibquant-k").ok_or_else(unknown)?;
        let (k, n) = rest.split_once('n').ok_or_else(unknown)?;
        let k: u8 = k.parse().map_err(|_| unknown())?;
        let n: u32 = n.parse().map_err(|_| unknown())?;
        // k: coordinates per codeword; N: at least 2 codewords, indices up to 16 bits.
        if !(1..=8).contains(&k) || !(2..=65_536).contains(&n) {
            return Err(unknown());
        }
        Ok(Codec::FibQuant { k, n })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for c in Codec::FIXED {
            assert_eq!(c.to_string().parse::<Codec>().unwrap(), c);
        }
        let fq: Codec = "fibquant-k4n256".parse().unwrap();
        assert_eq!(fq, Codec::FibQuant { k: 4, n: 256 });
        assert_eq!(fq.to_string(), "fibquant-k4n256");
    }

    #[test]
    fn unknown_names_list_valid_ones() {
        for bad in [
            "int3",
            "",
            "fibquant-k0n16",
            "fibquant-k2n1",
            "fibquant-k2n70000",
            "F16",
        ] {
            match bad.parse::<Codec>() {
                Err(KvError::UnknownCodec { valid, .. }) => assert!(valid.contains("int4")),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn page_bytes_match_the_design_table() {
        let (bs, d) = (16, 64);
        assert_eq!(Codec::F32.page_bytes(Role::Key, bs, d).unwrap(), 4096);
        assert_eq!(Codec::F16.page_bytes(Role::Value, bs, d).unwrap(), 2048);
        // int8 keys: 1 byte per element + f16 scale and zero per channel
        assert_eq!(
            Codec::Int8.page_bytes(Role::Key, bs, d).unwrap(),
            1024 + 64 * 4
        );
        // int4 values: half a byte per element + scale and zero per token per 32 channels
        assert_eq!(
            Codec::Int4.page_bytes(Role::Value, bs, d).unwrap(),
            512 + 16 * 2 * 4
        );
        // int2 keys: a quarter byte per element + scale and zero per channel = 4 bits/element;
        // values: + scale and zero per token per 32 channels = 3 bits/element
        assert_eq!(
            Codec::Int2.page_bytes(Role::Key, bs, d).unwrap(),
            256 + 64 * 4
        );
        assert_eq!(
            Codec::Int2.bits_per_element(Role::Value, bs, d).unwrap(),
            3.0
        );
        // fibquant k2 N256: 32 indices of 8 bits + a norm byte per token, the page's largest
        // norm in f16: (2 + 16·33)·8 / 1024 = 4.140625 bits/element
        let fq = Codec::FibQuant { k: 2, n: 256 };
        assert_eq!(fq.bits_per_element(Role::Key, bs, d).unwrap(), 4.140625);
        let fq = Codec::FibQuant { k: 4, n: 256 };
        assert_eq!(fq.bits_per_element(Role::Key, bs, d).unwrap(), 2.140625);
    }

    #[test]
    fn fibquant_needs_a_divisible_power_of_two_head_dim() {
        assert!(Codec::FibQuant { k: 3, n: 64 }.check_head_dim(64).is_err());
        assert!(Codec::FibQuant { k: 2, n: 64 }.check_head_dim(96).is_err());
        assert!(Codec::FibQuant { k: 2, n: 64 }.check_head_dim(64).is_ok());
    }
}
