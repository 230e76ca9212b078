//! The test oracle.

use super::{check, Context};
use crate::codec::Role;
use crate::error::Result;
use crate::storage::KvStorage;

/// The oracle: the same attention on the stored values (the codec's reconstruction) with f64
/// accumulation and a plain two-pass softmax.
pub fn attend_reference(
    storage: &KvStorage,
    layer: usize,
    ctx: Context,
    q: &[f32],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    check(storage, &ctx, q, out)?;
    let layout = storage.layout();
    let (d, bs) = (layout.head_dim(), layout.block_size());
    // every visible token's K and V per kv head, as f32
    let mut keys = vec![vec![0f32; ctx.len * d]; layout.kv_heads()];
    let mut values = vec![vec![0f32; ctx.len * d]; layout.kv_heads()];
    let mut page = vec![0f32; bs * d];
    for head in 0..layout.kv_heads() {
        for (block_idx, block) in ctx.blocks.iter().enumerate().take(ctx.len.div_ceil(bs)) {
            let n = (ctx.len - block_idx * bs).min(bs);
            let span = block_idx * bs * d..(block_idx * bs + n) * d;
            let start = block_idx * bs;
            storage.page_to_f32(layer, *block, head, Role::Key, start, &mut page)?;
            keys[head][span.clone()].copy_from_slice(&page[..n * d]);
            storage.page_to_f32(layer, *block, head, Role::Value, start, &mut page)?;
            values[head][span].copy_from_slice(&page[..n * d]);
        }
    }
    for qh in 0..layout.query_heads() {
        let head = qh / layout.group_size();
        let qv = &q[qh * d..(qh + 1) * d];
        let scores: Vec<f64> = keys[head]
            .chunks_exact(d)
            .map(|k| {
                qv.iter()
                    .zip(k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = vec![0f64; d];
        for (w, v) in weights.iter().zip(values[head].chunks_exact(d)) {
            for (a, x) in acc.iter_mut().zip(v) {
                *a += w * *x as f64;
            }
        }
        for (o, a) in out[qh * d..(qh + 1) * d].iter_mut().zip(&acc) {
            *o = (a / total) as f32;
        }
    }
    Ok(())
}
