//! `pagedkv inspect [MODEL.gguf]`: the model's KV layout, bytes per token per codec, and how many
//! sequences of a given length fit a memory budget (DESIGN §10). Reads metadata only.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use pagedkv::Codec;
use pagedkv_engine::fetch::ensure_model;
use pagedkv_engine::{ModelConfig, RopeScaling};

use crate::common::CommonArgs;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// GGUF model file (default: --model, or the fetched SmolLM2).
    path: Option<PathBuf>,
    /// KV memory budget in MiB.
    #[arg(long, default_value_t = 1024)]
    budget_mib: u64,
    /// Tokens per sequence for the "sequences that fit" column.
    #[arg(long, default_value_t = 2048)]
    context: usize,
}

pub fn run(common: &CommonArgs, args: InspectArgs) -> Result<()> {
    anyhow::ensure!(args.context > 0, "--context must be positive");
    let budget_bytes = args.budget_mib.checked_mul(1 << 20).with_context(|| {
        format!(
            "--budget-mib {} is too large (at most {} MiB)",
            args.budget_mib,
            u64::MAX >> 20
        )
    })?;
    let path = match args.path.as_deref().or(common.model.as_deref()) {
        Some(p) => p.to_path_buf(),
        None => ensure_model(None)?,
    };
    let c = ModelConfig::read(&path)?;
    println!("{}", path.display());
    println!(
        "  architecture {}, RoPE base {} {}",
        c.architecture.name(),
        c.rope_base,
        match c.rope_scaling {
            RopeScaling::None => "unscaled".to_string(),
            RopeScaling::Linear(f) => format!("scaled linearly by {f}"),
            RopeScaling::FrequencyFactors => "with per-frequency factors".to_string(),
        }
    );
    println!(
        "  layers {}, query heads {}, kv heads {} ({}), head_dim {}, hidden {}, vocab {}, context {}",
        c.layers,
        c.heads,
        c.kv_heads,
        match c.heads / c.kv_heads.max(1) {
            1 => "MHA".to_string(),
            g if c.kv_heads == 1 => format!("MQA, {g} query heads"),
            g => format!("GQA, {g} query heads per kv head"),
        },
        c.head_dim,
        c.hidden,
        c.vocab,
        c.context_len
    );
    println!(
        "  blocks of {} tokens; budget {} MiB; sequences of {} tokens",
        common.block_size, args.budget_mib, args.context
    );
    println!(
        "{:>16} {:>10} {:>12} {:>12} {:>14}",
        "codec", "bits/elem", "KV B/token", "blocks", "sequences"
    );
    let mut codecs = Codec::FIXED.to_vec();
    codecs.extend([
        Codec::FibQuant { k: 2, n: 256 },
        Codec::FibQuant { k: 4, n: 256 },
    ]);
    for codec in codecs {
        let layout = match c.kv_layout(codec, codec, common.block_size) {
            Ok(l) => l,
            Err(e) => {
                println!("{:>16} {e}", codec.to_string());
                continue;
            }
        };
        let blocks = layout.blocks_in_budget(budget_bytes);
        let per_seq = layout.blocks_for_tokens(args.context) as u64;
        println!(
            "{:>16} {:>10.2} {:>12.0} {:>12} {:>14}",
            codec.to_string(),
            layout.bits_per_element(),
            layout.kv_bytes_per_token(),
            blocks,
            blocks / per_seq
        );
    }
    Ok(())
}
