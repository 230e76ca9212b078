//! `pagedkv bench generate --context N`: decode where the KV cache dominates. Prompts of N
//! tokens (consecutive windows of the eval text, so that no two share a prefix), then greedy
//! decode; per codec, one sequence and `--concurrent` sequences through our scheduler, and
//! llama.cpp (llama-cpp-python, the same GGUF and first prompt, the same threads, its f16 /
//! q8_0 / q4_0 KV cache) in the same rounds when it is installed (`scripts/llama-cpp-server`).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result};
use pagedkv_engine::{Event, Model};

use crate::bench::{median, submitted, GenerateBench};
use crate::common::{CacheSetting, CommonArgs};

const PROMPT_TEXT: &str = include_str!("../../../data/alice-in-wonderland.txt");
const LLAMA_CPP_DECODE: &str = include_str!("../../../scripts/llama-cpp-decode");

/// Prefill and decode rates of one run.
#[derive(Debug, Clone, Copy)]
struct Rates {
    /// Prompt tokens per second until every sequence has its first token.
    prefill: f64,
    /// Tokens per second generated after that (all sequences together).
    decode: f64,
}

/// Our scheduler: one sequence per prompt, `tokens` tokens each.
fn ours(
    model: &Model,
    common: &CommonArgs,
    setting: &CacheSetting,
    prompts: &[Vec<u32>],
    tokens: usize,
) -> Result<Rates> {
    let n = prompts.len();
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let mut scheduler = submitted(model, common, setting, prompts, tokens, 2048)?;
    let started = Instant::now();
    let mut first_seen = vec![false; n];
    let (mut all_first, mut after) = (None, 0usize);
    scheduler.run(|event| {
        if let Event::Token { id, .. } = event {
            match all_first {
                Some(_) => after += 1,
                None => {
                    first_seen[*id as usize] = true;
                    if first_seen.iter().all(|s| *s) {
                        all_first = Some(Instant::now());
                    }
                }
            }
        }
    })?;
    let all_first = all_first.context("no sequence produced a token")?;
    Ok(Rates {
        prefill: prompt_tokens as f64 / (all_first - started).as_secs_f64(),
        decode: after as f64 / all_first.elapsed().as_secs_f64(),
    })
}

/// llama-cpp-python as `scripts/llama-cpp-server` installs it, and our decode script for it
/// written once to a temporary file (removed on drop).
struct LlamaCpp {
    dir: PathBuf,
    script: PathBuf,
}

impl LlamaCpp {
    /// `None` when llama-cpp-python is not installed (or does not import).
    fn installed() -> Result<Option<Self>> {
        let Some(home) = std::env::var_os("PAGEDKV_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/pagedkv")))
        else {
            return Ok(None);
        };
        let dir = home.join("llama-cpp-python");
        let imports = Command::new("python3")
            .args(["-c", "import llama_cpp, numpy"])
            .env("PYTHONPATH", &dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !imports {
            return Ok(None);
        }
        let script = std::env::temp_dir().join(format!(
            "pagedkv-llama-cpp-decode-{}.py",
            std::process::id()
        ));
        std::fs::write(&script, LLAMA_CPP_DECODE)?;
        Ok(Some(Self { dir, script }))
    }
}

impl Drop for LlamaCpp {
    fn drop(&mut self) {
        // a temporary file: nothing to do if it is already gone
        let _ = std::fs::remove_file(&self.script);
    }
}

/// llama.cpp's rates for each KV type, one process per round (see scripts/llama-cpp-decode).
fn llama_cpp(
    llama: &LlamaCpp,
    model: &std::path::Path,
    threads: usize,
    prompt: &[u32],
    tokens: usize,
    kv_types: &[String],
) -> Result<Vec<Rates>> {
    let mut child = Command::new("python3")
        .arg(&llama.script)
        .arg(model)
        .arg(threads.to_string())
        .arg(tokens.to_string())
        .arg(kv_types.join(","))
        .env("PYTHONPATH", &llama.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting python3 for llama.cpp")?;
    child
        .stdin
        .take()
        .context("llama.cpp's stdin")?
        .write_all(serde_json::to_string(prompt)?.as_bytes())?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "llama.cpp's run failed: {}",
        output.status
    );
    String::from_utf8(output.stdout)?
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let rate = |key: &str| {
                v[key]
                    .as_f64()
                    .with_context(|| format!("no {key} in {line}"))
            };
            Ok(Rates {
                prefill: rate("prefill_tokens_per_s")?,
                decode: rate("decode_tokens_per_s")?,
            })
        })
        .collect()
}

/// KV bytes per token of llama.cpp's cache types (ggml: q8_0 stores 34 bytes per 32 elements,
/// q4_0 18).
fn llama_cpp_bytes_per_element(kv: &str) -> Result<f64> {
    Ok(match kv {
        "f16" => 2.0,
        "q8_0" => 34.0 / 32.0,
        "q4_0" => 18.0 / 32.0,
        other => anyhow::bail!("unknown llama.cpp KV type `{other}` (f16, q8_0, q4_0)"),
    })
}

pub fn run(common: &CommonArgs, args: GenerateBench) -> Result<()> {
    let (model, tokenizer) = common.load_model()?;
    let codecs = common.bench_settings(&args.codecs, &model)?;
    let limit = model.config().context_len;
    let context = args.context;
    anyhow::ensure!(
        context
            .checked_add(args.tokens)
            .is_some_and(|end| end <= limit),
        "--context {context} plus --tokens {} exceed the model's context of {limit} tokens",
        args.tokens
    );
    // sequence i reads window i of the text: no two share a prefix, so every sequence's KV is
    // its own, as with independent users
    let text = tokenizer.encode(PROMPT_TEXT)?;
    let windows = args.concurrent.max(1);
    anyhow::ensure!(
        context > 0
            && context
                .checked_mul(windows)
                .is_some_and(|n| n <= text.len()),
        "the prompt text has {} tokens: too few for {windows} prompts of {context}",
        text.len()
    );
    let prompts: Vec<Vec<u32>> = text
        .chunks_exact(context)
        .take(windows)
        .map(<[u32]>::to_vec)
        .collect();
    let prompt = &prompts[0];
    let kv_types: Vec<String> = args.llama_kv.split(',').map(str::to_string).collect();
    for kv in &kv_types {
        llama_cpp_bytes_per_element(kv)?;
    }
    let threads = common
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let llama = LlamaCpp::installed()?;
    let simd = common.simd()?;
    let sequences = match args.concurrent {
        1 => "1 sequence".to_string(),
        n => format!("1 and {n} sequences"),
    };
    println!(
        "bench generate: a prompt of {context} tokens, then {} tokens; {sequences}; weights {:?}, threads {}, {} kernels, attention {}, prefetch {}, median of {} interleaved rounds",
        args.tokens,
        model.weight_mode(),
        common.threads_label(),
        simd,
        common.attention_path(),
        common.prefetch(),
        args.rounds
    );
    if llama.is_none() {
        println!("  llama.cpp: not installed (scripts/llama-cpp-server installs llama-cpp-python)");
    }
    let model_path = pagedkv_engine::fetch::ensure_model(common.model.as_deref())?;
    let (mut single, mut batched) = (
        vec![Vec::new(); codecs.len()],
        vec![Vec::new(); codecs.len()],
    );
    let mut theirs = vec![Vec::new(); kv_types.len()];
    for _ in 0..args.rounds {
        for (i, codec) in codecs.iter().enumerate() {
            single[i].push(ours(&model, common, codec, &prompts[..1], args.tokens)?);
            if args.concurrent > 1 {
                batched[i].push(ours(&model, common, codec, &prompts, args.tokens)?);
            }
        }
        if let Some(llama) = &llama {
            let rates = llama_cpp(llama, &model_path, threads, prompt, args.tokens, &kv_types)?;
            for (all, r) in theirs.iter_mut().zip(rates) {
                all.push(r);
            }
        }
    }
    let medians = |runs: &[Rates]| {
        (
            median(runs.iter().map(|r| r.prefill).collect()),
            median(runs.iter().map(|r| r.decode).collect()),
        )
    };
    // KV bytes read per decoded token: the context at the middle of the decode
    let mean_context = (context + args.tokens / 2) as f64;
    let c = model.config();
    let elements = (2 * c.layers * c.kv_heads * c.head_dim) as f64;
    let llama_f16 = theirs
        .iter()
        .zip(&kv_types)
        .find(|(_, kv)| kv.as_str() == "f16")
        .filter(|(runs, _)| !runs.is_empty())
        .map(|(runs, _)| medians(runs).1);
    let mut rows = Vec::new();
    println!(
        "  {:>22} {:>12} {:>12} {:>8} {:>12} {:>8}",
        "", "prefill t/s", "decode t/s", "KV GB/s", "× llama f16", "× our f16"
    );
    let our_f16 = codecs
        .iter()
        .position(CacheSetting::is_f16)
        .map(|i| medians(&single[i]).1);
    for (i, codec) in codecs.iter().enumerate() {
        let layout = codec.layout(&model, common.block_size)?;
        let bytes = layout.kv_bytes_per_token();
        for (label, runs, n) in [
            ("1 sequence", &single[i], 1),
            ("concurrent", &batched[i], args.concurrent),
        ] {
            if runs.is_empty() {
                continue;
            }
            let (prefill, decode) = medians(runs);
            let gbs = decode * mean_context * bytes / 1e9;
            let vs_llama = if n == 1 {
                llama_f16.map(|l| decode / l)
            } else {
                None
            };
            let vs_f16 = match (n, our_f16) {
                (1, Some(f)) => Some(decode / f),
                _ => None,
            };
            let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
            println!(
                "  {:>22} {prefill:>12.1} {decode:>12.1} {gbs:>8.1} {:>12} {:>8}",
                format!(
                    "{codec}, {}",
                    if n == 1 {
                        label.to_string()
                    } else {
                        format!("{n} seq")
                    }
                ),
                fmt(vs_llama),
                fmt(vs_f16)
            );
            rows.push(serde_json::json!({
                "engine": "pagedkv", "kv": codec.to_string(), "sequences": n, "context": context,
                "tokens": args.tokens, "prefill_tokens_per_s": prefill,
                "decode_tokens_per_s": decode, "kv_gb_per_s": gbs,
                "decode_vs_llama_cpp_f16": vs_llama, "prefetch": common.prefetch().to_string(),
                "simd": simd.to_string(), "attention": common.attention_path().to_string(),
            }));
        }
    }
    for (kv, runs) in kv_types.iter().zip(&theirs) {
        if runs.is_empty() {
            continue;
        }
        let (prefill, decode) = medians(runs);
        let gbs = decode * mean_context * elements * llama_cpp_bytes_per_element(kv)? / 1e9;
        println!(
            "  {:>22} {prefill:>12.1} {decode:>12.1} {gbs:>8.1} {:>12} {:>8}",
            format!("llama.cpp {kv}"),
            llama_f16.map_or("-".to_string(), |l| format!("{:.2}", decode / l)),
            "-"
        );
        rows.push(serde_json::json!({
            "engine": "llama.cpp (llama-cpp-python 0.3.36)", "kv": kv, "sequences": 1,
            "context": context, "tokens": args.tokens, "prefill_tokens_per_s": prefill,
            "decode_tokens_per_s": decode, "kv_gb_per_s": gbs,
        }));
    }
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}
