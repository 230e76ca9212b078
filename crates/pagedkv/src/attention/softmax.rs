//! The online softmax's arithmetic: dot products, the branch-free exponential, the lazily
//! moving reference point and one block's step.

use super::Simd;

/// Dot product with 16 independent partial sums, so the compiler keeps them in vector lanes.
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (a_main, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_main, b_tail) = b.split_at(a_main.len());
    for (ca, cb) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// How far scores may exceed the running reference point before it moves: weights up to
/// e⁸ ≈ 3000 stay far from f32's range, and the running sums are rescaled (an exponential and
/// a pass over the accumulators) only when a block's maximum jumps, not on every new maximum.
pub(super) const LAZY_MAX_SLACK: f32 = 8.0;

/// The softmax reference point after a block whose largest score is `block_max`.
#[inline(always)]
pub(super) fn lazy_max(max_in: f32, block_max: f32) -> f32 {
    if block_max > max_in + LAZY_MAX_SLACK || max_in == f32::NEG_INFINITY {
        max_in.max(block_max)
    } else {
        max_in
    }
}

/// ln 2 in two parts (Cody–Waite): `n·LN2_HI` is exact for the `n` of an f32 exponent.
pub(super) const LN2_HI: f32 = 0.693_359_4;
pub(super) const LN2_LO: f32 = -2.121_944_4e-4;

/// Cephes' expf polynomial for `(eʳ − 1 − r) / r²`, highest power first.
pub(super) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `x ← eˣ` for scores shifted by the softmax reference point (x ≤ 8, or −∞), branch-free so it
/// vectorizes: x = n·ln2 + r with |r| ≤ ln2/2, eʳ by a degree-6 polynomial (Cephes' expf
/// coefficients), 2ⁿ put in the exponent bits. Relative error below 3·10⁻⁷; below −87 the
/// result is 0 (f32 would be subnormal there; softmax weights that small do not count).
#[inline(always)]
pub(super) fn exp_in_place(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        let v = x.max(-87.0);
        let n = (v * std::f32::consts::LOG2_E + 0.5).floor();
        let r = v - n * LN2_HI - n * LN2_LO;
        let p = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, c| p * r + c);
        let e = p * r * r + r + 1.0;
        let scaled = e * f32::from_bits((((n as i32) + 127) << 23) as u32);
        *x = if *x < -87.0 { 0.0 } else { scaled };
    }
}

#[inline(always)]
pub(super) fn axpy(acc: &mut [f32], p: f32, v: &[f32]) {
    acc.iter_mut().zip(v).for_each(|(a, x)| *a += p * x);
}

/// One block's online-softmax step for a query head: the first `n` scores become their
/// weights `exp(s − reference)`, and are added into `lanes`, the running sum kept spread over 16
/// lanes (summed once at the end of the pass). The reference point moves (see [`lazy_max`])
/// only when the block exceeds it by more than the slack; then `lanes` is rescaled and the
/// correction returned for the caller's accumulators. Returns (reference, correction).
#[inline(always)]
pub(super) fn softmax_step(
    scores: &mut [f32],
    n: usize,
    max_in: f32,
    lanes: &mut [f32; 16],
    simd: Simd,
) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if scores.len() == 16 && simd == Simd::Avx512 {
        // SAFETY: AVX-512F is present (a pass runs at a level only where the CPU has it).
        return unsafe { super::pages::x86::softmax_step_16(scores, n, max_in, lanes) };
    }
    #[cfg(target_arch = "x86_64")]
    if scores.len() == 16 && simd == Simd::Avx2 {
        // SAFETY: AVX2 and FMA are present (a pass runs at a level only where the CPU has it).
        return unsafe { super::pages::avx2::softmax_step_16(scores, n, max_in, lanes) };
    }
    let block = &mut scores[..n];
    let block_max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let new_max = lazy_max(max_in, block_max);
    block.iter_mut().for_each(|s| *s -= new_max);
    exp_in_place(block);
    let correction = correction(max_in, new_max);
    lanes[0] = lanes[0] * correction + block.iter().sum::<f32>();
    (new_max, correction)
}

/// The factor that moves sums from reference point `old` to `new` (1 when it did not move).
#[inline(always)]
pub(super) fn correction(old: f32, new: f32) -> f32 {
    if old == new {
        1.0
    } else {
        (old - new).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -100.0 + i as f32 * 0.0005;
            let mut v = [x];
            exp_in_place(&mut v);
            let want = (x as f64).exp();
            let rel = ((v[0] as f64 - want) / want.max(f64::MIN_POSITIVE)).abs();
            if want > 1e-30 {
                worst = worst.max(rel);
            }
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        let mut edge = [f32::NEG_INFINITY, -200.0, 0.0];
        exp_in_place(&mut edge);
        assert_eq!(edge, [0.0, 0.0, 1.0]);
    }
}
