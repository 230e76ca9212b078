//! Key normalization before FibQuant (DESIGN §6, "keys normalized per channel before the VQ").
//!
//! FibQuant stores a vector as its norm and a direction, so its error is spread evenly over
//! the coordinates and scales with the whole norm. On SmolLM2 half to three quarters of a key's
//! energy is a per-(layer, head) mean that never changes a softmax, yet it sets the norm and so
//! the error of the part that does. Keys are cached after RoPE, which turns a constant pre-RoPE
//! mean `m` into `RoPE_p(m)` at position `p`; [`KeyNorm`] subtracts exactly that, at every
//! position and context length (a constant post-RoPE mean removes only part of it: relative
//! error of the mean-free part 0.098 against 0.06 on SmolLM2's keys at fibquant-k4n256).
//!
//! Stored: `x = k − RoPE_p(m)` in FibQuant. Attention: `⟨q, k⟩ = ⟨q, RoPE_p(m)⟩ + ⟨q, x̂⟩`; the
//! first term costs one small table product per block (angle addition), never a decode. The
//! means are fitted by [`crate::calibration::KeyNormFit`] on a calibration text. Only FibQuant key pages are
//! normalized. RoPE is the interleaved form of GGUF Llama models: pairs `(2i, 2i+1)` rotated by
//! `p·base^(−2i/d)`.
//!
//! Tried and dropped: per-pair scales before the VQ (whitening the key variance: ΔPPL +69%
//! instead of +22% with keys alone in fibquant-k4n256; weighting by query energy, √Q/σ or Q^¼:
//! +25–27%) — the mean alone is best.

use xxhash_rust::xxh3::xxh3_64;

use crate::error::{KvError, Result};

/// Block starts whose rotation angles are tabulated; later blocks compute theirs directly.
const TABULATED_POSITIONS: usize = 1 << 16;

/// Tokens whose mean-term biases [`KeyNorm::add_block_bias`] sums at once.
const TOKENS_AT_ONCE: usize = 16;

/// RoPE's rotation frequency of each pair `(2i, 2i+1)`: `base^(−2i/d)`.
pub(crate) fn rope_frequencies(base: f32, head_dim: usize) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| (base as f64).powf(-2.0 * i as f64 / head_dim as f64))
        .collect()
}

/// Per-(layer, kv head) key means removed from FibQuant key pages.
#[derive(Debug, Clone)]
pub struct KeyNorm {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    rope_base: f32,
    /// Pre-RoPE key means, `[layer][head][head_dim]`.
    means: Vec<f32>,
    /// Rotation frequency of each pair.
    inv_freq: Vec<f64>,
    /// Per tabulated block start: `cos(p·θ_i)` for every pair, then `sin(p·θ_i)`.
    starts: Vec<f32>,
    /// Pair-major `cos(t·θ_i)` for t in a block, then the same for sin: `[2][pairs][block_size]`.
    within: Vec<f32>,
    digest: u64,
}

impl PartialEq for KeyNorm {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl Eq for KeyNorm {}

impl KeyNorm {
    /// A normalization from pre-RoPE key means, `layers × kv_heads × head_dim`.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        rope_base: f32,
        means: Vec<f32>,
    ) -> Result<Self> {
        let len = layers * kv_heads * head_dim;
        if means.len() != len || len == 0 {
            return Err(KvError::ShapeMismatch {
                what: "key means",
                expected: len,
                got: means.len(),
            });
        }
        if !head_dim.is_multiple_of(2) || block_size == 0 {
            return Err(KvError::InvalidKeyNorm(format!(
                "needs an even head_dim and a positive block size (got {head_dim}, {block_size})"
            )));
        }
        if !(rope_base.is_finite() && rope_base > 1.0 && means.iter().all(|x| x.is_finite())) {
            return Err(KvError::NonFinite {
                what: "key means or RoPE base",
            });
        }
        let pairs = head_dim / 2;
        let inv_freq = rope_frequencies(rope_base, head_dim);
        let mut starts = Vec::with_capacity(TABULATED_POSITIONS / block_size * head_dim);
        for b in 0..TABULATED_POSITIONS.div_ceil(block_size) {
            let p = (b * block_size) as f64;
            starts.extend(inv_freq.iter().map(|f| (p * f).cos() as f32));
            starts.extend(inv_freq.iter().map(|f| (p * f).sin() as f32));
        }
        let mut within = Vec::with_capacity(2 * pairs * block_size);
        for trig in [f64::cos, f64::sin] {
            for f in &inv_freq {
                within.extend((0..block_size).map(|t| trig(t as f64 * f) as f32));
            }
        }
        let mut bytes = format!(
            "pagedkv-key-norm-v1;layers={layers};kv_heads={kv_heads};head_dim={head_dim};block_size={block_size};rope_base={rope_base}"
        )
        .into_bytes();
        for x in &means {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        Ok(Self {
            layers,
            kv_heads,
            head_dim,
            block_size,
            rope_base,
            means,
            inv_freq,
            starts,
            within,
            digest: xxh3_64(&bytes),
        })
    }

    /// Layers, kv heads, head_dim and block size it was made for.
    pub fn geometry(&self) -> (usize, usize, usize, usize) {
        (self.layers, self.kv_heads, self.head_dim, self.block_size)
    }

    /// The RoPE base the means are rotated with.
    pub fn rope_base(&self) -> f32 {
        self.rope_base
    }

    /// A hash of everything above: part of the layout digest, so payloads and prefix keys of a
    /// normalized cache never mix with another's.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    fn span(&self, layer: usize, head: usize) -> std::ops::Range<usize> {
        let start = (layer * self.kv_heads + head) * self.head_dim;
        start..start + self.head_dim
    }

    /// The pre-RoPE key mean of (layer, head).
    pub fn mean(&self, layer: usize, head: usize) -> &[f32] {
        &self.means[self.span(layer, head)]
    }

    /// `out = RoPE_pos(m)`: the key mean as cached at position `pos`.
    pub fn shift(&self, layer: usize, head: usize, pos: usize, out: &mut [f32]) {
        let m = self.mean(layer, head);
        for (i, f) in self.inv_freq.iter().enumerate() {
            let (s, c) = (pos as f64 * f).sin_cos();
            let (m0, m1) = (m[2 * i] as f64, m[2 * i + 1] as f64);
            out[2 * i] = (m0 * c - m1 * s) as f32;
            out[2 * i + 1] = (m0 * s + m1 * c) as f32;
        }
    }

    /// Calls `f(cos, sin)` with `cos(start·θ_i)` and `sin(start·θ_i)` of every pair: from the
    /// table for a tabulated block start, else computed.
    fn with_start_angles<R>(&self, start: usize, f: impl FnOnce(&[f32], &[f32]) -> R) -> R {
        let pairs = self.head_dim / 2;
        let block = start / self.block_size;
        if start.is_multiple_of(self.block_size) && block * self.head_dim < self.starts.len() {
            let (cos, sin) =
                self.starts[block * self.head_dim..(block + 1) * self.head_dim].split_at(pairs);
            return f(cos, sin);
        }
        let (sin, cos): (Vec<f32>, Vec<f32>) = self
            .inv_freq
            .iter()
            .map(|freq| {
                let (s, c) = (start as f64 * freq).sin_cos();
                (s as f32, c as f32)
            })
            .unzip();
        f(&cos, &sin)
    }

    /// `rows` (token-major, the first at position `start`) plus `sign·RoPE_p(m)` in place. The
    /// angles come from the tables by angle addition, as in attention — no sine or cosine per
    /// token on the sealing path.
    fn shift_rows(&self, layer: usize, head: usize, start: usize, rows: &mut [f32], sign: f32) {
        let (d, bs) = (self.head_dim, self.block_size);
        let pairs = d / 2;
        let m = self.mean(layer, head);
        let (within_cos, within_sin) = self.within.split_at(pairs * bs);
        for (k, block) in rows.chunks_mut(bs * d).enumerate() {
            self.with_start_angles(start + k * bs, |cos0, sin0| {
                for (t, row) in block.chunks_exact_mut(d).enumerate() {
                    for i in 0..pairs {
                        let (cw, sw) = (within_cos[i * bs + t], within_sin[i * bs + t]);
                        let c = cos0[i] * cw - sin0[i] * sw;
                        let s = sin0[i] * cw + cos0[i] * sw;
                        let (m0, m1) = (m[2 * i], m[2 * i + 1]);
                        row[2 * i] += sign * (m0 * c - m1 * s);
                        row[2 * i + 1] += sign * (m0 * s + m1 * c);
                    }
                }
            });
        }
    }

    /// `rows` (token-major, the first at position `start`) normalized in place: `k − RoPE_p(m)`.
    pub fn normalize(&self, layer: usize, head: usize, start: usize, rows: &mut [f32]) {
        self.shift_rows(layer, head, start, rows, -1.0);
    }

    /// The inverse of [`Self::normalize`].
    pub fn restore(&self, layer: usize, head: usize, start: usize, rows: &mut [f32]) {
        self.shift_rows(layer, head, start, rows, 1.0);
    }

    /// Per query `q` (one head): the coefficients `α_i = ⟨q_i, m_i⟩` and `β_i = q_i × m_i` of
    /// each pair, so that `⟨q, RoPE_p(m)⟩ = Σ α_i cos(pθ_i) + β_i sin(pθ_i)`; `out` holds
    /// `[α; β]`.
    pub(crate) fn bias_coefficients(&self, layer: usize, head: usize, q: &[f32], out: &mut [f32]) {
        let m = self.mean(layer, head);
        let pairs = self.head_dim / 2;
        for i in 0..pairs {
            let (q0, q1, m0, m1) = (q[2 * i], q[2 * i + 1], m[2 * i], m[2 * i + 1]);
            out[i] = q0 * m0 + q1 * m1;
            out[pairs + i] = q1 * m0 - q0 * m1;
        }
    }

    /// `bias[t] += scale·⟨q, RoPE_{start+t}(m)⟩` for the `bias.len()` tokens of a block starting
    /// at `start`, from `coefficients` of [`Self::bias_coefficients`].
    pub(crate) fn add_block_bias(
        &self,
        coefficients: &[f32],
        start: usize,
        scale: f32,
        bias: &mut [f32],
        rotated: &mut Vec<f32>,
    ) {
        let pairs = self.head_dim / 2;
        let (alpha, beta) = coefficients.split_at(pairs);
        rotated.resize(2 * pairs, 0.0);
        let (a, b) = rotated.split_at_mut(pairs);
        self.with_start_angles(start, |cos, sin| {
            for i in 0..pairs {
                a[i] = (alpha[i] * cos[i] + beta[i] * sin[i]) * scale;
                b[i] = (beta[i] * cos[i] - alpha[i] * sin[i]) * scale;
            }
        });
        let bs = self.block_size;
        let n = bias.len().min(bs);
        let (cos, sin) = self.within.split_at(pairs * bs);
        // sixteen tokens at a time, summed over every pair in a local array the compiler keeps
        // in registers (adding into `bias` pair by pair stored and reloaded it once per pair);
        // the same additions in the same order, so the same sums
        for first in (0..n).step_by(TOKENS_AT_ONCE) {
            // a whole run of the block's table when it has one (the tokens past `n` summed and
            // dropped): fixed lengths, so the sums stay in registers
            let width = if first + TOKENS_AT_ONCE <= bs {
                TOKENS_AT_ONCE
            } else {
                n - first
            };
            let len = (n - first).min(TOKENS_AT_ONCE);
            let mut sums = [0f32; TOKENS_AT_ONCE];
            sums[..len].copy_from_slice(&bias[first..first + len]);
            for i in 0..pairs {
                let (ai, bi) = (a[i], b[i]);
                let at = i * bs + first;
                let (c, s) = (&cos[at..at + width], &sin[at..at + width]);
                if let (Ok(c), Ok(s)) = (
                    <&[f32; TOKENS_AT_ONCE]>::try_from(c),
                    <&[f32; TOKENS_AT_ONCE]>::try_from(s),
                ) {
                    for t in 0..TOKENS_AT_ONCE {
                        sums[t] += ai * c[t] + bi * s[t];
                    }
                } else {
                    for ((sum, c), s) in sums.iter_mut().zip(c).zip(s) {
                        *sum += ai * c + bi * s;
                    }
                }
            }
            bias[first..first + len].copy_from_slice(&sums[..len]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibration::KeyNormFit;

    fn rope(x: &[f32], pos: usize, base: f32) -> Vec<f32> {
        let d = x.len();
        let mut out = vec![0f32; d];
        for i in 0..d / 2 {
            let a = pos as f64 * (base as f64).powf(-2.0 * i as f64 / d as f64);
            let (s, c) = a.sin_cos();
            out[2 * i] = (x[2 * i] as f64 * c - x[2 * i + 1] as f64 * s) as f32;
            out[2 * i + 1] = (x[2 * i] as f64 * s + x[2 * i + 1] as f64 * c) as f32;
        }
        out
    }

    #[test]
    fn fit_recovers_the_pre_rope_mean_and_the_bias_matches_the_dot() {
        let (d, bs, base) = (8, 4, 10_000.0);
        let m: Vec<f32> = (0..d).map(|i| i as f32 - 3.5).collect();
        let mut fit = KeyNormFit::new(1, 1, d, bs, base);
        for pos in 0..37 {
            // keys: the mean plus ±1 noise that averages out over pairs of positions
            let pre: Vec<f32> = m
                .iter()
                .enumerate()
                .map(|(i, a)| a + if (pos + i) % 2 == 0 { 1.0 } else { -1.0 })
                .collect();
            fit.add(0, pos, &rope(&pre, pos, base)).unwrap();
        }
        let norm = fit.finish().unwrap();
        for (a, b) in norm.mean(0, 0).iter().zip(&m) {
            assert!((a - b).abs() < 0.05, "{a} vs {b}");
        }
        // normalize and restore are inverse
        let rows: Vec<f32> = (0..2 * d).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut x = rows.clone();
        norm.normalize(0, 0, 5, &mut x);
        let mut shift = vec![0f32; d];
        for (t, (got, row)) in x.chunks_exact(d).zip(rows.chunks_exact(d)).enumerate() {
            norm.shift(0, 0, 5 + t, &mut shift);
            for ((g, r), m) in got.iter().zip(row).zip(&shift) {
                assert!((g - (r - m)).abs() < 1e-5, "{g} vs {}", r - m);
            }
        }
        norm.restore(0, 0, 5, &mut x);
        for (a, b) in x.iter().zip(&rows) {
            assert!((a - b).abs() < 1e-5);
        }
        let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut coef = vec![0f32; d];
        norm.bias_coefficients(0, 0, &q, &mut coef);
        let mut scratch = Vec::new();
        // a tabulated start, an untabulated one, and a partial block
        for (start, n) in [(8usize, 4usize), (TABULATED_POSITIONS + 4, 4), (12, 3)] {
            let mut bias = vec![0f32; n];
            norm.add_block_bias(&coef, start, 0.5, &mut bias, &mut scratch);
            let mut shift = vec![0f32; d];
            for (t, b) in bias.iter().enumerate() {
                norm.shift(0, 0, start + t, &mut shift);
                let want: f32 = 0.5 * q.iter().zip(&shift).map(|(a, b)| a * b).sum::<f32>();
                assert!(
                    (b - want).abs() < 1e-4,
                    "start {start} t {t}: {b} vs {want}"
                );
            }
        }
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(KeyNorm::new(1, 1, 4, 4, 1e4, vec![0.0; 3]).is_err());
        assert!(KeyNorm::new(1, 1, 4, 4, 1e4, vec![f32::NAN; 4]).is_err());
        assert!(KeyNorm::new(1, 1, 4, 4, 0.5, vec![0.0; 4]).is_err());
        assert!(KeyNorm::new(1, 1, 3, 4, 1e4, vec![0.0; 3]).is_err());
        assert!(KeyNormFit::new(2, 1, 4, 4, 1e4).finish().is_err());
        let mut fit = KeyNormFit::new(1, 1, 4, 4, 1e4);
        assert!(fit.add(0, 0, &[0.0; 3]).is_err());
        assert!(fit.add(1, 0, &[0.0; 4]).is_err());
    }
}
