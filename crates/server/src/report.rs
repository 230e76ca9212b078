//! The `pagedkv_cache` object: a prompt's prefix-cache report on the wire.

use pagedkv::{MissReason, PrefixReport};
use serde_json::{json, Value};

/// The report of a prompt of `prompt_tokens` tokens as JSON.
pub fn cache_report_json(report: &PrefixReport, prompt_tokens: usize) -> Value {
    let mut value = json!({
        "block_size": report.block_size,
        "prompt_tokens": prompt_tokens,
        "cacheable_tokens": report.cacheable_tokens,
        "cached_tokens": report.cached_tokens(),
        "tokens_by_tier": {
            "pool": report.pool_tokens,
            "host": report.host_tokens,
            "disk": report.disk_tokens,
            "remote": report.remote_tokens,
        },
        "first_missed_block": report.first_missed_block,
        "miss_reason": report.reason.name(),
    });
    if let MissReason::Evicted { ago } = report.reason {
        value["evicted_seconds_ago"] = json!((ago.as_secs_f64() * 1000.0).round() / 1000.0);
    }
    value
}
