//! `eval` on the real model (f32 weights) over a short real text: the reference row is exact,
//! f16 is nearly so, and KL rises as bits fall.

use pagedkv::Codec;
use pagedkv_engine::eval::{evaluate, CodecPair, EvalConfig};
use pagedkv_engine::fetch::ensure_model;
use pagedkv_engine::{Model, WeightMode};

const TEXT: &str = include_str!("../../../data/as-you-like-it.txt");

#[test]
fn kl_is_zero_for_f32_and_rises_as_bits_fall() {
    let path = ensure_model(None).expect("model");
    let (model, tokenizer) = Model::load(&path, WeightMode::F32).unwrap();
    let tokens = tokenizer.encode(&TEXT[20_000..40_000]).unwrap();
    let settings: Vec<CodecPair> = [
        "f16",
        "int8",
        "int4",
        "int2",
        "fibquant-k2n256",
        "fibquant-k2n16",
    ]
    .iter()
    .map(|c| c.parse().unwrap())
    .collect();
    let config = EvalConfig {
        window: 256,
        block_size: 16,
        max_windows: Some(1),
        key_norm: None,
        key_stats: None,
        key_split: None,
    };
    let rows = evaluate(&model, &tokens, &settings, config.clone(), |_, _| {}).unwrap();
    for r in &rows {
        println!(
            "{:<16} bits {:>5.2} KL {:.6} top-1 {:.3} PPL {:.3}",
            r.codecs.to_string(),
            r.bits_per_element,
            r.kl_mean,
            r.top1,
            r.ppl
        );
    }
    let row = |name: &str| {
        rows.iter()
            .find(|r| r.codecs == name.parse::<CodecPair>().unwrap())
            .unwrap()
    };
    assert_eq!(rows[0].codecs, CodecPair::same(Codec::F32));
    assert_eq!(row("f32").kl_mean, 0.0);
    assert_eq!(row("f32").top1, 1.0);
    assert_eq!(row("f32").tokens, 255);
    assert!(row("f16").kl_mean < 1e-4, "{}", row("f16").kl_mean);
    assert!(row("int8").kl_mean < row("int4").kl_mean);
    assert!(row("int4").kl_mean < row("int2").kl_mean);
    assert!(row("fibquant-k2n256").kl_mean < row("fibquant-k2n16").kl_mean);
    // bad input is a typed error, not a panic
    let short = EvalConfig {
        window: 100_000,
        ..config
    };
    assert!(evaluate(&model, &tokens, &settings, short, |_, _| {}).is_err());
}

/// Key normalization fitted on the calibration text lowers FibQuant's KL on a text it never
/// saw, and leaves the storage cost unchanged; so does the key split measured there.
#[test]
fn key_normalization_key_split_and_a_sink_token_lower_fibquant_kl_on_an_unseen_text() {
    let path = ensure_model(None).expect("model");
    let (model, tokenizer) = Model::load(&path, WeightMode::F32).unwrap();
    let key_norm = pagedkv_engine::calibrate::default_key_norm(&model, &tokenizer, 16).unwrap();
    let key_stats =
        pagedkv_engine::calibrate::default_key_stats(&model, &tokenizer, &key_norm).unwrap();
    let tokens = tokenizer.encode(&TEXT[60_000..80_000]).unwrap();
    let names = [
        "fibquant-k4n256",
        "fibquant-k4n256+keynorm",
        "fibquant-k4n256+keynorm+sink1",
        "fibquant-k4n256+keysplit+sink1",
    ];
    let settings: Vec<CodecPair> = names.iter().map(|c| c.parse().unwrap()).collect();
    let config = EvalConfig {
        window: 256,
        block_size: 16,
        max_windows: Some(2),
        key_norm: Some(std::sync::Arc::new(key_norm)),
        key_stats: Some(std::sync::Arc::new(key_stats)),
        key_split: None,
    };
    let rows = evaluate(&model, &tokens, &settings, config.clone(), |_, _| {}).unwrap();
    let (plain, normed, sunk, split) = (&rows[1], &rows[2], &rows[3], &rows[4]);
    println!(
        "plain KL {:.4} PPL {:.3}; keynorm KL {:.4} PPL {:.3}; +sink1 KL {:.4} PPL {:.3}; keysplit+sink1 KL {:.4} PPL {:.3}",
        plain.kl_mean, plain.ppl, normed.kl_mean, normed.ppl, sunk.kl_mean, sunk.ppl, split.kl_mean, split.ppl
    );
    // the split spends at most the codec's bits, where the logits feel them
    assert!(split.kl_mean < 0.9 * sunk.kl_mean);
    assert!(split.bits_per_element <= sunk.bits_per_element);
    assert!(normed.kl_mean < 0.95 * plain.kl_mean);
    assert_eq!(normed.bits_per_element, plain.bits_per_element);
    // one sink token: lower KL, for its f16 rows (16 bits per element of one token in 256)
    assert!(sunk.kl_mean < 0.9 * normed.kl_mean);
    let sink_bits = 16.0 / 256.0;
    assert!((sunk.bits_per_element - normed.bits_per_element - sink_bits).abs() < 1e-9);
    // asking for it without a fitted normalization is an error
    let none = EvalConfig {
        key_norm: None,
        key_stats: None,
        ..config
    };
    assert!(evaluate(&model, &tokens, &settings, none, |_, _| {}).is_err());
}
