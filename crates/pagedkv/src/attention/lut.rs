//! FibQuant pages read as codes, never decoded (DESIGN §6): per query head, the rotated query
//! `q' = Πq` and a table `L[b][n] = ⟨q'_b, c_n⟩` turn a key's logit into `ν·Σ_b L[b][idx_b]`;
//! values add `p·ν` into bins `A[b][n]`, and only at the end of the pass is
//! `Σ_n A[b][n]·c_n` formed per block and rotated back once.

use std::sync::Arc;

use fibquant::FibQuant;
use half::f16;

use crate::key_norm::KeyNorm;
use crate::codec::Codec;
use crate::error::{KvError, Result};

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
            for (qg, out) in q.chunks_exact(d).zip(self.bias_coefficients.chunks_exact_mut(d)) {
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
