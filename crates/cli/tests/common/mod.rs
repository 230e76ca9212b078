//! The `pagedkv` binary serving on 127.0.0.1 with an ephemeral port, and curl to talk to it.
#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The binary serving on an ephemeral port; killed when dropped (a failed test leaves no
/// server behind).
pub struct ServerProcess {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    child: Option<Child>,
    stderr: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl ServerProcess {
    /// Stops the server with SIGTERM and waits; returns whether it exited 0, and what it
    /// printed on stderr after its address.
    pub fn terminate(mut self) -> (bool, Vec<String>) {
        let child = self.child.take().expect("running");
        let ok = terminate(child);
        let lines = self
            .stderr
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        (ok, lines)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // a test that failed: the process must not outlive it
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `pagedkv --threads 2 serve --port 0 FLAGS` and waits until `/health` answers 200.
pub fn start_server(flags: &[&str]) -> ServerProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pagedkv"))
        .args(["--threads", "2", "serve", "--port", "0"])
        .args(flags)
        .stdout(Stdio::null())
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
    // keep reading stderr so the server never blocks on it
    let stderr = std::thread::spawn(move || lines.map_while(Result::ok).collect());
    let server = ServerProcess {
        base,
        child: Some(child),
        stderr: Some(stderr),
    };
    let started = Instant::now();
    while !matches!(http_get(&server.base, "/health"), Some(200)) {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "never healthy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    server
}

/// Status of a GET, with curl (as a user would check it).
pub fn http_get(base: &str, path: &str) -> Option<u16> {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("{base}{path}"))
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()?.parse().ok()
}

pub fn curl_json(base: &str, path: &str, body: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-s", "-H", "content-type: application/json", "-d", body])
        .arg(format!("{base}{path}"))
        .output()
        .expect("curl runs");
    serde_json::from_slice(&out.stdout).expect("a JSON answer")
}

/// The value of one metric series (`name{labels}` as printed), 0 when absent.
pub fn metric(base: &str, series: &str) -> f64 {
    let out = Command::new("curl")
        .arg("-s")
        .arg(format!("{base}/metrics"))
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until `series` reaches `at_least` (at most 30 s).
pub fn wait_for_metric(base: &str, series: &str, at_least: f64) {
    let started = Instant::now();
    while metric(base, series) < at_least {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{series} stayed below {at_least}: {}",
            metric(base, series)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops a server with SIGTERM and waits for it; returns whether it exited 0.
pub fn terminate(mut server: Child) -> bool {
    let pid = server.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(sent.is_ok_and(|s| s.success()), "SIGTERM sent");
    let started = Instant::now();
    loop {
        if let Some(status) = server.try_wait().unwrap() {
            return status.success();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `redis-server` binary (installed by `scripts/redis-server` when missing).
pub fn redis_binary() -> PathBuf {
    pagedkv_redis::LocalRedis::installed_binary(&repo_root().join("scripts/redis-server"))
        .expect("a redis-server binary")
}
