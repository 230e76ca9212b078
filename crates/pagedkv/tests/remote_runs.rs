//! A shared store's fetch cut short, in each way it can be: the payloads before the cut are
//! kept, and the prompt's report names the cut (a store that stopped answering, a budget run
//! out, a damaged payload) rather than a missing entry. The store is scripted here; the Redis
//! one is tested against a real server in `pagedkv-redis`.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::{int8_layout, write_and_commit, BLOCK};
use pagedkv::tier::{FetchedRun, RemoteError, RemoteKey, RemoteStore, RunCut};
use pagedkv::{KvCacheManager, MissReason, SeqId};

type Published = Arc<Mutex<HashMap<RemoteKey, Vec<u8>>>>;

/// Serves what was published, up to `serve` payloads a run, then `cut`; `damage` flips a byte
/// of the payload at that place of the run.
#[derive(Debug)]
struct ScriptedStore {
    published: Published,
    serve: usize,
    cut: RunCut,
    damage: Option<usize>,
}

impl RemoteStore for ScriptedStore {
    fn publish(&mut self, key: RemoteKey, payload: Vec<u8>) {
        self.published.lock().unwrap().insert(key, payload);
    }

    fn fetch_run(&mut self, keys: &[RemoteKey]) -> Result<FetchedRun, RemoteError> {
        let published = self.published.lock().unwrap();
        let mut payloads: Vec<Vec<u8>> = keys
            .iter()
            .take(self.serve)
            .map_while(|k| published.get(k).cloned())
            .collect();
        if let Some(p) = self.damage.and_then(|i| payloads.get_mut(i)) {
            let last = p.len() - 1;
            p[last] ^= 0x40;
        }
        Ok(FetchedRun::cut_short(payloads, self.cut))
    }

    fn probe_run(&mut self, keys: &[RemoteKey]) -> Result<usize, RemoteError> {
        Ok(keys.len().min(self.serve))
    }

    fn delete(&mut self, key: RemoteKey) {
        self.published.lock().unwrap().remove(&key);
    }
}

fn store(published: &Published, serve: usize, cut: RunCut, damage: Option<usize>) -> ScriptedStore {
    ScriptedStore {
        published: published.clone(),
        serve,
        cut,
        damage,
    }
}

#[test]
fn a_cut_run_keeps_its_blocks_and_the_report_names_the_cut() {
    let prompt: Vec<u32> = (0..6 * BLOCK as u32 + 1).map(|t| 3 * t + 1).collect();
    let published = Published::default();
    let mut first = KvCacheManager::new(int8_layout(), 64, b"remote-runs").unwrap();
    first.set_remote_store(Box::new(store(&published, 0, RunCut::Missing, None)));
    first.admit(SeqId(1), &prompt).unwrap();
    write_and_commit(&mut first, SeqId(1), &prompt);
    assert_eq!(
        published.lock().unwrap().len(),
        6,
        "every full block published"
    );

    for (cut, damage, blocks, reason) in [
        (RunCut::Missing, None, 2, MissReason::NoEntry),
        (RunCut::Unavailable, None, 2, MissReason::StoreUnavailable),
        (RunCut::OutOfTime, None, 2, MissReason::StoreTimedOut),
        (RunCut::OutOfTime, Some(1), 1, MissReason::Damaged),
    ] {
        let mut second = KvCacheManager::new(int8_layout(), 64, b"remote-runs").unwrap();
        second.set_remote_store(Box::new(store(&published, 2, cut, damage)));
        let admission = second.admit(SeqId(1), &prompt).unwrap();
        let report = admission.report;
        assert_eq!(
            report.remote_tokens,
            blocks * BLOCK,
            "{cut:?}, damage {damage:?}"
        );
        assert_eq!(report.first_missed_block, Some(blocks), "{cut:?}");
        assert_eq!(report.reason, reason, "{cut:?}, damage {damage:?}");
        // the rest is computed: the sequence holds what the first engine's does, bit for bit
        write_and_commit(&mut second, SeqId(1), &prompt[admission.cached_tokens..]);
        second.check_invariants().unwrap();
        let w = first.layout().token_width();
        let (mut k1, mut v1, mut k2, mut v2) =
            (vec![0.0; w], vec![0.0; w], vec![0.0; w], vec![0.0; w]);
        for pos in 0..prompt.len() {
            for layer in 0..first.layout().layers() {
                first
                    .read_token(SeqId(1), layer, pos, &mut k1, &mut v1)
                    .unwrap();
                second
                    .read_token(SeqId(1), layer, pos, &mut k2, &mut v2)
                    .unwrap();
                assert!(
                    k1 == k2 && v1 == v2,
                    "{cut:?}: position {pos} layer {layer}"
                );
            }
        }
    }
}
