//! The fast path's AVX-512 whole-block kernel (issue 22's contract, see
//! [`super::AttentionPath`]): one full block of integer pages (int8, int4 or int2 keys and
//! values, any pair) at the geometries of [`super::block_kernel`] (head_dim 64 or 128, blocks
//! of whole 16-token slices, query heads in groups of four), its keys read with integer dot
//! products, its values as the exact kernel reads them. Its AVX2 twin is a key side of the
//! AVX2 kernel ([`avx2`]).
//!
//! - The key scales fold into the query (`q·(s⊙x + z) = (q⊙s)·x + q·z`, as on the exact
//!   path); the folded query is rounded to 16-bit integers, one scale per head and block
//!   (8-bit queries err by up to a quarter of the output's scale on outlier channels:
//!   `docs/query-quantization-simulation.py`), and each integer split into two signed bytes,
//!   `Q = 256·high + low`. `vpdpbusd` (AVX-512 VNNI) multiplies four unsigned codes by four
//!   signed bytes per 32-bit lane, so a head costs two instructions per 64 codes (one per
//!   byte of the query) where the exact kernel widens every code to f32 and spends one FMA
//!   per code and head.
//! - Lanes are tokens, in order; a lane's four bytes hold four channels' codes, gathered from
//!   the channel-major page by one byte permute (`vpermb`/`vpermt2b`, AVX-512 VBMI) per 64
//!   codes and masked in place: a code keeps the place its nibble or crumb has in its byte
//!   (×1, ×16; ×1, ×4, ×16, ×64), and each lane's dot is scaled back once per slice.
//! - Values: the exact kernel's arithmetic and pipeline ([`read_slices`]), so the outputs sit
//!   in that kernel's lanes ([`super::block_kernel::enter`]).
//!
//! Sums fit 32 bits: 128 channels × 255 × 128 < 2²² for either byte, and 2²²·257 < 2³¹.

pub(super) mod avx2;

use std::arch::x86_64::*;

use super::block_kernel::{bits, pairs16, read_slices, Blocks, Pages, Running, SliceScores};
use super::block_kernel::{INT2, INT4, INT8, MAX_HEADS, SLICE};

/// Largest magnitude of a rounded query: `127·256 + 127`, so both bytes of its split are
/// signed bytes.
const UNIT: f32 = 32639.0;

/// The kind whose token lanes ([`super::block_kernel::lane_of`]) this kernel's scores come
/// in: tokens in order.
const IN_ORDER: usize = INT8;

/// Bytes two registers hold: the most a four-channel window may span to be read by loads
/// and one two-table byte permute.
const TWO_REGISTERS: usize = 128;

/// The CPU features the kernel needs.
pub(super) fn available() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f")
        && has!("avx512bw")
        && has!("avx512vnni")
        && has!("avx512vbmi")
        && has!("avx2")
        && has!("f16c")
        && has!("fma")
}

/// Whether the kernel reads keys of kind `kb` with values of kind `vb`: integer kinds.
pub(super) fn supported(kb: usize, vb: usize) -> bool {
    integer_pairs!(pair_listed!(kb, vb))
}

/// Bytes of one channel's codes in a slice of 16 tokens.
const fn slice_bytes(kind: usize) -> usize {
    SLICE * bits(kind) / 8
}

/// Bytes from the first of four adjacent channels' codes of a slice to the end of the last
/// one's, in a page whose columns hold `column` bytes.
const fn window(kind: usize, column: usize) -> usize {
    3 * column + slice_bytes(kind)
}

/// The factor a key code of token `t` carries in its lane (its place in its byte).
pub(super) const fn key_place(kind: usize, t: usize) -> u32 {
    match kind {
        INT4 => 1 << (4 * (t % 2)),
        INT2 => 1 << (2 * (t % 4)),
        _ => 1,
    }
}

/// How four channels' codes of a slice reach one register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gather {
    /// Their window (at most two registers) read as two whole registers: up to 128 bytes
    /// past its first byte, which ends inside the page (checked per block: the key
    /// parameters follow the codes).
    Window,
    /// Each channel's slice loaded on its own (long columns: int8 in blocks over 32 tokens,
    /// int4 over 80, int2 over 160), packed side by side.
    Pieces,
}

/// How one kernel instance gathers key codes into token lanes: its loop-invariant registers.
struct KeyGather {
    mode: Gather,
    /// The byte permute putting channel `j`'s code of token `t` in byte `j` of lane `t`.
    permute: __m512i,
    /// Per lane, the bits of each byte's field at its place (int8: every bit).
    mask: __m512i,
    /// 1 / the codes' places, per token lane.
    unplace: __m512,
}

impl KeyGather {
    /// The constants for keys of kind `KB` in columns of `column` bytes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi,avx2,fma,f16c")]
    fn new<const KB: usize>(column: usize) -> Self {
        let (mode, stride) = if window(KB, column) <= TWO_REGISTERS {
            (Gather::Window, column)
        } else {
            (Gather::Pieces, slice_bytes(KB))
        };
        let per_byte = 8 / bits(KB);
        let field = ((1u32 << bits(KB)) - 1) as u8;
        let mut permute = [0u8; 64];
        let mut mask = [0u8; 64];
        for t in 0..SLICE {
            for j in 0..4 {
                permute[4 * t + j] = (j * stride + t / per_byte) as u8;
                mask[4 * t + j] = field << (bits(KB) * (t % per_byte));
            }
        }
        let unplace: [f32; 16] = std::array::from_fn(|t| 1.0 / key_place(KB, t) as f32);
        // SAFETY (each load): 64 bytes read from a local array of 64 bytes.
        unsafe {
            Self {
                mode,
                permute: _mm512_loadu_si512(permute.as_ptr().cast()),
                mask: _mm512_loadu_si512(mask.as_ptr().cast()),
                unplace: _mm512_loadu_ps(unplace.as_ptr()),
            }
        }
    }
}

/// Four adjacent key channels' codes of one slice (`at`: the first channel's, in columns of
/// `column` bytes) in token lanes: channel `j`'s code of token `t` in byte `j` of lane `t`,
/// at its place.
///
/// # Safety
/// The kernel's features present; the four channels' slices readable at `at + j·column`
/// (j < 4) and, when `k` reads windows, the 128 bytes from `at`; `k` built for `KB` and
/// `column`.
#[inline(always)]
unsafe fn key_quad<const KB: usize>(at: *const u8, column: usize, k: &KeyGather) -> __m512i {
    let codes = match k.mode {
        // SAFETY: the 128 bytes from `at` lie inside the page (the caller's contract).
        Gather::Window => unsafe {
            let low = _mm512_loadu_si512(at.cast());
            let high = _mm512_loadu_si512(at.wrapping_add(64).cast());
            _mm512_permutex2var_epi8(low, k.permute, high)
        },
        Gather::Pieces => {
            // SAFETY: each channel's slice is readable at `at + j·column` (the contract).
            let piece = |j: usize| unsafe { at.add(j * column) };
            // SAFETY: as above: 16, 8 or 4 bytes per channel.
            let packed = unsafe {
                match KB {
                    INT8 => {
                        // (loads outside closures: a closure would not carry the features)
                        let (a, b, c, d) = (
                            _mm_loadu_si128(piece(0).cast()),
                            _mm_loadu_si128(piece(1).cast()),
                            _mm_loadu_si128(piece(2).cast()),
                            _mm_loadu_si128(piece(3).cast()),
                        );
                        let low = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(a), b);
                        let high = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(c), d);
                        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high)
                    }
                    INT4 => {
                        let load = |j| piece(j).cast::<i64>().read_unaligned();
                        _mm512_set_epi64(0, 0, 0, 0, load(3), load(2), load(1), load(0))
                    }
                    _ => {
                        let load = |j| piece(j).cast::<i32>().read_unaligned();
                        _mm512_setr_epi32(
                            load(0),
                            load(1),
                            load(2),
                            load(3),
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                            0,
                        )
                    }
                }
            };
            _mm512_permutexvar_epi8(k.permute, packed)
        }
    };
    if KB == INT8 {
        codes
    } else {
        _mm512_and_si512(codes, k.mask)
    }
}

/// Each of four heads' registers (`x[h]`) reduced across its lanes, by the largest element
/// (`LARGEST`) or the sum: every lane of 128-bit lane `h` of the result holds head `h`'s.
/// One transposing reduction for all four instead of one horizontal reduction each.
#[inline(always)]
unsafe fn across_lanes<const LARGEST: bool>(x: [__m512; MAX_HEADS]) -> __m512 {
    // (a function, not a closure: a closure would not carry the kernel's target features)
    #[inline(always)]
    unsafe fn op<const LARGEST: bool>(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F present (the caller's contract).
        unsafe {
            if LARGEST {
                _mm512_max_ps(a, b)
            } else {
                _mm512_add_ps(a, b)
            }
        }
    }
    let [a, b, c, d] = x;
    // SAFETY: as above.
    unsafe {
        // 256-bit halves folded: lanes 0..8 a's, 8..16 b's
        let ab = op::<LARGEST>(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        );
        let cd = op::<LARGEST>(
            _mm512_shuffle_f32x4::<0x44>(c, d),
            _mm512_shuffle_f32x4::<0xEE>(c, d),
        );
        // 128-bit lane h: head h's four partial results
        let heads = op::<LARGEST>(
            _mm512_shuffle_f32x4::<0x88>(ab, cd),
            _mm512_shuffle_f32x4::<0xDD>(ab, cd),
        );
        let pairs = op::<LARGEST>(heads, _mm512_permute_ps::<0x4E>(heads));
        op::<LARGEST>(pairs, _mm512_permute_ps::<0xB1>(pairs))
    }
}

/// Lane `4h` of `x` in every lane.
#[inline(always)]
unsafe fn head_lane(x: __m512, h: usize) -> __m512 {
    // SAFETY: AVX-512F present (the caller's contract).
    unsafe { _mm512_permutexvar_ps(_mm512_set1_epi32(4 * h as i32), x) }
}

/// `x` (one head's folded query) times `up` rounded to integers `Q` (at most [`UNIT`] in
/// magnitude when `up` is [`UNIT`] over its largest magnitude), each split into signed bytes
/// `Q = 256·high + low` (`low` in -128..128), written to `high` and `low`.
///
/// # Safety
/// The kernel's features present.
#[inline(always)]
unsafe fn round_split(x: &[__m512], up: __m512, high: &mut [i8], low: &mut [i8]) {
    assert!(high.len() >= 16 * x.len() && low.len() >= 16 * x.len());
    for (i, v) in x.iter().enumerate() {
        // SAFETY: the features (the contract); 16·(i + 1) ≤ 16·x.len() ≤ both lengths
        // (asserted).
        unsafe {
            let q = _mm512_cvtps_epi32(_mm512_mul_ps(*v, up));
            let h = _mm512_srai_epi32::<8>(_mm512_add_epi32(q, _mm512_set1_epi32(128)));
            let l = _mm512_sub_epi32(q, _mm512_slli_epi32::<8>(h));
            _mm_storeu_si128(
                high.as_mut_ptr().add(16 * i).cast(),
                _mm512_cvtepi32_epi8(h),
            );
            _mm_storeu_si128(low.as_mut_ptr().add(16 * i).cast(), _mm512_cvtepi32_epi8(l));
        }
    }
}

/// Four adjacent bytes (elements `4i .. 4i + 4`) in every 32-bit lane.
#[inline(always)]
unsafe fn word_of(x: &[i8], i: usize) -> __m512i {
    assert!(4 * i + 4 <= x.len());
    // SAFETY: elements 4i .. 4i + 4 lie inside `x` (asserted).
    _mm512_set1_epi32(unsafe { x.as_ptr().add(4 * i).cast::<i32>().read_unaligned() })
}

/// Reads a run of full blocks (key and value pages each) for `heads` query heads (`q`:
/// `heads × D`, already multiplied by the softmax scale), four at a time, through the exact
/// kernel's pipeline ([`read_slices`]) with [`IntegerKeys`] scoring the slices.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi,avx2,fma,f16c")]
fn attend_run<const KB: usize, const VB: usize, const D: usize>(
    blocks: &Blocks,
    run: &mut Running,
) {
    let gather = KeyGather::new::<KB>(blocks.tokens * bits(KB) / 8);
    let layout = Pages::new(KB, VB, blocks.tokens, D);
    for first in (0..blocks.heads).step_by(MAX_HEADS) {
        let n = (blocks.heads - first).min(MAX_HEADS);
        with_heads!(n, H, {
            let mut keys = IntegerKeys::<KB, H, D>::new(&blocks.q[first * D..], &layout, &gather);
            // SAFETY: the features of this kernel present (this function's).
            unsafe { read_slices::<_, IN_ORDER, VB, H, D>(blocks, &layout, first, &mut keys, run) };
        });
    }
}

/// The fast kernel's key side: a channel-major page of `KB` codes scored with integer dot
/// products, token lanes in order.
struct IntegerKeys<'a, const KB: usize, const H: usize, const D: usize> {
    /// `H × D` query rows, already multiplied by the softmax scale.
    q: &'a [f32],
    layout: Pages,
    gather: &'a KeyGather,
    /// The entered page's codes.
    codes: *const u8,
    /// The entered block's folded query per head, rounded and split into its high and low
    /// bytes.
    high: [[i8; D]; MAX_HEADS],
    low: [[i8; D]; MAX_HEADS],
    /// Per head: the value of one step of the rounded query, per token lane (with the codes'
    /// places undone).
    steps: [__m512; MAX_HEADS],
    /// `q · z` per head in every lane: the key zero points' share of every score.
    bias: [__m512; MAX_HEADS],
}

impl<'a, const KB: usize, const H: usize, const D: usize> IntegerKeys<'a, KB, H, D> {
    fn new(q: &'a [f32], layout: &Pages, gather: &'a KeyGather) -> Self {
        assert!(q.len() >= H * D);
        Self {
            q,
            layout: *layout,
            gather,
            codes: std::ptr::null(),
            high: [[0; D]; MAX_HEADS],
            low: [[0; D]; MAX_HEADS],
            // SAFETY: AVX-512F present (the kernel's features, checked before it runs).
            steps: [unsafe { _mm512_setzero_ps() }; MAX_HEADS],
            // SAFETY: as above.
            bias: [unsafe { _mm512_setzero_ps() }; MAX_HEADS],
        }
    }
}

impl<const KB: usize, const H: usize, const D: usize> SliceScores for IntegerKeys<'_, KB, H, D> {
    #[inline(always)]
    unsafe fn enter_block(&mut self, keys: &[u8]) {
        // a window read from a slice of the last channels ends less than 128 bytes past the
        // codes
        assert!(keys.len() >= self.layout.key.page_bytes());
        assert!(keys.len() >= self.layout.key.code_bytes + TWO_REGISTERS);
        let (kp, q) = (keys.as_ptr(), self.q);
        self.codes = kp;
        let registers = D / 16;
        // scales folded into the query, which is rounded and split per head; zero points
        // into a bias
        let mut folded = [[_mm512_setzero_ps(); 8]; MAX_HEADS];
        let mut bias = [_mm512_setzero_ps(); MAX_HEADS];
        // (loops, not closures, here and below: a closure would not carry the kernel's target
        // features, and its intrinsics would be calls)
        for i in 0..registers {
            // SAFETY: the pairs of channels 16i .. 16i + 16 (i < D/16) lie at code_bytes + 64i
            // inside the page (asserted).
            let (s, z) = unsafe { pairs16(kp.add(self.layout.key.code_bytes + 64 * i)) };
            for (h, (row, b)) in folded.iter_mut().zip(&mut bias).enumerate().take(H) {
                // SAFETY: h·D + 16i + 16 ≤ H·D ≤ q.len() (asserted by `new`).
                let x = unsafe { _mm512_loadu_ps(q.as_ptr().add(h * D + 16 * i)) };
                row[i] = _mm512_mul_ps(x, s);
                *b = _mm512_fmadd_ps(x, z, *b);
            }
        }
        // one scale per head: its largest magnitude ↦ UNIT (none for a query of zeros, or
        // too small to scale)
        let mut largest = [_mm512_setzero_ps(); MAX_HEADS];
        for (m, row) in largest.iter_mut().zip(&folded).take(H) {
            for x in &row[..registers] {
                *m = _mm512_max_ps(*m, _mm512_abs_ps(*x));
            }
        }
        // SAFETY: the kernel's features (the caller's contract).
        let (largest, bias) =
            unsafe { (across_lanes::<true>(largest), across_lanes::<false>(bias)) };
        let positive = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(largest, _mm512_setzero_ps());
        let up = _mm512_maskz_div_ps(positive, _mm512_set1_ps(UNIT), largest);
        let scalable = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(up, _mm512_set1_ps(f32::INFINITY));
        let up = _mm512_maskz_mov_ps(positive & scalable, up);
        let step = _mm512_maskz_mul_ps(positive & scalable, largest, _mm512_set1_ps(1.0 / UNIT));
        let heads = (self.high.iter_mut().zip(&mut self.low)).zip(&mut self.steps);
        for (h, (((high, low), steps), folded)) in heads.zip(&folded).enumerate().take(H) {
            // SAFETY: as above.
            unsafe {
                round_split(&folded[..registers], head_lane(up, h), high, low);
                *steps = _mm512_mul_ps(self.gather.unplace, head_lane(step, h));
                self.bias[h] = head_lane(bias, h);
            }
        }
    }

    #[inline(always)]
    unsafe fn scores(&mut self, slice: usize) -> [__m512; MAX_HEADS] {
        let column = self.layout.tokens * bits(KB) / 8;
        // SAFETY: the slice's codes start inside each column (slice < the block's slices).
        let kp = unsafe { self.codes.add(slice * SLICE * bits(KB) / 8) };
        // two accumulators per head and byte of the query (channel quads mod 2), for
        // independent dependency chains
        let mut highs = [[_mm512_setzero_si512(); 2]; MAX_HEADS];
        let mut lows = [[_mm512_setzero_si512(); 2]; MAX_HEADS];
        for c in (0..D).step_by(8) {
            // SAFETY: channels c .. c + 8 lie inside the page's codes, whose columns hold the
            // slice, and a window read from channel c + 4 ≤ D − 4 ends less than 128 bytes
            // past the codes, inside the page (asserted on entering the block); the kernel's
            // features (the caller's contract).
            let quads = unsafe {
                [
                    key_quad::<KB>(kp.add(c * column), column, self.gather),
                    key_quad::<KB>(kp.add((c + 4) * column), column, self.gather),
                ]
            };
            for h in 0..H {
                for (i, quad) in quads.iter().enumerate() {
                    let word = c / 4 + i;
                    // SAFETY: as above.
                    let (high, low) =
                        unsafe { (word_of(&self.high[h], word), word_of(&self.low[h], word)) };
                    highs[h][i] = _mm512_dpbusd_epi32(highs[h][i], *quad, high);
                    lows[h][i] = _mm512_dpbusd_epi32(lows[h][i], *quad, low);
                }
            }
        }
        let mut scores = [_mm512_setzero_ps(); MAX_HEADS];
        for h in 0..H {
            let high = _mm512_add_epi32(highs[h][0], highs[h][1]);
            let low = _mm512_add_epi32(lows[h][0], lows[h][1]);
            let dot = _mm512_add_epi32(_mm512_slli_epi32::<8>(high), low);
            scores[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), self.steps[h], self.bias[h]);
        }
        scores
    }
}

/// [`attend_run`] over a run of `blocks` with keys of kind `kb` and values of kind `vb`;
/// false (and nothing done) for a pair that is not [`supported`] or a geometry the kernels
/// do not serve.
///
/// # Safety
/// [`available`] must have answered true.
pub(super) unsafe fn dispatch(kb: usize, vb: usize, blocks: &Blocks, run: &mut Running) -> bool {
    super::block_kernel::serves(blocks.head_dim, blocks.tokens)
        && integer_pairs!(dispatch_pairs!(
            attend_run,
            (kb, vb, blocks.head_dim),
            (blocks, run)
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_queries_are_exact_and_fit_signed_bytes() {
        if !available() {
            println!("split_queries_are_exact: no AVX-512 VNNI/VBMI on this CPU, not run");
            return;
        }
        println!("split_queries_are_exact: ran the AVX-512 VNNI/VBMI kernel's query split");
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 29) as f32 - 14.0) * 0.731 + if i == 5 { 40.0 } else { 0.0 })
            .collect();
        let largest = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let step = largest / UNIT;
        // the extremes beside the rest: each splits into bytes that hold it
        let mut x = x;
        x[..6].copy_from_slice(&[UNIT, -UNIT, 128.0, -128.0, 127.0, -129.5].map(|v| v * step));
        // SAFETY: 4 registers loaded from 64 floats; the features (checked above).
        let (mut high, mut low) = ([0i8; 64], [0i8; 64]);
        unsafe {
            let regs: Vec<__m512> = (0..4)
                .map(|i| _mm512_loadu_ps(x[16 * i..].as_ptr()))
                .collect();
            round_split(&regs, _mm512_set1_ps(UNIT / largest), &mut high, &mut low);
        }
        for (i, v) in x.iter().enumerate() {
            let q = 256 * i32::from(high[i]) + i32::from(low[i]);
            let want = (v * (UNIT / largest)).round_ties_even() as i32;
            assert_eq!(q, want, "element {i} ({v})");
            assert!(q.abs() <= UNIT as i32, "element {i}: {q} beyond the unit");
            assert!((-128..128).contains(&i32::from(low[i])));
        }
    }

    #[test]
    fn four_heads_reduce_across_their_lanes_together() {
        if !available() {
            println!("four_heads_reduce: no AVX-512 VNNI/VBMI on this CPU, not run");
            return;
        }
        println!("four_heads_reduce: ran the AVX-512 transposing reduction");
        let heads: Vec<[f32; 16]> = (0..4)
            .map(|h| std::array::from_fn(|l| ((h * 31 + l * 7) % 23) as f32 - 3.0 * h as f32))
            .collect();
        // SAFETY: the features (checked above); 16 floats per register.
        let (largest, sums) = unsafe {
            let x: [__m512; 4] = std::array::from_fn(|h| _mm512_loadu_ps(heads[h].as_ptr()));
            let (mut largest, mut sums) = ([0f32; 16], [0f32; 16]);
            _mm512_storeu_ps(largest.as_mut_ptr(), across_lanes::<true>(x));
            _mm512_storeu_ps(sums.as_mut_ptr(), across_lanes::<false>(x));
            (largest, sums)
        };
        for (h, lanes) in heads.iter().enumerate() {
            let max = lanes.iter().fold(f32::MIN, |m, v| m.max(*v));
            let sum: f32 = lanes.iter().sum();
            for l in 4 * h..4 * h + 4 {
                assert_eq!(largest[l], max, "head {h}, lane {l}");
                assert_eq!(sums[l], sum, "head {h}, lane {l}");
            }
        }
    }

    #[test]
    fn key_quads_gather_codes_into_token_lanes_exactly() {
        if !available() {
            println!("key_quads_gather_codes: no AVX-512 VNNI/VBMI on this CPU, not run");
            return;
        }
        println!("key_quads_gather_codes: ran the AVX-512 VNNI/VBMI kernel's byte permutes");
        const D: usize = 64;
        let bytes: Vec<u8> = (0..256 * 64).map(|i| (i * 97 + i / 7) as u8).collect();
        let code = |bits: usize, i: usize| {
            let mask = ((1u16 << bits) - 1) as u8;
            u32::from((bytes[i * bits / 8] >> (i * bits % 8)) & mask)
        };
        for kind in [INT8, INT4, INT2] {
            let b = bits(kind);
            // windows of one and two registers, and pieces, at every slice
            for tokens in [16, 32, 64, 80, 128, 192] {
                let column = tokens * b / 8;
                // SAFETY: the features are present (checked above).
                let k = unsafe {
                    match kind {
                        INT8 => KeyGather::new::<INT8>(column),
                        INT4 => KeyGather::new::<INT4>(column),
                        _ => KeyGather::new::<INT2>(column),
                    }
                };
                for slice in 0..tokens / SLICE {
                    for c in (0..D).step_by(4) {
                        let at = bytes[slice * SLICE * b / 8 + c * column..].as_ptr();
                        let mut lanes = [0u32; 16];
                        // SAFETY: the features as above; `bytes` holds the four channels'
                        // slices (D·column ≤ its length).
                        unsafe {
                            let quad = match kind {
                                INT8 => key_quad::<INT8>(at, column, &k),
                                INT4 => key_quad::<INT4>(at, column, &k),
                                _ => key_quad::<INT2>(at, column, &k),
                            };
                            _mm512_storeu_si512(lanes.as_mut_ptr().cast(), quad);
                        }
                        for (l, lane) in lanes.iter().enumerate() {
                            let (place, t) = (key_place(kind, l), slice * SLICE + l);
                            let want = (0..4).fold(0u32, |w, j| {
                                w | (code(b, (c + j) * tokens + t) * place) << (8 * j)
                            });
                            assert_eq!(
                                *lane, want,
                                "kind {kind}, block {tokens} ({:?}): channels {c}.., token {t}",
                                k.mode
                            );
                        }
                    }
                }
            }
        }
    }
}
