//! The scheduler on the real model (fetched when absent; never skipped), q4 weights (the default).
//! Matmul rows and attention queries are computed independently of one another, so a sequence's
//! greedy tokens must not depend on what it was batched with, on preemption, or on prefix reuse.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use pagedkv::{Codec, KvCacheManager};
use pagedkv_engine::fetch::ensure_model;
use pagedkv_engine::{
    ChatMessage, Event, GgufTokenizer, Model, Preemption, Request, SamplingParams, Scheduler,
    SchedulerConfig, SchedulerStats, WeightMode,
};

fn model() -> &'static (Model, GgufTokenizer) {
    static MODEL: OnceLock<(Model, GgufTokenizer)> = OnceLock::new();
    MODEL.get_or_init(|| Model::load(&ensure_model(None).unwrap(), WeightMode::Q4).unwrap())
}

fn cache(blocks: usize) -> KvCacheManager {
    cache_with(blocks, Codec::F16)
}

fn cache_with(blocks: usize, codec: Codec) -> KvCacheManager {
    let layout = model().0.config().kv_layout(codec, codec, 16).unwrap();
    KvCacheManager::new(layout, blocks, b"scheduler-test").unwrap()
}

/// Runs requests to completion; returns every request's tokens and the run's counters.
fn run(
    requests: &[Request],
    blocks: usize,
    config: SchedulerConfig,
) -> (BTreeMap<u64, Vec<u32>>, SchedulerStats) {
    run_on(requests, cache(blocks), config)
}

fn run_on(
    requests: &[Request],
    cache: KvCacheManager,
    config: SchedulerConfig,
) -> (BTreeMap<u64, Vec<u32>>, SchedulerStats) {
    let mut scheduler = Scheduler::new(&model().0, cache, config).unwrap();
    for r in requests {
        scheduler.submit(r.clone()).unwrap();
    }
    let mut out: BTreeMap<u64, Vec<u32>> = requests.iter().map(|r| (r.id, Vec::new())).collect();
    let mut admitted: BTreeMap<u64, usize> = BTreeMap::new();
    let stats = scheduler
        .run(|e| match e {
            Event::Token { id, token, .. } => out.get_mut(id).unwrap().push(*token),
            Event::Admitted { id, .. } => *admitted.entry(*id).or_default() += 1,
            Event::Finished { .. } | Event::Preempted { .. } => {}
        })
        .unwrap();
    assert_eq!(stats.finished, requests.len(), "every request completes");
    assert!(
        requests.iter().all(|r| admitted.get(&r.id) == Some(&1)),
        "each request's first admission is reported once, preempted or not: {admitted:?}"
    );
    scheduler.cache().check_invariants().unwrap();
    assert_eq!(
        scheduler.cache().storage().open_blocks(),
        0,
        "no staging left behind"
    );
    assert_eq!(
        scheduler.cache().counts().owned,
        0,
        "finished requests free their blocks"
    );
    (out, stats)
}

fn request(id: u64, prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request::new(id, prompt, max_tokens, SamplingParams::default())
}

const TOPICS: [&str; 16] = [
    "rivers",
    "volcanoes",
    "bread",
    "bicycles",
    "owls",
    "glaciers",
    "chess",
    "tea",
    "bridges",
    "comets",
    "honey bees",
    "lighthouses",
    "maps",
    "violins",
    "deserts",
    "coral reefs",
];

fn plain_prompt(i: usize) -> Vec<u32> {
    // different lengths: a topic sentence repeated 1..=4 times
    let sentence = format!("Here is a short note about {}. ", TOPICS[i]);
    model().1.encode(&sentence.repeat(1 + i % 4)).unwrap()
}

#[test]
fn batched_decode_equals_each_alone() {
    let requests: Vec<Request> = (0..16)
        .map(|i| request(i as u64, plain_prompt(i), 12))
        .collect();
    let lengths: Vec<usize> = requests.iter().map(|r| r.prompt.len()).collect();
    assert!(lengths.iter().min() < lengths.iter().max());
    let (batched, stats) = run(&requests, 256, SchedulerConfig::default());
    assert!(
        stats.steps < 16 * 12,
        "sequences were decoded together ({} steps)",
        stats.steps
    );
    for r in &requests {
        let (alone, _) = run(std::slice::from_ref(r), 256, SchedulerConfig::default());
        assert_eq!(
            batched[&r.id], alone[&r.id],
            "request {} differs when batched",
            r.id
        );
    }
}

#[test]
fn batched_decode_equals_each_alone_on_a_sealed_int4_cache() {
    // blocks are sealed (int4) as they fill, per sequence, whatever it is batched with
    let requests: Vec<Request> = (0..6)
        .map(|i| request(i as u64, plain_prompt(i), 20))
        .collect();
    let (batched, _) = run_on(
        &requests,
        cache_with(128, Codec::Int4),
        SchedulerConfig::default(),
    );
    for r in &requests {
        let (alone, _) = run_on(
            std::slice::from_ref(r),
            cache_with(128, Codec::Int4),
            SchedulerConfig::default(),
        );
        assert_eq!(
            batched[&r.id], alone[&r.id],
            "request {} differs when batched",
            r.id
        );
    }
}

#[test]
fn shared_system_prompt_is_computed_once() {
    let tokenizer = &model().1;
    let system = "You are a careful assistant. ".repeat(33); // ~200 tokens
    let prompts: Vec<Vec<u32>> = TOPICS
        .iter()
        .map(|t| {
            tokenizer
                .chat_prompt(&[
                    ChatMessage {
                        role: "system".into(),
                        content: system.clone(),
                    },
                    ChatMessage {
                        role: "user".into(),
                        content: format!("Tell me about {t}."),
                    },
                ])
                .unwrap()
        })
        .collect();
    let shared = prompts[0]
        .iter()
        .zip(&prompts[1])
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared >= 200, "shared prefix is {shared} tokens");
    let shared_blocks = shared / 16;
    let requests: Vec<Request> = prompts
        .into_iter()
        .enumerate()
        .map(|(i, p)| request(i as u64, p, 4))
        .collect();
    // f16, prefilled in one step; int8, prefilled a block per step (a request waits for each
    // shared block another is computing, rather than computing it again)
    for (name, cache) in [("f16", cache(512)), ("int8", cache_with(512, Codec::Int8))] {
        let (_, stats) = run_on(&requests, cache, SchedulerConfig::default());
        // every request after the first takes all shared full blocks from the cache
        assert_eq!(stats.cached_tokens, 15 * shared_blocks * 16, "{name}");
        let total_prompt: usize = requests.iter().map(|r| r.prompt.len()).sum();
        let hit_rate = stats.cached_tokens as f64 / total_prompt as f64;
        println!(
            "{name}: prefix reuse: {} of {} prompt tokens from the cache ({:.1}%)",
            stats.cached_tokens,
            total_prompt,
            100.0 * hit_rate
        );
        assert!(hit_rate > 0.85, "{name}");
    }
}

#[test]
fn preemption_under_a_quarter_sized_pool_completes_everything_identically() {
    let requests: Vec<Request> = (0..16)
        .map(|i| request(i as u64, plain_prompt(i), 24))
        .collect();
    let need: usize = requests
        .iter()
        .map(|r| (r.prompt.len() + r.max_tokens).div_ceil(16))
        .sum();
    let recompute = SchedulerConfig {
        preemption: Preemption::Recompute,
        ..SchedulerConfig::default()
    };
    let (free_run, free_stats) = run(&requests, need * 2, recompute);
    assert_eq!(free_stats.preemptions, 0);
    let (tight_run, tight_stats) = run(&requests, need / 4, recompute);
    assert_eq!(tight_stats.swaps, 0);
    println!(
        "pool {} blocks for a load of {need}: {} preemptions",
        need / 4,
        tight_stats.preemptions
    );
    assert!(
        tight_stats.preemptions > 0,
        "the small pool forced preemption"
    );
    assert_eq!(free_run, tight_run);
}

/// Swap preemption (the default): 64 requests through a pool sized for 16 of them, on an int4
/// cache where recomputing a sealed block could differ from the original, all complete with
/// exactly the tokens of an unconstrained run: swapped blocks come back bit for bit.
#[test]
fn swap_preemption_runs_64_requests_in_a_pool_for_16_identically() {
    // Prompts differ from their first block, so that the runs share nothing but what
    // preemption moves.
    let requests: Vec<Request> = (0..64)
        .map(|i| {
            let mut prompt = model().1.encode(&format!("Note {i}: ")).unwrap();
            prompt.extend(plain_prompt(i % 16));
            request(i as u64, prompt, 16)
        })
        .collect();
    let need = |r: &Request| (r.prompt.len() + r.max_tokens).div_ceil(16);
    let total: usize = requests.iter().map(need).sum();
    let pool_for_16 = total / 4;
    let config = SchedulerConfig {
        max_step_tokens: 16_384,
        ..SchedulerConfig::default()
    };
    let (free_run, free_stats) = run_on(&requests, cache_with(total * 2, Codec::Int4), config);
    assert_eq!(free_stats.preemptions, 0);
    let (tight_run, tight_stats) = run_on(&requests, cache_with(pool_for_16, Codec::Int4), config);
    println!(
        "pool {pool_for_16} blocks for a load of {total}: {} preemptions, {} by swap",
        tight_stats.preemptions, tight_stats.swaps
    );
    assert!(tight_stats.swaps > 0, "the small pool forced swaps");
    assert_eq!(tight_stats.swaps, tight_stats.preemptions);
    assert_eq!(free_run, tight_run);
}

/// Repeated chats arriving while others run, through an int8 pool too small for them, with
/// swap preemption: identical requests share cached prompt and generated blocks, a swapped
/// sequence comes back holding some of them again, and every request still gets its lone run's
/// tokens. The manager's invariants are checked after every step (a swap-in once handed a
/// still-cached block of the sequence to another of its blocks, so it held one block twice).
#[test]
fn repeated_chats_arriving_under_swap_preemption_match_their_lone_runs() {
    let tokenizer = &model().1;
    let prompts: Vec<Vec<u32>> = ["rivers", "stars", "bread", "trains"]
        .iter()
        .map(|topic| {
            let content = format!("Tell me one fact about {topic}.");
            let user = ChatMessage {
                role: "user".into(),
                content,
            };
            tokenizer.chat_prompt(&[user]).unwrap()
        })
        .collect();
    // arrival patterns: each draw submits the next request with probability 1 / every (else a
    // step runs)
    for (seed, every) in [(11u64, 6usize), (3, 2), (5, 4)] {
        let mut scheduler = Scheduler::new(
            &model().0,
            cache_with(19, Codec::Int8),
            SchedulerConfig::default(),
        )
        .unwrap();
        // each chat alone first, as a server's first users would: their blocks stay cached
        let lone: Vec<Vec<u32>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                scheduler
                    .submit(request(100 + i as u64, p.clone(), 48))
                    .unwrap();
                let mut tokens = Vec::new();
                scheduler
                    .run(|e| {
                        if let Event::Token { token, .. } = e {
                            tokens.push(*token)
                        }
                    })
                    .unwrap();
                tokens
            })
            .collect();
        let mut rng = seed;
        let mut next = || {
            rng = rng
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (rng >> 33) as usize
        };
        let mut out: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        let (mut submitted, mut finished) = (0u64, 0);
        while finished < 24 {
            if submitted < 24 && next() % every == 0 {
                let prompt = prompts[submitted as usize % 4].clone();
                scheduler.submit(request(submitted, prompt, 48)).unwrap();
                out.insert(submitted, Vec::new());
                submitted += 1;
                continue;
            }
            for event in scheduler.step().unwrap() {
                match event {
                    Event::Token { id, token, .. } => out.get_mut(&id).unwrap().push(token),
                    Event::Finished { .. } => finished += 1,
                    Event::Admitted { .. } | Event::Preempted { .. } => {}
                }
            }
            scheduler.cache().check_invariants().unwrap();
        }
        let stats = scheduler.stats();
        println!(
            "arrivals 1 in {every} (seed {seed}): {} swaps, {} prompt tokens cached",
            stats.swaps, stats.cached_tokens
        );
        assert!(stats.swaps > 0, "the pool was smaller than the load");
        for (id, tokens) in &out {
            assert_eq!(tokens, &lone[*id as usize % 4], "request {id}, seed {seed}");
        }
    }
}

/// On a compressed cache a prompt gives the same tokens whether its prefix comes from the cache
/// or is computed, and however the step budget chunks it: prefill chunks end at block
/// boundaries, so every token reads earlier blocks as stored.
#[test]
fn cached_and_computed_prefixes_give_the_same_tokens() {
    let system = model()
        .1
        .encode(&"You are a careful assistant. ".repeat(12))
        .unwrap();
    let requests: Vec<Request> = (0..3)
        .map(|i| {
            let mut prompt = system.clone();
            prompt.extend(plain_prompt(i));
            request(i as u64, prompt, 24)
        })
        .collect();
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| {
            let (out, stats) = run_on(
                std::slice::from_ref(r),
                cache_with(256, Codec::Int4),
                SchedulerConfig::default(),
            );
            assert_eq!(stats.cached_tokens, 0);
            out[&r.id].clone()
        })
        .collect();
    // one after another on one cache: the later ones find the system prompt cached
    let mut scheduler = Scheduler::new(
        &model().0,
        cache_with(256, Codec::Int4),
        SchedulerConfig {
            max_step_tokens: 7,
            ..SchedulerConfig::default()
        },
    )
    .unwrap();
    for (r, expected) in requests.iter().zip(&alone) {
        scheduler.submit(r.clone()).unwrap();
        let mut out = Vec::new();
        scheduler
            .run(|e| {
                if let Event::Token { token, .. } = e {
                    out.push(*token);
                }
            })
            .unwrap();
        assert_eq!(&out, expected, "request {}", r.id);
    }
    assert!(
        scheduler.stats().cached_tokens >= 2 * (system.len() / 16) * 16,
        "later requests were served from the cache"
    );
}

/// The real model generates with every codec at blocks of 8, 16, 32, 64 and an odd size, after
/// a prompt of more than two blocks of 64 (so full blocks of every size are sealed and read
/// whole where a kernel exists); the near-lossless codecs' (f16, bf16, int8) first greedy
/// tokens are f32's (a broken page reader gives garbage, not a slightly different
/// continuation); the others must produce tokens.
#[test]
fn every_codec_generates_at_every_block_size() {
    let countries = [
        ("France", "Paris"),
        ("Germany", "Berlin"),
        ("Spain", "Madrid"),
        ("Portugal", "Lisbon"),
        ("Austria", "Vienna"),
        ("Greece", "Athens"),
        ("Norway", "Oslo"),
        ("Sweden", "Stockholm"),
        ("Finland", "Helsinki"),
        ("Poland", "Warsaw"),
        ("Ireland", "Dublin"),
        ("Hungary", "Budapest"),
        ("Denmark", "Copenhagen"),
        ("Egypt", "Cairo"),
        ("Japan", "Tokyo"),
        ("Kenya", "Nairobi"),
        ("Peru", "Lima"),
        ("Chile", "Santiago"),
        ("Canada", "Ottawa"),
        ("Cuba", "Havana"),
    ];
    let mut text: String = countries
        .iter()
        .map(|(country, city)| format!("The capital of {country} is {city}. "))
        .collect();
    text.push_str("The capital of Italy is");
    let prompt = model().1.encode(&text).unwrap();
    assert!(prompt.len() > 2 * 64, "{} prompt tokens", prompt.len());
    let mut codecs = Codec::FIXED.to_vec();
    codecs.extend([
        Codec::FibQuant { k: 2, n: 256 },
        Codec::FibQuant { k: 4, n: 256 },
    ]);
    for block_size in [8, 16, 32, 64, 7] {
        let mut reference = None;
        for &codec in &codecs {
            let layout = model()
                .0
                .config()
                .kv_layout(codec, codec, block_size)
                .unwrap();
            let cache = KvCacheManager::new(layout, 4096 / block_size, b"scheduler-test").unwrap();
            let (out, _) = run_on(
                &[request(0, prompt.clone(), 6)],
                cache,
                SchedulerConfig::default(),
            );
            let tokens = &out[&0];
            // a 2-bit cache may end the answer early; it must still produce one
            assert!(!tokens.is_empty(), "{codec}, blocks of {block_size}");
            let reference = reference.get_or_insert_with(|| tokens.clone());
            if matches!(codec, Codec::F16 | Codec::Bf16 | Codec::Int8) {
                assert!(
                    tokens.len() >= 2 && reference.len() >= 2,
                    "{codec}, blocks of {block_size}: too few tokens to compare"
                );
                assert_eq!(
                    tokens[..2],
                    reference[..2],
                    "{codec}, blocks of {block_size}: {}",
                    model().1.decode(tokens, false).unwrap()
                );
            }
        }
    }
}
