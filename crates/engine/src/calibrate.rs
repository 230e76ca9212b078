//! Fitting a [`KeyNorm`] for FibQuant keys from a calibration text (DESIGN §6): the model runs
//! over a few windows of the text, and per (layer, kv head) the keys' pre-RoPE mean is taken.
//!
//! The default text, Jules Verne's *Around the World in Eighty Days* (Project Gutenberg #103,
//! public domain), is neither the default evaluation text nor the test text, so no codec is
//! scored on the text it was calibrated on.

use pagedkv::{Codec, KeyNorm, KeyNormFit, KvCacheManager, SeqId};

use crate::model::{BatchItem, LayerObserver, Logits, Model};
use crate::{GgufTokenizer, Result};

/// The built-in calibration text.
pub const DEFAULT_TEXT: &str = include_str!("../../../data/around-the-world-in-80-days.txt");

/// Tokens per calibration window.
pub const DEFAULT_WINDOW: usize = 512;
/// Windows of the default calibration (8,192 tokens, about 20 s for the norm and as much for the
/// key statistics). Against 4 windows, on windows of the calibration text past these: the 2.5-bit
/// assignment's KL 0.0365 → 0.0351 (+4.49% → +3.50% perplexity).
pub const DEFAULT_WINDOWS: usize = 16;

/// Fits the key normalization of `model`'s cache (blocks of `block_size`) on up to `windows`
/// windows of `window` tokens of `tokens`, skipping the first window (front matter, not prose).
pub fn fit_key_norm(
    model: &Model,
    tokens: &[u32],
    window: usize,
    windows: usize,
    block_size: usize,
) -> Result<KeyNorm> {
    crate::profile::key_norm_supported(model.config())?;
    let c = model.config();
    let mut fit = KeyNormFit::new(c.layers, c.kv_heads, c.head_dim, block_size, c.rope_base);
    let kv_width = c.kv_heads * c.head_dim;
    let mut failed = None;
    observe_windows(
        model,
        tokens,
        window,
        windows,
        block_size,
        &mut |layer, _, k| {
            for (pos, k) in k.chunks_exact(kv_width).enumerate() {
                if let Err(e) = fit.add(layer, pos, k) {
                    failed.get_or_insert(e);
                }
            }
        },
    )?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    Ok(fit.finish()?)
}

/// Runs `model` over up to `windows` windows of `window` tokens of `tokens` (the first skipped:
/// front matter, not prose), each on an empty f32 cache, showing every layer's queries and keys
/// to `observe`; returns the tokens seen.
fn observe_windows(
    model: &Model,
    tokens: &[u32],
    window: usize,
    windows: usize,
    block_size: usize,
    observe: &mut LayerObserver,
) -> Result<usize> {
    let layout = model
        .config()
        .kv_layout(Codec::F32, Codec::F32, block_size)?;
    let mut seen = 0;
    for text in tokens.chunks_exact(window).skip(1).take(windows) {
        let mut cache = KvCacheManager::new(layout.clone(), layout.blocks_for_tokens(window), b"")?;
        let seq = SeqId(0);
        cache.admit(seq, text)?;
        let batch = [BatchItem {
            seq,
            tokens: text,
            logits: Logits::None,
        }];
        model.forward_observed(&mut cache, &batch, observe)?;
        seen += text.len();
    }
    Ok(seen)
}

/// The normalization fitted on the built-in text with the default windows.
pub fn default_key_norm(
    model: &Model,
    tokenizer: &GgufTokenizer,
    block_size: usize,
) -> Result<KeyNorm> {
    let tokens = tokenizer.encode(DEFAULT_TEXT)?;
    fit_key_norm(model, &tokens, DEFAULT_WINDOW, DEFAULT_WINDOWS, block_size)
}

/// Per (layer, kv head, channel pair): the mean squared norm of the keys after the
/// [`KeyNorm`] and of the queries of the head's group, from a calibration text. A
/// [`pagedkv::KeySplit`] for any setting's codecs follows from them ([`Self::split`]).
#[derive(Debug, Clone)]
pub struct KeyStats {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    keys: Vec<f64>,
    queries: Vec<f64>,
}

impl KeyStats {
    /// The split whose plans meet, layer by layer, the bits of `key_codec(layer)` wherever it
    /// is a FibQuant codec of fewer than 4 index bits per coordinate ([`splits_pay`]); other
    /// layers keep their plain code.
    pub fn split(&self, key_codec: impl Fn(usize) -> Codec) -> Result<pagedkv::KeySplit> {
        let per_layer = self.kv_heads * self.head_dim / 2;
        let plans = (0..self.layers)
            .map(|layer| {
                let codec = key_codec(layer);
                if !splits_pay(codec) {
                    return Ok(None);
                }
                let span = layer * per_layer..(layer + 1) * per_layer;
                pagedkv::SplitPlan::fit(
                    codec,
                    self.head_dim,
                    &self.keys[span.clone()],
                    &self.queries[span],
                )
                .map(Some)
            })
            .collect::<pagedkv::Result<Vec<_>>>()?;
        Ok(pagedkv::KeySplit::new(self.kv_heads, self.head_dim, plans)?)
    }
}

/// Whether a key split is worth its codebooks under the key codec `codec`: a FibQuant codec of
/// fewer than 4 stored index bits per coordinate. Fine codebooks on 16-coordinate chunks lose to
/// one 64-wide code where bits are plentiful, while the ranking by query energy pays where they
/// are scarce (docs/quality.md, "Key split").
pub fn splits_pay(codec: Codec) -> bool {
    match codec {
        Codec::FibQuant { k, n } => fibquant::index_bits(n as usize) < 4 * k as u32,
        _ => false,
    }
}

/// Measures [`KeyStats`] of `model` on up to `windows` windows of `window` tokens of `tokens`
/// (the first skipped, as in [`fit_key_norm`]), keys taken after `norm`.
pub fn fit_key_stats(
    model: &Model,
    tokens: &[u32],
    window: usize,
    windows: usize,
    norm: &KeyNorm,
) -> Result<KeyStats> {
    let c = model.config();
    let (d, kv, heads) = (c.head_dim, c.kv_heads, c.heads);
    let pairs = d / 2;
    let (_, _, _, block_size) = norm.geometry();
    let mut keys = vec![0f64; c.layers * kv * pairs];
    let mut queries = vec![0f64; c.layers * kv * pairs];
    let mut shift = vec![0f32; d];
    let seen = observe_windows(
        model,
        tokens,
        window,
        windows,
        block_size,
        &mut |layer, q, k| {
            let at = |h: usize, i: usize| (layer * kv + h) * pairs + i;
            for (pos, row) in k.chunks_exact(kv * d).enumerate() {
                for h in 0..kv {
                    norm.shift(layer, h, pos, &mut shift);
                    let x = &row[h * d..(h + 1) * d];
                    for i in 0..pairs {
                        let a = (x[2 * i] - shift[2 * i]) as f64;
                        let b = (x[2 * i + 1] - shift[2 * i + 1]) as f64;
                        keys[at(h, i)] += a * a + b * b;
                    }
                }
            }
            for row in q.chunks_exact(heads * d) {
                for (g, x) in row.chunks_exact(d).enumerate() {
                    let h = g / (heads / kv);
                    for i in 0..pairs {
                        queries[at(h, i)] +=
                            (x[2 * i] * x[2 * i] + x[2 * i + 1] * x[2 * i + 1]) as f64;
                    }
                }
            }
        },
    )?;
    if seen == 0 {
        return Err(crate::EngineError::InvalidArgument(format!(
            "the calibration text has no window of {window} tokens after the first"
        )));
    }
    keys.iter_mut()
        .chain(queries.iter_mut())
        .for_each(|x| *x /= seen as f64);
    Ok(KeyStats {
        layers: c.layers,
        kv_heads: kv,
        head_dim: d,
        keys,
        queries,
    })
}

/// The key statistics on the built-in text with the default windows.
pub fn default_key_stats(
    model: &Model,
    tokenizer: &GgufTokenizer,
    norm: &KeyNorm,
) -> Result<KeyStats> {
    let tokens = tokenizer.encode(DEFAULT_TEXT)?;
    fit_key_stats(model, &tokens, DEFAULT_WINDOW, DEFAULT_WINDOWS, norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_key_codecs_below_four_bits_per_coordinate_are_split() {
        let codec = |s: &str| s.parse::<Codec>().unwrap();
        for (name, split) in [
            ("fibquant-k4n64", true),
            ("fibquant-k4n256", true),
            ("fibquant-k4n4096", true),
            ("fibquant-k2n256", false),
            ("fibquant-k2n1024", false),
            ("int4", false),
            ("f16", false),
        ] {
            assert_eq!(splits_pay(codec(name)), split, "{name}");
        }
        // two layers of 3 kv heads with skewed query energy: the 4-bit layer keeps its plain code
        let (layers, kv_heads, head_dim) = (2, 3, 64);
        let n = layers * kv_heads * head_dim / 2;
        let stats = KeyStats {
            layers,
            kv_heads,
            head_dim,
            keys: (0..n).map(|i| 1.0 + (i % 7) as f64).collect(),
            queries: (0..n).map(|i| 1.0 / (1 + i % 32) as f64).collect(),
        };
        let split = stats
            .split(|layer| codec(["fibquant-k4n256", "fibquant-k2n256"][layer]))
            .unwrap();
        assert!(split.plan(0).is_some());
        assert!(split.plan(1).is_none());
    }
}
