//! `pagedkv serve` driven over HTTP on 127.0.0.1 with the real model: the OpenAI wire format,
//! greedy output against the scheduler run directly, the prefix cache's reports, salts, pins,
//! cancellation, metrics and errors.

mod common;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::{choice_text, stream_text, TestServer};
use pagedkv::Codec;
use pagedkv_engine::{ChatMessage, Event, Request, SamplingParams, Scheduler, SchedulerConfig};
use pagedkv_server::ServerConfig;
use serde_json::{json, Value};

const QUESTION: &str = "What is the capital of France?";

fn chat(content: &str, max_tokens: usize) -> Value {
    json!({
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// A long system prompt on `topic` (200+ tokens) followed by a question.
fn long_chat(topic: &str, question: &str) -> Value {
    let system = format!("You answer questions about {topic}. ").repeat(40);
    json!({
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        "max_tokens": 4,
        "temperature": 0,
        "cache_report": true,
    })
}

/// What `pagedkv generate` prints for a greedy chat prompt: the scheduler run directly.
fn generate_directly(question: &str, max_tokens: usize) -> String {
    let (model, tokenizer) = common::load_model();
    let cache = common::cache_for(&model, Codec::Int8, 64);
    let prompt = tokenizer
        .chat_prompt(&[ChatMessage {
            role: "user".into(),
            content: question.into(),
        }])
        .unwrap();
    let mut scheduler = Scheduler::new(&model, cache, SchedulerConfig::default()).unwrap();
    scheduler
        .submit(Request::new(
            0,
            prompt,
            max_tokens,
            SamplingParams::default(),
        ))
        .unwrap();
    let mut tokens = Vec::new();
    scheduler
        .run(|e| {
            if let Event::Token { token, .. } = e {
                tokens.push(*token);
            }
        })
        .unwrap();
    tokenizer.decode(&tokens, true).unwrap()
}

#[test]
fn both_endpoints_stream_and_answer_whole_with_generates_greedy_output() {
    let expected = generate_directly(QUESTION, 24);
    let server = TestServer::start(ServerConfig::default(), Codec::Int8, 64);

    let (status, whole) = server.post("/v1/chat/completions", &chat(QUESTION, 24));
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(
        choice_text(&whole, 0),
        expected,
        "greedy output equals generate's"
    );
    assert_eq!(whole["usage"]["completion_tokens"], 24);
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert!(whole["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());

    let mut body = chat(QUESTION, 24);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, events) = server.stream("/v1/chat/completions", &body);
    assert_eq!(status, 200);
    let (text, chunks) = stream_text(&events, 0);
    assert_eq!(text, expected, "streamed text equals the whole answer");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]), "the usage chunk has no choices");
    assert_eq!(last["usage"]["completion_tokens"], 24);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "length"));

    // completions: a string prompt, then the same as token ids, streamed and whole
    let prompt = json!({"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0});
    let (status, whole) = server.post("/v1/completions", &prompt);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    let text = choice_text(&whole, 0);
    let mut streamed = prompt.clone();
    streamed["stream"] = json!(true);
    let (_, events) = server.stream("/v1/completions", &streamed);
    assert_eq!(stream_text(&events, 0).0, text);
    server.stop().unwrap();
}

#[test]
fn seeded_choices_reproduce_and_stop_strings_cut_the_text() {
    let server = TestServer::start(ServerConfig::default(), Codec::Int8, 64);
    let sampled = json!({
        "prompt": "Write a short story about a robot.",
        "max_tokens": 20, "n": 2, "seed": 1234, "temperature": 1.0,
    });
    let (_, a) = server.post("/v1/completions", &sampled);
    let (_, b) = server.post("/v1/completions", &sampled);
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    for i in 0..2 {
        assert_eq!(
            choice_text(&a, i),
            choice_text(&b, i),
            "choice {i} reproduces"
        );
    }

    // a stop string spanning a token boundary: everything before it, nothing of it
    let greedy = json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0});
    let full = choice_text(&server.post("/v1/completions", &greedy).1, 0);
    assert!(full.chars().count() > 20, "{full:?}");
    let stop: String = full.chars().skip(10).take(5).collect();
    let before = &full[..full.find(&stop).unwrap()];
    let mut stopped = greedy.clone();
    stopped["stop"] = json!(["never appears", stop]);
    let (_, r) = server.post("/v1/completions", &stopped);
    assert_eq!(
        choice_text(&r, 0),
        before,
        "cut before {stop:?} in {full:?}"
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    stopped["stream"] = json!(true);
    let (_, events) = server.stream("/v1/completions", &stopped);
    let (text, chunks) = stream_text(&events, 0);
    assert_eq!(text, before);
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "stop"));
    server.stop().unwrap();
}

#[test]
fn sixteen_concurrent_requests_are_batched() {
    let server = TestServer::start(ServerConfig::default(), Codec::Int8, 64);
    let steps_before = server.metric("pagedkv_forward_steps_total");
    let answers: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let server = &server;
                s.spawn(move || {
                    let (status, r) = server.post(
                        "/v1/chat/completions",
                        &chat(&format!("Name a colour, number {i}."), 16),
                    );
                    assert_eq!(status, 200, "{r}");
                    assert!(r["usage"]["completion_tokens"].as_u64().unwrap() <= 16);
                    choice_text(&r, 0)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(answers.len(), 16);
    let steps = server.metric("pagedkv_forward_steps_total") - steps_before;
    // 16 × 16 tokens in far fewer forwards than one per token: the requests decoded together
    assert!(steps < 128.0, "{steps} forward steps for 256 tokens");
    server.stop().unwrap();
}

fn cache_report(r: &Value) -> &Value {
    &r["pagedkv_cache"]
}

fn cached(r: &Value) -> u64 {
    r["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap()
}

#[test]
fn the_prefix_cache_reports_hits_misses_and_salts() {
    let server = TestServer::start(ServerConfig::default(), Codec::Int8, 64);
    let hits = |s: &TestServer| {
        ["pool", "host", "disk"]
            .iter()
            .map(|t| {
                s.metric(&format!(
                    "pagedkv_prefix_cache_hit_tokens_total{{tier=\"{t}\"}}"
                ))
            })
            .sum::<f64>()
    };
    let hits_before = hits(&server);
    let mut reported = 0;

    let body = long_chat("caches", "What is a block?");
    let (_, first) = server.post("/v1/chat/completions", &body);
    let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt >= 200, "a long prompt: {prompt} tokens");
    let report = cache_report(&first);
    assert_eq!(report["miss_reason"], "no_entry");
    assert_eq!(report["first_missed_block"], 0);
    reported += cached(&first);

    let (_, second) = server.post("/v1/chat/completions", &body);
    let full_blocks = (prompt - 1) / 16 * 16;
    assert_eq!(
        cached(&second),
        full_blocks,
        "every full block before the last token"
    );
    let report = cache_report(&second);
    assert_eq!(report["miss_reason"], "none");
    assert_eq!(report["tokens_by_tier"]["pool"], full_blocks);
    assert_eq!(report["cacheable_tokens"], full_blocks);
    reported += cached(&second);

    // a prompt shorter than a block shares nothing
    let (_, short) = server.post(
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 2, "cache_report": true}),
    );
    assert_eq!(cached(&short), 0);
    assert_eq!(cache_report(&short)["miss_reason"], "partial_block");
    reported += cached(&short);

    // salts: another tenant finds nothing, as if the prompt had never been sent
    let mut salted = body.clone();
    salted["cache_salt"] = json!("tenant-a");
    let (_, a1) = server.post("/v1/chat/completions", &salted);
    assert_eq!(cached(&a1), 0, "a salt does not see unsalted blocks");
    assert_eq!(cache_report(&a1)["miss_reason"], "no_entry");
    let (_, a2) = server.post("/v1/chat/completions", &salted);
    assert_eq!(cached(&a2), full_blocks, "the same salt hits");
    salted["cache_salt"] = json!("tenant-b");
    let (_, b1) = server.post("/v1/chat/completions", &salted);
    assert_eq!(cached(&b1), 0, "a different salt misses");
    assert_eq!(cache_report(&b1)["miss_reason"], "no_entry");
    reported += cached(&a1) + cached(&a2) + cached(&b1);

    let hits_after = hits(&server);
    assert_eq!(
        (hits_after - hits_before) as u64,
        reported,
        "the hit counter moved by the responses' cached tokens"
    );
    server.stop().unwrap();
}

#[test]
fn the_salt_header_wins_when_configured() {
    let config = ServerConfig {
        salt_from_header: Some("x-tenant".into()),
        ..ServerConfig::default()
    };
    let server = TestServer::start(config, Codec::Int8, 64);
    let body = long_chat("caches", "Why share a prefix?");
    let (_, a) = server.post_with("/v1/chat/completions", &body, &[("x-tenant", "one")]);
    assert_eq!(cached(&a), 0);
    let (_, b) = server.post_with("/v1/chat/completions", &body, &[("x-tenant", "two")]);
    assert_eq!(cached(&b), 0, "another tenant's header: no hit");
    let (_, c) = server.post_with("/v1/chat/completions", &body, &[("x-tenant", "one")]);
    assert!(cached(&c) > 0, "the same tenant hits");
    server.stop().unwrap();
}

#[test]
fn a_pinned_prefix_survives_a_flood_that_evicts_an_unpinned_one() {
    let config = ServerConfig {
        admin_token: Some("secret".into()),
        ..ServerConfig::default()
    };
    // int8 blocks of SmolLM2 are 219 KB: 12 MiB is about 57 blocks
    let server = TestServer::start(config, Codec::Int8, 12);
    let auth = [("authorization", "Bearer secret")];
    let pinned = long_chat("pins", "Pinned question?");
    let unpinned = long_chat("floods", "Unpinned question?");

    let (status, _) = server.post("/v1/cache/pin", &json!({"messages": pinned["messages"]}));
    assert_eq!(status, 401, "admin routes need the token");
    let (status, _) = server.post_with(
        "/v1/cache/pin",
        &json!({"messages": pinned["messages"], "ttl_s": 600}),
        &[("authorization", "Bearer wrong")],
    );
    assert_eq!(status, 401);
    let (status, pin) = server.post_with(
        "/v1/cache/pin",
        &json!({"messages": pinned["messages"], "ttl_s": 600}),
        &auth,
    );
    assert_eq!(status, 200, "{pin}");
    assert!(pin["pinned_tokens"].as_u64().unwrap() >= 192);
    assert!(server.metric("pagedkv_blocks{state=\"pinned\"}") >= 12.0);

    let (_, u) = server.post("/v1/chat/completions", &unpinned);
    assert_eq!(cached(&u), 0);
    // a flood of distinct long prompts evicts every unpinned cached block
    for i in 0..12 {
        let mut body = json!({"prompt": format!("{i} {}", "flood text to evict blocks. ".repeat(60)), "max_tokens": 1});
        body["temperature"] = json!(0);
        let (status, r) = server.post("/v1/completions", &body);
        assert_eq!(status, 200, "{r}");
    }
    assert!(server.metric("pagedkv_prefix_cache_evicted_blocks_total{tier=\"pool\"}") > 0.0);

    let lookup = |body: &Value| {
        server.post_with(
            "/v1/cache/lookup",
            &json!({"messages": body["messages"]}),
            &auth,
        )
    };
    let (status, dry) = lookup(&pinned);
    assert_eq!(status, 200, "{dry}");
    assert_eq!(
        dry["miss_reason"], "none",
        "the pinned prefix is all there: {dry}"
    );
    let (_, p) = server.post("/v1/chat/completions", &pinned);
    assert_eq!(cache_report(&p)["miss_reason"], "none");
    assert!(cached(&p) >= 192);

    let (_, dry) = lookup(&unpinned);
    assert_eq!(dry["miss_reason"], "evicted", "{dry}");
    let (_, u) = server.post("/v1/chat/completions", &unpinned);
    let report = cache_report(&u);
    assert_eq!(report["miss_reason"], "evicted", "{report}");
    assert!(report["evicted_seconds_ago"].as_f64().unwrap() >= 0.0);
    assert_eq!(report["first_missed_block"], 0);

    let request = server
        .client()
        .delete(server.url("/v1/cache/pins"))
        .header("authorization", "Bearer secret")
        .send()
        .unwrap();
    assert_eq!(request.status(), 200);
    assert_eq!(request.json::<Value>().unwrap()["unpinned"], 1);
    assert_eq!(server.metric("pagedkv_blocks{state=\"pinned\"}"), 0.0);

    // a pin ends by itself when its time is up
    let (status, _) = server.post_with(
        "/v1/cache/pin",
        &json!({"messages": pinned["messages"], "ttl_s": 0.3}),
        &auth,
    );
    assert_eq!(status, 200);
    assert!(server.metric("pagedkv_blocks{state=\"pinned\"}") > 0.0);
    let started = Instant::now();
    while server.metric("pagedkv_blocks{state=\"pinned\"}") > 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the pin expires"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.stop().unwrap();
}

#[test]
fn a_dropped_stream_aborts_its_sequence_and_frees_its_blocks() {
    let server = TestServer::start(ServerConfig::default(), Codec::Int8, 64);
    let body = json!({"prompt": "Once upon a time", "max_tokens": 2000, "stream": true});
    let response = server
        .client()
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .unwrap();
    let mut lines = BufReader::new(response).lines();
    let mut seen = 0;
    while seen < 3 {
        if lines.next().unwrap().unwrap().starts_with("data: ") {
            seen += 1;
        }
    }
    drop(lines); // the client goes away mid-stream
    let started = Instant::now();
    loop {
        let aborted =
            server.metric("pagedkv_requests_aborted_total{reason=\"client_disconnected\"}");
        let in_use = server.metric("pagedkv_blocks{state=\"in_use\"}");
        let running = server.metric("pagedkv_requests{state=\"running\"}");
        if aborted == 1.0 && in_use == 0.0 && running == 0.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "aborted {aborted}, blocks in use {in_use}, running {running}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let generated = server.metric("pagedkv_generation_tokens_total");
    assert!(
        generated < 2000.0,
        "the sequence stopped early: {generated} tokens"
    );
    server.stop().unwrap();
}

#[test]
fn errors_come_in_openais_shape_with_their_status() {
    let config = ServerConfig {
        max_body_bytes: 4096,
        ..ServerConfig::default()
    };
    let server = TestServer::start(config, Codec::Int8, 64);
    let check = |status: u16, body: &Value, code: u16, param: Option<&str>| {
        assert_eq!(status, code, "{body}");
        let e = &body["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert!(e["type"].is_string());
        assert_eq!(e["param"].as_str(), param, "{body}");
    };
    let (s, b) = server.post("/v1/chat/completions", &json!({"messages": "hi"}));
    check(s, &b, 400, Some("messages"));
    let (s, b) = server.post(
        "/v1/completions",
        &json!({"prompt": "a", "temperature": -1}),
    );
    check(s, &b, 400, Some("temperature"));
    let (s, b) = server.post("/v1/completions", &json!({"prompt": "a", "max_tokens": 0}));
    check(s, &b, 400, Some("max_tokens"));
    let (s, b) = server.post("/v1/completions", &json!({"prompt": [1, 99999999]}));
    check(s, &b, 400, Some("prompt"));
    let (s, b) = server.post(
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 100000}),
    );
    check(s, &b, 400, Some("prompt"));
    assert_eq!(b["error"]["code"], "context_length_exceeded");
    let (s, b) = server.post("/v1/completions", &json!({"prompt": "a", "model": "gpt-4"}));
    check(s, &b, 404, Some("model"));
    let (s, b) = server.post("/v1/completions", &json!({"prompt": "a".repeat(5000)}));
    check(s, &b, 413, None);
    let raw = server
        .client()
        .post(server.url("/v1/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(raw.status(), 400);
    let (s, b) = server.post("/v1/nothing", &json!({}));
    check(s, &b, 404, None);
    let (s, b) = server.post("/v1/cache/lookup", &json!({"prompt": "a"}));
    check(s, &b, 403, None); // no --admin-token: the admin routes are disabled
    let models: Value = server
        .client()
        .get(server.url("/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct");
    server.stop().unwrap();
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let config = ServerConfig {
        max_queued_requests: 1,
        scheduler: SchedulerConfig {
            max_running: 1,
            ..SchedulerConfig::default()
        },
        ..ServerConfig::default()
    };
    let server = TestServer::start(config, Codec::Int8, 64);
    // one request runs, one waits; the third finds the queue full
    let long = json!({"prompt": "Count slowly:", "max_tokens": 400, "temperature": 0});
    std::thread::scope(|s| {
        let running = s.spawn(|| server.post("/v1/completions", &long));
        let started = Instant::now();
        while server.metric("pagedkv_requests{state=\"running\"}") < 1.0 {
            assert!(started.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(10));
        }
        let waiting = s.spawn(|| server.post("/v1/completions", &long));
        while server.metric("pagedkv_requests{state=\"waiting\"}") < 1.0 {
            assert!(started.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(10));
        }
        let refused = server
            .client()
            .post(server.url("/v1/completions"))
            .json(&long)
            .send()
            .unwrap();
        assert_eq!(refused.status(), 429);
        assert_eq!(refused.headers()["retry-after"], "1");
        let body: Value = refused.json().unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(running.join().unwrap().0, 200);
        assert_eq!(waiting.join().unwrap().0, 200);
    });
    assert_eq!(
        server.metric("pagedkv_requests_aborted_total{reason=\"queue_full\"}"),
        1.0
    );
    server.stop().unwrap();
}

#[test]
fn a_bounded_load_completes_or_refuses_cleanly_and_leaks_no_block() {
    let config = ServerConfig {
        max_queued_requests: 12,
        ..ServerConfig::default()
    };
    // 19 int8 blocks: 16 connections of ~6 blocks each do not fit at once
    let server = TestServer::start(config, Codec::Int8, 4);
    let prompts: Vec<Value> = ["rivers", "stars", "bread", "trains"]
        .iter()
        .map(|topic| {
            let mut body = chat(&format!("Tell me one fact about {topic}."), 48);
            body["stream"] = json!(true);
            body
        })
        .collect();
    let lone: Vec<String> = prompts
        .iter()
        .map(|p| stream_text(&server.stream("/v1/chat/completions", p).1, 0).0)
        .collect();
    let outcomes: Vec<(usize, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|connection| {
                let (server, prompts, lone) = (&server, &prompts, &lone);
                s.spawn(move || {
                    let (mut completed, mut refused) = (0, 0);
                    for round in 0..4 {
                        let which = (connection + round) % prompts.len();
                        let (status, events) =
                            server.stream("/v1/chat/completions", &prompts[which]);
                        if status == 429 {
                            refused += 1;
                            continue;
                        }
                        assert_eq!(status, 200);
                        assert_eq!(stream_text(&events, 0).0, lone[which], "same as a lone run");
                        completed += 1;
                    }
                    (completed, refused)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let completed: usize = outcomes.iter().map(|o| o.0).sum();
    let refused: usize = outcomes.iter().map(|o| o.1).sum();
    println!("64 streaming requests: {completed} completed, {refused} refused with 429");
    assert_eq!(completed + refused, 64);
    assert!(completed >= 16, "most requests complete: {completed}");
    assert_eq!(
        server.metric("pagedkv_requests_aborted_total{reason=\"queue_full\"}") as usize,
        refused
    );
    assert!(
        server.metric("pagedkv_preemptions_total{kind=\"swap\"}")
            + server.metric("pagedkv_preemptions_total{kind=\"recompute\"}")
            > 0.0,
        "the pool was smaller than the load"
    );
    for state in ["in_use", "pinned"] {
        assert_eq!(
            server.metric(&format!("pagedkv_blocks{{state=\"{state}\"}}")),
            0.0
        );
    }
    for state in ["running", "waiting"] {
        assert_eq!(
            server.metric(&format!("pagedkv_requests{{state=\"{state}\"}}")),
            0.0
        );
    }
    server.stop().unwrap();
}
