//! The `pagedkv` binary (DESIGN §10).

use anyhow::Result;
use clap::{Parser, Subcommand};
use pagedkv::{Codec, KvCacheManager, KvLayout, LayoutSpec, SeqId};

#[derive(Parser)]
#[command(
    name = "pagedkv",
    version,
    about = "Paged, compressed KV cache for LLM inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a batch of requests that share a system prompt through the paged cache.
    Demo {
        /// Number of requests.
        #[arg(long, default_value_t = 16)]
        requests: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Demo { requests } => demo(requests),
    }
}

/// Block-manager walk-through with SmolLM2-135M's geometry: requests sharing a 200-token system
/// prompt are admitted, decode 64 tokens each, and free their blocks.
fn demo(requests: u64) -> Result<()> {
    let layout = KvLayout::new(LayoutSpec::new(30, 3, 9, 64, Codec::F16))?;
    let mut cache = KvCacheManager::with_budget(layout, 64 << 20, b"SmolLM2-135M-Instruct.Q4_1")?;
    let system: Vec<u32> = (1000..1200).collect();
    let row = vec![0.5f32; layout.token_width()];
    let mut written = 0usize;
    for r in 0..requests {
        let seq = SeqId(r);
        let mut prompt = system.clone();
        prompt.extend([r as u32, 7, 8, 9]);
        let adm = cache.admit(seq, &prompt)?;
        let mut fill = |cache: &mut KvCacheManager, tokens: &[u32]| -> Result<()> {
            let start = cache.table(seq)?.len();
            for pos in start..start + tokens.len() {
                for layer in 0..layout.layers() {
                    cache.write_token(seq, layer, pos, &row, &row)?;
                }
            }
            written += tokens.len();
            cache.commit(seq, tokens)?;
            Ok(())
        };
        fill(&mut cache, &prompt[adm.cached_tokens..])?;
        for step in 0..64u32 {
            cache.reserve(seq, 1)?;
            fill(&mut cache, &[step])?;
        }
    }
    let stats = cache.prefix_stats();
    println!(
        "requests {requests}; tokens computed {written}; prefix hit rate {:.1}%; KV bytes/token {:.0}; blocks used {}/{}",
        100.0 * stats.hit_rate(),
        layout.kv_bytes_per_token(),
        cache.counts().owned,
        cache.pool().num_blocks()
    );
    Ok(())
}
