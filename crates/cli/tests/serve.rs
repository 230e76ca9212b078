//! `pagedkv serve` as its users run it: the binary on 127.0.0.1 with an ephemeral port, driven by
//! the real `openai` Python client (installed by `scripts/python-client`), compared with
//! `pagedkv generate`, and stopped by SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The binary serving on an ephemeral port, and its base URL.
fn start_server(flags: &[&str]) -> (Child, String, std::thread::JoinHandle<Vec<String>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pagedkv"))
        .args(["--threads", "2", "serve", "--port", "0"])
        .args(flags)
        .stderr(Stdio::piped())
        .spawn()
        .expect("pagedkv starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("the server prints its address")
            .unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // keep reading stderr so the server never blocks on it; the lines are checked at the end
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect());
    let started = Instant::now();
    while !matches!(http_get(&base, "/health"), Some(200)) {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "never healthy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, base, rest)
}

/// Status of a GET, with curl (as a user would check it).
fn http_get(base: &str, path: &str) -> Option<u16> {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{base}{path}"))
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()?.parse().ok()
}

fn curl_json(base: &str, path: &str, body: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-s", "-H", "content-type: application/json", "-d", body])
        .arg(format!("{base}{path}"))
        .output()
        .expect("curl runs");
    serde_json::from_slice(&out.stdout).expect("a JSON answer")
}

#[test]
fn the_openai_client_and_curl_drive_the_server_and_sigterm_drains_it() {
    let question = "What is the capital of France?";
    let generated = Command::new(env!("CARGO_BIN_EXE_pagedkv"))
        .args([
            "--threads",
            "2",
            "generate",
            "--max-tokens",
            "24",
            "--prompt",
            question,
        ])
        .output()
        .expect("generate runs");
    assert!(generated.status.success());
    let expected = String::from_utf8(generated.stdout).unwrap();

    let (mut server, base, stderr) =
        start_server(&["--max-running", "1", "--max-queued-requests", "1"]);
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 24,
        "temperature": 0,
    });
    let answer = curl_json(&base, "/v1/chat/completions", &body.to_string());
    assert_eq!(
        answer["choices"][0]["message"]["content"].as_str().unwrap(),
        expected.trim_end_matches('\n'),
        "greedy output through the server equals `pagedkv generate`"
    );

    let python_path = Command::new("bash")
        .arg(repo_root().join("scripts/python-client"))
        .output()
        .expect("scripts/python-client runs");
    assert!(
        python_path.status.success(),
        "installing the openai client failed: {}",
        String::from_utf8_lossy(&python_path.stderr)
    );
    let python_path = String::from_utf8(python_path.stdout).unwrap();
    let client = Command::new("python3")
        .arg(repo_root().join("crates/cli/tests/openai_client.py"))
        .arg(&base)
        .env("PYTHONPATH", python_path.trim())
        .output()
        .expect("python3 runs");
    let report = String::from_utf8_lossy(&client.stdout);
    println!("{report}");
    assert!(
        client.status.success(),
        "the openai client's checks failed:\n{report}\n{}",
        String::from_utf8_lossy(&client.stderr)
    );
    assert!(report.contains("checks passed"));

    let pid = server.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "SIGTERM drains and exits 0: {status}");
    let lines = stderr.join().unwrap();
    assert!(lines.iter().any(|l| l.contains("drained")), "{lines:?}");
}
