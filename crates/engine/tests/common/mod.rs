//! Shared by the oracle tests: run our model and candle-transformers' `quantized_llama` side by
//! side on the same prompts.

#![allow(dead_code)]

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use pagedkv::{Codec, KvCacheManager, SeqId};
use pagedkv_engine::fetch::ensure_model;
use pagedkv_engine::{BatchItem, Logits, Model, WeightMode};

pub const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "In 1905, Albert Einstein published four papers that changed physics. The first one explained",
];

pub use pagedkv_engine::sampler::argmax;

/// Per prompt: max |Δ logit| on the prompt's last token, and both 64-token greedy continuations.
pub struct Comparison {
    pub max_diff: f32,
    pub ours: Vec<u32>,
    pub theirs: Vec<u32>,
    pub text: String,
}

pub fn compare(mode: WeightMode, steps: usize) -> Vec<Comparison> {
    let path = ensure_model(None).expect("model");
    let (model, tokenizer) = Model::load(&path, mode).unwrap();
    let layout = model
        .config()
        .kv_layout(Codec::F32, Codec::F32, 16)
        .unwrap();
    let mut cache = KvCacheManager::new(layout, 64, b"reference-test").unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut reference = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    let mut run = |tokens: &[u32], pos: usize| -> Vec<f32> {
        let input = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        reference
            .forward(&input, pos)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let mut results = Vec::new();
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let ids = tokenizer.encode_with_specials(prompt).unwrap();
        let seq = SeqId(i as u64);
        cache.admit(seq, &ids).unwrap();
        let ours = model
            .forward(
                &mut cache,
                &[BatchItem {
                    seq,
                    tokens: &ids,
                    logits: Logits::Last,
                }],
            )
            .unwrap()
            .remove(0);
        let theirs = run(&ids, 0);
        let max_diff = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let (mut ours_next, mut theirs_next) = (argmax(&ours), argmax(&theirs));
        let (mut ours_gen, mut theirs_gen) = (Vec::new(), Vec::new());
        for step in 0..steps {
            ours_gen.push(ours_next);
            theirs_gen.push(theirs_next);
            cache.reserve(seq, 1).unwrap();
            let l = model
                .forward(
                    &mut cache,
                    &[BatchItem {
                        seq,
                        tokens: &[ours_next],
                        logits: Logits::Last,
                    }],
                )
                .unwrap();
            ours_next = argmax(&l[0]);
            theirs_next = argmax(&run(&[theirs_next], ids.len() + step));
        }
        cache.free(seq).unwrap();
        let text = tokenizer.decode(&ours_gen, false).unwrap();
        println!(
            "prompt {i}: {} tokens, max |Δlogit| = {max_diff:.2e}, continuation {text:?}",
            ids.len()
        );
        results.push(Comparison {
            max_diff,
            ours: ours_gen,
            theirs: theirs_gen,
            text,
        });
    }
    results
}
