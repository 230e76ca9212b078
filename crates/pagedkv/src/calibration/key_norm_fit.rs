//! Fitting a [`KeyNorm`]: the pre-RoPE mean of each (layer, kv head)'s keys over a
//! calibration text.

use crate::error::{KvError, Result};
use crate::key_norm::{rope_frequencies, KeyNorm};

/// Running sums that fit a [`KeyNorm`] from keys seen at known positions.
#[derive(Debug, Clone)]
pub struct KeyNormFit {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    rope_base: f32,
    inv_freq: Vec<f64>,
    /// Pre-RoPE key sums, `[layer][head][head_dim]`.
    sums: Vec<f64>,
    seen: Vec<u64>,
}

impl KeyNormFit {
    /// Empty sums for a cache of this geometry and a model of this RoPE base.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        rope_base: f32,
    ) -> Self {
        Self {
            layers,
            kv_heads,
            head_dim,
            block_size,
            rope_base,
            inv_freq: rope_frequencies(rope_base, head_dim),
            sums: vec![0.0; layers * kv_heads * head_dim],
            seen: vec![0; layers],
        }
    }

    /// Adds one token's keys of `layer` (after RoPE at `pos`), every kv head
    /// (`kv_heads × head_dim`).
    pub fn add(&mut self, layer: usize, pos: usize, keys: &[f32]) -> Result<()> {
        let (d, width) = (self.head_dim, self.kv_heads * self.head_dim);
        if layer >= self.layers {
            return Err(KvError::IndexOutOfRange {
                what: "layer",
                index: layer,
                limit: self.layers,
            });
        }
        if keys.len() != width {
            return Err(KvError::ShapeMismatch {
                what: "keys",
                expected: width,
                got: keys.len(),
            });
        }
        for (h, k) in keys.chunks_exact(d).enumerate() {
            let at = layer * width + h * d;
            let sums = &mut self.sums[at..at + d];
            // undo RoPE: rotate each pair back by −pos·θ_i
            for (i, f) in self.inv_freq.iter().enumerate() {
                let (s, c) = (pos as f64 * f).sin_cos();
                let (k0, k1) = (k[2 * i] as f64, k[2 * i + 1] as f64);
                sums[2 * i] += k0 * c + k1 * s;
                sums[2 * i + 1] += k1 * c - k0 * s;
            }
        }
        self.seen[layer] += 1;
        Ok(())
    }

    /// The fitted means; every layer must have seen keys.
    pub fn finish(&self) -> Result<KeyNorm> {
        if let Some(layer) = self.seen.iter().position(|c| *c == 0) {
            return Err(KvError::InvalidKeyNorm(format!(
                "the fit saw no keys of layer {layer}"
            )));
        }
        let per_layer = self.kv_heads * self.head_dim;
        let means = self
            .sums
            .iter()
            .enumerate()
            .map(|(i, s)| (s / self.seen[i / per_layer] as f64) as f32)
            .collect();
        KeyNorm::new(
            self.layers,
            self.kv_heads,
            self.head_dim,
            self.block_size,
            self.rope_base,
            means,
        )
    }
}
