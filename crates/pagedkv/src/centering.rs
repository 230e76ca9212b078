//! Mean removal before FibQuant (DESIGN §6, "keys normalized per channel before the VQ").
//!
//! FibQuant stores a vector as its norm and a direction, so its error scales with the whole
//! norm. Real keys carry a large mean (on SmolLM2 half to three quarters of their energy) that
//! never changes a softmax, yet it sets the norm, and so the error of the part that does. A
//! [`Centering`] removes, per (layer, kv head), a mean fitted on a calibration text before the
//! FibQuant pages are encoded, and attention adds it back exactly:
//!
//! - Keys are cached after RoPE, which turns a constant pre-RoPE mean `m` into `RoPE_p(m)` at
//!   position `p`. The centering subtracts exactly that, so the mean is removed at every position
//!   and context length. A key's logit becomes `⟨q, RoPE_p(m)⟩ + ⟨q, k̂⟩`; with the angle
//!   addition formulas the first term costs one small table product per block, not a decode.
//! - Values: a constant mean `μ`; since softmax weights sum to one, attention adds `μ` times the
//!   weight the centered tokens received.
//!
//! Only FibQuant pages are centered; scalar codecs have their own per-group offsets. RoPE here is
//! the interleaved form of GGUF Llama models: pairs `(2i, 2i+1)` rotated by `p·base^(−2i/d)`.

use xxhash_rust::xxh3::xxh3_64;

use crate::error::{KvError, Result};

/// Block starts whose rotation angles are tabulated; later blocks compute theirs directly.
const TABULATED_POSITIONS: usize = 1 << 16;

/// Per-(layer, kv head) means removed from FibQuant pages, with the tables attention needs.
#[derive(Debug, Clone)]
pub struct Centering {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    rope_base: f32,
    /// Pre-RoPE key means, `[layer][head][head_dim]`.
    key_means: Vec<f32>,
    /// Value means, `[layer][head][head_dim]`.
    value_means: Vec<f32>,
    /// Rotation frequency of each pair.
    inv_freq: Vec<f64>,
    /// Per tabulated block start: `cos(p·θ_i)` for every pair, then `sin(p·θ_i)`.
    starts: Vec<f32>,
    /// Pair-major `cos(t·θ_i)` for t in a block, then the same for sin: `[2][pairs][block_size]`.
    within: Vec<f32>,
    digest: u64,
}

impl PartialEq for Centering {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl Eq for Centering {}

impl Centering {
    /// A centering from pre-RoPE key means and value means, each `layers × kv_heads × head_dim`.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        rope_base: f32,
        key_means: Vec<f32>,
        value_means: Vec<f32>,
    ) -> Result<Self> {
        let len = layers * kv_heads * head_dim;
        for (what, got) in [
            ("centering key means", key_means.len()),
            ("centering value means", value_means.len()),
        ] {
            if got != len || len == 0 {
                return Err(KvError::ShapeMismatch {
                    what,
                    expected: len,
                    got,
                });
            }
        }
        if !head_dim.is_multiple_of(2) || block_size == 0 {
            return Err(KvError::InvalidCentering(format!(
                "centering needs an even head_dim and a positive block size (got {head_dim}, {block_size})"
            )));
        }
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        if !(rope_base.is_finite() && rope_base > 1.0 && finite(&key_means) && finite(&value_means))
        {
            return Err(KvError::NonFinite {
                what: "centering means or RoPE base",
            });
        }
        let pairs = head_dim / 2;
        let inv_freq: Vec<f64> = (0..pairs)
            .map(|i| (rope_base as f64).powf(-2.0 * i as f64 / head_dim as f64))
            .collect();
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
            "pagedkv-centering-v1;layers={layers};kv_heads={kv_heads};head_dim={head_dim};block_size={block_size};rope_base={rope_base}"
        )
        .into_bytes();
        for x in key_means.iter().chain(&value_means) {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        Ok(Self {
            layers,
            kv_heads,
            head_dim,
            block_size,
            rope_base,
            key_means,
            value_means,
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

    /// The RoPE base the key means are rotated with.
    pub fn rope_base(&self) -> f32 {
        self.rope_base
    }

    /// A hash of everything above: part of the layout digest, so payloads and prefix keys of a
    /// centered cache never mix with another's.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    fn span(&self, layer: usize, head: usize) -> std::ops::Range<usize> {
        let start = (layer * self.kv_heads + head) * self.head_dim;
        start..start + self.head_dim
    }

    /// The pre-RoPE key mean of (layer, head).
    pub fn key_mean(&self, layer: usize, head: usize) -> &[f32] {
        &self.key_means[self.span(layer, head)]
    }

    /// The value mean of (layer, head).
    pub fn value_mean(&self, layer: usize, head: usize) -> &[f32] {
        &self.value_means[self.span(layer, head)]
    }

    /// `out = RoPE_pos(m)`: the key mean as cached at position `pos`.
    pub fn key_shift(&self, layer: usize, head: usize, pos: usize, out: &mut [f32]) {
        let m = self.key_mean(layer, head);
        for (i, f) in self.inv_freq.iter().enumerate() {
            let (s, c) = (pos as f64 * f).sin_cos();
            let (m0, m1) = (m[2 * i] as f64, m[2 * i + 1] as f64);
            out[2 * i] = (m0 * c - m1 * s) as f32;
            out[2 * i + 1] = (m0 * s + m1 * c) as f32;
        }
    }

    /// Per query `q` (one head): the coefficients `α_i = ⟨q_i, m_i⟩` and `β_i = q_i × m_i` of
    /// each pair, so that `⟨q, RoPE_p(m)⟩ = Σ α_i cos(pθ_i) + β_i sin(pθ_i)`; `out` holds
    /// `[α; β]`.
    pub(crate) fn bias_coefficients(&self, layer: usize, head: usize, q: &[f32], out: &mut [f32]) {
        let m = self.key_mean(layer, head);
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
        let block = start / self.block_size;
        if start.is_multiple_of(self.block_size) && block * self.head_dim < self.starts.len() {
            let t = &self.starts[block * self.head_dim..(block + 1) * self.head_dim];
            let (cos, sin) = t.split_at(pairs);
            for i in 0..pairs {
                a[i] = (alpha[i] * cos[i] + beta[i] * sin[i]) * scale;
                b[i] = (beta[i] * cos[i] - alpha[i] * sin[i]) * scale;
            }
        } else {
            for (i, f) in self.inv_freq.iter().enumerate() {
                let (s, c) = (start as f64 * f).sin_cos();
                let (s, c) = (s as f32, c as f32);
                a[i] = (alpha[i] * c + beta[i] * s) * scale;
                b[i] = (beta[i] * c - alpha[i] * s) * scale;
            }
        }
        let bs = self.block_size;
        let n = bias.len().min(bs);
        let (cos, sin) = self.within.split_at(pairs * bs);
        for i in 0..pairs {
            let (ai, bi) = (a[i], b[i]);
            let (c, s) = (&cos[i * bs..i * bs + n], &sin[i * bs..i * bs + n]);
            for t in 0..n {
                bias[t] += ai * c[t] + bi * s[t];
            }
        }
    }
}

/// Running sums that fit a [`Centering`] from keys and values seen at known positions.
#[derive(Debug, Clone)]
pub struct CenteringFit {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    rope_base: f32,
    inv_freq: Vec<f64>,
    key_sums: Vec<f64>,
    value_sums: Vec<f64>,
    count: Vec<u64>,
}

impl CenteringFit {
    /// Empty sums for a cache of this geometry and a model of this RoPE base.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        rope_base: f32,
    ) -> Self {
        let len = layers * kv_heads * head_dim;
        Self {
            layers,
            kv_heads,
            head_dim,
            block_size,
            rope_base,
            inv_freq: (0..head_dim / 2)
                .map(|i| (rope_base as f64).powf(-2.0 * i as f64 / head_dim as f64))
                .collect(),
            key_sums: vec![0.0; len],
            value_sums: vec![0.0; len],
            count: vec![0; layers],
        }
    }

    /// Adds one token's keys (after RoPE at `pos`) and values of `layer`, every kv head
    /// (`kv_heads × head_dim` each).
    pub fn add(&mut self, layer: usize, pos: usize, keys: &[f32], values: &[f32]) -> Result<()> {
        let width = self.kv_heads * self.head_dim;
        if layer >= self.layers {
            return Err(KvError::IndexOutOfRange {
                what: "layer",
                index: layer,
                limit: self.layers,
            });
        }
        for (what, got) in [("keys", keys.len()), ("values", values.len())] {
            if got != width {
                return Err(KvError::ShapeMismatch {
                    what,
                    expected: width,
                    got,
                });
            }
        }
        let d = self.head_dim;
        let base = layer * width;
        for (h, (k, v)) in keys.chunks_exact(d).zip(values.chunks_exact(d)).enumerate() {
            let sums = &mut self.key_sums[base + h * d..base + (h + 1) * d];
            // undo RoPE: rotate each pair back by −pos·θ_i
            for (i, f) in self.inv_freq.iter().enumerate() {
                let (s, c) = (pos as f64 * f).sin_cos();
                let (k0, k1) = (k[2 * i] as f64, k[2 * i + 1] as f64);
                sums[2 * i] += k0 * c + k1 * s;
                sums[2 * i + 1] += k1 * c - k0 * s;
            }
            let sums = &mut self.value_sums[base + h * d..base + (h + 1) * d];
            sums.iter_mut().zip(v).for_each(|(s, x)| *s += *x as f64);
        }
        self.count[layer] += 1;
        Ok(())
    }

    /// The means; every layer must have seen at least one token.
    pub fn finish(&self) -> Result<Centering> {
        if let Some(layer) = self.count.iter().position(|c| *c == 0) {
            return Err(KvError::InvalidCentering(format!(
                "centering fit saw no token of layer {layer}"
            )));
        }
        let width = self.kv_heads * self.head_dim;
        let mean = |sums: &[f64]| -> Vec<f32> {
            sums.iter()
                .enumerate()
                .map(|(i, s)| (s / self.count[i / width] as f64) as f32)
                .collect()
        };
        Centering::new(
            self.layers,
            self.kv_heads,
            self.head_dim,
            self.block_size,
            self.rope_base,
            mean(&self.key_sums),
            mean(&self.value_sums),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut fit = CenteringFit::new(1, 1, d, bs, base);
        for pos in 0..37 {
            let k = rope(&m, pos, base);
            fit.add(0, pos, &k, &m).unwrap();
        }
        let c = fit.finish().unwrap();
        for (a, b) in c.key_mean(0, 0).iter().zip(&m) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        assert_eq!(c.value_mean(0, 0), &m[..]);
        let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut coef = vec![0f32; d];
        c.bias_coefficients(0, 0, &q, &mut coef);
        let mut scratch = Vec::new();
        // a tabulated start, an untabulated one, and a partial block
        for (start, n) in [(8usize, 4usize), (TABULATED_POSITIONS + 4, 4), (12, 3)] {
            let mut bias = vec![0f32; n];
            c.add_block_bias(&coef, start, 0.5, &mut bias, &mut scratch);
            let mut shift = vec![0f32; d];
            for (t, b) in bias.iter().enumerate() {
                c.key_shift(0, 0, start + t, &mut shift);
                let want: f32 = 0.5 * q.iter().zip(&shift).map(|(a, b)| a * b).sum::<f32>();
                assert!((b - want).abs() < 1e-4, "start {start} t {t}: {b} vs {want}");
            }
        }
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(Centering::new(1, 1, 4, 4, 1e4, vec![0.0; 3], vec![0.0; 4]).is_err());
        assert!(Centering::new(1, 1, 4, 4, 1e4, vec![f32::NAN; 4], vec![0.0; 4]).is_err());
        assert!(Centering::new(1, 1, 3, 4, 1e4, vec![0.0; 3], vec![0.0; 3]).is_err());
        assert!(CenteringFit::new(2, 1, 4, 4, 1e4).finish().is_err());
        let mut fit = CenteringFit::new(1, 1, 4, 4, 1e4);
        assert!(fit.add(0, 0, &[0.0; 3], &[0.0; 4]).is_err());
        assert!(fit.add(1, 0, &[0.0; 4], &[0.0; 4]).is_err());
    }
}
