//! Storage: where tokens land, staging and sealing, overrides, sinks, bad input.

use super::*;
use crate::layout::LayoutSpec;

fn layout(codec: Codec) -> KvLayout {
    let mut spec = LayoutSpec::new(2, 2, 4, 32, codec);
    spec.block_size = 2;
    KvLayout::new(spec).unwrap()
}

fn row(seed: f32) -> Vec<f32> {
    (0..64)
        .map(|i| (i as f32 * 0.37 + seed).sin() * 3.0)
        .collect()
}

#[test]
fn token_lands_in_its_page_and_slot() {
    let mut s = KvStorage::new(layout(Codec::F32), 3).unwrap();
    let (k, v) = (row(1.0), row(2.0));
    s.write_token(1, BlockId(2), 1, &k, &v).unwrap();
    // keys channel-major: channel c of slot 1 at c·block_size + 1; values token-major
    let PageRef::F32T(page) = s.key_page(1, BlockId(2), 1).unwrap() else {
        panic!()
    };
    for c in 0..32 {
        assert_eq!(page[c * 2 + 1], k[32 + c]);
        assert_eq!(page[c * 2], 0.0);
    }
    let PageRef::F32(page) = s.value_page(1, BlockId(2), 1).unwrap() else {
        panic!()
    };
    assert_eq!(&page[32..64], &v[32..64]);
    assert!(page[..32].iter().all(|x| *x == 0.0));
    let (mut k2, mut v2) = (vec![0.0; 64], vec![0.0; 64]);
    s.read_token(1, BlockId(2), 1, &mut k2, &mut v2).unwrap();
    assert_eq!((k2, v2), (k, v));
}

#[test]
fn f16_storage_rounds_and_copy_block_copies_all_layers() {
    let mut s = KvStorage::new(layout(Codec::F16), 2).unwrap();
    let k = row(0.5);
    for layer in 0..2 {
        s.write_token(layer, BlockId(0), 0, &k, &k).unwrap();
    }
    s.copy_block(BlockId(0), BlockId(1)).unwrap();
    let (mut k2, mut v2) = (vec![0.0; 64], vec![0.0; 64]);
    s.read_token(1, BlockId(1), 0, &mut k2, &mut v2).unwrap();
    assert_eq!(k2[1], f16::from_f32(k[1]).to_f32());
    assert_eq!(k2, v2);
}

#[test]
fn compressed_blocks_stage_in_f32_then_seal_to_the_codec() {
    for codec in [
        Codec::Int8,
        Codec::Int4,
        Codec::Fp8E4m3,
        Codec::FibQuant { k: 2, n: 256 },
    ] {
        let mut s = KvStorage::new(layout(codec), 3).unwrap();
        let rows = [row(0.1), row(0.9)];
        for (slot, r) in rows.iter().enumerate() {
            for layer in 0..2 {
                s.write_token(layer, BlockId(1), slot, r, r).unwrap();
            }
        }
        assert!(s.is_open(BlockId(1)));
        let (mut k, mut v) = (vec![0.0; 64], vec![0.0; 64]);
        s.read_token(1, BlockId(1), 1, &mut k, &mut v).unwrap();
        assert_eq!(k, rows[1], "open blocks read back exactly");
        // CoW of an open block copies the staging rows
        s.copy_block(BlockId(1), BlockId(2)).unwrap();
        assert!(s.is_open(BlockId(2)));
        s.seal(BlockId(1), 0).unwrap();
        assert!(!s.is_open(BlockId(1)));
        s.read_token(1, BlockId(1), 1, &mut k, &mut v).unwrap();
        let err = k
            .iter()
            .zip(&rows[1])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            err > 0.0 && err < 0.5,
            "{codec}: sealed pages hold the codec's reconstruction (err {err})"
        );
        assert!(matches!(
            s.key_page(0, BlockId(1), 0).unwrap(),
            PageRef::Packed { .. }
        ));
        // a sealed block copied stays sealed; discarding an open block frees its staging
        s.copy_block(BlockId(1), BlockId(0)).unwrap();
        assert!(!s.is_open(BlockId(0)));
        s.discard(BlockId(2));
        assert_eq!(s.open_blocks(), 0);
    }
}

#[test]
fn a_layer_override_stores_that_layer_in_its_own_codec() {
    // layer 0 in f16 inside an int4 layout: layer 0 reads back at f16 precision once sealed
    let mut spec = layout(Codec::Int4).spec().clone();
    spec.layer_overrides = vec![crate::LayerOverride {
        layers: crate::LayerSet::of([0]).unwrap(),
        key_codec: Codec::F16,
        value_codec: Codec::F16,
    }];
    let mut s = KvStorage::new(KvLayout::new(spec).unwrap(), 2).unwrap();
    let r = row(0.37);
    for slot in 0..2 {
        for layer in 0..2 {
            s.write_token(layer, BlockId(0), slot, &r, &r).unwrap();
        }
    }
    s.seal(BlockId(0), 0).unwrap();
    let (mut k0, mut v0, mut k1, mut v1) =
        (vec![0.0; 64], vec![0.0; 64], vec![0.0; 64], vec![0.0; 64]);
    s.read_token(0, BlockId(0), 1, &mut k0, &mut v0).unwrap();
    s.read_token(1, BlockId(0), 1, &mut k1, &mut v1).unwrap();
    let max_err = |a: &[f32]| {
        a.iter()
            .zip(&r)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(max_err(&k0) <= 1e-3 * 4.0, "f16 layer: {}", max_err(&k0));
    assert!(max_err(&v1) > max_err(&v0), "the int4 layer is coarser");
    assert!(matches!(
        s.key_page(0, BlockId(0), 0).unwrap(),
        PageRef::Packed {
            codec: Codec::F16,
            ..
        }
    ));
}

/// Sink rows are f16: a sink token beyond its range (here in f32 keys, which the codec
/// itself would store) is an error before any page is encoded, and the block stays open.
#[test]
fn a_sink_row_beyond_f16_is_an_error_that_keeps_the_block_open() {
    let mut spec = layout(Codec::Int8).spec().clone();
    spec.key_codec = Codec::F32;
    spec.sink_tokens = 1;
    let mut s = KvStorage::new(KvLayout::new(spec).unwrap(), 2).unwrap();
    let mut big = row(0.1);
    big[3] = 1e6;
    for layer in 0..2 {
        s.write_token(layer, BlockId(0), 0, &big, &row(0.2))
            .unwrap();
        s.write_token(layer, BlockId(0), 1, &row(0.3), &row(0.4))
            .unwrap();
    }
    assert!(matches!(
        s.seal(BlockId(0), 0),
        Err(KvError::ValueOutOfRange { .. })
    ));
    assert!(s.is_open(BlockId(0)));
    // sealed as a later block (no sink rows), the same rows are stored
    s.seal(BlockId(0), 2).unwrap();
    assert!(!s.is_open(BlockId(0)));
    assert!(s.sink_rows(0, BlockId(0), 0, Role::Key).is_none());
}

#[test]
fn bad_indices_and_shapes_are_errors() {
    let mut s = KvStorage::new(layout(Codec::F32), 2).unwrap();
    let r = vec![0.0; 64];
    assert!(matches!(
        s.write_token(2, BlockId(0), 0, &r, &r),
        Err(KvError::IndexOutOfRange { what: "layer", .. })
    ));
    assert_eq!(
        s.write_token(0, BlockId(2), 0, &r, &r),
        Err(KvError::InvalidBlock(BlockId(2)))
    );
    assert!(matches!(
        s.write_token(0, BlockId(0), 2, &r, &r),
        Err(KvError::IndexOutOfRange { what: "slot", .. })
    ));
    assert!(matches!(
        s.write_token(0, BlockId(0), 0, &r[..7], &r),
        Err(KvError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        s.key_page(0, BlockId(0), 2),
        Err(KvError::IndexOutOfRange {
            what: "kv head",
            ..
        })
    ));
    let mut spec = LayoutSpec::new(1, 1, 1, 48, Codec::FibQuant { k: 2, n: 16 });
    spec.block_size = 2;
    assert!(matches!(
        KvLayout::new(spec),
        Err(KvError::UnsupportedCodec { .. })
    ));
}
