//! KV profiles on a small Llama file the tests write: made from key means, statistics and a
//! per-layer setting as `pagedkv calibrate` makes them, written and read back unchanged, applied
//! as the layout eval builds from the same parts; damaged, edited, foreign or unsupported
//! profiles are refused with a reason.

mod tiny_gguf;

use pagedkv_engine::calibrate::{fit_key_norm, fit_key_stats};
use pagedkv_engine::eval::CodecPair;
use pagedkv_engine::profile::{KvProfile, Provenance};
use pagedkv_engine::{EngineError, Model, ModelFingerprint, WeightMode};
use tiny_gguf::{Spec, TinyGguf};

const BLOCK: usize = 16;

/// A profile of the small model for `setting`, fitted on random tokens.
fn profile(model: &Model, setting: &str) -> KvProfile {
    let c = model.config();
    let tokens: Vec<u32> = (0..4 * 64).map(|i| (i * 7919 % 256) as u32).collect();
    let norm = fit_key_norm(model, &tokens, 64, 3, BLOCK).unwrap();
    let stats = fit_key_stats(model, &tokens, 64, 3, &norm).unwrap();
    let setting: CodecPair = setting.parse().unwrap();
    let layout = c
        .kv_layout_with(
            setting.key,
            setting.value,
            BLOCK,
            setting.layer_overrides.clone(),
        )
        .unwrap();
    let split = stats.split(|layer| layout.key_codec(layer)).unwrap();
    KvProfile {
        model: model.fingerprint(),
        geometry: (c.layers, c.kv_heads, c.head_dim),
        rope_base: c.rope_base,
        key_means: Some(
            (0..c.layers)
                .flat_map(|l| (0..c.kv_heads).map(move |h| (l, h)))
                .flat_map(|(l, h)| norm.mean(l, h).to_vec())
                .collect(),
        ),
        key_split: Some((0..c.layers).map(|l| split.plan(l).cloned()).collect()),
        setting,
        provenance: Provenance {
            text: "random tokens".into(),
            windows: 3,
            skip_windows: 1,
            window: 64,
            budget_bits: 2.5,
            bits_per_element: 2.4,
        },
    }
}

fn small_model() -> Model {
    let path = TinyGguf::valid().write("profile");
    Model::load(&path, WeightMode::F32).unwrap().0
}

fn refusal(text: &str) -> String {
    let path = std::env::temp_dir().join(format!("pagedkv-profile-{}.json", std::process::id()));
    std::fs::write(&path, text).unwrap();
    match KvProfile::load(&path) {
        Err(EngineError::BadProfile { reason, .. }) => reason,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("the profile was accepted"),
    }
}

#[test]
fn a_profile_reads_back_unchanged_and_builds_its_layout() {
    let model = small_model();
    let p = profile(
        &model,
        "fibquant-k4n256@fibquant-k2n256/fibquant-k4n64:1+keysplit+sink1",
    );
    assert!(
        p.key_split.as_ref().unwrap()[0].is_some(),
        "a split on layer 0"
    );
    let path = std::env::temp_dir().join(format!("pagedkv-profile-ok-{}.json", std::process::id()));
    p.save(&path).unwrap();
    let back = KvProfile::load(&path).unwrap();
    assert_eq!(back, p);
    assert_eq!(back.checksum(), p.checksum());
    back.check_model(&path, model.fingerprint()).unwrap();
    let layout = back.layout(model.config(), BLOCK).unwrap();
    assert_eq!(
        layout.digest_bytes(),
        p.layout(model.config(), BLOCK).unwrap().digest_bytes()
    );
    assert_eq!(layout.spec().sink_tokens, 1);
    assert_eq!(layout.key_codec(1).to_string(), "fibquant-k2n256");
    assert_eq!(layout.value_codec(1).to_string(), "fibquant-k4n64");
    assert!(layout.spec().key_norm.is_some() && layout.spec().key_split.is_some());

    // another profile's means or setting is another layout: blocks and tier keys never mix
    let mut other = p.clone();
    other.key_means.as_mut().unwrap()[5] += 0.01;
    assert_ne!(other.checksum(), p.checksum());
    let other_layout = other.layout(model.config(), BLOCK).unwrap();
    assert_ne!(other_layout.digest_bytes(), layout.digest_bytes());
    let plain = profile(&model, "fibquant-k4n256+keysplit+sink1");
    assert_ne!(
        plain.layout(model.config(), BLOCK).unwrap().digest_bytes(),
        layout.digest_bytes()
    );
}

#[test]
fn damaged_edited_foreign_and_unsupported_profiles_are_refused() {
    let model = small_model();
    let p = profile(&model, "fibquant-k4n256+keysplit+sink1");
    let json = p.to_json();

    // a number changed by hand: the checksum no longer matches
    let means_at = json.find("\"key_means\": [").unwrap();
    let first_point = means_at + json[means_at..].find('.').unwrap();
    let mut edited = json.clone();
    edited.insert(first_point + 1, '7'); // the first mean's first decimal
    assert!(
        refusal(&edited).contains("checksum"),
        "{}",
        refusal(&edited)
    );
    // the setting changed by hand
    let setting = json.replace(
        "\"fibquant-k4n256+keysplit+sink1\"",
        "\"fibquant-k4n64+keysplit+sink1\"",
    );
    assert!(refusal(&setting).contains("checksum"));
    // cut short, another version, another format, a field missing
    assert!(refusal(&json[..json.len() / 2]).contains("not a JSON profile"));
    let v2 = json.replace("\"version\": 1", "\"version\": 2");
    assert!(
        refusal(&v2).contains("profile version 2"),
        "{}",
        refusal(&v2)
    );
    let other = json.replace("pagedkv-kv-profile", "something-else");
    assert!(refusal(&other).contains("not a pagedkv KV profile"));
    let missing = json.replace("\"setting\":", "\"settings\":");
    assert!(refusal(&missing).contains("missing field `setting`"));

    // made for another model file
    let path = std::path::Path::new("p.json");
    let e = p
        .check_model(path, ModelFingerprint(7))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("made for model") && e.contains(&ModelFingerprint(7).hex()),
        "{e}"
    );
    // another geometry
    let qwen = Model::load(
        &TinyGguf::new(Spec {
            architecture: "qwen2",
            ..Spec::SMALL
        })
        .write("profile-qwen"),
        WeightMode::F32,
    )
    .unwrap()
    .0;
    // same shape, but Qwen2 rotates halves: key means cannot be applied to it
    let e = p.layout(qwen.config(), BLOCK).unwrap_err().to_string();
    assert!(e.contains("interleaved RoPE"), "{e}");
    let tokens: Vec<u32> = (0..256).collect();
    let e = fit_key_norm(&qwen, &tokens, 64, 2, BLOCK)
        .unwrap_err()
        .to_string();
    assert!(e.contains("interleaved RoPE"), "{e}");
}
