//! `pagedkv eval`: the quality of each codec setting on real text (DESIGN §10), as a table, JSON
//! and a chart.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pagedkv::LayerSet;
use pagedkv_engine::eval::{evaluate, setting_bits, CodecPair, EvalConfig, EvalRow};
use pagedkv_engine::WeightMode;

use crate::common::CommonArgs;

/// The default text: Lewis Carroll, "Alice's Adventures in Wonderland" (1865, public domain).
const DEFAULT_TEXT: &str = include_str!("../../../data/alice-in-wonderland.txt");
const DEFAULT_TEXT_NAME: &str = "data/alice-in-wonderland.txt (built in)";

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Text to evaluate on (default: "Alice's Adventures in Wonderland", built in).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Codec settings (comma-separated): a codec for keys and values, or KEY/VALUE.
    #[arg(
        long,
        default_value = "f16,bf16,int8,fp8-e4m3,fp8-e5m2,int4,int2,int8/int4,fibquant-k2n256,fibquant-k2n256+keynorm,fibquant-k2n64,fibquant-k4n256,fibquant-k4n256+keynorm,fibquant-k4n256+keynorm+sink1,fibquant-k4n256+keysplit+sink1,fibquant-k2n16"
    )]
    codecs: String,
    /// Tokens per window; each window starts with an empty cache.
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Evaluate at most this many windows (0: every whole window of the text; a window of
    /// 512 tokens takes about 5 s per codec on 2 cores with f32 weights).
    #[arg(long, default_value_t = 8)]
    windows: usize,
    /// Skip this many windows at the start of the text (e.g. a Project Gutenberg header).
    #[arg(long, default_value_t = 0)]
    skip_windows: usize,
    /// Instead of the codec list: the KL when only one layer's keys, or values, are stored in
    /// this setting (KEY/VALUE allowed), then a codec from `--levels` for every layer's keys and
    /// values for `--budget`.
    #[arg(long)]
    sensitivity: Option<String>,
    /// Bits per element to aim for in the proposed assignment (with --sensitivity).
    #[arg(long, default_value_t = 2.5)]
    budget: f64,
    /// Codecs the assignment may give a layer's keys or values (with --sensitivity; the
    /// setting's own are always among them).
    #[arg(
        long,
        default_value = "fibquant-k4n64,fibquant-k4n128,fibquant-k4n256,fibquant-k4n512,fibquant-k4n1024,fibquant-k4n4096,fibquant-k2n256,int8"
    )]
    levels: String,
    /// Text the `+keynorm` settings' key normalization is fitted on (default: "Around the World in Eighty
    /// Days", built in; never the evaluated text).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Write the rows as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw KL and perplexity against bits per element into this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Instead of evaluating: print the table (and draw `--plot`) from the rows of an earlier
    /// run's `--json`.
    #[arg(long, conflicts_with_all = ["sensitivity", "json"])]
    from_json: Option<PathBuf>,
}

pub fn run(common: &CommonArgs, args: EvalArgs) -> Result<()> {
    if let Some(path) = &args.from_json {
        let json =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let rows = rows_from_json(&json)
            .with_context(|| format!("reading rows from {}", path.display()))?;
        print_table(&rows);
        if let Some(plot) = &args.plot {
            crate::plot::eval_chart(&rows, &text_name(&args), plot)
                .with_context(|| format!("drawing {}", plot.display()))?;
            println!("chart: {}", plot.display());
        }
        return Ok(());
    }
    let settings = args
        .codecs
        .split(',')
        .map(|c| c.parse::<CodecPair>())
        .collect::<pagedkv::Result<Vec<_>>>()?;
    let name = text_name(&args);
    let text = match &args.text {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the text {}", path.display()))?,
        None => DEFAULT_TEXT.to_string(),
    };
    // f32 weights unless asked otherwise: 8-bit activations would bury the codec's own error
    let (model, tokenizer) = common.load_model_or(WeightMode::F32)?;
    let mut tokens = tokenizer.encode(&text)?;
    let skipped = (args.skip_windows * args.window).min(tokens.len());
    tokens.drain(..skipped);
    let probed = args
        .sensitivity
        .as_deref()
        .map(str::parse::<CodecPair>)
        .transpose()?;
    let wanted = settings.iter().chain(&probed).any(|s| s.key_norm);
    let split_wanted = settings.iter().chain(&probed).any(|s| s.key_split);
    let (key_norm, key_stats) = if wanted {
        let (norm, stats) = fit_key_calibration(common, &args, &model, &tokenizer, split_wanted)?;
        (
            Some(std::sync::Arc::new(norm)),
            stats.map(std::sync::Arc::new),
        )
    } else {
        (None, None)
    };
    let config = EvalConfig {
        window: args.window,
        block_size: common.block_size,
        max_windows: (args.windows > 0).then_some(args.windows),
        key_norm,
        key_stats,
    };
    let all = tokens.len() / args.window.max(1);
    let windows = if args.windows > 0 {
        all.min(args.windows)
    } else {
        all
    };
    println!(
        "eval: {name}: {} tokens, {windows} windows of {}, block size {}, weights {:?}, threads {}",
        tokens.len(),
        args.window,
        common.block_size,
        model.weight_mode(),
        common.threads_label()
    );
    if let Some(setting) = probed {
        return sensitivity(&model, &tokens, setting, &args, config, windows);
    }
    let bar = progress_bar(windows);
    let started = Instant::now();
    let rows = evaluate(&model, &tokens, &settings, config, |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    print_table(&rows);
    println!(
        "{} predicted tokens per codec, {:.0} s",
        rows[0].tokens,
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &args.json {
        let json: Vec<_> = rows.iter().map(row_json).collect();
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        crate::plot::eval_chart(&rows, &name, path)
            .with_context(|| format!("drawing {}", path.display()))?;
        println!("chart: {}", path.display());
    }
    Ok(())
}

/// The key normalization fitted on the calibration text, for `+keynorm` settings, and with
/// `with_stats` the key statistics of `+keysplit` settings.
fn fit_key_calibration(
    common: &CommonArgs,
    args: &EvalArgs,
    model: &pagedkv_engine::Model,
    tokenizer: &pagedkv_engine::GgufTokenizer,
    with_stats: bool,
) -> Result<(
    pagedkv::KeyNorm,
    Option<pagedkv_engine::calibrate::KeyStats>,
)> {
    use pagedkv_engine::calibrate;
    let (text, name) = match &args.calibration {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the calibration text {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (
            calibrate::DEFAULT_TEXT.to_string(),
            "data/around-the-world-in-80-days.txt (built in)".to_string(),
        ),
    };
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
    let key_norm = calibrate::fit_key_norm(model, &tokens, window, windows, common.block_size)?;
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

fn progress_bar(windows: usize) -> ProgressBar {
    ProgressBar::new(windows as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} windows, {elapsed} (eta {eta})")
            .expect("valid template"),
    )
}

/// Per-(layer, role) KL of the setting `low` (only that layer's keys, or values, stored in it; every
/// other layer f32), then a codec from `--levels` for each layer's keys and values that
/// minimises the predicted KL within `--budget` bits per element (see
/// [`pagedkv_engine::allocate`]).
fn sensitivity(
    model: &pagedkv_engine::Model,
    tokens: &[u32],
    low: CodecPair,
    args: &EvalArgs,
    config: EvalConfig,
    windows: usize,
) -> Result<()> {
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
    if let Some(path) = &args.json {
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
    Ok(())
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

fn print_table(rows: &[EvalRow]) {
    let base = rows[0].ppl;
    println!(
        "{:<22} {:>9} {:>10} {:>10} {:>8} {:>10} {:>8}",
        "codec", "bits/elem", "KV B/token", "KL", "top-1", "PPL", "ΔPPL"
    );
    for r in rows {
        println!(
            "{:<22} {:>9.2} {:>10.0} {:>10.5} {:>7.1}% {:>10.3} {:>+7.2}%",
            r.codecs.to_string(),
            r.bits_per_element,
            r.kv_bytes_per_token,
            r.kl_mean,
            100.0 * r.top1,
            r.ppl,
            100.0 * (r.ppl / base - 1.0)
        );
    }
}

/// How the evaluated text is named in the output: its path, or the built-in text's name.
fn text_name(args: &EvalArgs) -> String {
    match &args.text {
        Some(path) => path.display().to_string(),
        None => DEFAULT_TEXT_NAME.to_string(),
    }
}

/// The rows of an `eval --json` file.
fn rows_from_json(json: &str) -> Result<Vec<EvalRow>> {
    let values: Vec<serde_json::Value> = serde_json::from_str(json)?;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let number = |key: &str| {
                v[key]
                    .as_f64()
                    .with_context(|| format!("row {i}: `{key}` is not a number"))
            };
            let codec = v["codec"]
                .as_str()
                .with_context(|| format!("row {i}: `codec` is not a string"))?;
            Ok(EvalRow {
                codecs: codec.parse()?,
                bits_per_element: number("bits_per_element")?,
                kv_bytes_per_token: number("kv_bytes_per_token")?,
                ppl: number("ppl")?,
                kl_mean: number("kl_mean")?,
                top1: number("top1")?,
                tokens: v["tokens"]
                    .as_u64()
                    .with_context(|| format!("row {i}: `tokens` is not a count"))?
                    as usize,
            })
        })
        .collect()
}

fn row_json(r: &EvalRow) -> serde_json::Value {
    serde_json::json!({
        "codec": r.codecs.to_string(),
        "key_codec": r.codecs.key.to_string(),
        "value_codec": r.codecs.value.to_string(),
        "bits_per_element": r.bits_per_element,
        "kv_bytes_per_token": r.kv_bytes_per_token,
        "ppl": r.ppl,
        "kl_mean": r.kl_mean,
        "top1": r.top1,
        "tokens": r.tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_rows_read_back_as_written() {
        let row = EvalRow {
            codecs: "fibquant-k4n256@int8:0+1+keysplit+sink1".parse().unwrap(),
            bits_per_element: 2.5,
            kv_bytes_per_token: 3595.5,
            ppl: 24.96,
            kl_mean: 0.047,
            top1: 0.861,
            tokens: 4088,
        };
        let json = serde_json::to_string(&vec![row_json(&row)]).unwrap();
        let back = rows_from_json(&json).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].codecs, row.codecs);
        assert_eq!(back[0].bits_per_element, row.bits_per_element);
        assert_eq!(back[0].tokens, row.tokens);
        // a missing field or a foreign codec is an error, not a panic
        assert!(rows_from_json(r#"[{"codec": "f16"}]"#).is_err());
        assert!(rows_from_json(r#"[{"codec": "int9", "bits_per_element": 1}]"#).is_err());
        assert!(rows_from_json("{").is_err());
    }
}
