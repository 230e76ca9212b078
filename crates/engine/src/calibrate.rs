//! Fitting a [`KeyNorm`] for FibQuant keys from a calibration text (DESIGN §6): the model runs
//! over a few windows of the text, and per (layer, kv head) the keys' pre-RoPE mean is taken.
//!
//! The default text, Jules Verne's *Around the World in Eighty Days* (Project Gutenberg #103,
//! public domain), is neither the default evaluation text nor the test text, so no codec is
//! scored on the text it was calibrated on.

use pagedkv::{Codec, KeyNorm, KeyNormFit, KvCacheManager, SeqId};

use crate::model::{BatchItem, Logits, Model};
use crate::{GgufTokenizer, Result};

/// The built-in calibration text.
pub const DEFAULT_TEXT: &str = include_str!("../../../data/around-the-world-in-80-days.txt");

/// Tokens per calibration window.
pub const DEFAULT_WINDOW: usize = 512;
/// Windows of the default calibration (2,048 tokens).
pub const DEFAULT_WINDOWS: usize = 4;

/// Fits the key normalization of `model`'s cache (blocks of `block_size`) on up to `windows`
/// windows of `window` tokens of `tokens`, skipping the first window (front matter, not prose).
pub fn fit_key_norm(
    model: &Model,
    tokens: &[u32],
    window: usize,
    windows: usize,
    block_size: usize,
) -> Result<KeyNorm> {
    let c = model.config();
    let layout = c.kv_layout(Codec::F32, Codec::F32, block_size)?;
    let mut fit = KeyNormFit::new(c.layers, c.kv_heads, c.head_dim, block_size, c.rope_base);
    let kv_width = c.kv_heads * c.head_dim;
    let mut failed = None;
    for text in tokens.chunks_exact(window).skip(1).take(windows) {
        let mut cache = KvCacheManager::new(layout.clone(), layout.blocks_for_tokens(window), b"")?;
        let seq = SeqId(0);
        cache.admit(seq, text)?;
        let batch = [BatchItem {
            seq,
            tokens: text,
            logits: Logits::None,
        }];
        model.forward_observed(&mut cache, &batch, &mut |layer, _, k| {
            for (pos, k) in k.chunks_exact(kv_width).enumerate() {
                if let Err(e) = fit.add(layer, pos, k) {
                    failed.get_or_insert(e);
                }
            }
        })?;
    }
    if let Some(e) = failed {
        return Err(e.into());
    }
    Ok(fit.finish()?)
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
