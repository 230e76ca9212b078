//! Tiers: every codec's blocks go to the host and the disk tier and come back byte for byte with
//! the same attention output; corrupted, truncated, extended and foreign payloads are refused
//! (property test: 1,000 cases in CI, `PAGEDKV_PROPTEST_CASES` for more); an interrupted disk
//! write leaves the previous payload readable.

mod common;

use common::{check_contents, prefix_hashes, rows, small_layout, write_and_commit};
use pagedkv::attention::{attend, Context, Scratch};
use pagedkv::tier::payload::{self, PayloadError};
use pagedkv::tier::{DiskTier, HostTier, TierKey, TieredStore};
use pagedkv::{BlockId, Codec, ImageKind, KvCacheManager, KvError, KvLayout, LayoutSpec, SeqId};
use proptest::prelude::*;

fn layout(codec: Codec) -> KvLayout {
    layout_with_sinks(codec, 0)
}

fn layout_with_sinks(codec: Codec, sinks: usize) -> KvLayout {
    let mut spec = LayoutSpec::new(2, 2, 4, 32, codec);
    spec.block_size = 4;
    spec.sink_tokens = sinks;
    KvLayout::new(spec).unwrap()
}

fn every_codec() -> Vec<Codec> {
    let mut all = Codec::FIXED.to_vec();
    all.push(Codec::FibQuant { k: 2, n: 256 });
    all.push(Codec::FibQuant { k: 4, n: 256 });
    all
}

/// A manager holding one sequence of 14 tokens (three sealed blocks and an open one); rows are
/// scaled into a range every codec stores.
fn filled(codec: Codec) -> (KvCacheManager, SeqId) {
    filled_with_sinks(codec, 0)
}

/// [`filled`] in a layout keeping `sinks` leading tokens in f16 beside the first block.
fn filled_with_sinks(codec: Codec, sinks: usize) -> (KvCacheManager, SeqId) {
    let mut m = KvCacheManager::new(layout_with_sinks(codec, sinks), 16, b"tier-test").unwrap();
    let seq = SeqId(1);
    let tokens: Vec<u32> = (0..14).map(|t| t * 7 + 3).collect();
    m.admit(seq, &tokens[..1]).unwrap();
    m.reserve(seq, tokens.len() - 1).unwrap();
    let l = m.layout().clone();
    let hashes = prefix_hashes(&tokens);
    for (pos, h) in hashes.iter().enumerate() {
        for layer in 0..l.layers() {
            let (k, v) = rows(&l, layer, *h);
            let scale = |x: Vec<f32>| x.iter().map(|v| v / 400.0).collect::<Vec<_>>();
            m.write_token(seq, layer, pos, &scale(k), &scale(v))
                .unwrap();
        }
    }
    m.commit(seq, &tokens).unwrap();
    (m, seq)
}

fn images(m: &KvCacheManager, seq: SeqId) -> Vec<(ImageKind, Vec<u8>)> {
    m.table(seq)
        .unwrap()
        .blocks()
        .iter()
        .map(|b| {
            let mut out = Vec::new();
            let kind = m.storage().export_block(*b, &mut out).unwrap();
            (kind, out)
        })
        .collect()
}

fn attention(m: &KvCacheManager, seq: SeqId) -> Vec<f32> {
    let table = m.table(seq).unwrap();
    let q: Vec<f32> = (0..4 * 32).map(|i| (i as f32 * 0.17).sin()).collect();
    let mut out = vec![0f32; 4 * 32];
    let ctx = Context {
        blocks: table.blocks(),
        len: table.len(),
    };
    attend(
        m.storage(),
        1,
        ctx,
        &q,
        0.2,
        &mut out,
        &mut Scratch::default(),
    )
    .unwrap();
    out
}

#[test]
fn every_codec_round_trips_through_host_and_disk_bit_exactly() {
    let dir = std::env::temp_dir().join(format!("pagedkv-tiers-{}", std::process::id()));
    for codec in every_codec() {
        for (to_disk, sinks) in [(false, 0), (true, 0), (false, 2)] {
            let (mut m, seq) = filled_with_sinks(codec, sinks);
            let before = images(&m, seq);
            // the first block carries its sink rows (compressed codecs), no other block does
            let with_sinks: Vec<bool> = before.iter().map(|(kind, _)| kind.sinks).collect();
            let compressed = !codec.is_full_precision();
            assert_eq!(with_sinks, [sinks > 0 && compressed, false, false, false]);
            let out_before = attention(&m, seq);
            let mut store = if to_disk {
                // a host tier too small for any payload: everything is demoted to disk
                TieredStore {
                    host: pagedkv::tier::HostTier::new(0),
                    disk: Some(DiskTier::open(dir.join(codec.to_string()), 1 << 30).unwrap()),
                }
            } else {
                TieredStore::in_memory(1 << 30)
            };
            let swapped = m.swap_out(seq, &mut store).unwrap();
            assert!(m.table(seq).is_err(), "the sequence left the pool");
            assert_eq!(store.host.is_empty(), to_disk);
            // push the cached blocks out of the pool so swap-in must import every payload
            let filler = SeqId(99);
            let pool = m.pool().num_blocks();
            m.admit(filler, &vec![5; pool * 4 - 1]).unwrap();
            m.free(filler).unwrap();
            m.swap_in(&swapped, &mut store).unwrap();
            assert_eq!(
                images(&m, seq),
                before,
                "{codec} to_disk={to_disk} sinks={sinks}"
            );
            let what = format!("{codec} to_disk={to_disk} sinks={sinks}");
            assert_eq!(attention(&m, seq), out_before, "{what}");
            assert!(!store.contains(TierKey(0)));
            m.check_invariants().unwrap();
            // the sequence goes on: two more tokens fill the open block and seal it
            m.reserve(seq, 2).unwrap();
            write_and_commit(&mut m, seq, &[1, 2]);
            m.check_invariants().unwrap();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn swap_in_shares_blocks_still_cached_and_is_all_or_nothing() {
    let (mut m, seq) = filled(Codec::Int8);
    let mut store = TieredStore::in_memory(1 << 30);
    let swapped = m.swap_out(seq, &mut store).unwrap();
    let free_before = m.num_available_blocks();
    m.swap_in(&swapped, &mut store).unwrap();
    // three full blocks were still cached: only the open one was allocated
    assert_eq!(m.num_available_blocks(), free_before - 4);
    m.check_invariants().unwrap();
    // a payload gone missing is a typed error that changes nothing
    let swapped = m.swap_out(seq, &mut store).unwrap();
    let mut empty = TieredStore::in_memory(1 << 30);
    assert!(matches!(
        m.swap_in(&swapped, &mut empty),
        Err(KvError::SwappedBlockMissing { .. })
    ));
    assert!(m.table(seq).is_err());
    m.swap_in(&swapped, &mut store).unwrap();
}

#[test]
fn swap_in_never_hands_a_block_it_shares_to_another_of_its_blocks() {
    // X's first block is a duplicate (computed beside Z's, so never cached) and its second is
    // cached; when X swaps out, that cached block is next in the free queue, and swap-in must
    // hold it before allocating the first block's slot (it once took it, and X held it twice)
    let mut m = KvCacheManager::new(small_layout(), 4, b"swap-order").unwrap();
    let mut store = TieredStore::in_memory(1 << 30);
    let prompt = [1, 2, 3, 4, 5];
    let (z, x, w) = (SeqId(1), SeqId(2), SeqId(3));
    for seq in [z, x] {
        assert_eq!(m.admit(seq, &prompt).unwrap().cached_tokens, 0);
    }
    for seq in [z, x] {
        write_and_commit(&mut m, seq, &prompt);
    }
    m.free(z).unwrap();
    write_and_commit(&mut m, x, &[6, 7, 8]);
    // W takes the two free blocks: Z's cached first block is evicted
    m.admit(w, &[9, 9, 9, 9, 9]).unwrap();
    let swapped = m.swap_out(x, &mut store).unwrap();
    let queue: Vec<BlockId> = m.pool().free_queue().collect();
    assert_eq!(queue.len(), 2);
    assert!(
        m.pool().block_hash(queue[0]).unwrap().is_some(),
        "X's cached block is next"
    );
    m.swap_in(&swapped, &mut store).unwrap();
    m.check_invariants().unwrap();
    check_contents(&m, x).unwrap();
}

/// The disk under the prefix tier fails while swap-in demotes the cached block its allocation
/// evicts: swap-in returns the tier's error, the sequence is not back and holds nothing, every
/// block it took is free again, and the swapped payloads are all still in the store, so the
/// same swap-in succeeds whole once the disk is back.
#[test]
fn a_tier_failing_while_swap_in_demotes_gives_every_block_back() {
    let dir = std::env::temp_dir().join(format!("pagedkv-rollback-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut m = KvCacheManager::new(small_layout(), 4, b"rollback").unwrap();
    m.set_prefix_tier(TieredStore {
        host: HostTier::new(0),
        disk: Some(DiskTier::open(&dir, 1 << 20).unwrap()),
    });
    let mut store = TieredStore::in_memory(1 << 30);
    let (z, x) = (SeqId(1), SeqId(2));
    // Z leaves one cached block idle at the front of the free queue
    m.admit(z, &[1, 2, 3, 4]).unwrap();
    write_and_commit(&mut m, z, &[1, 2, 3, 4]);
    m.free(z).unwrap();
    // X: two full blocks and an open one, swapped out; its full blocks stay cached
    let prompt: Vec<u32> = (11..20).collect();
    m.admit(x, &prompt).unwrap();
    write_and_commit(&mut m, x, &prompt);
    let before = images(&m, x);
    let swapped = m.swap_out(x, &mut store).unwrap();
    let front = m.pool().free_queue().next().unwrap();
    assert!(
        m.pool().block_hash(front).unwrap().is_some(),
        "Z's cached block is next"
    );
    // swap-in shares X's two cached blocks and allocates the open one's slot, which evicts
    // Z's block: its demotion to the (now missing) disk fails
    std::fs::remove_dir_all(&dir).unwrap();
    let failed = m.swap_in(&swapped, &mut store);
    assert!(matches!(failed, Err(KvError::Io { .. })), "{failed:?}");
    assert!(matches!(m.table(x), Err(KvError::UnknownSequence(_))));
    assert_eq!(m.num_available_blocks(), 4);
    m.check_invariants().unwrap();
    // nothing of X lost: back whole once the disk is
    std::fs::create_dir_all(&dir).unwrap();
    m.swap_in(&swapped, &mut store).unwrap();
    m.check_invariants().unwrap();
    check_contents(&m, x).unwrap();
    assert_eq!(images(&m, x), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A disk tier that fails while the host tier moves payloads to it loses none of them: the
/// put returns the disk's error, every payload in memory stays readable (over capacity), and
/// once the disk is back a later put moves them on.
#[test]
fn a_failing_disk_tier_loses_no_payload_the_host_tier_held() {
    let dir = std::env::temp_dir().join(format!("pagedkv-disk-down-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut store = TieredStore {
        host: HostTier::new(300),
        disk: Some(DiskTier::open(&dir, 1 << 20).unwrap()),
    };
    let payload = |k: u128| vec![k as u8; 100];
    for k in 1..=4 {
        store.put(TierKey(k), payload(k)).unwrap();
    }
    assert!(
        store.disk.as_ref().unwrap().contains(TierKey(1)),
        "1 moved to disk"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let failed = store.put(TierKey(5), payload(5));
    assert!(matches!(failed, Err(KvError::Io { .. })), "{failed:?}");
    for k in 2..=5 {
        assert!(store.host.contains(TierKey(k)), "{k} kept in memory");
        assert_eq!(store.get(TierKey(k)).unwrap(), Some(payload(k)), "{k}");
    }
    std::fs::create_dir_all(&dir).unwrap();
    store.put(TierKey(6), payload(6)).unwrap();
    assert!(store.host.used_bytes() <= 300);
    for k in 2..=6 {
        assert_eq!(store.get(TierKey(k)).unwrap(), Some(payload(k)), "{k}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn sample_payload() -> (KvLayout, Vec<u8>, usize) {
    let (m, seq) = filled(Codec::Int4);
    let block = m.table(seq).unwrap().blocks()[0];
    let mut image = Vec::new();
    let kind = m.storage().export_block(block, &mut image).unwrap();
    let tokens: Vec<u32> = m.table(seq).unwrap().tokens()[..4].to_vec();
    let hash = m.table(seq).unwrap().hashes()[0];
    let bytes = payload::encode(m.layout(), kind, Some(hash), &tokens, &image);
    (m.layout().clone(), bytes, image.len())
}

#[test]
fn foreign_and_damaged_payloads_get_typed_errors() {
    let (l, bytes, image_len) = sample_payload();
    let sizes = |_kind: ImageKind| image_len;
    assert!(payload::decode(&l, &bytes, sizes).is_ok());
    assert!(matches!(
        payload::decode(&layout(Codec::Int8), &bytes, sizes),
        Err(PayloadError::ForeignLayout { .. })
    ));
    assert!(matches!(
        payload::decode(&l, &bytes[..20], sizes),
        Err(PayloadError::Truncated { .. })
    ));
    // a re-checksummed edit of the version field is caught by the version check
    let mut edited = bytes[..bytes.len() - 8].to_vec();
    edited[4] = 9;
    let sum = xxhash_rust::xxh3::xxh3_64(&edited);
    edited.extend_from_slice(&sum.to_le_bytes());
    assert!(matches!(
        payload::decode(&l, &edited, sizes),
        Err(PayloadError::Version { found: 9 })
    ));
    // an image of another size (another layout's) is refused before the pool
    assert!(matches!(
        payload::decode(&l, &bytes, |_| image_len + 1),
        Err(PayloadError::Malformed(_))
    ));
    let mut m = KvCacheManager::new(l, 4, b"x").unwrap();
    let mut storage = m.storage().clone();
    assert!(storage
        .import_block(BlockId(0), ImageKind::default(), &[0u8; 3])
        .is_err());
    // an image without sink rows imports as such in either layout; claiming rows it does not
    // hold is refused (in a layout without sinks too)
    let sealed = |sinks| ImageKind { open: false, sinks };
    let image = &bytes[bytes.len() - 8 - image_len..bytes.len() - 8];
    let mut with_sinks = pagedkv::KvStorage::new(layout_with_sinks(Codec::Int4, 2), 4).unwrap();
    for (storage, what) in [(&mut storage, "no sinks"), (&mut with_sinks, "sinks")] {
        let import = |s: &mut pagedkv::KvStorage, kind| s.import_block(BlockId(0), kind, image);
        assert!(import(storage, sealed(false)).is_ok(), "{what}");
        assert!(import(storage, sealed(true)).is_err(), "{what}");
    }
    let _ = &mut m;
}

#[test]
fn an_interrupted_disk_write_leaves_the_old_payload() {
    let dir = std::env::temp_dir().join(format!("pagedkv-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (l, old, image_len) = sample_payload();
    let key = TierKey(42);
    {
        let mut disk = DiskTier::open(&dir, 1 << 20).unwrap();
        disk.put(key, &old).unwrap();
    }
    // a writer killed mid-way leaves a truncated temporary file, never renamed
    let temp = dir.join(format!("{:032x}.tmp", key.0));
    std::fs::write(&temp, &old[..old.len() / 3]).unwrap();
    let mut disk = DiskTier::open(&dir, 1 << 20).unwrap();
    assert!(
        !temp.exists(),
        "leftover temporary files are removed on open"
    );
    let back = disk.get(key).unwrap().unwrap();
    assert_eq!(back, old);
    assert!(payload::decode(&l, &back, |_| image_len).is_ok());
    // a torn final file (e.g. a disk without atomic rename) is caught by the checksum
    std::fs::write(
        dir.join(format!("{:032x}.pkvb", key.0)),
        &old[..old.len() - 5],
    )
    .unwrap();
    let torn = disk.get(key).unwrap().unwrap();
    assert!(payload::decode(&l, &torn, |_| image_len).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Truncate { len: usize },
    Extend { extra: Vec<u8> },
    Set { at: usize, value: u8 },
}

fn cases() -> u32 {
    std::env::var("PAGEDKV_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// Every mutation of a valid payload is detected (an error, never a panic or a silent
    /// accept of different bytes).
    #[test]
    fn every_mutation_of_a_block_payload_is_detected(
        mutation in prop_oneof![
            (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
            any::<usize>().prop_map(|len| Mutation::Truncate { len }),
            proptest::collection::vec(any::<u8>(), 1..64).prop_map(|extra| Mutation::Extend { extra }),
            (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Set { at, value }),
        ]
    ) {
        let (l, bytes, image_len) = sample_payload_cached();
        let mut bad = bytes.clone();
        match mutation {
            Mutation::Flip { at, bit } => bad[at % bytes.len()] ^= 1 << bit,
            Mutation::Truncate { len } => bad.truncate(len % bytes.len()),
            Mutation::Extend { extra } => bad.extend_from_slice(&extra),
            Mutation::Set { at, value } => bad[at % bytes.len()] = value,
        }
        let result = payload::decode(&l, &bad, |_| image_len);
        if bad == bytes {
            prop_assert!(result.is_ok());
        } else {
            prop_assert!(result.is_err(), "a mutated payload was accepted");
        }
    }
}

fn sample_payload_cached() -> (KvLayout, Vec<u8>, usize) {
    static SAMPLE: std::sync::OnceLock<(KvLayout, Vec<u8>, usize)> = std::sync::OnceLock::new();
    SAMPLE.get_or_init(sample_payload).clone()
}

/// A cached prefix evicted from the pool is demoted to the tier under its key and found again by
/// a later prompt: the blocks come back with the same bytes (sink rows included) instead of
/// being recomputed.
#[test]
fn an_evicted_cached_prefix_is_found_in_the_tier_and_brought_back() {
    let settings = [
        (Codec::F16, 0),
        (Codec::Int4, 0),
        (Codec::FibQuant { k: 2, n: 16 }, 0),
        (Codec::Int4, 3),
    ];
    for (codec, sinks) in settings {
        let l = layout_with_sinks(codec, sinks);
        let mut m = KvCacheManager::new(l, 6, b"prefix-tier").unwrap();
        m.set_prefix_tier(TieredStore::in_memory(1 << 30));
        let prompt: Vec<u32> = (0..13).map(|t| t + 100).collect();
        let a = SeqId(1);
        m.admit(a, &prompt[..1]).unwrap();
        m.reserve(a, prompt.len()).unwrap();
        write_and_commit_scaled(&mut m, a, &prompt);
        let before: Vec<(ImageKind, Vec<u8>)> = images(&m, a)[..3].to_vec();
        assert_eq!(before[0].0.sinks, sinks > 0);
        m.free(a).unwrap();
        // another prompt takes every block: the three cached ones are evicted to the tier
        let other: Vec<u32> = (0..23).map(|t| t + 5000).collect();
        m.admit(SeqId(2), &other).unwrap();
        m.free(SeqId(2)).unwrap();
        assert_eq!(m.prefix_tier().unwrap().host.len(), 3, "{codec}");
        // the same prefix again: three blocks from the tier, the last one computed
        let b = SeqId(3);
        let admitted = m.admit(b, &prompt).unwrap();
        assert_eq!(admitted.cached_tokens, 12, "{codec}");
        assert_eq!(images(&m, b)[..3].to_vec(), before, "{codec}");
        m.check_invariants().unwrap();
    }
}

/// `write_and_commit` with rows scaled into the range of every codec.
fn write_and_commit_scaled(m: &mut KvCacheManager, seq: SeqId, tokens: &[u32]) {
    let l = m.layout().clone();
    for (pos, h) in prefix_hashes(tokens).iter().enumerate() {
        for layer in 0..l.layers() {
            let (k, v) = rows(&l, layer, *h);
            let scale = |x: Vec<f32>| x.iter().map(|v| v / 400.0).collect::<Vec<_>>();
            m.write_token(seq, layer, pos, &scale(k), &scale(v))
                .unwrap();
        }
    }
    m.commit(seq, tokens).unwrap();
}
