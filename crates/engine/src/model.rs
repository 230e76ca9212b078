//! A Llama-family model (GGUF architectures `llama` and `qwen2`) whose attention reads the paged
//! cache (DESIGN §9).
//!
//! Straight-line Llama: embedding → layers × [RMSNorm → Q/K/V (+ bias on Qwen2) → RoPE (the
//! architecture's pairing, see [`crate::config::RopeStyle`]) → K/V into the cache → paged
//! attention → output projection → residual → RMSNorm → SwiGLU → residual] → RMSNorm → output
//! matrix (or the embedding, when tied). Activations are plain `Vec<f32>` rows of all tokens of
//! the batch; candle does the quantized matrix products.
//!
//! One forward serves a batch of sequences each bringing any number of new tokens (prefill
//! chunks and single decode tokens together): the matmuls run over all rows at once, attention
//! per token over its own sequence's blocks.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use pagedkv::attention::{self, AttentionPath, Context, Dispatch, Prefetch, Scratch, Simd};
use pagedkv::{KvCacheManager, SeqId};
use rayon::prelude::*;

use crate::config::{bad_model, ModelConfig, RopeScaling};
use crate::error::{candle_message, EngineError, Result};
use crate::fingerprint::ModelFingerprint;
use crate::qgemm::{
    matmul_many, swiglu, GroupedWeights, Q4Weights, QActivations, QWeights, ShapeError,
};
use crate::rope::{Rope, Stretch};
use crate::tokenizer::GgufTokenizer;

/// How the weight matrices are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightMode {
    /// As stored in the file (Q4_1 here), through candle's quantized kernels: the reference mode
    /// that matches candle-transformers' `quantized_llama` on the same file.
    Exact,
    /// Dequantized to f32 once at load: no activation quantization inside matmuls (for `eval`).
    F32,
    /// Requantized at load to 8 bits per weight (f32 scale per 32) for our kernels (AVX-512
    /// VNNI, AVX2, scalar), which reuse each weight across the rows of a batch (see `qgemm`);
    /// a matrix whose shape they cannot tile (outputs not a multiple of 16) stays as stored.
    Q8,
    /// Q4_1 matrices read as stored by our kernels (`qgemm::Q4Weights`): the file's own
    /// weights, at 0.625 bytes each; matrices of another type (the Q8_0 embedding that doubles
    /// as output) as in `Q8`. The default of every command but `eval` and `calibrate`.
    Q4,
}

/// Sees every layer's queries and keys after RoPE: `(layer, queries, keys)`.
pub type LayerObserver<'a> = dyn FnMut(usize, &[f32], &[f32]) + 'a;

/// A linear layer: candle's matmul on weights as stored or dequantized, or one of our kernels.
enum Linear {
    Candle(QMatMul),
    Q8(QWeights),
    Q4(Q4Weights),
}

impl Linear {
    /// Our kernel's matrix, if this layer has one.
    fn grouped(&self) -> Option<&dyn GroupedWeights> {
        match self {
            Linear::Candle(_) => None,
            Linear::Q8(w) => Some(w),
            Linear::Q4(w) => Some(w),
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    /// Biases of the q, k and v projections (Qwen2), added after the matmuls.
    qkv_bias: Option<[Vec<f32>; 3]>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

thread_local! {
    /// The attention buffers of each thread running a batch's queries.
    static ATTENTION_SCRATCH: std::cell::RefCell<Scratch> = Default::default();
}

/// The loaded model.
pub struct Model {
    config: ModelConfig,
    embedding: Vec<f32>,
    layers: Vec<Layer>,
    rope: Rope,
    out_norm: Vec<f32>,
    output: Linear,
    mode: WeightMode,
    /// How attention runs: the instruction sets it may use (the widest this CPU has by
    /// default), the arithmetic it reads compressed pages with, the pages it prefetches.
    dispatch: Dispatch,
    device: Device,
    stop_tokens: Vec<u32>,
    fingerprint: ModelFingerprint,
}

/// Which logits a batch item wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk that is not the prompt's end).
    None,
    /// The last new token's (prefill end, decode).
    Last,
    /// Every new token's (evaluation).
    All,
}

/// New tokens of one sequence for one forward. Room for them must be reserved in the cache.
#[derive(Debug, Clone, Copy)]
pub struct BatchItem<'a> {
    /// The sequence.
    pub seq: SeqId,
    /// Tokens following the sequence's committed ones.
    pub tokens: &'a [u32],
    /// Which logits to return.
    pub logits: Logits,
}

impl Model {
    /// Loads model and tokenizer from a GGUF file.
    pub fn load(path: &Path, mode: WeightMode) -> Result<(Self, GgufTokenizer)> {
        let io = |source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let ct = gguf_file::Content::read(&mut file).map_err(|e| {
            bad_model(
                path,
                format!("not a readable GGUF file: {}", candle_message(&e)),
            )
        })?;
        let config = ModelConfig::from_gguf(path, &ct)?;
        config.check_tensors(path, &ct)?;
        let tokenizer = GgufTokenizer::from_gguf(&ct)?;
        // a token the embedding has no row for would be refused at every prompt that holds it
        if tokenizer.vocab_size() > config.vocab {
            return Err(bad_model(
                path,
                format!(
                    "the tokenizer has {} tokens; the model's vocabulary is {}",
                    tokenizer.vocab_size(),
                    config.vocab
                ),
            ));
        }
        let fingerprint = ModelFingerprint::of(&ct);

        let device = Device::Cpu;
        let mut tensor = |name: &str| -> Result<QTensor> {
            if !ct.tensor_infos.contains_key(name) {
                return Err(bad_model(path, format!("missing tensor `{name}`")));
            }
            Ok(ct.tensor(&mut file, name, &device)?)
        };
        let vector = |q: QTensor| -> Result<Vec<f32>> {
            Ok(q.dequantize(&device)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let matrix = |q: QTensor| -> Result<Linear> {
            let (n, k) = q.shape().dims2()?;
            // a shape a kernel cannot tile (an odd vocabulary): candle's matmul on the weights
            // as stored
            let or_as_stored =
                |kernel: std::result::Result<Linear, ShapeError>, q: QTensor| match kernel {
                    Ok(linear) => Ok(linear),
                    Err(ShapeError::Weights { .. }) => {
                        Ok(Linear::Candle(QMatMul::from_qtensor(q)?))
                    }
                    Err(e) => Err(bad_model(path, e.to_string())),
                };
            let requantized = |q: &QTensor| -> Result<_> {
                let w = q.dequantize(&device)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(QWeights::new(&w, n, k).map(Linear::Q8))
            };
            Ok(match mode {
                WeightMode::Exact => Linear::Candle(QMatMul::from_qtensor(q)?),
                WeightMode::F32 => Linear::Candle(QMatMul::Tensor(q.dequantize(&device)?)),
                WeightMode::Q4 if q.dtype() == GgmlDType::Q4_1 => {
                    let kernel = Q4Weights::from_q4_1(&q.data()?, n, k).map(Linear::Q4);
                    or_as_stored(kernel, q)?
                }
                WeightMode::Q8 | WeightMode::Q4 => or_as_stored(requantized(&q)?, q)?,
            })
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let name = |n: &str| format!("blk.{i}.{n}.weight");
            let qkv_bias = if config.attention_bias {
                let bias = |n: &str| format!("blk.{i}.{n}.bias");
                Some([
                    vector(tensor(&bias("attn_q"))?)?,
                    vector(tensor(&bias("attn_k"))?)?,
                    vector(tensor(&bias("attn_v"))?)?,
                ])
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: vector(tensor(&name("attn_norm"))?)?,
                qkv_bias,
                wq: matrix(tensor(&name("attn_q"))?)?,
                wk: matrix(tensor(&name("attn_k"))?)?,
                wv: matrix(tensor(&name("attn_v"))?)?,
                wo: matrix(tensor(&name("attn_output"))?)?,
                ffn_norm: vector(tensor(&name("ffn_norm"))?)?,
                w_gate: matrix(tensor(&name("ffn_gate"))?)?,
                w_up: matrix(tensor(&name("ffn_up"))?)?,
                w_down: matrix(tensor(&name("ffn_down"))?)?,
            });
        }
        let embedding_q = tensor("token_embd.weight")?;
        let embedding = embedding_q
            .dequantize(&device)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if embedding.len() != config.vocab * config.hidden {
            return Err(bad_model(path, "token_embd has the wrong shape"));
        }
        // No `output.weight` in this file: the embedding matrix doubles as the output matrix.
        let output = if ct.tensor_infos.contains_key("output.weight") {
            matrix(tensor("output.weight")?)?
        } else {
            matrix(embedding_q)?
        };
        let out_norm = vector(tensor("output_norm.weight")?)?;
        let factors = match config.rope_scaling {
            RopeScaling::FrequencyFactors => {
                let factors = vector(tensor("rope_freqs.weight")?)?;
                if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
                    return Err(bad_model(
                        path,
                        format!("RoPE frequency factor {bad} is not a positive number"),
                    ));
                }
                factors
            }
            RopeScaling::None | RopeScaling::Linear(_) => Vec::new(),
        };
        let stretch = match config.rope_scaling {
            RopeScaling::None => Stretch::None,
            RopeScaling::Linear(factor) => Stretch::Linear(factor),
            // check_tensors made sure there is one per pair
            RopeScaling::FrequencyFactors => Stretch::Factors(&factors),
        };
        let rope = Rope::new(
            config.rope_base,
            config.head_dim,
            config.architecture.rope_style(),
            stretch,
        );
        Ok((
            Self {
                config,
                embedding,
                layers,
                rope,
                out_norm,
                output,
                mode,
                dispatch: Dispatch::widest(AttentionPath::Exact),
                device,
                stop_tokens: tokenizer.stop_tokens(),
                fingerprint,
            },
            tokenizer,
        ))
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The model file's identity (for prefix and tier keys).
    pub fn fingerprint(&self) -> ModelFingerprint {
        self.fingerprint
    }

    /// True for tokens that end a generation (end of text, end of turn).
    pub fn is_stop_token(&self, token: u32) -> bool {
        self.stop_tokens.contains(&token)
    }

    /// How weights are held.
    pub fn weight_mode(&self) -> WeightMode {
        self.mode
    }

    /// The attention path (exact by default; see [`AttentionPath`]).
    pub fn attention_path(&self) -> AttentionPath {
        self.dispatch.path
    }

    /// Reads compressed pages on `path` from now on.
    pub fn set_attention_path(&mut self, path: AttentionPath) {
        self.dispatch.path = path;
    }

    /// Prefetches the pages `prefetch` names from now on (see [`Prefetch`]).
    pub fn set_prefetch(&mut self, prefetch: Prefetch) {
        self.dispatch.prefetch = prefetch;
    }

    /// Runs attention at dispatch level `simd` from now on (an AVX-512 machine can run the
    /// kernels an AVX2 one runs); an error, and nothing changed, if this CPU lacks it.
    pub fn set_simd(&mut self, simd: Simd) -> Result<()> {
        self.dispatch.simd = simd.check()?;
        Ok(())
    }

    /// Applies several linear layers to the same input; where all have our kernels, the input is
    /// quantized once and the products run in one parallel pass.
    fn project<const N: usize>(
        &self,
        ws: [&Linear; N],
        x: &[f32],
        rows: usize,
    ) -> Result<[Vec<f32>; N]> {
        let mut outs: [Vec<f32>; N] = std::array::from_fn(|_| Vec::new());
        let kernels: Option<Vec<&dyn GroupedWeights>> = ws.iter().map(|w| w.grouped()).collect();
        if let Some(kernels) = kernels {
            // quantized once, shared by every matrix of this input, in one parallel pass
            let mut acts = QActivations::default();
            acts.quantize(x, rows, kernels[0].k())?;
            matmul_many(&kernels, &acts, &mut outs)?;
            return Ok(outs);
        }
        // some matrix left as stored (a shape our kernels cannot tile, as an odd vocabulary's
        // output): one by one, the input quantized again for each kernel (rare enough)
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            if let Linear::Candle(m) = w {
                let input = Tensor::from_slice(x, (rows, x.len() / rows), &self.device)?;
                *out = m.forward(&input)?.flatten_all()?.to_vec1::<f32>()?;
            } else if let Some(kernel) = w.grouped() {
                let mut acts = QActivations::default();
                acts.quantize(x, rows, kernel.k())?;
                matmul_many(&[kernel], &acts, std::slice::from_mut(out))?;
            }
        }
        Ok(outs)
    }

    /// The feed-forward's hidden layer `silu(x·gate) ⊙ (x·up)`: in one pass of our kernels
    /// where both matrices have them, else products then the element-wise step.
    fn swiglu(&self, layer: &Layer, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        if let (Some(gate), Some(up)) = (layer.w_gate.grouped(), layer.w_up.grouped()) {
            let mut acts = QActivations::default();
            acts.quantize(x, rows, gate.k())?;
            let mut hidden = Vec::new();
            swiglu(gate, up, &acts, &mut hidden)?;
            return Ok(hidden);
        }
        let [gate, mut up] = self.project([&layer.w_gate, &layer.w_up], x, rows)?;
        up.iter_mut()
            .zip(&gate)
            .for_each(|(u, g)| *u *= g / (1.0 + (-g).exp()));
        Ok(up)
    }

    /// Runs one forward over the batch: writes every new token's K/V into the cache, commits the
    /// tokens, and returns the requested logits (rows of `vocab`), item by item in order.
    pub fn forward(
        &self,
        cache: &mut KvCacheManager,
        batch: &[BatchItem],
    ) -> Result<Vec<Vec<f32>>> {
        self.forward_observed(cache, batch, &mut |_, _, _| {})
    }

    /// [`Self::forward`], showing `observe(layer, queries, keys)` every layer's queries
    /// (`tokens × heads × head_dim`) and keys (`tokens × kv_heads × head_dim`) after RoPE, in
    /// batch order (for calibration).
    pub fn forward_observed(
        &self,
        cache: &mut KvCacheManager,
        batch: &[BatchItem],
        observe: &mut LayerObserver,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let bs = cache.layout().block_size();
        // (seq, position) of every new token, and the checks that make the rest infallible
        let mut rows: Vec<(usize, usize)> = Vec::new();
        for (item_idx, item) in batch.iter().enumerate() {
            let table = cache.table(item.seq)?;
            let start = table.len();
            let end = start + item.tokens.len();
            if end > c.context_len {
                return Err(EngineError::PromptTooLong {
                    tokens: end,
                    limit: c.context_len,
                });
            }
            if end > table.blocks().len() * bs {
                return Err(pagedkv::KvError::PositionNotWritable {
                    seq: item.seq,
                    pos: end - 1,
                    committed: start,
                    capacity: table.blocks().len() * bs,
                }
                .into());
            }
            if let Some(bad) = item.tokens.iter().find(|t| **t as usize >= c.vocab) {
                return Err(EngineError::InvalidArgument(format!(
                    "token id {bad} is outside the vocabulary"
                )));
            }
            rows.extend((start..end).map(|pos| (item_idx, pos)));
        }
        let n = rows.len();
        if n == 0 {
            return Ok(batch.iter().map(|_| Vec::new()).collect());
        }
        let (d, h) = (c.head_dim, c.hidden);
        let (q_width, kv_width) = (c.heads * d, c.kv_heads * d);
        let tokens: Vec<u32> = batch
            .iter()
            .flat_map(|i| i.tokens.iter().copied())
            .collect();
        let mut x = Vec::with_capacity(n * h);
        for t in &tokens {
            x.extend_from_slice(&self.embedding[*t as usize * h..(*t as usize + 1) * h]);
        }
        let rope = self.rope.table(rows.iter().map(|(_, pos)| *pos));
        let scale = 1.0 / (d as f32).sqrt();
        let mut attn_out = vec![0f32; n * q_width];
        let mut normed = vec![0f32; n * h];
        // block tables do not change during a forward: collected once, not once per layer
        let tables = batch
            .iter()
            .map(|i| cache.table(i.seq).map(|t| t.blocks().to_vec()))
            .collect::<pagedkv::Result<Vec<_>>>()?;
        for (layer_idx, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, c.rms_eps, &mut normed);
            let [mut q, mut k, mut v] =
                self.project([&layer.wq, &layer.wk, &layer.wv], &normed, n)?;
            if let Some(biases) = &layer.qkv_bias {
                for (m, bias) in [&mut q, &mut k, &mut v].into_iter().zip(biases) {
                    for row in m.chunks_exact_mut(bias.len()) {
                        row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                    }
                }
            }
            for (r, (qr, kr)) in q
                .chunks_exact_mut(q_width)
                .zip(k.chunks_exact_mut(kv_width))
                .enumerate()
            {
                rope.apply(r, qr);
                rope.apply(r, kr);
            }
            observe(layer_idx, &q, &k);
            for (r, (item_idx, pos)) in rows.iter().enumerate() {
                let span = r * kv_width..(r + 1) * kv_width;
                cache.write_token(
                    batch[*item_idx].seq,
                    layer_idx,
                    *pos,
                    &k[span.clone()],
                    &v[span],
                )?;
            }
            let storage = cache.storage();
            let threads = rayon::current_num_threads();
            if n < threads {
                // fewer queries than threads (decode of few sequences): split each context
                for ((out, qr), (item_idx, pos)) in attn_out
                    .chunks_mut(q_width)
                    .zip(q.chunks(q_width))
                    .zip(&rows)
                {
                    let ctx = Context {
                        blocks: &tables[*item_idx],
                        len: pos + 1,
                    };
                    attention::attend_split_at(
                        self.dispatch,
                        storage,
                        layer_idx,
                        ctx,
                        qr,
                        scale,
                        out,
                    )?;
                }
            } else {
                attn_out
                    .par_chunks_mut(q_width)
                    .zip(q.par_chunks(q_width))
                    .zip(rows.par_iter())
                    .try_for_each(|((out, qr), (item_idx, pos))| {
                        let ctx = Context {
                            blocks: &tables[*item_idx],
                            len: pos + 1,
                        };
                        // each thread's buffers kept from call to call (a call per layer)
                        ATTENTION_SCRATCH.with(|cell| {
                            let scratch = &mut *cell.borrow_mut();
                            scratch.set_dispatch(self.dispatch)?;
                            attention::attend(storage, layer_idx, ctx, qr, scale, out, scratch)
                        })
                    })?;
            }
            let [o] = self.project([&layer.wo], &attn_out, n)?;
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            rms_norm(&x, &layer.ffn_norm, c.rms_eps, &mut normed);
            let hidden = self.swiglu(layer, &normed, n)?;
            let [down] = self.project([&layer.w_down], &hidden, n)?;
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        for item in batch {
            cache.commit(item.seq, item.tokens)?;
        }
        // logits for the rows that asked for them
        let mut wanted: Vec<usize> = Vec::new();
        let mut row = 0;
        for item in batch {
            let len = item.tokens.len();
            match item.logits {
                Logits::None => {}
                Logits::Last if len > 0 => wanted.push(row + len - 1),
                Logits::Last => {}
                Logits::All => wanted.extend(row..row + len),
            }
            row += len;
        }
        let mut out: Vec<Vec<f32>> = batch.iter().map(|_| Vec::new()).collect();
        if wanted.is_empty() {
            return Ok(out);
        }
        let mut selected = Vec::with_capacity(wanted.len() * h);
        for r in &wanted {
            selected.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let mut final_norm = vec![0f32; selected.len()];
        rms_norm(&selected, &self.out_norm, c.rms_eps, &mut final_norm);
        let [logits] = self.project([&self.output], &final_norm, wanted.len())?;
        let mut chunks = logits.chunks_exact(c.vocab);
        for (item, dst) in batch.iter().zip(out.iter_mut()) {
            let count = match item.logits {
                Logits::None => 0,
                Logits::Last => usize::from(!item.tokens.is_empty()),
                Logits::All => item.tokens.len(),
            };
            for _ in 0..count {
                dst.extend_from_slice(chunks.next().expect("one logits row per wanted row"));
            }
        }
        Ok(out)
    }
}

/// RMSNorm of each row of `x` (computed as candle does, so exact mode matches it).
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (row, dst) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let sum2: f32 = row.iter().map(|v| v * v).sum();
        let m = (sum2 / dim as f32 + eps).sqrt();
        for ((o, v), w) in dst.iter_mut().zip(row).zip(weight) {
            *o = *v / m * *w;
        }
    }
}
