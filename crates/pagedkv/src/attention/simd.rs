//! Which instruction sets a pass may use. By default the widest this CPU has; tests force each
//! level the CPU can run, so every path is checked against the reference on every machine and
//! says which it was.

use std::fmt;
use std::sync::OnceLock;

use crate::error::{KvError, Result};

/// A dispatch level of the attention kernel, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Simd {
    /// The baseline target: no SIMD beyond what the build enables (x86-64: SSE2).
    Portable,
    /// AVX2 with FMA and F16C: the hand-written 256-bit page loops and whole-block kernel.
    Avx2,
    /// AVX-512 (F, with AVX2, FMA and F16C): the hand-written page and whole-block loops.
    Avx512,
}

impl Simd {
    /// Every level, narrowest first.
    pub const ALL: [Simd; 3] = [Simd::Portable, Simd::Avx2, Simd::Avx512];

    /// Whether this CPU can run the level.
    pub fn available(self) -> bool {
        match self {
            Simd::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => {
                use std::arch::is_x86_feature_detected as has;
                has!("avx2") && has!("fma") && has!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => {
                use std::arch::is_x86_feature_detected as has;
                has!("avx512f") && has!("avx2") && has!("fma") && has!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest level this CPU can run (detected once: every attention call asks).
    pub fn widest() -> Simd {
        static WIDEST: OnceLock<Simd> = OnceLock::new();
        *WIDEST.get_or_init(|| {
            Self::ALL
                .into_iter()
                .rev()
                .find(|level| level.available())
                .unwrap_or(Simd::Portable)
        })
    }

    /// Every level this CPU can run, narrowest first.
    pub fn levels() -> Vec<Simd> {
        Self::ALL.into_iter().filter(|l| l.available()).collect()
    }

    /// `self` if this CPU can run it, else an error naming it.
    pub fn check(self) -> Result<Simd> {
        if self.available() {
            Ok(self)
        } else {
            Err(KvError::UnsupportedCpu {
                level: self.to_string(),
            })
        }
    }
}

impl fmt::Display for Simd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Simd::Portable => "portable",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
        })
    }
}
