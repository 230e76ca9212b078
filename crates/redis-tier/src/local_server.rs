//! A throwaway `redis-server` on a loopback port, for tests and benchmarks: no persistence,
//! stopped by its process id when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` process of our own.
#[derive(Debug)]
pub struct LocalRedis {
    binary: PathBuf,
    port: u16,
    extra: Vec<String>,
    child: Option<Child>,
}

impl LocalRedis {
    /// The `redis-server` binary that the install script `script` (the repository's
    /// `scripts/redis-server`) finds or installs, from the path it prints.
    pub fn installed_binary(script: &Path) -> std::io::Result<PathBuf> {
        let out = Command::new("bash").arg(script).output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }

    /// Starts `binary` on a free loopback port with `extra` arguments (e.g. `--maxmemory 2mb`),
    /// and waits until it answers.
    pub fn start(binary: &Path, extra: &[&str]) -> std::io::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut server = Self {
            binary: binary.to_path_buf(),
            port,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.restart()?;
        Ok(server)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (its data is gone: nothing is persisted).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // already exited is fine: either way it is gone
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let started = Instant::now();
        loop {
            let ping = redis::Client::open(self.url().as_str())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ping.is_ok() {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(std::io::Error::other("redis-server did not answer in 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A plain connection, for tests that look at or damage what is stored.
    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url().as_str())?.get_connection()
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
