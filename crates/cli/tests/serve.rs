//! `pagedkv serve` as its users run it: the binary on 127.0.0.1 with an ephemeral port, driven by
//! the real `openai` Python client (installed by `scripts/python-client`), compared with
//! `pagedkv generate`, and stopped by SIGTERM.

mod common;

use std::process::Command;

use common::{curl_json, repo_root, start_server};

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

    let server = start_server(&["--max-running", "1", "--max-queued-requests", "1"]);
    let base = server.base.clone();
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

    let (exited_ok, lines) = server.terminate();
    assert!(exited_ok, "SIGTERM drains and exits 0");
    assert!(lines.iter().any(|l| l.contains("drained")), "{lines:?}");
}

#[test]
fn serve_with_the_kv_profile_answers_the_openai_client_as_generate_does() {
    let profile = repo_root().join("profiles/smollm2-2.5bit.json");
    let profile = profile.to_str().unwrap();
    let question = "Name three colours.";
    let generated = Command::new(env!("CARGO_BIN_EXE_pagedkv"))
        .args(["--threads", "2", "--kv-profile", profile, "generate"])
        .args(["--max-tokens", "16", "--prompt", question])
        .output()
        .expect("generate runs");
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let expected = String::from_utf8(generated.stdout).unwrap();

    let server = start_server(&["--kv-profile", profile]);
    let python_path = Command::new("bash")
        .arg(repo_root().join("scripts/python-client"))
        .output()
        .expect("scripts/python-client runs");
    assert!(python_path.status.success());
    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none", max_retries=0)
r = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=16,
    messages=[{"role": "user", "content": sys.argv[2]}])
print(r.choices[0].message.content, end="")
"#;
    let client = Command::new("python3")
        .args(["-c", script, &server.base, question])
        .env(
            "PYTHONPATH",
            String::from_utf8(python_path.stdout).unwrap().trim(),
        )
        .output()
        .expect("python3 runs");
    assert!(
        client.status.success(),
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    let answer = String::from_utf8(client.stdout).unwrap();
    assert!(!answer.is_empty());
    assert_eq!(
        answer,
        expected.trim_end_matches('\n'),
        "the profile applies alike"
    );
    let (exited_ok, lines) = server.terminate();
    assert!(exited_ok);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("profile") && l.contains("smollm2-2.5bit.json")),
        "{lines:?}"
    );
}
