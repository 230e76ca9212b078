//! The AVX2 twin of [`super::tiles`], for machines without AVX-512 VNNI: a block's 16 columns
//! are two halves of 8 (one per 256-bit register), and each register's 4 inputs × 8 columns
//! are multiplied by `vpmaddubsw` (u8 × i8, adjacent pairs summed to i16) and `vpmaddwd` by
//! ones (pairs of pairs to i32). A layout chooses the operands so that no pair saturates i16
//! ([`Avx2Layout::dot`]); the integer sums are then exact — the offset-free `Σ w·x`, which
//! `vpdpbusd` reaches for the 8-bit layout only after subtracting its +128 offset — and the
//! f32 steps per (row, column) are the scalar twin's, so every path gives the same bits.

use std::arch::x86_64::*;

use super::{by_row_tiles, QActivations, BLOCK, LANES};

/// What a weight layout gives the AVX2 loop.
///
/// # Safety
/// [`Self::check_group`] panics unless group `g`'s weights and parameters exist for every
/// block of [`Self::inputs`] inputs, and [`Self::register`] and [`Self::params`] read nothing
/// else: the loop's unchecked reads rely on it.
pub(super) unsafe trait Avx2Layout {
    /// Per-(group, block, half) values the scaling needs.
    type Params: Copy;
    /// Inputs (a multiple of 32).
    fn inputs(&self) -> usize;
    /// Asserts that group `g` lies inside the layout's arrays.
    fn check_group(&self, g: usize);
    /// Group `g`, block `b`, columns `8h .. 8h + 8`: the parameters.
    ///
    /// # Safety
    /// AVX2, FMA and F16C present; `g` checked, `b < inputs / 32`, `h < 2`.
    unsafe fn params(&self, g: usize, b: usize, h: usize) -> Self::Params;
    /// Group `g`, block `b`, columns `8h .. 8h + 8`: inputs `4t .. 4t + 4`, as [`Self::dot`]
    /// takes them.
    ///
    /// # Safety
    /// As [`Self::params`]; `t < 8`.
    unsafe fn register(&self, g: usize, b: usize, t: usize, h: usize) -> __m256i;
    /// The 8 columns' integer dot products `Σ w·x` of a register with 4 activation bytes (`x`,
    /// the same 4 in every lane), with no offset left to undo.
    ///
    /// # Safety
    /// AVX2 present.
    unsafe fn dot(w: __m256i, x: __m256i) -> __m256i;
    /// `acc` plus the block's contribution for a row (as [`super::tiles::Layout::accumulate`]).
    ///
    /// # Safety
    /// AVX2 and FMA present.
    unsafe fn accumulate(
        acc: __m256,
        dot: __m256i,
        params: Self::Params,
        s: f32,
        sum: i32,
    ) -> __m256;
}

/// Group `g`'s 16 outputs for every row of `x` into `dst` (`rows × 16`).
///
/// # Safety
/// AVX2, FMA and F16C present.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn group<W: Avx2Layout>(w: &W, g: usize, x: &QActivations, dst: &mut [f32]) {
    w.check_group(g);
    x.assert_fits(w.inputs(), dst);
    by_row_tiles!(tile::<W>(w, g, x, dst), [4, 2]);
}

/// Group `g`'s outputs for rows `row .. row + T`; returns `T`.
///
/// # Safety
/// As [`group`], after its checks; `row + T ≤ x.rows`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<W: Avx2Layout, const T: usize>(
    w: &W,
    g: usize,
    x: &QActivations,
    dst: &mut [f32],
    row: usize,
) -> usize {
    let blocks = w.inputs() / BLOCK;
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    for b in 0..blocks {
        for h in [0, 1] {
            // SAFETY: g checked, b < blocks, h < 2; the features (this function's contract).
            let params = unsafe { w.params(g, b, h) };
            let mut dot = [_mm256_setzero_si256(); T];
            for t in 0..BLOCK / 4 {
                // SAFETY: as for the parameters; t < 8.
                let reg = unsafe { w.register(g, b, t, h) };
                for (i, dot) in dot.iter_mut().enumerate() {
                    // SAFETY: bytes 4t .. 4t+4 of row (row + i)'s block b: row + i < rows; AVX2.
                    unsafe {
                        let four = _mm256_set1_epi32(x.q_word(row + i, b, t));
                        *dot = _mm256_add_epi32(*dot, W::dot(reg, four));
                    }
                }
            }
            for (i, dot) in dot.into_iter().enumerate() {
                // SAFETY: row + i < rows, b < blocks; AVX2 and FMA present.
                unsafe {
                    let (s, sum) = x.block_scale_and_sum(row + i, b);
                    acc[i][h] = W::accumulate(acc[i][h], dot, params, s, sum);
                }
            }
        }
    }
    for (i, halves) in acc.iter().enumerate() {
        for (h, half) in halves.iter().enumerate() {
            // SAFETY: dst holds rows × 16 floats (asserted by `group`); row + i < rows.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add((row + i) * LANES + 8 * h), *half) };
        }
    }
    T
}
