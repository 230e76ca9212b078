//! The shared tier against a real `redis-server` (started here on a loopback port, stopped by
//! its process id): blocks one cache publishes are found by another, bit for bit; faults cost
//! only hits; a fetch out of time keeps what it fetched; damaged values are misses and deleted; Redis's own eviction causes no errors;
//! salts, models and codecs never see each other's blocks.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagedkv::tier::{RemoteKey, RemoteStats};
use pagedkv::{CacheSalt, Codec, KvCacheManager, KvLayout, LayoutSpec, MissReason, SeqId};
use pagedkv_redis::{LocalRedis, RedisConfig, RedisStore, INITIAL_BACKOFF};

const BLOCK: usize = 16;
const MODEL: &str = "test-model";

fn redis_binary() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/redis-server");
    LocalRedis::installed_binary(&script).expect("a redis-server binary")
}

fn layout(codec: Codec) -> KvLayout {
    let mut spec = LayoutSpec::new(2, 2, 4, 64, codec);
    spec.block_size = BLOCK;
    KvLayout::new(spec).unwrap()
}

/// A cache of `layout` for `model`, on the shared store at `url`.
fn cache_on(url: &str, layout: &KvLayout, model: &str) -> (KvCacheManager, Arc<RemoteStats>) {
    let mut cache = KvCacheManager::new(layout.clone(), 256, model.as_bytes()).unwrap();
    let store = RedisStore::connect(RedisConfig::new(url, model, layout)).unwrap();
    let stats = store.stats();
    cache.set_remote_store(Box::new(store));
    (cache, stats)
}

/// Deterministic K/V of a position, like a model's: a function of the token and position.
fn row(layout: &KvLayout, layer: usize, pos: usize, token: u32, salt: u64) -> Vec<f32> {
    (0..layout.token_width())
        .map(|e| {
            let x = (token as u64 + 31 * pos as u64 + 977 * layer as u64 + 7919 * e as u64 + salt)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        })
        .collect()
}

/// Admits `prompt` as `seq`, computes (writes) what was not found, and commits it.
fn run_prompt(
    cache: &mut KvCacheManager,
    seq: u64,
    prompt: &[u32],
    salt: Option<CacheSalt>,
) -> pagedkv::Admission {
    let layout = cache.layout().clone();
    let admission = cache.admit_salted(SeqId(seq), prompt, salt).unwrap();
    for (pos, token) in prompt.iter().enumerate().skip(admission.cached_tokens) {
        for layer in 0..layout.layers() {
            let k = row(&layout, layer, pos, *token, 1);
            let v = row(&layout, layer, pos, *token, 2);
            cache.write_token(SeqId(seq), layer, pos, &k, &v).unwrap();
        }
    }
    cache
        .commit(SeqId(seq), &prompt[admission.cached_tokens..])
        .unwrap();
    admission
}

fn wait_for_writes(stats: &RemoteStats, n: u64) {
    let started = Instant::now();
    while RemoteStats::get(&stats.writes) < n {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{} of {n} writes",
            RemoteStats::get(&stats.writes)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 1 + (i * 7 + seed * 131) % 5000)
        .collect()
}

#[test]
fn blocks_one_cache_publishes_are_found_by_another_bit_for_bit() {
    let redis = LocalRedis::start(&redis_binary(), &[]).unwrap();
    for codec in ["f16", "int8", "int4", "fibquant-k4n256"] {
        let layout = layout(codec.parse().unwrap());
        let (mut a, a_stats) = cache_on(&redis.url(), &layout, MODEL);
        let p = prompt(1, 100); // 6 cacheable blocks
        run_prompt(&mut a, 1, &p, None);
        wait_for_writes(&a_stats, 6);
        let (mut b, b_stats) = cache_on(&redis.url(), &layout, MODEL);
        let admission = b.admit(SeqId(1), &p).unwrap();
        let report = admission.report;
        assert_eq!(
            report.remote_tokens, 96,
            "{codec}: every full block from the store"
        );
        assert_eq!(report.reason, MissReason::None, "{codec}");
        assert_eq!(RemoteStats::get(&b_stats.hits), 6);
        let w = layout.token_width();
        let (mut ka, mut va) = (vec![0.0; w], vec![0.0; w]);
        let (mut kb, mut vb) = (vec![0.0; w], vec![0.0; w]);
        for pos in 0..96 {
            for layer in 0..layout.layers() {
                a.read_token(SeqId(1), layer, pos, &mut ka, &mut va)
                    .unwrap();
                b.read_token(SeqId(1), layer, pos, &mut kb, &mut vb)
                    .unwrap();
                assert!(
                    ka == kb && va == vb,
                    "{codec}: position {pos} layer {layer} differs"
                );
            }
        }
        a.check_invariants().unwrap();
        b.check_invariants().unwrap();
    }
}

#[test]
fn a_store_that_goes_down_costs_only_hits_and_hits_resume_when_it_is_back() {
    let mut redis = LocalRedis::start(&redis_binary(), &[]).unwrap();
    let layout = layout(Codec::Int8);
    let (mut a, a_stats) = cache_on(&redis.url(), &layout, MODEL);
    let (mut b, b_stats) = cache_on(&redis.url(), &layout, MODEL);
    let first = prompt(2, 80);
    run_prompt(&mut a, 1, &first, None);
    wait_for_writes(&a_stats, 4);

    redis.stop();
    let started = Instant::now();
    let admission = run_prompt(&mut b, 1, &first, None);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a down store is not waited on"
    );
    assert_eq!(admission.cached_tokens, 0, "computed instead");
    assert_eq!(admission.report.reason, MissReason::StoreUnavailable);
    assert!(!b_stats.up.load(std::sync::atomic::Ordering::Relaxed));
    assert!(RemoteStats::get(&b_stats.read_errors) >= 1);
    // while the breaker is open, admissions do not even try the store
    let errors = RemoteStats::get(&b_stats.read_errors);
    run_prompt(&mut b, 2, &prompt(3, 40), None);
    assert_eq!(RemoteStats::get(&b_stats.read_errors), errors);

    redis.restart().unwrap(); // empty: what was published is gone
    std::thread::sleep(INITIAL_BACKOFF * 3);
    let second = prompt(4, 80);
    run_prompt(&mut a, 2, &second, None);
    wait_for_writes(&a_stats, 4 + 4);
    let admission = b.admit(SeqId(3), &second).unwrap();
    assert_eq!(admission.report.remote_tokens, 64, "hits resume");
    assert!(b_stats.up.load(std::sync::atomic::Ordering::Relaxed));
    b.check_invariants().unwrap();
}

#[test]
fn a_fetch_out_of_time_keeps_what_it_fetched_and_says_so() {
    let redis = LocalRedis::start(&redis_binary(), &[]).unwrap();
    let layout = layout(Codec::Int8);
    let (mut a, a_stats) = cache_on(&redis.url(), &layout, MODEL);
    let p = prompt(5, 100); // 6 cacheable blocks
    run_prompt(&mut a, 1, &p, None);
    wait_for_writes(&a_stats, 6);
    // a zero budget: the first round trip (two keys) goes, the deadline has passed after it
    let config = RedisConfig {
        fetch_budget: Duration::ZERO,
        keys_per_fetch: 2,
        // a slow first call must not fail it: the budget is what this test cuts on
        timeout: Duration::from_secs(5),
        ..RedisConfig::new(&redis.url(), MODEL, &layout)
    };
    let mut b = KvCacheManager::new(layout.clone(), 256, MODEL.as_bytes()).unwrap();
    let store = RedisStore::connect(config).unwrap();
    let b_stats = store.stats();
    b.set_remote_store(Box::new(store));
    let admission = b.admit(SeqId(1), &p).unwrap();
    assert_eq!(admission.report.remote_tokens, 2 * BLOCK);
    assert_eq!(admission.report.reason, MissReason::StoreTimedOut);
    assert_eq!(admission.report.reason.name(), "store_timed_out");
    assert_eq!(admission.report.first_missed_block, Some(2));
    assert_eq!(RemoteStats::get(&b_stats.budget_cuts), 1);
    b.check_invariants().unwrap();
}

#[test]
fn a_damaged_value_is_a_miss_and_is_deleted() {
    let redis = LocalRedis::start(&redis_binary(), &[]).unwrap();
    let layout = layout(Codec::Int4);
    let (mut a, a_stats) = cache_on(&redis.url(), &layout, MODEL);
    let p = prompt(5, 100);
    run_prompt(&mut a, 1, &p, None);
    wait_for_writes(&a_stats, 6);
    // damage block 2's value in place: one byte flipped
    let config = RedisConfig::new(&redis.url(), MODEL, &layout);
    let key = config.key(&RemoteKey {
        salt: None,
        prefix: a.prefix_keys(&p)[2],
    });
    let mut c = redis.connection().unwrap();
    let mut value: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut c).unwrap();
    let middle = value.len() / 2;
    value[middle] ^= 0x40;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(value)
        .query(&mut c)
        .unwrap();

    let (mut b, b_stats) = cache_on(&redis.url(), &layout, MODEL);
    // admission only: computing and committing the rest would publish block 2 again
    let admission = b.admit(SeqId(1), &p).unwrap();
    assert_eq!(
        admission.report.remote_tokens, 32,
        "the blocks before the damaged one"
    );
    assert_eq!(admission.report.first_missed_block, Some(2));
    assert_eq!(admission.report.reason, MissReason::Damaged);
    assert_eq!(RemoteStats::get(&b_stats.damaged), 1);
    let exists: bool = redis::cmd("EXISTS").arg(&key).query(&mut c).unwrap();
    assert!(!exists, "the damaged value is deleted");
    b.check_invariants().unwrap();
}

#[test]
fn redis_evicts_under_maxmemory_without_errors() {
    let redis = LocalRedis::start(
        &redis_binary(),
        &["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"],
    )
    .unwrap();
    let layout = layout(Codec::Int8);
    let (mut a, stats) = cache_on(&redis.url(), &layout, MODEL);
    // 40 prompts of 6 blocks, ~11 KB each: about 2.6 MB published into 2 MB
    for i in 0..40 {
        run_prompt(&mut a, i, &prompt(100 + i as u32, 97), None);
        a.free(SeqId(i)).unwrap();
    }
    wait_for_writes(&stats, 240);
    let mut c = redis.connection().unwrap();
    let info: String = redis::cmd("INFO").arg("stats").query(&mut c).unwrap();
    let evicted: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(evicted > 0, "Redis evicted keys");
    assert_eq!(RemoteStats::get(&stats.write_errors), 0);
    assert_eq!(RemoteStats::get(&stats.writes_dropped), 0);
    // what is left is still served (which prompts keep their first block is Redis's choice:
    // its LRU clock counts seconds, and this test writes everything within one)
    let (mut b, _) = cache_on(&redis.url(), &layout, MODEL);
    let served: usize = (0..40u64)
        .map(|i| {
            let admission = b.admit(SeqId(i), &prompt(100 + i as u32, 97)).unwrap();
            b.free(SeqId(i)).unwrap();
            admission.report.remote_tokens
        })
        .sum();
    assert!(served > 0, "blocks Redis kept are served");
    b.check_invariants().unwrap();
}

#[test]
fn salts_models_and_codecs_never_share_blocks() {
    let redis = LocalRedis::start(&redis_binary(), &[]).unwrap();
    let int8 = layout(Codec::Int8);
    let (mut a, a_stats) = cache_on(&redis.url(), &int8, MODEL);
    let p = prompt(7, 100);
    let tenant = Some(CacheSalt::new("tenant-a"));
    run_prompt(&mut a, 1, &p, tenant);
    wait_for_writes(&a_stats, 6);

    let (mut same, _) = cache_on(&redis.url(), &int8, MODEL);
    let remote = |c: &mut KvCacheManager, seq, salt| {
        c.admit_salted(SeqId(seq), &p, salt)
            .unwrap()
            .report
            .remote_tokens
    };
    assert_eq!(
        remote(&mut same, 1, Some(CacheSalt::new("tenant-b"))),
        0,
        "another salt"
    );
    assert_eq!(remote(&mut same, 2, None), 0, "no salt");
    assert_eq!(remote(&mut same, 3, tenant), 96, "the same salt");
    let (mut other_model, _) = cache_on(&redis.url(), &int8, "another-model");
    assert_eq!(remote(&mut other_model, 1, tenant), 0, "another model");
    let (mut other_codec, _) = cache_on(&redis.url(), &layout(Codec::Int4), MODEL);
    assert_eq!(remote(&mut other_codec, 1, tenant), 0, "another codec");
}
