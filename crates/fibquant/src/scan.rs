//! Exhaustive nearest-codeword scan, SIMD with runtime dispatch and a portable twin.
//!
//! The codebook is stored by column (`columns[j·stride + i]` = coordinate j of codeword i) and
//! padded to a multiple of [`LANES`] with norm +∞, so every path scans whole registers. Score
//! of codeword i: `‖c_i‖² − Σ_j (2·x_j)·c_ij`, computed multiply-then-subtract in j order by
//! every path, so all paths agree bit for bit and return the first index of the minimum.

/// Codewords per scan step (one AVX-512 register of f32); the padding unit.
pub const LANES: usize = 16;

/// Index of the codeword with the smallest score for the block `x` (length k).
pub fn nearest(columns: &[f32], norms: &[f32], stride: usize, x: &[f32]) -> usize {
    debug_assert_eq!(columns.len(), stride * x.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY (each arm): the CPU supports AVX-512F, checked on the line above.
            return match x.len() {
                1 => unsafe { x86::nearest_avx512::<1>(columns, norms, stride, x) },
                2 => unsafe { x86::nearest_avx512::<2>(columns, norms, stride, x) },
                3 => unsafe { x86::nearest_avx512::<3>(columns, norms, stride, x) },
                4 => unsafe { x86::nearest_avx512::<4>(columns, norms, stride, x) },
                _ => unsafe { x86::nearest_avx512::<0>(columns, norms, stride, x) },
            };
        }
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU supports AVX, checked on the line above.
            return unsafe { x86::nearest_avx(columns, norms, stride, x) };
        }
    }
    nearest_portable(columns, norms, stride, x)
}

/// The index of the nearest codeword of each of the consecutive blocks in `blocks` (a multiple
/// of k long) into `out`: for each block exactly what [`nearest`] returns. On AVX-512 sixteen
/// blocks are searched at once, one per lane, with the codewords in turn (the same operations
/// in the same order per block, one compare per codeword and no horizontal reduction per
/// block: about 0.6 of the time of one [`nearest`] per block); elsewhere, block by block.
/// Codebook refinement's search, and the encoder's above 4,096 codewords.
pub fn nearest_blocks(
    columns: &[f32],
    norms: &[f32],
    stride: usize,
    k: usize,
    blocks: &[f32],
    out: &mut [u16],
) {
    assert!(k > 0 && blocks.len() == k * out.len());
    #[cfg(target_arch = "x86_64")]
    {
        if k <= 8 && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY (each arm): the CPU supports AVX-512F, checked on the line above.
            return match k {
                1 => unsafe {
                    x86::nearest_blocks_avx512::<1>(columns, norms, stride, k, blocks, out)
                },
                2 => unsafe {
                    x86::nearest_blocks_avx512::<2>(columns, norms, stride, k, blocks, out)
                },
                3 => unsafe {
                    x86::nearest_blocks_avx512::<3>(columns, norms, stride, k, blocks, out)
                },
                4 => unsafe {
                    x86::nearest_blocks_avx512::<4>(columns, norms, stride, k, blocks, out)
                },
                _ => unsafe {
                    x86::nearest_blocks_avx512::<0>(columns, norms, stride, k, blocks, out)
                },
            };
        }
    }
    for (index, block) in out.iter_mut().zip(blocks.chunks_exact(k)) {
        *index = nearest(columns, norms, stride, block) as u16;
    }
}

/// The scalar reference of [`nearest`].
pub fn nearest_portable(columns: &[f32], norms: &[f32], stride: usize, x: &[f32]) -> usize {
    let mut best = (f32::INFINITY, 0usize);
    for (i, norm) in norms.iter().enumerate().take(stride) {
        let mut score = *norm;
        for (j, xj) in x.iter().enumerate() {
            score -= (2.0 * xj) * columns[j * stride + i];
        }
        if score < best.0 {
            best = (score, i);
        }
    }
    best.1
}

/// Picks the smallest score over lanes, the smaller index on ties.
fn reduce(scores: &[f32], indices: &[u32]) -> usize {
    let mut best = (f32::INFINITY, 0u32);
    for (s, i) in scores.iter().zip(indices) {
        if *s < best.0 || (*s == best.0 && *i < best.1) {
            best = (*s, *i);
        }
    }
    best.1 as usize
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{reduce, LANES};

    /// Independent minimum trackers per register of blocks in [`nearest_blocks_avx512`].
    const CHAINS: usize = 4;

    /// Sixteen codewords per step; `K` = k specializes the common block sizes (0: any k).
    /// Each lane keeps its first strict minimum, so indices within a lane stay the first
    /// ones; `reduce` breaks ties across lanes.
    #[target_feature(enable = "avx512f")]
    pub(super) fn nearest_avx512<const K: usize>(
        columns: &[f32],
        norms: &[f32],
        stride: usize,
        x: &[f32],
    ) -> usize {
        let k = if K == 0 { x.len() } else { K };
        assert!(x.len() == k && columns.len() >= stride * k && norms.len() >= stride);
        assert!(stride.is_multiple_of(LANES) && k <= 8);
        let mut twice = [_mm512_setzero_ps(); 8];
        for (t, xj) in twice.iter_mut().zip(x) {
            *t = _mm512_set1_ps(2.0 * xj);
        }
        let mut best = _mm512_set1_ps(f32::INFINITY);
        let mut best_index = _mm512_setzero_si512();
        let mut index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let step = _mm512_set1_epi32(LANES as i32);
        for base in (0..stride).step_by(LANES) {
            // SAFETY: base + 16 ≤ stride ≤ norms.len() and j·stride + base + 16 ≤ columns.len()
            // for j < k (asserted above), so every 16-float load is in bounds.
            let mut scores = unsafe { _mm512_loadu_ps(norms.as_ptr().add(base)) };
            for (j, t) in twice.iter().enumerate().take(k) {
                // SAFETY: in bounds, see above.
                let column = unsafe { _mm512_loadu_ps(columns.as_ptr().add(j * stride + base)) };
                scores = _mm512_sub_ps(scores, _mm512_mul_ps(*t, column));
            }
            let better = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(scores, best);
            best = _mm512_mask_mov_ps(best, better, scores);
            best_index = _mm512_mask_mov_epi32(best_index, better, index);
            index = _mm512_add_epi32(index, step);
        }
        // the smallest score, then the smallest index among the lanes that hold it
        let min = _mm512_reduce_min_ps(best);
        let holds = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(best, _mm512_set1_ps(min));
        if holds == 0 {
            return 0; // all scores infinite: x was not finite
        }
        let candidates = _mm512_mask_mov_epi32(_mm512_set1_epi32(-1), holds, best_index);
        _mm512_reduce_min_epu32(candidates) as usize
    }

    /// [`super::nearest_blocks`] on AVX-512: sixteen blocks per register (one per lane), the
    /// codewords in turn; each lane computes its block's scores as [`nearest_avx512`] does (in
    /// codeword order, multiply then subtract in j order) and keeps its first strict minimum,
    /// which is the first index of the minimum. `K` = k specializes the common block sizes
    /// (0: any k up to 8).
    #[target_feature(enable = "avx512f")]
    pub(super) fn nearest_blocks_avx512<const K: usize>(
        columns: &[f32],
        norms: &[f32],
        stride: usize,
        k: usize,
        blocks: &[f32],
        out: &mut [u16],
    ) {
        let k = if K == 0 { k } else { K };
        assert!(k <= 8 && columns.len() >= stride * k && norms.len() >= stride);
        assert!(stride.is_multiple_of(LANES) && blocks.len() == k * out.len());
        for (group, out) in blocks.chunks(LANES * k).zip(out.chunks_mut(LANES)) {
            // coordinate j of the group's blocks, doubled, one block per lane
            let mut lanes = [[0f32; LANES]; 8];
            for (b, block) in group.chunks_exact(k).enumerate() {
                for (j, x) in block.iter().enumerate() {
                    lanes[j][b] = 2.0 * x;
                }
            }
            // SAFETY: each row of `lanes` holds 16 floats.
            let twice: [__m512; 8] =
                std::array::from_fn(|j| unsafe { _mm512_loadu_ps(lanes[j].as_ptr()) });
            // four trackers (codewords i mod 4), so that consecutive codewords' compares do
            // not wait on each other; each keeps its first strict minimum
            let mut best = [_mm512_set1_ps(f32::INFINITY); CHAINS];
            let mut best_index = [_mm512_setzero_si512(); CHAINS];
            // the trackers' codeword indices, in every lane (a vector add per step rather than
            // a broadcast from a general register per codeword)
            let mut indices: [__m512i; CHAINS] =
                std::array::from_fn(|r| _mm512_set1_epi32(r as i32));
            let step = _mm512_set1_epi32(CHAINS as i32);
            for base in (0..stride).step_by(CHAINS) {
                for (r, ((best, best_index), index)) in best
                    .iter_mut()
                    .zip(&mut best_index)
                    .zip(&mut indices)
                    .enumerate()
                {
                    let i = base + r;
                    // SAFETY: i < stride ≤ norms.len() (stride is a multiple of 16) and
                    // j·stride + i < columns.len() for j < k (asserted above).
                    let mut scores = _mm512_set1_ps(unsafe { *norms.get_unchecked(i) });
                    for (j, t) in twice.iter().take(k).enumerate() {
                        // SAFETY: in bounds, see above.
                        let c = unsafe { *columns.get_unchecked(j * stride + i) };
                        scores = _mm512_sub_ps(scores, _mm512_mul_ps(*t, _mm512_set1_ps(c)));
                    }
                    let better = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(scores, *best);
                    *best = _mm512_mask_mov_ps(*best, better, scores);
                    *best_index = _mm512_mask_mov_epi32(*best_index, better, *index);
                    *index = _mm512_add_epi32(*index, step);
                }
            }
            // per lane the smallest score, the smallest index among trackers that hold it
            let (mut score, mut index) = (best[0], best_index[0]);
            for (s, i) in best.into_iter().zip(best_index).skip(1) {
                let lower = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(s, score);
                let tie =
                    _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(s, score) & _mm512_cmplt_epu32_mask(i, index);
                score = _mm512_mask_mov_ps(score, lower | tie, s);
                index = _mm512_mask_mov_epi32(index, lower | tie, i);
            }
            let best_index = index;
            let mut indices = [0u32; LANES];
            // SAFETY: 16 u32 written to a local array.
            unsafe { _mm512_storeu_si512(indices.as_mut_ptr().cast(), best_index) };
            for (o, i) in out.iter_mut().zip(indices) {
                *o = i as u16;
            }
        }
    }

    /// Eight codewords per step (AVX), otherwise as [`nearest_avx512`].
    #[target_feature(enable = "avx")]
    pub(super) fn nearest_avx(columns: &[f32], norms: &[f32], stride: usize, x: &[f32]) -> usize {
        let k = x.len();
        assert!(columns.len() >= stride * k && norms.len() >= stride && stride.is_multiple_of(8));
        let mut best = _mm256_set1_ps(f32::INFINITY);
        let mut best_index = _mm256_setzero_ps();
        // indices are carried as f32 (exact below 2^24, far above any codebook size)
        let mut index = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
        let step = _mm256_set1_ps(8.0);
        for base in (0..stride).step_by(8) {
            // SAFETY: base + 8 ≤ stride ≤ norms.len() and j·stride + base + 8 ≤ columns.len()
            // (asserted above), so every 8-float load is in bounds.
            let mut scores = unsafe { _mm256_loadu_ps(norms.as_ptr().add(base)) };
            for (j, xj) in x.iter().enumerate() {
                let twice = _mm256_set1_ps(2.0 * xj);
                // SAFETY: in bounds, see above.
                let column = unsafe { _mm256_loadu_ps(columns.as_ptr().add(j * stride + base)) };
                scores = _mm256_sub_ps(scores, _mm256_mul_ps(twice, column));
            }
            let better = _mm256_cmp_ps::<_CMP_LT_OQ>(scores, best);
            best = _mm256_blendv_ps(best, scores, better);
            best_index = _mm256_blendv_ps(best_index, index, better);
            index = _mm256_add_ps(index, step);
        }
        let mut scores = [0f32; 8];
        let mut lanes = [0f32; 8];
        // SAFETY: both arrays hold exactly 8 lanes.
        unsafe {
            _mm256_storeu_ps(scores.as_mut_ptr(), best);
            _mm256_storeu_ps(lanes.as_mut_ptr(), best_index);
        }
        let indices = lanes.map(|v| v as u32);
        reduce(&scores, &indices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_returns_the_first_minimum() {
        // 40 codewords padded to 48, with exact ties planted: codewords 3 and 37 are equal
        let (k, n, stride) = (2usize, 40usize, 48usize);
        let mut columns = vec![0f32; k * stride];
        let mut norms = vec![f32::INFINITY; stride];
        for i in 0..n {
            let c = if i == 3 || i == 37 {
                [0.25, -0.5]
            } else {
                [
                    ((i * 7) % 13) as f32 / 13.0 - 0.5,
                    ((i * 5) % 11) as f32 / 11.0 - 0.5,
                ]
            };
            columns[i] = c[0];
            columns[stride + i] = c[1];
            norms[i] = c[0] * c[0] + c[1] * c[1];
        }
        #[cfg(target_arch = "x86_64")]
        println!(
            "dispatched search and portable loop run; the AVX loop {}",
            if std::arch::is_x86_feature_detected!("avx") {
                "too"
            } else {
                "not (no AVX on this CPU)"
            }
        );
        for x in [[0.25f32, -0.5], [0.0, 0.0], [0.9, 0.9], [-0.3, 0.1]] {
            let want = nearest_portable(&columns, &norms, stride, &x);
            assert_eq!(nearest(&columns, &norms, stride, &x), want);
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx") {
                // SAFETY: AVX is present (checked).
                assert_eq!(
                    unsafe { x86::nearest_avx(&columns, &norms, stride, &x) },
                    want
                );
            }
        }
        assert_eq!(nearest(&columns, &norms, stride, &[0.25, -0.5]), 3);
    }

    /// Random codebooks of k = 1 … 6 (padded), with planted duplicate codewords, and block
    /// counts that are and are not multiples of 16: the blocks searched together get the
    /// index the portable loop gives each.
    #[test]
    fn blocks_searched_together_get_the_first_minimum_of_each() {
        #[cfg(target_arch = "x86_64")]
        println!(
            "blocks_searched_together: {}",
            if std::arch::is_x86_feature_detected!("avx512f") {
                "the AVX-512 lanes ran"
            } else {
                "no AVX-512 on this CPU: block by block"
            }
        );
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        for k in 1..=6 {
            let (n, stride) = (100usize, 112usize);
            let mut columns = vec![0f32; k * stride];
            let mut norms = vec![f32::INFINITY; stride];
            for i in 0..n {
                // codeword 70 repeats codeword 7: ties go to 7
                let source = if i == 70 { 7 } else { i };
                let mut norm = 0.0;
                for j in 0..k {
                    let c = if source == i {
                        next()
                    } else {
                        columns[j * stride + source]
                    };
                    columns[j * stride + i] = c;
                    norm += c * c;
                }
                norms[i] = norm;
            }
            for count in [1, 16, 21, 48] {
                let mut blocks: Vec<f32> = (0..count * k).map(|_| next()).collect();
                // one block exactly on the duplicated codeword
                for j in 0..k {
                    blocks[j] = columns[j * stride + 7];
                }
                let mut out = vec![0u16; count];
                nearest_blocks(&columns, &norms, stride, k, &blocks, &mut out);
                for (b, block) in blocks.chunks_exact(k).enumerate() {
                    let want = nearest_portable(&columns, &norms, stride, block);
                    assert_eq!(out[b] as usize, want, "k {k}, {count} blocks, block {b}");
                }
                assert_eq!(out[0], 7, "k {k}: the first of two equal codewords");
            }
        }
    }
}
