//! The whole-block kernel for AVX2 machines (256-bit registers, 16 of them, FMA and F16C), and
//! for blocks of 8 on AVX-512 ones: the same pairs of page kinds and the same reading as the
//! AVX-512 kernel ([`super`]), in slices of 8 tokens (one per lane), so blocks of 8, 16, 32
//! and 64 at head_dim 64 and 128. Codes are widened in natural lane order (AVX2's variable
//! shifts), so outputs need no reordering, only the values' zero-point sums added at the end
//! of a run ([`super::add_zero_sums`]). Values are read 16 channels at a time: two
//! accumulators per head for four heads leave room for the codes in 16 registers.

use std::arch::x86_64::*;

use super::{bits, fp8, full, integer, Blocks, Pages, Running, MAX_HEADS};
use super::{BF16, E4M3, E5M2, F16};
use crate::attention::fast_kernel::avx2::IntegerKeys8;
use crate::attention::pages::avx2::exp8;
use crate::attention::softmax::{lazy_max, LAZY_MAX_SLACK};
use crate::attention::AttentionPath;

/// The AVX2 whole-block kernel's loop over a run of `$blocks` (a `&Blocks`) with `KB` keys
/// scored by `$keys::<KB, H, D>` (a [`SliceScores8`] made by its `unsafe fn new`) and `VB`
/// values, expanded inside the kernel's own function (a closure handed to a helper without
/// the kernel's target features is called, not inlined, once per block): the query heads
/// four at a time, their key side made once per group and run, then each block, the pages
/// `blocks.fetch` names prefetched first (by every group: a run is capped in blocks, not
/// bytes).
macro_rules! read_run {
    ($keys:ident, $kb:ident, $vb:ident, $d:ident, $blocks:expr, $run:expr) => {{
        let blocks: &$crate::attention::block_kernel::Blocks = $blocks;
        let layout = $crate::attention::block_kernel::Pages::new($kb, $vb, blocks.tokens, $d);
        for first in (0..blocks.heads).step_by($crate::attention::block_kernel::MAX_HEADS) {
            let n = (blocks.heads - first).min($crate::attention::block_kernel::MAX_HEADS);
            let q = &blocks.q[first * $d..(first + n) * $d];
            let part = &mut $run.heads(first, n, $d);
            with_heads!(n, H, {
                // SAFETY: the features of the function this expands in are the kernel's.
                let mut key_side = unsafe { $keys::<$kb, H, $d>::new(q) };
                for (i, &pages) in blocks.pages.iter().enumerate() {
                    $crate::attention::pages::prefetch_run(blocks.pages, i, blocks.fetch);
                    // SAFETY: the features of the function this expands in are the kernel's.
                    unsafe { attend_block::<_, $vb, H, $d>(&mut key_side, pages, &layout, q, part) }
                }
            });
        }
    }};
}

/// Tokens read at once, one per lane: a block is read in slices of this many.
pub(in crate::attention) const SLICE: usize = 8;

/// The CPU features the kernel needs.
pub(in crate::attention) fn available() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx2") && has!("f16c") && has!("fma")
}

/// Whether the kernel serves `head_dim` and `block_size`: head_dim 64 or 128, blocks of whole
/// slices.
pub(in crate::attention) fn serves(head_dim: usize, block_size: usize) -> bool {
    matches!(head_dim, 64 | 128) && block_size > 0 && block_size.is_multiple_of(SLICE)
}

/// Independent FMA chains per head for the scores: four for one or two heads, two for more
/// (the accumulators and the codes must fit 16 registers).
const fn chains(heads: usize) -> usize {
    if heads <= 2 {
        4
    } else {
        2
    }
}

/// Eight consecutive elements of `KIND` (packed codes lowest bits first) starting at `at`, as
/// f32 in lane order, divided by [`unit`]: f16 converted as loaded, bf16 widened and
/// shifted into an f32's upper half, fp8 made f16 bit patterns and converted (e5m2 is an f16's
/// upper byte; e4m3 sign-extended, shifted and its top exponent bit cleared), integer codes
/// widened (int4 and int2: one 32-bit word broadcast and each lane's field shifted down).
///
/// # Safety
/// AVX2 and F16C present; `8·bits(KIND)/8` bytes readable at `at`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn codes8<const KIND: usize>(at: *const u8) -> __m256 {
    // SAFETY (each arm): reads 8·bits(KIND)/8 bytes at `at` (the caller's contract).
    unsafe {
        match KIND {
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(at.cast())),
            BF16 => {
                let halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(at.cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(halves))
            }
            E5M2 => {
                let bytes = _mm_cvtepu8_epi16(_mm_loadl_epi64(at.cast()));
                _mm256_cvtph_ps(_mm_slli_epi16::<8>(bytes))
            }
            E4M3 => {
                let bytes = _mm_cvtepi8_epi16(_mm_loadl_epi64(at.cast()));
                let half =
                    _mm_and_si128(_mm_slli_epi16::<7>(bytes), _mm_set1_epi16(0xBFFFu16 as i16));
                _mm256_cvtph_ps(half)
            }
            8 => _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(at.cast()))),
            4 => {
                let word = _mm256_set1_epi32(at.cast::<i32>().read_unaligned());
                let down = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
                let codes = _mm256_and_si256(_mm256_srlv_epi32(word, down), _mm256_set1_epi32(15));
                _mm256_cvtepi32_ps(codes)
            }
            _ => {
                let word = _mm256_set1_epi32(i32::from(at.cast::<u16>().read_unaligned()));
                let down = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
                let codes = _mm256_and_si256(_mm256_srlv_epi32(word, down), _mm256_set1_epi32(3));
                _mm256_cvtepi32_ps(codes)
            }
        }
    }
}

/// What [`codes8`] returns is the element divided by this (e4m3 placed in an f16 reads 2⁻⁸ of
/// its value); the scales are multiplied by it.
const fn unit(kind: usize) -> f32 {
    if kind == E4M3 {
        256.0
    } else {
        1.0
    }
}

/// Eight f16 (scale, zero) pairs at `at` as the eight scales and the eight zeros.
///
/// # Safety
/// AVX2 and F16C present; 32 bytes readable at `at`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(in crate::attention) unsafe fn pairs8(at: *const u8) -> (__m256, __m256) {
    // SAFETY: 32 bytes readable at `at` (the caller's contract).
    let (a, b) = unsafe {
        (
            _mm256_cvtph_ps(_mm_loadu_si128(at.cast())),
            _mm256_cvtph_ps(_mm_loadu_si128(at.add(16).cast())),
        )
    };
    // per 128-bit half: [s s s s] of pairs (0, 1, 4, 5) and (2, 3, 6, 7); then in order
    let scales = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
    let zeros = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
    (
        _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(
            scales,
        ))),
        _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(
            zeros,
        ))),
    )
}

/// Four registers of two tokens × (s₀, z₀, s₁, z₁) each (token `2i` in the low half of
/// register `i`, `2i + 1` in the high) as one register per component, token t in lane t.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn by_component(r: [__m256; 4]) -> [__m256; 4] {
    // [t0c0 t2c0 t0c1 t2c1 | t1c0 t3c0 t1c1 t3c1] and likewise for components 2, 3 and tokens 4..8
    let (low01, high01) = (
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
    );
    let (low23, high23) = (
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
    );
    // tokens in lanes (0, 2, 4, 6, 1, 3, 5, 7), then in order
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let natural = |x| _mm256_permutevar8x32_ps(x, order);
    [
        natural(_mm256_shuffle_ps::<0b01_00_01_00>(low01, low23)),
        natural(_mm256_shuffle_ps::<0b11_10_11_10>(low01, low23)),
        natural(_mm256_shuffle_ps::<0b01_00_01_00>(high01, high23)),
        natural(_mm256_shuffle_ps::<0b11_10_11_10>(high01, high23)),
    ]
}

/// The values' per-token parameters of a slice (8 tokens × `D / 32` groups × (scale, zero),
/// f16) as `[s, z, s', z']` per 64 channels (groups `2i` and `2i + 1`), token t in lane t;
/// head_dim 64 fills the first.
///
/// # Safety
/// AVX2 and F16C present; `8 · D / 32 · 4` bytes readable at `at`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn token_params<const D: usize>(at: *const u8) -> [[__m256; 4]; 2] {
    // SAFETY: register i's 16 bytes lie inside the parameters (the caller's contract).
    let load = |i: usize| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(at.add(16 * i).cast())) };
    if D == 64 {
        // two tokens × (s₀, z₀, s₁, z₁) per register
        let zero = [_mm256_setzero_ps(); 4];
        return [by_component([load(0), load(1), load(2), load(3)]), zero];
    }
    // one token × (s₀, z₀, … s₃, z₃) per register: the halves of two tokens joined
    let x: [__m256; 8] = std::array::from_fn(load);
    let join = |i: usize, half: i32| match half {
        0 => _mm256_permute2f128_ps::<0x20>(x[2 * i], x[2 * i + 1]),
        _ => _mm256_permute2f128_ps::<0x31>(x[2 * i], x[2 * i + 1]),
    };
    [
        by_component(std::array::from_fn(|i| join(i, 0))),
        by_component(std::array::from_fn(|i| join(i, 1))),
    ]
}

/// The online-softmax step of head `h` (`d` outputs) over a slice's 8 `scores`: the weights
/// `exp(s − reference)`, added into the head's running sums (its first 8 lanes); when the
/// reference point moves, everything summed so far is rescaled to it.
///
/// # Safety
/// AVX2 and FMA present. (Inlined into the kernel rather than called once per head and
/// slice: the call spilled the kernel's registers.)
#[inline(always)]
unsafe fn softmax_step(run: &mut Running, h: usize, d: usize, scores: __m256) -> __m256 {
    // SAFETY (the intrinsics): AVX2 and FMA present (the caller's contract).
    let over = unsafe {
        _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(
            scores,
            _mm256_set1_ps(run.max[h] + LAZY_MAX_SLACK),
        ))
    };
    let max_in = run.max[h];
    let max = if over != 0 || max_in == f32::NEG_INFINITY {
        // SAFETY: as above.
        let m = unsafe {
            let m = _mm_max_ps(
                _mm256_castps256_ps128(scores),
                _mm256_extractf128_ps::<1>(scores),
            );
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
        };
        lazy_max(max_in, m)
    } else {
        max_in
    };
    // SAFETY: as above.
    let e = unsafe { exp8(_mm256_sub_ps(scores, _mm256_set1_ps(max))) };
    if max != max_in {
        // the reference point moved: everything summed so far rescaled to it
        let correction = (max_in - max).exp();
        let rescale = |x: &mut f32| *x *= correction;
        run.acc[h * d..(h + 1) * d].iter_mut().for_each(rescale);
        run.zeros[h].iter_mut().flatten().for_each(rescale);
        run.lanes[h].iter_mut().for_each(rescale);
        run.max[h] = max;
    }
    // SAFETY: as above; `lanes[h]` holds 16 floats, the first 8 read and written.
    unsafe {
        let at = run.lanes[h].as_mut_ptr();
        _mm256_storeu_ps(at, _mm256_add_ps(_mm256_loadu_ps(at), e));
    }
    e
}

/// [`attend_block`] over a run of full blocks (key and value pages each) for `heads` query
/// heads (`q`: `heads × D`, already multiplied by the softmax scale), four at a time, each
/// group through the whole run, keys scored in f32 ([`ExactKeys8`]); the pages
/// `blocks.fetch` names of the block `ahead` further prefetched while one is read.
#[target_feature(enable = "avx2,fma,f16c")]
fn attend_run<const KB: usize, const VB: usize, const D: usize>(
    blocks: &Blocks,
    run: &mut Running,
) {
    read_run!(ExactKeys8, KB, VB, D, blocks, run);
}

/// [`attend_run`] with the fast path's key side ([`IntegerKeys8`]: integer dot products on
/// the query rounded to 16 bits).
#[target_feature(enable = "avx2,fma,f16c")]
fn attend_run_fast<const KB: usize, const VB: usize, const D: usize>(
    blocks: &Blocks,
    run: &mut Running,
) {
    read_run!(IntegerKeys8, KB, VB, D, blocks, run);
}

/// The AVX2 kernel's key side for `H` query heads: made for their query rows once per run,
/// entered for each block's key page, then the scores (query · key, bias included) of each
/// slice of 8 tokens, token t in lane t.
pub(in crate::attention) trait SliceScores8 {
    /// Makes `keys` (a block's key page, laid out as `layout.key`, checked against it) the
    /// page [`SliceScores8::scores`] reads: the work done once per block.
    ///
    /// # Safety
    /// The features of the kernel implementing it present (AVX2, FMA and F16C among them).
    unsafe fn enter_block(&mut self, keys: &[u8], layout: &Pages);

    /// The scores of slice `slice`.
    ///
    /// # Safety
    /// As for [`SliceScores8::enter_block`]; `slice` < the block's slices.
    unsafe fn scores(&self, slice: usize) -> [__m256; MAX_HEADS];
}

/// The exact path's key side: the key scales folded into the query in f32, every code
/// widened to f32 and multiplied by one FMA per head.
struct ExactKeys8<'a, const KB: usize, const H: usize, const D: usize> {
    /// `H × D` query rows, already multiplied by the softmax scale.
    q: &'a [f32],
    folded: [[f32; D]; MAX_HEADS],
    /// `q · z` per head: the key zero points' share of every score.
    bias: [f32; MAX_HEADS],
    codes: *const u8,
    /// Bytes of one channel's column (the block's tokens).
    column: usize,
}

impl<'a, const KB: usize, const H: usize, const D: usize> ExactKeys8<'a, KB, H, D> {
    /// The key side of the `H` query rows `q` (already multiplied by the softmax scale).
    ///
    /// # Safety
    /// None beyond the kernel's (an `unsafe fn` as [`IntegerKeys8::new`] is, which
    /// `read_run!` calls alike).
    unsafe fn new(q: &'a [f32]) -> Self {
        assert!(q.len() >= H * D);
        Self {
            q,
            folded: [[0.0; D]; MAX_HEADS],
            bias: [0.0; MAX_HEADS],
            codes: std::ptr::null(),
            column: 0,
        }
    }
}

impl<const KB: usize, const H: usize, const D: usize> SliceScores8 for ExactKeys8<'_, KB, H, D> {
    #[inline(always)]
    unsafe fn enter_block(&mut self, keys: &[u8], layout: &Pages) {
        assert!(keys.len() >= layout.key.page_bytes());
        let (kp, q, folded) = (keys.as_ptr(), self.q, &mut self.folded);
        // per-channel scales folded into the query, zero points into one constant per head
        let mut bias = [_mm256_setzero_ps(); MAX_HEADS];
        for c in (0..D).step_by(8) {
            let (s, z) = if full(KB) {
                (_mm256_set1_ps(1.0), _mm256_setzero_ps())
            } else if fp8(KB) {
                // SAFETY: the scales of channels c .. c + 8 lie at code_bytes + 2c .. + 16
                // (the page's length asserted).
                let s = unsafe {
                    _mm256_cvtph_ps(_mm_loadu_si128(
                        kp.add(layout.key.code_bytes + 2 * c).cast(),
                    ))
                };
                (
                    _mm256_mul_ps(s, _mm256_set1_ps(unit(KB))),
                    _mm256_setzero_ps(),
                )
            } else {
                // SAFETY: the pairs of channels c .. c + 8 lie at code_bytes + 4c .. + 32.
                unsafe { pairs8(kp.add(layout.key.code_bytes + 4 * c)) }
            };
            for h in 0..H {
                // SAFETY: h·D + c + 8 ≤ H·D ≤ q.len() (asserted by `new`); c + 8 ≤ D, the
                // row's length.
                unsafe {
                    let x = _mm256_loadu_ps(q.as_ptr().add(h * D + c));
                    _mm256_storeu_ps(folded[h].as_mut_ptr().add(c), _mm256_mul_ps(x, s));
                    bias[h] = _mm256_fmadd_ps(x, z, bias[h]);
                }
            }
        }
        self.bias = std::array::from_fn(|h| {
            let mut lanes = [0f32; 8];
            // SAFETY: 8 floats written to a local array.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), bias[h]) };
            lanes.iter().sum()
        });
        self.codes = kp;
        self.column = layout.tokens * bits(KB) / 8;
    }

    // (a chain's and a head's indices serve the folded query and the sums alike)
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn scores(&self, slice: usize) -> [__m256; MAX_HEADS] {
        let chains = const { chains(H) };
        // SAFETY: the slice's codes start inside each column (slice < the block's slices).
        let kp = unsafe { self.codes.add(slice * SLICE * bits(KB) / 8) };
        let mut dots = [[_mm256_setzero_ps(); 4]; MAX_HEADS];
        for c in (0..D).step_by(chains) {
            for i in 0..chains {
                // SAFETY: channel c + i < D; its slice of 8 codes lies inside its column.
                let codes = unsafe { codes8::<KB>(kp.add((c + i) * self.column)) };
                for h in 0..H {
                    let qc = _mm256_set1_ps(self.folded[h][c + i]);
                    dots[h][i] = _mm256_fmadd_ps(qc, codes, dots[h][i]);
                }
            }
        }
        // (loops, not closures: a closure would not carry the kernel's target features)
        let mut sums = [_mm256_setzero_ps(); MAX_HEADS];
        for h in 0..H {
            sums[h] = _mm256_set1_ps(self.bias[h]);
            for chain in &dots[h][..chains] {
                sums[h] = _mm256_add_ps(sums[h], *chain);
            }
        }
        sums
    }
}

/// Attends `H` query heads (`q`, those `key_side` was made for) to one full block of keys
/// (channel-major, scored by `key_side`) and `VB` values (token-major), the outputs in
/// channel order (the values' zero-point sums pending in `run.zeros`).
///
/// # Safety
/// The features of `K`'s kernel present (AVX2, FMA and F16C among them).
#[inline(always)]
pub(in crate::attention) unsafe fn attend_block<
    K: SliceScores8,
    const VB: usize,
    const H: usize,
    const D: usize,
>(
    key_side: &mut K,
    (keys, values): (&[u8], &[u8]),
    layout: &Pages,
    q: &[f32],
    run: &mut Running,
) {
    layout.check((H, D, SLICE), (keys, values), q, run);
    let Pages { value, tokens, .. } = *layout;
    let vp = values.as_ptr();
    // SAFETY: the kernel's features (the caller's contract); the page checked.
    unsafe { key_side.enter_block(keys, layout) };

    // a value row holds one token's channels
    let row = D * bits(VB) / 8;
    let token_param_bytes = value.token_param_bytes(D);
    for slice in 0..tokens / SLICE {
        let first = slice * SLICE;
        // SAFETY: as above; slice < the block's slices.
        let sums = unsafe { key_side.scores(slice) };
        let mut weights = [_mm256_setzero_ps(); MAX_HEADS];
        for h in 0..H {
            // SAFETY: the kernel's features (the caller's contract).
            weights[h] = unsafe { softmax_step(run, h, D, sums[h]) };
        }

        // values: (p·s) per token and group as broadcast operands, Σ p·z per token lane
        // SAFETY: the slice's rows and parameters lie inside the page (asserted above).
        let (rows, params) = unsafe {
            (
                vp.add(first * row),
                vp.add(value.code_bytes + first * token_param_bytes),
            )
        };
        let scales: [[__m256; 4]; 2] = if full(VB) {
            let one = _mm256_set1_ps(1.0);
            [[one, _mm256_setzero_ps(), one, _mm256_setzero_ps()]; 2]
        } else if fp8(VB) {
            // SAFETY: the slice's 16 bytes of scales lie inside the parameters.
            let s = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(params.cast())) };
            let s = _mm256_mul_ps(s, _mm256_set1_ps(unit(VB)));
            [[s, _mm256_setzero_ps(), s, _mm256_setzero_ps()]; 2]
        } else {
            // SAFETY: the slice's 8·D/32·4 bytes of parameters lie inside the page.
            unsafe { token_params::<D>(params) }
        };
        for (half, [s0, z0, s1, z1]) in scales.into_iter().enumerate().take(D / 64) {
            let mut w = [[[0f32; SLICE]; 2]; MAX_HEADS];
            for h in 0..H {
                // SAFETY: each row of `w` holds 8 floats; `zeros[h][g]` 16.
                unsafe {
                    _mm256_storeu_ps(w[h][0].as_mut_ptr(), _mm256_mul_ps(weights[h], s0));
                    _mm256_storeu_ps(w[h][1].as_mut_ptr(), _mm256_mul_ps(weights[h], s1));
                    for (g, z) in
                        [z0, z1]
                            .into_iter()
                            .enumerate()
                            .take(if integer(VB) { 2 } else { 0 })
                    {
                        let at = run.zeros[h][2 * half + g].as_mut_ptr();
                        _mm256_storeu_ps(at, _mm256_fmadd_ps(weights[h], z, _mm256_loadu_ps(at)));
                    }
                }
            }
            // 16 channels at a time: two accumulators per head
            for chunk in 0..4 {
                let channels = 64 * half + 16 * chunk;
                let group = chunk / 2;
                let mut acc = [[_mm256_setzero_ps(); 2]; MAX_HEADS];
                for (h, a) in acc.iter_mut().enumerate().take(H) {
                    // SAFETY: h·D + channels + 16 ≤ H·D ≤ acc.len() (asserted).
                    unsafe {
                        let at = run.acc.as_ptr().add(h * D + channels);
                        *a = [_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8))];
                    }
                }
                // t is a row of the page and a lane of every head's weights
                #[allow(clippy::needless_range_loop)]
                for t in 0..SLICE {
                    let at = t * row + channels * bits(VB) / 8;
                    // SAFETY: token t's 16 channels from `channels` end inside its row.
                    let v = unsafe {
                        [
                            codes8::<VB>(rows.add(at)),
                            codes8::<VB>(rows.add(at + bits(VB))),
                        ]
                    };
                    for h in 0..H {
                        let p = _mm256_set1_ps(w[h][group][t]);
                        acc[h][0] = _mm256_fmadd_ps(p, v[0], acc[h][0]);
                        acc[h][1] = _mm256_fmadd_ps(p, v[1], acc[h][1]);
                    }
                }
                for (h, a) in acc.iter().enumerate().take(H) {
                    // SAFETY: as for the loads.
                    unsafe {
                        let at = run.acc.as_mut_ptr().add(h * D + channels);
                        _mm256_storeu_ps(at, a[0]);
                        _mm256_storeu_ps(at.add(8), a[1]);
                    }
                }
            }
        }
    }
}

/// [`attend_block`] over a run of `blocks` with keys of kind `kb` and values of kind `vb`,
/// its keys scored as `path` asks; false (and nothing done) for a pair the path's key side
/// does not read (the exact one: [`super::supported`]; the fast one: integer pairs) or a
/// geometry not [`serves`]d.
///
/// # Safety
/// [`available`] must have answered true.
pub(in crate::attention) unsafe fn dispatch(
    kb: usize,
    vb: usize,
    blocks: &Blocks,
    run: &mut Running,
    path: AttentionPath,
) -> bool {
    use super::{INT2, INT4, INT8};
    let d = blocks.head_dim;
    serves(d, blocks.tokens)
        && match path {
            AttentionPath::Exact => {
                exact_pairs!(dispatch_pairs!(attend_run, (kb, vb, d), (blocks, run)))
            }
            AttentionPath::Fast => {
                integer_pairs!(dispatch_pairs!(attend_run_fast, (kb, vb, d), (blocks, run)))
            }
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::attention::block_kernel::tests::code;

    #[test]
    fn codes_and_parameters_widen_in_order_on_avx2_cpus() {
        if !available() {
            println!("codes_and_parameters_widen_in_order: no AVX2 on this CPU, not run");
            return;
        }
        println!("codes_and_parameters_widen_in_order: ran the AVX2 whole-block kernel's widening");
        let bytes: Vec<u8> = (0..1024).map(|i| (i * 97 + i / 7) as u8).collect();
        for bits in [8, 4, 2] {
            for group in bytes.chunks_exact(bits) {
                let mut out = [0f32; 8];
                // SAFETY: AVX2 present (checked above); the group holds 8·bits/8 bytes.
                unsafe {
                    let v = match bits {
                        8 => codes8::<8>(group.as_ptr()),
                        4 => codes8::<4>(group.as_ptr()),
                        _ => codes8::<2>(group.as_ptr()),
                    };
                    _mm256_storeu_ps(out.as_mut_ptr(), v);
                }
                for (i, x) in out.iter().enumerate() {
                    assert_eq!(*x, code(group, bits, i) as f32, "{bits}-bit code {i}");
                }
            }
        }
        super::super::tests::assert_fp8_widening(8, |kind, group| {
            let mut out = vec![0f32; 8];
            // SAFETY: as above; 8 bytes in the group.
            unsafe {
                let v = match kind {
                    E4M3 => codes8::<E4M3>(group.as_ptr()),
                    _ => codes8::<E5M2>(group.as_ptr()),
                };
                _mm256_storeu_ps(out.as_mut_ptr(), v);
            }
            out.iter().map(|x| x * unit(kind)).collect()
        });
        // (scale, zero) pairs: channel pairs and token groups, at head_dim 64 and 128
        let halves: Vec<half::f16> = (0..64).map(|i| half::f16::from_f32(i as f32)).collect();
        let at = halves.as_ptr().cast::<u8>();
        let mut lanes = [[0f32; 8]; 2];
        // SAFETY: as above; 32 bytes of pairs.
        unsafe {
            let (s, z) = pairs8(at);
            _mm256_storeu_ps(lanes[0].as_mut_ptr(), s);
            _mm256_storeu_ps(lanes[1].as_mut_ptr(), z);
        }
        for (c, (s, z)) in lanes[0].iter().zip(&lanes[1]).enumerate() {
            assert_eq!((*s, *z), ((2 * c) as f32, (2 * c + 1) as f32));
        }
        for d in [64, 128] {
            let groups = d / 32;
            // SAFETY: as above; 8 tokens × groups × 4 bytes ≤ 128 bytes.
            let params = unsafe {
                if d == 64 {
                    token_params::<64>(at)
                } else {
                    token_params::<128>(at)
                }
            };
            for (half, registers) in params.iter().enumerate().take(d / 64) {
                for (component, register) in registers.iter().enumerate() {
                    let mut out = [0f32; 8];
                    // SAFETY: 8 floats written to a local array.
                    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), *register) };
                    for (t, x) in out.iter().enumerate() {
                        let group = 2 * half + component / 2;
                        let want = t * 2 * groups + 2 * group + component % 2;
                        assert_eq!(*x, want as f32, "d {d} token {t} component {component}");
                    }
                }
            }
        }
    }
}
