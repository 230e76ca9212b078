//! The radial–angular FibQuant codebook (DESIGN §6): N codewords `c_n = r_n · u_n` in R^k from one
//! spiral sequence, then Lloyd–Max refinement on samples of the source.
//!
//! - radii: `r_n² = F⁻¹(q_n)`, `q_n = (n − ½)/N`, F the CDF of Beta(k/2, β) with
//!   `β = k/(k+2) · (d−k−2)/2 + 1` — the source's block-norm law Beta(k/2, (d−k)/2) companded so
//!   point density ∝ density^(k/(k+2)); for k = 2 this is `r_n² = 1 − (1 − q_n)^(4/d)`;
//! - directions: Fibonacci spiral (k = 2), Fibonacci sphere (k = 3), Roberts–Kronecker points
//!   mapped through the normal inverse CDF (k ≥ 4), alternating signs (k = 1).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use statrs::distribution::{Beta, ContinuousCDF, Normal};

use crate::fixed_scan::{check_blocks, FixedCodebook};
use crate::scan;

/// Golden ratio.
const PHI: f64 = 1.618_033_988_749_895;
/// Lloyd–Max is run only up to this codebook size (cost grows as N² samples·codewords).
pub const MAX_REFINED_N: usize = 4096;
/// Samples per codeword for refinement (DESIGN: at least 1000·N; fewer overfits).
const SAMPLES_PER_CODEWORD: usize = 1000;
const LLOYD_ITERATIONS: usize = 30;
/// Codewords are padded to a multiple of this for the SIMD scan.
const LANES: usize = scan::LANES;
/// Blocks below which a search is not split over threads.
const BLOCKS_PER_THREAD: usize = 4096;
/// Up to this many codewords the exhaustive SIMD scan is used for every k.
pub const MAX_SCANNED_N: usize = 4096;

/// N codewords of dimension k, row-major, plus a search layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Codebook {
    k: usize,
    words: Vec<f32>,
    /// Coordinate j of every codeword, contiguous (`[j][i]`, rows of `stride`), for vectorized
    /// search; padding columns are 0.
    columns: Vec<f32>,
    /// ‖c_i‖² of every codeword, then +∞ for the padding up to `stride` (never chosen).
    norms: Vec<f32>,
    /// N rounded up to a whole number of SIMD lanes.
    stride: usize,
    /// Codeword indices sorted by radius, and the radii in that order (for pruned search).
    by_radius: Vec<u32>,
    radii: Vec<f32>,
    /// The codewords in fixed point, for the encoder's search (up to [`MAX_SCANNED_N`]).
    fixed: Option<FixedCodebook>,
}

/// Standard normal samples by Box–Muller over ChaCha8 (value-stable for a given seed).
pub(crate) fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1 = (rng.random::<u64>() >> 11) as f64 / (1u64 << 53) as f64 + 1e-300;
    let u2 = (rng.random::<u64>() >> 11) as f64 / (1u64 << 53) as f64;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The largest root of x^(k+1) = x + 1 (Newton from 2): the generalized golden ratio.
fn generalized_phi(k: usize) -> f64 {
    let mut x = 2.0f64;
    for _ in 0..100 {
        let f = x.powi(k as i32 + 1) - x - 1.0;
        let df = (k as f64 + 1.0) * x.powi(k as i32) - 1.0;
        x -= f / df;
    }
    x
}

/// Unit direction number `n` (1-based) of N in R^k.
fn direction(k: usize, n: usize, count: usize, out: &mut [f64]) {
    let golden_angle = std::f64::consts::TAU * (1.0 - 1.0 / PHI);
    match k {
        1 => out[0] = if n % 2 == 1 { 1.0 } else { -1.0 },
        2 => {
            let theta = golden_angle * n as f64;
            out[0] = theta.cos();
            out[1] = theta.sin();
        }
        3 => {
            let z = 1.0 - (2.0 * n as f64 - 1.0) / count as f64;
            let rho = (1.0 - z * z).max(0.0).sqrt();
            let theta = golden_angle * n as f64;
            out[0] = rho * theta.cos();
            out[1] = rho * theta.sin();
            out[2] = z;
        }
        _ => {
            let phi_k = generalized_phi(k);
            let normal = Normal::new(0.0, 1.0).expect("valid normal");
            for (j, o) in out.iter_mut().enumerate() {
                let xi = ((n as f64 + 0.5) * phi_k.powi(-(j as i32 + 1))).fract();
                *o = normal.inverse_cdf(xi.clamp(1e-12, 1.0 - 1e-12));
            }
            let norm = out.iter().map(|v| v * v).sum::<f64>().sqrt();
            out.iter_mut().for_each(|v| *v /= norm);
        }
    }
}

impl Codebook {
    /// The spiral codebook for vectors of dimension `d` split into blocks of `k`, before refinement.
    pub fn spiral(d: usize, k: usize, count: usize) -> Self {
        let beta = k as f64 / (k as f64 + 2.0) * (d as f64 - k as f64 - 2.0) / 2.0 + 1.0;
        let law = Beta::new(k as f64 / 2.0, beta.max(1e-3)).expect("valid beta parameters");
        let mut words = Vec::with_capacity(count * k);
        let mut u = vec![0f64; k];
        for n in 1..=count {
            let q = (n as f64 - 0.5) / count as f64;
            let r = law.inverse_cdf(q).max(0.0).sqrt();
            direction(k, n, count, &mut u);
            words.extend(u.iter().map(|v| (r * v) as f32));
        }
        Self::from_words(k, words)
    }

    /// The spiral codebook refined by Lloyd–Max on `1000·N` blocks of uniform unit vectors of
    /// dimension `d` (the law of a rotated, normalized vector), kept only if it lowers the
    /// distortion on held-out samples. Deterministic in `seed`.
    pub fn build(d: usize, k: usize, count: usize, seed: u64) -> Self {
        let spiral = Self::spiral(d, k, count);
        if count > MAX_REFINED_N {
            return spiral;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xF1B0_C0DE);
        let train = source_blocks(d, k, SAMPLES_PER_CODEWORD * count, &mut rng);
        let held_out = source_blocks(d, k, SAMPLES_PER_CODEWORD * count / 4, &mut rng);
        let mut refined = spiral.clone();
        let mut sums = vec![0f64; count * k];
        let mut counts = vec![0usize; count];
        let mut nearest = vec![0u16; train.len() / k];
        for _ in 0..LLOYD_ITERATIONS {
            sums.fill(0.0);
            counts.fill(0);
            refined.nearest_each(&train, &mut nearest);
            for (sample, i) in train.chunks_exact(k).zip(&nearest) {
                let i = *i as usize;
                counts[i] += 1;
                for (s, v) in sums[i * k..(i + 1) * k].iter_mut().zip(sample) {
                    *s += *v as f64;
                }
            }
            let mut words = refined.words.clone();
            for (i, c) in counts.iter().enumerate() {
                if *c > 0 {
                    for j in 0..k {
                        words[i * k + j] = (sums[i * k + j] / *c as f64) as f32;
                    }
                }
            }
            refined = Self::from_words(k, words);
        }
        if refined.distortion(&held_out) < spiral.distortion(&held_out) {
            refined
        } else {
            spiral
        }
    }

    pub(crate) fn from_words(k: usize, words: Vec<f32>) -> Self {
        let n = words.len() / k;
        let stride = n.next_multiple_of(LANES);
        let mut columns = vec![0f32; stride * k];
        for (i, w) in words.chunks_exact(k).enumerate() {
            for (j, v) in w.iter().enumerate() {
                columns[j * stride + i] = *v;
            }
        }
        let mut norms: Vec<f32> = words
            .chunks_exact(k)
            .map(|w| w.iter().map(|v| v * v).sum())
            .collect();
        let mut by_radius: Vec<u32> = (0..n as u32).collect();
        by_radius.sort_by(|a, b| {
            norms[*a as usize]
                .total_cmp(&norms[*b as usize])
                .then(a.cmp(b))
        });
        let radii = by_radius
            .iter()
            .map(|i| norms[*i as usize].sqrt())
            .collect();
        norms.resize(stride, f32::INFINITY);
        let fixed = (n <= MAX_SCANNED_N).then(|| FixedCodebook::new(k, &words, stride));
        Self {
            k,
            fixed,
            words,
            columns,
            norms,
            stride,
            by_radius,
            radii,
        }
    }

    /// Coordinates per codeword.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Number of codewords.
    pub fn len(&self) -> usize {
        self.words.len() / self.k
    }

    /// True for an empty codebook (never built by this crate).
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Codeword `i`.
    pub fn word(&self, i: usize) -> &[f32] {
        &self.words[i * self.k..(i + 1) * self.k]
    }

    /// Coordinate `j` of every codeword (N values, then zero padding to a multiple of 16).
    pub fn column(&self, j: usize) -> &[f32] {
        &self.columns[j * self.stride..(j + 1) * self.stride]
    }

    /// All codewords, row-major.
    pub fn words(&self) -> &[f32] {
        &self.words
    }

    /// Index of the codeword nearest to `x` (exact, first index on ties): the SIMD scan over
    /// all codewords up to [`MAX_SCANNED_N`] codewords (for N = 256 it is ~10× faster than
    /// the pruned walk, whose branches defeat the CPU); the radially pruned walk above that, for
    /// k ≤ 3 where the radius bound discards most codewords.
    pub fn nearest(&self, x: &[f32]) -> usize {
        if self.walks_radii() {
            self.nearest_pruned(x)
        } else {
            self.nearest_exhaustive(x)
        }
    }

    /// True where exact searches walk outwards in radius ([`Self::nearest_pruned`]) instead of
    /// scanning every codeword: above [`MAX_SCANNED_N`] codewords, for k ≤ 3.
    fn walks_radii(&self) -> bool {
        self.k <= 3 && self.len() > MAX_SCANNED_N
    }

    /// [`Self::nearest`] of each block of `blocks` (consecutive blocks of k) into `out`, the
    /// same indices: sixteen blocks at once per register where the exhaustive scan applies,
    /// the blocks split over the machine's cores (refinement searches 1000·N samples thirty
    /// times; each thread's share is searched independently, so the split changes nothing).
    pub fn nearest_each(&self, blocks: &[f32], out: &mut [u16]) {
        let k = self.k;
        check_blocks(k, blocks, out);
        if self.walks_radii() {
            for (index, block) in out.iter_mut().zip(blocks.chunks_exact(k)) {
                *index = self.nearest_pruned(block) as u16;
            }
            return;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = cores.min(out.len() / BLOCKS_PER_THREAD).max(1);
        let share = out.len().div_ceil(threads);
        let search = |blocks: &[f32], out: &mut [u16]| {
            scan::nearest_blocks(&self.columns, &self.norms, self.stride, k, blocks, out)
        };
        if threads == 1 {
            return search(blocks, out);
        }
        std::thread::scope(|scope| {
            for (blocks, out) in blocks.chunks(share * k).zip(out.chunks_mut(share)) {
                scope.spawn(move || search(blocks, out));
            }
        });
    }

    /// Exact nearest codeword with radial pruning: since ‖x − c‖ ≥ |‖x‖ − ‖c‖|, codewords are
    /// visited outwards from the radius of `x` in radius order, and the walk in a direction stops
    /// once that bound alone exceeds the best distance. Ties go to the smaller index.
    pub fn nearest_pruned(&self, x: &[f32]) -> usize {
        let rx = x.iter().map(|v| v * v).sum::<f32>().sqrt();
        let n = self.radii.len();
        let start = self.radii.partition_point(|r| *r < rx);
        let mut best = (u32::MAX, f32::INFINITY);
        let consider = |i: u32, best: &mut (u32, f32)| {
            let w = self.word(i as usize);
            let dist: f32 = w.iter().zip(x).map(|(a, b)| (a - b) * (a - b)).sum();
            if dist < best.1 || (dist == best.1 && i < best.0) {
                *best = (i, dist);
            }
        };
        let (mut up, mut down) = (start, start);
        // the bound is compared with a small margin so float rounding never prunes the answer
        let slack = |d: f32| d * (1.0 + 1e-5) + 1e-12;
        loop {
            let up_gap = (up < n).then(|| self.radii[up] - rx);
            let down_gap = (down > 0).then(|| rx - self.radii[down - 1]);
            let next_up = up_gap.filter(|g| g * g <= slack(best.1));
            let next_down = down_gap.filter(|g| g * g <= slack(best.1));
            match (next_up, next_down) {
                (None, None) => break,
                (Some(u), Some(d)) if u <= d => {
                    consider(self.by_radius[up], &mut best);
                    up += 1;
                }
                (Some(_), None) => {
                    consider(self.by_radius[up], &mut best);
                    up += 1;
                }
                _ => {
                    consider(self.by_radius[down - 1], &mut best);
                    down -= 1;
                }
            }
        }
        best.0 as usize
    }

    /// The index of the codeword nearest to each block of `blocks` (consecutive blocks of k)
    /// into `out`, as the encoder searches: up to [`MAX_SCANNED_N`] codewords in fixed point
    /// ([`crate::fixed_scan`]: the nearest to within the coordinates' rounding, about 2⁻¹³ of
    /// the unit, the same index on every CPU); above that exactly ([`Self::nearest_each`]),
    /// since the fixed-point score gives up as many low bits as an index takes.
    pub fn nearest_blocks(&self, blocks: &[f32], out: &mut [u16]) {
        match &self.fixed {
            Some(fixed) => fixed.nearest_blocks(blocks, out),
            None => self.nearest_each(blocks, out),
        }
    }

    /// Index of the codeword nearest to `x`: exact search over all codewords, minimizing
    /// ‖c‖² − 2⟨x, c⟩ (= ‖x − c‖² − ‖x‖²); the first index on ties. Uses the widest SIMD the
    /// CPU has (runtime detection); every path returns the same index, since each lane performs
    /// the same operations in the same order (multiply then subtract, no fused multiply-add).
    pub fn nearest_exhaustive(&self, x: &[f32]) -> usize {
        scan::nearest(&self.columns, &self.norms, self.stride, x)
    }

    /// Mean squared error of quantizing `samples` (blocks of k) to their nearest codewords.
    pub fn distortion(&self, samples: &[f32]) -> f64 {
        let count = samples.len() / self.k;
        let mut nearest = vec![0u16; count];
        self.nearest_each(&samples[..count * self.k], &mut nearest);
        let total: f64 = samples
            .chunks_exact(self.k)
            .zip(&nearest)
            .map(|(s, i)| {
                let w = self.word(*i as usize);
                w.iter()
                    .zip(s)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>()
            })
            .sum();
        total / (samples.len() / self.k) as f64
    }
}

/// `count` blocks of k coordinates of uniform unit vectors in R^d.
fn source_blocks(d: usize, k: usize, count: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut out = Vec::with_capacity(count * k);
    let mut v = vec![0f64; d];
    while out.len() < count * k {
        v.iter_mut().for_each(|x| *x = normal(rng));
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        out.extend(v.iter().map(|x| (x / norm) as f32));
    }
    out.truncate(count * k);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k2_radii_follow_the_closed_form() {
        let (d, n) = (128usize, 64usize);
        let cb = Codebook::spiral(d, 2, n);
        for i in 1..=n {
            let q = (i as f64 - 0.5) / n as f64;
            let r = (1.0 - (1.0 - q).powf(4.0 / d as f64)).sqrt();
            let w = cb.word(i - 1);
            let got = ((w[0] * w[0] + w[1] * w[1]) as f64).sqrt();
            assert!((got - r).abs() < 1e-5, "codeword {i}: {got} vs {r}");
        }
    }

    #[test]
    fn generalized_golden_ratios() {
        assert!((generalized_phi(1) - PHI).abs() < 1e-12);
        assert!((generalized_phi(2) - 1.324_717_957_244_746).abs() < 1e-12); // plastic number
    }

    #[test]
    fn pruned_search_finds_the_exact_nearest_codeword() {
        for (d, k, n) in [(64, 2, 256), (128, 4, 256), (64, 2, 16), (64, 3, 64)] {
            let cb = Codebook::build(d, k, n, 5);
            let mut rng = ChaCha8Rng::seed_from_u64(42);
            let samples = source_blocks(d, k, 5_000, &mut rng);
            for x in samples.chunks_exact(k) {
                let (a, b) = (cb.nearest_pruned(x), cb.nearest_exhaustive(x));
                let dist = |i: usize| {
                    cb.word(i)
                        .iter()
                        .zip(x)
                        .map(|(p, q)| (p - q) * (p - q))
                        .sum::<f32>()
                };
                // same codeword, or an equally near one (the two searches round differently)
                assert!(
                    a == b || (dist(a) - dist(b)).abs() <= 1e-6 * dist(b).max(1e-12),
                    "{d} {k} {n}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn simd_scan_matches_the_portable_scan() {
        // exercises the unsafe runtime-dispatched paths against the plain build of the same scan
        for (d, k, n) in [
            (64, 2, 256),
            (128, 4, 256),
            (64, 3, 20),
            (64, 8, 64),
            (64, 1, 2),
        ] {
            let cb = Codebook::build(d, k, n, 3);
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let samples = source_blocks(d, k, 4_000, &mut rng);
            for x in samples.chunks_exact(k) {
                assert_eq!(
                    cb.nearest_exhaustive(x),
                    scan::nearest_portable(&cb.columns, &cb.norms, cb.stride, x),
                    "{d} {k} {n}"
                );
            }
        }
    }

    #[test]
    fn refinement_is_deterministic_and_not_worse() {
        let a = Codebook::build(64, 2, 16, 7);
        assert_eq!(a, Codebook::build(64, 2, 16, 7));
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let test = source_blocks(64, 2, 20_000, &mut rng);
        assert!(a.distortion(&test) <= Codebook::spiral(64, 2, 16).distortion(&test) * 1.01);
    }
}
