//! Two `pagedkv serve` processes on one Redis (started here, loopback, stopped by process id):
//! a long prompt computed by the first is served to the second from the shared tier, with the
//! same greedy output, for every kind of codec; and Redis going away mid-load costs only hits.

mod common;

use common::{curl_json, metric, redis_binary, start_server, wait_for_metric};
use pagedkv_redis::LocalRedis;
use serde_json::{json, Value};

fn long_chat(topic: &str) -> String {
    json!({
        "messages": [
            {"role": "system", "content": format!("You know everything about {topic}. ").repeat(180)},
            {"role": "user", "content": format!("Name one fact about {topic}.")},
        ],
        "max_tokens": 16,
        "temperature": 0,
        "cache_report": true,
    })
    .to_string()
}

fn text(r: &Value) -> &str {
    r["choices"][0]["message"]["content"].as_str().unwrap()
}

#[test]
fn a_second_server_gets_a_long_prompt_from_redis_with_the_same_output() {
    let redis = LocalRedis::start(&redis_binary(), &[]).unwrap();
    let url = redis.url();
    let body = long_chat("rivers");
    for codec in ["f16", "int8", "int4", "fibquant-k4n256"] {
        // fetching 68 f16 blocks (25 MB) can outlast the default 200 ms budget on a loaded
        // machine; this test is about what is shared, not how fast
        let flags = [
            "--codec",
            codec,
            "--shared-tier",
            &url,
            "--shared-tier-fetch-budget-ms",
            "20000",
        ];
        let first = start_server(&flags);
        let base1 = first.base.clone();
        let r1 = curl_json(&base1, "/v1/chat/completions", &body);
        let report = &r1["pagedkv_cache"];
        let prompt = r1["usage"]["prompt_tokens"].as_u64().unwrap();
        let cacheable = report["cacheable_tokens"].as_u64().unwrap();
        assert!(prompt >= 1000, "{prompt} tokens");
        assert_eq!(
            report["cached_tokens"], 0,
            "{codec}: nothing shared across codecs"
        );
        // every cacheable block published (write-behind) before the second server asks
        wait_for_metric(
            &base1,
            "pagedkv_shared_tier_events_total{kind=\"writes\"}",
            (cacheable / 16) as f64,
        );

        let second = start_server(&flags);
        let base2 = second.base.clone();
        let r2 = curl_json(&base2, "/v1/chat/completions", &body);
        let report = &r2["pagedkv_cache"];
        assert_eq!(
            report["tokens_by_tier"]["remote"], cacheable,
            "{codec}: {report}"
        );
        assert_eq!(report["miss_reason"], "none", "{codec}");
        assert_eq!(
            r2["usage"]["prompt_tokens_details"]["cached_tokens"],
            cacheable
        );
        assert_eq!(text(&r1), text(&r2), "{codec}: the same greedy output");
        println!(
            "{codec}: {cacheable} of {prompt} prompt tokens from Redis; answer {:?}",
            text(&r2)
        );
        assert!(first.terminate().0 && second.terminate().0);
    }
}

#[test]
fn redis_going_away_mid_load_costs_only_hits() {
    let mut redis = LocalRedis::start(&redis_binary(), &[]).unwrap();
    let url = redis.url();
    let first = start_server(&["--shared-tier", &url]);
    let base1 = first.base.clone();
    let up = "pagedkv_shared_tier_up";
    let ask = |base: &str, topic: &str| {
        let r = curl_json(base, "/v1/chat/completions", &long_chat(topic));
        assert!(r["choices"][0]["message"]["content"].is_string(), "{r}");
        r
    };
    std::thread::scope(|s| {
        let load: Vec<_> = ["lakes", "seas", "hills", "caves"]
            .into_iter()
            .map(|t| s.spawn(|| ask(&base1, t)))
            .collect();
        redis.stop(); // mid-load
        for r in load {
            r.join().unwrap();
        }
    });
    for topic in ["deserts", "glaciers"] {
        let r = ask(&base1, topic);
        assert_eq!(r["pagedkv_cache"]["cached_tokens"], 0);
    }
    assert_eq!(metric(&base1, up), 0.0, "the store shows as down");
    let reason = &ask(&base1, "volcanoes")["pagedkv_cache"]["miss_reason"];
    assert_eq!(reason, "store_unavailable");

    redis.restart().unwrap();
    std::thread::sleep(pagedkv_redis::MAX_BACKOFF + std::time::Duration::from_secs(1));
    let before = metric(&base1, "pagedkv_shared_tier_events_total{kind=\"writes\"}");
    let r1 = ask(&base1, "islands");
    let cacheable = r1["pagedkv_cache"]["cacheable_tokens"].as_u64().unwrap();
    wait_for_metric(
        &base1,
        "pagedkv_shared_tier_events_total{kind=\"writes\"}",
        before + (cacheable / 16) as f64,
    );
    assert_eq!(metric(&base1, up), 1.0, "the store is up again");
    let second = start_server(&["--shared-tier", &url]);
    let base2 = second.base.clone();
    let r2 = ask(&base2, "islands");
    assert_eq!(
        r2["pagedkv_cache"]["tokens_by_tier"]["remote"], cacheable,
        "hits resume"
    );
    assert_eq!(text(&r1), text(&r2));
    assert!(first.terminate().0 && second.terminate().0);
}
