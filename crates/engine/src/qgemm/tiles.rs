//! The AVX-512 VNNI loop both weight layouts share: per group of 16 columns, the rows in tiles
//! of 8, 4, 2 and 1 (a tile's sums stay in registers, and a block's weights are loaded once
//! per tile), each block's 8 weight registers multiplied with every row of the tile by
//! `vpdpbusd`, side by side so that the rows' chains overlap in the pipeline. A layout says
//! how it loads a block's registers and how a block's integer dot becomes f32 ([`Layout`]).

use std::arch::x86_64::*;

use super::{by_row_tiles, QActivations, BLOCK, LANES};

/// What a weight layout gives the shared loop.
///
/// # Safety
/// [`Self::check_group`] panics unless group `g`'s weights and parameters exist for every
/// block of [`Self::inputs`] inputs, and [`Self::registers`] reads nothing else: the loop's
/// unchecked reads rely on it.
pub(super) unsafe trait Layout {
    /// Per-(group, block) values the scaling needs (the block's weight scales).
    type Params: Copy;
    /// Inputs (a multiple of 32).
    fn inputs(&self) -> usize;
    /// Asserts that group `g` lies inside the layout's arrays.
    fn check_group(&self, g: usize);
    /// Group `g`, block `b`: register t holds inputs 4t .. 4t+4 of the 16 columns as u8.
    ///
    /// # Safety
    /// AVX-512F and AVX-512BW present (and what the layout's loads need); `g` checked by
    /// [`Self::check_group`], `b < inputs / 32`.
    unsafe fn registers(&self, g: usize, b: usize) -> ([__m512i; 8], Self::Params);
    /// `acc` plus the block's contribution for a row whose integer dot is `dot` and whose
    /// block has activation scale `s` and code sum `sum`.
    ///
    /// # Safety
    /// AVX-512F present.
    unsafe fn accumulate(
        acc: __m512,
        dot: __m512i,
        params: Self::Params,
        s: f32,
        sum: i32,
    ) -> __m512;
}

/// Group `g`'s 16 outputs for every row of `x` into `dst` (`rows × 16`).
///
/// # Safety
/// AVX-512F, AVX-512BW, AVX-512 VNNI and F16C present.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub(super) unsafe fn group<W: Layout>(w: &W, g: usize, x: &QActivations, dst: &mut [f32]) {
    w.check_group(g);
    x.assert_fits(w.inputs(), dst);
    by_row_tiles!(tile::<W>(w, g, x, dst), [8, 4, 2]);
}

/// Group `g`'s outputs for rows `row .. row + T`; returns `T`.
///
/// # Safety
/// As [`group`], after its checks; `row + T ≤ x.rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn tile<W: Layout, const T: usize>(
    w: &W,
    g: usize,
    x: &QActivations,
    dst: &mut [f32],
    row: usize,
) -> usize {
    let blocks = w.inputs() / BLOCK;
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..blocks {
        // SAFETY: g checked, b < blocks; the features (this function's contract).
        let (registers, params) = unsafe { w.registers(g, b) };
        let mut dot = [_mm512_setzero_si512(); T];
        for (t, reg) in registers.iter().enumerate() {
            for (i, dot) in dot.iter_mut().enumerate() {
                // SAFETY: bytes 4t .. 4t+4 of row (row + i)'s block b: row + i < rows.
                let four = unsafe { x.q_word(row + i, b, t) };
                *dot = _mm512_dpbusd_epi32(*dot, *reg, _mm512_set1_epi32(four));
            }
        }
        for (i, (acc, dot)) in acc.iter_mut().zip(dot).enumerate() {
            // SAFETY: row + i < rows, b < blocks; AVX-512F present.
            unsafe {
                let (s, sum) = x.block_scale_and_sum(row + i, b);
                *acc = W::accumulate(*acc, dot, params, s, sum);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        // SAFETY: dst holds rows × 16 floats (asserted by `group`); row + i < rows.
        unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add((row + i) * LANES), *acc) };
    }
    T
}
