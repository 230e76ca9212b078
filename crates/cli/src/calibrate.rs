//! `pagedkv calibrate`: makes a KV profile (see `pagedkv_engine::profile`) for the model. On a
//! calibration text it fits the key means and key statistics, measures each layer's keys' and
//! values' sensitivity as `eval --sensitivity` does, assigns codecs from `--levels` for
//! `--budget` bits per element, and writes the setting with its means and split plans, bound to
//! the model file. `--kv-profile FILE` then applies it on every command without re-fitting.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use pagedkv_engine::calibrate::KeyStats;
use pagedkv_engine::eval::{CodecPair, EvalConfig};
use pagedkv_engine::profile::{KvProfile, Provenance};
use pagedkv_engine::WeightMode;

use crate::common::CommonArgs;
use crate::eval::calibration::{
    calibration_text, fit_key_calibration, sensitivity, SensitivityArgs,
};

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// The calibration text (default: "Around the World in Eighty Days", built in). Never the
    /// text you evaluate on.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Bits per element the assignment aims for.
    #[arg(long, default_value_t = 2.5)]
    budget: f64,
    /// The setting whose layers are measured and re-assigned (KEY/VALUE and +options allowed).
    #[arg(long, default_value = "fibquant-k4n256+keysplit+sink1")]
    setting: String,
    /// Codecs the assignment may give a layer's keys or values (the setting's own are always
    /// among them).
    #[arg(
        long,
        default_value = "fibquant-k4n64,fibquant-k4n128,fibquant-k4n256,fibquant-k4n512,fibquant-k4n1024,fibquant-k4n4096,fibquant-k2n256,fibquant-k2n1024,int4,int8"
    )]
    levels: String,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Windows the sensitivity is measured on (each costs about 5 minutes on 2 cores).
    #[arg(long, default_value_t = 4)]
    windows: usize,
    /// Windows skipped at the start of the text (e.g. a Project Gutenberg header).
    #[arg(long, default_value_t = 1)]
    skip_windows: usize,
    /// Where to write the profile.
    #[arg(long)]
    out: PathBuf,
    /// Also write the per-layer KLs and levels as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(common: &CommonArgs, args: CalibrateArgs) -> Result<()> {
    anyhow::ensure!(
        common.kv_profile.is_none(),
        "calibrate makes a profile; it does not take --kv-profile"
    );
    anyhow::ensure!(args.windows > 0, "--windows must be at least 1");
    let low: CodecPair = args.setting.parse()?;
    // f32 weights unless asked otherwise, as `eval`: the codecs' error alone is measured
    let (model, tokenizer) = common.load_model_or(WeightMode::F32)?;
    let started = Instant::now();
    let (key_norm, key_stats) = if low.key_norm {
        let (norm, stats) = fit_key_calibration(
            &model,
            &tokenizer,
            args.text.as_deref(),
            common.block_size,
            low.key_split,
        )?;
        (Some(norm), stats)
    } else {
        (None, None)
    };
    let (text, name) = calibration_text(args.text.as_deref())?;
    let mut tokens = tokenizer.encode(&text)?;
    let skipped = args
        .skip_windows
        .saturating_mul(args.window)
        .min(tokens.len());
    tokens.drain(..skipped);
    let windows = args.windows.min(tokens.len() / args.window.max(1));
    anyhow::ensure!(
        windows > 0,
        "the calibration text {name} has no window of {} tokens after skipping {}",
        args.window,
        args.skip_windows
    );
    let config = EvalConfig {
        window: args.window,
        block_size: common.block_size,
        max_windows: Some(windows),
        key_norm: key_norm.clone().map(std::sync::Arc::new),
        key_stats: key_stats.clone().map(std::sync::Arc::new),
        key_split: None,
    };
    let assign = SensitivityArgs {
        levels: &args.levels,
        budget: args.budget,
        json: args.json.as_deref(),
    };
    let proposal = sensitivity(&model, &tokens, low, &assign, config, windows)?;
    let profile = KvProfile {
        model: model.fingerprint(),
        geometry: (
            model.config().layers,
            model.config().kv_heads,
            model.config().head_dim,
        ),
        rope_base: model.config().rope_base,
        key_means: key_norm.as_ref().map(|norm| means(norm, &model)),
        key_split: split_plans(key_stats.as_ref(), &proposal.setting, &model, common)?,
        setting: proposal.setting,
        provenance: Provenance {
            text: name,
            windows,
            skip_windows: args.skip_windows,
            window: args.window,
            budget_bits: args.budget,
            bits_per_element: proposal.bits,
        },
    };
    profile
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "profile written: {} ({:.2} bits per element, checksum {}, {:.0} s)\nuse it with --kv-profile {0}, e.g. pagedkv eval --kv-profile {0}",
        args.out.display(),
        proposal.bits,
        profile.checksum(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The fitted pre-RoPE key means, `layers × kv_heads × head_dim`.
fn means(norm: &pagedkv::KeyNorm, model: &pagedkv_engine::Model) -> Vec<f32> {
    let c = model.config();
    (0..c.layers)
        .flat_map(|layer| (0..c.kv_heads).map(move |head| (layer, head)))
        .flat_map(|(layer, head)| norm.mean(layer, head).to_vec())
        .collect()
}

/// The split plans of the assignment's key codecs, from the measured statistics.
fn split_plans(
    stats: Option<&KeyStats>,
    setting: &CodecPair,
    model: &pagedkv_engine::Model,
    common: &CommonArgs,
) -> Result<Option<Vec<Option<pagedkv::SplitPlan>>>> {
    let Some(stats) = stats.filter(|_| setting.key_split) else {
        return Ok(None);
    };
    let layout = model.config().kv_layout_with(
        setting.key,
        setting.value,
        common.block_size,
        setting.layer_overrides.clone(),
    )?;
    let split = stats.split(|layer| layout.key_codec(layer))?;
    Ok(Some(
        (0..model.config().layers)
            .map(|layer| split.plan(layer).cloned())
            .collect(),
    ))
}
