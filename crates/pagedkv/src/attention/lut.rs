//! FibQuant pages read as codes, never decoded (DESIGN §6): per query head, the rotated query
//! `q' = Πq` and a table `L[b][n] = ⟨q'_b, c_n⟩` turn a key's logit into `ν·Σ_b L[b][idx_b]`;
//! values add `p·ν·ĉ` (a token's vector in the rotated space, put together from its codewords)
//! into a rotated sum per query head, rotated back once at the end of the pass.

use std::sync::Arc;

use fibquant::FibQuant;

use crate::codec::vector::{page_norm, token_bytes, token_norm, PAGE_HEADER};
use crate::codec::Codec;
use crate::error::{KvError, Result};
use crate::key_norm::KeyNorm;

use super::pages::{ScaledQuery, Shape};
use super::Simd;

/// [`FibTables::read_code`] into `indices` (the code's `d / k` blocks).
#[inline(always)]
fn read_code_into(
    q: &FibQuant,
    bytes: &[u8],
    largest: f32,
    t: usize,
    indices: &mut [u16],
) -> Result<f32> {
    let tb = token_bytes(q);
    let code = &bytes[PAGE_HEADER + t * tb..PAGE_HEADER + (t + 1) * tb];
    fibquant::pack::unpack(&code[1..], q.index_bits(), indices);
    let n = q.profile().n;
    if let Some(bad) = indices.iter().find(|i| **i as usize >= n) {
        return Err(KvError::FibQuant(fibquant::FibQuantError::BadIndex {
            index: *bad as usize,
            n,
        }));
    }
    Ok(token_norm(largest, code[0]))
}

/// Rotated coordinates the general value sum adds at a time.
const SUM_WIDTH: usize = 16;

/// Tables and sums of one kv head's pass, reused across heads and calls.
#[derive(Debug, Default, Clone)]
pub(super) struct FibTables {
    quantizer: Option<(Codec, Arc<FibQuant>)>,
    /// `group × blocks × N` query tables, valid while `tables_ready`.
    tables: Vec<f32>,
    tables_ready: bool,
    indices: Vec<u16>,
    /// A value page's codeword indices (tokens × blocks) and `p·ν` (heads × tokens), for
    /// [`FibTables::accumulate_in_chunks`].
    page_indices: Vec<u16>,
    weights: Vec<f32>,
    rotated: Vec<f32>,
    /// Fast path (k = 2 or 4, byte indices, blocks of 16, AVX-512 or AVX2): the rotated
    /// queries (`group × d`); every path: the value sum in the rotated space (`group × d`),
    /// rotated back once in `finish`.
    rotated_q: Vec<f32>,
    rotated_ready: bool,
    rotated_acc: Vec<f32>,
    rotated_used: bool,
    /// Normalized keys: `group × head_dim` bias coefficients of the pass's queries.
    bias_coefficients: Vec<f32>,
    bias_ready: bool,
    bias: Vec<f32>,
}

/// The `fibquant` crate's instruction set for a pass at `simd`: its rotation runs at the
/// pass's level, so a forced level measures and tests only that level's loops.
fn isa(simd: Simd) -> fibquant::Isa {
    match simd {
        Simd::Portable => fibquant::Isa::Portable,
        Simd::Avx2 => fibquant::Isa::Avx2,
        Simd::Avx512 => fibquant::Isa::Avx512,
    }
}

impl FibTables {
    /// Forgets the previous head's tables and sums.
    pub(super) fn start_head(&mut self) {
        self.tables_ready = false;
        self.bias_ready = false;
        self.rotated_ready = false;
        self.rotated_used = false;
    }

    /// True when the AVX-512 or AVX2 loops serve this page: 2- or 4-coordinate codewords with
    /// byte indices, blocks of 16, head_dim a multiple of 16, a pass at either level.
    #[inline(always)]
    fn fast(fq: &FibQuant, shape: Shape) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            matches!(fq.profile().k, 2 | 4)
                && fq.index_bits() == 8
                && shape.bs == 16
                && shape.d.is_multiple_of(16)
                && matches!(shape.simd, Simd::Avx512 | Simd::Avx2)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (fq, shape);
            false
        }
    }

    /// Checks the page's largest norm and every index of the first `n` codes against the
    /// codebook size (a corrupt page is an error, never an out-of-bounds read; with 256
    /// codewords every byte is valid), and returns that norm.
    fn check_page(fq: &FibQuant, bytes: &[u8], n: usize) -> Result<f32> {
        let largest = page_norm(bytes)?;
        let words = fq.profile().n;
        if words >= 256 {
            return Ok(largest);
        }
        for code in bytes[PAGE_HEADER..].chunks_exact(token_bytes(fq)).take(n) {
            if let Some(bad) = code[1..].iter().find(|i| **i as usize >= words) {
                return Err(KvError::FibQuant(fibquant::FibQuantError::BadIndex {
                    index: *bad as usize,
                    n: words,
                }));
            }
        }
        Ok(largest)
    }

    /// Computes, once per pass, the coefficients of the normalized keys' mean term for the
    /// query rows `q` of kv `head` in `layer` (see [`Self::add_mean_scores`]).
    pub(super) fn prepare_mean_scores(
        &mut self,
        c: &KeyNorm,
        layer: usize,
        head: usize,
        q: &[f32],
        shape: Shape,
    ) {
        if self.bias_ready {
            return;
        }
        let d = shape.d;
        self.bias_coefficients.resize(shape.group * d, 0.0);
        for (qg, out) in q
            .chunks_exact(d)
            .zip(self.bias_coefficients.chunks_exact_mut(d))
        {
            c.bias_coefficients(layer, head, qg, out);
        }
        self.bias_ready = true;
    }

    /// Adds the normalized keys' mean term `scale·⟨q_g, RoPE_p(m)⟩` to the scores of the first
    /// `n` tokens of a block whose first token is at `start` (after
    /// [`Self::prepare_mean_scores`]).
    pub(super) fn add_mean_scores(
        &mut self,
        c: &KeyNorm,
        start: usize,
        n: usize,
        shape: Shape,
        scale: f32,
        scores: &mut [f32],
    ) {
        let Shape { group, d, bs, .. } = shape;
        for g in 0..group {
            let coefficients = &self.bias_coefficients[g * d..(g + 1) * d];
            c.add_block_bias(
                coefficients,
                start,
                scale,
                &mut scores[g * bs..g * bs + n],
                &mut self.bias,
            );
        }
    }

    /// Runs `f` with the page's quantizer, kept between calls (moved out and back: no
    /// reference count touched per block).
    #[inline(always)]
    fn with_quantizer<R>(
        &mut self,
        codec: Codec,
        d: usize,
        f: impl FnOnce(&mut Self, &FibQuant) -> Result<R>,
    ) -> Result<R> {
        let fq = match self.quantizer.take() {
            Some((c, q)) if c == codec && q.profile().d == d => q,
            _ => {
                let profile = codec.fibquant_profile(d).ok_or(KvError::UnsupportedCodec {
                    codec: codec.to_string(),
                    reason: "not a FibQuant codec",
                })?;
                FibQuant::shared(profile)?
            }
        };
        let result = f(self, &fq);
        self.quantizer = Some((codec, fq));
        result
    }

    /// Norm (from the page's `largest`) and codeword indices of token `t`'s code; an index
    /// outside the codebook is an error (a corrupt page), never an out-of-bounds read.
    #[inline(always)]
    fn read_code(&mut self, q: &FibQuant, bytes: &[u8], largest: f32, t: usize) -> Result<f32> {
        self.indices.resize(q.profile().d / q.profile().k, 0);
        read_code_into(q, bytes, largest, t, &mut self.indices)
    }

    /// `scores[g·bs + t] = scale·⟨q_g, k̂_t⟩` from the codes of a key page.
    #[inline(always)]
    pub(super) fn key_scores(
        &mut self,
        codec: Codec,
        bytes: &[u8],
        n: usize,
        shape: Shape,
        query: ScaledQuery,
        scores: &mut [f32],
    ) -> Result<()> {
        self.with_quantizer(codec, shape.d, |tables, fq| {
            tables.key_scores_with(fq, bytes, n, shape, query, scores)
        })
    }

    #[inline(always)]
    fn key_scores_with(
        &mut self,
        fq: &FibQuant,
        bytes: &[u8],
        n: usize,
        shape: Shape,
        query: ScaledQuery,
        scores: &mut [f32],
    ) -> Result<()> {
        let Shape { group, d, bs, .. } = shape;
        let ScaledQuery { rows: q, scale } = query;
        #[cfg(target_arch = "x86_64")]
        if Self::fast(fq, shape) {
            let largest = Self::check_page(fq, bytes, n)?;
            if !self.rotated_ready {
                self.rotated_q.resize(group * d, 0.0);
                self.rotated_q.copy_from_slice(&q[..group * d]);
                for qg in self.rotated_q.chunks_exact_mut(d) {
                    fq.rotate_with(qg, isa(shape.simd));
                }
                self.rotated_ready = true;
            }
            let words = fq.codebook().words();
            // SAFETY: the pass's level has its features (`fast` names AVX-512 or AVX2, and a
            // pass runs at a level only where the CPU has it); every index is below the
            // codebook size (checked above) and lengths are checked inside.
            unsafe {
                let rotated = ScaledQuery {
                    rows: &self.rotated_q,
                    scale,
                };
                match (shape.simd, fq.profile().k) {
                    (Simd::Avx512, 4) => {
                        x86::fib_scores_16::<4>(bytes, largest, n, shape, words, rotated, scores)
                    }
                    (Simd::Avx512, _) => {
                        x86::fib_scores_16::<2>(bytes, largest, n, shape, words, rotated, scores)
                    }
                    (_, 4) => {
                        avx2::fib_scores_16::<4>(bytes, largest, n, shape, words, rotated, scores)
                    }
                    _ => avx2::fib_scores_16::<2>(bytes, largest, n, shape, words, rotated, scores),
                }
            };
            return Ok(());
        }
        let (k, words) = (fq.profile().k, fq.profile().n);
        let blocks = d / k;
        if !self.tables_ready {
            self.tables.resize(group * blocks * words, 0.0);
            self.rotated.resize(d, 0.0);
            for (g, qg) in q.chunks_exact(d).enumerate() {
                self.rotated.copy_from_slice(qg);
                fq.rotate_with(&mut self.rotated, isa(shape.simd));
                for b in 0..blocks {
                    let table = &mut self.tables[(g * blocks + b) * words..][..words];
                    table.fill(0.0);
                    for j in 0..k {
                        let x = self.rotated[b * k + j];
                        let column = &fq.codebook().column(j)[..words];
                        table.iter_mut().zip(column).for_each(|(l, c)| *l += x * c);
                    }
                }
            }
            self.tables_ready = true;
        }
        let largest = page_norm(bytes)?;
        for t in 0..n {
            let norm = self.read_code(fq, bytes, largest, t)?;
            for g in 0..group {
                let tables = &self.tables[g * blocks * words..(g + 1) * blocks * words];
                let sum: f32 = self
                    .indices
                    .iter()
                    .enumerate()
                    .map(|(b, i)| tables[b * words + *i as usize])
                    .sum();
                scores[g * bs + t] = sum * norm * scale;
            }
        }
        Ok(())
    }

    /// Adds `p·ν·ĉ` of each token of a value page into the rotated sums.
    #[inline(always)]
    pub(super) fn accumulate(
        &mut self,
        codec: Codec,
        bytes: &[u8],
        n: usize,
        shape: Shape,
        probs: &[f32],
    ) -> Result<()> {
        self.with_quantizer(codec, shape.d, |tables, fq| {
            tables.accumulate_with(fq, bytes, n, shape, probs)
        })
    }

    #[inline(always)]
    fn accumulate_with(
        &mut self,
        fq: &FibQuant,
        bytes: &[u8],
        n: usize,
        shape: Shape,
        probs: &[f32],
    ) -> Result<()> {
        let Shape { group, d, bs, .. } = shape;
        // every path adds into the rotated sums, started at the pass's first value page
        if !self.rotated_used {
            self.rotated_acc.clear();
            self.rotated_acc.resize(group * d, 0.0);
            self.rotated_used = true;
        }
        #[cfg(target_arch = "x86_64")]
        if Self::fast(fq, shape) {
            let largest = Self::check_page(fq, bytes, n)?;
            let words = fq.codebook().words();
            // SAFETY: as in `key_scores`.
            unsafe {
                let acc = &mut self.rotated_acc;
                match (shape.simd, fq.profile().k) {
                    (Simd::Avx512, 4) => {
                        x86::fib_values_16::<4>(bytes, largest, n, shape, words, probs, acc)
                    }
                    (Simd::Avx512, _) => {
                        x86::fib_values_16::<2>(bytes, largest, n, shape, words, probs, acc)
                    }
                    (_, 4) => avx2::fib_values_16::<4>(bytes, largest, n, shape, words, probs, acc),
                    _ => avx2::fib_values_16::<2>(bytes, largest, n, shape, words, probs, acc),
                }
            };
            return Ok(());
        }
        // the token's vector in the rotated space, put together from its codewords, added
        // into the rotated sums (not into per-codeword bins: those are group × blocks × N
        // floats to clear and fold per pass, 0.8 MB per kv head at N = 4096)
        let (k, words) = (fq.profile().k, fq.codebook().words());
        let largest = page_norm(bytes)?;
        if d.is_multiple_of(SUM_WIDTH) {
            match k {
                2 => return self.accumulate_in_chunks::<2>(fq, bytes, largest, n, shape, probs),
                4 => return self.accumulate_in_chunks::<4>(fq, bytes, largest, n, shape, probs),
                _ => {}
            }
        }
        self.rotated.resize(d, 0.0);
        for t in 0..n {
            let norm = self.read_code(fq, bytes, largest, t)?;
            for (block, i) in self.rotated.chunks_exact_mut(k).zip(&self.indices) {
                // element by element: a copy of k floats would be a call to memmove
                let word = &words[*i as usize * k..][..k];
                block.iter_mut().zip(word).for_each(|(o, w)| *o = *w);
            }
            for (g, acc) in self.rotated_acc.chunks_exact_mut(d).enumerate() {
                let w = probs[g * bs + t] * norm;
                acc.iter_mut()
                    .zip(&self.rotated)
                    .for_each(|(a, v)| *a += w * v);
            }
        }
        Ok(())
    }

    /// [`Self::accumulate_with`]'s general sum, `SUM_WIDTH` rotated coordinates at a time: each
    /// token's codes read once, and up to four heads' sums of those coordinates kept in local
    /// arrays over the page's tokens (in registers where the target has them), so the rotated
    /// sums are read and written once per page, not once per token and head. The same
    /// additions in the same order as token by token: the same sums.
    fn accumulate_in_chunks<const K: usize>(
        &mut self,
        fq: &FibQuant,
        bytes: &[u8],
        largest: f32,
        n: usize,
        shape: Shape,
        probs: &[f32],
    ) -> Result<()> {
        let Shape { group, d, bs, .. } = shape;
        debug_assert_eq!(fq.profile().k, K);
        let words = fq.codebook().words();
        let blocks = d / K;
        let mut indices = std::mem::take(&mut self.page_indices);
        indices.resize(n * blocks, 0);
        self.weights.resize(group * n, 0.0);
        for t in 0..n {
            // (on a corrupt page the scratch is dropped: the next page allocates it again)
            let token = &mut indices[t * blocks..(t + 1) * blocks];
            let norm = read_code_into(fq, bytes, largest, t, token)?;
            for g in 0..group {
                self.weights[g * n + t] = probs[g * bs + t] * norm;
            }
        }
        let per_chunk = SUM_WIDTH / K;
        for first in (0..group).step_by(4) {
            with_heads!((group - first).min(4), H, {
                for j in 0..d / SUM_WIDTH {
                    let mut sums = [[0f32; SUM_WIDTH]; H];
                    for (h, sums) in sums.iter_mut().enumerate() {
                        let at = (first + h) * d + SUM_WIDTH * j;
                        sums.copy_from_slice(&self.rotated_acc[at..at + SUM_WIDTH]);
                    }
                    for t in 0..n {
                        let mut v = [0f32; SUM_WIDTH];
                        let codes = &indices[t * blocks + j * per_chunk..][..per_chunk];
                        for (piece, &i) in v.chunks_exact_mut(K).zip(codes) {
                            // K floats: a copy of a known length, inlined
                            piece.copy_from_slice(&words[i as usize * K..][..K]);
                        }
                        for (h, sums) in sums.iter_mut().enumerate() {
                            let w = self.weights[(first + h) * n + t];
                            sums.iter_mut().zip(&v).for_each(|(s, x)| *s += w * x);
                        }
                    }
                    for (h, sums) in sums.iter().enumerate() {
                        let at = (first + h) * d + SUM_WIDTH * j;
                        self.rotated_acc[at..at + SUM_WIDTH].copy_from_slice(sums);
                    }
                }
            });
        }
        self.page_indices = indices;
        Ok(())
    }

    /// Rescales query head `g`'s value sum (online softmax: a new running maximum).
    #[inline(always)]
    pub(super) fn rescale(&mut self, g: usize, group: usize, correction: f32) {
        if self.rotated_used {
            let d = self.rotated_acc.len() / group;
            self.rotated_acc[g * d..(g + 1) * d]
                .iter_mut()
                .for_each(|a| *a *= correction);
        }
    }

    /// Adds the value sums, rotated back, into `acc` (`group × d`).
    #[inline(always)]
    pub(super) fn finish(&mut self, shape: Shape, acc: &mut [f32]) {
        if !self.rotated_used {
            return;
        }
        if let Some((_, fq)) = self.quantizer.clone() {
            let d = shape.d;
            for (a, r) in acc
                .chunks_exact_mut(d)
                .zip(self.rotated_acc.chunks_exact_mut(d))
            {
                fq.unrotate_scaled_with(r, 1.0, isa(shape.simd));
                a.iter_mut().zip(r.iter()).for_each(|(a, r)| *a += r);
            }
        }
        self.rotated_used = false;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
/// The AVX-512 path for 2- and 4-coordinate codewords with byte indices and blocks of 16: a
/// token's rotated vector is put together in registers from its codewords (one load each), so
/// no tables are written; values are summed in the rotated space and rotated back once per
/// pass.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{ScaledQuery, Shape};
    use crate::codec::vector::{token_norm, PAGE_HEADER};

    /// Sixteen rotated coordinates of the token whose indices start at `idx`: four codewords
    /// of 4 coordinates (`K` = 4) or eight of 2 (`K` = 2), one load each.
    ///
    /// # Safety
    /// AVX-512F must be present; `idx` must point at 16 / `K` readable indices, each below the
    /// number of codewords in `words` (`K` floats each).
    #[inline(always)]
    unsafe fn chunk<const K: usize>(words: *const f32, idx: *const u8) -> __m512 {
        // SAFETY: guaranteed by the caller.
        unsafe {
            let w = |i: usize| -> __m128 {
                let at = |j: usize| words.add(*idx.add(j) as usize * K);
                if K == 4 {
                    _mm_loadu_ps(at(i))
                } else {
                    // two 2-coordinate codewords side by side
                    let lo = _mm_load_sd(at(2 * i).cast());
                    _mm_castpd_ps(_mm_loadh_pd(lo, at(2 * i + 1).cast()))
                }
            };
            let v = _mm512_castps128_ps512(w(0));
            let v = _mm512_insertf32x4::<1>(v, w(1));
            let v = _mm512_insertf32x4::<2>(v, w(2));
            _mm512_insertf32x4::<3>(v, w(3))
        }
    }

    /// Checks the page's shape and returns the bytes of one token's code (norm byte, then one
    /// byte per codeword index) and the norms `ν_t` of its first `n` tokens.
    pub(super) fn check<const K: usize>(
        bytes: &[u8],
        largest: f32,
        n: usize,
        shape: Shape,
        words: &[f32],
    ) -> (usize, [f32; 16]) {
        let Shape { d, bs, .. } = shape;
        let code_bytes = 1 + d / K;
        assert!(K == 2 || K == 4);
        assert!(n <= bs && bs == 16 && d.is_multiple_of(16));
        assert!(bytes.len() >= PAGE_HEADER + n * code_bytes && words.len() >= K);
        let mut nu = [0f32; 16];
        for (t, nu) in nu.iter_mut().enumerate().take(n) {
            *nu = token_norm(largest, bytes[PAGE_HEADER + t * code_bytes]);
        }
        (code_bytes, nu)
    }

    /// Two registers of partial sums, A (token a) and B (token b), folded into one: 128-bit
    /// lanes 0–1 hold a's partials, 2–3 b's.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fold_pair(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        )
    }

    /// Two pairs folded (`fold_pair` outputs for tokens a, b and c, d): 128-bit lane k holds
    /// four partials of the k-th of a, b, c, d.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fold_quad(ab: __m512, cd: __m512) -> __m512 {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(ab, cd),
            _mm512_shuffle_f32x4::<0xDD>(ab, cd),
        )
    }

    /// Four `fold_quad` outputs (tokens 0–3, 4–7, 8–11, 12–15) summed into one register of the
    /// sixteen tokens' totals, in token order.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fold_sixteen(quads: [__m512; 4]) -> __m512 {
        let halves = |x: __m512, y: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(x, y),
                _mm512_shuffle_ps::<0xEE>(x, y),
            )
        };
        let (x, y) = (halves(quads[0], quads[1]), halves(quads[2], quads[3]));
        let sums = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(x, y),
            _mm512_shuffle_ps::<0xDD>(x, y),
        );
        // element 4k + j now holds token 4j + k
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(order, sums)
    }

    /// `scores[g·16 + t] = scale·ν_t·⟨(Πq)_g, ĉ_t⟩` for the first `n` tokens of a page. Each
    /// token's products stay spread over 16 lanes per head; four tokens at a time are folded
    /// together by shuffles, and the sixteen totals come out as one register per head (no
    /// horizontal sum per token).
    ///
    /// # Safety
    /// AVX-512F and F16C must be present and every index of the first `n` codes below
    /// `words.len() / 4`.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn fib_scores_16<const K: usize>(
        bytes: &[u8],
        largest: f32,
        n: usize,
        shape: Shape,
        words: &[f32],
        rotated: ScaledQuery,
        scores: &mut [f32],
    ) {
        let Shape { group, d, bs, .. } = shape;
        let ScaledQuery {
            rows: rotated_q,
            scale,
        } = rotated;
        let (code_bytes, nu) = check::<K>(bytes, largest, n, shape, words);
        assert!(rotated_q.len() >= group * d && scores.len() >= group * bs);
        let (w, q) = (words.as_ptr(), rotated_q.as_ptr());
        let codes = bytes[PAGE_HEADER..].as_ptr();
        // SAFETY: `nu` holds 16 floats.
        let nu = _mm512_mul_ps(
            unsafe { _mm512_loadu_ps(nu.as_ptr()) },
            _mm512_set1_ps(scale),
        );
        for first in (0..group).step_by(4) {
            let heads = (group - first).min(4);
            with_heads!(heads, H, {
                let mut quads = [[_mm512_setzero_ps(); 4]; 4];
                for (quad, start) in (0..n).step_by(4).enumerate() {
                    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
                    for k in 0..(n - start).min(4) {
                        let code = codes.wrapping_add((start + k) * code_bytes);
                        for j in 0..d / 16 {
                            // SAFETY: indices of chunk j of token start + k lie in its code; each
                            // is below the codebook size (the caller's contract).
                            let v = unsafe { chunk::<K>(w, code.add(1 + 16 / K * j)) };
                            for (h, acc) in acc.iter_mut().enumerate().take(H) {
                                // SAFETY: (first + h)·d + 16j + 16 ≤ group·d ≤ rotated_q.len().
                                let qv =
                                    unsafe { _mm512_loadu_ps(q.add((first + h) * d + 16 * j)) };
                                acc[k] = _mm512_fmadd_ps(qv, v, acc[k]);
                            }
                        }
                    }
                    for (h, acc) in acc.iter().enumerate().take(H) {
                        quads[h][quad] =
                            fold_quad(fold_pair(acc[0], acc[1]), fold_pair(acc[2], acc[3]));
                    }
                }
                for (h, quads) in quads.iter().enumerate().take(H) {
                    let totals = _mm512_mul_ps(fold_sixteen(*quads), nu);
                    let out = &mut scores[(first + h) * bs..(first + h) * bs + 16];
                    // SAFETY: `out` holds exactly 16 floats.
                    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), totals) };
                }
            });
        }
    }

    /// `acc_g += Σ_t probs[g·16 + t]·ν_t·ĉ_t` (rotated space) over the first `n` tokens.
    ///
    /// # Safety
    /// As for [`fib_scores_16`].
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn fib_values_16<const K: usize>(
        bytes: &[u8],
        largest: f32,
        n: usize,
        shape: Shape,
        words: &[f32],
        probs: &[f32],
        acc: &mut [f32],
    ) {
        let Shape { group, d, bs, .. } = shape;
        let (code_bytes, nu) = check::<K>(bytes, largest, n, shape, words);
        assert!(probs.len() >= group * bs && acc.len() >= group * d);
        let w = words.as_ptr();
        let codes = bytes[PAGE_HEADER..].as_ptr();
        // SAFETY: `nu` holds 16 floats.
        let nu = unsafe { _mm512_loadu_ps(nu.as_ptr()) };
        // p·ν per head and token, formed once per block
        let mut weights = [[0f32; 16]; 4];
        for first in (0..group).step_by(4) {
            let heads = (group - first).min(4);
            with_heads!(heads, H, {
                for (h, weights) in weights.iter_mut().enumerate().take(H) {
                    // SAFETY: (first + h)·16 + 16 ≤ group·bs = probs' required length (bs = 16);
                    // `weights` holds 16 floats.
                    unsafe {
                        let p = _mm512_loadu_ps(probs.as_ptr().add((first + h) * bs));
                        _mm512_storeu_ps(weights.as_mut_ptr(), _mm512_mul_ps(p, nu));
                    }
                }
                // four chunks of 16 rotated coordinates per pass over the tokens
                for chunks in (0..d / 16).step_by(4) {
                    let count = (d / 16 - chunks).min(4);
                    let mut a = [[_mm512_setzero_ps(); 4]; 4];
                    // t indexes both the codes and every head's weights
                    #[allow(clippy::needless_range_loop)]
                    for t in 0..n {
                        let code = codes.wrapping_add(t * code_bytes);
                        for c in 0..count {
                            let j = chunks + c;
                            // SAFETY: as in `fib_scores_16`.
                            let v = unsafe { chunk::<K>(w, code.add(1 + 16 / K * j)) };
                            for (h, a) in a.iter_mut().enumerate().take(H) {
                                let p = _mm512_set1_ps(weights[h][t]);
                                a[c] = _mm512_fmadd_ps(p, v, a[c]);
                            }
                        }
                    }
                    for (h, a) in a.iter().enumerate().take(H) {
                        for (c, a) in a.iter().enumerate().take(count) {
                            let at = (first + h) * d + 16 * (chunks + c);
                            // SAFETY: at + 16 ≤ group·d ≤ acc.len() (asserted above).
                            unsafe {
                                let out = acc.as_mut_ptr().add(at);
                                _mm512_storeu_ps(out, _mm512_add_ps(*a, _mm512_loadu_ps(out)));
                            }
                        }
                    }
                }
            });
        }
    }
}
