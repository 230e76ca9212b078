//! Writes small Llama-architecture GGUF files for tests: two layers, random weights, a
//! byte-level BPE tokenizer of 261 tokens. Tests change one thing (a tensor's shape or type, a
//! metadata value) and check what loading the file says.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

pub const LAYERS: usize = 2;
pub const HIDDEN: usize = 128;
pub const HEADS: usize = 2;
pub const KV_HEADS: usize = 1;
pub const FEED_FORWARD: usize = 256;
pub const CONTEXT: usize = 512;

/// A GGUF file's metadata and tensors, in the order they are written.
pub struct TinyGguf {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<(String, QTensor)>,
}

fn tokens() -> Vec<String> {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let mut tokens: Vec<String> = alphabet.into_iter().map(String::from).collect();
    tokens.extend(["he", "ll", "<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
    tokens
}

/// Deterministic weights in [-scale, scale).
fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

pub fn qtensor(shape: &[usize], dtype: GgmlDType, seed: u64) -> QTensor {
    QTensor::quantize(&random(shape, seed, 0.2), dtype).unwrap()
}

fn ones(len: usize) -> QTensor {
    QTensor::quantize(
        &Tensor::ones(len, candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap()
}

/// The shape and storage of a test model.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// `llama` or `qwen2` (which has biases on q/k/v).
    pub architecture: &'static str,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub feed_forward: usize,
    /// The matrices' type (norms and biases are f32).
    pub dtype: GgmlDType,
    /// A separate `output.weight` (else the embedding is the output matrix).
    pub output_matrix: bool,
}

impl Spec {
    /// A model of `heads` query and `kv_heads` key/value heads of `hidden / heads` elements, a
    /// feed-forward of 512, matrices in `dtype`; Qwen2 with a separate output matrix.
    pub fn of(
        architecture: &'static str,
        hidden: usize,
        heads: usize,
        kv_heads: usize,
        dtype: GgmlDType,
    ) -> Spec {
        Spec {
            architecture,
            hidden,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            feed_forward: 512,
            dtype,
            output_matrix: architecture == "qwen2",
        }
    }

    /// The file `valid()` writes: llama, hidden 128, 2/1 heads of 64, Q8_0, tied output.
    pub const SMALL: Spec = Spec {
        architecture: "llama",
        hidden: HIDDEN,
        heads: HEADS,
        kv_heads: KV_HEADS,
        head_dim: HIDDEN / HEADS,
        feed_forward: FEED_FORWARD,
        dtype: GgmlDType::Q8_0,
        output_matrix: false,
    };
}

impl TinyGguf {
    /// A file that loads: matrices in Q8_0, norms in f32.
    pub fn valid() -> Self {
        Self::new(Spec::SMALL)
    }

    /// A file of the given shape with random weights and the 261-token tokenizer.
    pub fn new(spec: Spec) -> Self {
        let arch = spec.architecture;
        let tokens = tokens();
        let vocab = tokens.len();
        let token_types: Vec<Value> = tokens
            .iter()
            .map(|t| Value::I32(if t.starts_with("<|") { 3 } else { 1 }))
            .collect();
        let eos = tokens.iter().position(|t| t == "<|endoftext|>").unwrap();
        let key = |k: &str| format!("{arch}.{k}");
        let mut metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(arch.into())),
            (key("block_count"), Value::U32(LAYERS as u32)),
            (key("embedding_length"), Value::U32(spec.hidden as u32)),
            (
                key("feed_forward_length"),
                Value::U32(spec.feed_forward as u32),
            ),
            (key("attention.head_count"), Value::U32(spec.heads as u32)),
            (
                key("attention.head_count_kv"),
                Value::U32(spec.kv_heads as u32),
            ),
            (key("context_length"), Value::U32(CONTEXT as u32)),
            (key("rope.freq_base"), Value::F32(10_000.0)),
            (
                key("rope.dimension_count"),
                Value::U32(spec.head_dim as u32),
            ),
            (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        ];
        if arch == "llama" {
            metadata.push((key("vocab_size"), Value::U32(vocab as u32)));
        }
        if spec.head_dim * spec.heads != spec.hidden {
            metadata.push((
                key("attention.key_length"),
                Value::U32(spec.head_dim as u32),
            ));
            metadata.push((
                key("attention.value_length"),
                Value::U32(spec.head_dim as u32),
            ));
        }
        metadata.extend(
            [
                ("tokenizer.ggml.model", Value::String("gpt2".into())),
                ("tokenizer.ggml.pre", Value::String("gpt2".into())),
                (
                    "tokenizer.ggml.tokens",
                    Value::Array(tokens.iter().cloned().map(Value::String).collect()),
                ),
                (
                    "tokenizer.ggml.merges",
                    Value::Array(vec![
                        Value::String("h e".into()),
                        Value::String("l l".into()),
                    ]),
                ),
                ("tokenizer.ggml.token_type", Value::Array(token_types)),
                ("tokenizer.ggml.eos_token_id", Value::U32(eos as u32)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
        );
        let h = spec.hidden;
        let (q, kv, ff) = (
            spec.heads * spec.head_dim,
            spec.kv_heads * spec.head_dim,
            spec.feed_forward,
        );
        let mut tensors = Vec::new();
        let mut seed = 1;
        let mut matrix = |name: String, rows: usize, cols: usize| {
            seed += 1;
            (name, qtensor(&[rows, cols], spec.dtype, seed))
        };
        for i in 0..LAYERS {
            let name = |n: &str| format!("blk.{i}.{n}.weight");
            tensors.push((name("attn_norm"), ones(h)));
            tensors.push(matrix(name("attn_q"), q, h));
            tensors.push(matrix(name("attn_k"), kv, h));
            tensors.push(matrix(name("attn_v"), kv, h));
            tensors.push(matrix(name("attn_output"), h, q));
            tensors.push((name("ffn_norm"), ones(h)));
            tensors.push(matrix(name("ffn_gate"), ff, h));
            tensors.push(matrix(name("ffn_up"), ff, h));
            tensors.push(matrix(name("ffn_down"), h, ff));
            if arch == "qwen2" {
                for (n, len) in [("attn_q", q), ("attn_k", kv), ("attn_v", kv)] {
                    let bias = QTensor::quantize(
                        &random(&[len], 100 + i as u64 * 3 + len as u64, 0.5),
                        GgmlDType::F32,
                    )
                    .unwrap();
                    tensors.push((format!("blk.{i}.{n}.bias"), bias));
                }
            }
        }
        tensors.push(matrix("token_embd.weight".into(), vocab, h));
        if spec.output_matrix {
            tensors.push(matrix("output.weight".into(), vocab, h));
        }
        tensors.push(("output_norm.weight".into(), ones(h)));
        Self { metadata, tensors }
    }

    /// The same file with every tensor dequantized to f32 (what candle reads in f32 mode).
    pub fn dequantized(&self) -> Self {
        let tensors = self
            .tensors
            .iter()
            .map(|(n, t)| {
                let values = t.dequantize(&Device::Cpu).unwrap();
                (
                    n.clone(),
                    QTensor::quantize(&values, GgmlDType::F32).unwrap(),
                )
            })
            .collect();
        Self {
            metadata: self.metadata.clone(),
            tensors,
        }
    }

    pub fn set(&mut self, key: &str, value: Value) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        self
    }

    pub fn replace(&mut self, name: &str, tensor: QTensor) -> &mut Self {
        let entry = self.tensors.iter_mut().find(|(n, _)| n == name).unwrap();
        entry.1 = tensor;
        self
    }

    pub fn remove(&mut self, name: &str) -> &mut Self {
        self.tensors.retain(|(n, _)| n != name);
        self
    }

    /// Writes the file under the test target's temporary directory; returns its path.
    pub fn write(&self, name: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tiny-gguf");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!(
            "{name}-{}-{}.gguf",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let metadata: Vec<(&str, &Value)> =
            self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> =
            self.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut file = std::fs::File::create(&path).unwrap();
        gguf_file::write(&mut file, &metadata, &tensors).unwrap();
        path
    }
}
