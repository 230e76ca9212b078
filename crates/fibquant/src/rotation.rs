//! Randomized fast Walsh–Hadamard rotation: random signs, then the orthonormal FWHT, O(d log d).
//! It spreads a vector's energy evenly over coordinates, so after normalization each block of k
//! coordinates follows the same known law, whatever the input's outlier channels.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// `x ↦ H·diag(s)·x / √d`, orthonormal; `d` a power of two.
#[derive(Debug, Clone, PartialEq)]
pub struct HadamardRotation {
    signs: Vec<f32>,
}

impl HadamardRotation {
    /// Draws the random signs from `rng`.
    pub fn new(d: usize, rng: &mut ChaCha8Rng) -> Self {
        debug_assert!(d.is_power_of_two());
        Self {
            signs: (0..d)
                .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
                .collect(),
        }
    }

    /// Rotates `x` in place.
    pub fn apply(&self, x: &mut [f32]) {
        x.iter_mut().zip(&self.signs).for_each(|(v, s)| *v *= s);
        fwht(x);
        let norm = 1.0 / (x.len() as f32).sqrt();
        x.iter_mut().for_each(|v| *v *= norm);
    }

    /// Undoes [`apply`](Self::apply) in place (the normalized FWHT is its own inverse).
    pub fn inverse(&self, x: &mut [f32]) {
        self.inverse_scaled(x, 1.0);
    }

    /// Undoes [`apply`](Self::apply) and multiplies by `scale`, in one pass over the output.
    pub fn inverse_scaled(&self, x: &mut [f32], scale: f32) {
        fwht(x);
        let norm = scale / (x.len() as f32).sqrt();
        x.iter_mut()
            .zip(&self.signs)
            .for_each(|(v, s)| *v *= s * norm);
    }
}

/// Unnormalized fast Walsh–Hadamard transform (H·x; H·H = d·I), on the widest SIMD the CPU
/// has: the same additions in the same order on every path, so results do not depend on it.
fn fwht(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F, checked on the line above.
        return unsafe { fwht_avx512(x) };
    }
    fwht_portable(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fwht_avx512(x: &mut [f32]) {
    fwht_portable(x)
}

/// The transform written so it vectorizes: the first two stages as one radix-4 step on
/// groups of four, then stages whose halves are contiguous runs.
#[inline(always)]
fn fwht_portable(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    if n >= 4 {
        for g in x.as_chunks_mut::<4>().0 {
            let [a, b, c, d] = *g;
            let (s0, d0, s1, d1) = (a + b, a - b, c + d, c - d);
            *g = [s0 + s1, d0 + d1, s0 - s1, d0 - d1];
        }
        h = 4;
    }
    while h < n {
        for pair in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = pair.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (p, q) = (*a, *b);
                *a = p + q;
                *b = p - q;
            }
        }
        h *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn simd_transform_matches_the_portable_one_and_the_definition() {
        for d in [1usize, 2, 4, 8, 64, 128, 1024] {
            let x: Vec<f32> = (0..d).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
            let (mut fast, mut plain) = (x.clone(), x.clone());
            fwht(&mut fast);
            fwht_portable(&mut plain);
            assert_eq!(fast, plain, "d={d}");
            // H[i][j] = (−1)^popcount(i & j)
            for (i, got) in fast.iter().enumerate() {
                let want: f64 = x
                    .iter()
                    .enumerate()
                    .map(|(j, v)| {
                        if (i & j).count_ones() % 2 == 0 {
                            *v as f64
                        } else {
                            -*v as f64
                        }
                    })
                    .sum();
                assert!((*got as f64 - want).abs() < 1e-3, "d={d} i={i}");
            }
        }
    }

    #[test]
    fn rotation_is_orthonormal_and_invertible() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let r = HadamardRotation::new(64, &mut rng);
        let x: Vec<f32> = (0..64)
            .map(|i| (i as f32 * 0.7).sin() + if i == 5 { 30.0 } else { 0.0 })
            .collect();
        let mut y = x.clone();
        r.apply(&mut y);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!((norm(&x) - norm(&y)).abs() < 1e-3 * norm(&x));
        // the outlier is spread: no coordinate keeps more than a few times the mean energy
        assert!(y.iter().all(|v| v.abs() < 8.0));
        r.inverse(&mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-4);
        }
    }
}
