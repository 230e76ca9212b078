//! The fast path's whole-block kernel (issue 22's contract, see [`super::AttentionPath`]): one
//! full block of integer pages (int8, int4 or int2 keys and values, any pair) at the geometries
//! of [`super::block_kernel`] (head_dim 64 or 128, blocks of whole 16-token slices, four query
//! heads per call) read with integer dot products, `vpdpwssd` (AVX-512 VNNI): two 16-bit products per 32-bit lane and
//! instruction, where the exact kernel ([`super::block_kernel`]) widens every code to f32 and
//! spends one FMA per code and head.
//!
//! - Keys: the channel scales fold into the query (`q·(s⊙x + z) = (q⊙s)·x + q·z`, as on the
//!   exact path); the folded query is rounded to 16-bit integers, one scale per head and
//!   block (8-bit queries err by up to a quarter of the output's scale on outlier channels:
//!   `docs/query-quantization-simulation.py`). Lanes are tokens; each lane's 32 bits hold
//!   the codes of two channels.
//! - Values: the softmax weights times the tokens' scales (`p·s` per token and group of 32
//!   channels) are rounded to 16-bit integers, one scale per head, group and block; lanes are
//!   channels, each lane's 32 bits the codes of two tokens. Zero points are summed in f32
//!   (`Σ p·z`), as on the exact path.
//! - Codes are not shifted down: a lane's code keeps the place its nibble or crumb had in its
//!   byte (×1, ×16; ×1, ×4, ×16, ×64), and the lane's dot is scaled back once per block. One
//!   byte shuffle and one mask per register of 32 codes, no conversion.
//!
//! Sums fit 32 bits: 128 channels × 32767 × 255 < 2³¹ (keys); 16 tokens likewise (values).

use std::arch::x86_64::*;

use super::block_kernel::ZeroSums;
use super::block_kernel::{bits, pairs16, serves, token_params, Blocks, Pages, Running};
use super::block_kernel::{INT2, INT4, INT8, MAX_HEADS, SLICE};

/// Largest magnitude of a rounded query or weight.
const UNIT: f32 = 32767.0;

/// The CPU features the kernel needs.
pub(super) fn available() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f")
        && has!("avx512bw")
        && has!("avx512vnni")
        && has!("avx2")
        && has!("f16c")
        && has!("fma")
}

/// Whether the kernel reads keys of kind `kb` with values of kind `vb`: integer kinds.
pub(super) fn supported(kb: usize, vb: usize) -> bool {
    matches!(kb, INT8 | INT4 | INT2) && matches!(vb, INT8 | INT4 | INT2)
}

/// The factor a key code of token `t` carries in its lane (its place in its byte).
const fn key_place(kind: usize, t: usize) -> u32 {
    match kind {
        INT4 => 1 << (4 * (t % 2)),
        INT2 => 1 << (2 * (t % 4)),
        _ => 1,
    }
}

/// Which value channel lane `l` of accumulator `r` (0..4) holds, and the factor its codes
/// carry. Accumulator `r` serves the channel group `r / 2` (32 channels each).
const fn value_lane(kind: usize, r: usize, l: usize) -> (usize, u32) {
    match kind {
        // bytes 16m .. 16m + 16 of a row: low nibbles (r even), high nibbles (r odd)
        INT4 => (32 * (r / 2) + 2 * l + r % 2, 1 << (4 * (r % 2))),
        // bytes 8g .. 8g + 8 of a row, twice: crumbs 0 and 1 (r even), 2 and 3 (r odd)
        INT2 => {
            let crumb = 2 * (r % 2) + l / 8;
            (32 * (r / 2) + 4 * (l % 8) + crumb, 1 << (2 * crumb))
        }
        _ => (16 * r + l, 1),
    }
}

/// A byte-shuffle control placing, in each 32-bit lane `l`, byte `low[l]` of its 128-bit
/// source lane in byte 0 and byte `high[l]` in byte 2 (`ZERO`: zero).
const fn shuffle(low: [u8; 16], high: [u8; 16]) -> [u8; 64] {
    let mut out = [ZERO; 64];
    let mut l = 0;
    while l < 16 {
        out[4 * l] = low[l];
        out[4 * l + 2] = high[l];
        l += 1;
    }
    out
}

/// A shuffle index that makes a zero byte.
const ZERO: u8 = 0x80;

/// The source byte of each of the 16 lanes: lane `l` picks `first + (l % period) / every`
/// (`every` lanes share a byte; the pattern repeats every `period` lanes).
const fn lanes(first: u8, every: usize, period: usize) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut l = 0;
    while l < 16 {
        out[l] = first + ((l % period) / every) as u8;
        l += 1;
    }
    out
}

/// The byte-shuffle controls of the keys: two, for int8's two sources (one column each);
/// int4's and int2's two columns share one source.
const fn key_shuffles(kb: usize) -> [[u8; 64]; 2] {
    let none = [ZERO; 16];
    match kb {
        // the two channels' columns (8 bytes each, one source): byte t / 2 of each
        INT4 => {
            let s = shuffle(lanes(0, 2, 16), lanes(8, 2, 16));
            [s, s]
        }
        // 4 bytes each (broadcast as 8 bytes): byte t / 4 of each
        INT2 => {
            let s = shuffle(lanes(0, 4, 16), lanes(4, 4, 16));
            [s, s]
        }
        // a column per source: byte t of the first into the low half, of the second the high
        _ => [
            shuffle(lanes(0, 1, 16), none),
            shuffle(none, lanes(0, 1, 16)),
        ],
    }
}

/// Values: rows `t` and `t + 1` are two sources; byte `l` of each (int2: byte `8g + l % 8`
/// for group `g`).
const fn value_shuffles(vb: usize) -> [[[u8; 64]; 2]; 2] {
    let none = [ZERO; 16];
    match vb {
        INT2 => [
            [shuffle(lanes(0, 1, 8), none), shuffle(none, lanes(0, 1, 8))],
            [shuffle(lanes(8, 1, 8), none), shuffle(none, lanes(8, 1, 8))],
        ],
        _ => {
            let pair = [
                shuffle(lanes(0, 1, 16), none),
                shuffle(none, lanes(0, 1, 16)),
            ];
            [pair, pair]
        }
    }
}

/// Per-lane 32-bit masks keeping the two 16-bit codes of each lane's field.
const fn masks(bits: usize, place: [u32; 16]) -> [u32; 16] {
    let field = (1u32 << bits) - 1;
    let mut out = [0u32; 16];
    let mut l = 0;
    while l < 16 {
        out[l] = field * place[l] * 0x0001_0001;
        l += 1;
    }
    out
}

const fn key_places(kb: usize) -> [u32; 16] {
    let mut out = [0u32; 16];
    let mut t = 0;
    while t < 16 {
        out[t] = key_place(kb, t);
        t += 1;
    }
    out
}

const fn value_places(vb: usize, r: usize) -> [u32; 16] {
    let mut out = [0u32; 16];
    let mut l = 0;
    while l < 16 {
        out[l] = value_lane(vb, r, l).1;
        l += 1;
    }
    out
}

const fn reciprocals(places: [u32; 16]) -> [f32; 16] {
    let mut out = [0f32; 16];
    let mut l = 0;
    while l < 16 {
        out[l] = 1.0 / places[l] as f32;
        l += 1;
    }
    out
}

/// The loop-invariant registers of one kernel instance.
struct Consts {
    key_shuffle: [__m512i; 2],
    key_mask: __m512i,
    /// 1 / the key codes' places, per token lane.
    key_unplace: __m512,
    value_shuffle: [[__m512i; 2]; 2],
    value_mask: [__m512i; 2],
    /// 1 / the value codes' places, per accumulator and channel lane.
    value_unplace: [__m512; 4],
}

impl Consts {
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn new<const KB: usize, const VB: usize>() -> Self {
        // SAFETY (each load): 64 bytes read from a constant table of 64 bytes.
        let load = |bytes: &[u8; 64]| unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) };
        let words = |w: &[u32; 16]| unsafe { _mm512_loadu_si512(w.as_ptr().cast()) };
        let floats = |f: &[f32; 16]| unsafe { _mm512_loadu_ps(f.as_ptr()) };
        let key_shuffle = const { key_shuffles(KB) };
        let value_shuffle = const { value_shuffles(VB) };
        let key_mask = const { masks(bits(KB), key_places(KB)) };
        let value_mask = const {
            [
                masks(bits(VB), value_places(VB, 0)),
                masks(bits(VB), value_places(VB, 1)),
            ]
        };
        let key_unplace = const { reciprocals(key_places(KB)) };
        let value_unplace = const {
            [
                reciprocals(value_places(VB, 0)),
                reciprocals(value_places(VB, 1)),
                reciprocals(value_places(VB, 2)),
                reciprocals(value_places(VB, 3)),
            ]
        };
        Self {
            key_shuffle: [load(&key_shuffle[0]), load(&key_shuffle[1])],
            key_mask: words(&key_mask),
            key_unplace: floats(&key_unplace),
            value_shuffle: [
                [load(&value_shuffle[0][0]), load(&value_shuffle[0][1])],
                [load(&value_shuffle[1][0]), load(&value_shuffle[1][1])],
            ],
            value_mask: [words(&value_mask[0]), words(&value_mask[1])],
            value_unplace: std::array::from_fn(|r| floats(&value_unplace[r])),
        }
    }
}

/// 16 bytes at `at` in each 128-bit lane.
///
/// # Safety
/// 16 bytes readable at `at`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn broadcast16(at: *const u8) -> __m512i {
    // SAFETY: the caller's contract.
    _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(at.cast()) })
}

/// Key channels `c` and `c + 1` (`c` even) of a slice of a channel-major page of `KB` codes
/// (`kp`: the slice's first codes, `column`: bytes of a channel's column): token `t`'s two
/// codes in lane `t`'s 16-bit halves, each at its place.
///
/// # Safety
/// The slice's codes of channels `c` and `c + 1` readable at `kp + c·column` and after.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn key_pair<const KB: usize>(kp: *const u8, c: usize, column: usize, k: &Consts) -> __m512i {
    let (first, second) = (
        kp.wrapping_add(c * column),
        kp.wrapping_add((c + 1) * column),
    );
    // SAFETY (each arm): each channel's slice holds 16·bits/8 bytes (the caller's contract);
    // adjacent columns (blocks of 16) are read as one.
    unsafe {
        match KB {
            INT4 => {
                let both = if column == 8 {
                    _mm_loadu_si128(first.cast())
                } else {
                    _mm_set_epi64x(
                        second.cast::<i64>().read_unaligned(),
                        first.cast::<i64>().read_unaligned(),
                    )
                };
                let both = _mm512_broadcast_i32x4(both);
                _mm512_and_si512(_mm512_shuffle_epi8(both, k.key_shuffle[0]), k.key_mask)
            }
            INT2 => {
                let both = if column == 4 {
                    first.cast::<i64>().read_unaligned()
                } else {
                    let (low, high) = (
                        first.cast::<u32>().read_unaligned(),
                        second.cast::<u32>().read_unaligned(),
                    );
                    (u64::from(high) << 32 | u64::from(low)) as i64
                };
                let both = _mm512_set1_epi64(both);
                _mm512_and_si512(_mm512_shuffle_epi8(both, k.key_shuffle[0]), k.key_mask)
            }
            _ => _mm512_or_si512(
                _mm512_shuffle_epi8(broadcast16(first), k.key_shuffle[0]),
                _mm512_shuffle_epi8(broadcast16(second), k.key_shuffle[1]),
            ),
        }
    }
}

/// Tokens `t` and `t + 1` (`t` even) of a token-major page of `VB` codes as the four
/// accumulators' operands ([`value_lane`]) of 64 channels: a lane's 16-bit halves hold its
/// channel's code of token `t` and of token `t + 1`, each at its place. `vp`: the first of
/// the 64 channels in the first row; `row`: bytes of a row.
///
/// # Safety
/// The 64 channels' codes of rows `t` and `t + 1` readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn value_pairs<const VB: usize>(
    vp: *const u8,
    t: usize,
    row: usize,
    k: &Consts,
) -> [__m512i; 4] {
    let (a, b) = (vp.wrapping_add(t * row), vp.wrapping_add((t + 1) * row));
    // bytes `offset .. + 16` of both rows, interleaved by the shuffles of `pair`
    let join = |offset: usize, pair: [__m512i; 2]| {
        // SAFETY: offset + 16 ≤ the 64 channels' 64·bits/8 bytes of each row (the caller's
        // contract).
        let (x, y) = unsafe { (broadcast16(a.add(offset)), broadcast16(b.add(offset))) };
        _mm512_or_si512(
            _mm512_shuffle_epi8(x, pair[0]),
            _mm512_shuffle_epi8(y, pair[1]),
        )
    };
    let [m0, m1] = k.value_mask;
    match VB {
        INT4 => {
            let (low, high) = (join(0, k.value_shuffle[0]), join(16, k.value_shuffle[0]));
            [
                _mm512_and_si512(low, m0),
                _mm512_and_si512(low, m1),
                _mm512_and_si512(high, m0),
                _mm512_and_si512(high, m1),
            ]
        }
        INT2 => {
            let (g0, g1) = (join(0, k.value_shuffle[0]), join(0, k.value_shuffle[1]));
            [
                _mm512_and_si512(g0, m0),
                _mm512_and_si512(g0, m1),
                _mm512_and_si512(g1, m0),
                _mm512_and_si512(g1, m1),
            ]
        }
        _ => std::array::from_fn(|r| join(16 * r, k.value_shuffle[0])),
    }
}

/// `x` rounded to 16-bit integers with one scale (the largest magnitude ↦ 32767), written to
/// `out`; returns the value of one step (0 when every element is 0, or too small to scale).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn round16(x: &[__m512], out: &mut [i16]) -> f32 {
    assert!(out.len() >= 16 * x.len());
    let magnitude = x.iter().fold(_mm512_setzero_ps(), |m, v| {
        _mm512_max_ps(m, _mm512_abs_ps(*v))
    });
    let largest = _mm512_reduce_max_ps(magnitude);
    let up = UNIT / largest;
    let (up, step) = if up.is_finite() {
        (up, largest * (1.0 / UNIT))
    } else {
        (0.0, 0.0)
    };
    for (i, v) in x.iter().enumerate() {
        let ints = _mm512_cvtps_epi32(_mm512_mul_ps(*v, _mm512_set1_ps(up)));
        // SAFETY: 16·(i + 1) ≤ 16·x.len() ≤ out.len() (asserted).
        unsafe {
            _mm256_storeu_si256(
                out.as_mut_ptr().add(16 * i).cast(),
                _mm512_cvtsepi32_epi16(ints),
            )
        };
    }
    step
}

/// Two adjacent 16-bit integers (elements `2i`, `2i + 1`) in every 32-bit lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn pair_of(x: &[i16], i: usize) -> __m512i {
    assert!(2 * i + 2 <= x.len());
    // SAFETY: elements 2i and 2i + 1 lie inside `x` (asserted).
    _mm512_set1_epi32(unsafe { x.as_ptr().add(2 * i).cast::<i32>().read_unaligned() })
}

/// [`attend_block`] over a run of full blocks (key and value pages each) for `heads` query
/// heads (`q`: `heads × D`, already multiplied by the softmax scale), four at a time block by
/// block; the pages of the block `ahead` further prefetched while one is read.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn attend_run<const KB: usize, const VB: usize, const D: usize>(
    blocks: &Blocks,
    run: &mut Running,
) {
    let k = Consts::new::<KB, VB>();
    let layout = Pages::new(KB, VB, blocks.tokens, D);
    read_run!(blocks, run, |keys, values, H, q, part| {
        attend_block::<KB, VB, H, D>(keys, values, &layout, q, &k, part)
    });
}

/// Attends `H` query heads (`q`: `H × D`, already multiplied by the softmax scale) to one
/// full block of `KB` keys and `VB` values (`k`: the constants of that pair), the outputs in
/// the lanes of [`enter`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn attend_block<const KB: usize, const VB: usize, const H: usize, const D: usize>(
    keys: &[u8],
    values: &[u8],
    layout: &Pages,
    q: &[f32],
    k: &Consts,
    run: &mut Running,
) {
    layout.check((H, D, SLICE), (keys, values), q, run);
    let Pages { key, value, tokens } = *layout;
    let (kp, vp) = (keys.as_ptr(), values.as_ptr());
    let registers = D / 16;

    // keys: scales folded into the query, which is rounded per head; zero points into a bias
    let mut folded = [[_mm512_setzero_ps(); 8]; MAX_HEADS];
    let mut bias = [_mm512_setzero_ps(); MAX_HEADS];
    let params: [(__m512, __m512); 8] = std::array::from_fn(|i| {
        if i < registers {
            // SAFETY: the pairs of channels 16i .. 16i + 16 (i < D/16) lie at code_bytes + 64i.
            unsafe { pairs16(kp.add(key.code_bytes + 64 * i)) }
        } else {
            (_mm512_setzero_ps(), _mm512_setzero_ps())
        }
    });
    for (h, (row, b)) in folded.iter_mut().zip(bias.iter_mut()).enumerate().take(H) {
        for (i, (f, (s, z))) in row.iter_mut().zip(params).enumerate().take(registers) {
            // SAFETY: h·D + 16i + 16 ≤ H·D ≤ q.len() (asserted).
            let x = unsafe { _mm512_loadu_ps(q.as_ptr().add(h * D + 16 * i)) };
            *f = _mm512_mul_ps(x, s);
            *b = _mm512_fmadd_ps(x, z, *b);
        }
    }
    let mut query = [[0i16; D]; MAX_HEADS];
    let mut query_step = [0f32; MAX_HEADS];
    for h in 0..H {
        query_step[h] = round16(&folded[h][..registers], &mut query[h]);
    }
    let bias: [f32; MAX_HEADS] = std::array::from_fn(|h| _mm512_reduce_add_ps(bias[h]));
    let key_steps: [__m512; MAX_HEADS] =
        std::array::from_fn(|h| _mm512_mul_ps(k.key_unplace, _mm512_set1_ps(query_step[h])));

    let column = tokens * bits(KB) / 8;
    let row = D * bits(VB) / 8;
    for slice in 0..tokens / SLICE {
        let first = slice * SLICE;
        // SAFETY: the slice's codes start inside each column (first < tokens).
        let kp = unsafe { kp.add(first * bits(KB) / 8) };
        // four accumulators per head (channel pairs mod 4) for independent dependency chains
        let mut dots = [[_mm512_setzero_si512(); 4]; MAX_HEADS];
        for c in (0..D).step_by(8) {
            // SAFETY: channels c .. c + 8 lie inside the page's codes (asserted).
            let pairs = unsafe {
                std::array::from_fn::<_, 4, _>(|i| key_pair::<KB>(kp, c + 2 * i, column, k))
            };
            for h in 0..H {
                for (i, pair) in pairs.iter().enumerate() {
                    let q = pair_of(&query[h], c / 2 + i);
                    dots[h][i] = _mm512_dpwssd_epi32(dots[h][i], *pair, q);
                }
            }
        }
        let mut weights = [_mm512_setzero_ps(); MAX_HEADS];
        for h in 0..H {
            let [a, b, c, d] = dots[h];
            let dot = _mm512_add_epi32(_mm512_add_epi32(a, b), _mm512_add_epi32(c, d));
            let scores = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(dot),
                key_steps[h],
                _mm512_set1_ps(bias[h]),
            );
            // SAFETY: AVX-512F present (this function's features).
            weights[h] = unsafe { run.softmax_step(h, D, scores) };
        }

        // values: the weights times the tokens' scales, rounded per head and group; Σ p·z
        // in f32
        // SAFETY: the slice's rows and its 16·D/32·4 bytes of parameters lie inside the page.
        let (rows, scales) = unsafe {
            (
                vp.add(first * row),
                token_params::<INT8, D>(vp.add(value.code_bytes + first * D / 8)),
            )
        };
        for (half, [s0, z0, s1, z1]) in scales.into_iter().enumerate().take(D / 64) {
            let mut scaled = [[0i16; 2 * SLICE]; MAX_HEADS];
            let mut scaled_step = [[0f32; 2]; MAX_HEADS];
            for h in 0..H {
                let p = weights[h];
                for (g, z) in [z0, z1].into_iter().enumerate() {
                    let at = run.zeros[h][2 * half + g].as_mut_ptr();
                    // SAFETY: `zeros[h][g]` holds 16 floats.
                    unsafe { _mm512_storeu_ps(at, _mm512_fmadd_ps(p, z, _mm512_loadu_ps(at))) };
                }
                let (low, high) = scaled[h].split_at_mut(SLICE);
                scaled_step[h] = [
                    round16(&[_mm512_mul_ps(p, s0)], low),
                    round16(&[_mm512_mul_ps(p, s1)], high),
                ];
            }
            // SAFETY: the half's channels start inside each row.
            let rows = unsafe { rows.add(64 * half * bits(VB) / 8) };
            let mut sums = [[_mm512_setzero_si512(); 4]; MAX_HEADS];
            for t in (0..SLICE).step_by(2) {
                // SAFETY: tokens t and t + 1 are rows of the slice, inside the page's codes.
                let v = unsafe { value_pairs::<VB>(rows, t, row, k) };
                for h in 0..H {
                    let (low, high) = scaled[h].split_at(SLICE);
                    let (w0, w1) = (pair_of(low, t / 2), pair_of(high, t / 2));
                    sums[h][0] = _mm512_dpwssd_epi32(sums[h][0], v[0], w0);
                    sums[h][1] = _mm512_dpwssd_epi32(sums[h][1], v[1], w0);
                    sums[h][2] = _mm512_dpwssd_epi32(sums[h][2], v[2], w1);
                    sums[h][3] = _mm512_dpwssd_epi32(sums[h][3], v[3], w1);
                }
            }
            for h in 0..H {
                for (r, sum) in sums[h].iter().enumerate() {
                    let step =
                        _mm512_mul_ps(k.value_unplace[r], _mm512_set1_ps(scaled_step[h][r / 2]));
                    // SAFETY: h·D + 64·half + 16r + 16 ≤ H·D ≤ acc.len() (asserted).
                    unsafe {
                        let at = run.acc.as_mut_ptr().add(h * D + 64 * half + 16 * r);
                        let x =
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(*sum), step, _mm512_loadu_ps(at));
                        _mm512_storeu_ps(at, x);
                    }
                }
            }
        }
    }
}

/// Puts a pass's outputs (`heads × d`, channels in order) into the lanes [`attend_block`]
/// accumulates values of kind `vb` in (per 64 channels): before the first block of a run.
pub(super) fn enter(vb: usize, heads: usize, d: usize, acc: &mut [f32]) {
    for chunk in acc[..heads * d].chunks_exact_mut(64) {
        let natural: [f32; 64] = (&*chunk).try_into().expect("chunks of 64");
        for (i, x) in chunk.iter_mut().enumerate() {
            *x = natural[value_lane(vb, i / 16, i % 16).0];
        }
    }
}

/// Ends a run of [`attend_block`] calls: the outputs back in channel order, the values'
/// zero-point sums added into them and cleared.
pub(super) fn leave(vb: usize, heads: usize, d: usize, zeros: &mut [ZeroSums], acc: &mut [f32]) {
    for chunk in acc[..heads * d].chunks_exact_mut(64) {
        let lanes: [f32; 64] = (&*chunk).try_into().expect("chunks of 64");
        for (i, x) in lanes.into_iter().enumerate() {
            chunk[value_lane(vb, i / 16, i % 16).0] = x;
        }
    }
    super::block_kernel::add_zero_sums(heads, d, zeros, acc);
}

/// [`attend_block`] over a run of `blocks` with keys of kind `kb` and values of kind `vb`;
/// false (and nothing done) for a pair that
/// is not [`supported`] or a geometry the kernels do not serve.
///
/// # Safety
/// [`available`] must have answered true.
pub(super) unsafe fn dispatch(kb: usize, vb: usize, blocks: &Blocks, run: &mut Running) -> bool {
    serves(blocks.head_dim, blocks.tokens)
        && dispatch_pairs!(
            attend_run,
            (kb, vb, blocks.head_dim),
            (blocks, run);
            INT8 / INT8, INT8 / INT4, INT8 / INT2,
            INT4 / INT8, INT4 / INT4, INT4 / INT2,
            INT2 / INT8, INT2 / INT4, INT2 / INT2
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_lanes_are_a_permutation_within_each_group() {
        for vb in [INT8, INT4, INT2] {
            let mut seen = [false; 64];
            for r in 0..4 {
                for l in 0..16 {
                    let (channel, place) = value_lane(vb, r, l);
                    assert_eq!(
                        channel / 32,
                        r / 2,
                        "kind {vb}: accumulator {r} serves group"
                    );
                    assert!(!seen[channel], "kind {vb}: channel {channel} twice");
                    assert!(
                        place * ((1 << bits(vb)) - 1) <= 255,
                        "the field fits its byte"
                    );
                    seen[channel] = true;
                }
            }
            assert!(seen.iter().all(|s| *s));
        }
    }

    #[test]
    fn codes_pair_into_their_lanes_exactly_on_vnni_cpus() {
        if !available() {
            println!("codes_pair_into_their_lanes_exactly: no AVX-512 VNNI on this CPU, not run");
            return;
        }
        println!("codes_pair_into_their_lanes_exactly: ran the AVX-512 VNNI kernel's shuffles");
        const D: usize = 64;
        let bytes: Vec<u8> = (0..64 * 64).map(|i| (i * 97 + i / 7) as u8).collect();
        let code = |bits: usize, i: usize| {
            let mask = ((1u16 << bits) - 1) as u8;
            u32::from((bytes[i * bits / 8] >> (i * bits % 8)) & mask)
        };
        for kind in [INT8, INT4, INT2] {
            let b = bits(kind);
            // keys: blocks of 16 (adjacent columns read as one) and 32 and 64, every slice
            for tokens in [16, 32, 64] {
                let column = tokens * b / 8;
                for slice in 0..tokens / SLICE {
                    let kp = bytes[slice * SLICE * b / 8..].as_ptr();
                    for c in (0..D).step_by(2) {
                        let mut lanes = [0u32; 16];
                        // SAFETY: VNNI present (checked above); `bytes` holds the page's codes.
                        unsafe {
                            let pair = match kind {
                                INT8 => {
                                    key_pair::<INT8>(kp, c, column, &Consts::new::<INT8, INT8>())
                                }
                                INT4 => {
                                    key_pair::<INT4>(kp, c, column, &Consts::new::<INT4, INT4>())
                                }
                                _ => key_pair::<INT2>(kp, c, column, &Consts::new::<INT2, INT2>()),
                            };
                            _mm512_storeu_si512(lanes.as_mut_ptr().cast(), pair);
                        }
                        for (l, lane) in lanes.iter().enumerate() {
                            let (place, t) = (key_place(kind, l), slice * SLICE + l);
                            let want = (code(b, c * tokens + t) * place)
                                | ((code(b, (c + 1) * tokens + t) * place) << 16);
                            assert_eq!(
                                *lane, want,
                                "kind {kind}, block {tokens}: key channels {c}, token {t}"
                            );
                        }
                    }
                }
            }
            // values: rows of 64 and 128 channels, each 64-channel half
            for d in [64, 128] {
                let row = d * b / 8;
                for half in 0..d / 64 {
                    let vp = bytes[64 * half * b / 8..].as_ptr();
                    for t in (0..SLICE).step_by(2) {
                        let mut regs = [[0u32; 16]; 4];
                        // SAFETY: as above.
                        unsafe {
                            let v = match kind {
                                INT8 => {
                                    value_pairs::<INT8>(vp, t, row, &Consts::new::<INT8, INT8>())
                                }
                                INT4 => {
                                    value_pairs::<INT4>(vp, t, row, &Consts::new::<INT4, INT4>())
                                }
                                _ => value_pairs::<INT2>(vp, t, row, &Consts::new::<INT2, INT2>()),
                            };
                            for (out, reg) in regs.iter_mut().zip(v) {
                                _mm512_storeu_si512(out.as_mut_ptr().cast(), reg);
                            }
                        }
                        for (r, lanes) in regs.iter().enumerate() {
                            for (l, lane) in lanes.iter().enumerate() {
                                let (channel, place) = value_lane(kind, r, l);
                                let channel = 64 * half + channel;
                                let want = (code(b, t * d + channel) * place)
                                    | ((code(b, (t + 1) * d + channel) * place) << 16);
                                assert_eq!(
                                    *lane, want,
                                    "kind {kind}, head_dim {d}: values {t}, accumulator {r} lane {l}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
