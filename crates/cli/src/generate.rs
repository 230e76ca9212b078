//! `pagedkv generate`: one prompt, streamed.

use std::io::Write;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use pagedkv_engine::{ChatMessage, Event, Request, SamplingParams, Scheduler, SchedulerConfig};

use crate::common::{shared_tier_summary, CommonArgs, SharedTierArgs};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Send the prompt as-is (after the model's beginning-of-sequence token, if it uses one)
    /// instead of wrapping it in the chat template.
    #[arg(long)]
    raw: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// RNG seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    shared: SharedTierArgs,
    /// KV cache budget in MiB.
    #[arg(long, default_value_t = 256)]
    cache_mib: u64,
}

pub fn run(common: &CommonArgs, args: GenerateArgs) -> Result<()> {
    let (model, tokenizer) = common.load_model()?;
    let prompt = if args.raw {
        tokenizer.encode_prompt(&args.prompt)?
    } else {
        tokenizer.chat_prompt(&[ChatMessage {
            role: "user".into(),
            content: args.prompt.clone(),
        }])?
    };
    let context = model.config().context_len;
    anyhow::ensure!(
        prompt.len().saturating_add(args.max_tokens) <= context,
        "the prompt's {} tokens plus --max-tokens {} exceed the model's context of {context} tokens",
        prompt.len(),
        args.max_tokens
    );
    let mut cache = common.cache(&model, args.cache_mib)?;
    let shared = args.shared.attach(&mut cache, &model)?;
    let mut scheduler = Scheduler::new(&model, cache, SchedulerConfig::default())?;
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    scheduler.submit(Request::new(0, prompt, args.max_tokens, sampling))?;
    let started = Instant::now();
    let mut generated = Vec::new();
    let mut printed = String::new();
    let mut stdout = std::io::stdout();
    scheduler.run(|event| {
        if let Event::Token { token, .. } = event {
            generated.push(*token);
            // decode the whole answer so multi-byte characters split over tokens print whole
            if let Ok(text) = tokenizer.decode(&generated, true) {
                if text.len() > printed.len()
                    && text.is_char_boundary(printed.len())
                    && !text.ends_with('\u{FFFD}')
                {
                    let _ = write!(stdout, "{}", &text[printed.len()..]);
                    let _ = stdout.flush();
                    printed = text;
                }
            }
        }
    })?;
    let secs = started.elapsed().as_secs_f64();
    println!();
    eprintln!(
        "{} tokens in {:.2} s ({:.1} tokens/s)",
        generated.len(),
        secs,
        generated.len() as f64 / secs
    );
    let cached = scheduler.stats().cached_tokens;
    // dropping the cache waits for the shared tier's queued writes
    drop(scheduler);
    if let Some(shared) = shared {
        eprintln!("{}", shared_tier_summary(&shared, cached));
    }
    Ok(())
}
