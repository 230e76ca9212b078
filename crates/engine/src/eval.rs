//! Codec quality on real text (DESIGN §9–10): perplexity, KL divergence to the f32 cache and
//! top-1 agreement, per codec setting.
//!
//! The text is cut into non-overlapping windows of `window` tokens. Each window is fed one
//! block (`block_size` tokens) per forward, so every earlier block is sealed — stored in the
//! codec — before later tokens attend to it, exactly as in generation; within a block, tokens
//! see the open block in full precision. The f32 cache on the same weights is the reference.

use pagedkv::{Codec, KvCacheManager, LayerOverride, LayerSet, SeqId};

use crate::error::{EngineError, Result};
use crate::model::{BatchItem, Logits, Model};
use crate::sampler::argmax;

/// Key and value codecs of one evaluated setting, optionally other codecs on some layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecPair {
    /// Codec of keys.
    pub key: Codec,
    /// Codec of values.
    pub value: Codec,
    /// Codecs used instead on sets of layers; the last set holding a layer applies to it.
    pub layer_overrides: Vec<LayerOverride>,
    /// Leading tokens of each window kept in f16 beside their sealed block (attention sinks).
    pub sinks: usize,
    /// Most recent tokens kept in full precision besides the open block.
    pub recent: usize,
    /// FibQuant keys normalized with the evaluation's calibrated [`pagedkv::KeyNorm`]
    /// (`+keynorm`).
    pub key_norm: bool,
    /// Normalized FibQuant keys with their bits allocated over channel pairs by the
    /// evaluation's calibrated [`crate::calibrate::KeyStats`] (`+keysplit`, implies `+keynorm`).
    pub key_split: bool,
}

impl CodecPair {
    /// The same codec for keys and values on every layer.
    pub fn same(codec: Codec) -> Self {
        Self {
            key: codec,
            value: codec,
            layer_overrides: Vec::new(),
            sinks: 0,
            recent: 0,
            key_norm: false,
            key_split: false,
        }
    }

    /// This setting with `key`/`value` on `layers` (over any earlier override there).
    pub fn with_override(mut self, layers: LayerSet, key: Codec, value: Codec) -> Self {
        self.layer_overrides.push(LayerOverride {
            layers,
            key_codec: key,
            value_codec: value,
        });
        self
    }
}

fn pair_name(key: Codec, value: Codec) -> String {
    if key == value {
        key.to_string()
    } else {
        format!("{key}/{value}")
    }
}

fn parse_pair(s: &str) -> pagedkv::Result<(Codec, Codec)> {
    match s.split_once('/') {
        Some((k, v)) => Ok((k.trim().parse()?, v.trim().parse()?)),
        None => {
            let c: Codec = s.trim().parse()?;
            Ok((c, c))
        }
    }
}

impl std::fmt::Display for CodecPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", pair_name(self.key, self.value))?;
        for o in &self.layer_overrides {
            write!(f, "@{}:{}", pair_name(o.key_codec, o.value_codec), o.layers)?;
        }
        if self.key_split {
            write!(f, "+keysplit")?;
        } else if self.key_norm {
            write!(f, "+keynorm")?;
        }
        if self.sinks > 0 {
            write!(f, "+sink{}", self.sinks)?;
        }
        if self.recent > 0 {
            write!(f, "+recent{}", self.recent)?;
        }
        Ok(())
    }
}

/// The grammar of a setting, for error messages.
const VALID_SETTING: &str =
    "CODEC[/CODEC][@CODEC[/CODEC]:LAYER+LAYER...]...[+keynorm|+keysplit][+sinkN][+recentN]";

impl std::str::FromStr for CodecPair {
    type Err = pagedkv::KvError;

    /// `CODEC` (keys and values) or `KEY/VALUE`, e.g. `int8/int4`, optionally followed by
    /// `@CODECS:LAYERS` parts for other codecs on some layers, e.g. `fibquant-k2n16@int8:0+1+29`
    /// (the last part naming a layer applies to it), and by options in any order: `+keynorm` to normalize FibQuant keys (calibrated),
    /// `+keysplit` to normalize them and allocate their bits over channel pairs (calibrated),
    /// `+sinkN` to keep each window's first N tokens in f16 (`+sink`: 4; N ≤ block size), `+recentN`
    /// to keep its last N tokens in full precision besides the open block.
    fn from_str(full: &str) -> pagedkv::Result<Self> {
        let bad_option = || pagedkv::KvError::UnknownCodec {
            name: full.to_string(),
            valid: VALID_SETTING.to_string(),
        };
        let (mut s, mut sinks, mut recent, mut key_norm, mut key_split) =
            (full, 0, 0, false, false);
        while let Some((rest, option)) = s.rsplit_once('+') {
            if option == "keynorm" {
                key_norm = true;
            } else if option == "keysplit" {
                (key_norm, key_split) = (true, true);
            } else if let Some(n) = option.strip_prefix("sink") {
                sinks = if n.is_empty() {
                    DEFAULT_SINKS
                } else {
                    n.parse().map_err(|_| bad_option())?
                };
            } else if let Some(n) = option.strip_prefix("recent") {
                recent = n.parse().map_err(|_| bad_option())?;
            } else {
                break; // a layer list of an override (`@int8:0+29`)
            }
            s = rest;
        }
        let mut parts = s.split('@');
        let (key, value) = parse_pair(parts.next().unwrap_or_default())?;
        let mut pair = Self {
            key,
            value,
            layer_overrides: Vec::new(),
            sinks,
            recent,
            key_norm,
            key_split,
        };
        for other in parts {
            let bad = || pagedkv::KvError::UnknownCodec {
                name: s.to_string(),
                valid: "CODEC[/CODEC][@CODEC[/CODEC]:LAYER+LAYER...]...".to_string(),
            };
            let (codecs, layers) = other.split_once(':').ok_or_else(bad)?;
            let (k, v) = parse_pair(codecs)?;
            let layers = layers
                .split('+')
                .map(|l| l.trim().parse::<usize>().map_err(|_| bad()))
                .collect::<pagedkv::Result<Vec<_>>>()?;
            pair = pair.with_override(LayerSet::of(layers)?, k, v);
        }
        Ok(pair)
    }
}

/// Sink tokens of `+sink` without a count: the first four, as StreamingLLM keeps.
pub const DEFAULT_SINKS: usize = 4;

/// How to evaluate.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// Tokens per window (each window starts with an empty cache).
    pub window: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// At most this many windows (None: every whole window of the text).
    pub max_windows: Option<usize>,
    /// The key normalization of the settings marked `+keynorm` (see [`crate::calibrate`]).
    pub key_norm: Option<std::sync::Arc<pagedkv::KeyNorm>>,
    /// The key statistics the settings marked `+keysplit` allocate their key bits from.
    pub key_stats: Option<std::sync::Arc<crate::calibrate::KeyStats>>,
    /// Ready key split plans (a profile's) for the `+keysplit` settings, instead of plans
    /// allocated from `key_stats`.
    pub key_split: Option<std::sync::Arc<pagedkv::KeySplit>>,
}

/// Results of one codec setting.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRow {
    /// The setting.
    pub codecs: CodecPair,
    /// Stored bits per K/V element, parameters included (keys and values averaged).
    pub bits_per_element: f64,
    /// KV bytes per token for this model.
    pub kv_bytes_per_token: f64,
    /// exp(mean negative log-likelihood of the next token).
    pub ppl: f64,
    /// Mean KL(f32 cache ‖ this setting) per predicted token, in nats.
    pub kl_mean: f64,
    /// Share of positions whose most likely next token equals the f32 cache's.
    pub top1: f64,
    /// Predicted tokens the figures are over.
    pub tokens: usize,
}

/// Running sums of one setting.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    nll: f64,
    kl: f64,
    agree: usize,
    count: usize,
}

/// Evaluates `settings` on `tokens`; the f32 reference row comes first in the result.
/// `progress(done, total)` is called after each window's settings are done.
pub fn evaluate(
    model: &Model,
    tokens: &[u32],
    settings: &[CodecPair],
    config: EvalConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<EvalRow>> {
    let (w, bs) = (config.window, config.block_size);
    if w < 2 || bs == 0 {
        return Err(EngineError::InvalidArgument(format!(
            "window ({w}) must be at least 2 tokens and block size ({bs}) positive"
        )));
    }
    if w > model.config().context_len {
        return Err(EngineError::InvalidArgument(format!(
            "window of {w} tokens exceeds the model's context of {}",
            model.config().context_len
        )));
    }
    let mut windows = tokens.len() / w;
    if let Some(max) = config.max_windows {
        windows = windows.min(max);
    }
    if windows == 0 {
        return Err(EngineError::InvalidArgument(format!(
            "the text has {} tokens, fewer than one window of {w}",
            tokens.len()
        )));
    }
    let reference = CodecPair::same(Codec::F32);
    let all: Vec<CodecPair> = std::iter::once(reference.clone())
        .chain(settings.iter().filter(|s| **s != reference).cloned())
        .collect();
    // layouts first, so a bad codec (e.g. FibQuant on an unsupported head size) fails early
    let layouts = all
        .iter()
        .map(|s| {
            let key_norm = match (s.key_norm, &config.key_norm) {
                (false, _) => None,
                (true, Some(c)) => Some(c.clone()),
                (true, None) => {
                    return Err(EngineError::InvalidArgument(format!(
                        "`{s}` asks for key normalization but none was fitted"
                    )))
                }
            };
            let key_split = match (s.key_split, &config.key_split, &config.key_stats) {
                (false, _, _) => KeySplitSource::None,
                (true, Some(plans), _) => KeySplitSource::Plans(plans.clone()),
                (true, None, Some(stats)) => KeySplitSource::Stats(stats),
                (true, None, None) => {
                    return Err(EngineError::InvalidArgument(format!(
                        "`{s}` asks for a key split but no key statistics were measured"
                    )))
                }
            };
            setting_layout(model, s, bs, key_norm, key_split)
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab = model.config().vocab;
    let mut totals = vec![Totals::default(); all.len()];
    let mut reference_logp = vec![0f32; (w - 1) * vocab];
    let mut logp = vec![0f32; vocab];
    for win in 0..windows {
        let text = &tokens[win * w..(win + 1) * w];
        for (i, layout) in layouts.iter().enumerate() {
            let logits = window_logits(model, layout.clone(), text, bs)?;
            // position p predicts token p + 1; the window's last logits predict nothing here
            for (p, row) in logits.chunks_exact(vocab).take(w - 1).enumerate() {
                log_softmax(row, &mut logp);
                let t = &mut totals[i];
                t.nll -= logp[text[p + 1] as usize] as f64;
                t.count += 1;
                let reference_row = &mut reference_logp[p * vocab..(p + 1) * vocab];
                if i == 0 {
                    reference_row.copy_from_slice(&logp);
                    t.agree += 1;
                    continue;
                }
                t.kl += kl(reference_row, &logp);
                if argmax(reference_row) == argmax(&logp) {
                    t.agree += 1;
                }
            }
        }
        progress(win + 1, windows);
    }
    Ok(all
        .iter()
        .zip(&layouts)
        .zip(&totals)
        .map(|((codecs, layout), t)| {
            let (bits_per_element, kv_bytes_per_token) = window_cost(layout, w);
            EvalRow {
                codecs: codecs.clone(),
                bits_per_element,
                kv_bytes_per_token,
                ppl: (t.nll / t.count as f64).exp(),
                kl_mean: t.kl / t.count as f64,
                top1: t.agree as f64 / t.count as f64,
                tokens: t.count,
            }
        })
        .collect())
}

/// Where a `+keysplit` setting's plans come from.
enum KeySplitSource<'a> {
    /// No split.
    None,
    /// Allocated for the setting's key codecs from measured statistics.
    Stats(&'a crate::calibrate::KeyStats),
    /// Ready plans (a profile's).
    Plans(std::sync::Arc<pagedkv::KeySplit>),
}

/// The cache layout of a setting, with blocks of `block_size`.
fn setting_layout(
    model: &Model,
    setting: &CodecPair,
    block_size: usize,
    key_norm: Option<std::sync::Arc<pagedkv::KeyNorm>>,
    key_split: KeySplitSource,
) -> Result<pagedkv::KvLayout> {
    let s = setting;
    let layout =
        model
            .config()
            .kv_layout_with(s.key, s.value, block_size, s.layer_overrides.clone())?;
    let key_split = match key_split {
        KeySplitSource::None => None,
        KeySplitSource::Stats(stats) => Some(std::sync::Arc::new(
            stats.split(|layer| layout.key_codec(layer))?,
        )),
        KeySplitSource::Plans(plans) => Some(plans),
    };
    Ok(pagedkv::KvLayout::new(pagedkv::LayoutSpec {
        sink_tokens: s.sinks,
        recent_tokens: s.recent,
        key_norm,
        key_split,
        ..layout.spec().clone()
    })?)
}

/// Stored bits per K/V element of a setting over windows of `window` tokens, as
/// [`evaluate`] reports them (sink rows and the recent window included).
pub fn setting_bits(
    model: &Model,
    setting: &CodecPair,
    block_size: usize,
    window: usize,
) -> Result<f64> {
    let layout = setting_layout(model, setting, block_size, None, KeySplitSource::None)?;
    Ok(window_cost(&layout, window).0)
}

/// Bits per element and KV bytes per token over a window of `w` tokens: the layout's own, with
/// the recent window's blocks at the end of the window counted at the f32 of the staging rows
/// that hold them, and the sink tokens' f16 rows beside the first block.
fn window_cost(layout: &pagedkv::KvLayout, w: usize) -> (f64, f64) {
    let blocks = layout.blocks_for_tokens(w);
    let recent = if layout.is_full_precision() {
        0
    } else {
        layout.recent_blocks().min(blocks)
    };
    let f32_block = (2 * layout.page_elements() * layout.kv_heads() * layout.layers() * 4) as f64;
    let block = layout.block_bytes() as f64;
    let window_bytes =
        recent as f64 * f32_block + (blocks - recent) as f64 * block + layout.sink_bytes() as f64;
    let mean_block = window_bytes / blocks as f64;
    let elements = (2 * layout.page_elements() * layout.kv_heads() * layout.layers()) as f64;
    (
        mean_block * 8.0 / elements,
        mean_block / layout.block_size() as f64,
    )
}

/// Logits of every position of `text` on a fresh cache, fed one block per forward.
fn window_logits(
    model: &Model,
    layout: pagedkv::KvLayout,
    text: &[u32],
    block_size: usize,
) -> Result<Vec<f32>> {
    let blocks = layout.blocks_for_tokens(text.len());
    let mut cache = KvCacheManager::new(layout, blocks, b"eval")?;
    let seq = SeqId(0);
    cache.admit(seq, text)?;
    let mut logits = Vec::with_capacity(text.len() * model.config().vocab);
    for chunk in text.chunks(block_size) {
        let out = model.forward(
            &mut cache,
            &[BatchItem {
                seq,
                tokens: chunk,
                logits: Logits::All,
            }],
        )?;
        logits.extend_from_slice(&out[0]);
    }
    Ok(logits)
}

/// `out = row − logsumexp(row)`, in f64 for the sum.
fn log_softmax(row: &[f32], out: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
    let sum: f64 = row.iter().map(|x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    for (o, x) in out.iter_mut().zip(row) {
        *o = (*x as f64 - lse) as f32;
    }
}

/// KL(p ‖ q) from log-probabilities.
fn kl(log_p: &[f32], log_q: &[f32]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .map(|(p, q)| (*p as f64).exp() * (*p as f64 - *q as f64))
        .sum::<f64>()
        .max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_of_identical_distributions_is_zero_and_positive_otherwise() {
        let mut p = vec![0f32; 4];
        let mut q = vec![0f32; 4];
        log_softmax(&[1.0, 2.0, 3.0, 4.0], &mut p);
        log_softmax(&[1.0, 2.0, 3.0, 3.5], &mut q);
        assert_eq!(kl(&p, &p), 0.0);
        assert!(kl(&p, &q) > 0.0);
        let total: f64 = p.iter().map(|x| (*x as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn codec_pairs_parse_and_print() {
        let pair: CodecPair = "int8/int4".parse().unwrap();
        assert_eq!(pair.key, Codec::Int8);
        assert_eq!(pair.value, Codec::Int4);
        assert_eq!(pair.to_string(), "int8/int4");
        assert_eq!("f16".parse::<CodecPair>().unwrap().to_string(), "f16");
        assert!("int9".parse::<CodecPair>().is_err());
        let mixed: CodecPair = "fibquant-k2n16@int8/f16:0+29".parse().unwrap();
        let o = mixed.layer_overrides[0];
        assert_eq!(o.layers.iter().collect::<Vec<_>>(), [0, 29]);
        assert_eq!((o.key_codec, o.value_codec), (Codec::Int8, Codec::F16));
        assert_eq!(mixed.to_string(), "fibquant-k2n16@int8/f16:0+29");
        assert!("int4@f16".parse::<CodecPair>().is_err());
        assert!("int4@f16:x".parse::<CodecPair>().is_err());
        let sunk: CodecPair = "fibquant-k4n256@int8:10+sink4".parse().unwrap();
        assert_eq!(sunk.sinks, 4);
        assert_eq!(sunk.to_string(), "fibquant-k4n256@int8:10+sink4");
        assert!("int4+sinkx".parse::<CodecPair>().is_err());
        assert_eq!(
            "int4+sink".parse::<CodecPair>().unwrap().sinks,
            DEFAULT_SINKS
        );
        let all: CodecPair = "fibquant-k4n256@int8:0+29+recent64+keynorm+sink"
            .parse()
            .unwrap();
        assert_eq!((all.recent, all.sinks, all.key_norm), (64, 4, true));
        assert_eq!(all.layer_overrides[0].layers.len(), 2);
        assert_eq!(
            all.to_string(),
            "fibquant-k4n256@int8:0+29+keynorm+sink4+recent64"
        );
        assert!("int4+recent".parse::<CodecPair>().is_err());
        // a key split implies the normalization and prints as one option
        let split: CodecPair = "fibquant-k4n256+keynorm+keysplit+sink1".parse().unwrap();
        assert_eq!((split.key_norm, split.key_split), (true, true));
        assert_eq!(split.to_string(), "fibquant-k4n256+keysplit+sink1");
        assert_eq!(split.to_string().parse::<CodecPair>().unwrap(), split);
        let two: CodecPair = "fibquant-k4n256@fibquant-k4n1024/fibquant-k4n256:0+3@fibquant-k2n256/fibquant-k4n256:3+keynorm"
            .parse()
            .unwrap();
        assert_eq!(two.layer_overrides.len(), 2);
        // the layout resolves them: the last part naming a layer applies
        let layout = pagedkv::KvLayout::new(pagedkv::LayoutSpec {
            key_codec: two.key,
            value_codec: two.value,
            layer_overrides: two.layer_overrides.clone(),
            ..pagedkv::LayoutSpec::new(5, 3, 9, 64, two.key)
        })
        .unwrap();
        let codecs_of = |l| (layout.key_codec(l), layout.value_codec(l));
        let k4 = |n| Codec::FibQuant { k: 4, n };
        assert_eq!(codecs_of(0), (k4(1024), k4(256)));
        assert_eq!(codecs_of(3), (Codec::FibQuant { k: 2, n: 256 }, k4(256)));
        assert_eq!(codecs_of(4), (k4(256), k4(256)));
        assert_eq!(two.to_string().parse::<CodecPair>().unwrap(), two);
        assert!("int4@int8:1@".parse::<CodecPair>().is_err());
    }
}
