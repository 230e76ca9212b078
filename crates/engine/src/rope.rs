//! Rotary position embedding for a batch: cos/sin of every (token, frequency), applied to query
//! and key rows in the pairing the architecture uses.

use crate::config::RopeStyle;

/// How the plain frequencies `base^(−2i/d)` are stretched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Stretch<'a> {
    /// Not at all.
    None,
    /// All divided by one factor (linear position scaling).
    Linear(f32),
    /// Each divided by its own factor.
    Factors(&'a [f32]),
}

/// What a model's RoPE needs besides positions.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rope {
    /// Per frequency `1 / base^(2i/d)`, already divided by its scaling (as candle computes it,
    /// so exact mode matches candle-transformers).
    theta: Vec<f32>,
    style: RopeStyle,
}

impl Rope {
    /// The frequencies of `head_dim` elements; [`Stretch::Factors`] holds one factor per pair
    /// (the model checks the count and their values when it loads them).
    pub(crate) fn new(base: f32, head_dim: usize, style: RopeStyle, stretch: Stretch) -> Self {
        let theta = (0..head_dim)
            .step_by(2)
            .enumerate()
            .map(|(k, i)| {
                let theta = 1f32 / base.powf(i as f32 / head_dim as f32);
                match stretch {
                    Stretch::None => theta,
                    Stretch::Linear(factor) => theta / factor,
                    Stretch::Factors(f) => theta / f[k],
                }
            })
            .collect();
        Self { theta, style }
    }

    /// The cos/sin table of a batch's positions.
    pub(crate) fn table(&self, positions: impl Iterator<Item = usize>) -> RopeTable {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for pos in positions {
            for t in &self.theta {
                let angle = pos as f32 * t;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeTable {
            half: self.theta.len(),
            style: self.style,
            cos,
            sin,
        }
    }
}

/// cos/sin of every (token, frequency) of a batch.
pub(crate) struct RopeTable {
    half: usize,
    style: RopeStyle,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Rotates every head in `row` by the token's angles.
    pub(crate) fn apply(&self, token: usize, row: &mut [f32]) {
        let cos = &self.cos[token * self.half..(token + 1) * self.half];
        let sin = &self.sin[token * self.half..(token + 1) * self.half];
        for head in row.chunks_exact_mut(2 * self.half) {
            match self.style {
                RopeStyle::Interleaved => {
                    for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                        let (x0, x1) = (pair[0], pair[1]);
                        pair[0] = x0 * cos[i] - x1 * sin[i];
                        pair[1] = x0 * sin[i] + x1 * cos[i];
                    }
                }
                RopeStyle::Halves => {
                    let (first, second) = head.split_at_mut(self.half);
                    for i in 0..self.half {
                        let (x0, x1) = (first[i], second[i]);
                        first[i] = x0 * cos[i] - x1 * sin[i];
                        second[i] = x0 * sin[i] + x1 * cos[i];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotate(rope: &Rope, pos: usize, row: &[f32]) -> Vec<f32> {
        let mut out = row.to_vec();
        rope.table(std::iter::once(pos)).apply(0, &mut out);
        out
    }

    #[test]
    fn the_two_pairings_rotate_the_same_pairs_by_the_same_angles() {
        let d = 8;
        let row: Vec<f32> = (0..d).map(|i| i as f32 + 1.0).collect();
        let inter = Rope::new(10_000.0, d, RopeStyle::Interleaved, Stretch::None);
        let halves = Rope::new(10_000.0, d, RopeStyle::Halves, Stretch::None);
        // halves' pair (i, i + d/2) is interleaved's (2i, 2i+1) after a permutation
        let permuted: Vec<f32> = (0..d / 2).flat_map(|i| [row[i], row[i + d / 2]]).collect();
        let a = rotate(&inter, 7, &permuted);
        let b = rotate(&halves, 7, &row);
        for i in 0..d / 2 {
            assert!((a[2 * i] - b[i]).abs() < 1e-6);
            assert!((a[2 * i + 1] - b[i + d / 2]).abs() < 1e-6);
        }
        // position 0 is the identity
        assert_eq!(rotate(&halves, 0, &row), row);
    }

    #[test]
    fn linear_scaling_divides_positions_and_factors_divide_frequencies() {
        let d = 8;
        let row: Vec<f32> = (0..d).map(|i| (i as f32 * 0.3).sin()).collect();
        let plain = Rope::new(500.0, d, RopeStyle::Interleaved, Stretch::None);
        let linear = Rope::new(500.0, d, RopeStyle::Interleaved, Stretch::Linear(4.0));
        let (a, b) = (rotate(&plain, 3, &row), rotate(&linear, 12, &row));
        assert!(
            a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5),
            "{a:?} {b:?}"
        );
        // factors of 4 everywhere are linear scaling by 4; a factor of 1 leaves its pair alone
        let fours = Rope::new(
            500.0,
            d,
            RopeStyle::Interleaved,
            Stretch::Factors(&[4.0; 4]),
        );
        assert_eq!(rotate(&fours, 12, &row), b);
        let mixed = Rope::new(
            500.0,
            d,
            RopeStyle::Interleaved,
            Stretch::Factors(&[1.0, 4.0, 4.0, 4.0]),
        );
        let m = rotate(&mixed, 12, &row);
        assert_eq!(m[..2], rotate(&plain, 12, &row)[..2]);
        assert_eq!(m[2..], b[2..]);
    }
}
