//! FibQuant pages read as codes, never decoded (DESIGN §6): per query head, the rotated query
//! `q' = Πq` and a table `L[b][n] = ⟨q'_b, c_n⟩` turn a key's logit into `ν·Σ_b L[b][idx_b]`;
//! values add `p·ν` into bins `A[b][n]`, and only at the end of the pass is
//! `Σ_n A[b][n]·c_n` formed per block and rotated back once.

use std::sync::Arc;

use fibquant::FibQuant;
use half::f16;

use crate::codec::Codec;
use crate::error::{KvError, Result};
use crate::key_norm::KeyNorm;

use super::pages::Shape;

/// Tables and bins of one kv head's pass, reused across heads and calls.
#[derive(Debug, Default, Clone)]
pub(super) struct FibTables {
    quantizer: Option<(Codec, Arc<FibQuant>)>,
    /// `group × blocks × N` query tables, valid while `tables_ready`.
    tables: Vec<f32>,
    tables_ready: bool,
    /// `group × blocks × N` value bins, in use while `bins_used`.
    bins: Vec<f32>,
    bins_used: bool,
    indices: Vec<u16>,
    rotated: Vec<f32>,
    /// Fast path (k = 2 or 4, byte indices, blocks of 16, AVX-512): the rotated queries
    /// (`group × d`) and the value sum in the rotated space, rotated back once in `finish`.
    rotated_q: Vec<f32>,
    rotated_ready: bool,
    rotated_acc: Vec<f32>,
    rotated_used: bool,
    /// Normalized keys: `group × head_dim` bias coefficients of the pass's queries.
    bias_coefficients: Vec<f32>,
    bias_ready: bool,
    bias: Vec<f32>,
}

impl FibTables {
    /// Forgets the previous head's tables and bins.
    pub(super) fn start_head(&mut self) {
        self.tables_ready = false;
        self.bins_used = false;
        self.bias_ready = false;
        self.rotated_ready = false;
        self.rotated_used = false;
    }

    /// True when the AVX-512 path serves this page: 2- or 4-coordinate codewords with byte indices,
    /// blocks of 16, head_dim a multiple of 16.
    #[inline(always)]
    fn fast(fq: &FibQuant, shape: Shape) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            matches!(fq.profile().k, 2 | 4)
                && fq.index_bits() == 8
                && shape.bs == 16
                && shape.d.is_multiple_of(16)
                && has!("avx512f")
                && has!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (fq, shape);
            false
        }
    }

    /// Checks every index of the first `n` codes against the codebook size (a corrupt page is
    /// an error, never an out-of-bounds read); with 256 codewords every byte is valid.
    fn check_indices(fq: &FibQuant, bytes: &[u8], n: usize) -> Result<()> {
        let words = fq.profile().n;
        if words >= 256 {
            return Ok(());
        }
        let cb = fq.code_bytes();
        for code in bytes.chunks_exact(cb).take(n) {
            if let Some(bad) = code[2..].iter().find(|i| **i as usize >= words) {
                return Err(KvError::FibQuant(fibquant::FibQuantError::BadIndex {
                    index: *bad as usize,
                    n: words,
                }));
            }
        }
        Ok(())
    }

    /// Adds the normalized keys' mean term `scale·⟨q_g, RoPE_p(m)⟩` to the scores of a block
    /// whose first token is at `start`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add_mean_scores(
        &mut self,
        c: &KeyNorm,
        layer: usize,
        head: usize,
        q: &[f32],
        start: usize,
        n: usize,
        shape: Shape,
        scale: f32,
        scores: &mut [f32],
    ) {
        let Shape { group, d, bs } = shape;
        if !self.bias_ready {
            self.bias_coefficients.resize(group * d, 0.0);
            for (qg, out) in q
                .chunks_exact(d)
                .zip(self.bias_coefficients.chunks_exact_mut(d))
            {
                c.bias_coefficients(layer, head, qg, out);
            }
            self.bias_ready = true;
        }
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

    fn quantizer(&mut self, codec: Codec, d: usize) -> Result<Arc<FibQuant>> {
        if let Some((c, q)) = &self.quantizer {
            if *c == codec && q.profile().d == d {
                return Ok(q.clone());
            }
        }
        let profile = codec.fibquant_profile(d).ok_or(KvError::UnsupportedCodec {
            codec: codec.to_string(),
            reason: "not a FibQuant codec",
        })?;
        let q = FibQuant::shared(profile)?;
        self.quantizer = Some((codec, q.clone()));
        Ok(q)
    }

    /// Norm and codeword indices of token `t`'s code; an index outside the codebook is an error
    /// (a corrupt page), never an out-of-bounds read.
    #[inline(always)]
    fn read_code(&mut self, q: &FibQuant, bytes: &[u8], t: usize) -> Result<f32> {
        let code = &bytes[t * q.code_bytes()..(t + 1) * q.code_bytes()];
        let blocks = q.profile().d / q.profile().k;
        self.indices.resize(blocks, 0);
        fibquant::pack::unpack(&code[2..], q.index_bits(), &mut self.indices);
        let n = q.profile().n;
        if let Some(bad) = self.indices.iter().find(|i| **i as usize >= n) {
            return Err(KvError::FibQuant(fibquant::FibQuantError::BadIndex {
                index: *bad as usize,
                n,
            }));
        }
        Ok(f16::from_le_bytes([code[0], code[1]]).to_f32())
    }

    /// `scores[g·bs + t] = scale·⟨q_g, k̂_t⟩` from the codes of a key page.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) fn key_scores(
        &mut self,
        codec: Codec,
        bytes: &[u8],
        n: usize,
        shape: Shape,
        q: &[f32],
        scale: f32,
        scores: &mut [f32],
    ) -> Result<()> {
        let Shape { group, d, bs } = shape;
        let fq = self.quantizer(codec, d)?;
        #[cfg(target_arch = "x86_64")]
        if Self::fast(&fq, shape) {
            Self::check_indices(&fq, bytes, n)?;
            if !self.rotated_ready {
                self.rotated_q.resize(group * d, 0.0);
                self.rotated_q.copy_from_slice(&q[..group * d]);
                for qg in self.rotated_q.chunks_exact_mut(d) {
                    fq.rotate(qg);
                }
                self.rotated_ready = true;
            }
            let words = fq.codebook().words();
            // SAFETY: AVX-512F and F16C are present (`fast`); every index is below the
            // codebook size (checked above) and lengths are checked inside.
            unsafe {
                let q = &self.rotated_q;
                if fq.profile().k == 4 {
                    x86::fib_scores_16::<4>(bytes, n, shape, words, q, scale, scores)
                } else {
                    x86::fib_scores_16::<2>(bytes, n, shape, words, q, scale, scores)
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
                fq.rotate(&mut self.rotated);
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
        for t in 0..n {
            let norm = self.read_code(&fq, bytes, t)?;
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

    /// Adds `p·ν` of each token of a value page into the bins of its codewords.
    #[inline(always)]
    pub(super) fn accumulate(
        &mut self,
        codec: Codec,
        bytes: &[u8],
        n: usize,
        shape: Shape,
        probs: &[f32],
    ) -> Result<()> {
        let Shape { group, d, bs } = shape;
        let fq = self.quantizer(codec, d)?;
        #[cfg(target_arch = "x86_64")]
        if Self::fast(&fq, shape) {
            Self::check_indices(&fq, bytes, n)?;
            if !self.rotated_used {
                self.rotated_acc.clear();
                self.rotated_acc.resize(group * d, 0.0);
                self.rotated_used = true;
            }
            let words = fq.codebook().words();
            // SAFETY: as in `key_scores`.
            unsafe {
                let acc = &mut self.rotated_acc;
                if fq.profile().k == 4 {
                    x86::fib_values_16::<4>(bytes, n, shape, words, probs, acc)
                } else {
                    x86::fib_values_16::<2>(bytes, n, shape, words, probs, acc)
                }
            };
            return Ok(());
        }
        let (k, words) = (fq.profile().k, fq.profile().n);
        let blocks = d / k;
        if !self.bins_used {
            self.bins.clear();
            self.bins.resize(group * blocks * words, 0.0);
            self.bins_used = true;
        }
        for t in 0..n {
            let norm = self.read_code(&fq, bytes, t)?;
            for g in 0..group {
                let w = probs[g * bs + t] * norm;
                let bins = &mut self.bins[g * blocks * words..(g + 1) * blocks * words];
                for (b, i) in self.indices.iter().enumerate() {
                    bins[b * words + *i as usize] += w;
                }
            }
        }
        Ok(())
    }

    /// Rescales query head `g`'s bins (online softmax: a new running maximum).
    #[inline(always)]
    pub(super) fn rescale(&mut self, g: usize, group: usize, correction: f32) {
        if self.rotated_used {
            let d = self.rotated_acc.len() / group;
            self.rotated_acc[g * d..(g + 1) * d]
                .iter_mut()
                .for_each(|a| *a *= correction);
        }
        if self.bins_used {
            let per = self.bins.len() / group;
            self.bins[g * per..(g + 1) * per]
                .iter_mut()
                .for_each(|b| *b *= correction);
        }
    }

    /// Adds the binned values, rotated back, into `acc` (`group × d`).
    #[inline(always)]
    pub(super) fn finish(&mut self, shape: Shape, acc: &mut [f32]) {
        if self.rotated_used {
            if let Some((_, fq)) = self.quantizer.clone() {
                let d = shape.d;
                for (a, r) in acc
                    .chunks_exact_mut(d)
                    .zip(self.rotated_acc.chunks_exact_mut(d))
                {
                    fq.unrotate_scaled(r, 1.0);
                    a.iter_mut().zip(r.iter()).for_each(|(a, r)| *a += r);
                }
            }
            self.rotated_used = false;
        }
        if !self.bins_used {
            return;
        }
        let Shape { group, d, .. } = shape;
        let Some((_, fq)) = self.quantizer.clone() else {
            return;
        };
        let (k, words) = (fq.profile().k, fq.profile().n);
        let blocks = d / k;
        self.rotated.resize(d, 0.0);
        for g in 0..group {
            let bins = &self.bins[g * blocks * words..(g + 1) * blocks * words];
            for b in 0..blocks {
                let bin = &bins[b * words..(b + 1) * words];
                for j in 0..k {
                    let column = &fq.codebook().column(j)[..words];
                    self.rotated[b * k + j] = super::pages::dot(bin, column);
                }
            }
            fq.unrotate_scaled(&mut self.rotated, 1.0);
            acc[g * d..(g + 1) * d]
                .iter_mut()
                .zip(&self.rotated)
                .for_each(|(a, r)| *a += r);
        }
        self.bins_used = false;
    }
}

/// The AVX-512 path for 2- and 4-coordinate codewords with byte indices and blocks of 16: a
/// token's rotated vector is put together in registers from its codewords (one load each), so
/// neither tables nor bins are written; values are summed in the rotated space and rotated back
/// once per pass.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Shape;

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

    /// The norm of the code at `code` (its first two bytes, f16).
    ///
    /// # Safety
    /// F16C must be present and two bytes readable at `code`.
    #[inline(always)]
    unsafe fn norm(code: *const u8) -> f32 {
        // SAFETY: guaranteed by the caller.
        unsafe {
            let bits = u16::from_le_bytes([*code, *code.add(1)]);
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        }
    }

    fn check<const K: usize>(bytes: &[u8], n: usize, shape: Shape, words: &[f32]) -> usize {
        let Shape { d, bs, .. } = shape;
        let code_bytes = 2 + d / K;
        assert!(K == 2 || K == 4);
        assert!(n <= bs && bs == 16 && d.is_multiple_of(16));
        assert!(bytes.len() >= n * code_bytes && words.len() >= K);
        code_bytes
    }

    /// `scores[g·16 + t] = scale·ν_t·⟨(Πq)_g, ĉ_t⟩` for the first `n` tokens of a page.
    ///
    /// # Safety
    /// AVX-512F and F16C must be present and every index of the first `n` codes below
    /// `words.len() / 4`.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn fib_scores_16<const K: usize>(
        bytes: &[u8],
        n: usize,
        shape: Shape,
        words: &[f32],
        rotated_q: &[f32],
        scale: f32,
        scores: &mut [f32],
    ) {
        let Shape { group, d, bs } = shape;
        let code_bytes = check::<K>(bytes, n, shape, words);
        assert!(rotated_q.len() >= group * d && scores.len() >= group * bs);
        let (w, q) = (words.as_ptr(), rotated_q.as_ptr());
        for t in 0..n {
            let code = bytes.as_ptr().wrapping_add(t * code_bytes);
            // SAFETY: token t's code lies in `bytes` (asserted in `check`).
            let nu = unsafe { norm(code) } * scale;
            for first in (0..group).step_by(4) {
                let heads = (group - first).min(4);
                let mut acc = [_mm512_setzero_ps(); 4];
                for j in 0..d / 16 {
                    // SAFETY: indices 4j .. 4j + 4 of token t lie in its code; each is below
                    // the codebook size (the caller's contract).
                    let v = unsafe { chunk::<K>(w, code.add(2 + 16 / K * j)) };
                    for (h, a) in acc.iter_mut().enumerate().take(heads) {
                        // SAFETY: (first + h)·d + 16j + 16 ≤ group·d ≤ rotated_q.len().
                        let qv = unsafe { _mm512_loadu_ps(q.add((first + h) * d + 16 * j)) };
                        *a = _mm512_fmadd_ps(qv, v, *a);
                    }
                }
                for (h, a) in acc.iter().enumerate().take(heads) {
                    scores[(first + h) * bs + t] = _mm512_reduce_add_ps(*a) * nu;
                }
            }
        }
    }

    /// `acc_g += Σ_t probs[g·16 + t]·ν_t·ĉ_t` (rotated space) over the first `n` tokens.
    ///
    /// # Safety
    /// As for [`fib_scores_16`].
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn fib_values_16<const K: usize>(
        bytes: &[u8],
        n: usize,
        shape: Shape,
        words: &[f32],
        probs: &[f32],
        acc: &mut [f32],
    ) {
        let Shape { group, d, bs } = shape;
        let code_bytes = check::<K>(bytes, n, shape, words);
        assert!(probs.len() >= group * bs && acc.len() >= group * d);
        let w = words.as_ptr();
        let mut weights = [0f32; 16];
        for j in 0..d / 16 {
            for first in (0..group).step_by(4) {
                let heads = (group - first).min(4);
                let mut a = [_mm512_setzero_ps(); 4];
                for t in 0..n {
                    let code = bytes.as_ptr().wrapping_add(t * code_bytes);
                    // SAFETY: as in `fib_scores_16`.
                    let (nu, v) = unsafe { (norm(code), chunk::<K>(w, code.add(2 + 16 / K * j))) };
                    weights[t] = nu;
                    for (h, a) in a.iter_mut().enumerate().take(heads) {
                        let p = _mm512_set1_ps(probs[(first + h) * bs + t] * weights[t]);
                        *a = _mm512_fmadd_ps(p, v, *a);
                    }
                }
                for (h, a) in a.iter().enumerate().take(heads) {
                    let at = (first + h) * d + 16 * j;
                    // SAFETY: at + 16 ≤ group·d ≤ acc.len() (asserted above).
                    unsafe {
                        let out = acc.as_mut_ptr().add(at);
                        _mm512_storeu_ps(out, _mm512_add_ps(*a, _mm512_loadu_ps(out)));
                    }
                }
            }
        }
    }
}
