//! The model fingerprint comes from the file: stable for one file, different when anything that
//! decides the K/V differs (a hyper-parameter, the vocabulary, a tensor's type).

use candle_core::quantized::gguf_file::{Content, Value};
use pagedkv_engine::fetch::ensure_model;
use pagedkv_engine::{Model, ModelFingerprint, WeightMode};

#[test]
fn the_fingerprint_is_the_files_and_changes_with_it() {
    let path = ensure_model(None).unwrap();
    let content = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    let (model, _) = Model::load(&path, WeightMode::Q4).unwrap();
    let fp = ModelFingerprint::of(&content);
    assert_eq!(
        model.fingerprint(),
        fp,
        "loading computes the file's fingerprint"
    );
    assert_eq!(fp, ModelFingerprint::of(&content), "stable");
    println!("SmolLM2-135M-Instruct.Q4_1 fingerprint {}", fp.hex());

    let mut rope = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    rope.metadata
        .insert("llama.rope.freq_base".into(), Value::F32(10_000.0));
    assert_ne!(ModelFingerprint::of(&rope), fp, "a hyper-parameter");

    let mut vocab = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    if let Some(Value::Array(tokens)) = vocab.metadata.get_mut("tokenizer.ggml.tokens") {
        tokens[100] = Value::String("something else".into());
    } else {
        panic!("the file has a token list");
    }
    assert_ne!(ModelFingerprint::of(&vocab), fp, "the vocabulary");

    let mut tensor = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    let info = tensor.tensor_infos.get_mut("blk.0.attn_q.weight").unwrap();
    info.ggml_dtype = candle_core::quantized::GgmlDType::Q8_0;
    assert_ne!(ModelFingerprint::of(&tensor), fp, "a tensor's type");
}
