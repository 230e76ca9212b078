//! `pagedkv bench`: figures printed beside a baseline measured in the same run.
//!
//! `generate`: decode tokens/s of one sequence and of N concurrent sequences through our
//! scheduler, per codec, with candle-transformers' `quantized_llama` generating the same number
//! of tokens from the same prompt as the baseline.

use std::time::Instant;

use anyhow::{Context as _, Result};
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_qwen2};
use clap::{Args, Subcommand};
use pagedkv::attention::{AttentionPath, Prefetch, Simd};
use pagedkv::Codec;
use pagedkv_engine::fetch::ensure_model;
use pagedkv_engine::sampler::argmax;
use pagedkv_engine::Architecture;
use pagedkv_engine::{Event, Model, Request, SamplingParams, Scheduler, SchedulerConfig};

use crate::common::{CacheSetting, CommonArgs};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Generation speed against candle's quantized_llama.
    Generate(GenerateBench),
    /// Codec storage cost, error and encode/decode throughput on synthetic K/V.
    Codecs(CodecsBench),
    /// Decode attention over the paged cache per codec and context length, against this
    /// machine's measured memory read bandwidth.
    Attention(AttentionBench),
    /// Swap-out and swap-in throughput of sequences through the host and the disk tier.
    Blocks(BlocksBench),
    /// Time to first token of a long prompt whose blocks come from scratch, the pool, the
    /// host and disk tiers, or a shared Redis.
    Prefix(crate::bench_prefix::PrefixBench),
}

#[derive(Debug, Args)]
pub struct BlocksBench {
    /// Tokens of the swapped sequence (SmolLM2's geometry: 30 layers, 3 kv heads, head_dim 64).
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Codecs to measure (comma-separated).
    #[arg(long, default_value = "f16,int8,int4,fibquant-k2n256")]
    codecs: String,
    /// Directory of the disk tier (default: a fresh one under the system's temporary directory).
    #[arg(long)]
    disk_dir: Option<std::path::PathBuf>,
    /// Rounds (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(Debug, Args)]
pub struct AttentionBench {
    /// Context lengths in tokens (comma-separated).
    #[arg(long, default_value = "512,2048,8192,32768")]
    contexts: String,
    /// Codecs to measure (comma-separated).
    #[arg(
        long,
        default_value = "f16,f32,bf16,int8,fp8-e4m3,int4,fibquant-k2n256,fibquant-k4n256"
    )]
    codecs: String,
    /// Layers attended per step, each with its own cache, as one decode step of the model
    /// does.
    #[arg(long, default_value_t = 30)]
    layers: usize,
    /// Query heads / kv heads (SmolLM2: 9/3; Llama 3 8B: 32/8; Qwen2.5 7B: 28/4).
    #[arg(long, default_value = "9/3")]
    heads: String,
    /// Channels per head (SmolLM2: 64; Llama 3, Qwen2.5, Mistral: 128).
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Timed decode steps per codec and round.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Rounds over all codecs (the median of every round's steps is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Attention paths measured (comma-separated: exact, fast); the fast path only for codecs
    /// it has a kernel for at this level. The global --attention does not apply here.
    #[arg(long, default_value = "exact,fast")]
    paths: String,
    /// Software prefetch policies measured side by side, interleaved in every round
    /// (comma-separated: compressed, all, off; default: the global --prefetch).
    #[arg(long)]
    prefetches: Option<String>,
    /// Write the figures as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// A comma-separated list of names, each the name (`Display`) of one of `choices` (called
/// `what` in the error).
fn parse_names<T: Copy + std::fmt::Display>(
    names: &str,
    what: &str,
    choices: &[T],
) -> Result<Vec<T>> {
    names
        .split(',')
        .map(|name| {
            let name = name.trim();
            choices
                .iter()
                .find(|choice| choice.to_string() == name)
                .copied()
                .with_context(|| {
                    let known: Vec<String> = choices.iter().map(T::to_string).collect();
                    format!("unknown {what} `{name}` ({})", known.join(", "))
                })
        })
        .collect()
}

#[derive(Debug, Args)]
pub struct CodecsBench {
    /// Pages (of 16 tokens) per measurement.
    #[arg(long, default_value_t = 2048)]
    pages: usize,
    /// Codecs to measure (comma-separated).
    #[arg(
        long,
        default_value = "f32,f16,bf16,fp8-e4m3,fp8-e5m2,int8,int4,int2,fibquant-k2n256,fibquant-k2n64,fibquant-k4n256,fibquant-k2n16"
    )]
    codecs: String,
    /// Write the figures as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct GenerateBench {
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 64)]
    pub(crate) tokens: usize,
    /// Concurrent sequences in the batched run.
    #[arg(long, default_value_t = 16)]
    pub(crate) concurrent: usize,
    /// Codecs to measure (comma-separated; with --kv-profile, the profile as well).
    #[arg(long, default_value = "f32,f16")]
    pub(crate) codecs: String,
    /// Rounds; baseline, single and batched runs are interleaved and medians reported, since this
    /// machine's speed drifts.
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// A prompt of this many tokens before decoding (0: a one-sentence prompt, against candle);
    /// with N > 0 prefill and decode rates and KV GB/s are measured, against llama.cpp when
    /// installed (scripts/llama-cpp-server).
    #[arg(long, default_value_t = 0)]
    pub(crate) context: usize,
    /// llama.cpp's KV cache types measured with --context (comma-separated: f16, q8_0, q4_0).
    #[arg(long, default_value = "f16,q8_0,q4_0")]
    pub(crate) llama_kv: String,
    /// Write the figures as JSON.
    #[arg(long)]
    pub(crate) json: Option<std::path::PathBuf>,
}

/// Longest context `bench attention` measures: 2²⁰ tokens of SmolLM2's K/V in f32 are 45 GiB,
/// beyond the machines it runs on.
const MAX_BENCH_CONTEXT: usize = 1 << 20;

pub fn run(common: &CommonArgs, command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Generate(args) => generate(common, args),
        _ if common.kv_profile.is_some() => {
            anyhow::bail!(
                "--kv-profile applies to `bench generate`; the other benchmarks take --codecs"
            )
        }
        BenchCommand::Codecs(args) => codecs(args),
        BenchCommand::Attention(args) => {
            attention(args, common.block_size, common.prefetch(), common.simd()?)
        }
        BenchCommand::Blocks(args) => blocks(args),
        BenchCommand::Prefix(args) => crate::bench_prefix::run(common, args),
    }
}

/// Swap a sequence out and back in, per tier and codec; GB/s of payload bytes.
fn blocks(args: BlocksBench) -> Result<()> {
    use pagedkv::codec::synthetic::gaussian;
    use pagedkv::tier::{DiskTier, HostTier, TieredStore};
    use pagedkv::{KvCacheManager, KvLayout, LayoutSpec, SeqId};
    anyhow::ensure!(
        args.tokens > 0 && args.rounds > 0,
        "--tokens and --rounds must be positive"
    );
    let dir = args.disk_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("pagedkv-bench-blocks-{}", std::process::id()))
    });
    println!(
        "bench blocks: swap a {}-token sequence (30 layers, 3 kv heads, head_dim 64) out and back in; median of {} rounds; disk tier in {}",
        args.tokens,
        args.rounds,
        dir.display()
    );
    println!(
        "{:>16} {:>5} {:>12} {:>12} {:>12}",
        "codec", "tier", "payload MB", "out GB/s", "in GB/s"
    );
    for codec in parse_codecs(&args.codecs)? {
        let layout = KvLayout::new(LayoutSpec::new(30, 3, 9, 64, codec))?;
        let blocks = layout.blocks_for_tokens(args.tokens);
        // room for the sequence and for a filler that evicts its cached blocks
        let mut cache = KvCacheManager::new(layout.clone(), 2 * blocks + 2, b"bench")?;
        let seq = SeqId(1);
        let tokens: Vec<u32> = (0..args.tokens as u32).collect();
        cache.admit(seq, &tokens[..1])?;
        cache.reserve(seq, args.tokens - 1)?;
        let width = layout.token_width();
        let kv = gaussian(2 * width * 64, 5);
        for pos in 0..args.tokens {
            let (k, v) = kv[(pos % 64) * 2 * width..][..2 * width].split_at(width);
            for layer in 0..30 {
                cache.write_token(seq, layer, pos, k, v)?;
            }
        }
        cache.commit(seq, &tokens)?;
        for tier in ["host", "disk"] {
            let mut store = if tier == "host" {
                TieredStore::in_memory(u64::MAX)
            } else {
                TieredStore {
                    host: HostTier::new(0),
                    disk: Some(DiskTier::open(dir.join(codec.to_string()), u64::MAX)?),
                }
            };
            let (mut outs, mut ins, mut bytes) = (Vec::new(), Vec::new(), 0);
            for _ in 0..args.rounds {
                let started = Instant::now();
                let swapped = cache.swap_out(seq, &mut store)?;
                outs.push(started.elapsed().as_secs_f64());
                bytes = swapped.bytes();
                // evict the sequence's cached blocks so swap-in imports every payload
                let filler: Vec<u32> = vec![7; (blocks + 2) * 16 - 1];
                cache.admit(SeqId(2), &filler)?;
                cache.free(SeqId(2))?;
                let started = Instant::now();
                cache.swap_in(&swapped, &mut store)?;
                ins.push(started.elapsed().as_secs_f64());
            }
            println!(
                "{:>16} {tier:>5} {:>12.1} {:>12.2} {:>12.2}",
                codec.to_string(),
                bytes as f64 / 1e6,
                bytes as f64 / median(outs) / 1e9,
                bytes as f64 / median(ins) / 1e9
            );
        }
    }
    if args.disk_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Read bandwidth of this machine: a sum over a buffer far larger than the caches, split over
/// rayon's threads; the best of `passes`.
struct BandwidthProbe {
    buffer: Vec<f32>,
}

impl BandwidthProbe {
    const BYTES: usize = 1 << 30;

    fn new() -> Self {
        use rayon::prelude::*;
        let buffer = (0..Self::BYTES / 4)
            .into_par_iter()
            .map(|i| (i % 7) as f32)
            .collect();
        Self { buffer }
    }

    fn measure(&self, passes: usize) -> f64 {
        use rayon::prelude::*;
        let mut best = f64::INFINITY;
        for _ in 0..passes {
            let started = Instant::now();
            let total: f32 = self
                .buffer
                .par_chunks(1 << 16)
                .map(|c| {
                    let mut lanes = [0f32; 16];
                    for v in c.chunks_exact(16) {
                        for i in 0..16 {
                            lanes[i] += v[i];
                        }
                    }
                    lanes.iter().sum::<f32>()
                })
                .sum();
            std::hint::black_box(total);
            best = best.min(started.elapsed().as_secs_f64());
        }
        Self::BYTES as f64 / best
    }
}

/// `Q/KV` heads as numbers.
fn parse_heads(text: &str) -> Result<(usize, usize)> {
    let parsed = text
        .split_once('/')
        .and_then(|(q, kv)| Some((q.trim().parse().ok()?, kv.trim().parse().ok()?)));
    match parsed {
        Some((q, kv)) if kv > 0 && q > 0 && q % kv == 0 => Ok((q, kv)),
        _ => anyhow::bail!(
            "--heads `{text}`: query heads / kv heads, positive, the first a multiple of the second (e.g. 32/8)"
        ),
    }
}

fn attention(
    args: AttentionBench,
    block_size: usize,
    prefetch: Prefetch,
    simd: Simd,
) -> Result<()> {
    use pagedkv::attention::{attend_split_at, fast_kernel_reads, Context, Dispatch};
    use pagedkv::codec::synthetic::gaussian;
    use pagedkv::{BlockId, KvLayout, KvStorage, LayoutSpec};
    anyhow::ensure!(
        args.layers > 0 && args.steps > 0 && args.rounds > 0,
        "--layers, --steps and --rounds must be positive"
    );
    let contexts = args
        .contexts
        .split(',')
        .map(|c| c.trim().parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    anyhow::ensure!(contexts.iter().all(|c| *c > 0), "contexts must be positive");
    anyhow::ensure!(
        contexts.iter().all(|c| *c <= MAX_BENCH_CONTEXT),
        "contexts must be at most {MAX_BENCH_CONTEXT} tokens"
    );
    let codecs = parse_codecs(&args.codecs)?;
    let threads = rayon::current_num_threads();
    let paths = parse_names(
        &args.paths,
        "attention path",
        &[AttentionPath::Exact, AttentionPath::Fast],
    )?;
    let prefetches = match &args.prefetches {
        Some(names) => parse_names(names, "prefetch", &Prefetch::ALL)?,
        None => vec![prefetch],
    };
    let policies = prefetches
        .iter()
        .map(Prefetch::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let (query_heads, kv_heads) = parse_heads(&args.heads)?;
    let (d, bs) = (args.head_dim, block_size);
    anyhow::ensure!(
        d > 0 && bs > 0,
        "--head-dim and --block-size must be positive"
    );
    let probe = BandwidthProbe::new();
    println!(
        "bench attention: decode, {query_heads} query / {kv_heads} kv heads, head_dim {d}, blocks of {bs}, {} layers per step, {threads} threads, {simd} kernels, prefetch {policies}; median of {} rounds × {} steps, codecs interleaved",
        args.layers, args.rounds, args.steps
    );
    println!(
        "machine read bandwidth: a threaded sum over 1 GiB in every round (best of 2 passes); \"of bandw.\" is against its median over the context's rounds"
    );
    println!(
        "{:>16} {:>6} {:>7} {:>11} {:>13} {:>9} {:>10} {:>9} {:>10}",
        "codec",
        "path",
        "context",
        "µs / step",
        "ns / ctx tok",
        "GB/s",
        "of bandw.",
        "× f16",
        "bandw. GB/s"
    );
    let mut rows = Vec::new();
    for &context in &contexts {
        let blocks: Vec<BlockId> = (0..context.div_ceil(bs) as u32).map(BlockId).collect();
        // every codec's cache first, then rounds that visit the codecs in turn: a drift in
        // this machine's speed falls on all of them alike instead of on whichever ran then
        let mut caches = Vec::with_capacity(codecs.len());
        for &codec in &codecs {
            let mut spec = LayoutSpec::new(args.layers, kv_heads, query_heads, d, codec);
            spec.block_size = bs;
            let layout = KvLayout::new(spec)?;
            let mut storage = KvStorage::new(layout.clone(), blocks.len())?;
            let width = layout.token_width();
            let kv = gaussian(2 * width * 64, context as u64);
            for pos in 0..context {
                let (k, v) = kv[(pos % 64) * 2 * width..][..2 * width].split_at(width);
                for layer in 0..args.layers {
                    storage.write_token(layer, blocks[pos / bs], pos % bs, k, v)?;
                }
                if pos % bs == bs - 1 {
                    storage.seal(blocks[pos / bs], pos / bs * bs)?;
                }
            }
            caches.push((codec, layout, storage));
        }
        // (cache, path, prefetch) measured: the fast path where it has its own kernel
        let runs: Vec<(usize, AttentionPath, Prefetch)> = (0..caches.len())
            .flat_map(|i| paths.iter().map(move |p| (i, *p)))
            .filter(|(i, p)| {
                *p == AttentionPath::Exact || fast_kernel_reads(&caches[*i].1, 0, simd)
            })
            .flat_map(|(i, p)| prefetches.iter().map(move |f| (i, p, *f)))
            .collect();
        let q = gaussian(query_heads * d, 7);
        let mut out = vec![0f32; query_heads * d];
        let ctx = Context {
            blocks: &blocks,
            len: context,
        };
        let scale = 1.0 / (d as f32).sqrt();
        let mut times = vec![Vec::with_capacity(args.rounds * args.steps); runs.len()];
        let mut bandwidths = Vec::with_capacity(args.rounds);
        for _ in 0..args.rounds {
            bandwidths.push(probe.measure(2));
            for (&(cache, path, prefetch), times) in runs.iter().zip(times.iter_mut()) {
                let storage = &caches[cache].2;
                let dispatch = Dispatch {
                    simd,
                    path,
                    prefetch,
                };
                // one untimed step brings this codec's pages and tables back in
                for step in 0..args.steps + 1 {
                    let started = Instant::now();
                    for layer in 0..args.layers {
                        attend_split_at(dispatch, storage, layer, ctx, &q, scale, &mut out)?;
                    }
                    if step > 0 {
                        times.push(started.elapsed().as_secs_f64());
                    }
                }
            }
        }
        let steps: Vec<f64> = times.into_iter().map(median).collect();
        let bandwidth = median(bandwidths);
        // against f16 read with the same prefetch
        let f16_time = |prefetch: Prefetch| {
            runs.iter()
                .position(|(i, p, f)| {
                    caches[*i].0 == Codec::F16 && *p == AttentionPath::Exact && *f == prefetch
                })
                .map(|i| steps[i])
        };
        for (&(cache, path, prefetch), &step) in runs.iter().zip(&steps) {
            let f16_time = f16_time(prefetch);
            let (codec, layout, _) = &caches[cache];
            // bytes of every page read: whole blocks, keys and values, every layer
            let bytes = (0..args.layers)
                .map(|l| (layout.key_page_bytes(l) + layout.value_page_bytes(l)) * kv_heads)
                .sum::<usize>() as f64
                * blocks.len() as f64;
            let rate = bytes / step;
            let vs_f16 = f16_time.map_or("-".to_string(), |t| format!("{:.2}", step / t));
            println!(
                "{:>16} {:>6} {context:>7} {:>11.1} {:>13.2} {:>9.1} {:>9.0}% {vs_f16:>9} {:>10.1}{}",
                codec.to_string(),
                path.to_string(),
                step * 1e6,
                step * 1e9 / (context * args.layers) as f64,
                rate / 1e9,
                100.0 * rate / bandwidth,
                bandwidth / 1e9,
                if prefetches.len() > 1 {
                    format!("  prefetch {prefetch}")
                } else {
                    String::new()
                }
            );
            rows.push(serde_json::json!({
                "codec": codec.to_string(), "attention": path.to_string(), "context": context, "layers": args.layers,
                "seconds_per_step": step, "kv_bytes_per_step": bytes, "bytes_per_second": rate,
                "fraction_of_bandwidth": rate / bandwidth, "time_vs_f16": f16_time.map(|t| step / t),
                "read_bandwidth_bytes_per_second": bandwidth, "simd": simd.to_string(),
                "prefetch": prefetch.to_string(),
            }));
        }
    }
    if let Some(path) = args.json {
        let json = serde_json::json!({ "rows": rows });
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

const PROMPT: &str = "The history of the printing press begins in the fifteenth century, when";

/// candle-transformers' model of the file's architecture, the baseline of `bench generate`.
enum CandleModel {
    Llama(quantized_llama::ModelWeights),
    Qwen2(quantized_qwen2::ModelWeights),
}

impl CandleModel {
    fn load(path: &std::path::Path, architecture: Architecture) -> Result<Self> {
        let mut file = std::fs::File::open(path)?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
        Ok(match architecture {
            Architecture::Llama => Self::Llama(quantized_llama::ModelWeights::from_gguf(
                content,
                &mut file,
                &Device::Cpu,
            )?),
            Architecture::Qwen2 => Self::Qwen2(quantized_qwen2::ModelWeights::from_gguf(
                content,
                &mut file,
                &Device::Cpu,
            )?),
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Llama(_) => "quantized_llama",
            Self::Qwen2(_) => "quantized_qwen2",
        }
    }

    /// The last position's logits after `tokens` at `pos`.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        let input = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
        let logits = match self {
            Self::Llama(m) => m.forward(&input, pos)?,
            Self::Qwen2(m) => m.forward(&input, pos)?,
        };
        Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
    }
}

/// candle's model: greedy decode of `tokens` tokens after the prompt; decode tokens/s.
/// `forward` at position 0 starts a fresh KV cache, so one loaded model serves every round.
fn candle_baseline(model: &mut CandleModel, prompt: &[u32], tokens: usize) -> Result<f64> {
    let mut next = argmax(&model.forward(prompt, 0)?);
    let started = Instant::now();
    for step in 0..tokens {
        next = argmax(&model.forward(&[next], prompt.len() + step)?);
    }
    Ok(tokens as f64 / started.elapsed().as_secs_f64())
}

/// The middle value (the upper one of an even count).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A scheduler over a cache in `setting` with room for the `prompts` and `max_tokens` more each,
/// and one request per prompt submitted (ids 0, 1, …).
pub(crate) fn submitted<'m>(
    model: &'m Model,
    common: &CommonArgs,
    setting: &CacheSetting,
    prompts: &[Vec<u32>],
    max_tokens: usize,
    max_step_tokens: usize,
) -> Result<Scheduler<'m>> {
    let layout = setting.layout(model, common.block_size)?;
    let n = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let blocks = n * (longest + max_tokens + 16).div_ceil(common.block_size) + 16;
    let cache = pagedkv::KvCacheManager::new(layout, blocks, b"bench")?;
    let config = SchedulerConfig {
        max_step_tokens,
        max_running: n.max(1),
        ..SchedulerConfig::default()
    };
    let mut scheduler = Scheduler::new(model, cache, config)?;
    for (id, prompt) in prompts.iter().enumerate() {
        let request = Request::new(
            id as u64,
            prompt.clone(),
            max_tokens,
            SamplingParams::default(),
        );
        scheduler.submit(request)?;
    }
    Ok(scheduler)
}

/// Our scheduler: `n` requests of `tokens` tokens each; aggregate decode tokens/s, counted from
/// the first generated token of the run (prefill excluded, as for the baseline).
fn ours(
    model: &Model,
    common: &CommonArgs,
    setting: &CacheSetting,
    prompt: &[u32],
    n: usize,
    tokens: usize,
) -> Result<f64> {
    // one distinct token appended to each prompt: no request is a pure prefix hit of another
    let prompts: Vec<Vec<u32>> = (0..n as u32)
        .map(|i| [prompt, &[100 + i]].concat())
        .collect();
    let mut scheduler = submitted(model, common, setting, &prompts, tokens + 1, 4096)?;
    let mut first: Option<Instant> = None;
    let mut counted = 0usize;
    scheduler.run(|e| {
        if let Event::Token { .. } = e {
            match first {
                None => first = Some(Instant::now()),
                Some(_) => counted += 1,
            }
        }
    })?;
    Ok(counted as f64 / first.map_or(f64::NAN, |t| t.elapsed().as_secs_f64()))
}

fn generate(common: &CommonArgs, args: GenerateBench) -> Result<()> {
    anyhow::ensure!(
        args.rounds > 0 && args.tokens > 0 && args.concurrent > 0,
        "rounds, tokens and concurrent must be positive"
    );
    if args.context > 0 {
        return crate::bench_context::run(common, args);
    }
    let path = ensure_model(common.model.as_deref())?;
    let (model, tokenizer) = common.load_model()?;
    let mut reference = CandleModel::load(&path, model.config().architecture)?;
    let prompt = tokenizer.encode(PROMPT)?;
    let codecs = common.bench_settings(&args.codecs, &model)?;
    println!(
        "bench generate: {} tokens per sequence, {} concurrent, weights {:?}, threads {}, median of {} interleaved rounds",
        args.tokens,
        args.concurrent,
        model.weight_mode(),
        common.threads_label(),
        args.rounds
    );
    let mut baseline = Vec::new();
    let mut single = vec![Vec::new(); codecs.len()];
    let mut batched = vec![Vec::new(); codecs.len()];
    for _ in 0..args.rounds {
        baseline.push(candle_baseline(&mut reference, &prompt, args.tokens)?);
        for (i, codec) in codecs.iter().enumerate() {
            single[i].push(ours(&model, common, codec, &prompt, 1, args.tokens)?);
            batched[i].push(ours(
                &model,
                common,
                codec,
                &prompt,
                args.concurrent,
                args.tokens,
            )?);
        }
    }
    let baseline = median(baseline);
    println!(
        "  baseline candle-transformers {} (weights as stored): {baseline:.1} tokens/s",
        reference.name()
    );
    let mut rows = Vec::new();
    for (i, codec) in codecs.iter().enumerate() {
        let (one, many) = (median(single[i].clone()), median(batched[i].clone()));
        // the ratio of medians can hide drift; the median of per-round ratios is printed too
        let per_round = median(
            single[i]
                .iter()
                .zip(&batched[i])
                .map(|(s, b)| b / s)
                .collect(),
        );
        println!(
            "  {:>9}: 1 sequence {one:.1} tokens/s ({:.2}x candle); {} concurrent {many:.1} tokens/s aggregate ({:.2}x our 1-sequence rate; per-round median {per_round:.2}x)",
            codec.to_string(),
            one / baseline,
            args.concurrent,
            many / one,
        );
        rows.push(serde_json::json!({
            "codec": codec.to_string(), "tokens_per_s_1": one, "tokens_per_s_batched": many,
            "concurrent": args.concurrent, "candle_tokens_per_s": baseline,
            "ratio_vs_candle": one / baseline, "batched_over_single": many / one,
        }));
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

/// Relative MSE Σ(x − x̂)² / Σx² of a codec over `pages` pages of `data`.
fn relative_mse(original: &[f32], decoded: &[f32]) -> f64 {
    let err: f64 = original
        .iter()
        .zip(decoded)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = original.iter().map(|a| (*a as f64).powi(2)).sum();
    err / norm
}

/// A comma-separated codec list.
fn parse_codecs(list: &str) -> Result<Vec<Codec>> {
    Ok(list
        .split(',')
        .map(|c| c.trim().parse::<Codec>())
        .collect::<pagedkv::Result<Vec<_>>>()?)
}

fn codecs(args: CodecsBench) -> Result<()> {
    use pagedkv::codec::scalar::{decode_page, encode_page};
    use pagedkv::codec::synthetic::{gaussian, outliers};
    use pagedkv::Role;
    anyhow::ensure!(args.pages > 0, "--pages must be positive");
    const BS: usize = 16;
    let smollm = |codec| pagedkv::KvLayout::new(pagedkv::LayoutSpec::new(30, 3, 9, 64, codec));
    println!(
        "bench codecs: {} pages of {BS} tokens; keys per channel, values per token (groups of 32)",
        args.pages
    );
    println!(
        "{:>9} {:>4} {:>10} {:>12} {:>12} {:>12} {:>12} {:>14} {:>14}",
        "codec",
        "d",
        "bits/elem",
        "KV B/token",
        "relMSE gauss",
        "relMSE outl.",
        "relMSE V",
        "encode Mtok/s",
        "decode Mtok/s"
    );
    let codecs = parse_codecs(&args.codecs)?;
    let mut rows = Vec::new();
    for codec in codecs {
        for d in [64usize, 128] {
            let n = args.pages * BS * d;
            let gauss = gaussian(n, 11);
            let outl = outliers(args.pages * BS, d, 12);
            let page_bytes = codec.page_bytes(Role::Key, BS, d)?;
            let mut packed = vec![0u8; page_bytes * args.pages];
            let mut decoded = vec![0f32; n];
            let mut measure = |data: &[f32], role: Role| -> Result<(f64, f64, f64)> {
                let page_bytes = codec.page_bytes(role, BS, d)?;
                packed.resize(page_bytes * args.pages, 0);
                // warm-up: builds a FibQuant codebook once, outside the timing
                encode_page(
                    codec,
                    role,
                    &data[..BS * d],
                    BS,
                    d,
                    &mut packed[..page_bytes],
                )?;
                let started = Instant::now();
                for (rows, out) in data
                    .chunks_exact(BS * d)
                    .zip(packed.chunks_exact_mut(page_bytes))
                {
                    encode_page(codec, role, rows, BS, d, out)?;
                }
                let encode = started.elapsed().as_secs_f64();
                let started = Instant::now();
                for (page, out) in packed
                    .chunks_exact(page_bytes)
                    .zip(decoded.chunks_exact_mut(BS * d))
                {
                    decode_page(codec, role, page, BS, d, out)?;
                }
                let decode = started.elapsed().as_secs_f64();
                Ok((relative_mse(data, &decoded), encode, decode))
            };
            let (mse_gauss, enc, dec) = measure(&gauss, Role::Key)?;
            let (mse_outliers, _, _) = measure(&outl, Role::Key)?;
            let (mse_values, _, _) = measure(&outl, Role::Value)?;
            let tokens = (args.pages * BS) as f64;
            let bits = (codec.page_bytes(Role::Key, BS, d)?
                + codec.page_bytes(Role::Value, BS, d)?) as f64
                * 8.0
                / (2 * BS * d) as f64;
            let kv_bytes = smollm(codec)?.kv_bytes_per_token();
            println!(
                "{:>9} {d:>4} {bits:>10.2} {:>12} {mse_gauss:>12.2e} {mse_outliers:>12.2e} {mse_values:>12.2e} {:>14.2} {:>14.2}",
                codec.to_string(),
                if d == 64 { format!("{kv_bytes:.0}") } else { "-".into() },
                tokens / enc / 1e6,
                tokens / dec / 1e6
            );
            rows.push(serde_json::json!({
                "codec": codec.to_string(), "head_dim": d, "bits_per_element": bits,
                "smollm2_kv_bytes_per_token": if d == 64 { Some(kv_bytes) } else { None },
                "rel_mse_gaussian_keys": mse_gauss, "rel_mse_outlier_keys": mse_outliers, "rel_mse_outlier_values": mse_values,
                "encode_tokens_per_s": tokens / enc, "decode_tokens_per_s": tokens / dec,
            }));
        }
    }
    println!("(relMSE outl./V: heavy-tailed data with two ×40 outlier channels, stored as keys / as values)");
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}
