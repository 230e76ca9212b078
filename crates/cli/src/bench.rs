//! `pagedkv bench`: figures printed beside a baseline measured in the same run.
//!
//! `generate`: decode tokens/s of one sequence and of N concurrent sequences through our
//! scheduler, per codec, with candle-transformers' `quantized_llama` generating the same number
//! of tokens from the same prompt as the baseline.

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use clap::{Args, Subcommand};
use pagedkv::Codec;
use pagedkv_engine::fetch::ensure_model;
use pagedkv_engine::sampler::argmax;
use pagedkv_engine::{Event, Model, Request, SamplingParams, Scheduler, SchedulerConfig};

use crate::common::CommonArgs;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Generation speed against candle's quantized_llama.
    Generate(GenerateBench),
}

#[derive(Debug, Args)]
pub struct GenerateBench {
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Concurrent sequences in the batched run.
    #[arg(long, default_value_t = 16)]
    concurrent: usize,
    /// Codecs to measure (comma-separated).
    #[arg(long, default_value = "f32,f16")]
    codecs: String,
    /// Rounds; baseline, single and batched runs are interleaved and medians reported, since this
    /// machine's speed drifts.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Write the figures as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

pub fn run(common: &CommonArgs, command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Generate(args) => generate(common, args),
    }
}

const PROMPT: &str = "The history of the printing press begins in the fifteenth century, when";

/// candle's quantized_llama: greedy decode of `tokens` tokens after the prompt; decode tokens/s.
/// `forward` at position 0 starts a fresh KV cache, so one loaded model serves every round.
fn candle_baseline(model: &mut ModelWeights, prompt: &[u32], tokens: usize) -> Result<f64> {
    let input = Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?;
    let logits = model.forward(&input, 0)?.squeeze(0)?.to_vec1::<f32>()?;
    let mut next = argmax(&logits);
    let started = Instant::now();
    for step in 0..tokens {
        let input = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
        let logits = model
            .forward(&input, prompt.len() + step)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        next = argmax(&logits);
    }
    Ok(tokens as f64 / started.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Our scheduler: `n` requests of `tokens` tokens each; aggregate decode tokens/s, counted from
/// the first generated token of the run (prefill excluded, as for the baseline).
fn ours(
    model: &Model,
    common: &CommonArgs,
    codec: Codec,
    prompt: &[u32],
    n: usize,
    tokens: usize,
) -> Result<f64> {
    let layout = model.config().kv_layout(codec, codec, common.block_size)?;
    let blocks = n * (prompt.len() + tokens + 16).div_ceil(common.block_size) + 16;
    let cache = pagedkv::KvCacheManager::new(layout, blocks, b"bench")?;
    let mut scheduler = Scheduler::new(
        model,
        cache,
        SchedulerConfig {
            max_step_tokens: 4096,
            max_running: n.max(1),
        },
    )?;
    for id in 0..n as u64 {
        // distinct prompts (one token differs) so no request is a pure prefix hit of another
        let mut p = prompt.to_vec();
        p.push(100 + id as u32);
        scheduler.submit(Request {
            id,
            prompt: p,
            max_tokens: tokens + 1,
            sampling: SamplingParams::default(),
        })?;
    }
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
    let path = ensure_model(common.model.as_deref())?;
    let (model, tokenizer) = common.load_model()?;
    let mut file = std::fs::File::open(&path)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let mut reference = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    let prompt = tokenizer.encode(PROMPT)?;
    let codecs = args
        .codecs
        .split(',')
        .map(|c| c.trim().parse::<Codec>())
        .collect::<pagedkv::Result<Vec<_>>>()?;
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
            single[i].push(ours(&model, common, *codec, &prompt, 1, args.tokens)?);
            batched[i].push(ours(
                &model,
                common,
                *codec,
                &prompt,
                args.concurrent,
                args.tokens,
            )?);
        }
    }
    let baseline = median(baseline);
    println!(
        "  baseline candle-transformers quantized_llama (Q4_1 as stored): {baseline:.1} tokens/s"
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
            "  {codec:>9}: 1 sequence {one:.1} tokens/s ({:.2}x candle); {} concurrent {many:.1} tokens/s aggregate ({:.2}x our 1-sequence rate; per-round median {per_round:.2}x)",
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
