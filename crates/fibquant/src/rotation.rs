//! Random rotations that spread a vector's energy evenly over coordinates, so after
//! normalization each block of k coordinates follows the same known law, whatever the input's
//! outlier channels:
//! - randomized fast Walsh–Hadamard (random signs, then the orthonormal FWHT), O(d log d), d a
//!   power of two: the default;
//! - dense Haar (uniform over the orthogonal group: QR of a Gaussian matrix with the signs of
//!   R's diagonal folded in), O(d²), any d: the textbook rotation, as an option.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Which rotation a profile uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RotationKind {
    /// Randomized Hadamard (d a power of two).
    #[default]
    Hadamard,
    /// Dense Haar-random orthogonal matrix.
    Haar,
}

impl RotationKind {
    /// Its byte in payload headers.
    pub fn code(self) -> u8 {
        match self {
            RotationKind::Hadamard => 0,
            RotationKind::Haar => 1,
        }
    }

    /// The kind of a header byte.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(RotationKind::Hadamard),
            1 => Some(RotationKind::Haar),
            _ => None,
        }
    }
}

/// A built rotation of either kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Rotation {
    /// Randomized Hadamard.
    Hadamard(HadamardRotation),
    /// Dense Haar.
    Haar(HaarRotation),
}

impl Rotation {
    /// Draws a rotation of `kind` for dimension `d` from `rng`.
    pub fn new(kind: RotationKind, d: usize, rng: &mut ChaCha8Rng) -> Self {
        match kind {
            RotationKind::Hadamard => Rotation::Hadamard(HadamardRotation::new(d, rng)),
            RotationKind::Haar => Rotation::Haar(HaarRotation::new(d, rng)),
        }
    }

    /// Rotates `x` in place.
    pub fn apply(&self, x: &mut [f32]) {
        self.apply_with(x, Isa::widest());
    }

    /// [`Self::apply`] with the instructions `isa` allows (the same result on every one).
    pub fn apply_with(&self, x: &mut [f32], isa: Isa) {
        match self {
            Rotation::Hadamard(r) => r.apply_with(x, isa),
            Rotation::Haar(r) => r.apply(x),
        }
    }

    /// Rotates `scale·x` in place (the encoder's normalization in the same pass; equal to
    /// [`apply`](Self::apply) of the scaled vector up to rounding).
    pub fn apply_scaled(&self, x: &mut [f32], scale: f32) {
        match self {
            Rotation::Hadamard(r) => r.apply_scaled_with(x, scale, Isa::widest()),
            Rotation::Haar(r) => {
                x.iter_mut().for_each(|v| *v *= scale);
                r.apply(x)
            }
        }
    }

    /// Undoes [`apply`](Self::apply) and multiplies by `scale`.
    pub fn inverse_scaled(&self, x: &mut [f32], scale: f32) {
        self.inverse_scaled_with(x, scale, Isa::widest());
    }

    /// [`Self::inverse_scaled`] with the instructions `isa` allows (the same result on every
    /// one).
    pub fn inverse_scaled_with(&self, x: &mut [f32], scale: f32, isa: Isa) {
        match self {
            Rotation::Hadamard(r) => r.inverse_scaled_with(x, scale, isa),
            Rotation::Haar(r) => r.inverse_scaled(x, scale),
        }
    }
}

/// `x ↦ Q·x` with Q Haar-distributed on the orthogonal group, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HaarRotation {
    d: usize,
    q: Vec<f32>,
}

impl HaarRotation {
    /// Gram–Schmidt (twice, in f64) on the columns of a Gaussian matrix: Q of its QR with R's
    /// diagonal positive, which makes Q exactly Haar-distributed.
    pub fn new(d: usize, rng: &mut ChaCha8Rng) -> Self {
        let mut cols: Vec<Vec<f64>> = (0..d)
            .map(|_| (0..d).map(|_| crate::codebook::normal(rng)).collect())
            .collect();
        for j in 0..d {
            for _ in 0..2 {
                for i in 0..j {
                    let dot: f64 = cols[i].iter().zip(&cols[j]).map(|(a, b)| a * b).sum();
                    let (done, rest) = cols.split_at_mut(j);
                    rest[0]
                        .iter_mut()
                        .zip(&done[i])
                        .for_each(|(v, u)| *v -= dot * u);
                }
            }
            let norm = cols[j].iter().map(|v| v * v).sum::<f64>().sqrt();
            cols[j].iter_mut().for_each(|v| *v /= norm);
        }
        // Q's columns are `cols`; store Q row-major
        let mut q = vec![0f32; d * d];
        for (j, col) in cols.iter().enumerate() {
            for (i, v) in col.iter().enumerate() {
                q[i * d + j] = *v as f32;
            }
        }
        Self { d, q }
    }

    /// `x ← Q·x`.
    pub fn apply(&self, x: &mut [f32]) {
        let input = x.to_vec();
        for (out, row) in x.iter_mut().zip(self.q.chunks_exact(self.d)) {
            *out = row.iter().zip(&input).map(|(a, b)| a * b).sum();
        }
    }

    /// `x ← scale·Qᵀ·x`.
    pub fn inverse_scaled(&self, x: &mut [f32], scale: f32) {
        let input = x.to_vec();
        x.fill(0.0);
        for (row, v) in self.q.chunks_exact(self.d).zip(&input) {
            let v = v * scale;
            x.iter_mut().zip(row).for_each(|(o, a)| *o += a * v);
        }
    }
}

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
        self.apply_with(x, Isa::widest());
    }

    /// [`Self::apply`] with the instructions `isa` allows.
    pub fn apply_with(&self, x: &mut [f32], isa: Isa) {
        x.iter_mut().zip(&self.signs).for_each(|(v, s)| *v *= s);
        fwht(x, isa);
        let norm = 1.0 / (x.len() as f32).sqrt();
        x.iter_mut().for_each(|v| *v *= norm);
    }

    /// Rotates `scale·x` in place: signs, scale and 1/√d in one multiply before the
    /// transform.
    pub fn apply_scaled_with(&self, x: &mut [f32], scale: f32, isa: Isa) {
        let factor = scale / (x.len() as f32).sqrt();
        x.iter_mut()
            .zip(&self.signs)
            .for_each(|(v, s)| *v *= s * factor);
        fwht(x, isa);
    }

    /// Undoes [`apply`](Self::apply) in place (the normalized FWHT is its own inverse).
    pub fn inverse(&self, x: &mut [f32]) {
        self.inverse_scaled(x, 1.0);
    }

    /// Undoes [`apply`](Self::apply) and multiplies by `scale`, in one pass over the output.
    pub fn inverse_scaled(&self, x: &mut [f32], scale: f32) {
        self.inverse_scaled_with(x, scale, Isa::widest());
    }

    /// [`Self::inverse_scaled`] with the instructions `isa` allows.
    pub fn inverse_scaled_with(&self, x: &mut [f32], scale: f32, isa: Isa) {
        fwht(x, isa);
        let norm = scale / (x.len() as f32).sqrt();
        x.iter_mut()
            .zip(&self.signs)
            .for_each(|(v, s)| *v *= s * norm);
    }
}

/// Which instructions the rotation may use: a caller that measures or tests one dispatch
/// level (pagedkv's attention) passes its own. Every level gives the same result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// The baseline target's instructions.
    Portable,
    /// AVX2.
    Avx2,
    /// AVX-512F.
    Avx512,
}

impl Isa {
    /// The widest level this CPU has (detected once).
    pub fn widest() -> Isa {
        static WIDEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *WIDEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }
}

/// Unnormalized fast Walsh–Hadamard transform (H·x; H·H = d·I) with the instructions `isa`
/// allows, where the CPU has them: the same additions in the same order on every path, so
/// results do not depend on it.
fn fwht(x: &mut [f32], isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 if std::arch::is_x86_feature_detected!("avx512f") => {
            // SAFETY: the CPU supports AVX-512F, checked on the line above.
            return unsafe { fwht_avx512(x) };
        }
        Isa::Avx2 if std::arch::is_x86_feature_detected!("avx2") => {
            // SAFETY: the CPU supports AVX2, checked on the line above.
            return unsafe { fwht_avx2(x) };
        }
        _ => {}
    }
    let _ = isa;
    fwht_portable(x)
}

/// The transform with AVX-512 for d ≥ 16: the stages within sixteen coordinates (h = 1, 2,
/// 4, 8) on each register with a lane swap and a masked subtraction, then the stages between
/// registers, in registers up to d = 256 (the compiler's vectorization of the portable loops
/// handles halves shorter than a register a few elements at a time). Each element sees the
/// same additions in the same order as in [`fwht_portable`] (a + b is b + a exactly), so the
/// results are identical.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fwht_avx512(x: &mut [f32]) {
    use std::arch::x86_64::*;
    const HELD: usize = 16;
    let n = x.len();
    if n < 16 {
        return fwht_portable(x);
    }
    let chunks = x.as_chunks_mut::<16>().0;
    if n > 16 * HELD {
        for chunk in chunks {
            // SAFETY: a chunk holds 16 floats; the CPU has AVX-512F (this function's feature).
            unsafe { _mm512_storeu_ps(chunk.as_mut_ptr(), within_register(chunk)) };
        }
        return stages_from(x, 16);
    }
    let mut v = [_mm512_setzero_ps(); HELD];
    for (v, chunk) in v.iter_mut().zip(chunks.iter()) {
        // SAFETY: as above.
        *v = unsafe { within_register(chunk) };
    }
    let registers = chunks.len();
    let mut h = 1;
    while h < registers {
        for r in (0..registers).filter(|r| r & h == 0) {
            let (a, b) = (v[r], v[r + h]);
            v[r] = _mm512_add_ps(a, b);
            v[r + h] = _mm512_sub_ps(a, b);
        }
        h *= 2;
    }
    for (chunk, v) in chunks.iter_mut().zip(v) {
        // SAFETY: a chunk holds 16 floats.
        unsafe { _mm512_storeu_ps(chunk.as_mut_ptr(), v) };
    }
}

/// Stages h = 1, 2, 4, 8 of sixteen coordinates in one register: lane i's partner is lane
/// i ^ h, and lanes with bit h set take partner − own.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn within_register(chunk: &[f32; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: the chunk holds 16 floats.
    let v = unsafe { _mm512_loadu_ps(chunk.as_ptr()) };
    let swapped = _mm512_permute_ps::<0b10_11_00_01>(v);
    let v = _mm512_mask_sub_ps(_mm512_add_ps(v, swapped), 0xAAAA, swapped, v);
    let swapped = _mm512_permute_ps::<0b01_00_11_10>(v);
    let v = _mm512_mask_sub_ps(_mm512_add_ps(v, swapped), 0xCCCC, swapped, v);
    let swapped = _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v);
    let v = _mm512_mask_sub_ps(_mm512_add_ps(v, swapped), 0xF0F0, swapped, v);
    let swapped = _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v);
    _mm512_mask_sub_ps(_mm512_add_ps(v, swapped), 0xFF00, swapped, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn fwht_avx2(x: &mut [f32]) {
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
    stages_from(x, h);
}

/// The stages from half-length `h` on, each on contiguous halves.
#[inline(always)]
fn stages_from(x: &mut [f32], mut h: usize) {
    while h < x.len() {
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
        println!("fwht: the widest level on this CPU is {:?}", Isa::widest());
        for d in [1usize, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024] {
            let x: Vec<f32> = (0..d)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3 + (i as f32).sqrt() * 1e-3)
                .collect();
            let mut plain = x.clone();
            fwht_portable(&mut plain);
            // every level this CPU has (the others fall back to the portable loop)
            for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable] {
                let mut fast = x.clone();
                fwht(&mut fast, isa);
                assert_eq!(fast, plain, "d={d}, {isa:?}");
            }
            // H[i][j] = (−1)^popcount(i & j)
            for (i, got) in plain.iter().enumerate() {
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
    fn haar_rotation_is_orthonormal_and_invertible() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let r = HaarRotation::new(48, &mut rng);
        for i in 0..48 {
            for j in 0..48 {
                let dot: f32 = (0..48).map(|t| r.q[t * 48 + i] * r.q[t * 48 + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-5, "{i} {j}: {dot}");
            }
        }
        let x: Vec<f32> = (0..48).map(|i| (i as f32 * 0.3).cos() * 2.0).collect();
        let mut y = x.clone();
        r.apply(&mut y);
        r.inverse_scaled(&mut y, 2.0);
        for (a, b) in x.iter().zip(&y) {
            assert!((2.0 * a - b).abs() < 1e-4);
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
