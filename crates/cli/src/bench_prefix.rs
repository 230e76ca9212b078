//! `pagedkv bench prefix`: time to first token of a long shared prompt, per codec, when its
//! blocks are computed from scratch and when they come from each level below the scheduler —
//! the pool, the host tier, the disk tier and a shared Redis store — with the payload bytes
//! moved per token (DESIGN §8, §12).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use pagedkv::tier::{DiskTier, HostTier, RemoteStats, TieredStore};
use pagedkv::{Codec, KvCacheManager};
use pagedkv_engine::{Event, Model, Request, SamplingParams, Scheduler, SchedulerConfig};
use pagedkv_redis::{LocalRedis, DEFAULT_FETCH_BUDGET};

/// The fetch budget of the engine that times a prompt from Redis.
const WHOLE_PROMPT_BUDGET: Duration = Duration::from_secs(30);

use crate::bench::median;
use crate::common::{attach_shared_tier, CommonArgs};

#[derive(Debug, Args)]
pub struct PrefixBench {
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Codecs to measure (comma-separated).
    #[arg(long, default_value = "f16,int8,int4,fibquant-k4n256")]
    codecs: String,
    /// A Redis to use (default: a `redis-server` from PATH started on a free loopback port;
    /// `scripts/redis-server` installs one).
    #[arg(long)]
    redis: Option<String>,
    /// Directory of the disk tier (default: a fresh one under the system's temporary directory).
    #[arg(long)]
    disk_dir: Option<PathBuf>,
    /// Rounds per level (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Write the figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Times of one codec, in seconds.
struct Row {
    codec: String,
    payload_bytes_per_token: f64,
    scratch: f64,
    pool: f64,
    host: f64,
    disk: f64,
    redis: f64,
}

pub fn run(common: &CommonArgs, args: PrefixBench) -> Result<()> {
    anyhow::ensure!(args.tokens >= 32, "--tokens must be at least 32");
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let codecs = args
        .codecs
        .split(',')
        .map(|c| c.trim().parse::<Codec>())
        .collect::<pagedkv::Result<Vec<_>>>()?;
    let (model, _) = common.load_model()?;
    anyhow::ensure!(
        args.tokens < model.config().context_len,
        "--tokens must be below the model's context of {}",
        model.config().context_len
    );
    let _local_redis;
    let url = match &args.redis {
        Some(url) => url.clone(),
        None => {
            let binary = which_redis_server()?;
            let server = LocalRedis::start(&binary, &[]).context("starting redis-server")?;
            let url = server.url();
            _local_redis = server;
            url
        }
    };
    let disk_dir = match &args.disk_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("pagedkv-bench-prefix-{}", std::process::id())),
    };
    println!(
        "time to first token of a {}-token prompt, by where its blocks come from ({} threads, median of {}):\n",
        args.tokens,
        common.threads_label(),
        args.rounds
    );
    println!("| codec | payload bytes / token | from scratch | pool | host tier | disk tier | Redis | Redis ÷ scratch |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (i, codec) in codecs.iter().enumerate() {
        let row = measure(common, &model, *codec, &args, &url, &disk_dir, i)?;
        println!(
            "| {} | {:.0} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.3}× |",
            row.codec,
            row.payload_bytes_per_token,
            row.scratch * 1e3,
            row.pool * 1e3,
            row.host * 1e3,
            row.disk * 1e3,
            row.redis * 1e3,
            row.redis / row.scratch
        );
        rows.push(row);
    }
    if args.disk_dir.is_none() {
        std::fs::remove_dir_all(&disk_dir).ok();
    }
    if let Some(path) = &args.json {
        let json: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "codec": r.codec, "tokens": args.tokens,
                    "payload_bytes_per_token": r.payload_bytes_per_token,
                    "ttft_scratch_s": r.scratch, "ttft_pool_s": r.pool, "ttft_host_s": r.host,
                    "ttft_disk_s": r.disk, "ttft_redis_s": r.redis,
                })
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")?;
    }
    Ok(())
}

fn which_redis_server() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
        .context("no redis-server on PATH: run scripts/redis-server, or give --redis URL")
}

/// A prompt of `len` tokens unique to (`codec_index`, `variant`), so no level serves another
/// level's blocks.
fn prompt(len: usize, codec_index: usize, variant: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 100 + (i * 13 + variant * 7919 + codec_index as u32 * 104_729) % 20_000)
        .collect()
}

/// Seconds until the first token of `prompt` on `cache`; returns the cache for reuse.
fn time_to_first_token(
    model: &Model,
    cache: KvCacheManager,
    prompt: &[u32],
) -> Result<(f64, KvCacheManager)> {
    let config = SchedulerConfig {
        max_step_tokens: 2048,
        ..SchedulerConfig::default()
    };
    let mut scheduler = Scheduler::new(model, cache, config)?;
    scheduler.submit(Request::new(
        0,
        prompt.to_vec(),
        1,
        SamplingParams::default(),
    ))?;
    let started = Instant::now();
    let mut first = None;
    scheduler.run(|e| {
        if let (Event::Token { .. }, None) = (e, first) {
            first = Some(started.elapsed());
        }
    })?;
    let seconds = first.unwrap_or_else(|| started.elapsed()).as_secs_f64();
    Ok((seconds, scheduler.into_cache()))
}

fn measure(
    common: &CommonArgs,
    model: &Model,
    codec: Codec,
    args: &PrefixBench,
    url: &str,
    disk_dir: &std::path::Path,
    codec_index: usize,
) -> Result<Row> {
    let layout = model.config().kv_layout(codec, codec, common.block_size)?;
    let blocks = layout.blocks_for_tokens(args.tokens) + 8;
    let fresh = || KvCacheManager::new(layout.clone(), blocks, &model.fingerprint().key_bytes());
    let (mut scratch, mut pool, mut host, mut disk, mut redis) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut payload_bytes = 0.0;
    for round in 0..args.rounds as u32 {
        let p = prompt(args.tokens, codec_index, round);
        // from scratch, then the same prompt again from the pool
        let (t, cache) = time_to_first_token(model, fresh()?, &p)?;
        scratch.push(t);
        let (t, _) = time_to_first_token(model, cache, &p)?;
        pool.push(t);
        // one engine computes and publishes the prompt (not timed) ...
        let mut cache = fresh()?;
        let published = attach_shared_tier(&mut cache, model, url, None, DEFAULT_FETCH_BUDGET)?;
        let (_, cache) = time_to_first_token(model, cache, &p)?;
        drop(cache); // waits for the queued writes
        anyhow::ensure!(
            RemoteStats::get(&published.write_errors) == 0
                && RemoteStats::get(&published.writes_dropped) == 0,
            "writes to {url} failed"
        );
        // ... and another, with an empty cache, finds all of it in Redis (a budget that lets
        // the whole prompt come: the time measured is fetching it, not a cut and a recompute)
        let mut cache = fresh()?;
        let fetched = attach_shared_tier(&mut cache, model, url, None, WHOLE_PROMPT_BUDGET)?;
        let (t, _) = time_to_first_token(model, cache, &p)?;
        redis.push(t);
        let cacheable = p.len().saturating_sub(1) / layout.block_size();
        anyhow::ensure!(
            RemoteStats::get(&fetched.hits) == cacheable as u64,
            "{} of {cacheable} blocks came from {url}",
            RemoteStats::get(&fetched.hits)
        );
        // host and disk: a second prompt of the same length evicts the first one's blocks from
        // a pool that holds one prompt, down to the tier
        for (level, times) in [("host", &mut host), ("disk", &mut disk)] {
            let mut cache = fresh()?;
            let dir = disk_dir.join(format!("{codec}-{round}"));
            cache.set_prefix_tier(match level {
                "host" => TieredStore::in_memory(1 << 34),
                _ => TieredStore {
                    host: HostTier::new(0),
                    disk: Some(DiskTier::open(&dir, 1 << 34)?),
                },
            });
            let (_, cache) = time_to_first_token(model, cache, &p)?;
            let other = prompt(args.tokens, codec_index, 1000 + round);
            let (_, cache) = time_to_first_token(model, cache, &other)?;
            if level == "host" {
                // the evicted blocks' payloads, as stored (and as sent to Redis)
                let host = &cache.prefix_tier().context("the tier is set")?.host;
                payload_bytes =
                    host.used_bytes() as f64 / (host.len() * layout.block_size()).max(1) as f64;
            }
            let (t, _) = time_to_first_token(model, cache, &p)?;
            times.push(t);
            std::fs::remove_dir_all(&dir).ok();
        }
    }
    Ok(Row {
        codec: codec.to_string(),
        payload_bytes_per_token: payload_bytes,
        scratch: median(scratch),
        pool: median(pool),
        host: median(host),
        disk: median(disk),
        redis: median(redis),
    })
}
