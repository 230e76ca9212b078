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
    }

    /// Undoes [`apply`](Self::apply) in place (the normalized FWHT is its own inverse).
    pub fn inverse(&self, x: &mut [f32]) {
        fwht(x);
        x.iter_mut().zip(&self.signs).for_each(|(v, s)| *v *= s);
    }
}

/// Orthonormal fast Walsh–Hadamard transform (scaled by 1/√d, so it is its own inverse).
fn fwht(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for start in (0..n).step_by(2 * h) {
            for i in start..start + h {
                let (a, b) = (x[i], x[i + h]);
                x[i] = a + b;
                x[i + h] = a - b;
            }
        }
        h *= 2;
    }
    let norm = 1.0 / (n as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= norm);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

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
