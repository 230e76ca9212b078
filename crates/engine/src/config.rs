//! A model's hyper-parameters, read from GGUF metadata, and the checks that every tensor the
//! forward pass reads exists with the shape they imply.
//!
//! Two architectures share one forward pass (DESIGN §9): `llama` (Llama 2/3, Mistral, TinyLlama,
//! SmolLM) and `qwen2` (the same block with biases on q/k/v and RoPE over halves). Keys are read
//! under the architecture's own prefix (`llama.block_count`, `qwen2.block_count`), as llama.cpp
//! writes them.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file;
use pagedkv::{Codec, KvLayout, LayerOverride, LayoutSpec};

use crate::error::{candle_message, EngineError, Result};

/// The GGUF architectures the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `llama`: Llama 2/3, Mistral, TinyLlama, SmolLM.
    Llama,
    /// `qwen2`: Qwen2 and Qwen2.5 (biases on the q/k/v projections).
    Qwen2,
}

impl Architecture {
    /// The name in `general.architecture`, and the prefix of the model's metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }

    /// Which pairs of a head's elements RoPE rotates: llama.cpp's "norm" type for Llama (its
    /// converter permutes q/k rows so pairs are adjacent), "neox" for Qwen2.
    pub fn rope_style(self) -> RopeStyle {
        match self {
            Architecture::Llama => RopeStyle::Interleaved,
            Architecture::Qwen2 => RopeStyle::Halves,
        }
    }
}

/// Which pairs of a head's elements are rotated together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1).
    Interleaved,
    /// Pairs (i, i + head_dim/2).
    Halves,
}

/// How RoPE's positions or frequencies are stretched beyond the trained context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Positions as they are.
    None,
    /// Positions divided by the factor (`rope.scaling.type = linear`).
    Linear(f32),
    /// Each frequency divided by its own factor, from the file's `rope_freqs.weight` (Llama 3.1
    /// and later write their scaling this way).
    FrequencyFactors,
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelConfig {
    /// The architecture.
    pub architecture: Architecture,
    /// Transformer layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// RoPE frequency base.
    pub rope_base: f32,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Trained context length.
    pub context_len: usize,
    /// The q/k/v projections add a bias (always for qwen2; for llama when the file has them).
    pub attention_bias: bool,
}

pub(crate) fn bad_model(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::BadModel {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl ModelConfig {
    /// Reads the hyper-parameters of a GGUF file (metadata only, no weights).
    pub fn read(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let ct = gguf_file::Content::read(&mut file).map_err(|e| {
            bad_model(
                path,
                format!("not a readable GGUF file: {}", candle_message(&e)),
            )
        })?;
        Self::from_gguf(path, &ct)
    }

    /// The hyper-parameters in parsed GGUF metadata (of the file at `path`, named in errors):
    /// a supported architecture, and every value of the type and range it must have.
    pub fn from_gguf(path: &Path, ct: &gguf_file::Content) -> Result<Self> {
        let arch = ct
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let architecture = match arch.as_deref() {
            Some("llama") => Architecture::Llama,
            Some("qwen2") => Architecture::Qwen2,
            other => {
                return Err(bad_model(
                    path,
                    format!("architecture {other:?} is not supported (supported: llama, qwen2)"),
                ))
            }
        };
        let meta = Metadata {
            path,
            ct,
            prefix: architecture.name(),
        };
        let heads = meta.uint("attention.head_count")?;
        let hidden = meta.uint("embedding_length")?;
        if heads == 0 {
            return Err(bad_model(path, "the head count is zero"));
        }
        // absent: multi-head attention, as llama.cpp reads it
        let kv_heads = meta
            .optional_uint("attention.head_count_kv")?
            .unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(bad_model(
                path,
                "the head count is not a multiple of the kv head count",
            ));
        }
        // Mistral Nemo and others state a head size other than hidden / heads
        let head_dim = match meta.optional_uint("attention.key_length")? {
            Some(d) => d,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(bad_model(
                    path,
                    "embedding length is not a multiple of the head count",
                ))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad_model(
                path,
                format!("the head size {head_dim} is not a positive even number"),
            ));
        }
        if let Some(v) = meta.optional_uint("attention.value_length")? {
            if v != head_dim {
                return Err(bad_model(
                    path,
                    format!("value heads of {v} elements differ from key heads of {head_dim}"),
                ));
            }
        }
        if let Some(rotated) = meta.optional_uint("rope.dimension_count")? {
            if rotated != head_dim {
                return Err(bad_model(
                    path,
                    format!("RoPE over {rotated} of {head_dim} elements per head is not supported"),
                ));
            }
        }
        // absent: llama's default base; present, it must be a number
        let rope_base = meta.optional_float("rope.freq_base")?.unwrap_or(10_000.0);
        if !(rope_base.is_finite() && rope_base > 0.0) {
            return Err(bad_model(path, "the RoPE base is not a positive number"));
        }
        let rope_scaling = meta.rope_scaling()?;
        // the vocabulary is the embedding's rows (Llama 3 and Qwen2 files carry no vocab_size)
        let embedding_rows = ct
            .tensor_infos
            .get("token_embd.weight")
            .and_then(|t| t.shape.dims().first().copied());
        let vocab = match meta.optional_uint("vocab_size")? {
            Some(v) => v,
            None => embedding_rows
                .ok_or_else(|| bad_model(path, "missing tensor `token_embd.weight`"))?,
        };
        let attention_bias = architecture == Architecture::Qwen2
            || ct.tensor_infos.contains_key("blk.0.attn_q.bias");
        let config = ModelConfig {
            architecture,
            layers: meta.uint("block_count")?,
            heads,
            kv_heads,
            head_dim,
            hidden,
            vocab,
            rope_base,
            rope_scaling,
            rms_eps: meta.float("attention.layer_norm_rms_epsilon")?,
            context_len: meta.uint("context_length")?,
            attention_bias,
        };
        for (name, value) in [
            ("block_count", config.layers),
            ("vocab_size", config.vocab),
            ("context_length", config.context_len),
            ("embedding_length", config.hidden),
        ] {
            if value == 0 {
                return Err(bad_model(path, format!("`{}` is zero", meta.key(name))));
            }
        }
        if !(config.rms_eps.is_finite() && config.rms_eps >= 0.0) {
            return Err(bad_model(path, "the RMSNorm epsilon is not a number ≥ 0"));
        }
        Ok(config)
    }

    /// Checks that every tensor the forward pass reads exists with the shape the metadata
    /// implies, before any weight is read: a file whose shapes disagree is an error, never an
    /// assertion or silent garbage later.
    pub fn check_tensors(&self, path: &Path, ct: &gguf_file::Content) -> Result<()> {
        let dims = |name: &str| -> Result<Vec<usize>> {
            ct.tensor_infos
                .get(name)
                .map(|t| t.shape.dims().to_vec())
                .ok_or_else(|| bad_model(path, format!("missing tensor `{name}`")))
        };
        let expect = |name: &str, want: &[usize]| -> Result<()> {
            let got = dims(name)?;
            if got != want {
                return Err(bad_model(
                    path,
                    format!("tensor `{name}` has shape {got:?}; the metadata implies {want:?}"),
                ));
            }
            // a quantized type stores rows in whole blocks
            let dtype = ct.tensor_infos[name].ggml_dtype;
            let row = want[want.len() - 1];
            if !row.is_multiple_of(dtype.block_size()) {
                return Err(bad_model(
                    path,
                    format!(
                        "tensor `{name}` is {dtype:?}, whose blocks of {} do not divide its rows of {row}",
                        dtype.block_size()
                    ),
                ));
            }
            Ok(())
        };
        let (h, q, kv) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        );
        // the feed-forward width is read from the first gate and must agree everywhere
        let ff = match dims("blk.0.ffn_gate.weight")?.as_slice() {
            [ff, cols] if *cols == h && *ff > 0 => *ff,
            other => {
                return Err(bad_model(
                    path,
                    format!(
                        "tensor `blk.0.ffn_gate.weight` has shape {other:?}; expected [n, {h}]"
                    ),
                ))
            }
        };
        for i in 0..self.layers {
            let name = |n: &str| format!("blk.{i}.{n}.weight");
            expect(&name("attn_norm"), &[h])?;
            expect(&name("attn_q"), &[q, h])?;
            expect(&name("attn_k"), &[kv, h])?;
            expect(&name("attn_v"), &[kv, h])?;
            expect(&name("attn_output"), &[h, q])?;
            expect(&name("ffn_norm"), &[h])?;
            expect(&name("ffn_gate"), &[ff, h])?;
            expect(&name("ffn_up"), &[ff, h])?;
            expect(&name("ffn_down"), &[h, ff])?;
            if self.attention_bias {
                let bias = |n: &str| format!("blk.{i}.{n}.bias");
                expect(&bias("attn_q"), &[q])?;
                expect(&bias("attn_k"), &[kv])?;
                expect(&bias("attn_v"), &[kv])?;
            }
        }
        // a bias the forward pass would not add (llama.cpp reads some on attn_output or the
        // feed-forward of other models) would make every logit wrong without a word
        let read_bias = |name: &str| {
            self.attention_bias
                && ["attn_q", "attn_k", "attn_v"]
                    .iter()
                    .any(|m| name.ends_with(&format!(".{m}.bias")))
        };
        if let Some(name) = ct
            .tensor_infos
            .keys()
            .filter(|n| n.ends_with(".bias"))
            .find(|n| !read_bias(n))
        {
            return Err(bad_model(
                path,
                format!("tensor `{name}` is a bias this engine does not apply"),
            ));
        }
        expect("token_embd.weight", &[self.vocab, h])?;
        expect("output_norm.weight", &[h])?;
        if ct.tensor_infos.contains_key("output.weight") {
            expect("output.weight", &[self.vocab, h])?;
        }
        if self.rope_scaling == RopeScaling::FrequencyFactors {
            expect("rope_freqs.weight", &[self.head_dim / 2])?;
        }
        Ok(())
    }

    /// The KV layout of this model for the given codecs and block size.
    pub fn kv_layout(
        &self,
        key_codec: Codec,
        value_codec: Codec,
        block_size: usize,
    ) -> Result<KvLayout> {
        self.kv_layout_with(key_codec, value_codec, block_size, Vec::new())
    }

    /// The KV layout with other codecs on some layers (a later override wins on shared layers).
    pub fn kv_layout_with(
        &self,
        key_codec: Codec,
        value_codec: Codec,
        block_size: usize,
        layer_overrides: Vec<LayerOverride>,
    ) -> Result<KvLayout> {
        Ok(KvLayout::new(LayoutSpec {
            layers: self.layers,
            kv_heads: self.kv_heads,
            query_heads: self.heads,
            head_dim: self.head_dim,
            block_size,
            key_codec,
            value_codec,
            layer_overrides,
            sink_tokens: 0,
            recent_tokens: 0,
            key_norm: None,
            key_split: None,
        })?)
    }
}

/// Typed reads of one architecture's metadata keys, each error naming the key.
struct Metadata<'a> {
    path: &'a Path,
    ct: &'a gguf_file::Content,
    prefix: &'static str,
}

impl Metadata<'_> {
    fn key(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    fn optional(&self, name: &str) -> Option<&gguf_file::Value> {
        self.ct.metadata.get(&self.key(name))
    }

    fn uint(&self, name: &str) -> Result<usize> {
        self.optional_uint(name)?
            .ok_or_else(|| bad_model(self.path, format!("missing metadata `{}`", self.key(name))))
    }

    fn optional_uint(&self, name: &str) -> Result<Option<usize>> {
        self.optional(name)
            .map(|v| {
                v.to_u32()
                    .map(|v| v as usize)
                    .map_err(|_| bad_model(self.path, format!("`{}` is not a u32", self.key(name))))
            })
            .transpose()
    }

    fn float(&self, name: &str) -> Result<f32> {
        self.optional_float(name)?
            .ok_or_else(|| bad_model(self.path, format!("missing metadata `{}`", self.key(name))))
    }

    fn optional_float(&self, name: &str) -> Result<Option<f32>> {
        self.optional(name)
            .map(|v| {
                v.to_f32().map_err(|_| {
                    bad_model(self.path, format!("`{}` is not an f32", self.key(name)))
                })
            })
            .transpose()
    }

    /// RoPE scaling as llama.cpp reads it: `rope.scaling.type` with `rope.scaling.factor`, the
    /// older `rope.scale_linear`, or frequency factors in a `rope_freqs.weight` tensor.
    fn rope_scaling(&self) -> Result<RopeScaling> {
        let kind = match self.optional("rope.scaling.type") {
            None => None,
            Some(v) => Some(v.to_string().cloned().map_err(|_| {
                bad_model(
                    self.path,
                    format!("`{}` is not a string", self.key("rope.scaling.type")),
                )
            })?),
        };
        let factor = match self.optional_float("rope.scaling.factor")? {
            Some(f) => Some(f),
            None => self.optional_float("rope.scale_linear")?,
        };
        if self.ct.tensor_infos.contains_key("rope_freqs.weight") {
            return match kind.as_deref() {
                None | Some("none") | Some("linear") if factor.unwrap_or(1.0) == 1.0 => {
                    Ok(RopeScaling::FrequencyFactors)
                }
                _ => Err(bad_model(
                    self.path,
                    "RoPE frequency factors together with another scaling are not supported",
                )),
            };
        }
        match (kind.as_deref(), factor) {
            (None | Some("none"), None) => Ok(RopeScaling::None),
            (None | Some("linear"), Some(f)) if f.is_finite() && f > 0.0 => {
                Ok(if f == 1.0 {
                    RopeScaling::None
                } else {
                    RopeScaling::Linear(f)
                })
            }
            (Some("none"), Some(_)) => Ok(RopeScaling::None),
            (None | Some("linear"), Some(f)) => Err(bad_model(
                self.path,
                format!("the RoPE scaling factor {f} is not a positive number"),
            )),
            (Some("linear"), None) => Err(bad_model(
                self.path,
                format!("linear RoPE scaling without `{}`", self.key("rope.scaling.factor")),
            )),
            (Some(other), _) => Err(bad_model(
                self.path,
                format!("RoPE scaling `{other}` is not supported (supported: none, linear, frequency factors)"),
            )),
        }
    }
}
