//! Fitting a [`Centering`] for FibQuant pages from a calibration text (DESIGN §6): the model runs
//! over a few windows of the text with a full-precision cache, and the means of its cached keys
//! (before RoPE) and values are taken per (layer, kv head).
//!
//! The default text, Jules Verne's *Around the World in Eighty Days* (Project Gutenberg #103,
//! public domain), is neither the default evaluation text nor the test text, so no codec is
//! scored on the text it was calibrated on.

use pagedkv::{Centering, CenteringFit, Codec, KvCacheManager, SeqId};

use crate::model::{BatchItem, Logits, Model};
use crate::Result;

/// The built-in calibration text.
pub const DEFAULT_TEXT: &str = include_str!("../../../data/around-the-world-in-80-days.txt");

/// Tokens per calibration window and windows used by default (2,048 tokens).
pub const DEFAULT_WINDOW: usize = 512;
/// Windows of the default calibration.
pub const DEFAULT_WINDOWS: usize = 4;

/// Fits the centering of `model`'s cache (blocks of `block_size`) on `windows` windows of
/// `window` tokens of `tokens`, skipping the first window (front matter, not prose).
pub fn fit_centering(
    model: &Model,
    tokens: &[u32],
    window: usize,
    windows: usize,
    block_size: usize,
) -> Result<Centering> {
    let c = model.config();
    let layout = c.kv_layout(Codec::F32, Codec::F32, block_size)?;
    let mut fit = CenteringFit::new(c.layers, c.kv_heads, c.head_dim, block_size, c.rope_base);
    let width = c.kv_heads * c.head_dim;
    let (mut k, mut v) = (vec![0f32; width], vec![0f32; width]);
    for text in tokens.chunks_exact(window).skip(1).take(windows) {
        let mut cache = KvCacheManager::new(layout.clone(), layout.blocks_for_tokens(window), b"")?;
        let seq = SeqId(0);
        cache.admit(seq, text)?;
        model.forward(
            &mut cache,
            &[BatchItem {
                seq,
                tokens: text,
                logits: Logits::Last,
            }],
        )?;
        for layer in 0..c.layers {
            for pos in 0..window {
                cache.read_token(seq, layer, pos, &mut k, &mut v)?;
                fit.add(layer, pos, &k, &v)?;
            }
        }
    }
    Ok(fit.finish()?)
}

/// The centering fitted on the built-in text with the default windows.
pub fn default_centering(
    model: &Model,
    tokenizer: &crate::GgufTokenizer,
    block_size: usize,
) -> Result<Centering> {
    let tokens = tokenizer.encode(DEFAULT_TEXT)?;
    fit_centering(model, &tokens, DEFAULT_WINDOW, DEFAULT_WINDOWS, block_size)
}
