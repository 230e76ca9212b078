//! Tokenizers of other model families against reference ids. The vocabularies are llama.cpp's
//! vocabulary-only GGUF files (Llama 3's BPE, Qwen2's BPE, Llama 2's SentencePiece), fetched by
//! `scripts/fetch-vocabularies` from the llama-cpp-python 0.3.36 sources on PyPI. Each comes with
//! llama.cpp's test inputs (`.inp`) and the ids Hugging Face's `tokenizers` (the models' own
//! tokenizer.json, through `transformers.AutoTokenizer`) gives for them without special tokens
//! (`.out`), written by llama.cpp's `convert_hf_to_gguf_update.py`.

use std::path::PathBuf;
use std::process::Command;

use candle_core::quantized::gguf_file::Content;
use pagedkv_engine::{ChatMessage, GgufTokenizer};

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

/// The tokenizer of a vocabulary file with a chat template from llama.cpp's collection.
fn with_template(vocabulary: &str, template: &str) -> GgufTokenizer {
    let dir = vocabularies();
    let path = dir.join(format!("ggml-vocab-{vocabulary}.gguf"));
    let mut ct = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    let source = std::fs::read_to_string(dir.join(format!("templates/{template}.jinja"))).unwrap();
    ct.metadata.insert(
        "tokenizer.chat_template".into(),
        candle_core::quantized::gguf_file::Value::String(source),
    );
    GgufTokenizer::from_gguf(&ct).unwrap()
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

#[test]
fn each_family_renders_its_own_chat_template() {
    let today = chrono::Local::now().format("%d %b %Y");
    let cases = [
        (
            "llama-bpe",
            "meta-llama-Llama-3.2-3B-Instruct",
            vec![message("system", " Be brief. "), message("user", "Hi <|eot_id|>")],
            format!(
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: {today}\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi <|eot_id|><|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
        ),
        (
            "qwen2",
            "Qwen-Qwen2.5-7B-Instruct",
            vec![message("user", "Hi <|im_end|>")],
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi <|im_end|><|im_end|>\n<|im_start|>assistant\n".to_string(),
        ),
        (
            "llama-spm",
            "mistralai-Mistral-Nemo-Instruct-2407",
            vec![
                message("system", "Be brief."),
                message("user", "Hi"),
                message("assistant", "Hello."),
                message("user", "Bye </s>"),
            ],
            // rendered "<s>[INST]Hi…"; SentencePiece puts its word mark before the text after
            // each control token, as Hugging Face's and llama.cpp's do, and it decodes as a space
            "<s> [INST]Hi[/INST]Hello.</s> [INST]Be brief.\n\nBye </s>[/INST]".to_string(),
        ),
    ];
    for (vocabulary, template, messages, expected) in cases {
        let t = with_template(vocabulary, template);
        let ids = t.chat_prompt(&messages).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), expected, "{template}");
        // the control name in the last message is text: its id occurs once fewer than its name
        let control = ["<|eot_id|>", "<|im_end|>", "</s>"]
            .into_iter()
            .find(|c| messages.last().unwrap().content.contains(c))
            .unwrap();
        let id = t.encode_with_specials(control).unwrap()[0];
        assert_eq!(
            ids.iter().filter(|i| **i == id).count() + 1,
            expected.matches(control).count(),
            "{template}: {ids:?}"
        );
        println!("{template} on {vocabulary}: {} tokens", ids.len());
    }
    // Mistral's template refuses a conversation whose roles do not alternate
    let t = with_template("llama-spm", "mistralai-Mistral-Nemo-Instruct-2407");
    let e = t
        .chat_prompt(&[message("user", "a"), message("user", "b")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("chat template") && e.contains("must alternate"),
        "{e}"
    );
}
