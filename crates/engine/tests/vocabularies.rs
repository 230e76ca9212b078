//! Tokenizers of other model families against reference ids. The vocabularies are llama.cpp's
//! vocabulary-only GGUF files (Llama 3's BPE, Qwen2's BPE, Llama 2's SentencePiece), fetched by
//! `scripts/fetch-vocabularies` from the llama-cpp-python 0.3.36 sources on PyPI. Each comes with
//! llama.cpp's test inputs (`.inp`) and the ids Hugging Face's `tokenizers` (the models' own
//! tokenizer.json, through `transformers.AutoTokenizer`) gives for them without special tokens
//! (`.out`), written by llama.cpp's `convert_hf_to_gguf_update.py`.

use std::path::PathBuf;
use std::process::Command;

use candle_core::quantized::gguf_file::Content;
use pagedkv_engine::GgufTokenizer;

/// The fetched directory (the script runs once per machine; later calls return at once).
pub fn vocabularies() -> PathBuf {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/fetch-vocabularies"
    );
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("run fetch-vocabularies");
    assert!(
        out.status.success(),
        "scripts/fetch-vocabularies failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn load(name: &str) -> (GgufTokenizer, Vec<(String, Vec<u32>)>) {
    let dir = vocabularies();
    let path = dir.join(format!("ggml-vocab-{name}.gguf"));
    let ct = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    let tokenizer = GgufTokenizer::from_gguf(&ct).unwrap();
    let inputs = std::fs::read_to_string(path.with_extension("gguf.inp")).unwrap();
    let outputs = std::fs::read_to_string(path.with_extension("gguf.out")).unwrap();
    let texts: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
    let ids: Vec<Vec<u32>> = outputs
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    // the inputs end with a separator, the outputs have one line per input
    let texts = &texts[..ids.len()];
    assert!(texts.len() >= 30, "{name}: {} cases", texts.len());
    (
        tokenizer,
        texts.iter().map(|t| t.to_string()).zip(ids).collect(),
    )
}

fn check(name: &str) {
    let (tokenizer, cases) = load(name);
    let mut wrong = Vec::new();
    for (text, expected) in &cases {
        let ids = tokenizer.encode(text).unwrap();
        if &ids != expected {
            wrong.push(format!("{text:?}: ours {ids:?}, reference {expected:?}"));
        }
    }
    println!(
        "{name}: {} of {} cases identical",
        cases.len() - wrong.len(),
        cases.len()
    );
    assert!(wrong.is_empty(), "{name}:\n{}", wrong.join("\n"));
}

#[test]
fn llama3_bpe_matches_the_reference_ids() {
    check("llama-bpe");
}

#[test]
fn qwen2_bpe_matches_the_reference_ids() {
    check("qwen2");
}

#[test]
fn llama_sentencepiece_matches_the_reference_ids() {
    check("llama-spm");
}

#[test]
fn text_round_trips_and_control_tokens_are_special_only_when_asked() {
    for (name, bos, control) in [
        ("llama-bpe", Some(128000), "<|eot_id|>"),
        ("qwen2", None, "<|im_end|>"),
        ("llama-spm", Some(1), "</s>"),
    ] {
        let (tokenizer, cases) = load(name);
        for (text, expected) in &cases {
            assert_eq!(
                &tokenizer.decode(expected, false).unwrap(),
                text,
                "{name}: decoding the reference ids of {text:?}"
            );
        }
        assert_eq!(tokenizer.bos(), bos, "{name}");
        let prompt = tokenizer.encode_prompt("Hello").unwrap();
        assert_eq!(prompt.first().copied() == bos, bos.is_some(), "{name}");
        let special = tokenizer.encode_with_specials(control).unwrap();
        assert_eq!(special.len(), 1, "{name}: {control} is one token");
        assert!(
            tokenizer.is_stop(special[0]),
            "{name}: {control} ends a turn"
        );
        assert!(
            tokenizer.encode(control).unwrap().len() > 1,
            "{name}: {control} as text"
        );
    }
}
