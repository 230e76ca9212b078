//! Next-token sampling: greedy, or temperature with nucleus (top-p) filtering, from a seeded RNG
//! owned by each request (so results do not depend on how requests are batched).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{EngineError, Result};

/// How to pick the next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 for greedy; otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges: temperature ≥ 0 and finite, top_p in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(EngineError::InvalidArgument(format!(
                "temperature must be ≥ 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::InvalidArgument(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// A request's sampler: its parameters and RNG state.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    probs: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler; `stream` separates the RNG streams of requests sharing a seed.
    pub fn new(params: SamplingParams, stream: u64) -> Result<Self> {
        params.validate()?;
        let seed = params.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Ok(Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            probs: Vec::new(),
        })
    }

    /// Picks a token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.probs.clear();
        self.probs.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, l)| (i as u32, ((l - max) * inv_t).exp())),
        );
        let total: f32 = self.probs.iter().map(|p| p.1).sum();
        if self.params.top_p < 1.0 {
            self.probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
            let mut cumulative = 0.0;
            let keep = self
                .probs
                .iter()
                .position(|p| {
                    cumulative += p.1 / total;
                    cumulative >= self.params.top_p
                })
                .map_or(self.probs.len(), |i| i + 1);
            self.probs.truncate(keep);
        }
        let kept: f32 = self.probs.iter().map(|p| p.1).sum();
        let mut target = self.rng.random::<f32>() * kept;
        for (id, p) in &self.probs {
            target -= p;
            if target <= 0.0 {
                return *id;
            }
        }
        self.probs.last().map_or(0, |p| p.0)
    }
}

/// A sampled token's log-probability under the model (the raw logits, before temperature and
/// top-p), with the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the sampled token.
    pub logprob: f32,
    /// The `top` most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Log-probabilities of `token` and of the `top` most likely tokens in one row of logits.
pub fn token_logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| f64::from(l - max).exp()).sum();
    let log_norm = max + sum.ln() as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, l) in logits.iter().enumerate() {
            if best.len() == top && *l <= best[top - 1].1 {
                continue;
            }
            let at = best.partition_point(|b| b.1 >= *l);
            best.insert(at, (i as u32, *l));
            best.truncate(top);
        }
    }
    TokenLogprobs {
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |l| l - log_norm),
        top: best.into_iter().map(|(i, l)| (i, l - log_norm)).collect(),
    }
}

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, x) in logits.iter().enumerate() {
        if *x > best.1 {
            best = (i, *x);
        }
    }
    best.0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_normalized_and_ordered() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let lp = token_logprobs(&logits, 2, 3);
        let total: f32 = logits
            .iter()
            .map(|l| (l - 3.0 - (1f32.exp().recip() * 0.0)).exp())
            .sum();
        let expected = 2.0 - (3.0 + total.ln());
        assert!((lp.logprob - expected).abs() < 1e-6);
        // ties keep the lower id first; alternatives most likely first
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 3, 2]
        );
        assert!(token_logprobs(&logits, 9, 0).top.is_empty());
    }

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        let mut greedy = Sampler::new(SamplingParams::default(), 0).unwrap();
        assert_eq!(greedy.sample(&logits), 1);
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: 7,
        };
        let draws = |stream| {
            let mut s = Sampler::new(params, stream).unwrap();
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draws(3), draws(3));
        assert_ne!(draws(3), draws(4));
        // top_p small enough keeps only the best token
        let mut nucleus = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_p: 0.3,
                seed: 1,
            },
            0,
        )
        .unwrap();
        assert!((0..50).all(|_| nucleus.sample(&logits) == 1));
    }

    #[test]
    fn bad_parameters_are_errors() {
        for (t, p) in [(-1.0, 1.0), (f32::NAN, 1.0), (1.0, 0.0), (1.0, 1.5)] {
            assert!(Sampler::new(
                SamplingParams {
                    temperature: t,
                    top_p: p,
                    seed: 0
                },
                0
            )
            .is_err());
        }
    }
}
