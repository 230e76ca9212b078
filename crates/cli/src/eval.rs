//! `pagedkv eval`: the quality of each codec setting on real text (DESIGN §10), as a table, JSON
//! and a chart.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pagedkv_engine::eval::{evaluate, CodecPair, EvalConfig, EvalRow};
use pagedkv_engine::WeightMode;

use crate::common::CommonArgs;

pub(crate) mod calibration;
use calibration::{fit_key_calibration, sensitivity, SensitivityArgs};

/// The default text: Lewis Carroll, "Alice's Adventures in Wonderland" (1865, public domain).
const DEFAULT_TEXT: &str = include_str!("../../../data/alice-in-wonderland.txt");
const DEFAULT_TEXT_NAME: &str = "data/alice-in-wonderland.txt (built in)";

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Text to evaluate on (default: "Alice's Adventures in Wonderland", built in).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Codec settings (comma-separated): a codec for keys and values, or KEY/VALUE (with
    /// --kv-profile: the profile's setting instead).
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
    let mut settings = args
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
    let profile = common.profile(&model)?;
    let config = match &profile {
        Some(profile) => {
            anyhow::ensure!(
                probed.is_none(),
                "--sensitivity measures a setting, not a --kv-profile"
            );
            // the profile's setting with its own means and plans: nothing is fitted
            settings = vec![profile.setting.clone()];
            EvalConfig {
                window: args.window,
                block_size: common.block_size,
                max_windows: (args.windows > 0).then_some(args.windows),
                key_norm: profile
                    .key_norm(model.config(), common.block_size)?
                    .map(std::sync::Arc::new),
                key_stats: None,
                key_split: profile.key_split(model.config())?.map(std::sync::Arc::new),
            }
        }
        None => {
            let wanted = settings.iter().chain(&probed).any(|s| s.key_norm);
            let split_wanted = settings.iter().chain(&probed).any(|s| s.key_split);
            let (key_norm, key_stats) = if wanted {
                let (norm, stats) = fit_key_calibration(
                    &model,
                    &tokenizer,
                    args.calibration.as_deref(),
                    common.block_size,
                    split_wanted,
                )?;
                (
                    Some(std::sync::Arc::new(norm)),
                    stats.map(std::sync::Arc::new),
                )
            } else {
                (None, None)
            };
            EvalConfig {
                window: args.window,
                block_size: common.block_size,
                max_windows: (args.windows > 0).then_some(args.windows),
                key_norm,
                key_stats,
                key_split: None,
            }
        }
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
        let assign = SensitivityArgs {
            levels: &args.levels,
            budget: args.budget,
            json: args.json.as_deref(),
        };
        sensitivity(&model, &tokens, setting, &assign, config, windows)?;
        return Ok(());
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

fn progress_bar(windows: usize) -> ProgressBar {
    ProgressBar::new(windows as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} windows, {elapsed} (eta {eta})")
            .expect("valid template"),
    )
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
