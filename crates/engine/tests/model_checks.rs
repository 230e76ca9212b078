//! The engine checks what it loads: metadata of the wrong type or range, and tensors whose
//! shapes disagree with the metadata, are typed errors naming what is wrong.

use candle_core::quantized::gguf_file::{Content, Value};
use pagedkv_engine::fetch::ensure_model;
use pagedkv_engine::{EngineError, ModelConfig};

fn content() -> (std::path::PathBuf, Content) {
    let path = ensure_model(None).unwrap();
    let content = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    (path, content)
}

fn bad_model_reason(result: Result<impl std::fmt::Debug, EngineError>) -> String {
    match result {
        Err(EngineError::BadModel { reason, .. }) => reason,
        other => panic!("expected a BadModel error, got {other:?}"),
    }
}

#[test]
fn the_real_file_passes_every_check() {
    let (path, ct) = content();
    let config = ModelConfig::from_gguf(&path, &ct).unwrap();
    config.check_tensors(&path, &ct).unwrap();
    assert_eq!((config.layers, config.heads, config.kv_heads), (30, 9, 3));
}

#[test]
fn metadata_of_the_wrong_type_or_range_is_refused() {
    let (path, ct) = content();
    let with = |key: &str, value: Value| {
        let mut ct = Content {
            magic: ct.magic,
            metadata: ct.metadata.clone(),
            tensor_infos: Default::default(),
            tensor_data_offset: ct.tensor_data_offset,
        };
        ct.metadata.insert(key.to_string(), value);
        ModelConfig::from_gguf(&path, &ct)
    };
    let reason = bad_model_reason(with("llama.rope.freq_base", Value::String("big".into())));
    assert!(
        reason.contains("`llama.rope.freq_base` is not an f32"),
        "{reason}"
    );
    let reason = bad_model_reason(with("llama.rope.freq_base", Value::F32(-1.0)));
    assert!(reason.contains("RoPE base"), "{reason}");
    let reason = bad_model_reason(with("llama.attention.head_count_kv", Value::U32(4)));
    assert!(reason.contains("kv head count"), "{reason}");
    let reason = bad_model_reason(with("llama.block_count", Value::U32(0)));
    assert!(reason.contains("`llama.block_count` is zero"), "{reason}");
    let reason = bad_model_reason(with("general.architecture", Value::String("mamba".into())));
    assert!(reason.contains("is not llama"), "{reason}");
}

#[test]
fn tensors_that_disagree_with_the_metadata_are_refused() {
    let (path, mut ct) = content();
    let config = ModelConfig::from_gguf(&path, &ct).unwrap();
    let good = ct.tensor_infos["blk.7.attn_k.weight"].shape.clone();
    ct.tensor_infos
        .get_mut("blk.7.attn_k.weight")
        .unwrap()
        .shape = (64, 576).into();
    let reason = bad_model_reason(config.check_tensors(&path, &ct));
    assert!(
        reason.contains(
            "tensor `blk.7.attn_k.weight` has shape [64, 576]; the metadata implies [192, 576]"
        ),
        "{reason}"
    );
    ct.tensor_infos
        .get_mut("blk.7.attn_k.weight")
        .unwrap()
        .shape = good;
    ct.tensor_infos.remove("blk.29.ffn_down.weight");
    let reason = bad_model_reason(config.check_tensors(&path, &ct));
    assert!(
        reason.contains("missing tensor `blk.29.ffn_down.weight`"),
        "{reason}"
    );
}
