//! The engine against candle-transformers' `quantized_llama` and `quantized_qwen2` on small GGUF
//! files the tests write (random weights): Llama at head_dim 64 and 128 with multi-head, grouped
//! and multi-query attention, Qwen2 with its q/k/v biases and a separate output matrix, each
//! with matrices in F32, Q8_0 and Q4_K. Both sides read the weights dequantized to f32 (candle
//! from a copy of the file in F32, which its matmuls run in f32), so the logits must agree
//! within 1e-3 and 32 greedy tokens must be identical.

mod tiny_gguf;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_qwen2};
use pagedkv::{Codec, KvCacheManager, SeqId};
use pagedkv_engine::sampler::argmax;
use pagedkv_engine::{Architecture, BatchItem, Logits, Model, WeightMode};
use tiny_gguf::{Spec, TinyGguf};

const GREEDY_TOKENS: usize = 32;

fn spec(architecture: &'static str, hidden: usize, heads: usize, kv_heads: usize) -> Spec {
    Spec {
        architecture,
        hidden,
        heads,
        kv_heads,
        head_dim: hidden / heads,
        feed_forward: 512,
        dtype: GgmlDType::F32,
        output_matrix: architecture == "qwen2",
    }
}

/// The test models: (what it is, its shape).
fn models() -> Vec<(&'static str, Spec)> {
    vec![
        ("llama d64 MHA 4/4", spec("llama", 256, 4, 4)),
        ("llama d64 GQA 8/1", spec("llama", 512, 8, 1)),
        ("llama d128 GQA 4/2", spec("llama", 512, 4, 2)),
        ("llama d128 MHA 2/2", spec("llama", 256, 2, 2)),
        ("qwen2 d64 GQA 4/2", spec("qwen2", 256, 4, 2)),
        ("qwen2 d128 GQA 4/1", spec("qwen2", 512, 4, 1)),
    ]
}

/// candle's model of either architecture.
enum Reference {
    Llama(quantized_llama::ModelWeights),
    Qwen2(quantized_qwen2::ModelWeights),
}

impl Reference {
    fn load(path: &std::path::Path, architecture: &str) -> Self {
        let mut file = std::fs::File::open(path).unwrap();
        let ct = Content::read(&mut file).unwrap();
        match architecture {
            "llama" => Self::Llama(
                quantized_llama::ModelWeights::from_gguf(ct, &mut file, &Device::Cpu).unwrap(),
            ),
            "qwen2" => Self::Qwen2(
                quantized_qwen2::ModelWeights::from_gguf(ct, &mut file, &Device::Cpu).unwrap(),
            ),
            other => panic!("no reference for {other}"),
        }
    }

    /// The last token's logits after `tokens` at position `pos`.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Vec<f32> {
        let input = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = match self {
            Self::Llama(m) => m.forward(&input, pos),
            Self::Qwen2(m) => m.forward(&input, pos),
        };
        logits
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }
}

/// (max |Δ logit| after the prompt, our greedy tokens, candle's).
fn compare(model: &Model, reference: &mut Reference, prompt: &[u32]) -> (f32, Vec<u32>, Vec<u32>) {
    let layout = model
        .config()
        .kv_layout(Codec::F32, Codec::F32, 16)
        .unwrap();
    let mut cache = KvCacheManager::new(layout, 16, b"architectures-test").unwrap();
    let seq = SeqId(0);
    cache.admit(seq, prompt).unwrap();
    let step = |cache: &mut KvCacheManager, tokens: &[u32]| {
        model
            .forward(
                cache,
                &[BatchItem {
                    seq,
                    tokens,
                    logits: Logits::Last,
                }],
            )
            .unwrap()
            .remove(0)
    };
    let ours = step(&mut cache, prompt);
    let theirs = reference.forward(prompt, 0);
    let max_diff = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let (mut ours_next, mut theirs_next) = (argmax(&ours), argmax(&theirs));
    let (mut ours_gen, mut theirs_gen) = (Vec::new(), Vec::new());
    for i in 0..GREEDY_TOKENS {
        ours_gen.push(ours_next);
        theirs_gen.push(theirs_next);
        cache.reserve(seq, 1).unwrap();
        ours_next = argmax(&step(&mut cache, &[ours_next]));
        theirs_next = argmax(&reference.forward(&[theirs_next], prompt.len() + i));
    }
    (max_diff, ours_gen, theirs_gen)
}

#[test]
fn every_architecture_and_geometry_matches_candle_in_f32() {
    let prompt: Vec<u32> = (0..21).map(|i| (i * 37 + 5) % 256).collect();
    for (name, shape) in models() {
        for dtype in [GgmlDType::F32, GgmlDType::Q8_0, GgmlDType::Q4K] {
            let file = TinyGguf::new(Spec { dtype, ..shape });
            let ours_path = file.write("architecture");
            let theirs_path = file.dequantized().write("architecture-f32");
            let (model, _) = Model::load(&ours_path, WeightMode::F32).unwrap();
            let expected = match shape.architecture {
                "llama" => Architecture::Llama,
                _ => Architecture::Qwen2,
            };
            assert_eq!(model.config().architecture, expected);
            assert_eq!(model.config().head_dim, shape.head_dim);
            let mut reference = Reference::load(&theirs_path, shape.architecture);
            let (diff, ours, theirs) = compare(&model, &mut reference, &prompt);
            println!("{name} {dtype:?}: max |Δlogit| {diff:.1e}, greedy {ours:?}");
            assert!(diff <= 1e-3, "{name} {dtype:?}: max |Δlogit| {diff}");
            assert_eq!(ours, theirs, "{name} {dtype:?}: greedy tokens differ");
            // a generation that repeats one token would compare little
            let distinct = ours.iter().collect::<std::collections::BTreeSet<_>>().len();
            assert!(distinct > 3, "{name} {dtype:?}: {distinct} distinct tokens");
        }
    }
}
