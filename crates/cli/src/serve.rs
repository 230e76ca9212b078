//! `pagedkv serve`: the OpenAI-compatible server (DESIGN §11) with the common flags.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use pagedkv::tier::{DiskTier, HostTier, TieredStore};
use pagedkv_engine::{Preemption, SchedulerConfig};
use pagedkv_server::{Loaded, ServerConfig};

use crate::common::{CommonArgs, SharedTierArgs};

/// What happens to a sequence preempted for lack of blocks.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PreemptionFlag {
    /// Its blocks go to host memory and come back bit for bit.
    Swap,
    /// Its blocks are freed and computed again on resumption.
    Recompute,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// KV cache budget in MiB.
    #[arg(long, default_value_t = 256)]
    cache_mib: u64,
    /// The model id clients send as `model` (and `/v1/models` lists).
    #[arg(long, default_value = "SmolLM2-135M-Instruct")]
    model_name: String,
    /// Requests accepted but not yet running; more are answered 429 with `Retry-After`.
    #[arg(long, default_value_t = 256)]
    max_queued_requests: usize,
    /// Most sequences decoding together.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Most tokens one batched forward computes (decode tokens plus prefill chunks).
    #[arg(long, default_value_t = 512)]
    max_step_tokens: usize,
    /// Largest request body in KiB; larger ones are answered 413.
    #[arg(long, default_value_t = 4096)]
    max_body_kib: usize,
    /// Bearer token required by the cache admin routes (lookup, pin, unpin); without it they
    /// are disabled.
    #[arg(long)]
    admin_token: Option<String>,
    /// Take each request's cache salt from this header when present (e.g. set by a gateway
    /// per tenant), instead of the `cache_salt` field.
    #[arg(long)]
    salt_from_header: Option<String>,
    /// Most MiB of cache that pinned prefixes may hold.
    #[arg(long, default_value_t = 64)]
    pin_budget_mib: u64,
    /// Host memory (MiB) for prefix blocks evicted from the pool (0: none).
    #[arg(long, default_value_t = 0)]
    host_tier_mib: u64,
    /// Directory of a disk tier below the host tier (needs --host-tier-mib).
    #[arg(long)]
    disk_tier: Option<PathBuf>,
    /// Capacity of the disk tier in MiB.
    #[arg(long, default_value_t = 4096)]
    disk_tier_mib: u64,
    /// What happens to a sequence preempted for lack of blocks.
    #[arg(long, value_enum, default_value_t = PreemptionFlag::Swap)]
    preemption: PreemptionFlag,
    #[command(flatten)]
    shared: SharedTierArgs,
}

pub fn run(common: &CommonArgs, args: ServeArgs, pool: rayon::ThreadPool) -> Result<()> {
    anyhow::ensure!(args.max_running > 0, "--max-running must be at least 1");
    anyhow::ensure!(
        args.max_step_tokens > 0,
        "--max-step-tokens must be at least 1"
    );
    anyhow::ensure!(
        args.max_queued_requests > 0,
        "--max-queued-requests must be at least 1"
    );
    let mib = |n: u64, flag: &str| {
        n.checked_mul(1 << 20)
            .with_context(|| format!("{flag} {n} is too large"))
    };
    let max_body_bytes = args
        .max_body_kib
        .checked_mul(1024)
        .context("--max-body-kib is too large")?;
    let pin_budget_bytes = mib(args.pin_budget_mib, "--pin-budget-mib")?;
    let host_tier_bytes = mib(args.host_tier_mib, "--host-tier-mib")?;
    let disk_tier_bytes = mib(args.disk_tier_mib, "--disk-tier-mib")?;
    anyhow::ensure!(
        args.disk_tier.is_none() || host_tier_bytes > 0,
        "--disk-tier needs --host-tier-mib (the disk tier takes what the host tier evicts)"
    );
    // check the codec flags and the profile now, not after the model has loaded
    common.codecs()?;
    if let Some(path) = &common.kv_profile {
        pagedkv_engine::KvProfile::load(path)?;
    }
    let config = ServerConfig {
        model_name: args.model_name.clone(),
        max_queued_requests: args.max_queued_requests,
        max_body_bytes,
        admin_token: args.admin_token.clone(),
        salt_from_header: args.salt_from_header.clone(),
        pin_budget_bytes,
        scheduler: SchedulerConfig {
            max_step_tokens: args.max_step_tokens,
            max_running: args.max_running,
            preemption: match args.preemption {
                PreemptionFlag::Swap => Preemption::Swap {
                    host_bytes: 1 << 30,
                },
                PreemptionFlag::Recompute => Preemption::Recompute,
            },
        },
    };
    let loader_args = common.clone();
    let cache_mib = args.cache_mib;
    let disk_dir = args.disk_tier.clone();
    let shared_tier = args.shared.clone();
    let loader = Box::new(move || {
        let load = || -> Result<Loaded> {
            let (model, tokenizer) = loader_args.load_model()?;
            let mut cache = loader_args.cache(&model, cache_mib)?;
            if host_tier_bytes > 0 {
                let disk = match &disk_dir {
                    Some(dir) => Some(
                        DiskTier::open(dir, disk_tier_bytes)
                            .with_context(|| format!("opening the disk tier {}", dir.display()))?,
                    ),
                    None => None,
                };
                cache.set_prefix_tier(TieredStore {
                    host: HostTier::new(host_tier_bytes),
                    disk,
                });
            }
            let remote_stats = shared_tier.attach(&mut cache, &model)?;
            eprintln!(
                "model loaded: {} blocks of {} tokens, {}",
                cache.pool().num_blocks(),
                cache.layout().block_size(),
                loader_args.cache_label(cache.layout())
            );
            Ok(Loaded {
                model,
                tokenizer,
                cache,
                remote_stats,
            })
        };
        load().map_err(Into::into)
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    runtime.block_on(async move {
        let address = SocketAddr::new(args.host, args.port);
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address}"))?;
        eprintln!(
            "pagedkv serve: listening on http://{} (model `{}`; /health answers 503 until it has loaded)",
            listener.local_addr()?,
            args.model_name
        );
        pagedkv_server::serve(listener, config, loader, pool, shutdown_signal()).await?;
        eprintln!("pagedkv serve: drained, exiting");
        Ok(())
    })
}

/// Resolves on ctrl-c or SIGTERM: the server then drains.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            eprintln!("warning: ctrl-c cannot be caught ({e}); stop the server with SIGTERM");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                eprintln!("warning: SIGTERM cannot be caught ({e}); stop the server with ctrl-c");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    eprintln!("pagedkv serve: draining (no new requests; running ones finish)");
}
