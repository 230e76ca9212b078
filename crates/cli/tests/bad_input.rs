//! The command line as a user meets it: every row of the README's bad-input table, and the
//! numeric flags at absurd values, run against the binary — a clear message and exit status 1,
//! never a panic, a hang or a wrapped number.

use std::process::Command;
use std::time::{Duration, Instant};

use pagedkv_engine::fetch::ensure_model;
use pagedkv_engine::{KvProfile, ModelFingerprint};

/// Runs `pagedkv ARGS` (at most 120 s) and checks it fails with status 1 and `expected` in
/// its error message.
fn fails_with(args: &[&str], expected: &str) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_pagedkv"))
        .args(args)
        .output()
        .expect("pagedkv runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(
        stderr.contains(expected),
        "{args:?}: expected {expected:?} in {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "{args:?} took too long"
    );
}

#[test]
fn bad_flags_get_clear_errors() {
    let dir = std::env::temp_dir().join(format!("pagedkv-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    std::fs::write(
        path("corrupt.gguf"),
        [0xa1u8, 0x83, 0x63, 0x70].repeat(1000),
    )
    .unwrap();
    let model = std::fs::read(ensure_model(None).unwrap()).unwrap();
    std::fs::write(path("trunc.gguf"), &model[..100_000]).unwrap();
    std::fs::write(path("short.txt"), "three words here").unwrap();
    std::fs::write(
        path("bad.json"),
        r#"[{"codec": "int4", "bits_per_element": "x"}]"#,
    )
    .unwrap();
    // the repository's profile, damaged by one digit, and re-signed for another model
    let profile_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../profiles/smollm2-2.5bit.json"
    );
    let profile_text = std::fs::read_to_string(profile_path).unwrap();
    let first_mean = profile_text.find("\"key_means\": [").unwrap();
    let point = first_mean + profile_text[first_mean..].find('.').unwrap();
    let mut damaged = profile_text.clone();
    damaged.insert(point + 1, '7');
    std::fs::write(path("damaged-profile.json"), damaged).unwrap();
    let mut foreign = KvProfile::load(std::path::Path::new(profile_path)).unwrap();
    foreign.model = ModelFingerprint(1);
    foreign
        .save(std::path::Path::new(&path("foreign-profile.json")))
        .unwrap();
    let long_prompt = "word ".repeat(9000);
    let (corrupt, trunc, short, bad) = (
        path("corrupt.gguf"),
        path("trunc.gguf"),
        path("short.txt"),
        path("bad.json"),
    );

    let g = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["generate".to_string(), "--prompt".into(), "hi".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let (damaged, foreign) = (path("damaged-profile.json"), path("foreign-profile.json"));
    let rows: Vec<(Vec<String>, &str)> =
        vec![
        (
            g(&["--kv-profile", &damaged]),
            "the file is damaged or was edited",
        ),
        (
            g(&["--kv-profile", &foreign]),
            "it was made for model 00000000000000000000000000000001; this model is",
        ),
        (
            g(&["--kv-profile", profile_path, "--codec", "int4"]),
            "--kv-profile sets the cache's codecs and sinks: drop --codec",
        ),
        (
            ["bench", "attention", "--kv-profile", profile_path]
                .map(String::from)
                .to_vec(),
            "--kv-profile applies to `bench generate`",
        ),
        (
            [
                "eval",
                "--sensitivity",
                "int4",
                "--kv-profile",
                profile_path,
            ]
            .map(String::from)
            .to_vec(),
            "--sensitivity measures a setting, not a --kv-profile",
        ),
        (
            g(&["--codec", "int9"]),
            "unknown codec `int9`; valid codecs: f32, f16",
        ),
        (
            g(&["--codec", "fibquant-k3n256"]),
            "head_dim must be a multiple of the FibQuant block size k",
        ),
        (
            g(&["--block-size", "0"]),
            "`block_size` must be greater than zero",
        ),
        (
            g(&["--block-size", "100000"]),
            "`block_size` = 100000 exceeds the supported maximum 4096",
        ),
        (g(&["--threads", "0"]), "--threads must be at least 1"),
        (
            g(&["--threads", "100000"]),
            "--threads 100000 exceeds the limit of 1024",
        ),
        (
            g(&["--model", "/nonexistent.gguf"]),
            "cannot read /nonexistent.gguf: model file not found",
        ),
        (
            g(&["--model", &corrupt]),
            "not a readable GGUF file: unknown magic",
        ),
        (g(&["--model", &trunc]), "not a readable GGUF file"),
        (
            vec![
                "generate".into(),
                "--raw".into(),
                "--prompt".into(),
                long_prompt.clone(),
            ],
            "exceed the model's context of 8192 tokens",
        ),
        (
            g(&["--max-tokens", "99999999999"]),
            "plus --max-tokens 99999999999 exceed the model's context of 8192 tokens",
        ),
        (
            g(&["--codec", "int4", "--sink-tokens", "20"]),
            "`sink_tokens` = 20 exceeds the supported maximum 16",
        ),
        (g(&["--cache-mib", "99999999999999"]), "is too large"),
        (
            g(&["--simd", "avx9"]),
            "unknown --simd `avx9` (avx512, avx2, portable)",
        ),
        (
            ["bench", "attention", "--contexts", "16", "--simd", "avx9"]
                .map(String::from)
                .to_vec(),
            "unknown --simd `avx9` (avx512, avx2, portable)",
        ),
        (
            ["bench", "attention", "--contexts", "16", "--paths", "quick"]
                .map(String::from)
                .to_vec(),
            "unknown attention path `quick` (exact, fast)",
        ),
        (
            ["bench", "attention", "--contexts", "16", "--prefetches", "some"]
                .map(String::from)
                .to_vec(),
            "unknown prefetch `some` (compressed, all, off)",
        ),
        (
            ["bench", "attention", "--contexts", "16", "--heads", "9/2"]
                .map(String::from)
                .to_vec(),
            "--heads `9/2`: query heads / kv heads, positive, the first a multiple of the second",
        ),
        (
            ["bench", "generate", "--context", "18446744073709551615"]
                .map(String::from)
                .to_vec(),
            "exceed the model's context of 8192 tokens",
        ),
        (
            ["bench", "generate", "--context", "9000"]
                .map(String::from)
                .to_vec(),
            "--context 9000 plus --tokens 64 exceed the model's context of 8192 tokens",
        ),
        (
            ["bench", "generate", "--context", "64", "--llama-kv", "q5_1"]
                .map(String::from)
                .to_vec(),
            "unknown llama.cpp KV type `q5_1`",
        ),
        (
            vec!["eval".into(), "--window".into(), "1".into()],
            "window (1) must be at least 2 tokens",
        ),
        (
            vec!["eval".into(), "--text".into(), "/nonexistent.txt".into()],
            "reading the text /nonexistent.txt",
        ),
        (
            vec!["eval".into(), "--codecs".into(), "int4@f16:99".into()],
            "`override layer` = 99 exceeds the supported maximum 29",
        ),
        (
            vec!["eval".into(), "--codecs".into(), "int4+recentx".into()],
            "unknown codec `int4+recentx`",
        ),
        (
            vec![
                "eval".into(),
                "--codecs".into(),
                "fibquant-k4n256+keynorm".into(),
                "--calibration".into(),
                short.clone(),
            ],
            "it needs at least 1024",
        ),
        (
            vec!["eval".into(), "--from-json".into(), bad.clone()],
            "row 0: `bits_per_element` is not a number",
        ),
        (
            vec![
                "bench".into(),
                "attention".into(),
                "--contexts".into(),
                "0".into(),
            ],
            "contexts must be positive",
        ),
        (
            vec![
                "bench".into(),
                "attention".into(),
                "--contexts".into(),
                "99999999999".into(),
            ],
            "contexts must be at most 1048576 tokens",
        ),
        (
            vec![
                "inspect".into(),
                "--budget-mib".into(),
                "99999999999999".into(),
            ],
            "--budget-mib 99999999999999 is too large",
        ),
        (
            vec![
                "serve".into(),
                "--port".into(),
                "0".into(),
                "--shared-tier".into(),
                "nope://x".into(),
            ],
            "invalid shared-tier URL",
        ),
        (
            vec![
                "serve".into(),
                "--port".into(),
                "0".into(),
                "--max-queued-requests".into(),
                "0".into(),
            ],
            "--max-queued-requests must be at least 1",
        ),
    ];
    for (args, expected) in &rows {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&args, expected);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn every_command_explains_itself() {
    for command in [
        &[][..],
        &["demo"],
        &["generate"],
        &["eval"],
        &["inspect"],
        &["serve"],
        &["bench"],
        &["bench", "prefix"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_pagedkv"))
            .args(command)
            .arg("--help")
            .output()
            .expect("pagedkv runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("Usage:"),
            "{command:?}: {text}"
        );
    }
}
