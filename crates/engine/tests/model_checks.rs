//! The engine checks what it loads. Each test writes a small GGUF file (tests/tiny_gguf) with one
//! thing wrong and asserts the typed error naming it; the valid file loads and generates, and the
//! real model passes the same checks.

mod tiny_gguf;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use pagedkv::{Codec, KvCacheManager};
use pagedkv_engine::fetch::ensure_model;
use pagedkv_engine::{
    EngineError, Event, Model, ModelConfig, Request, SamplingParams, Scheduler, SchedulerConfig,
    WeightMode,
};
use tiny_gguf::{qtensor, Spec, TinyGguf, HIDDEN};

/// Writes and loads the file; only the error matters.
fn load(file: &TinyGguf, name: &str) -> Result<(), EngineError> {
    Model::load(&file.write(name), WeightMode::Exact).map(|_| ())
}

fn bad_model_reason(result: Result<impl std::fmt::Debug, EngineError>) -> String {
    match result {
        Err(EngineError::BadModel { reason, .. }) => reason,
        other => panic!("expected a BadModel error, got {other:?}"),
    }
}

fn generate(model: &Model, prompt: Vec<u32>, codec: Codec) -> Vec<u32> {
    let layout = model.config().kv_layout(codec, codec, 16).unwrap();
    let cache = KvCacheManager::new(layout, 16, b"tiny-gguf").unwrap();
    let mut scheduler = Scheduler::new(model, cache, SchedulerConfig::default()).unwrap();
    let request = Request::new(0, prompt, 12, SamplingParams::default());
    scheduler.submit(request).unwrap();
    let mut tokens = Vec::new();
    scheduler
        .run(|event| {
            if let Event::Token { token, .. } = event {
                tokens.push(*token);
            }
        })
        .unwrap();
    tokens
}

#[test]
fn a_valid_small_file_loads_and_generates() {
    let path = TinyGguf::valid().write("valid");
    let (model, tokenizer) = Model::load(&path, WeightMode::Exact).unwrap();
    let c = model.config();
    assert_eq!((c.layers, c.heads, c.kv_heads, c.head_dim), (2, 2, 1, 64));
    let prompt = tokenizer.encode("hello, small model").unwrap();
    assert_eq!(
        tokenizer.decode(&prompt, false).unwrap(),
        "hello, small model"
    );
    let f16 = generate(&model, prompt.clone(), Codec::F16);
    assert!(!f16.is_empty() && f16.len() <= 12);
    assert!(f16.iter().all(|t| (*t as usize) < c.vocab));
    assert_eq!(
        f16,
        generate(&model, prompt, Codec::F16),
        "greedy is reproducible"
    );
}

#[test]
fn the_real_file_passes_every_check() {
    let path = ensure_model(None).unwrap();
    let ct = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    let config = ModelConfig::from_gguf(&path, &ct).unwrap();
    config.check_tensors(&path, &ct).unwrap();
    assert_eq!((config.layers, config.heads, config.kv_heads), (30, 9, 3));
}

#[test]
fn metadata_of_the_wrong_type_or_range_is_refused() {
    let cases = [
        (
            "llama.rope.freq_base",
            Value::String("big".into()),
            "`llama.rope.freq_base` is not an f32",
        ),
        ("llama.rope.freq_base", Value::F32(-1.0), "RoPE base"),
        ("llama.rope.freq_base", Value::F32(f32::NAN), "RoPE base"),
        (
            "llama.attention.head_count_kv",
            Value::U32(3),
            "kv head count",
        ),
        ("llama.attention.head_count", Value::U32(0), "head count"),
        (
            "llama.block_count",
            Value::U32(0),
            "`llama.block_count` is zero",
        ),
        (
            "llama.block_count",
            Value::String("2".into()),
            "`llama.block_count` is not a u32",
        ),
        (
            "llama.context_length",
            Value::U32(0),
            "`llama.context_length` is zero",
        ),
        (
            "llama.rope.scaling.type",
            Value::String("yarn".into()),
            "RoPE scaling `yarn` is not supported",
        ),
        (
            "llama.rope.scaling.factor",
            Value::F32(0.0),
            "RoPE scaling factor 0 is not a positive number",
        ),
        (
            "llama.rope.dimension_count",
            Value::U32(32),
            "RoPE over 32 of 64 elements per head is not supported",
        ),
        (
            "llama.attention.value_length",
            Value::U32(32),
            "value heads of 32 elements differ from key heads of 64",
        ),
        (
            "llama.attention.key_length",
            Value::U32(33),
            "head size 33 is not a positive even number",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(f32::NAN),
            "RMSNorm epsilon",
        ),
        (
            "general.architecture",
            Value::String("mamba".into()),
            "is not supported (supported: llama, qwen2)",
        ),
    ];
    for (key, value, expected) in cases {
        let mut file = TinyGguf::valid();
        file.set(key, value.clone());
        let reason = bad_model_reason(load(&file, "metadata"));
        assert!(reason.contains(expected), "{key} = {value:?}: {reason}");
    }
}

#[test]
fn tensors_that_disagree_with_the_metadata_are_refused() {
    let mut file = TinyGguf::valid();
    file.replace(
        "blk.1.attn_k.weight",
        qtensor(&[32, HIDDEN], GgmlDType::Q8_0, 7),
    );
    let reason = bad_model_reason(load(&file, "shape"));
    assert!(
        reason.contains(
            "tensor `blk.1.attn_k.weight` has shape [32, 128]; the metadata implies [64, 128]"
        ),
        "{reason}"
    );

    let mut file = TinyGguf::valid();
    file.remove("blk.1.ffn_down.weight");
    let reason = bad_model_reason(load(&file, "missing"));
    assert!(
        reason.contains("missing tensor `blk.1.ffn_down.weight`"),
        "{reason}"
    );

    let mut file = TinyGguf::valid();
    file.set("llama.embedding_length", Value::U32(256));
    file.set("llama.rope.dimension_count", Value::U32(128));
    let reason = bad_model_reason(load(&file, "width"));
    assert!(reason.contains("expected [n, 256]"), "{reason}");
}

#[test]
fn tensors_an_architecture_or_scaling_needs_are_required() {
    // qwen2 reads biases on q/k/v
    let mut file = TinyGguf::new(Spec {
        architecture: "qwen2",
        ..Spec::SMALL
    });
    file.remove("blk.1.attn_v.bias");
    let reason = bad_model_reason(load(&file, "bias"));
    assert!(
        reason.contains("missing tensor `blk.1.attn_v.bias`"),
        "{reason}"
    );

    // a bias the forward pass would not add
    let mut file = TinyGguf::valid();
    file.tensors.push((
        "blk.0.attn_output.bias".into(),
        qtensor(&[HIDDEN], GgmlDType::F32, 4),
    ));
    let reason = bad_model_reason(load(&file, "bias-unread"));
    assert!(
        reason.contains("tensor `blk.0.attn_output.bias` is a bias this engine does not apply"),
        "{reason}"
    );

    // frequency factors must be positive numbers
    let mut file = TinyGguf::valid();
    file.tensors.push((
        "rope_freqs.weight".into(),
        qtensor(&[32], GgmlDType::F32, 5),
    ));
    let reason = bad_model_reason(load(&file, "freqs-negative"));
    assert!(
        reason.contains("RoPE frequency factor -") && reason.contains("is not a positive number"),
        "{reason}"
    );

    // frequency factors: one per rotated pair
    let mut file = TinyGguf::valid();
    file.tensors.push((
        "rope_freqs.weight".into(),
        qtensor(&[16], GgmlDType::F32, 3),
    ));
    let reason = bad_model_reason(load(&file, "freqs"));
    assert!(
        reason.contains("tensor `rope_freqs.weight` has shape [16]; the metadata implies [32]"),
        "{reason}"
    );
}

#[test]
fn a_tokenizer_larger_than_the_embedding_is_refused() {
    // 261 tokens, an embedding of 200 rows: a prompt with token 250 would index past it
    let mut file = TinyGguf::valid();
    file.set("llama.vocab_size", Value::U32(200));
    file.replace(
        "token_embd.weight",
        qtensor(&[200, HIDDEN], GgmlDType::Q8_0, 9),
    );
    let reason = bad_model_reason(load(&file, "vocab"));
    assert!(
        reason.contains("the tokenizer has 261 tokens; the model's vocabulary is 200"),
        "{reason}"
    );

    // 2³² + 5 must not wrap to token 5
    for (eos, shown) in [
        (Value::U32(4000), "4000"),
        (Value::U64((1 << 32) + 5), "4294967301"),
    ] {
        let mut file = TinyGguf::valid();
        file.set("tokenizer.ggml.eos_token_id", eos);
        match load(&file, "eos") {
            Err(EngineError::Tokenizer(message)) => {
                assert!(message.contains(&format!("eos token {shown}")), "{message}")
            }
            other => panic!("expected a tokenizer error, got {other:?}"),
        }
    }
}

#[test]
fn a_truncated_file_is_an_error() {
    let path = TinyGguf::valid().write("truncated");
    let bytes = std::fs::read(&path).unwrap();
    for keep in [8, 200, bytes.len() / 2, bytes.len() - 100] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        assert!(
            Model::load(&path, WeightMode::Exact).is_err(),
            "a file cut to {keep} of {} bytes loads",
            bytes.len()
        );
    }
}

#[test]
fn a_type_whose_blocks_do_not_divide_the_rows_is_refused() {
    // type ids of the GGUF format
    const GGML_TYPE_Q8_0: u32 = 8;
    const GGML_TYPE_Q4_K: u32 = 12;
    // the writer refuses such a tensor, so the type is changed in the written tensor table:
    // after the name come the dimension count (u32), the dimensions (u64 each) and the type
    let path = TinyGguf::valid().write("type");
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"blk.0.attn_q.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let type_at = at + 4 + 2 * 8;
    assert_eq!(bytes[type_at..type_at + 4], GGML_TYPE_Q8_0.to_le_bytes());
    bytes[type_at..type_at + 4].copy_from_slice(&GGML_TYPE_Q4_K.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let reason = bad_model_reason(Model::load(&path, WeightMode::Exact).map(|_| ()));
    assert!(
        reason.contains("tensor `blk.0.attn_q.weight` is Q4K, whose blocks of 256 do not divide its rows of 128"),
        "{reason}"
    );
}
