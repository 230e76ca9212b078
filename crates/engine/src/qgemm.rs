//! Weight matrix products for the model's linear layers, fast for one row and for a batch: the
//! 8-bit layout here, the file's Q4_1 blocks in [`Q4Weights`], and for both one loop per SIMD
//! level: AVX-512 VNNI (`tiles`), AVX2 (`tiles_avx2`), and the layouts' scalar twins.
//!
//! 8-bit weights are quantized per 32-element block to i8 with an f32 scale, then repacked so
//! that each 32-bit lane of a 512-bit register belongs to a different output column:
//!
//! ```text
//!  group g = columns 16g .. 16g+15, block b = inputs 32b .. 32b+31
//!  [g][b][t = 0..8][lane = column 0..16][4 bytes: inputs 32b+4t .. 32b+4t+3]   (512 bytes)
//!  scales [g][b][lane]                                                         (16 × f32)
//! ```
//!
//! Activations are quantized per row and block the same way. One `vpdpbusd` (AVX-512 VNNI) then
//! adds 4 products for 16 columns at once; 8 of them give the block's integer dot product for 16
//! columns, scaled and accumulated in f32 (AVX2: `vpmaddubsw` and `vpmaddwd` on each half of 8
//! columns). A group's weights are loaded once per block and tile of rows and reused for every
//! row of the tile, so batched decode costs little more than one row.
//!
//! Every (row, column) goes through the same operations in the same order whatever the batch size
//! and whichever path runs, so a sequence's logits do not depend on what it is batched with, and
//! the scalar twin gives bit-identical results (tested).

use rayon::prelude::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{__m256, __m256i, __m512, __m512i};

mod activations;
mod q4_1;
#[cfg(target_arch = "x86_64")]
mod tiles;
#[cfg(target_arch = "x86_64")]
mod tiles_avx2;
use activations::quantize_block;
pub use activations::QActivations;
pub use q4_1::Q4Weights;

/// Runs `tile::<W, T>(w, g, x, dst, row)` (which returns `T`) over the rows of `x` in tiles of
/// the sizes listed and then of 1, largest first: a tile's sums stay in registers, and a
/// block's weights are loaded once per tile. For the SIMD levels' `group` functions only, after
/// their checks (`check_group`, `assert_fits`) and under their target features: the tile
/// functions' contract.
#[cfg(target_arch = "x86_64")]
macro_rules! by_row_tiles {
    ($tile:ident::<$w:ty>($weights:expr, $g:expr, $x:expr, $dst:expr), [$($size:literal),+]) => {{
        // the arguments evaluated outside the unsafe block below
        let (weights, g, x, dst) = ($weights, $g, $x, $dst);
        let mut row = 0;
        while row < x.rows {
            // SAFETY (each): the enclosing `group` has the features and asserted the lengths;
            // rows row .. row + T exist (T ≤ rows − row).
            row += unsafe {
                match x.rows - row {
                    $(left if left >= $size => $tile::<$w, $size>(weights, g, x, dst, row),)+
                    _ => $tile::<$w, 1>(weights, g, x, dst, row),
                }
            };
        }
    }};
}
#[cfg(target_arch = "x86_64")]
use by_row_tiles;

/// Inputs per quantization block.
const BLOCK: usize = 32;
/// Output columns per group (lanes of a 512-bit register).
const LANES: usize = 16;

/// A weight matrix `[n outputs × k inputs]` in the repacked 8-bit layout.
#[derive(Debug, Clone)]
pub struct QWeights {
    n: usize,
    k: usize,
    /// Weight + 128 as u8 (VNNI multiplies unsigned × signed); see the module diagram.
    packed: Vec<u8>,
    scales: Vec<f32>,
}

/// Shape errors of the kernels' entry points.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShapeError {
    /// [`QWeights::new`], [`Q4Weights::from_q4_1`]: a matrix the kernels cannot tile.
    #[error("weight matrix {n}×{k}: outputs must be a multiple of 16 and inputs of 32")]
    Weights {
        /// Outputs.
        n: usize,
        /// Inputs.
        k: usize,
    },
    /// [`QActivations::quantize`]: rows that are not `rows × k` with `k` a multiple of 32.
    #[error("activations of {len} values as {rows} rows × {k}: k must be a multiple of 32")]
    Activations {
        /// Rows given.
        rows: usize,
        /// Width given.
        k: usize,
        /// Values given.
        len: usize,
    },
    /// [`Q4Weights::from_q4_1`]: data of another length than the matrix's blocks.
    #[error("Q4_1 data of {got} bytes where the matrix's blocks take {expected}")]
    Data {
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// [`QWeights::matmul`] and the other products: activations of another width than the
    /// weights' inputs, or gate and up matrices of different outputs.
    #[error("activations of width {activations} for weights of {weights} inputs")]
    Mismatch {
        /// The weights' inputs.
        weights: usize,
        /// The activations' width.
        activations: usize,
    },
}

impl QWeights {
    /// Quantizes a row-major f32 matrix of `n` rows (outputs) by `k` columns (inputs).
    pub fn new(weights: &[f32], n: usize, k: usize) -> Result<Self, ShapeError> {
        if n == 0
            || k == 0
            || !n.is_multiple_of(LANES)
            || !k.is_multiple_of(BLOCK)
            || n.checked_mul(k) != Some(weights.len())
        {
            return Err(ShapeError::Weights { n, k });
        }
        let blocks = k / BLOCK;
        let groups = n / LANES;
        let mut packed = vec![0u8; n * k];
        let mut scales = vec![0f32; groups * blocks * LANES];
        let mut q = [0i8; BLOCK];
        for col in 0..n {
            let (g, lane) = (col / LANES, col % LANES);
            for b in 0..blocks {
                let (scale, _) = quantize_block(
                    &weights[col * k + b * BLOCK..col * k + (b + 1) * BLOCK],
                    &mut q,
                );
                scales[(g * blocks + b) * LANES + lane] = scale;
                for t in 0..BLOCK / 4 {
                    for byte in 0..4 {
                        let dst = (((g * blocks + b) * 8 + t) * LANES + lane) * 4 + byte;
                        packed[dst] = (q[t * 4 + byte] as i16 + 128) as u8;
                    }
                }
            }
        }
        Ok(Self {
            n,
            k,
            packed,
            scales,
        })
    }

    /// Output size.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Input size.
    pub fn k(&self) -> usize {
        self.k
    }

    /// `out[r][c] = Σ_i x[r][i] · w[c][i]` for the quantized rows of `x`; `out` is `rows × n`.
    pub fn matmul(&self, x: &QActivations, out: &mut Vec<f32>) -> Result<(), ShapeError> {
        matmul_many(&[self], x, std::slice::from_mut(out))
    }

    /// The scalar twin of the SIMD kernel: the same integer sums, and per (row, column) the same
    /// f32 operations in the same order (scale product, then one fused multiply-add per block).
    fn group_scalar(&self, g: usize, x: &QActivations, dst: &mut [f32]) {
        assert_eq!(x.k, self.k, "activations as wide as the inputs");
        let blocks = self.k / BLOCK;
        for r in 0..x.rows {
            for lane in 0..LANES {
                let mut acc = 0f32;
                for b in 0..blocks {
                    let xq = &x.q[r * self.k + b * BLOCK..r * self.k + (b + 1) * BLOCK];
                    let mut dot = 0i32;
                    for t in 0..BLOCK / 4 {
                        for byte in 0..4 {
                            let w =
                                self.packed[(((g * blocks + b) * 8 + t) * LANES + lane) * 4 + byte];
                            dot += w as i32 * xq[t * 4 + byte] as i32;
                        }
                    }
                    dot -= 128 * x.sum[r * blocks + b];
                    let s = self.scales[(g * blocks + b) * LANES + lane] * x.scale[r * blocks + b];
                    acc = (dot as f32).mul_add(s, acc);
                }
                dst[r * LANES + lane] = acc;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
// SAFETY: `check_group` asserts the group's weights and scales exist; `registers` reads no more.
unsafe impl tiles::Layout for QWeights {
    /// The block's 16 weight scales.
    type Params = __m512;

    fn inputs(&self) -> usize {
        self.k
    }

    fn check_group(&self, g: usize) {
        let blocks = self.k / BLOCK;
        assert!(self.packed.len() >= (g + 1) * blocks * BLOCK * LANES);
        assert!(self.scales.len() >= (g + 1) * blocks * LANES);
    }

    #[inline(always)]
    unsafe fn registers(&self, g: usize, b: usize) -> ([__m512i; 8], Self::Params) {
        use std::arch::x86_64::*;
        let at = (g * self.k / BLOCK + b) * BLOCK * LANES;
        // SAFETY: (g, b)'s 512 bytes and 16 scales lie inside the arrays (checked group,
        // b < blocks: the caller's contract).
        unsafe {
            let base = self.packed.as_ptr().add(at);
            (
                std::array::from_fn(|t| _mm512_loadu_si512(base.add(64 * t).cast())),
                _mm512_loadu_ps(self.scales.as_ptr().add(at / BLOCK)),
            )
        }
    }

    #[inline(always)]
    unsafe fn accumulate(
        acc: __m512,
        dot: __m512i,
        wscale: Self::Params,
        s: f32,
        sum: i32,
    ) -> __m512 {
        use std::arch::x86_64::*;
        // SAFETY: AVX-512F present (the caller's contract).
        unsafe {
            // the weights carry +128: Σ (w + 128)·x − 128·Σx
            let dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(128 * sum));
            let s = _mm512_mul_ps(wscale, _mm512_set1_ps(s));
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc)
        }
    }
}

#[cfg(target_arch = "x86_64")]
// SAFETY: as the AVX-512 layout: `check_group` asserts the group's weights and scales exist.
unsafe impl tiles_avx2::Avx2Layout for QWeights {
    /// The 8 columns' weight scales.
    type Params = __m256;

    fn inputs(&self) -> usize {
        self.k
    }

    fn check_group(&self, g: usize) {
        tiles::Layout::check_group(self, g);
    }

    #[inline(always)]
    unsafe fn params(&self, g: usize, b: usize, h: usize) -> __m256 {
        let at = (g * self.k / BLOCK + b) * LANES + 8 * h;
        // SAFETY: the (group, block)'s scales lie inside `scales` (the caller's contract).
        unsafe { std::arch::x86_64::_mm256_loadu_ps(self.scales.as_ptr().add(at)) }
    }

    /// The weights as signed bytes (the stored +128 flipped back).
    #[inline(always)]
    unsafe fn register(&self, g: usize, b: usize, t: usize, h: usize) -> __m256i {
        use std::arch::x86_64::*;
        let at = (g * self.k / BLOCK + b) * BLOCK * LANES + 64 * t + 32 * h;
        // SAFETY: 32 of the (group, block)'s 512 bytes (the caller's contract); AVX2 present.
        unsafe {
            let bytes = _mm256_loadu_si256(self.packed.as_ptr().add(at).cast());
            _mm256_xor_si256(bytes, _mm256_set1_epi8(-128))
        }
    }

    /// `Σ w·x` as `Σ |x| · (w·sign x)`: `vpmaddubsw` takes the unsigned |x| and the signed
    /// weights, which are never −128 (quantized to ±127, so `w·sign x` cannot overflow), so a
    /// pair is at most 2·128·127 and does not saturate. The scalar twin's
    /// `Σ (w + 128)·x − 128·Σx` is the same integer.
    #[inline(always)]
    unsafe fn dot(w: __m256i, x: __m256i) -> __m256i {
        use std::arch::x86_64::*;
        // SAFETY: AVX2 present (the caller's contract).
        unsafe {
            let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(w, x));
            _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
        }
    }

    /// `dot` is already offset-free (see [`Self::dot`]): the code sum is not needed.
    #[inline(always)]
    unsafe fn accumulate(acc: __m256, dot: __m256i, wscale: __m256, s: f32, _sum: i32) -> __m256 {
        use std::arch::x86_64::*;
        // SAFETY: AVX2 and FMA present (the caller's contract).
        unsafe {
            let s = _mm256_mul_ps(wscale, _mm256_set1_ps(s));
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc)
        }
    }
}

/// A weight matrix in one of the kernels' layouts, its outputs in groups of 16 columns.
pub(crate) trait GroupedWeights: Sync {
    /// Outputs.
    fn n(&self) -> usize;
    /// Inputs.
    fn k(&self) -> usize;
    /// Group `g`'s 16 outputs for every row of `x` into `dst` (`rows × 16`), by `kernel`
    /// (one this CPU runs: panics otherwise).
    fn group(&self, g: usize, x: &QActivations, dst: &mut [f32], kernel: Kernel);
}

/// Runs group `g` by `kernel`'s SIMD loop; false for the scalar kernel, whose twin the layout
/// runs itself.
#[cfg(target_arch = "x86_64")]
fn simd_group<W: tiles::Layout + tiles_avx2::Avx2Layout>(
    w: &W,
    g: usize,
    x: &QActivations,
    dst: &mut [f32],
    kernel: Kernel,
) -> bool {
    assert!(
        kernel.runs_here(),
        "{kernel:?} kernels on a CPU without them"
    );
    match kernel {
        // SAFETY: `runs_here` checked the features.
        Kernel::Avx512Vnni => unsafe { tiles::group(w, g, x, dst) },
        // SAFETY: as above.
        Kernel::Avx2 => unsafe { tiles_avx2::group(w, g, x, dst) },
        Kernel::Scalar => return false,
    }
    true
}

/// No SIMD loop off x86-64: the layout runs its scalar twin.
#[cfg(not(target_arch = "x86_64"))]
fn simd_group<W>(_: &W, _: usize, _: &QActivations, _: &mut [f32], _: Kernel) -> bool {
    false
}

impl GroupedWeights for QWeights {
    fn n(&self) -> usize {
        self.n
    }
    fn k(&self) -> usize {
        self.k
    }
    fn group(&self, g: usize, x: &QActivations, dst: &mut [f32], kernel: Kernel) {
        if !simd_group(self, g, x, dst, kernel) {
            self.group_scalar(g, x, dst);
        }
    }
}

/// `outs[i] = x · ws[i]ᵀ` for matrices of the same input width, in one parallel pass over the
/// groups of all of them: one fork and join for the q, k and v projections rather than three,
/// and the small k and v matrices no longer leave a thread idle on their own.
pub(crate) fn matmul_many(
    ws: &[&dyn GroupedWeights],
    x: &QActivations,
    outs: &mut [Vec<f32>],
) -> Result<(), ShapeError> {
    assert_eq!(ws.len(), outs.len(), "one output per matrix");
    if let Some(w) = ws.iter().find(|w| w.k() != x.k) {
        return Err(ShapeError::Mismatch {
            weights: w.k(),
            activations: x.k,
        });
    }
    let rows = x.rows;
    if rows == 0 {
        outs.iter_mut().for_each(Vec::clear);
        return Ok(());
    }
    // (matrix, group) of every group, matrices one after another
    let work: Vec<(usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(i, w)| (0..w.n() / LANES).map(move |g| (i, g)))
        .collect();
    // per-group results [matrix][g][row][lane], then scattered to row-major
    let mut by_group = vec![0f32; work.len() * rows * LANES];
    let kernel = Kernel::detected();
    by_group
        .par_chunks_mut(rows * LANES)
        .zip(work.par_iter())
        // a group of one row is well under a microsecond: tasks of fewer cost more to hand out
        .with_min_len(4)
        .for_each(|(dst, (i, g))| ws[*i].group(*g, x, dst, kernel));
    let mut groups = by_group.chunks_exact(rows * LANES);
    for (w, out) in ws.iter().zip(outs.iter_mut()) {
        let n = w.n();
        out.clear();
        out.resize(rows * n, 0.0);
        for g in 0..n / LANES {
            let group = groups.next().expect("a result per group of every matrix");
            for (r, src) in group.chunks_exact(LANES).enumerate() {
                out[r * n + g * LANES..][..LANES].copy_from_slice(src);
            }
        }
    }
    Ok(())
}

/// SwiGLU's hidden layer `silu(x·gateᵀ) ⊙ (x·upᵀ)` in one parallel pass: the thread that
/// makes a group's gate and up outputs combines them, so the exponentials are spread over the
/// threads instead of following the products on one. Each element is computed as the model's
/// plain loop would (`u · (g / (1 + e^−g))`).
pub(crate) fn swiglu(
    gate: &dyn GroupedWeights,
    up: &dyn GroupedWeights,
    x: &QActivations,
    out: &mut Vec<f32>,
) -> Result<(), ShapeError> {
    if let Some(w) = [gate, up].into_iter().find(|w| w.k() != x.k) {
        return Err(ShapeError::Mismatch {
            weights: w.k(),
            activations: x.k,
        });
    }
    if gate.n() != up.n() {
        return Err(ShapeError::Mismatch {
            weights: gate.n(),
            activations: up.n(),
        });
    }
    let (rows, n) = (x.rows, gate.n());
    out.clear();
    out.resize(rows * n, 0.0);
    if rows == 0 {
        return Ok(());
    }
    // per group: its gate outputs (combined in place), then its up outputs
    let mut by_group = vec![0f32; n / LANES * 2 * rows * LANES];
    let kernel = Kernel::detected();
    by_group
        .par_chunks_mut(2 * rows * LANES)
        .enumerate()
        // each task computes two matrices' groups and their exponentials
        .with_min_len(2)
        .for_each(|(group, dst)| {
            let (gates, ups) = dst.split_at_mut(rows * LANES);
            gate.group(group, x, gates, kernel);
            up.group(group, x, ups, kernel);
            for (g, u) in gates.iter_mut().zip(ups.iter()) {
                *g = u * (*g / (1.0 + (-*g).exp()));
            }
        });
    for (g, group) in by_group.chunks_exact(2 * rows * LANES).enumerate() {
        for (r, src) in group[..rows * LANES].chunks_exact(LANES).enumerate() {
            out[r * n + g * LANES..][..LANES].copy_from_slice(src);
        }
    }
    Ok(())
}

/// Which kernels the products run, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// AVX-512F, BW, VNNI and F16C: `vpdpbusd` on 16 columns (`tiles`).
    Avx512Vnni,
    /// AVX2, FMA and F16C: `vpmaddubsw` on two halves of 8 columns (`tiles_avx2`).
    Avx2,
    /// The scalar twins.
    Scalar,
}

impl Kernel {
    /// Whether this CPU runs the kernel (detected once: it is asked on every group).
    pub(crate) fn runs_here(self) -> bool {
        static RUNS: std::sync::OnceLock<[bool; 3]> = std::sync::OnceLock::new();
        let runs = RUNS.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                [
                    has!("avx512f") && has!("avx512bw") && has!("avx512vnni") && has!("f16c"),
                    has!("avx2") && has!("fma") && has!("f16c"),
                    true,
                ]
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                [false, false, true]
            }
        });
        match self {
            Kernel::Avx512Vnni => runs[0],
            Kernel::Avx2 => runs[1],
            Kernel::Scalar => runs[2],
        }
    }

    /// Every kernel this CPU runs, fastest first (the tests run each).
    pub(crate) fn available() -> Vec<Kernel> {
        [Kernel::Avx512Vnni, Kernel::Avx2, Kernel::Scalar]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect()
    }

    /// The fastest kernel this CPU runs, or the scalar twins under `PAGEDKV_FORCE_SCALAR`:
    /// looked up once, not on every product.
    pub(crate) fn detected() -> Kernel {
        static DETECTED: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            if std::env::var_os("PAGEDKV_FORCE_SCALAR").is_some() {
                Kernel::Scalar
            } else {
                Kernel::available()[0]
            }
        })
    }
}

/// Whether the products run the AVX-512 VNNI kernels on this machine.
pub fn vnni_available() -> bool {
    Kernel::detected() == Kernel::Avx512Vnni
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `len` values in ±2 from a seeded generator.
    pub(in crate::qgemm) fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn matches_f64_reference_within_quantization_error() {
        let (n, k, rows) = (48, 96, 5);
        let w = data(n * k, 1);
        let x = data(rows * k, 2);
        let qw = QWeights::new(&w, n, k).unwrap();
        let mut qa = QActivations::default();
        qa.quantize(&x, rows, k).unwrap();
        let mut out = Vec::new();
        qw.matmul(&qa, &mut out).unwrap();
        // two 8-bit roundings per product: ≤ 1% of Σ|x·w| (values in ±2)
        within_the_f64_reference(&out, &x, &w, (rows, n, k), 0.01);
    }

    #[test]
    fn simd_and_scalar_are_bit_identical_and_rows_independent() {
        // 15 rows: tiles of 8, 4, 2 and 1
        const ROWS: usize = 15;
        let (n, k) = (64, 128);
        let w = QWeights::new(&data(n * k, 3), n, k).unwrap();
        bit_identical_on_every_kernel_and_row_by_row(&w, &data(ROWS * k, 4), ROWS, "8-bit");
    }

    /// Quantizes `rows` rows of `x` as a batch and asserts, for every group of `w`, that every
    /// SIMD kernel this CPU has gives the scalar twin's bits (saying which ran), and that each
    /// row alone gives exactly its row of the batch.
    pub(in crate::qgemm) fn bit_identical_on_every_kernel_and_row_by_row(
        w: &dyn GroupedWeights,
        x: &[f32],
        rows: usize,
        layout: &str,
    ) {
        let (n, k) = (w.n(), w.k());
        let mut batch = QActivations::default();
        batch.quantize(x, rows, k).unwrap();
        let kernels: Vec<Kernel> = Kernel::available()
            .into_iter()
            .filter(|k| *k != Kernel::Scalar)
            .collect();
        println!("{layout} layout: {kernels:?} compared with the scalar twin");
        for g in 0..n / LANES {
            let mut scalar = vec![0f32; rows * LANES];
            w.group(g, &batch, &mut scalar, Kernel::Scalar);
            for &kernel in &kernels {
                let mut out = vec![0f32; rows * LANES];
                w.group(g, &batch, &mut out, kernel);
                assert_eq!(scalar, out, "{layout}: {kernel:?}, group {g}");
            }
        }
        let mut all = [Vec::new()];
        matmul_many(&[w], &batch, &mut all).unwrap();
        for r in 0..rows {
            let mut one = QActivations::default();
            one.quantize(&x[r * k..(r + 1) * k], 1, k).unwrap();
            let mut out = [Vec::new()];
            matmul_many(&[w], &one, &mut out).unwrap();
            assert_eq!(
                out[0],
                all[0][r * n..(r + 1) * n],
                "{layout}: row {r} alone"
            );
        }
    }

    /// Asserts `out` (`rows × n`) is `x · wᵀ` (`x`: rows × k, `w`: n × k) within `fraction` of
    /// `Σ|x·w|` per output, against an f64 reference.
    pub(in crate::qgemm) fn within_the_f64_reference(
        out: &[f32],
        x: &[f32],
        w: &[f32],
        (rows, n, k): (usize, usize, usize),
        fraction: f64,
    ) {
        for r in 0..rows {
            for c in 0..n {
                let (row, column) = (&x[r * k..(r + 1) * k], &w[c * k..(c + 1) * k]);
                let exact: f64 = row
                    .iter()
                    .zip(column)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                let bound = row
                    .iter()
                    .zip(column)
                    .map(|(a, b)| (a * b).abs() as f64)
                    .sum::<f64>()
                    * fraction;
                let got = out[r * n + c] as f64;
                assert!((got - exact).abs() <= bound, "({r},{c}): {got} vs {exact}");
            }
        }
    }

    #[test]
    fn swiglu_in_one_pass_is_the_products_then_the_element_wise_step() {
        let (n, k, rows) = (48, 64, 3);
        let gate = QWeights::new(&data(n * k, 11), n, k).unwrap();
        let up = QWeights::new(&data(n * k, 12), n, k).unwrap();
        let mut x = QActivations::default();
        x.quantize(&data(rows * k, 13), rows, k).unwrap();
        let mut products = [Vec::new(), Vec::new()];
        matmul_many(&[&gate, &up], &x, &mut products).unwrap();
        let [g, u] = products;
        let expected: Vec<f32> = u
            .iter()
            .zip(&g)
            .map(|(u, g)| u * (g / (1.0 + (-g).exp())))
            .collect();
        let mut fused = Vec::new();
        swiglu(&gate, &up, &x, &mut fused).unwrap();
        assert_eq!(fused, expected);
    }

    #[test]
    fn bad_shapes_are_rejected() {
        assert!(QWeights::new(&[0.0; 15 * 32], 15, 32).is_err());
        assert!(QWeights::new(&[0.0; 16 * 33], 16, 33).is_err());
        assert!(QWeights::new(&[0.0; 10], 16, 32).is_err());
        let mut acts = QActivations::default();
        assert_eq!(
            acts.quantize(&[0.0; 40], 1, 40),
            Err(ShapeError::Activations {
                rows: 1,
                k: 40,
                len: 40
            })
        );
        assert!(acts.quantize(&[0.0; 63], 2, 32).is_err());
        acts.quantize(&[0.0; 64], 1, 64).unwrap();
        let w = QWeights::new(&[0.0; 16 * 32], 16, 32).unwrap();
        assert_eq!(
            w.matmul(&acts, &mut Vec::new()),
            Err(ShapeError::Mismatch {
                weights: 32,
                activations: 64
            })
        );
    }
}
