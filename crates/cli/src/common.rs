//! Flags shared by every command, and building model + cache from them.

use std::path::PathBuf;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use pagedkv::attention::{AttentionPath, Prefetch, Simd};
use pagedkv::tier::RemoteStats;
use pagedkv::{Codec, KvCacheManager, KvLayout};
use pagedkv_engine::fetch::ensure_model;
use pagedkv_engine::{GgufTokenizer, KvProfile, Model, WeightMode};
use pagedkv_redis::{RedisConfig, RedisStore};

/// Most worker threads a command starts (each has an 8 MiB stack).
pub const MAX_THREADS: usize = 1024;

/// How weights are held (see `WeightMode`).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Weights {
    /// As stored (Q4_1), candle's kernels: the reference mode.
    Exact,
    /// Dequantized to f32 (no activation quantization in matmuls).
    F32,
    /// Requantized to 8 bits at load (our SIMD kernels).
    Q8,
    /// Q4_1 read as stored by our SIMD kernels, other types as q8: the default.
    Q4,
}

/// The arithmetic attention reads compressed pages with (see `AttentionPath`).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Attention {
    /// f32 on the codes: within 1e-4 of the f64 reference (the oracle).
    Exact,
    /// Integer dot products on a 16-bit query for the keys of int8/int4/int2 pages at head_dim
    /// 64 or 128 and blocks of whole 8-token slices (AVX-512 VNNI and VBMI, or AVX2; values,
    /// and other pages, as exact): within 2e-3 of the output's scale.
    Fast,
}

/// Which pages attention prefetches in software (see `Prefetch`).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PrefetchPages {
    /// Pages of compressed codecs; full-precision pages are left to the CPU's prefetcher.
    Compressed,
    /// Every page.
    All,
    /// None.
    Off,
}

#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// GGUF model file (default: fetched into $PAGEDKV_HOME or ~/.cache/pagedkv).
    #[arg(long, global = true)]
    pub model: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Codec of keys and values: f32, f16, bf16, fp8-e4m3, fp8-e5m2, int8, int4, int2,
    /// fibquant-k{K}n{N} [default: int8].
    #[arg(long, global = true)]
    pub codec: Option<String>,
    /// Codec of keys (overrides --codec).
    #[arg(long, global = true)]
    pub key_codec: Option<String>,
    /// Codec of values (overrides --codec).
    #[arg(long, global = true)]
    pub value_codec: Option<String>,
    /// Tokens per cache block.
    #[arg(long, global = true, default_value_t = 16)]
    pub block_size: usize,
    /// Leading tokens of every sequence kept in f16 beside their sealed block (attention
    /// sinks; compressed codecs only, at most the block size).
    #[arg(long, global = true, default_value_t = 0)]
    pub sink_tokens: usize,
    /// How weights are held in memory (default: q4; f32 for `eval` and `calibrate`).
    #[arg(long, global = true, value_enum)]
    pub weights: Option<Weights>,
    /// How attention reads compressed pages.
    #[arg(long, global = true, value_enum, default_value = "exact")]
    pub attention: Attention,
    /// Which pages attention prefetches in software ahead of reading them.
    #[arg(long, global = true, value_enum, default_value = "compressed")]
    pub prefetch: PrefetchPages,
    /// The attention kernels' dispatch level: avx512, avx2 or portable (default: the widest
    /// this CPU has).
    #[arg(long, global = true)]
    pub simd: Option<String>,
    /// A KV profile made by `pagedkv calibrate` for this model: codecs per layer and role, sink
    /// tokens, key means and key split, instead of --codec, --key-codec, --value-codec and
    /// --sink-tokens.
    #[arg(long, global = true)]
    pub kv_profile: Option<PathBuf>,
}

/// The codec when no flag names one.
const DEFAULT_CODEC: &str = "int8";

impl CommonArgs {
    /// Sizes the thread pools: rayon's (attention) and candle's (matmuls; it reads the same
    /// variable as rayon). Commands run inside the returned pool (`install`): a parallel call
    /// made from a thread outside the pool sleeps until a worker has finished it, and that
    /// wake-up cost tens of microseconds per call here — per layer and token, more than the
    /// attention of a short context.
    pub fn thread_pool(&self) -> Result<rayon::ThreadPool> {
        let mut builder = rayon::ThreadPoolBuilder::new()
            // the commands run on a worker: give it a main thread's stack
            .stack_size(8 << 20);
        if let Some(n) = self.threads {
            anyhow::ensure!(n > 0, "--threads must be at least 1");
            anyhow::ensure!(
                n <= MAX_THREADS,
                "--threads {n} exceeds the limit of {MAX_THREADS}"
            );
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            builder = builder.num_threads(n);
        }
        Ok(builder.build()?)
    }

    /// The thread count for reports.
    pub fn threads_label(&self) -> String {
        match self.threads {
            Some(n) => n.to_string(),
            None => format!(
                "{} (all cores)",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            ),
        }
    }

    /// Key and value codecs from the flags.
    pub fn codecs(&self) -> Result<(Codec, Codec)> {
        let codec = self.codec.as_deref().unwrap_or(DEFAULT_CODEC);
        let key = self
            .key_codec
            .as_deref()
            .unwrap_or(codec)
            .parse::<Codec>()?;
        let value = self
            .value_codec
            .as_deref()
            .unwrap_or(codec)
            .parse::<Codec>()?;
        Ok((key, value))
    }

    /// The `--kv-profile`, read and checked against `model`; an error if codec flags are given
    /// beside it.
    pub fn profile(&self, model: &Model) -> Result<Option<KvProfile>> {
        let Some(path) = &self.kv_profile else {
            return Ok(None);
        };
        let given = [
            ("--codec", self.codec.is_some()),
            ("--key-codec", self.key_codec.is_some()),
            ("--value-codec", self.value_codec.is_some()),
            ("--sink-tokens", self.sink_tokens > 0),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
            anyhow::bail!("--kv-profile sets the cache's codecs and sinks: drop {flag}");
        }
        let profile = KvProfile::load(path)?;
        profile.check_model(path, model.fingerprint())?;
        Ok(Some(profile))
    }

    /// Loads (fetching if needed) the model and its tokenizer, weights held as `--weights`
    /// says or else as q4 (Q4_1 read as stored by our kernels).
    pub fn load_model(&self) -> Result<(Model, GgufTokenizer)> {
        self.load_model_or(WeightMode::Q4)
    }

    /// Loads the model with `default` weights unless `--weights` is given.
    pub fn load_model_or(&self, default: WeightMode) -> Result<(Model, GgufTokenizer)> {
        // a bad --simd named before the model is fetched or read
        let simd = self.simd()?;
        let path = ensure_model(self.model.as_deref())?;
        let mode = match self.weights {
            Some(Weights::Exact) => WeightMode::Exact,
            Some(Weights::F32) => WeightMode::F32,
            Some(Weights::Q8) => WeightMode::Q8,
            Some(Weights::Q4) => WeightMode::Q4,
            None => default,
        };
        let (mut model, tokenizer) =
            Model::load(&path, mode).with_context(|| format!("loading {}", path.display()))?;
        model.set_attention_path(self.attention_path());
        model.set_prefetch(self.prefetch());
        model.set_simd(simd)?;
        Ok((model, tokenizer))
    }

    /// The dispatch level `--simd` names (the widest this CPU has without it); an error for
    /// a name that is none, or a level this CPU lacks.
    pub fn simd(&self) -> Result<Simd> {
        let Some(name) = self.simd.as_deref() else {
            return Ok(Simd::widest());
        };
        let level = Simd::ALL
            .into_iter()
            .find(|l| l.to_string() == name)
            .with_context(|| format!("unknown --simd `{name}` (avx512, avx2, portable)"))?;
        Ok(level.check()?)
    }

    /// The attention path `--attention` names.
    pub fn attention_path(&self) -> AttentionPath {
        match self.attention {
            Attention::Exact => AttentionPath::Exact,
            Attention::Fast => AttentionPath::Fast,
        }
    }

    /// The software prefetch `--prefetch` names.
    pub fn prefetch(&self) -> Prefetch {
        match self.prefetch {
            PrefetchPages::Compressed => Prefetch::Compressed,
            PrefetchPages::All => Prefetch::All,
            PrefetchPages::Off => Prefetch::Off,
        }
    }

    /// The model's KV layout for the chosen codecs, or the `--kv-profile`'s.
    pub fn layout(&self, model: &Model) -> Result<KvLayout> {
        if let Some(profile) = self.profile(model)? {
            return Ok(profile.layout(model.config(), self.block_size)?);
        }
        let (key, value) = self.codecs()?;
        let layout = model.config().kv_layout(key, value, self.block_size)?;
        Ok(KvLayout::new(pagedkv::LayoutSpec {
            sink_tokens: self.sink_tokens,
            ..layout.spec().clone()
        })?)
    }

    /// How the cache's codecs are named in reports: the profile, or the key and value codecs.
    pub fn cache_label(&self, layout: &KvLayout) -> String {
        match &self.kv_profile {
            Some(path) => format!(
                "profile {} ({:.2} bits per element)",
                path.display(),
                layout.bits_per_element()
            ),
            None => format!(
                "K={} V={}",
                layout.spec().key_codec,
                layout.spec().value_codec
            ),
        }
    }

    /// A cache of `budget_mib` MiB for the model.
    pub fn cache(&self, model: &Model, budget_mib: u64) -> Result<KvCacheManager> {
        let layout = self.layout(model)?;
        let budget = budget_mib
            .checked_mul(1 << 20)
            .with_context(|| format!("a cache of {budget_mib} MiB is too large"))?;
        let cache = KvCacheManager::with_budget(layout, budget, &model.fingerprint().key_bytes())?;
        anyhow::ensure!(
            cache.pool().num_blocks() > 0,
            "a {budget_mib} MiB cache holds no block"
        );
        Ok(cache)
    }
}

/// One cache configuration a benchmark measures: a codec for keys and values, or a profile.
#[derive(Debug, Clone)]
pub enum CacheSetting {
    /// The same codec for keys and values on every layer.
    Codec(Codec),
    /// A `--kv-profile`, named by its file.
    Profile(Arc<KvProfile>, String),
}

impl CacheSetting {
    /// The model's layout in this setting.
    pub fn layout(&self, model: &Model, block_size: usize) -> Result<KvLayout> {
        Ok(match self {
            Self::Codec(codec) => model.config().kv_layout(*codec, *codec, block_size)?,
            Self::Profile(profile, _) => profile.layout(model.config(), block_size)?,
        })
    }

    /// Whether this is the f16 cache (the baseline of the ratios).
    pub fn is_f16(&self) -> bool {
        matches!(self, Self::Codec(Codec::F16))
    }
}

impl std::fmt::Display for CacheSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Codec(codec) => write!(f, "{codec}"),
            Self::Profile(_, name) => write!(f, "profile {name}"),
        }
    }
}

impl CommonArgs {
    /// The codecs of a comma-separated list, then the `--kv-profile` if there is one.
    pub fn bench_settings(&self, list: &str, model: &Model) -> Result<Vec<CacheSetting>> {
        let mut settings = list
            .split(',')
            .map(|c| Ok(CacheSetting::Codec(c.trim().parse::<Codec>()?)))
            .collect::<Result<Vec<_>>>()?;
        if let (Some(profile), Some(path)) = (self.profile(model)?, &self.kv_profile) {
            let name = path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into(),
            );
            settings.push(CacheSetting::Profile(Arc::new(profile), name));
        }
        Ok(settings)
    }
}

/// The shared-tier flags of `serve`, `demo` and `generate`.
#[derive(Debug, Clone, Args)]
pub struct SharedTierArgs {
    /// A store shared with other engines, `redis://HOST:PORT[/DB]`: blocks this engine seals
    /// are published there, and prompts find blocks other engines computed.
    #[arg(long)]
    pub shared_tier: Option<String>,
    /// Expiry of published blocks in seconds (default: until Redis evicts them).
    #[arg(long, requires = "shared_tier")]
    pub shared_tier_ttl_s: Option<u64>,
    /// The longest an admission spends fetching a prompt's blocks from the shared tier, in
    /// milliseconds (its first round trip always goes); the rest is computed, and the prompt's
    /// report says `store_timed_out`.
    #[arg(long, requires = "shared_tier", default_value_t = pagedkv_redis::DEFAULT_FETCH_BUDGET.as_millis() as u64)]
    pub shared_tier_fetch_budget_ms: u64,
}

impl SharedTierArgs {
    /// Puts the shared tier below `cache` when one is named; returns its counters.
    pub fn attach(
        &self,
        cache: &mut KvCacheManager,
        model: &Model,
    ) -> Result<Option<Arc<RemoteStats>>> {
        let Some(url) = &self.shared_tier else {
            return Ok(None);
        };
        if self.shared_tier_ttl_s == Some(0) {
            anyhow::bail!("--shared-tier-ttl-s must be at least 1");
        }
        let ttl = self.shared_tier_ttl_s.map(Duration::from_secs);
        let budget = Duration::from_millis(self.shared_tier_fetch_budget_ms);
        attach_shared_tier(cache, model, url, ttl, budget).map(Some)
    }
}

/// Puts a shared tier on `url` (`redis://HOST:PORT[/DB]`) below the cache: sealed blocks are
/// published there (expiring after `ttl`, if given) and prompts continue their chains there,
/// fetching for at most `fetch_budget` each.
/// A store that does not answer is a warning, not an error: the cache then runs on its own
/// until the store is back.
pub fn attach_shared_tier(
    cache: &mut KvCacheManager,
    model: &Model,
    url: &str,
    ttl: Option<Duration>,
    fetch_budget: Duration,
) -> Result<Arc<RemoteStats>> {
    let config = RedisConfig {
        ttl,
        fetch_budget,
        ..RedisConfig::new(url, &model.fingerprint().hex(), cache.layout())
    };
    let store = RedisStore::connect(config)?;
    if !store.is_up() {
        eprintln!(
            "warning: the shared tier {url} does not answer; blocks are computed locally until it does"
        );
    }
    let stats = store.stats();
    cache.set_remote_store(Box::new(store));
    Ok(stats)
}

/// One line on what the shared tier did in a run.
pub fn shared_tier_summary(stats: &RemoteStats, cached_tokens: usize) -> String {
    let get = RemoteStats::get;
    format!(
        "shared tier: {} blocks fetched, {} published, {} writes dropped, {} errors; prompt tokens from any cache: {cached_tokens}",
        get(&stats.hits),
        get(&stats.writes),
        get(&stats.writes_dropped),
        get(&stats.read_errors) + get(&stats.write_errors) + get(&stats.delete_errors),
    )
}
