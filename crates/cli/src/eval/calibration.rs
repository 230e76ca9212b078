//! The research side of `eval`: fitting key normalization and key statistics on the
//! calibration text, and `--sensitivity` (per-layer KL, then a codec per layer for a bit
//! budget). Nothing here runs when serving.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use pagedkv::LayerSet;
use pagedkv_engine::eval::{evaluate, setting_bits, CodecPair, EvalConfig};

use super::progress_bar;

/// How the built-in calibration text is named in the output.
pub(crate) const DEFAULT_CALIBRATION_NAME: &str = "data/around-the-world-in-80-days.txt (built in)";

/// What `--sensitivity` assigns from, besides the measured KLs.
pub(crate) struct SensitivityArgs<'a> {
    /// Codecs a layer's keys or values may get (comma-separated).
    pub levels: &'a str,
    /// Bits per element to aim for.
    pub budget: f64,
    /// Where to write the per-layer KLs and the proposal as JSON.
    pub json: Option<&'a Path>,
}

/// The assignment `--sensitivity` proposes.
pub(crate) struct Proposal {
    /// The setting with its per-layer overrides.
    pub setting: CodecPair,
    /// Its stored bits per element over a window.
    pub bits: f64,
}

/// The calibration text (`path`, else the built-in one) and its name for the output.
pub(crate) fn calibration_text(path: Option<&Path>) -> Result<(String, String)> {
    Ok(match path {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the calibration text {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (
            pagedkv_engine::calibrate::DEFAULT_TEXT.to_string(),
            DEFAULT_CALIBRATION_NAME.to_string(),
        ),
    })
}

/// The key normalization fitted on the calibration text (`calibration`, else the built-in
/// one) for blocks of `block_size`, and with `with_stats` the key statistics of `+keysplit`
/// settings.
pub(crate) fn fit_key_calibration(
    model: &pagedkv_engine::Model,
    tokenizer: &pagedkv_engine::GgufTokenizer,
    calibration: Option<&Path>,
    block_size: usize,
    with_stats: bool,
) -> Result<(
    pagedkv::KeyNorm,
    Option<pagedkv_engine::calibrate::KeyStats>,
)> {
    use pagedkv_engine::calibrate;
    let (text, name) = calibration_text(calibration)?;
    let started = Instant::now();
    let tokens = tokenizer.encode(&text)?;
    let (window, windows) = (calibrate::DEFAULT_WINDOW, calibrate::DEFAULT_WINDOWS);
    if tokens.len() < 2 * window {
        anyhow::bail!(
            "the calibration text {name} has {} tokens; it needs at least {}",
            tokens.len(),
            2 * window
        );
    }
    let key_norm = calibrate::fit_key_norm(model, &tokens, window, windows, block_size)?;
    println!(
        "key normalization: fitted on {name}, {} tokens, {:.1} s",
        window * windows.min(tokens.len() / window - 1),
        started.elapsed().as_secs_f64()
    );
    if !with_stats {
        return Ok((key_norm, None));
    }
    let started = Instant::now();
    let stats = calibrate::fit_key_stats(model, &tokens, window, windows, &key_norm)?;
    println!(
        "key statistics (for +keysplit): measured on {name}, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok((key_norm, Some(stats)))
}

/// Per-(layer, role) KL of the setting `low` (only that layer's keys, or values, stored in it; every
/// other layer f32), then a codec from `--levels` for each layer's keys and values that
/// minimises the predicted KL within `--budget` bits per element (see
/// [`pagedkv_engine::allocate`]).
pub(crate) fn sensitivity(
    model: &pagedkv_engine::Model,
    tokens: &[u32],
    low: CodecPair,
    args: &SensitivityArgs,
    config: EvalConfig,
    windows: usize,
) -> Result<Proposal> {
    use pagedkv::Codec;
    use pagedkv_engine::allocate::{assign_levels, Level};
    anyhow::ensure!(
        low.layer_overrides.is_empty(),
        "--sensitivity takes a setting without layer overrides (got `{low}`)"
    );
    let (bs, head_dim) = (config.block_size, model.config().head_dim);
    let mut codecs: Vec<Codec> = args
        .levels
        .split(',')
        .map(|c| c.trim().parse::<Codec>())
        .collect::<pagedkv::Result<_>>()?;
    codecs.extend([low.key, low.value]);
    codecs.sort_by_key(|c| c.to_string());
    codecs.dedup();
    let levels = codecs
        .iter()
        .map(|c| Level::measure(*c, bs, head_dim))
        .collect::<pagedkv::Result<Vec<_>>>()?;
    // the setting's own codecs are among the levels (added above)
    let level_of = |codec: Codec| levels.iter().find(|l| l.codec == codec);
    let (own_key, own_value) = (level_of(low.key), level_of(low.value));
    let measured_error = [
        own_key.map_or(f64::NAN, |l| l.error[0]),
        own_value.map_or(f64::NAN, |l| l.error[1]),
    ];
    let layers = model.config().layers;
    let f32 = Codec::F32;
    let only = |layer: usize, key: Codec, value: Codec| -> pagedkv::Result<CodecPair> {
        Ok(CodecPair {
            key_norm: low.key_norm,
            key_split: low.key_split,
            sinks: low.sinks,
            recent: low.recent,
            ..CodecPair::same(f32).with_override(LayerSet::of([layer])?, key, value)
        })
    };
    let mut settings = Vec::with_capacity(2 * layers);
    for layer in 0..layers {
        settings.push(only(layer, low.key, f32)?);
        settings.push(only(layer, f32, low.value)?);
    }
    println!(
        "sensitivity of {low}: {} runs (each layer's keys, then its values, alone in it)",
        settings.len()
    );
    let bar = progress_bar(windows);
    let rows = evaluate(model, tokens, &settings, config.clone(), |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    let kl: Vec<[f64; 2]> = rows[1..]
        .chunks_exact(2)
        .map(|pair| [pair[0].kl_mean, pair[1].kl_mean])
        .collect();
    println!("{:>5} {:>10} {:>10}", "layer", "KL keys", "KL values");
    for (l, k) in kl.iter().enumerate() {
        println!("{l:>5} {:>10.5} {:>10.5}", k[0], k[1]);
    }
    println!("levels (relative squared error on Gaussian rows, keys / values):");
    for l in &levels {
        println!(
            "  {:<18} {:.2} / {:.2} bits  {:.2e} / {:.2e}",
            l.codec.to_string(),
            l.bits[0],
            l.bits[1],
            l.error[0],
            l.error[1]
        );
    }
    // the levels' bits are the codecs' own; sink rows and the recent window come on top
    let base_bits = setting_bits(model, &low, bs, config.window)?;
    let overhead = base_bits
        - (own_key.map_or(0.0, |l| l.bits[0]) + own_value.map_or(0.0, |l| l.bits[1])) / 2.0;
    let assignment = assign_levels(&kl, measured_error, &levels, args.budget - overhead)
        .with_context(|| {
            format!(
                "no assignment of --levels fits {} bits per element with {overhead:.3} bits of sink and recent rows",
                args.budget
            )
        })?;
    let proposal = proposal_setting(&low, &assignment, &levels)?;
    let predicted: f64 = assignment
        .iter()
        .zip(&kl)
        .map(|(a, k)| {
            (0..2)
                .map(|r| k[r] * levels[a[r]].error[r] / measured_error[r])
                .sum::<f64>()
        })
        .sum();
    let bits = setting_bits(model, &proposal, bs, config.window)?;
    println!(
        "proposed for {:.2} bits per element ({bits:.2} bits; sum of the predicted per-layer KLs {predicted:.4}, against {:.4} for {low}):\n{proposal}\nevaluate it with --codecs '{proposal}'",
        args.budget,
        kl.iter().map(|k| k[0] + k[1]).sum::<f64>(),
    );
    if let Some(path) = args.json {
        let json = serde_json::json!({
            "setting": low.to_string(),
            "windows": windows,
            "layers": kl.iter().enumerate().map(|(l, k)| serde_json::json!({
                "layer": l, "kl_keys": k[0], "kl_values": k[1],
                "key_codec": levels[assignment[l][0]].codec.to_string(),
                "value_codec": levels[assignment[l][1]].codec.to_string(),
            })).collect::<Vec<_>>(),
            "levels": levels.iter().map(|l| serde_json::json!({
                "codec": l.codec.to_string(), "bits": l.bits, "relative_error": l.error,
            })).collect::<Vec<_>>(),
            "budget_bits": args.budget,
            "proposal": proposal.to_string(),
            "proposal_bits": bits,
            "predicted_kl_sum": predicted,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(Proposal {
        setting: proposal,
        bits,
    })
}

/// `low` with an override per (key codec, value codec) pair of the assignment that differs
/// from its own, so the setting can be written and read back as one string.
fn proposal_setting(
    low: &CodecPair,
    assignment: &[[usize; 2]],
    levels: &[pagedkv_engine::allocate::Level],
) -> Result<CodecPair> {
    let mut groups: Vec<((pagedkv::Codec, pagedkv::Codec), Vec<usize>)> = Vec::new();
    for (layer, a) in assignment.iter().enumerate() {
        let pair = (levels[a[0]].codec, levels[a[1]].codec);
        if pair == (low.key, low.value) {
            continue;
        }
        match groups.iter_mut().find(|g| g.0 == pair) {
            Some(g) => g.1.push(layer),
            None => groups.push((pair, vec![layer])),
        }
    }
    let mut proposal = low.clone();
    for ((key, value), layers) in groups {
        proposal = proposal.with_override(LayerSet::of(layers)?, key, value);
    }
    Ok(proposal)
}
