//! `pagedkv demo`: the README's main job. Chat requests that share a system prompt run through the
//! continuous-batching scheduler on the paged cache; each answer streams on its own line, and a
//! summary follows (requests, tokens/s, prefix-cache hit rate, KV bytes per token, blocks used,
//! preemptions).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use pagedkv_engine::{ChatMessage, Event, Request, SamplingParams, Scheduler, SchedulerConfig};

use crate::common::{shared_tier_summary, CommonArgs, SharedTierArgs};

/// A system prompt long enough (~200 tokens) that sharing it across requests matters.
const SYSTEM: &str = "You are a concise assistant for engineers who build language-model inference servers. \
Answer in two or three sentences of plain English. When a question is about memory, mention concrete \
quantities such as bytes per token or blocks per sequence. When a question is about speed, say what \
limits it: arithmetic, memory bandwidth, or synchronisation between threads. Prefer simple, correct \
explanations over long ones, do not invent citations, and say so when you are unsure. The people \
asking run models on ordinary servers without accelerators, so assume a CPU with a few cores, tens \
of gigabytes of memory, and a key-value cache that is stored in fixed-size blocks of sixteen tokens \
that can be shared between requests with a common prefix, compressed to eight or four bits per \
element, or moved to a slower tier when memory runs short.";

const QUESTIONS: [&str; 8] = [
    "What is a KV cache?",
    "Why does a paged KV cache waste less memory?",
    "What is prefix caching?",
    "Why is decoding slower per token than prefill?",
    "What does quantizing the KV cache to 4 bits cost?",
    "What is continuous batching?",
    "When should a server preempt a request?",
    "Name one way to fit longer contexts in memory.",
];

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of requests (questions repeat beyond eight).
    #[arg(long, default_value_t = 8)]
    requests: usize,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    #[command(flatten)]
    shared: SharedTierArgs,
    /// KV cache budget in MiB.
    #[arg(long, default_value_t = 64)]
    cache_mib: u64,
}

pub fn run(common: &CommonArgs, args: DemoArgs) -> Result<()> {
    anyhow::ensure!(args.requests > 0, "--requests must be at least 1");
    let (model, tokenizer) = common.load_model()?;
    let mut cache = common.cache(&model, args.cache_mib)?;
    let shared = args.shared.attach(&mut cache, &model)?;
    let layout = cache.layout().clone();
    let blocks = cache.pool().num_blocks();
    println!(
        "pagedkv demo: {}, {} requests sharing a system prompt; cache {} MiB = {} blocks of {} tokens, codecs {} ({:.0} KV bytes/token)",
        common
            .model
            .as_deref()
            .and_then(|p| p.file_name())
            .map_or("SmolLM2-135M-Instruct".into(), |n| n.to_string_lossy()),
        args.requests,
        args.cache_mib,
        blocks,
        layout.block_size(),
        common.cache_label(&layout),
        layout.kv_bytes_per_token()
    );
    let mut scheduler = Scheduler::new(&model, cache, SchedulerConfig::default())?;
    let bars = MultiProgress::new();
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bars.set_draw_target(ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{prefix:>3} {spinner} {wide_msg}")?;
    let mut answers: HashMap<u64, (String, Vec<u32>, ProgressBar)> = HashMap::new();
    for i in 0..args.requests {
        let question = QUESTIONS[i % QUESTIONS.len()];
        let prompt = tokenizer.chat_prompt(&[
            ChatMessage {
                role: "system".into(),
                content: SYSTEM.into(),
            },
            ChatMessage {
                role: "user".into(),
                content: question.into(),
            },
        ])?;
        let bar = bars.add(
            ProgressBar::new_spinner()
                .with_style(style.clone())
                .with_prefix(format!("#{i}")),
        );
        bar.set_message(format!("waiting: {question}"));
        answers.insert(i as u64, (question.to_string(), Vec::new(), bar));
        scheduler.submit(Request::new(
            i as u64,
            prompt,
            args.max_tokens,
            SamplingParams::default(),
        ))?;
    }
    let started = Instant::now();
    let stats = scheduler.run(|event| match event {
        Event::Token { id, token, .. } => {
            if let Some((_, tokens, bar)) = answers.get_mut(id) {
                tokens.push(*token);
                let text = tokenizer
                    .decode(tokens, true)
                    .unwrap_or_default()
                    .replace('\n', " ");
                let tail: String = text
                    .chars()
                    .rev()
                    .take(100)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                bar.set_message(tail);
                bar.tick();
            }
        }
        Event::Finished { id, .. } => {
            if let Some((question, tokens, bar)) = answers.get(id) {
                bar.finish_and_clear();
                let answer = tokenizer.decode(tokens, true).unwrap_or_default();
                let _ = bars.println(format!("#{id} Q: {question}\n   A: {}\n", answer.trim()));
                if bars.is_hidden() {
                    println!("#{id} Q: {question}\n   A: {}\n", answer.trim());
                }
            }
        }
        Event::Preempted { id } => {
            if let Some((_, _, bar)) = answers.get(id) {
                bar.set_message("preempted: waiting for blocks");
            }
        }
        Event::Admitted { .. } => {}
    })?;
    let secs = started.elapsed().as_secs_f64();
    let prefix = scheduler.cache().prefix_stats();
    println!("summary:");
    println!("  requests             {}", stats.finished);
    println!(
        "  tokens generated     {} in {:.2} s: {:.1} tokens/s",
        stats.generated_tokens,
        secs,
        stats.generated_tokens as f64 / secs
    );
    println!(
        "  prompt tokens        {} ({} served from the prefix cache; block hit rate {:.1}%)",
        stats.prompt_tokens,
        stats.cached_tokens,
        100.0 * prefix.hit_rate()
    );
    println!(
        "  tokens computed      {} in {} batched steps",
        stats.computed_tokens, stats.steps
    );
    println!(
        "  KV bytes per token   {:.0} ({:.2} bits per element)",
        layout.kv_bytes_per_token(),
        layout.bits_per_element()
    );
    println!(
        "  blocks used          peak {} of {}",
        stats.peak_blocks, blocks
    );
    println!("  preemptions          {}", stats.preemptions);
    // dropping the cache waits for the shared tier's queued writes
    drop(scheduler);
    if let Some(shared) = shared {
        println!("  {}", shared_tier_summary(&shared, stats.cached_tokens));
    }
    Ok(())
}
