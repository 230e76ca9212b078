//! Payload robustness: every truncation, extension, bit flip and header edit of a valid payload
//! is rejected with a typed error, never a panic, and foreign payloads are refused.
//! Cases: 1,000 by default; `PAGEDKV_PROPTEST_CASES` for longer local runs.

use std::sync::OnceLock;

use fibquant::payload::PayloadError;
use fibquant::{FibQuant, Profile};
use proptest::prelude::*;

fn quantizer() -> &'static FibQuant {
    static Q: OnceLock<FibQuant> = OnceLock::new();
    Q.get_or_init(|| FibQuant::new(Profile::new(64, 2, 64, 3)).unwrap())
}

fn payload() -> Vec<u8> {
    let q = quantizer();
    let mut codes = vec![0u8; q.code_bytes() * 5];
    for (i, code) in codes.chunks_exact_mut(q.code_bytes()).enumerate() {
        let x: Vec<f32> = (0..64)
            .map(|j| ((i * 64 + j) as f32 * 0.37).sin())
            .collect();
        q.encode(&x, code).unwrap();
    }
    q.to_payload(&codes).unwrap()
}

#[test]
fn valid_payload_round_trips_and_foreign_ones_are_refused() {
    let q = quantizer();
    let p = payload();
    assert_eq!(q.from_payload(&p).unwrap().len(), q.code_bytes() * 5);
    let other = FibQuant::new(Profile::new(64, 2, 64, 4)).unwrap();
    assert!(matches!(
        other.from_payload(&p),
        Err(PayloadError::ForeignProfile { .. })
    ));
    assert!(matches!(
        q.from_payload(&p[..10]),
        Err(PayloadError::Truncated { .. })
    ));
    assert!(q.to_payload(&[0u8; 3]).is_err());
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Truncate {
        len: usize,
    },
    Extend {
        bytes: Vec<u8>,
    },
    /// Rewrite a header byte and recompute the checksum: only field checks can catch it.
    Header {
        at: usize,
        value: u8,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        prop::collection::vec(any::<u8>(), 1..40).prop_map(|bytes| Mutation::Extend { bytes }),
        (0usize..36, any::<u8>()).prop_map(|(at, value)| Mutation::Header { at, value }),
    ]
}

fn cases() -> u32 {
    std::env::var("PAGEDKV_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn every_mutation_is_rejected(m in mutation()) {
        let original = payload();
        let mut p = original.clone();
        match m {
            Mutation::Flip { at, bit } => p[at % original.len()] ^= 1 << bit,
            Mutation::Truncate { len } => p.truncate(len % original.len()),
            Mutation::Extend { bytes } => p.extend(bytes),
            Mutation::Header { at, value } => {
                if p[at] == value {
                    return Ok(());
                }
                p[at] = value;
                let n = p.len() - 8;
                let sum = xxhash_rust::xxh3::xxh3_64(&p[..n]);
                p[n..].copy_from_slice(&sum.to_le_bytes());
            }
        }
        prop_assert!(quantizer().from_payload(&p).is_err());
    }
}
