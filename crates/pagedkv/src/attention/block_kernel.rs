//! One full block whose keys and values are f16, bf16, integer (int8, int4, int2) or fp8
//! pages (the pairs [`supported`] lists), at head_dim 64 or 128 and blocks of 16, 32 or 64
//! tokens (any multiple of 16), read in one call: key parameters folded into the query, the
//! scores, the online-softmax step and the weighted values, with nothing but each slice's 16
//! weights passing through memory. A run of blocks is read four query heads at a time (a
//! larger group goes through the run once per four heads), slice by slice, the next slice's
//! scores issued before a slice's values ([`read_slices`]).
//!
//! The general path (`pages`) reads the same pages in separate calls, each converting its
//! parameters through scratch buffers and reducing zero-point sums horizontally per block;
//! on a core with two 512-bit FMA pipes (AMD Zen 5) that bookkeeping, not the arithmetic, set
//! the pace for int4 (about 950 cycles per block and kv head where the FMAs need 192). Here:
//! - a block is read in slices of 16 tokens, one per lane ([`SLICE`]); the key parameters are
//!   per block and folded once, the values' per token;
//! - codes are widened in registers by shifts and one conversion per 16 codes (packed codes:
//!   a shift and a permute that looks the field up as f32); int4
//!   codes come out in the lane order [`lane_of`] gives, which the block keeps throughout:
//!   token lanes through the softmax, channel lanes in the outputs until [`leave`];
//! - the key scales fold into the query once per block (`q·(s⊙x + z) = (q⊙s)·x + q·z`) and
//!   the folded query is read by the FMAs as broadcast memory operands;
//! - the values are read 64 channels at a time (16 accumulators for four heads); their zero
//!   points are summed per token lane (`Σₜ pₜ·zₜ`) and reduced once per run of blocks
//!   ([`leave`]), not once per block.

pub(super) mod avx2;
mod slices;

pub(super) use slices::{read_slices, SliceScores};

use std::arch::x86_64::*;

use super::pages::x86::{by_component, exp_shifted};
use super::softmax::{lazy_max, LAZY_MAX_SLACK};
use crate::codec::{Codec, PageLayout, Role, VALUE_GROUP};

/// Tokens read at once, one per lane of a register: a block is read in slices of this many.
pub(super) const SLICE: usize = 16;

/// Most query heads one call attends; a larger group is read in turns.
pub(super) const MAX_HEADS: usize = 4;

/// Most groups of [`VALUE_GROUP`] value channels in a head (head_dim 128).
const MAX_GROUPS: usize = 4;

/// Whether the whole-block kernels serve `head_dim` and `block_size`: head_dim 64 or 128
/// (a const parameter of each kernel), blocks of whole slices.
pub(super) fn serves(head_dim: usize, block_size: usize) -> bool {
    matches!(head_dim, 64 | 128) && block_size > 0 && block_size.is_multiple_of(SLICE)
}

/// How a page's elements are stored (the kernel's `KIND` parameters): the low byte is the
/// width of a code in bits.
pub(super) const F16: usize = 16;
pub(super) const BF16: usize = 0x100 | 16;
pub(super) const INT8: usize = 8;
pub(super) const INT4: usize = 4;
pub(super) const INT2: usize = 2;
pub(super) const E4M3: usize = 0x100 | 8;
pub(super) const E5M2: usize = 0x200 | 8;

/// Bits of one stored element of `kind`.
pub(super) const fn bits(kind: usize) -> usize {
    kind & 0xFF
}

/// Elements stored as they are (f16, bf16): no parameters; a packed page of such a codec (a
/// layer overridden inside a compressed layout) is token-major and not read here.
pub(super) const fn full(kind: usize) -> bool {
    matches!(kind, F16 | BF16)
}

/// Integer codes: an f16 (scale, zero) per key channel, per value token and group of 32.
pub(super) const fn integer(kind: usize) -> bool {
    matches!(kind, INT8 | INT4 | INT2)
}

/// fp8 codes: an f16 scale per key channel, per value token.
const fn fp8(kind: usize) -> bool {
    matches!(kind, E4M3 | E5M2)
}

/// The codec whose pages are of `kind`.
const fn codec(kind: usize) -> Codec {
    match kind {
        F16 => Codec::F16,
        BF16 => Codec::Bf16,
        INT8 => Codec::Int8,
        INT4 => Codec::Int4,
        INT2 => Codec::Int2,
        E4M3 => Codec::Fp8E4m3,
        E5M2 => Codec::Fp8E5m2,
        _ => panic!("not a page kind"),
    }
}

/// Where a page of `kind` keeps its codes and parameters in blocks of `tokens` tokens of
/// `head_dim` channels (a geometry the layout accepted, so the sizes fit).
pub(super) const fn page(kind: usize, role: Role, tokens: usize, head_dim: usize) -> PageLayout {
    match PageLayout::scalar(codec(kind), role, tokens, head_dim) {
        Some(layout) => layout,
        None => panic!("a layout's pages have sizes that fit"),
    }
}

/// The pages of one run of blocks: where keys and values keep their parts, and the tokens
/// of a block.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pages {
    pub key: PageLayout,
    pub value: PageLayout,
    pub tokens: usize,
}

impl Pages {
    pub(super) const fn new(kb: usize, vb: usize, tokens: usize, head_dim: usize) -> Self {
        Self {
            key: page(kb, Role::Key, tokens, head_dim),
            value: page(vb, Role::Value, tokens, head_dim),
            tokens,
        }
    }

    /// Asserts what a kernel reading `heads` query heads of `head_dim` channels from one
    /// block in slices of `slice` tokens relies on: the geometry, and the lengths of the
    /// pages, the query and the state.
    #[inline(always)]
    pub(super) fn check(
        &self,
        (heads, head_dim, slice): (usize, usize, usize),
        (keys, values): (&[u8], &[u8]),
        q: &[f32],
        run: &Running,
    ) {
        assert!(heads <= MAX_HEADS && matches!(head_dim, 64 | 128));
        assert!(self.tokens.is_multiple_of(slice));
        assert!(q.len() >= heads * head_dim && run.acc.len() >= heads * head_dim);
        assert!(run.max.len() >= heads && run.lanes.len() >= heads && run.zeros.len() >= heads);
        assert!(keys.len() >= self.key.page_bytes() && values.len() >= self.value.page_bytes());
    }
}

/// A run of full blocks for a kernel to read: their (key, value) pages, the block's tokens
/// and head_dim, which of their pages to prefetch how many blocks ahead, and the query heads
/// (`q`: `heads × head_dim`, already multiplied by the softmax scale).
#[derive(Clone, Copy)]
pub(super) struct Blocks<'a> {
    pub pages: &'a [(&'a [u8], &'a [u8])],
    pub tokens: usize,
    pub head_dim: usize,
    pub fetch: super::pages::Fetch,
    pub heads: usize,
    pub q: &'a [f32],
}

/// What [`codes16`] returns is the element divided by this (e4m3 placed in an f16 reads
/// 2⁻⁸ of its value); the scales are multiplied by it.
const fn unit(kind: usize) -> f32 {
    if kind == E4M3 {
        256.0
    } else {
        1.0
    }
}

/// The CPU features the block loop needs.
pub(super) fn available() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f") && has!("avx2") && has!("f16c") && has!("fma")
}

/// Per query head of the pass: the values' zero-point sums per token lane and group of 32
/// channels (`[group][lane]`), kept until [`leave`] adds them to the outputs.
pub(super) type ZeroSums = [[f32; 16]; MAX_GROUPS];

/// The online-softmax state of some of a pass's query heads, borrowed from the pass.
pub(super) struct Running<'a> {
    pub max: &'a mut [f32],
    pub lanes: &'a mut [[f32; 16]],
    /// `heads × head_dim` unnormalized outputs.
    pub acc: &'a mut [f32],
    pub zeros: &'a mut [ZeroSums],
}

impl Running<'_> {
    /// Heads `first .. first + n` of the state (`head_dim` outputs each).
    pub(super) fn heads(&mut self, first: usize, n: usize, head_dim: usize) -> Running<'_> {
        Running {
            max: &mut self.max[first..first + n],
            lanes: &mut self.lanes[first..first + n],
            acc: &mut self.acc[first * head_dim..(first + n) * head_dim],
            zeros: &mut self.zeros[first..first + n],
        }
    }
}

impl Running<'_> {
    /// The online-softmax step of head `h` (`d` outputs) over a slice's 16 `scores`: the block's weights
    /// `exp(s − reference)`, added into the head's running sums; when the reference point
    /// moves, everything summed so far (sums, outputs, zero-point sums) is rescaled to it.
    ///
    /// # Safety
    /// AVX-512F present. (Inlined into each kernel rather than a call: the call's spills of
    /// its registers cost as much as the step.)
    #[inline(always)]
    pub(super) unsafe fn softmax_step(&mut self, h: usize, d: usize, scores: __m512) -> __m512 {
        // SAFETY: AVX-512F present (the caller's contract); the loads and stores read and
        // write `lanes[h]`'s 16 floats.
        unsafe {
            let max_in = self.max[h];
            let over =
                _mm512_cmp_ps_mask::<_CMP_GT_OQ>(scores, _mm512_set1_ps(max_in + LAZY_MAX_SLACK));
            let max = if over != 0 || max_in == f32::NEG_INFINITY {
                lazy_max(max_in, _mm512_reduce_max_ps(scores))
            } else {
                max_in
            };
            let e = exp_shifted(_mm512_sub_ps(scores, _mm512_set1_ps(max)));
            let sums = _mm512_loadu_ps(self.lanes[h].as_ptr());
            let sums = if max != max_in {
                // the reference point moved: everything summed so far rescaled to it
                let correction = (max_in - max).exp();
                self.acc[h * d..(h + 1) * d]
                    .iter_mut()
                    .for_each(|x| *x *= correction);
                for lanes in self.zeros[h].iter_mut() {
                    lanes.iter_mut().for_each(|x| *x *= correction);
                }
                _mm512_fmadd_ps(sums, _mm512_set1_ps(correction), e)
            } else {
                _mm512_add_ps(sums, e)
            };
            _mm512_storeu_ps(self.lanes[h].as_mut_ptr(), sums);
            self.max[h] = max;
            e
        }
    }
}

/// The lane of element `i` (0..16) of a group of sixteen elements of `kind` as [`codes16`]
/// returns them: int4 codes fill even lanes from the first eight and odd lanes from the last
/// eight (each 32-bit half of the group's 64 bits serves alternate lanes); others in order.
pub(super) const fn lane_of(kind: usize, i: usize) -> usize {
    if kind == INT4 {
        if i < 8 {
            2 * i
        } else {
            2 * (i - 8) + 1
        }
    } else {
        i
    }
}

/// Sixteen consecutive elements of `KIND` (packed codes lowest bits first) starting at `at`,
/// as f32 in the lanes [`lane_of`] gives, divided by [`unit`]: f16 converted as loaded, bf16
/// widened and shifted into an f32's upper half; fp8
/// codes made f16 bit patterns (e5m2 is an f16's upper byte; e4m3 sign-extended and shifted
/// into place, its top exponent bit cleared) and converted; int8 widened from memory; packed
/// codes broadcast from memory, each lane's field shifted to the bottom of its 32 bits and
/// looked up as f32 by a permute.
///
/// # Safety
/// AVX-512F and F16C present; `16·bits(KIND)/8` bytes readable at `at`.
#[inline(always)]
unsafe fn codes16<const KIND: usize>(at: *const u8) -> __m512 {
    // SAFETY (each arm): reads 16·bits(KIND)/8 bytes at `at` (the caller's contract).
    unsafe {
        match KIND {
            F16 => return _mm512_cvtph_ps(_mm256_loadu_si256(at.cast())),
            BF16 => {
                let halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256(at.cast()));
                return _mm512_castsi512_ps(_mm512_slli_epi32::<16>(halves));
            }
            E5M2 => {
                let bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(at.cast()));
                return _mm512_cvtph_ps(_mm256_slli_epi16::<8>(bytes));
            }
            E4M3 => {
                let bytes = _mm256_cvtepi8_epi16(_mm_loadu_si128(at.cast()));
                let half = _mm256_and_si256(
                    _mm256_slli_epi16::<7>(bytes),
                    _mm256_set1_epi16(0xBFFFu16 as i16),
                );
                return _mm512_cvtph_ps(half);
            }
            _ => {}
        }
    }
    // Packed codes: each lane's field shifted to the bottom of its 32 bits and looked up as
    // f32 by a permute, which reads only the low four bits of each lane's index (the bits
    // above, the next fields, are ignored): two operations where masking and converting
    // take three. The permute shares the FMA pipes on Zen 5 where the mask and conversion do
    // not; measured 1–5% faster all the same (int4 and int2, one thread, same-run A/B).
    // SAFETY (each arm): as above.
    unsafe {
        match KIND {
            8 => _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(at.cast()))),
            4 => {
                // even lanes see the low 32 bits (codes 0..8), odd lanes the high (8..16)
                let word = _mm512_set1_epi64(at.cast::<i64>().read_unaligned());
                let down =
                    _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
                _mm512_permutexvar_ps(_mm512_srlv_epi32(word, down), nibbles())
            }
            _ => {
                let word = _mm512_set1_epi32(at.cast::<i32>().read_unaligned());
                let down =
                    _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                _mm512_permutexvar_ps(_mm512_srlv_epi32(word, down), crumbs())
            }
        }
    }
}

/// The value of every 4-bit index as f32: the lookup table of a packed int4 code.
///
/// # Safety
/// AVX-512F present.
#[inline(always)]
unsafe fn nibbles() -> __m512 {
    // SAFETY: AVX-512F present (the contract); 16 floats from a constant table.
    unsafe { _mm512_loadu_ps(const { lookup(15) }.as_ptr()) }
}

/// The low two bits of every 4-bit index as f32: the lookup table of a packed int2 code
/// (the index's upper two bits are the next code's).
///
/// # Safety
/// AVX-512F present.
#[inline(always)]
unsafe fn crumbs() -> __m512 {
    // SAFETY: as for `nibbles`.
    unsafe { _mm512_loadu_ps(const { lookup(3) }.as_ptr()) }
}

/// `i & mask` as f32 for every 4-bit index `i`.
const fn lookup(mask: u32) -> [f32; 16] {
    let mut out = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = (i as u32 & mask) as f32;
        i += 1;
    }
    out
}

/// Four f16 (scale, zero) pairs' worth of registers: sixteen pairs at `at` split into the
/// sixteen scales and the sixteen zeros.
///
/// # Safety
/// AVX-512F and F16C present; 64 bytes readable at `at`.
#[inline(always)]
pub(super) unsafe fn pairs16(at: *const u8) -> (__m512, __m512) {
    // SAFETY: 64 bytes readable at `at` (the caller's contract).
    let (a, b) = unsafe {
        (
            _mm512_cvtph_ps(_mm256_loadu_si256(at.cast())),
            _mm512_cvtph_ps(_mm256_loadu_si256(at.add(32).cast())),
        )
    };
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    (
        _mm512_permutex2var_ps(a, even, b),
        _mm512_permutex2var_ps(a, odd, b),
    )
}

/// The values' per-token parameters of a slice (16 tokens × `D / 32` groups × (scale, zero),
/// f16) as `[s, z, s', z']` per 64 channels (groups `2i` and `2i + 1`), token t in lane
/// `lane_of(LANES, t)` (the scores' lanes); head_dim 64 fills the first.
///
/// # Safety
/// AVX-512F and F16C present; `16 · D / 32 · 4` bytes readable at `at`.
#[inline(always)]
pub(super) unsafe fn token_params<const LANES: usize, const D: usize>(
    at: *const u8,
) -> [[__m512; 4]; 2] {
    // (no intrinsics inside closures: a closure would not carry the kernel's target
    // features, and its intrinsics would be calls)
    let mut x = [_mm512_setzero_ps(); 8];
    for (i, x) in x.iter_mut().enumerate().take(D / 16) {
        // SAFETY: register i's 32 bytes lie inside the parameters (the caller's contract).
        *x = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(at.add(32 * i).cast())) };
    }
    let lane = |t| lane_of(LANES, t);
    if D == 64 {
        // four tokens × (s₀, z₀, s₁, z₁) per register
        let zero = [_mm512_setzero_ps(); 4];
        return [by_component([x[0], x[1], x[2], x[3]], lane), zero];
    }
    // two tokens × (s₀, z₀, … s₃, z₃) per register: each token's first four components, then
    // its last four, gathered four tokens to a register
    let pick = |first: i32| -> [i32; 16] {
        std::array::from_fn(|i| (i as i32 / 4) * 8 + first + i as i32 % 4)
    };
    let (low, high) = (pick(0), pick(4));
    // SAFETY: 16 i32 read from each local array.
    let (low, high) = unsafe {
        (
            _mm512_loadu_si512(low.as_ptr().cast()),
            _mm512_loadu_si512(high.as_ptr().cast()),
        )
    };
    let (mut lows, mut highs) = ([_mm512_setzero_ps(); 4], [_mm512_setzero_ps(); 4]);
    for (j, (l, h)) in lows.iter_mut().zip(&mut highs).enumerate() {
        *l = _mm512_permutex2var_ps(x[2 * j], low, x[2 * j + 1]);
        *h = _mm512_permutex2var_ps(x[2 * j], high, x[2 * j + 1]);
    }
    [by_component(lows, lane), by_component(highs, lane)]
}

/// Reads a run of full blocks (key and value pages each) for `heads` query heads (`q`:
/// `heads × D`, already multiplied by the softmax scale), four at a time: each group of
/// four through the whole run ([`read_slices`]), the outputs in the lanes of [`enter`].
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn attend_run<const KB: usize, const VB: usize, const D: usize>(
    blocks: &Blocks,
    run: &mut Running,
) {
    let layout = Pages::new(KB, VB, blocks.tokens, D);
    for first in (0..blocks.heads).step_by(MAX_HEADS) {
        let n = (blocks.heads - first).min(MAX_HEADS);
        with_heads!(n, H, {
            let mut keys = ExactKeys::<KB, H, D>::new(&blocks.q[first * D..], &layout);
            // SAFETY: AVX-512F, AVX2, FMA and F16C present (this function's features).
            unsafe { read_slices::<_, KB, VB, H, D>(blocks, &layout, first, &mut keys, run) };
        });
    }
}

/// The exact kernel's key side: a channel-major key page of kind `KB` (f16 elements; integer
/// codes with per-channel (scale, zero) pairs; fp8 codes with per-channel scales) read in f32,
/// token lanes in `KB`'s [`lane_of`] order.
struct ExactKeys<'a, const KB: usize, const H: usize, const D: usize> {
    /// `H × D` query rows, already multiplied by the softmax scale.
    q: &'a [f32],
    layout: Pages,
    /// The entered page's codes.
    codes: *const u8,
    /// The query with the entered block's key scales folded in, per head.
    folded: [[f32; D]; MAX_HEADS],
    /// `q · z` per head: the key zero points' share of every score.
    bias: [f32; MAX_HEADS],
}

impl<'a, const KB: usize, const H: usize, const D: usize> ExactKeys<'a, KB, H, D> {
    fn new(q: &'a [f32], layout: &Pages) -> Self {
        assert!(q.len() >= H * D);
        let mut folded = [[0.0; D]; MAX_HEADS];
        if full(KB) {
            // no parameters to fold: the query as it is, for every block
            for (h, row) in folded.iter_mut().enumerate().take(H) {
                row.copy_from_slice(&q[h * D..(h + 1) * D]);
            }
        }
        Self {
            q,
            layout: *layout,
            codes: std::ptr::null(),
            folded,
            bias: [0.0; MAX_HEADS],
        }
    }
}

impl<const KB: usize, const H: usize, const D: usize> SliceScores for ExactKeys<'_, KB, H, D> {
    #[inline(always)]
    unsafe fn enter_block(&mut self, keys: &[u8]) {
        assert!(keys.len() >= self.layout.key.page_bytes());
        let (kp, q, code_bytes) = (keys.as_ptr(), self.q, self.layout.key.code_bytes);
        self.codes = kp;
        // per-channel scales folded into the query, zero points into one constant per head
        let folded = &mut self.folded;
        let mut bias = [_mm512_setzero_ps(); MAX_HEADS];
        for c in (0..D).step_by(16).take(if fp8(KB) { D / 16 } else { 0 }) {
            // SAFETY: the scales of channels c .. c + 16 lie at code_bytes + 2c .. + 32 ≤ the
            // page (asserted); AVX-512F and F16C present (the caller's contract).
            let s =
                unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(kp.add(code_bytes + 2 * c).cast())) };
            let s = _mm512_mul_ps(s, _mm512_set1_ps(unit(KB)));
            for (h, row) in folded.iter_mut().enumerate().take(H) {
                // SAFETY: h·D + c + 16 ≤ H·D ≤ q.len() (asserted by `new`); c + 16 ≤ D.
                unsafe {
                    let x = _mm512_loadu_ps(q.as_ptr().add(h * D + c));
                    _mm512_storeu_ps(row.as_mut_ptr().add(c), _mm512_mul_ps(x, s));
                }
            }
        }
        for c in (0..D)
            .step_by(16)
            .take(if integer(KB) { D / 16 } else { 0 })
        {
            // SAFETY: the pairs of channels c .. c + 16 lie at code_bytes + 4c .. + 64 ≤ the
            // page (asserted).
            let (s, z) = unsafe { pairs16(kp.add(code_bytes + 4 * c)) };
            for (h, b) in bias.iter_mut().enumerate().take(H) {
                // SAFETY: h·D + c + 16 ≤ H·D ≤ q.len(); c + 16 ≤ D = the row's length.
                unsafe {
                    let x = _mm512_loadu_ps(q.as_ptr().add(h * D + c));
                    _mm512_storeu_ps(folded[h].as_mut_ptr().add(c), _mm512_mul_ps(x, s));
                    *b = _mm512_fmadd_ps(x, z, *b);
                }
            }
        }
        for (out, b) in self.bias.iter_mut().zip(bias).take(H) {
            *out = _mm512_reduce_add_ps(b);
        }
    }

    #[inline(always)]
    unsafe fn scores(&mut self, slice: usize) -> [__m512; MAX_HEADS] {
        // a channel's column holds the block's tokens
        let column = self.layout.tokens * bits(KB) / 8;
        // SAFETY: the slice's codes start inside each column (slice < the block's slices).
        let kp = unsafe { self.codes.add(slice * SLICE * bits(KB) / 8) };
        // four accumulators per head (channels mod 4): enough independent FMA chains to
        // cover the FMA latency on two pipes even for one head
        let mut dots = [[_mm512_setzero_ps(); 4]; MAX_HEADS];
        for c in (0..D).step_by(4) {
            // SAFETY: channel c + 3's column ends at (c + 4)·column ≤ code_bytes; the slice's
            // 16 codes lie inside it.
            let columns = unsafe {
                [
                    codes16::<KB>(kp.add(c * column)),
                    codes16::<KB>(kp.add((c + 1) * column)),
                    codes16::<KB>(kp.add((c + 2) * column)),
                    codes16::<KB>(kp.add((c + 3) * column)),
                ]
            };
            for (dots, folded) in dots.iter_mut().zip(&self.folded).take(H) {
                for (i, column) in columns.iter().enumerate() {
                    let qc = _mm512_set1_ps(folded[c + i]);
                    dots[i] = _mm512_fmadd_ps(qc, *column, dots[i]);
                }
            }
        }
        let mut scores = [_mm512_setzero_ps(); MAX_HEADS];
        for h in 0..H {
            let [a, b, c, d] = dots[h];
            let sum = _mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d));
            scores[h] = _mm512_add_ps(sum, _mm512_set1_ps(self.bias[h]));
        }
        scores
    }
}

/// Puts a pass's outputs (`heads × d`, channels in order) into the lanes [`read_slices`]
/// accumulates values of kind `vb` in: before the first block of a run.
pub(super) fn enter(vb: usize, heads: usize, d: usize, acc: &mut [f32]) {
    for chunk in acc[..heads * d].chunks_exact_mut(16) {
        let natural: [f32; 16] = (&*chunk).try_into().expect("chunks of 16");
        for (i, x) in natural.into_iter().enumerate() {
            chunk[lane_of(vb, i)] = x;
        }
    }
}

/// Ends a run of [`read_slices`] calls: the outputs back in channel order, the values'
/// zero-point sums added into them and cleared. Before any other reader of `acc` (another
/// page kind's block, or the end of the pass).
pub(super) fn leave(vb: usize, heads: usize, d: usize, zeros: &mut [ZeroSums], acc: &mut [f32]) {
    for chunk in acc[..heads * d].chunks_exact_mut(16) {
        let lanes: [f32; 16] = (&*chunk).try_into().expect("chunks of 16");
        for (i, x) in chunk.iter_mut().enumerate() {
            *x = lanes[lane_of(vb, i)];
        }
    }
    add_zero_sums(heads, d, zeros, acc);
}

/// Adds the values' zero-point sums (`Σ p·z` per group of 32 channels, spread over token
/// lanes) into outputs in channel order, and clears them.
pub(super) fn add_zero_sums(heads: usize, d: usize, zeros: &mut [ZeroSums], acc: &mut [f32]) {
    for (h, groups) in zeros.iter_mut().enumerate().take(heads) {
        for (g, lanes) in groups.iter_mut().enumerate().take(d / VALUE_GROUP) {
            let sum: f32 = lanes.iter().sum();
            let channels = h * d + VALUE_GROUP * g;
            acc[channels..channels + VALUE_GROUP]
                .iter_mut()
                .for_each(|a| *a += sum);
            *lanes = [0.0; 16];
        }
    }
}

/// The kind of a codec's pages in this kernel, if it has one.
pub(super) fn kind(codec: crate::Codec) -> Option<usize> {
    use crate::Codec;
    match codec {
        Codec::F16 => Some(F16),
        Codec::Bf16 => Some(BF16),
        Codec::Int8 => Some(INT8),
        Codec::Int4 => Some(INT4),
        Codec::Int2 => Some(INT2),
        Codec::Fp8E4m3 => Some(E4M3),
        Codec::Fp8E5m2 => Some(E5M2),
        _ => None,
    }
}

/// Whether [`attend_run`] (and the AVX2 kernel) is built for keys of kind `kb` with values
/// of kind `vb`.
pub(super) fn supported(kb: usize, vb: usize) -> bool {
    exact_pairs!(pair_listed!(kb, vb))
}

/// [`attend_run`] over a run of `blocks` with keys of kind `kb` and values of kind `vb`;
/// false (and nothing done) for a pair that
/// is not [`supported`] or a geometry not [`serves`]d.
///
/// # Safety
/// [`available`] must have answered true.
pub(super) unsafe fn dispatch(kb: usize, vb: usize, blocks: &Blocks, run: &mut Running) -> bool {
    serves(blocks.head_dim, blocks.tokens)
        && exact_pairs!(dispatch_pairs!(
            attend_run,
            (kb, vb, blocks.head_dim),
            (blocks, run)
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Code `i` of a packed group as the scalar codec stores it (lowest bits first).
    pub(super) fn code(bytes: &[u8], bits: usize, i: usize) -> u8 {
        let mask = ((1u16 << bits) - 1) as u8;
        (bytes[i * bits / 8] >> (i * bits % 8)) & mask
    }

    /// Says whether this CPU runs the whole-block kernel; the tests below have nothing else
    /// to run without it.
    fn ran_here(test: &str) -> bool {
        let ran = available();
        if ran {
            println!("{test}: ran the AVX-512 whole-block kernel's widening");
        } else {
            println!("{test}: no AVX-512 on this CPU, the whole-block kernel was not run");
        }
        ran
    }

    #[test]
    fn codes_widen_into_their_lanes_exactly_on_avx512_cpus() {
        if !ran_here("codes_widen_into_their_lanes_exactly") {
            return;
        }
        let bytes: Vec<u8> = (0..16 * 64).map(|i| (i * 97 + i / 7) as u8).collect();
        for bits in [8, 4, 2] {
            let mut lanes_seen = [false; 16];
            for i in 0..16 {
                lanes_seen[lane_of(bits, i)] = true;
            }
            assert!(
                lanes_seen.iter().all(|x| *x),
                "lane_of({bits}) is a permutation"
            );
            for group in bytes.chunks_exact(16 * bits / 8) {
                let mut out = [0f32; 16];
                // SAFETY: AVX-512F present (checked above); the group holds 16·bits/8 bytes.
                unsafe {
                    let v = match bits {
                        8 => codes16::<8>(group.as_ptr()),
                        4 => codes16::<4>(group.as_ptr()),
                        _ => codes16::<2>(group.as_ptr()),
                    };
                    _mm512_storeu_ps(out.as_mut_ptr(), v);
                }
                for i in 0..16 {
                    assert_eq!(
                        out[lane_of(bits, i)],
                        code(group, bits, i) as f32,
                        "{bits}-bit code {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn fp8_codes_widen_to_their_values_on_avx512_cpus() {
        if !ran_here("fp8_codes_widen_to_their_values") {
            return;
        }
        assert_fp8_widening(16, |kind, group| {
            let mut out = vec![0f32; 16];
            // SAFETY: AVX-512F and F16C present (checked above); 16 bytes in the group.
            unsafe {
                let v = match kind {
                    E4M3 => codes16::<E4M3>(group.as_ptr()),
                    _ => codes16::<E5M2>(group.as_ptr()),
                };
                _mm512_storeu_ps(out.as_mut_ptr(), v);
            }
            out.iter().map(|x| x * unit(kind)).collect()
        });
    }

    /// Every fp8 code of each kind, `lanes` at a time, widened by `widen` (and multiplied by
    /// its unit) to its value: NaN codes are never stored; every other one exactly.
    pub(super) fn assert_fp8_widening(lanes: usize, widen: impl Fn(usize, &[u8]) -> Vec<f32>) {
        let all: Vec<u8> = (0..=255).collect();
        for (kind, codec) in [(E4M3, crate::Codec::Fp8E4m3), (E5M2, crate::Codec::Fp8E5m2)] {
            let table = crate::codec::scalar::fp8_table(codec);
            for group in all.chunks_exact(lanes) {
                for (code, x) in group.iter().zip(widen(kind, group)) {
                    let want = table[*code as usize];
                    if want.is_finite() {
                        assert_eq!(x, want, "{codec} code {code:#04x}");
                    }
                }
            }
        }
    }

    #[test]
    fn entering_and_leaving_a_run_restores_channel_order() {
        for vb in [8, 4, 2] {
            let original: Vec<f32> = (0..3 * 64).map(|i| i as f32).collect();
            let mut acc = original.clone();
            enter(vb, 3, 64, &mut acc);
            if vb == 4 {
                assert_ne!(acc, original);
                // channel 8 of each chunk sits in lane 1
                assert_eq!(acc[1], 8.0);
            }
            let mut zeros = vec![ZeroSums::default(); 3];
            zeros[1][1][5] = 2.0;
            leave(vb, 3, 64, &mut zeros, &mut acc);
            for (i, (a, o)) in acc.iter().zip(&original).enumerate() {
                let added = if (64 + 32..2 * 64).contains(&i) {
                    2.0
                } else {
                    0.0
                };
                assert_eq!(*a, o + added, "vb {vb} element {i}");
            }
            assert!(zeros.iter().flatten().flatten().all(|z| *z == 0.0));
        }
    }
}
