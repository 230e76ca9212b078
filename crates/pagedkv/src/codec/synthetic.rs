//! Synthetic K/V-like data for codec tests and benchmarks: deterministic, so figures repeat.

/// `n` standard-normal samples (Box–Muller over a 64-bit LCG seeded with `seed`).
pub fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut uniform = move || {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            ((-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos()) as f32
        })
        .collect()
}

/// Heavy-tailed rows like real keys: `tokens × head_dim`, ratio-of-normals tails, and channels
/// 3 and 17 scaled ×40 (the outlier channels that make per-token quantization fail).
pub fn outliers(tokens: usize, head_dim: usize, seed: u64) -> Vec<f32> {
    let g = gaussian(tokens * head_dim, seed);
    let h = gaussian(tokens * head_dim, seed + 1);
    g.iter()
        .zip(&h)
        .enumerate()
        .map(|(i, (a, b))| {
            let tail = a / (0.3 + b.abs());
            if i % head_dim == 3 || i % head_dim == 17 {
                tail * 40.0
            } else {
                tail
            }
        })
        .collect()
}
