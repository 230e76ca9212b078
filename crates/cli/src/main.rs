//! The `pagedkv` binary (DESIGN §10): demo, generate, eval, calibrate, inspect, bench, serve.

mod bench;
mod bench_context;
mod bench_prefix;
mod calibrate;
mod common;
mod demo;
mod eval;
mod generate;
mod inspect;
mod plot;
mod serve;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pagedkv",
    version,
    about = "Paged, compressed KV cache for LLM inference, on a real model"
)]
struct Cli {
    #[command(flatten)]
    common: common::CommonArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Chat requests sharing a system prompt, batched through the scheduler on the paged cache.
    Demo(demo::DemoArgs),
    /// Generate a continuation of one prompt.
    Generate(generate::GenerateArgs),
    /// Codec quality on real text: perplexity, KL to the f32 cache, top-1 agreement.
    Eval(eval::EvalArgs),
    /// Make a KV profile: per-layer codecs for a bit budget, key means and key split, fitted on
    /// a calibration text, for --kv-profile.
    Calibrate(calibrate::CalibrateArgs),
    /// The model's KV layout, bytes per token per codec, sequences that fit a budget.
    Inspect(inspect::InspectArgs),
    /// An OpenAI-compatible HTTP server whose prefix cache explains itself.
    Serve(serve::ServeArgs),
    /// Benchmarks with their baselines measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // the message and its causes, no backtrace: this is for users
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let pool = cli.common.thread_pool()?;
    let common = &cli.common;
    // a bad --simd is an error for every command, before any work
    common.simd()?;
    pagedkv_engine::fetch::keep_codebooks();
    match cli.command {
        Command::Demo(args) => pool.install(|| demo::run(common, args)),
        Command::Generate(args) => pool.install(|| generate::run(common, args)),
        Command::Eval(args) => pool.install(|| eval::run(common, args)),
        Command::Calibrate(args) => pool.install(|| calibrate::run(common, args)),
        Command::Inspect(args) => pool.install(|| inspect::run(common, args)),
        Command::Bench(command) => pool.install(|| bench::run(common, command)),
        // the server's engine thread enters the pool itself; its HTTP threads stay outside
        Command::Serve(args) => serve::run(common, args, pool),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    /// Every subcommand parses with its defaults and a global flag: clap's checks
    /// (`debug_assert`) miss a subcommand flag named like a global one, which panics only
    /// when the matches are read (`bench attention --attention` did).
    #[test]
    fn every_subcommand_parses() {
        super::Cli::command().debug_assert();
        for args in [
            &["demo"][..],
            &["generate", "--prompt", "hi"],
            &["eval"],
            &["inspect"],
            &["serve"],
            &["bench", "generate"],
            &["bench", "codecs"],
            &["bench", "attention"],
            &["bench", "blocks"],
            &["bench", "prefix"],
        ] {
            let line = ["pagedkv", "--attention", "fast"].iter().chain(args);
            assert!(super::Cli::try_parse_from(line).is_ok(), "{args:?}");
        }
    }
}
