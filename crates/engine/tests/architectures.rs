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
    Spec::of(architecture, hidden, heads, kv_heads, GgmlDType::F32)
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

#[test]
fn every_weight_type_runs_in_every_weight_mode() {
    let prompt: Vec<u32> = (0..21).map(|i| (i * 53 + 11) % 256).collect();
    let types = [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];
    for dtype in types {
        let shape = Spec {
            dtype,
            ..spec("qwen2", 256, 4, 2)
        };
        let path = TinyGguf::new(shape).write("weight-type");
        // as stored: candle's quantized matmuls on both sides, which quantize activations to
        // 8 bits, so a difference in attention's summation order can flip a rounding (see
        // reference.rs): the prompt's logits agree closely, greedy runs for a while
        let (exact, _) = Model::load(&path, WeightMode::Exact).unwrap();
        let mut reference = Reference::load(&path, shape.architecture);
        let (stored_diff, ours, theirs) = compare(&exact, &mut reference, &prompt);
        let same = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
        // dequantized, and requantized to 8 bits for our kernel: the same model within rounding
        let (f32_model, _) = Model::load(&path, WeightMode::F32).unwrap();
        let (q8_model, _) = Model::load(&path, WeightMode::Q8).unwrap();
        let (q4_model, _) = Model::load(&path, WeightMode::Q4).unwrap();
        let a = first_logits(&f32_model, &prompt);
        let range = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = |model: &Model| {
            a.iter()
                .zip(&first_logits(model, &prompt))
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let (q8_diff, q4_diff) = (diff(&q8_model), diff(&q4_model));
        println!(
            "{dtype:?}: as stored vs candle {stored_diff:.1e}, greedy identical for {same} of \
             {GREEDY_TOKENS}; 8-bit vs f32 {q8_diff:.1e}, q4 mode vs f32 {q4_diff:.1e} of {range:.2}"
        );
        assert!(
            stored_diff <= 0.5,
            "{dtype:?} as stored: max |Δlogit| {stored_diff}"
        );
        assert!(
            same >= 8,
            "{dtype:?} as stored: greedy tokens differ at {same}"
        );
        assert!(
            q8_diff <= 0.1 * range,
            "{dtype:?}: 8-bit weights differ by {q8_diff} of {range}"
        );
        // Q4_1 through our 4-bit kernel, other types requantized to 8 bits
        assert!(
            q4_diff <= 0.1 * range,
            "{dtype:?}: q4 mode differs by {q4_diff} of {range}"
        );
    }
}

fn first_logits(model: &Model, prompt: &[u32]) -> Vec<f32> {
    let layout = model
        .config()
        .kv_layout(Codec::F32, Codec::F32, 16)
        .unwrap();
    let mut cache = KvCacheManager::new(layout, 8, b"architectures-test").unwrap();
    cache.admit(SeqId(0), prompt).unwrap();
    model
        .forward(
            &mut cache,
            &[BatchItem {
                seq: SeqId(0),
                tokens: prompt,
                logits: Logits::Last,
            }],
        )
        .unwrap()
        .remove(0)
}
