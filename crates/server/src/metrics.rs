//! Prometheus metrics (DESIGN §11): counts in tokens and blocks, latency histograms; ratios are
//! left to whoever reads them.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Label set of one metric series: (name, value) pairs.
pub type Labels = Vec<(&'static str, &'static str)>;

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// Prompt tokens in cacheable blocks, looked up at first admission.
    pub prefix_queried_tokens: Counter,
    /// Prompt tokens served from the cache, by tier (`pool`, `host`, `disk`).
    pub prefix_hit_tokens: Family<Labels, Counter>,
    /// Blocks evicted, by tier (`pool`: left the pool; `tier`: dropped by the tiers below).
    pub evicted_blocks: Family<Labels, Counter>,
    /// Preemptions, by kind (`swap`, `recompute`).
    pub preemptions: Family<Labels, Counter>,
    /// Pool blocks by state (`free`, `cached`, `in_use`, `pinned`).
    pub blocks: Family<Labels, Gauge>,
    /// Requests by state (`running`, `waiting`).
    pub requests: Family<Labels, Gauge>,
    /// Prompt tokens of requests accepted.
    pub prompt_tokens: Counter,
    /// Tokens generated.
    pub generated_tokens: Counter,
    /// Requests finished, by reason (`stop`, `length`).
    pub finished: Family<Labels, Counter>,
    /// Requests aborted, by reason (`client_disconnected`, `queue_full`, `invalid`, `error`).
    pub aborted: Family<Labels, Counter>,
    /// Seconds from a request's arrival to its first token.
    pub time_to_first_token: Histogram,
    /// Seconds between a request's consecutive tokens.
    pub inter_token_latency: Histogram,
    /// KV bytes per token of the cache's layout.
    pub kv_bytes_per_token: Gauge,
    /// Batched forward passes (one per engine step that ran the model).
    pub forward_steps: Counter,
    /// Shared-store events, by kind (`hit_blocks`, `misses`, `fetch_budget_cuts`, `writes`,
    /// `writes_dropped`, `damaged`, `read_errors`, `write_errors`, `delete_errors`).
    pub remote: Family<Labels, Counter>,
    /// 1 while the shared store answers, 0 while it is down (absent without one).
    pub remote_up: Gauge,
}

impl Metrics {
    /// The metrics, registered; `codec` labels the info metric.
    pub fn new(key_codec: &str, value_codec: &str, block_size: usize) -> Self {
        let mut registry = Registry::with_prefix("pagedkv");
        let m = Self {
            prefix_queried_tokens: Counter::default(),
            prefix_hit_tokens: Family::default(),
            evicted_blocks: Family::default(),
            preemptions: Family::default(),
            blocks: Family::default(),
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            finished: Family::default(),
            aborted: Family::default(),
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            inter_token_latency: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            kv_bytes_per_token: Gauge::default(),
            forward_steps: Counter::default(),
            remote: Family::default(),
            remote_up: Gauge::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "prefix_cache_queried_tokens",
            "Prompt tokens in cacheable blocks looked up in the prefix cache",
            m.prefix_queried_tokens.clone(),
        );
        r.register(
            "prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache, by tier",
            m.prefix_hit_tokens.clone(),
        );
        r.register(
            "prefix_cache_evicted_blocks",
            "Cached blocks evicted, by tier",
            m.evicted_blocks.clone(),
        );
        r.register(
            "preemptions",
            "Sequences preempted for lack of blocks, by kind",
            m.preemptions.clone(),
        );
        r.register("blocks", "Pool blocks by state", m.blocks.clone());
        r.register("requests", "Requests by state", m.requests.clone());
        r.register(
            "prompt_tokens",
            "Prompt tokens of accepted requests",
            m.prompt_tokens.clone(),
        );
        r.register(
            "generation_tokens",
            "Tokens generated",
            m.generated_tokens.clone(),
        );
        r.register(
            "requests_finished",
            "Requests finished, by reason",
            m.finished.clone(),
        );
        r.register(
            "requests_aborted",
            "Requests aborted, by reason",
            m.aborted.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Seconds from a request's arrival to its first token",
            m.time_to_first_token.clone(),
        );
        r.register(
            "inter_token_latency_seconds",
            "Seconds between consecutive tokens of a request",
            m.inter_token_latency.clone(),
        );
        r.register(
            "kv_bytes_per_token",
            "KV cache bytes per token of the layout",
            m.kv_bytes_per_token.clone(),
        );
        r.register(
            "forward_steps",
            "Batched forward passes of the model",
            m.forward_steps.clone(),
        );
        r.register(
            "shared_tier_events",
            "Shared-store events by kind",
            m.remote.clone(),
        );
        r.register(
            "shared_tier_up",
            "Whether the shared store answered its last call",
            m.remote_up.clone(),
        );
        r.register(
            "cache",
            "The KV cache's codecs and block size",
            Info::new(vec![
                ("key_codec", key_codec.to_string()),
                ("value_codec", value_codec.to_string()),
                ("block_size", block_size.to_string()),
            ]),
        );
        Self { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
