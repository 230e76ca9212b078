//! A real server on 127.0.0.1 (an ephemeral port) with the real model, and an HTTP client.
//! Servers of one test binary run one at a time: two would share two cores.
#![allow(dead_code)] // each test binary uses its own part of the harness

use std::io::{BufRead, BufReader};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagedkv::{Codec, KvCacheManager};
use pagedkv_engine::fetch::ensure_model;
use pagedkv_engine::{Model, WeightMode};
use pagedkv_server::{Loaded, ServerConfig, ServerError};
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Loads the model (fetching it when absent) with q4 weights, as `pagedkv serve` does.
pub fn load_model() -> (Model, pagedkv_engine::GgufTokenizer) {
    let path = ensure_model(None).expect("the model is fetched");
    Model::load(&path, WeightMode::Q4).expect("the model loads")
}

/// A cache of `mib` MiB with `codec` for the model.
pub fn cache_for(model: &Model, codec: Codec, mib: u64) -> KvCacheManager {
    let layout = model.config().kv_layout(codec, codec, 16).unwrap();
    KvCacheManager::with_budget(layout, mib << 20, &model.fingerprint().key_bytes()).unwrap()
}

/// A running server.
pub struct TestServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
    client: reqwest::blocking::Client,
    _turn: MutexGuard<'static, ()>,
}

impl TestServer {
    /// Starts a server with `config` over a `cache_mib` MiB cache of `codec`, and waits until
    /// `/health` answers 200.
    pub fn start(config: ServerConfig, codec: Codec, cache_mib: u64) -> Self {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap();
            let loader = Box::new(move || {
                let (model, tokenizer) = load_model();
                let cache = cache_for(&model, codec, cache_mib);
                Ok(Loaded {
                    model,
                    tokenizer,
                    cache,
                    remote_stats: None,
                })
            });
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let stop = async move {
                    let _ = stop.await;
                };
                pagedkv_server::serve(listener, config, loader, pool, stop).await
            })
        });
        let server = Self {
            base,
            shutdown: Some(shutdown),
            thread: Some(thread),
            client: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .unwrap(),
            _turn: turn,
        };
        let started = Instant::now();
        loop {
            if let Ok(r) = server.client.get(server.url("/health")).send() {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the server did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// The URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs JSON; returns the status and the JSON answer.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_with(path, body, &[])
    }

    /// POSTs JSON with extra headers.
    pub fn post_with(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut request = self.client.post(self.url(path)).json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    /// POSTs a streaming request; returns the status and every `data:` payload, `[DONE]`
    /// included.
    pub fn stream(&self, path: &str, body: &Value) -> (u16, Vec<String>) {
        let response = self.client.post(self.url(path)).json(body).send().unwrap();
        let status = response.status().as_u16();
        let events = BufReader::new(response)
            .lines()
            .map(|l| l.unwrap())
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect();
        (status, events)
    }

    /// The value of one metric series (`name{labels}` as printed), 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// The client.
    pub fn client(&self) -> &reqwest::blocking::Client {
        &self.client
    }

    /// Drains and stops the server; returns how `serve` ended.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.shutdown.take().map(|s| s.send(()));
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Text of a chat or completion choice.
pub fn choice_text(response: &Value, index: usize) -> String {
    let choice = &response["choices"][index];
    choice["message"]["content"]
        .as_str()
        .or_else(|| choice["text"].as_str())
        .unwrap_or_else(|| panic!("no text in {response}"))
        .to_string()
}

/// Concatenated text of a stream's chunks (every choice index `index`), and the parsed chunks.
pub fn stream_text(events: &[String], index: usize) -> (String, Vec<Value>) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "ends with [DONE]"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["index"] == index)
        .filter_map(|c| {
            c["delta"]["content"]
                .as_str()
                .or_else(|| c["text"].as_str())
                .map(str::to_string)
        })
        .collect();
    (text, chunks)
}
