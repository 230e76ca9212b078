//! The command line on other models: small Llama and Qwen2 GGUF files written by the engine
//! tests' writer (random weights, 261-token vocabulary), at head_dim 64 and 128. `inspect`
//! prints each one's layout and capacity per codec; `generate` runs on each with a compressed
//! cache.

#[path = "../../engine/tests/tiny_gguf/mod.rs"]
mod tiny_gguf;

use std::process::Command;

use candle_core::quantized::GgmlDType;
use tiny_gguf::{Spec, TinyGguf};

fn pagedkv(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pagedkv"))
        .args(args)
        .output()
        .expect("pagedkv runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// A small model: Q8_0 matrices, head_dim hidden / heads.
fn spec(architecture: &'static str, hidden: usize, heads: usize, kv_heads: usize) -> Spec {
    Spec::of(architecture, hidden, heads, kv_heads, GgmlDType::Q8_0)
}

fn models() -> Vec<(Spec, &'static str)> {
    vec![
        (
            spec("llama", 256, 4, 2),
            "query heads 4, kv heads 2 (GQA, 2 query heads per kv head), head_dim 64",
        ),
        (
            spec("llama", 512, 4, 1),
            "query heads 4, kv heads 1 (MQA, 4 query heads), head_dim 128",
        ),
        (
            spec("qwen2", 256, 2, 2),
            "query heads 2, kv heads 2 (MHA), head_dim 128",
        ),
    ]
}

#[test]
fn inspect_prints_each_models_layout_and_capacity_per_codec() {
    for (spec, geometry) in models() {
        let path = TinyGguf::new(spec).write("cli-inspect");
        let out = pagedkv(&["inspect", path.to_str().unwrap(), "--context", "256"]);
        println!("{out}");
        assert!(
            out.contains(&format!("architecture {}", spec.architecture)),
            "{out}"
        );
        assert!(out.contains(geometry), "{out}");
        // K and V of every layer, at 2 bytes per element for f16
        let f16_bytes = 2 * 2 * spec.kv_heads * spec.head_dim * 2;
        let f16_row = out
            .lines()
            .find(|l| l.trim_start().starts_with("f16 "))
            .unwrap();
        assert!(f16_row.contains(&format!(" {f16_bytes} ")), "{f16_row}");
        for codec in [
            "f32",
            "bf16",
            "fp8-e4m3",
            "int8",
            "int4",
            "int2",
            "fibquant-k4n256",
        ] {
            let row = out
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{codec} ")))
                .unwrap_or_else(|| panic!("no {codec} row in {out}"));
            let sequences: u64 = row.split_whitespace().last().unwrap().parse().unwrap();
            assert!(sequences > 0, "{row}");
        }
    }
}

#[test]
fn generate_runs_on_each_model_with_a_compressed_cache() {
    for (spec, _) in models() {
        let path = TinyGguf::new(spec).write("cli-generate");
        for codec in ["f16", "int4", "fibquant-k4n256"] {
            let out = pagedkv(&[
                "--model",
                path.to_str().unwrap(),
                "--threads",
                "2",
                "generate",
                "--prompt",
                "hello there",
                "--max-tokens",
                "12",
                "--codec",
                codec,
            ]);
            assert!(!out.is_empty(), "{} {codec}: no output", spec.architecture);
        }
    }
}

#[test]
fn every_tool_runs_at_each_geometry() {
    let dir = std::env::temp_dir().join(format!("pagedkv-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // head_dim 64 with 8 query heads per kv head; 128 with 4; Qwen2 (no key normalization)
    for (spec, setting) in [
        (spec("llama", 512, 8, 1), "fibquant-k4n256+keysplit+sink1"),
        (spec("llama", 512, 4, 1), "fibquant-k4n256+keysplit+sink1"),
        (spec("qwen2", 256, 2, 1), "fibquant-k4n256+sink1"),
    ] {
        let path = TinyGguf::new(spec).write("cli-tools");
        let model = path.to_str().unwrap();
        let profile = dir.join(format!("{}-{}.json", spec.architecture, spec.heads));
        let profile = profile.to_str().unwrap();
        let with = |args: &[&str]| {
            let mut all = vec!["--model", model, "--threads", "2"];
            all.extend_from_slice(args);
            pagedkv(&all)
        };
        let small = ["--window", "64", "--windows", "1"];
        let eval = with(
            &[
                &["eval", "--codecs", "f16,int4,fibquant-k4n256"][..],
                &small,
            ]
            .concat(),
        );
        assert!(eval.contains("fibquant-k4n256"), "{eval}");
        let made = with(
            &[
                &["calibrate", "--setting", setting, "--out", profile][..],
                // few levels: the large codebooks' error measurement alone takes a minute
                &["--levels", "fibquant-k4n128,fibquant-k4n512,int8"],
                &small,
            ]
            .concat(),
        );
        assert!(made.contains("profile written"), "{made}");
        let eval = with(&[&["--kv-profile", profile, "eval"][..], &small].concat());
        assert!(!eval.contains("fitted"), "{eval}");
        let bench = with(&[
            "--kv-profile",
            profile,
            "bench",
            "generate",
            "--codecs",
            "f16,int4",
            "--tokens",
            "8",
            "--rounds",
            "1",
            "--concurrent",
            "2",
        ]);
        assert!(
            bench.contains("profile ") && bench.contains("baseline candle"),
            "{bench}"
        );
        println!("{} {} heads: every tool ran", spec.architecture, spec.heads);
    }
}
