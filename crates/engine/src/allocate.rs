//! Per-layer codec assignment for a bit budget (`eval --sensitivity`).
//!
//! Each (layer, role) has a measured sensitivity: the KL to the f32 cache when only that
//! layer's keys (or values) are stored in the setting's codec. For small errors the KL grows
//! with the squared error, so the KL of another codec there is predicted as the sensitivity
//! times the ratio of the two codecs' relative squared errors (measured on Gaussian rows, which
//! FibQuant's normalize-and-rotate makes every row look like). The assignment minimises the sum
//! of predicted KLs for the budget by the greedy rule of separable convex knapsacks: every
//! (layer, role) starts at its cheapest level and the upgrade with the most KL saved per bit is
//! taken while it fits, along the lower convex hull of the levels' (bits, error).

use pagedkv::codec::scalar::{decode_page, encode_page};
use pagedkv::codec::synthetic::gaussian;
use pagedkv::{Codec, Role};

/// Keys then values, the order of every `[_; 2]` here.
pub const ROLES: [Role; 2] = [Role::Key, Role::Value];

/// A codec the assignment may give a (layer, role), with its cost and its error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Level {
    /// The codec.
    pub codec: Codec,
    /// Bits per element as keys and as values, parameters included.
    pub bits: [f64; 2],
    /// Relative squared error Σ(x − x̂)² / Σx² on Gaussian rows, as keys and as values.
    pub error: [f64; 2],
}

/// Pages of Gaussian rows a level's error is measured on (enough for three digits).
const PAGES: usize = 256;

impl Level {
    /// Measures `codec` on pages of `block_size × head_dim` Gaussian rows.
    pub fn measure(codec: Codec, block_size: usize, head_dim: usize) -> pagedkv::Result<Self> {
        let rows = gaussian(PAGES * block_size * head_dim, 0x5eed);
        let mut bits = [0.0; 2];
        let mut error = [0.0; 2];
        let mut decoded = vec![0f32; block_size * head_dim];
        for (r, role) in ROLES.into_iter().enumerate() {
            bits[r] = codec.bits_per_element(role, block_size, head_dim)?;
            let mut page = vec![0u8; codec.page_bytes(role, block_size, head_dim)?];
            let (mut err, mut norm) = (0f64, 0f64);
            for chunk in rows.chunks_exact(block_size * head_dim) {
                encode_page(codec, role, chunk, block_size, head_dim, &mut page)?;
                decode_page(codec, role, &page, block_size, head_dim, &mut decoded)?;
                for (x, y) in chunk.iter().zip(&decoded) {
                    err += ((x - y) as f64).powi(2);
                    norm += (*x as f64).powi(2);
                }
            }
            error[r] = err / norm;
        }
        Ok(Self { codec, bits, error })
    }
}

/// Indices of `levels` on the lower convex hull of (bits, error) for `role`, cheapest first:
/// the only levels a greedy upgrade path should stop at.
fn hull(levels: &[Level], role: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..levels.len()).collect();
    order.sort_by(|a, b| {
        let (a, b) = (&levels[*a], &levels[*b]);
        a.bits[role]
            .total_cmp(&b.bits[role])
            .then(a.error[role].total_cmp(&b.error[role]))
    });
    let point = |i: usize| (levels[i].bits[role], levels[i].error[role]);
    let mut hull: Vec<usize> = Vec::new();
    for i in order {
        let (x, y) = point(i);
        // a level that costs more and is not better is never worth it
        if hull.last().is_some_and(|&j| y >= point(j).1) {
            continue;
        }
        // drop the last point while it lies on or above the segment to the new one
        while hull.len() >= 2 {
            let (x1, y1) = point(hull[hull.len() - 2]);
            let (x2, y2) = point(hull[hull.len() - 1]);
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) <= 0.0 {
                hull.pop();
            } else {
                break;
            }
        }
        hull.push(i);
    }
    hull
}

/// For each layer, the level of its keys and of its values (indices into `levels`) that
/// minimise the predicted KL within `budget_bits` per element (averaged over layers and roles,
/// as the levels' own bits; overheads such as sink rows are the caller's). `sensitivity[l][r]`
/// is the KL measured with only role `r` of layer `l` stored at a codec of relative error
/// `measured_error[r]`. None if even the cheapest levels exceed the budget.
pub fn assign_levels(
    sensitivity: &[[f64; 2]],
    measured_error: [f64; 2],
    levels: &[Level],
    budget_bits: f64,
) -> Option<Vec<[usize; 2]>> {
    const SLACK: f64 = 1e-9;
    let layers = sensitivity.len();
    if layers == 0 || levels.is_empty() {
        return None;
    }
    let share = 1.0 / (2 * layers) as f64;
    let hulls = [hull(levels, 0), hull(levels, 1)];
    let mut at = vec![[0usize; 2]; layers];
    let mut cost: f64 = (0..2)
        .map(|r| levels[hulls[r][0]].bits[r] * share * layers as f64)
        .sum();
    if cost > budget_bits + SLACK {
        return None;
    }
    loop {
        let mut best: Option<(f64, usize, usize, f64)> = None;
        for (l, s) in sensitivity.iter().enumerate() {
            for r in 0..2 {
                let Some(&next) = hulls[r].get(at[l][r] + 1) else {
                    continue;
                };
                let (now, next) = (&levels[hulls[r][at[l][r]]], &levels[next]);
                let extra = (next.bits[r] - now.bits[r]) * share;
                if cost + extra > budget_bits + SLACK {
                    continue;
                }
                let saved = s[r] * (now.error[r] - next.error[r]) / measured_error[r];
                let ratio = saved / extra;
                if best.is_none_or(|b| ratio > b.0) {
                    best = Some((ratio, l, r, extra));
                }
            }
        }
        let Some((_, l, r, extra)) = best else {
            break;
        };
        at[l][r] += 1;
        cost += extra;
    }
    Some(
        at.iter()
            .map(|a| [hulls[0][a[0]], hulls[1][a[1]]])
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(n: u32, bits: f64, error: f64) -> Level {
        Level {
            codec: Codec::FibQuant { k: 4, n },
            bits: [bits; 2],
            error: [error; 2],
        }
    }

    #[test]
    fn the_hull_skips_dominated_and_concave_levels() {
        let levels = [
            level(1024, 2.75, 0.05),
            level(64, 1.75, 0.20),
            level(256, 2.25, 0.10),
            level(512, 2.50, 0.09), // above the segment 256 → 1024
            level(128, 2.80, 0.30), // dearer and worse than 256
        ];
        assert_eq!(hull(&levels, 0), [1, 2, 0]);
    }

    #[test]
    fn bits_go_where_the_kl_is_and_the_budget_holds() {
        let levels = [
            level(64, 1.75, 0.20),
            level(256, 2.25, 0.10),
            level(4096, 3.25, 0.03),
        ];
        // layer 1's keys are ten times as sensitive as anything else
        let sensitivity = [[0.01, 0.01], [0.10, 0.01], [0.01, 0.01], [0.01, 0.01]];
        let bits = |a: &[[usize; 2]]| {
            a.iter()
                .flat_map(|x| x.iter().map(|i| levels[*i].bits[0]))
                .sum::<f64>()
                / 8.0
        };
        let a = assign_levels(&sensitivity, [0.10, 0.10], &levels, 2.25).unwrap();
        assert!(bits(&a) <= 2.25 + 1e-9, "{a:?}");
        assert_eq!(a[1][0], 2, "the sensitive keys get the finest level: {a:?}");
        // a bigger budget never predicts more KL
        let predicted = |a: &[[usize; 2]]| -> f64 {
            a.iter()
                .zip(&sensitivity)
                .flat_map(|(x, s)| (0..2).map(move |r| s[r] * levels[x[r]].error[r] / 0.10))
                .sum()
        };
        let more = assign_levels(&sensitivity, [0.10, 0.10], &levels, 2.75).unwrap();
        assert!(bits(&more) <= 2.75 + 1e-9);
        assert!(predicted(&more) < predicted(&a));
        // everything at the top when the budget allows it; nothing below the cheapest level
        let all = assign_levels(&sensitivity, [0.10, 0.10], &levels, 4.0).unwrap();
        assert!(all.iter().all(|x| *x == [2, 2]));
        assert!(assign_levels(&sensitivity, [0.10, 0.10], &levels, 1.5).is_none());
        assert!(assign_levels(&[], [0.10, 0.10], &levels, 3.0).is_none());
    }

    #[test]
    fn measured_levels_order_like_their_rates() {
        let coarse = Level::measure(Codec::FibQuant { k: 4, n: 256 }, 16, 64).unwrap();
        let fine = Level::measure(Codec::FibQuant { k: 2, n: 256 }, 16, 64).unwrap();
        let int8 = Level::measure(Codec::Int8, 16, 64).unwrap();
        assert!((coarse.bits[0] - 2.140625).abs() < 1e-9 && (fine.bits[1] - 4.140625).abs() < 1e-9);
        // FibQuant at 2 bits per coordinate: relative error near 0.095 (README's codec table)
        assert!((0.08..0.11).contains(&coarse.error[0]), "{coarse:?}");
        assert!(fine.error[0] < 0.1 * coarse.error[0], "{fine:?}");
        assert!(int8.error[0] < 1e-4 && int8.error[1] < 1e-4, "{int8:?}");
    }
}
