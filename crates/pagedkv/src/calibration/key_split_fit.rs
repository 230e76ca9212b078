//! Fitting a [`SplitPlan`]: ranking each head's channel pairs by key variance × query energy
//! and choosing each chunk's codebook under the layer's bit budget.

use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::codec::vector::quantizer;
use crate::codec::Codec;
use crate::error::{KvError, Result};
use crate::key_split::{chunk_bits, head_bits, SplitPlan, CHUNK, LADDER};

impl SplitPlan {
    /// The plan for one layer: `key_energy` and `query_energy` are per head and channel pair
    /// (`kv_heads × head_dim/2`): the mean squared norm of the (mean-free) key pair and of the
    /// query pair, over the queries of the head's group. The chunk codecs minimize the
    /// predicted logit error `Σ_c X_c·D(codec_c)` within the index bits of `for_codec` at this
    /// head_dim, where `X_c` sums `K_i·Q_i` over the ranks of chunk c (every head) and `D` is the
    /// codebook's relative error.
    pub fn fit(
        for_codec: Codec,
        head_dim: usize,
        key_energy: &[f64],
        query_energy: &[f64],
    ) -> Result<Self> {
        let pairs = head_dim / 2;
        let budget = head_bits(for_codec, head_dim).ok_or(KvError::UnsupportedCodec {
            codec: for_codec.to_string(),
            reason: "a key split replaces a FibQuant key codec",
        })?;
        if head_dim == 0 || !head_dim.is_multiple_of(CHUNK) || !head_dim.is_power_of_two() {
            return Err(KvError::InvalidKeyNorm(format!(
                "a key split needs a power-of-two head_dim, a multiple of {CHUNK} (got {head_dim})"
            )));
        }
        if key_energy.len() != query_energy.len()
            || key_energy.is_empty()
            || !key_energy.len().is_multiple_of(pairs)
        {
            return Err(KvError::ShapeMismatch {
                what: "pair energies",
                expected: query_energy.len().max(pairs),
                got: key_energy.len(),
            });
        }
        if !key_energy
            .iter()
            .chain(query_energy)
            .all(|x| x.is_finite() && *x >= 0.0)
        {
            return Err(KvError::NonFinite {
                what: "pair energies",
            });
        }
        let heads = key_energy.len() / pairs;
        let mut order = Vec::with_capacity(heads * head_dim);
        let mut scale = Vec::with_capacity(heads * head_dim);
        let chunk_count = head_dim / CHUNK;
        let mut weight = vec![0f64; chunk_count];
        for h in 0..heads {
            let k = &key_energy[h * pairs..(h + 1) * pairs];
            let q = &query_energy[h * pairs..(h + 1) * pairs];
            let mut ranked: Vec<usize> = (0..pairs).collect();
            ranked.sort_by(|a, b| (k[*b] * q[*b]).total_cmp(&(k[*a] * q[*a])).then(a.cmp(b)));
            let floor = k.iter().fold(0f64, |m, x| m.max(*x)) * 1e-8 + 1e-30;
            for (rank, &p) in ranked.iter().enumerate() {
                weight[2 * rank / CHUNK] += k[p] * q[p];
                let sigma = (k[p].max(floor) / 2.0).sqrt();
                for j in [2 * p, 2 * p + 1] {
                    order.push(j as u16);
                    scale.push((1.0 / sigma) as f32);
                }
            }
        }
        let errors: Vec<f64> = LADDER
            .iter()
            .map(|c| c.map_or(Ok(1.0), |c| relative_error(c, head_dim)))
            .collect::<Result<_>>()?;
        // exhaustive over the ladder per chunk (9^4 plans at head_dim 64)
        let mut best: Option<(f64, Vec<usize>)> = None;
        let mut pick = vec![0usize; chunk_count];
        loop {
            let bits: usize = pick.iter().map(|i| chunk_bits(LADDER[*i])).sum();
            if bits <= budget && pick.iter().any(|i| *i > 0) {
                let err: f64 = pick.iter().zip(&weight).map(|(i, w)| w * errors[*i]).sum();
                if best.as_ref().is_none_or(|(e, _)| err < *e) {
                    best = Some((err, pick.clone()));
                }
            }
            let mut c = 0;
            while c < chunk_count {
                pick[c] += 1;
                if pick[c] < LADDER.len() {
                    break;
                }
                pick[c] = 0;
                c += 1;
            }
            if c == chunk_count {
                break;
            }
        }
        let (_, pick) = best.ok_or(KvError::UnsupportedCodec {
            codec: for_codec.to_string(),
            reason: "too few bits for any key split",
        })?;
        Self::new(
            for_codec,
            head_dim,
            pick.iter().map(|i| LADDER[*i]).collect(),
            order,
            scale,
        )
    }
}

/// Relative squared error of `codec`'s codewords on the blocks of unit Gaussian directions at
/// `head_dim` (what a chunk's whitened, rotated coordinates look like), measured once.
fn relative_error(codec: Codec, head_dim: usize) -> Result<f64> {
    static CACHE: OnceLock<std::sync::Mutex<Vec<(Codec, usize, f64)>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(e) = cache
        .lock()
        .expect("cache lock")
        .iter()
        .find(|(c, d, _)| *c == codec && *d == head_dim)
    {
        return Ok(e.2);
    }
    let fq = quantizer(codec, head_dim)?;
    let k = fq.profile().k;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (mut err, mut total) = (0f64, 0f64);
    let mut x = vec![0f32; head_dim];
    for _ in 0..256 {
        x.iter_mut().for_each(|v| *v = gaussian(&mut rng) as f32);
        let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
        x.iter_mut().for_each(|v| *v /= norm);
        for block in x.chunks_exact(k) {
            let word = fq.codebook().word(fq.codebook().nearest(block));
            err += block
                .iter()
                .zip(word)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
        }
        total += 1.0;
    }
    let e = err / total;
    cache.lock().expect("cache lock").push((codec, head_dim, e));
    Ok(e)
}

pub(crate) fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    let u: f64 = rng.random::<f64>().max(1e-300);
    let v: f64 = rng.random();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}
