//! The geometry of a KV cache (DESIGN §2), validated once and then trusted.
//!
//! One block id covers every layer. Within a layer the arena of keys (and the one of values) is
//!
//! ```text
//!   [head 0][head 1] ...              one head = a page per block, in block order
//!   [block 0 page][block 1 page] ...  one page = block_size tokens × head_dim (or a codec's packing)
//! ```
//!
//! so attention for one (sequence, kv head) streams the pages of a run of blocks as one
//! contiguous range, and one pass serves all query heads of a GQA group (`storage` has the
//! order inside a page).

use std::sync::Arc;

use crate::codec::{Codec, Role};
use crate::error::{KvError, Result};
use crate::key_norm::KeyNorm;
use crate::key_split::{KeySplit, SplitPlan};

/// Upper bounds that keep every derived size far from overflow and catch absurd input early.
const MAX_LAYERS: usize = 1024;
const MAX_HEADS: usize = 4096;
const MAX_HEAD_DIM: usize = 4096;
const MAX_BLOCK_SIZE: usize = 4096;
const MAX_RECENT_TOKENS: usize = 1 << 20;

/// Unvalidated layout request; [`KvLayout::new`] checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutSpec {
    /// Transformer layers.
    pub layers: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Query heads per layer (a multiple of `kv_heads`).
    pub query_heads: usize,
    /// Elements per head vector.
    pub head_dim: usize,
    /// Tokens per block (16 by default).
    pub block_size: usize,
    /// Codec of the keys.
    pub key_codec: Codec,
    /// Codec of the values.
    pub value_codec: Codec,
    /// Other codecs for sets of layers (e.g. the first and last at higher precision); where
    /// two sets share a layer, the later one applies.
    pub layer_overrides: Vec<LayerOverride>,
    /// Leading tokens of every sequence kept in f16 beside their sealed block ("attention
    /// sinks", at most one block's worth): the first block is sealed like any other, and the
    /// rows of its first `sink_tokens` tokens stay readable in f16, which attention uses in place
    /// of their codes. 0 for none.
    pub sink_tokens: usize,
    /// Most recent tokens kept in full precision besides the open block: a full block is sealed
    /// only when `recent_tokens / block_size` (rounded up) newer blocks have filled, or when its
    /// sequence is freed. 0: only the open block.
    pub recent_tokens: usize,
    /// Normalization of FibQuant keys before encoding (see [`KeyNorm`]); None for none.
    pub key_norm: Option<Arc<KeyNorm>>,
    /// Bit allocation across the channel pairs of normalized FibQuant keys (see [`KeySplit`]);
    /// needs `key_norm`. A layer's plan applies where the layer's key codec is the one it was
    /// made for.
    pub key_split: Option<Arc<KeySplit>>,
}

/// A set of layer indices (below [`MAX_LAYERS`]), stored as a bitmap so layouts stay `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LayerSet([u64; MAX_LAYERS / 64]);

impl LayerSet {
    /// The set of `layers`; indices at or above [`MAX_LAYERS`] are refused.
    pub fn of(layers: impl IntoIterator<Item = usize>) -> Result<Self> {
        let mut set = Self::default();
        for layer in layers {
            if layer >= MAX_LAYERS {
                return Err(KvError::TooLarge {
                    field: "layer index",
                    value: layer,
                    max: MAX_LAYERS - 1,
                });
            }
            set.0[layer / 64] |= 1 << (layer % 64);
        }
        Ok(set)
    }

    /// Whether `layer` is in the set.
    pub fn contains(&self, layer: usize) -> bool {
        layer < MAX_LAYERS && self.0[layer / 64] & (1 << (layer % 64)) != 0
    }

    /// The layers in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..MAX_LAYERS).filter(|l| self.contains(*l))
    }

    /// Number of layers in the set.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// True if no layer is in the set.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Display for LayerSet {
    /// Layers joined by `+` (e.g. `0+1+29`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.iter().map(|l| l.to_string()).collect();
        write!(f, "{}", names.join("+"))
    }
}

/// Codecs used instead of the layout's own on some layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerOverride {
    /// The layers concerned.
    pub layers: LayerSet,
    /// Their key codec.
    pub key_codec: Codec,
    /// Their value codec.
    pub value_codec: Codec,
}

impl LayoutSpec {
    /// A spec with the default block size (16) and the same codec for keys and values.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        query_heads: usize,
        head_dim: usize,
        codec: Codec,
    ) -> Self {
        Self {
            layers,
            kv_heads,
            query_heads,
            head_dim,
            block_size: 16,
            key_codec: codec,
            value_codec: codec,
            layer_overrides: Vec::new(),
            sink_tokens: 0,
            recent_tokens: 0,
            key_norm: None,
            key_split: None,
        }
    }
}

/// How query heads map onto kv heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// One kv head per query head.
    MultiHead,
    /// Each kv head serves `group` query heads.
    GroupedQuery {
        /// Query heads per kv head.
        group: usize,
    },
    /// A single kv head serves every query head.
    MultiQuery,
}

/// A validated KV-cache layout. Fields are private so a `KvLayout` is always valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    spec: LayoutSpec,
    /// Per layer: the codecs of keys and values (overrides applied).
    codecs: Vec<(Codec, Codec)>,
    /// Per layer: bytes of one key page and one value page.
    page_bytes: Vec<(usize, usize)>,
    block_bytes: usize,
}

impl KvLayout {
    /// Validates a spec: positive sizes within bounds, query heads a multiple of kv heads,
    /// codecs able to store `head_dim`, and every derived size free of overflow.
    pub fn new(spec: LayoutSpec) -> Result<Self> {
        let bounded = [
            ("layers", spec.layers, MAX_LAYERS),
            ("kv_heads", spec.kv_heads, MAX_HEADS),
            ("query_heads", spec.query_heads, MAX_HEADS),
            ("head_dim", spec.head_dim, MAX_HEAD_DIM),
            ("block_size", spec.block_size, MAX_BLOCK_SIZE),
        ];
        for (field, value, max) in bounded {
            if value == 0 {
                return Err(KvError::ZeroDimension { field });
            }
            if value > max {
                return Err(KvError::TooLarge { field, value, max });
            }
        }
        if spec.sink_tokens > spec.block_size {
            return Err(KvError::TooLarge {
                field: "sink_tokens",
                value: spec.sink_tokens,
                max: spec.block_size,
            });
        }
        if spec.recent_tokens > MAX_RECENT_TOKENS {
            return Err(KvError::TooLarge {
                field: "recent_tokens",
                value: spec.recent_tokens,
                max: MAX_RECENT_TOKENS,
            });
        }
        if !spec.query_heads.is_multiple_of(spec.kv_heads) {
            return Err(KvError::QueryHeadsNotMultiple {
                query_heads: spec.query_heads,
                kv_heads: spec.kv_heads,
            });
        }
        for o in &spec.layer_overrides {
            if let Some(layer) = o.layers.iter().find(|l| *l >= spec.layers) {
                return Err(KvError::TooLarge {
                    field: "override layer",
                    value: layer,
                    max: spec.layers - 1,
                });
            }
        }
        if let Some(c) = &spec.key_norm {
            let want = (spec.layers, spec.kv_heads, spec.head_dim, spec.block_size);
            if c.geometry() != want {
                return Err(KvError::InvalidKeyNorm(format!(
                    "made for (layers, kv heads, head_dim, block size) {:?}, the layout has {want:?}",
                    c.geometry()
                )));
            }
        }
        if let Some(split) = &spec.key_split {
            let want = (spec.layers, spec.kv_heads, spec.head_dim);
            if split.geometry() != want || spec.key_norm.is_none() {
                return Err(KvError::InvalidKeyNorm(format!(
                    "a key split made for (layers, kv heads, head_dim) {:?} on a layout with {want:?}{}",
                    split.geometry(),
                    if spec.key_norm.is_none() { " and no key normalization" } else { "" }
                )));
            }
        }
        let codecs: Vec<(Codec, Codec)> = (0..spec.layers)
            .map(|layer| {
                spec.layer_overrides
                    .iter()
                    .rev()
                    .find(|o| o.layers.contains(layer))
                    .map_or((spec.key_codec, spec.value_codec), |o| {
                        (o.key_codec, o.value_codec)
                    })
            })
            .collect();
        let overflow = KvError::SizeOverflow {
            what: "block bytes",
        };
        let mut page_bytes = Vec::with_capacity(spec.layers);
        let mut block_bytes = 0usize;
        for (layer, &(key, value)) in codecs.iter().enumerate() {
            key.check_head_dim(spec.head_dim)?;
            value.check_head_dim(spec.head_dim)?;
            let split = spec
                .key_split
                .as_deref()
                .and_then(|s| s.plan_for(layer, key));
            let pages = (
                match split {
                    Some(plan) => plan.page_bytes(spec.block_size),
                    None => key.page_bytes(Role::Key, spec.block_size, spec.head_dim)?,
                },
                value.page_bytes(Role::Value, spec.block_size, spec.head_dim)?,
            );
            block_bytes = pages
                .0
                .checked_add(pages.1)
                .and_then(|per_head| per_head.checked_mul(spec.kv_heads))
                .and_then(|layer| layer.checked_add(block_bytes))
                .ok_or(overflow.clone())?;
            page_bytes.push(pages);
        }
        Ok(Self {
            spec,
            codecs,
            page_bytes,
            block_bytes,
        })
    }

    /// The normalization that applies to `layer`'s key pages: the layout's, if the layer
    /// stores its keys with FibQuant.
    pub fn key_norm(&self, layer: usize) -> Option<&KeyNorm> {
        self.spec
            .key_norm
            .as_deref()
            .filter(|_| matches!(self.key_codec(layer), Codec::FibQuant { .. }))
    }

    /// The key split plan that applies to `layer`'s key pages: the layout's, if it has one for
    /// the layer's key codec.
    pub fn key_split(&self, layer: usize) -> Option<&SplitPlan> {
        self.spec
            .key_split
            .as_deref()
            .and_then(|s| s.plan_for(layer, self.key_codec(layer)))
    }

    /// The spec this layout was built from.
    pub fn spec(&self) -> &LayoutSpec {
        &self.spec
    }
    /// Transformer layers.
    pub fn layers(&self) -> usize {
        self.spec.layers
    }
    /// Key/value heads per layer.
    pub fn kv_heads(&self) -> usize {
        self.spec.kv_heads
    }
    /// Query heads per layer.
    pub fn query_heads(&self) -> usize {
        self.spec.query_heads
    }
    /// Elements per head vector.
    pub fn head_dim(&self) -> usize {
        self.spec.head_dim
    }
    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.spec.block_size
    }
    /// Codec of the keys of `layer`.
    pub fn key_codec(&self, layer: usize) -> Codec {
        self.codecs.get(layer).map_or(self.spec.key_codec, |c| c.0)
    }
    /// Codec of the values of `layer`.
    pub fn value_codec(&self, layer: usize) -> Codec {
        self.codecs
            .get(layer)
            .map_or(self.spec.value_codec, |c| c.1)
    }
    /// Full blocks behind the open one that stay in full precision (those holding the recent
    /// tokens).
    pub fn recent_blocks(&self) -> usize {
        self.spec.recent_tokens.div_ceil(self.spec.block_size)
    }

    /// Leading tokens of a sequence kept in f16 beside their sealed block (0 for full-precision
    /// layouts, which keep every token as written).
    pub fn sink_tokens(&self) -> usize {
        if self.is_full_precision() {
            0
        } else {
            self.spec.sink_tokens
        }
    }

    /// Bytes of one block's sink rows: `sink_tokens` tokens' K and V of every layer and kv
    /// head in f16.
    pub fn sink_bytes(&self) -> usize {
        self.sink_tokens() * 2 * self.spec.layers * self.spec.kv_heads * self.spec.head_dim * 2
    }

    /// Whether every layer stores keys and values in full precision (f32/f16/bf16).
    pub fn is_full_precision(&self) -> bool {
        (0..self.spec.layers).all(|l| {
            self.key_codec(l).is_full_precision() && self.value_codec(l).is_full_precision()
        })
    }
    /// Query heads served by each kv head.
    pub fn group_size(&self) -> usize {
        self.spec.query_heads / self.spec.kv_heads
    }

    /// MHA, GQA or MQA, derived from the head counts.
    pub fn attention_kind(&self) -> AttentionKind {
        match (self.spec.kv_heads, self.group_size()) {
            (_, 1) => AttentionKind::MultiHead,
            (1, _) => AttentionKind::MultiQuery,
            (_, group) => AttentionKind::GroupedQuery { group },
        }
    }

    /// Elements of one token's K (or V) across all kv heads of a layer: `kv_heads × head_dim`.
    pub fn token_width(&self) -> usize {
        self.spec.kv_heads * self.spec.head_dim
    }

    /// Elements of one full-precision page: `block_size × head_dim`.
    pub fn page_elements(&self) -> usize {
        self.spec.block_size * self.spec.head_dim
    }

    /// Bytes of one key page (one kv head, one block) of `layer` in its key codec.
    pub fn key_page_bytes(&self, layer: usize) -> usize {
        self.page_bytes.get(layer).map_or(0, |p| p.0)
    }
    /// Bytes of one value page of `layer` in its value codec.
    pub fn value_page_bytes(&self, layer: usize) -> usize {
        self.page_bytes.get(layer).map_or(0, |p| p.1)
    }

    /// Bytes of one block across all layers, keys and values, in the layout's codecs.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// KV bytes per cached token (block bytes / block size).
    pub fn kv_bytes_per_token(&self) -> f64 {
        self.block_bytes as f64 / self.spec.block_size as f64
    }

    /// Average bits per stored K/V element over all layers, scales and norms included.
    pub fn bits_per_element(&self) -> f64 {
        let elements = 2 * self.page_elements() * self.spec.kv_heads * self.spec.layers;
        self.block_bytes as f64 * 8.0 / elements as f64
    }

    /// How many whole blocks fit in `budget_bytes`.
    pub fn blocks_in_budget(&self, budget_bytes: u64) -> u64 {
        budget_bytes / self.block_bytes as u64
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for_tokens(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.spec.block_size)
    }

    /// Bytes that name this layout in prefix-hash keys and tier payload headers: any change to
    /// geometry or codec changes the stored bytes, so it must change the key.
    pub fn digest_bytes(&self) -> Vec<u8> {
        let s = &self.spec;
        let mut digest = format!(
            "pagedkv-layout-v2;layers={};kv_heads={};query_heads={};head_dim={};block_size={};k={};v={}",
            s.layers, s.kv_heads, s.query_heads, s.head_dim, s.block_size, s.key_codec, s.value_codec
        );
        for o in &s.layer_overrides {
            digest += &format!(
                ";override={}:k={};v={}",
                o.layers, o.key_codec, o.value_codec
            );
        }
        if s.sink_tokens > 0 {
            digest += &format!(";sinks={}", s.sink_tokens);
        }
        if s.recent_tokens > 0 {
            digest += &format!(";recent={}", s.recent_tokens);
        }
        if let Some(c) = &s.key_norm {
            digest += &format!(";key_norm={:016x}", c.digest());
        }
        if let Some(c) = &s.key_split {
            digest += &format!(";key_split={:016x}", c.digest());
        }
        digest.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm(codec: Codec) -> LayoutSpec {
        LayoutSpec::new(30, 3, 9, 64, codec)
    }

    #[test]
    fn smollm_geometry() {
        let layout = KvLayout::new(smollm(Codec::F16)).unwrap();
        assert_eq!(
            layout.attention_kind(),
            AttentionKind::GroupedQuery { group: 3 }
        );
        // 30 layers × 3 heads × 64 dims × (K+V) × 2 bytes = 23,040 bytes per token
        assert_eq!(layout.kv_bytes_per_token(), 23_040.0);
        assert_eq!(layout.block_bytes(), 23_040 * 16);
        assert_eq!(
            layout.blocks_in_budget(1 << 30),
            (1u64 << 30) / (23_040 * 16)
        );
        assert_eq!(layout.bits_per_element(), 16.0);
        assert_eq!(layout.blocks_for_tokens(33), 3);
    }

    #[test]
    fn mha_and_mqa_are_derived() {
        let mha = KvLayout::new(LayoutSpec::new(2, 4, 4, 8, Codec::F32)).unwrap();
        assert_eq!(mha.attention_kind(), AttentionKind::MultiHead);
        let mqa = KvLayout::new(LayoutSpec::new(2, 1, 8, 8, Codec::F32)).unwrap();
        assert_eq!(mqa.attention_kind(), AttentionKind::MultiQuery);
    }

    #[test]
    fn invalid_geometry_is_a_typed_error() {
        let mut spec = smollm(Codec::F16);
        spec.head_dim = 0;
        assert_eq!(
            KvLayout::new(spec),
            Err(KvError::ZeroDimension { field: "head_dim" })
        );
        let mut spec = smollm(Codec::F16);
        spec.query_heads = 10;
        assert_eq!(
            KvLayout::new(spec),
            Err(KvError::QueryHeadsNotMultiple {
                query_heads: 10,
                kv_heads: 3
            })
        );
        let mut spec = smollm(Codec::F16);
        spec.block_size = usize::MAX;
        assert!(matches!(
            KvLayout::new(spec),
            Err(KvError::TooLarge {
                field: "block_size",
                ..
            })
        ));
        let mut spec = smollm(Codec::FibQuant { k: 3, n: 64 });
        spec.head_dim = 64;
        assert!(matches!(
            KvLayout::new(spec),
            Err(KvError::UnsupportedCodec { .. })
        ));
    }

    /// A key normalization is part of the layout's identity and must match its geometry.
    #[test]
    fn key_norm_enters_the_digest_and_must_fit() {
        let norm = |layers| {
            let means = vec![0.5; layers * 3 * 64];
            Arc::new(KeyNorm::new(layers, 3, 64, 16, 1e5, means).unwrap())
        };
        let plain = KvLayout::new(smollm(Codec::FibQuant { k: 4, n: 256 })).unwrap();
        let mut spec = plain.spec().clone();
        spec.key_norm = Some(norm(30));
        let normed = KvLayout::new(spec.clone()).unwrap();
        assert_ne!(normed.digest_bytes(), plain.digest_bytes());
        assert!(normed.key_norm(0).is_some());
        assert_eq!(normed.block_bytes(), plain.block_bytes());
        spec.key_norm = Some(norm(2));
        assert!(matches!(
            KvLayout::new(spec.clone()),
            Err(KvError::InvalidKeyNorm(_))
        ));
        // only FibQuant keys are normalized
        spec.key_codec = Codec::Int4;
        spec.key_norm = Some(norm(30));
        assert!(KvLayout::new(spec).unwrap().key_norm(0).is_none());
    }

    #[test]
    fn key_split_applies_to_its_codec_enters_the_digest_and_needs_the_norm() {
        let fib = Codec::FibQuant { k: 4, n: 256 };
        let means = vec![0.5; 30 * 3 * 64];
        let norm = Arc::new(KeyNorm::new(30, 3, 64, 16, 1e5, means).unwrap());
        let keys: Vec<f64> = (0..96).map(|i| 1.0 + (i % 9) as f64).collect();
        let queries: Vec<f64> = (0..96).map(|i| 1.0 + (i % 5) as f64).collect();
        let plan = SplitPlan::fit(fib, 64, &keys, &queries).unwrap();
        // a plan for layer 1 only
        let split = |layers| {
            let mut plans = vec![None; layers];
            plans[1] = Some(plan.clone());
            Arc::new(KeySplit::new(3, 64, plans).unwrap())
        };
        let mut spec = smollm(fib);
        spec.key_norm = Some(norm.clone());
        let normed = KvLayout::new(spec.clone()).unwrap();
        spec.key_split = Some(split(30));
        let with_split = KvLayout::new(spec.clone()).unwrap();
        assert!(with_split.key_split(0).is_none() && with_split.key_split(1).is_some());
        assert_eq!(with_split.key_page_bytes(1), plan.page_bytes(16));
        assert!(with_split.key_page_bytes(1) <= normed.key_page_bytes(1));
        assert_eq!(with_split.key_page_bytes(0), normed.key_page_bytes(0));
        assert_ne!(with_split.digest_bytes(), normed.digest_bytes());
        // a plan made for another codec does not apply
        let mut other = spec.clone();
        other.key_codec = Codec::FibQuant { k: 4, n: 1024 };
        assert!(KvLayout::new(other).unwrap().key_split(1).is_none());
        // wrong geometry, or no normalization: refused
        spec.key_split = Some(split(2));
        assert!(KvLayout::new(spec.clone()).is_err());
        spec.key_split = Some(split(30));
        spec.key_norm = None;
        assert!(KvLayout::new(spec).is_err());
    }

    #[test]
    fn layer_overrides_change_only_their_layers() {
        let mut spec = smollm(Codec::Int4);
        spec.layer_overrides = vec![LayerOverride {
            layers: LayerSet::of([0, 29]).unwrap(),
            key_codec: Codec::F16,
            value_codec: Codec::Int8,
        }];
        let mixed = KvLayout::new(spec.clone()).unwrap();
        let plain = KvLayout::new(smollm(Codec::Int4)).unwrap();
        assert_eq!(mixed.key_codec(0), Codec::F16);
        assert_eq!(mixed.value_codec(29), Codec::Int8);
        assert_eq!(mixed.key_codec(1), Codec::Int4);
        assert_eq!(mixed.key_page_bytes(1), plain.key_page_bytes(1));
        assert_eq!(mixed.key_page_bytes(0), 16 * 64 * 2);
        let per_layer =
            |l: &KvLayout, layer| 3 * (l.key_page_bytes(layer) + l.value_page_bytes(layer));
        let total: usize = (0..30).map(|layer| per_layer(&mixed, layer)).sum();
        assert_eq!(mixed.block_bytes(), total);
        assert!(mixed.bits_per_element() > plain.bits_per_element());
        assert!(!mixed.is_full_precision());
        assert_ne!(mixed.digest_bytes(), plain.digest_bytes());
        // a later override wins on the layers it shares with an earlier one
        let mut two = spec.clone();
        two.layer_overrides.push(LayerOverride {
            layers: LayerSet::of([29, 5]).unwrap(),
            key_codec: Codec::Int8,
            value_codec: Codec::F16,
        });
        let two = KvLayout::new(two).unwrap();
        assert_eq!(
            (two.key_codec(0), two.value_codec(0)),
            (Codec::F16, Codec::Int8)
        );
        assert_eq!(
            (two.key_codec(29), two.value_codec(29)),
            (Codec::Int8, Codec::F16)
        );
        assert_eq!(
            (two.key_codec(5), two.value_codec(5)),
            (Codec::Int8, Codec::F16)
        );
        assert_eq!(two.key_codec(6), Codec::Int4);
        let total: usize = (0..30).map(|layer| per_layer(&two, layer)).sum();
        assert_eq!(two.block_bytes(), total);
        assert_ne!(two.digest_bytes(), mixed.digest_bytes());
        // an override beyond the model's layers is refused
        spec.layer_overrides[0].layers = LayerSet::of([30]).unwrap();
        assert!(matches!(KvLayout::new(spec), Err(KvError::TooLarge { .. })));
        assert!(LayerSet::of([MAX_LAYERS]).is_err());
    }

    #[test]
    fn compressed_codecs_shrink_blocks() {
        let f16 = KvLayout::new(smollm(Codec::F16)).unwrap();
        let int4 = KvLayout::new(smollm(Codec::Int4)).unwrap();
        // 4-bit data + f16 scales and zeros: 1,408 vs 4,096 bytes per page pair at bs=16, d=64
        assert_eq!(int4.key_page_bytes(0) + int4.value_page_bytes(0), 1408);
        assert!(int4.block_bytes() * 2 < f16.block_bytes());
        assert_ne!(f16.digest_bytes(), int4.digest_bytes());
    }
}
