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
        default_value = "f16,bf16,int8,fp8-e4m3,fp8-e5m2,int4,int8/int4,fibquant-k2n256,fibquant-k2n256+keynorm,fibquant-k2n64,fibquant-k4n256,fibquant-k4n256+keynorm,fibquant-k4n256+keynorm+sink1,fibquant-k2n16"
    )]
    codecs: String,
    /// Tokens per window; each window starts with an empty cache.
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Evaluate at most this many windows (0: every whole window of the text; a window of
    /// 512 tokens takes about 5 s per codec on 2 cores with f32 weights).
    #[arg(long, default_value_t = 8)]
    windows: usize,
    /// Instead of the codec list: each layer's KL when only that layer is stored in this
    /// setting (KEY/VALUE allowed), then a per-layer assignment for `--budget`.
    #[arg(long)]
    sensitivity: Option<String>,
    /// Bits per element to aim for in the proposed assignment (with --sensitivity).
    #[arg(long, default_value_t = 2.5)]
    budget: f64,
    /// Codec setting of the layers the assignment keeps at higher precision.
    #[arg(long, default_value = "int8")]
    high: String,
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
}

pub fn run(common: &CommonArgs, args: EvalArgs) -> Result<()> {
    let settings = args
        .codecs
        .split(',')
        .map(|c| c.parse::<CodecPair>())
        .collect::<pagedkv::Result<Vec<_>>>()?;
    let (text, name) = match &args.text {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the text {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (DEFAULT_TEXT.to_string(), DEFAULT_TEXT_NAME.to_string()),
    };
    // f32 weights unless asked otherwise: 8-bit activations would bury the codec's own error
    let (model, tokenizer) = common.load_model_or(WeightMode::F32)?;
    let tokens = tokenizer.encode(&text)?;
    let wanted = settings.iter().any(|s| s.key_norm)
        || args
            .sensitivity
            .as_deref()
            .is_some_and(|s| s.contains("+keynorm"));
    let key_norm = if wanted {
        Some(std::sync::Arc::new(fit_key_norm(
            common, &args, &model, &tokenizer,
        )?))
    } else {
        None
    };
    let config = EvalConfig {
        window: args.window,
        block_size: common.block_size,
        max_windows: (args.windows > 0).then_some(args.windows),
        key_norm,
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
    if let Some(setting) = &args.sensitivity {
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

/// The key normalization fitted on the calibration text, for `+keynorm` settings.
fn fit_key_norm(
    common: &CommonArgs,
    args: &EvalArgs,
    model: &pagedkv_engine::Model,
    tokenizer: &pagedkv_engine::GgufTokenizer,
) -> Result<pagedkv::KeyNorm> {
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
    Ok(key_norm)
}

fn progress_bar(windows: usize) -> ProgressBar {
    ProgressBar::new(windows as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} windows, {elapsed} (eta {eta})")
            .expect("valid template"),
    )
}

/// Per-layer KL of `setting` (every other layer f32), then the most sensitive layers moved to
/// `--high` until the average rate reaches `--budget` bits per element.
fn sensitivity(
    model: &pagedkv_engine::Model,
    tokens: &[u32],
    setting: &str,
    args: &EvalArgs,
    config: EvalConfig,
    windows: usize,
) -> Result<()> {
    let low: CodecPair = setting.parse()?;
    let high: CodecPair = args.high.parse()?;
    let layers = model.config().layers;
    let reference = CodecPair::same(pagedkv::Codec::F32);
    let settings = (0..layers)
        .map(|l| {
            let pair = reference.with_override(LayerSet::of([l])?, low.key, low.value);
            Ok(CodecPair {
                key_norm: low.key_norm,
                sinks: low.sinks,
                recent: low.recent,
                ..pair
            })
        })
        .collect::<pagedkv::Result<Vec<_>>>()?;
    let bar = progress_bar(windows);
    let rows = evaluate(model, tokens, &settings, config.clone(), |done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    println!("sensitivity of {low}: KL when only that layer is stored in it");
    println!("{:>5} {:>10} {:>8} {:>10}", "layer", "KL", "top-1", "PPL");
    let per_layer = &rows[1..];
    for (l, r) in per_layer.iter().enumerate() {
        println!(
            "{l:>5} {:>10.5} {:>7.1}% {:>10.3}",
            r.kl_mean,
            100.0 * r.top1,
            r.ppl
        );
    }
    // the most sensitive layers first; add them to the high set while the budget allows
    let mut order: Vec<usize> = (0..layers).collect();
    order.sort_by(|a, b| per_layer[*b].kl_mean.total_cmp(&per_layer[*a].kl_mean));
    let rate = |set: &[usize]| -> Result<f64> {
        let pair = if set.is_empty() {
            low
        } else {
            low.with_override(LayerSet::of(set.iter().copied())?, high.key, high.value)
        };
        Ok(setting_bits(
            model,
            &pair,
            config.block_size,
            config.window,
        )?)
    };
    let mut chosen: Vec<usize> = Vec::new();
    for layer in order {
        let mut next = chosen.clone();
        next.push(layer);
        if rate(&next)? > args.budget {
            break;
        }
        chosen = next;
    }
    let proposal = if chosen.is_empty() {
        low
    } else {
        chosen.sort_unstable();
        low.with_override(LayerSet::of(chosen.iter().copied())?, high.key, high.value)
    };
    println!(
        "proposed for {:.2} bits per element: {proposal} ({:.2} bits; evaluate it with --codecs '{proposal}')",
        args.budget,
        rate(&chosen)?
    );
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "setting": low.to_string(),
            "layers": per_layer.iter().enumerate().map(|(l, r)| serde_json::json!({
                "layer": l, "kl_mean": r.kl_mean, "top1": r.top1, "ppl": r.ppl,
            })).collect::<Vec<_>>(),
            "budget_bits": args.budget,
            "proposal": proposal.to_string(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
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
