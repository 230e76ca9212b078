//! A run of full blocks read slice by slice, software-pipelined: the loop both AVX-512
//! whole-block kernels share ([`read_slices`]), generic over their key side
//! ([`SliceScores`]), and the exact arithmetic both read values with ([`add_slice_values`]).

use std::arch::x86_64::*;

use super::{bits, codes16, fp8, full, integer, lane_of, token_params, unit};
use super::{Blocks, Pages, Running, MAX_HEADS, SLICE};
use crate::codec::PageLayout;

/// A whole-block kernel's key side for `H` query heads: the scores of one slice at a time.
pub(in crate::attention) trait SliceScores {
    /// Makes `keys` (a block's key page, of the length its layout gives) the page
    /// [`SliceScores::scores`] reads: the work done once per block.
    ///
    /// # Safety
    /// The features of the kernel implementing it present.
    unsafe fn enter_block(&mut self, keys: &[u8]);

    /// The scores (query · key, bias included) of slice `slice` of the entered block, token
    /// lanes in the implementation's order.
    ///
    /// # Safety
    /// As for [`SliceScores::enter_block`], which was called; `slice` < the block's slices.
    unsafe fn scores(&mut self, slice: usize) -> [__m512; MAX_HEADS];
}

/// Reads a run of full blocks for `H` query heads (their rows of `blocks.q` from
/// `first_head`), `keys` scoring each slice (token lanes in `LANES`' [`lane_of`] order) and
/// the values added exactly ([`add_slice_values`]). Software-pipelined: the next slice's
/// scores are issued between a slice's softmax step and its values, so the CPU overlaps the
/// step's chain of dependent operations (and a block's query folding) with independent
/// work instead of waiting for it. The pages `blocks.fetch` names of the block `ahead`
/// further are prefetched while one is read (by every head group: a run is capped in blocks,
/// not bytes, and need not stay in cache between groups).
///
/// # Safety
/// The features of `keys`' kernel present (AVX-512F and F16C among them).
#[inline(always)]
pub(in crate::attention) unsafe fn read_slices<
    S: SliceScores,
    const LANES: usize,
    const VB: usize,
    const H: usize,
    const D: usize,
>(
    blocks: &Blocks,
    layout: &Pages,
    first_head: usize,
    keys: &mut S,
    run: &mut Running,
) {
    let q = &blocks.q[first_head * D..(first_head + H) * D];
    let run = &mut run.heads(first_head, H, D);
    let per_block = layout.tokens / SLICE;
    let pages = blocks.pages;
    // (not a closure: one would not carry the kernel's target features)
    macro_rules! enter {
        ($b:expr) => {{
            let (key_page, value_page) = pages[$b];
            layout.check((H, D, SLICE), (key_page, value_page), q, run);
            // SAFETY: the caller's contract; the pages' lengths checked.
            unsafe { keys.enter_block(key_page) };
        }};
    }
    if pages.is_empty() {
        return;
    }
    enter!(0);
    // SAFETY: the block is entered; it has slice 0.
    let mut scores = unsafe { keys.scores(0) };
    for (b, &(_, values)) in pages.iter().enumerate() {
        crate::attention::pages::prefetch_run(pages, b, blocks.fetch);
        for slice in 0..per_block {
            let mut weights = [_mm512_setzero_ps(); MAX_HEADS];
            for (h, w) in weights.iter_mut().enumerate().take(H) {
                // SAFETY: AVX-512F present (the caller's contract).
                *w = unsafe { run.softmax_step(h, D, scores[h]) };
            }
            if slice + 1 < per_block {
                // SAFETY: the block is entered and has this slice.
                scores = unsafe { keys.scores(slice + 1) };
            } else if b + 1 < pages.len() {
                enter!(b + 1);
                // SAFETY: as above.
                scores = unsafe { keys.scores(0) };
            }
            // SAFETY: the block's value page was checked on entering it; the slice's rows
            // and parameters lie inside it.
            unsafe {
                add_slice_values::<LANES, VB, H, D>(
                    values.as_ptr(),
                    &layout.value,
                    slice * SLICE,
                    &weights,
                    run,
                )
            };
        }
    }
}

/// Adds one slice's values (tokens `first .. first + 16` of the token-major page of `VB`
/// codes at `vp`, laid out as `value`) into the outputs of `H` heads, each token weighted by
/// its softmax weight (`weights`: per head, token t in lane `lane_of(LANES, t)`): `p·s` per
/// token and group of 32 channels as the broadcast operands of f32 FMAs, `Σ p·z` per token
/// lane into the zero-point sums. The exact arithmetic both whole-block kernels read values
/// with.
///
/// # Safety
/// AVX-512F and F16C present; the slice's rows and parameters lie inside the page at `vp`;
/// `run` holds `H` heads of `D` outputs.
#[inline(always)]
pub(super) unsafe fn add_slice_values<
    const LANES: usize,
    const VB: usize,
    const H: usize,
    const D: usize,
>(
    vp: *const u8,
    value: &PageLayout,
    first: usize,
    weights: &[__m512; MAX_HEADS],
    run: &mut Running,
) {
    // a row holds one token's channels
    let row = D * bits(VB) / 8;
    let token_param_bytes = value.token_param_bytes(D);
    // SAFETY: the slice's rows and parameters lie inside the page (the caller's contract).
    let (rows, params) = unsafe {
        (
            vp.add(first * row),
            vp.add(value.code_bytes + first * token_param_bytes),
        )
    };
    let scales: [[__m512; 4]; 2] = if full(VB) {
        let one = _mm512_set1_ps(1.0);
        [[one, _mm512_setzero_ps(), one, _mm512_setzero_ps()]; 2]
    } else if fp8(VB) {
        // one scale per token for all channels, in the keys' token lanes
        // SAFETY: the slice's 32 bytes of scales lie inside the parameters.
        let s = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(params.cast())) };
        let lanes: [i32; 16] = std::array::from_fn(|l| {
            (0..16).position(|t| lane_of(LANES, t) == l).unwrap_or(l) as i32
        });
        // SAFETY: 16 i32 read from a local array.
        let order = unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) };
        let s = _mm512_mul_ps(_mm512_permutexvar_ps(order, s), _mm512_set1_ps(unit(VB)));
        [[s, _mm512_setzero_ps(), s, _mm512_setzero_ps()]; 2]
    } else {
        // SAFETY: the slice's 16·D/32·4 bytes of parameters lie inside the page.
        unsafe { token_params::<LANES, D>(params) }
    };
    for (half, [s0, z0, s1, z1]) in scales.into_iter().enumerate().take(D / 64) {
        let mut w = [[[0f32; SLICE]; 2]; MAX_HEADS];
        for h in 0..H {
            // SAFETY: each row of `w` holds 16 floats; `zeros[h][g]` 16.
            unsafe {
                _mm512_storeu_ps(w[h][0].as_mut_ptr(), _mm512_mul_ps(weights[h], s0));
                _mm512_storeu_ps(w[h][1].as_mut_ptr(), _mm512_mul_ps(weights[h], s1));
                for (g, z) in [z0, z1]
                    .into_iter()
                    .enumerate()
                    .take(if integer(VB) { 2 } else { 0 })
                {
                    let at = run.zeros[h][2 * half + g].as_mut_ptr();
                    _mm512_storeu_ps(at, _mm512_fmadd_ps(weights[h], z, _mm512_loadu_ps(at)));
                }
            }
        }
        let channels = 64 * half;
        let mut acc = [[_mm512_setzero_ps(); 4]; MAX_HEADS];
        for (h, a) in acc.iter_mut().enumerate().take(H) {
            for (i, a) in a.iter_mut().enumerate() {
                // SAFETY: h·D + channels + 16i + 16 ≤ H·D ≤ acc.len() (the caller's contract).
                *a = unsafe { _mm512_loadu_ps(run.acc.as_ptr().add(h * D + channels + 16 * i)) };
            }
        }
        for t in 0..SLICE {
            let at = t * row + channels * bits(VB) / 8;
            // SAFETY: token t's 64 channels from `channels` end inside its row.
            let v = unsafe {
                [
                    codes16::<VB>(rows.add(at)),
                    codes16::<VB>(rows.add(at + 2 * bits(VB))),
                    codes16::<VB>(rows.add(at + 4 * bits(VB))),
                    codes16::<VB>(rows.add(at + 6 * bits(VB))),
                ]
            };
            for h in 0..H {
                // token t's weight sits in the keys' lane for it
                let lane = lane_of(LANES, t);
                let (w0, w1) = (_mm512_set1_ps(w[h][0][lane]), _mm512_set1_ps(w[h][1][lane]));
                acc[h][0] = _mm512_fmadd_ps(w0, v[0], acc[h][0]);
                acc[h][1] = _mm512_fmadd_ps(w0, v[1], acc[h][1]);
                acc[h][2] = _mm512_fmadd_ps(w1, v[2], acc[h][2]);
                acc[h][3] = _mm512_fmadd_ps(w1, v[3], acc[h][3]);
            }
        }
        for (h, a) in acc.iter().enumerate().take(H) {
            for (i, a) in a.iter().enumerate() {
                // SAFETY: as for the loads.
                unsafe {
                    _mm512_storeu_ps(run.acc.as_mut_ptr().add(h * D + channels + 16 * i), *a)
                };
            }
        }
    }
}
