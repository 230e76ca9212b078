//! Key bits spent where the logits feel them (`+keysplit`, FibQuant keys after [`KeyNorm`]).
//!
//! A plain FibQuant key rotates all 64 coordinates together, so every coordinate gets the same
//! error. But a logit error is `Σ_i q_i·e_i`: a channel pair with large key variance `K_i`
//! *and* large query energy `Q_i` moves logits, most pairs barely do (on SmolLM2 half the
//! pairs carry 85–99% of `Σ K_i·Q_i`). A [`SplitPlan`] ranks each head's pairs by `K_i·Q_i`,
//! whitens them (`x_j / σ_j`), and cuts the ranked coordinates into chunks of [`CHUNK`]; each
//! chunk is rotated on its own (randomized Hadamard) and coded with its own FibQuant codebook,
//! or dropped, under the bit budget of the layer's key codec — a transform coder's bit
//! allocation (reverse water-filling) over a ladder of codebooks. One norm per token covers
//! the kept coordinates.
//!
//! ```text
//!  page  = [ν_max f16][token 0: norm byte | chunk 0 indices | chunk 1 indices | ...] ...
//!  token = ν̂ · (per chunk: Hᵀ_c · codewords) scattered back through order and 1/scale
//! ```
//!
//! The codewords are those of FibQuant's profile at the full head_dim, so a kept chunk's
//! coordinates are scaled to carry the energy a head_dim-wide unit vector gives them.
//! Attention reads the codes through per-chunk tables of the transformed query, as plain
//! FibQuant does ([`SplitPlan::query_tables`]).

use std::sync::Arc;

use fibquant::{FibQuant, HadamardRotation};
use half::f16;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use xxhash_rust::xxh3::xxh3_64;

use crate::codec::vector::{norm_byte, page_norm, quantizer, token_norm, PAGE_HEADER};
use crate::codec::Codec;
use crate::error::{KvError, Result};

/// Coordinates per chunk.
pub const CHUNK: usize = 16;

/// Most chunks a head holds: head_dim up to 256.
const MAX_CHUNKS: usize = 16;

/// Codecs a chunk may take, cheapest first (None: dropped).
pub const LADDER: [Option<Codec>; 9] = [
    None,
    Some(Codec::FibQuant { k: 4, n: 16 }),
    Some(Codec::FibQuant { k: 4, n: 64 }),
    Some(Codec::FibQuant { k: 4, n: 256 }),
    Some(Codec::FibQuant { k: 4, n: 1024 }),
    Some(Codec::FibQuant { k: 2, n: 64 }),
    Some(Codec::FibQuant { k: 2, n: 128 }),
    Some(Codec::FibQuant { k: 2, n: 256 }),
    Some(Codec::FibQuant { k: 2, n: 1024 }),
];

const ROTATION_SEED: u64 = 0x5EED_5B17;

/// Index bits of `CHUNK` coordinates under `codec`.
pub(crate) fn chunk_bits(codec: Option<Codec>) -> usize {
    match codec {
        Some(Codec::FibQuant { k, n }) => {
            CHUNK / k as usize * fibquant::index_bits(n as usize) as usize
        }
        _ => 0,
    }
}

/// Index bits of a whole head under a plain FibQuant codec (the budget a plan must meet).
pub(crate) fn head_bits(codec: Codec, head_dim: usize) -> Option<usize> {
    match codec {
        Codec::FibQuant { k, n } => {
            Some(head_dim / k as usize * fibquant::index_bits(n as usize) as usize)
        }
        _ => None,
    }
}

/// One layer's split of its key heads.
#[derive(Debug, Clone)]
pub struct SplitPlan {
    for_codec: Codec,
    head_dim: usize,
    chunks: Vec<Option<Codec>>,
    /// Per head, the source coordinate of each ranked position (`kv_heads × head_dim`).
    order: Vec<u16>,
    /// Per head, the whitening factor of each ranked position.
    scale: Vec<f32>,
    quantizers: Vec<Option<Arc<FibQuant>>>,
    rotations: Vec<HadamardRotation>,
    /// Byte offset of each chunk's indices in a token's code (after the norm byte).
    offsets: Vec<usize>,
    /// Where each kept chunk's indices and tables lie, for [`SplitPlan::scores`].
    lookups: Vec<ChunkLookup>,
    token_bytes: usize,
    /// `√(kept / head_dim)`: a kept coordinate's share of a unit head_dim-wide vector.
    kept_share: f32,
}

impl SplitPlan {
    /// A plan from its parts (see [`SplitPlan::fit`], in `calibration`); `order` must hold a permutation of the head's
    /// coordinates per head and `scale` positive finite factors; head_dim at most 256.
    pub fn new(
        for_codec: Codec,
        head_dim: usize,
        chunks: Vec<Option<Codec>>,
        order: Vec<u16>,
        scale: Vec<f32>,
    ) -> Result<Self> {
        if chunks.len() * CHUNK != head_dim
            || order.len() != scale.len()
            || order.is_empty()
            || !order.len().is_multiple_of(head_dim)
        {
            return Err(KvError::ShapeMismatch {
                what: "key split",
                expected: head_dim,
                got: chunks.len() * CHUNK,
            });
        }
        if chunks.len() > MAX_CHUNKS {
            return Err(KvError::InvalidKeyNorm(format!(
                "a key split holds at most {MAX_CHUNKS} chunks (head_dim up to {})",
                MAX_CHUNKS * CHUNK
            )));
        }
        for perm in order.chunks_exact(head_dim) {
            let mut seen = vec![false; head_dim];
            for &j in perm {
                if j as usize >= head_dim || std::mem::replace(&mut seen[j as usize], true) {
                    return Err(KvError::InvalidKeyNorm(
                        "a key split's order is not a permutation".into(),
                    ));
                }
            }
        }
        if !scale.iter().all(|s| s.is_finite() && *s > 0.0) {
            return Err(KvError::NonFinite {
                what: "key split scales",
            });
        }
        // the ladder's codebooks: k divides a chunk, and 2^bits words (every index in range)
        if let Some(Some(c)) = chunks.iter().find(|c| !LADDER.contains(c)) {
            return Err(KvError::UnsupportedCodec {
                codec: c.to_string(),
                reason: "a key split chunk takes a codec of its ladder",
            });
        }
        let budget = head_bits(for_codec, head_dim).ok_or(KvError::UnsupportedCodec {
            codec: for_codec.to_string(),
            reason: "a key split replaces a FibQuant key codec",
        })?;
        if chunks.iter().map(|c| chunk_bits(*c)).sum::<usize>() > budget {
            return Err(KvError::InvalidKeyNorm(format!(
                "a key split spends more bits than {for_codec}"
            )));
        }
        let quantizers = chunks
            .iter()
            .map(|c| c.map(|c| quantizer(c, head_dim)).transpose())
            .collect::<Result<Vec<_>>>()?;
        let mut rng = ChaCha8Rng::seed_from_u64(ROTATION_SEED);
        let rotations = (0..chunks.len())
            .map(|_| HadamardRotation::new(CHUNK, &mut rng))
            .collect();
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut token_bytes = 1;
        for c in &chunks {
            offsets.push(token_bytes);
            token_bytes += chunk_bits(*c).div_ceil(8);
        }
        let mut lookups = Vec::new();
        let (mut table, mut entries_end) = (0, 0);
        for (fq, &offset) in quantizers.iter().zip(&offsets) {
            let Some(fq) = fq else { continue };
            let (blocks, words) = (CHUNK / fq.profile().k, fq.profile().n);
            let bits = fq.index_bits() as usize;
            entries_end += blocks;
            lookups.push(ChunkLookup {
                offset,
                bits,
                blocks,
                words,
                table,
                entries_end,
            });
            table += blocks * words;
        }
        let kept = chunks.iter().filter(|c| c.is_some()).count() * CHUNK;
        if kept == 0 {
            return Err(KvError::InvalidKeyNorm("a key split keeps no chunk".into()));
        }
        Ok(Self {
            for_codec,
            head_dim,
            chunks,
            order,
            scale,
            quantizers,
            rotations,
            offsets,
            lookups,
            token_bytes,
            kept_share: (kept as f32 / head_dim as f32).sqrt(),
        })
    }

    /// The key codec whose budget the plan meets (the plan applies where a layer uses it).
    pub fn for_codec(&self) -> Codec {
        self.for_codec
    }

    /// The codec of each chunk (None: dropped).
    pub fn chunks(&self) -> &[Option<Codec>] {
        &self.chunks
    }

    /// Per head, the source coordinate of each ranked position (`heads × head_dim`).
    pub fn order(&self) -> &[u16] {
        &self.order
    }

    /// Per head, the whitening factor of each ranked position (`heads × head_dim`).
    pub fn scale(&self) -> &[f32] {
        &self.scale
    }

    /// Heads the plan covers.
    pub fn heads(&self) -> usize {
        self.order.len() / self.head_dim
    }

    /// Bytes of a page of `tokens` codes.
    pub fn page_bytes(&self, tokens: usize) -> usize {
        PAGE_HEADER + tokens * self.token_bytes
    }

    fn head_span(&self, head: usize) -> std::ops::Range<usize> {
        head * self.head_dim..(head + 1) * self.head_dim
    }

    /// `out[j] = x[order_j]·scale_j`, then each chunk rotated: the coordinates the codebooks see
    /// (up to the norm).
    fn forward(&self, head: usize, x: &[f32], out: &mut [f32]) {
        let span = self.head_span(head);
        for ((o, &j), s) in out
            .iter_mut()
            .zip(&self.order[span.clone()])
            .zip(&self.scale[span])
        {
            *o = x[j as usize] * s;
        }
        for ((chunk, codec), rotation) in out
            .chunks_exact_mut(CHUNK)
            .zip(&self.chunks)
            .zip(&self.rotations)
        {
            if codec.is_some() {
                rotation.apply(chunk);
            } else {
                chunk.fill(0.0);
            }
        }
    }

    /// Encodes `rows` (tokens × head_dim, keys after the [`crate::KeyNorm`]) of kv head `head`
    /// into `out` ([`Self::page_bytes`] long).
    pub fn encode_page(&self, head: usize, rows: &[f32], out: &mut [u8]) -> Result<()> {
        let d = self.head_dim;
        if head >= self.heads() || out.len() != self.page_bytes(rows.len() / d) {
            return Err(KvError::ShapeMismatch {
                what: "key split page",
                expected: self.page_bytes(rows.len() / d),
                got: out.len(),
            });
        }
        if !rows.iter().all(|x| x.is_finite()) {
            return Err(KvError::NonFinite { what: "keys" });
        }
        let tokens = rows.len() / d;
        let mut moved = vec![0f32; tokens * d];
        let mut norms = Vec::with_capacity(tokens);
        for (row, m) in rows.chunks_exact(d).zip(moved.chunks_exact_mut(d)) {
            self.forward(head, row, m);
            let energy: f64 = m.iter().map(|v| (*v as f64).powi(2)).sum();
            norms.push(energy.sqrt() / self.kept_share as f64);
        }
        let largest = f16::from_f64(norms.iter().fold(0f64, |a, b| a.max(*b)));
        if !largest.is_finite() {
            return Err(KvError::NonFinite {
                what: "key norm beyond f16",
            });
        }
        out[..PAGE_HEADER].copy_from_slice(&largest.to_le_bytes());
        let codes = &mut out[PAGE_HEADER..];
        for (norm, token) in norms.iter().zip(codes.chunks_exact_mut(self.token_bytes)) {
            token[0] = norm_byte(largest.to_f32(), *norm);
        }
        // each chunk's blocks of every token, at unit norm, searched together
        let mut blocks = vec![0f32; tokens * CHUNK];
        let mut indices = vec![0u16; tokens * CHUNK];
        for (c, fq) in self.quantizers.iter().enumerate() {
            let Some(fq) = fq else { continue };
            for ((m, norm), chunk) in moved
                .chunks_exact(d)
                .zip(&norms)
                .zip(blocks.chunks_exact_mut(CHUNK))
            {
                let inv = if *norm > 0.0 {
                    (1.0 / norm) as f32
                } else {
                    0.0
                };
                chunk
                    .iter_mut()
                    .zip(&m[c * CHUNK..(c + 1) * CHUNK])
                    .for_each(|(o, x)| *o = x * inv);
            }
            let per_token = CHUNK / fq.profile().k;
            let indices = &mut indices[..tokens * per_token];
            fq.codebook().nearest_blocks(&blocks, indices);
            let bits = fq.index_bits();
            let start = self.offsets[c];
            let len = fibquant::pack::packed_len(per_token, bits);
            for (token_indices, token) in indices
                .chunks_exact(per_token)
                .zip(codes.chunks_exact_mut(self.token_bytes))
            {
                fibquant::pack::pack(token_indices, bits, &mut token[start..start + len]);
            }
        }
        Ok(())
    }

    /// The codeword indices of chunk `c` (coded by `fq`) in a token's code. Every codebook of
    /// the ladder has 2^bits words, so every unpacked index is in range.
    fn chunk_indices<'a>(
        &self,
        c: usize,
        fq: &FibQuant,
        token: &[u8],
        indices: &'a mut [u16; CHUNK / 2],
    ) -> &'a [u16] {
        let blocks = CHUNK / fq.profile().k;
        let bits = fq.index_bits();
        let start = self.offsets[c];
        let len = fibquant::pack::packed_len(blocks, bits);
        fibquant::pack::unpack(&token[start..start + len], bits, &mut indices[..blocks]);
        &indices[..blocks]
    }

    /// Decodes a page of kv head `head` into `out` (tokens × head_dim), before the
    /// [`crate::KeyNorm`]'s mean is restored.
    pub fn decode_page(&self, head: usize, page: &[u8], out: &mut [f32]) -> Result<()> {
        let d = self.head_dim;
        let tokens = out.len() / d;
        if head >= self.heads() || page.len() != self.page_bytes(tokens) {
            return Err(KvError::ShapeMismatch {
                what: "key split page",
                expected: self.page_bytes(tokens),
                got: page.len(),
            });
        }
        let largest = page_norm(page)?;
        let span = self.head_span(head);
        let mut moved = vec![0f32; d];
        let mut indices = [0u16; CHUNK / 2];
        for (token, row) in page[PAGE_HEADER..]
            .chunks_exact(self.token_bytes)
            .zip(out.chunks_exact_mut(d))
        {
            let norm = token_norm(largest, token[0]);
            moved.fill(0.0);
            for (c, fq) in self.quantizers.iter().enumerate() {
                let Some(fq) = fq else { continue };
                let k = fq.profile().k;
                let indices = self.chunk_indices(c, fq, token, &mut indices);
                let chunk = &mut moved[c * CHUNK..(c + 1) * CHUNK];
                for (b, i) in indices.iter().enumerate() {
                    chunk[b * k..(b + 1) * k].copy_from_slice(fq.codebook().word(*i as usize));
                }
                self.rotations[c].inverse_scaled(chunk, norm);
            }
            row.fill(0.0);
            for ((v, &j), s) in moved
                .iter()
                .zip(&self.order[span.clone()])
                .zip(&self.scale[span.clone()])
            {
                row[j as usize] = v / s;
            }
        }
        Ok(())
    }

    /// Per query head of kv head `head` (`q` holds `group × head_dim`): the tables
    /// `L[b][n] = ⟨q''_b, c_n⟩` of every kept block of the transformed query, concatenated
    /// chunk by chunk, so that a key's logit is `ν·Σ_b L[b][idx_b]`.
    pub fn query_tables(&self, head: usize, q: &[f32], tables: &mut Vec<f32>) {
        let d = self.head_dim;
        let span = self.head_span(head);
        let per_query: usize = self.table_len();
        tables.clear();
        tables.resize(q.len() / d * per_query, 0.0);
        let mut moved = vec![0f32; d];
        for (qg, out) in q.chunks_exact(d).zip(tables.chunks_exact_mut(per_query)) {
            // ⟨q, x⟩ = Σ_j q[order_j]·x'_j / scale_j: the query takes the inverse factors
            for ((o, &j), s) in moved
                .iter_mut()
                .zip(&self.order[span.clone()])
                .zip(&self.scale[span.clone()])
            {
                *o = qg[j as usize] / s;
            }
            let mut at = 0;
            for (c, fq) in self.quantizers.iter().enumerate() {
                let Some(fq) = fq else { continue };
                let chunk = &mut moved[c * CHUNK..(c + 1) * CHUNK];
                self.rotations[c].apply(chunk);
                let (k, n) = (fq.profile().k, fq.profile().n);
                let codebook = fq.codebook();
                for x in chunk.chunks_exact(k) {
                    let table = &mut out[at..at + n];
                    // each entry written once (the ladder's k is 2 or 4; a pass per coordinate
                    // read and wrote the whole table k times), summed in those passes' order
                    match *x {
                        [x0, x1] => {
                            let (c0, c1) = (&codebook.column(0)[..n], &codebook.column(1)[..n]);
                            for ((l, a), b) in table.iter_mut().zip(c0).zip(c1) {
                                *l = x0 * a + x1 * b;
                            }
                        }
                        [x0, x1, x2, x3] => {
                            let (c0, c1) = (&codebook.column(0)[..n], &codebook.column(1)[..n]);
                            let (c2, c3) = (&codebook.column(2)[..n], &codebook.column(3)[..n]);
                            let columns = c0.iter().zip(c1).zip(c2).zip(c3);
                            for (l, (((w0, w1), w2), w3)) in table.iter_mut().zip(columns) {
                                *l = x0 * w0 + x1 * w1 + x2 * w2 + x3 * w3;
                            }
                        }
                        _ => {
                            for (j, xj) in x.iter().enumerate() {
                                let column = &codebook.column(j)[..n];
                                table.iter_mut().zip(column).for_each(|(l, c)| *l += xj * c);
                            }
                        }
                    }
                    at += n;
                }
            }
        }
    }

    /// Length of one query's tables.
    pub fn table_len(&self) -> usize {
        self.quantizers
            .iter()
            .flatten()
            .map(|fq| CHUNK / fq.profile().k * fq.profile().n)
            .sum()
    }

    /// `scores[g·stride + t] = scale·ν_t·Σ_b L_g[b][idx_b]` for the first `n` tokens of a page,
    /// from [`Self::query_tables`]' `tables`.
    pub fn scores(
        &self,
        page: &[u8],
        n: usize,
        tables: &[f32],
        scale: f32,
        stride: usize,
        scores: &mut [f32],
    ) -> Result<()> {
        if page.len() < self.page_bytes(n) {
            return Err(KvError::ShapeMismatch {
                what: "key split page",
                expected: self.page_bytes(n),
                got: page.len(),
            });
        }
        let per_query = self.table_len();
        let groups = tables.len() / per_query;
        if !tables.len().is_multiple_of(per_query)
            || n > stride
            || scores.len() < groups.saturating_sub(1) * stride + n
        {
            return Err(KvError::ShapeMismatch {
                what: "key split tables or scores",
                expected: groups * per_query,
                got: tables.len(),
            });
        }
        let largest = page_norm(page)?;
        let mut entries = [0u32; MAX_CHUNKS * CHUNK / 2];
        for (t, token) in page[PAGE_HEADER..]
            .chunks_exact(self.token_bytes)
            .take(n)
            .enumerate()
        {
            // every block's entry in a query's tables, found once for all the query heads
            let mut count = 0;
            let token_start = PAGE_HEADER + t * self.token_bytes;
            for chunk in &self.lookups {
                let (bits, words) = (chunk.bits, chunk.words);
                let code = code_bits(page, token_start + chunk.offset, chunk.blocks * bits);
                for b in 0..chunk.blocks {
                    // a ladder codebook has 2^bits words: every index is in range
                    let index = (code >> (b * bits)) as usize & (words - 1);
                    entries[count] = (chunk.table + b * words + index) as u32;
                    count += 1;
                }
            }
            let norm = token_norm(largest, token[0]) * scale;
            for first in (0..groups).step_by(4) {
                let tables = &tables[first * per_query..];
                let out = &mut scores[first * stride + t..];
                let entries = (&entries[..count], self.lookups.as_slice());
                match groups - first {
                    1 => score_heads::<1>(tables, per_query, entries, norm, out, stride),
                    2 => score_heads::<2>(tables, per_query, entries, norm, out, stride),
                    3 => score_heads::<3>(tables, per_query, entries, norm, out, stride),
                    _ => score_heads::<4>(tables, per_query, entries, norm, out, stride),
                }
            }
        }
        Ok(())
    }
}

/// One token's scores for `H` query heads (`tables`: theirs, `per_query` entries each, one
/// after another) into `out[h·stride]`, from the token's table entries and the plan's kept
/// chunks: per chunk a sum of its entries, scaled by `norm` and added to the score. The
/// heads' sums are independent chains interleaved, for the CPU to overlap.
fn score_heads<const H: usize>(
    tables: &[f32],
    per_query: usize,
    (entries, chunks): (&[u32], &[ChunkLookup]),
    norm: f32,
    out: &mut [f32],
    stride: usize,
) {
    let tables: [&[f32]; H] = std::array::from_fn(|h| &tables[h * per_query..(h + 1) * per_query]);
    let mut scores = [0f32; H];
    let mut start = 0;
    for &ChunkLookup {
        entries_end: end, ..
    } in chunks
    {
        let mut sums = [0f32; H];
        for &l in &entries[start..end] {
            for (sum, table) in sums.iter_mut().zip(&tables) {
                *sum += table[l as usize];
            }
        }
        for (score, sum) in scores.iter_mut().zip(sums) {
            *score += sum * norm;
        }
        start = end;
    }
    for (h, score) in scores.into_iter().enumerate() {
        out[h * stride] = score;
    }
}

/// At least the `bits` bits (at most 128: a chunk's indices, at most 8 blocks of 10 bits on
/// the ladder) of a page from byte `at`, lowest first; the bits above them are whatever
/// follows in the page, or zero past its end.
fn code_bits(page: &[u8], at: usize, bits: usize) -> u128 {
    debug_assert!(bits <= 128);
    if let Some(bytes) = page.get(at..).and_then(<[u8]>::first_chunk::<16>) {
        // one load, where bytes gathered through memory would stall its read on their stores
        return u128::from_le_bytes(*bytes);
    }
    page[at..at + bits.div_ceil(8)]
        .iter()
        .rev()
        .fold(0u128, |code, b| code << 8 | u128::from(*b))
}

/// Where a kept chunk's indices lie in a token's code and its blocks' tables in a query's.
#[derive(Debug, Clone, Copy)]
struct ChunkLookup {
    /// Byte offset of the indices in a token's code.
    offset: usize,
    bits: usize,
    blocks: usize,
    /// Codewords (table entries) per block: `2^bits`.
    words: usize,
    /// Offset of the first block's table in a query's tables.
    table: usize,
    /// Where this chunk's entries end among a token's (the kept chunks' blocks so far).
    entries_end: usize,
}

/// The split of every layer whose key codec a plan was made for.
#[derive(Debug, Clone)]
pub struct KeySplit {
    kv_heads: usize,
    head_dim: usize,
    plans: Vec<Option<SplitPlan>>,
    digest: u64,
}

impl PartialEq for KeySplit {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl Eq for KeySplit {}

impl KeySplit {
    /// A split from per-layer plans (None: the layer keeps its codec as is).
    pub fn new(kv_heads: usize, head_dim: usize, plans: Vec<Option<SplitPlan>>) -> Result<Self> {
        if let Some(p) = plans
            .iter()
            .flatten()
            .find(|p| p.heads() != kv_heads || p.head_dim != head_dim)
        {
            return Err(KvError::ShapeMismatch {
                what: "key split plan heads",
                expected: kv_heads,
                got: p.heads(),
            });
        }
        let mut bytes =
            format!("pagedkv-key-split-v1;kv_heads={kv_heads};head_dim={head_dim}").into_bytes();
        for (layer, plan) in plans.iter().enumerate() {
            let Some(p) = plan else { continue };
            bytes.extend_from_slice(format!(";{layer}:{}:", p.for_codec).as_bytes());
            for c in &p.chunks {
                bytes.extend_from_slice(c.map_or("-".into(), |c| c.to_string()).as_bytes());
            }
            bytes.extend(p.order.iter().flat_map(|o| o.to_le_bytes()));
            bytes.extend(p.scale.iter().flat_map(|s| s.to_le_bytes()));
        }
        Ok(Self {
            kv_heads,
            head_dim,
            plans,
            digest: xxh3_64(&bytes),
        })
    }

    /// (layers, kv heads, head_dim) it was made for.
    pub fn geometry(&self) -> (usize, usize, usize) {
        (self.plans.len(), self.kv_heads, self.head_dim)
    }

    /// The plan of `layer`, whatever its codec.
    pub fn plan(&self, layer: usize) -> Option<&SplitPlan> {
        self.plans.get(layer).and_then(|p| p.as_ref())
    }

    /// The plan of `layer` if it applies there: made for `key_codec`, the layer's key codec.
    pub fn plan_for(&self, layer: usize, key_codec: Codec) -> Option<&SplitPlan> {
        self.plan(layer).filter(|p| p.for_codec == key_codec)
    }

    /// Hash of the plans: enters the layout digest.
    pub fn digest(&self) -> u64 {
        self.digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibration::key_split_fit::gaussian;
    use rand::Rng;

    /// Energies of 3 heads × 32 pairs: a few pairs carry most of `K·Q`.
    fn energies() -> (Vec<f64>, Vec<f64>) {
        let k = (0..96).map(|i| 1.0 + ((i * 7) % 32) as f64).collect();
        let q = (0..96)
            .map(|i| if (i * 7) % 32 > 20 { 5.0 } else { 0.2 })
            .collect();
        (k, q)
    }

    fn rows(heads_seed: u64, tokens: usize, d: usize, k: &[f64]) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(heads_seed);
        (0..tokens * d)
            .map(|i| (gaussian(&mut rng) * (k[(i % d) / 2] / 2.0).sqrt()) as f32)
            .collect()
    }

    #[test]
    fn fit_meets_the_budget_and_favours_the_heavy_pairs() {
        let codec = Codec::FibQuant { k: 4, n: 256 };
        let (k, q) = energies();
        let plan = SplitPlan::fit(codec, 64, &k, &q).unwrap();
        let bits: usize = plan.chunks().iter().map(|c| chunk_bits(*c)).sum();
        assert!(bits <= 128, "{bits}");
        // the first chunk holds the heaviest pairs: it is never coded more coarsely than later ones
        let rank = |c: &Option<Codec>| LADDER.iter().position(|l| l == c).unwrap();
        assert!(plan.chunks().windows(2).all(|w| rank(&w[0]) >= rank(&w[1])));
        assert!(
            plan.page_bytes(16)
                <= crate::codec::vector::page_bytes(codec.fibquant_profile(64).unwrap(), 16)
                    .unwrap()
        );
        // too few bits for any split, or not FibQuant
        assert!(SplitPlan::fit(Codec::Int8, 64, &k, &q).is_err());
        assert!(SplitPlan::fit(codec, 64, &k[..10], &q[..10]).is_err());
        let mut bad = k.clone();
        bad[3] = f64::NAN;
        assert!(SplitPlan::fit(codec, 64, &bad, &q).is_err());
    }

    #[test]
    fn pages_round_trip_within_the_plan_error_and_scores_match_the_decode() {
        let codec = Codec::FibQuant { k: 4, n: 256 };
        let (k, q) = energies();
        let plan = SplitPlan::fit(codec, 64, &k, &q).unwrap();
        for head in 0..3 {
            let x = rows(head as u64, 16, 64, &k[head * 32..]);
            let mut page = vec![0u8; plan.page_bytes(16)];
            plan.encode_page(head, &x, &mut page).unwrap();
            let mut back = vec![0f32; x.len()];
            plan.decode_page(head, &page, &mut back).unwrap();
            // logit error against the query energy: far below the logits' own spread
            let queries: Vec<f32> = rows(99 + head as u64, 3, 64, &q[head * 32..]);
            let mut tables = Vec::new();
            plan.query_tables(head, &queries, &mut tables);
            let mut scores = vec![0f32; 3 * 16];
            plan.scores(&page, 16, &tables, 0.5, 16, &mut scores)
                .unwrap();
            let (mut err, mut spread) = (0f64, 0f64);
            for (g, qg) in queries.chunks_exact(64).enumerate() {
                for t in 0..16 {
                    let dot =
                        |r: &[f32]| -> f64 { r.iter().zip(qg).map(|(a, b)| (a * b) as f64).sum() };
                    let exact = dot(&x[t * 64..(t + 1) * 64]);
                    let decoded = dot(&back[t * 64..(t + 1) * 64]);
                    // the tables read exactly what the decoder reconstructs
                    let s = scores[g * 16 + t] as f64;
                    assert!(
                        (s - 0.5 * decoded).abs() <= 1e-4 * (1.0 + decoded.abs()),
                        "{s} vs {decoded}"
                    );
                    err += (exact - decoded).powi(2);
                    spread += exact.powi(2);
                }
            }
            assert!(err / spread < 0.1, "head {head}: {}", err / spread);
        }
    }

    /// Groups of 1 to 9 query heads (read four at a time), part of a page, scores spaced
    /// wider than the page: every head's score is the decoded key's logit.
    #[test]
    fn scores_match_the_decode_for_every_group_size() {
        let codec = Codec::FibQuant { k: 4, n: 256 };
        let (k, q) = energies();
        let plan = SplitPlan::fit(codec, 64, &k, &q).unwrap();
        let (tokens, n, stride) = (16, 13, 20);
        let x = rows(5, tokens, 64, &k);
        let mut page = vec![0u8; plan.page_bytes(tokens)];
        plan.encode_page(0, &x, &mut page).unwrap();
        let mut back = vec![0f32; x.len()];
        plan.decode_page(0, &page, &mut back).unwrap();
        for groups in 1..=9 {
            let queries: Vec<f32> = rows(40 + groups as u64, groups, 64, &q);
            let mut tables = Vec::new();
            plan.query_tables(0, &queries, &mut tables);
            let mut scores = vec![f32::NAN; groups * stride];
            plan.scores(&page, n, &tables, 0.5, stride, &mut scores)
                .unwrap();
            for (g, qg) in queries.chunks_exact(64).enumerate() {
                for t in 0..n {
                    let decoded: f64 = back[t * 64..(t + 1) * 64]
                        .iter()
                        .zip(qg)
                        .map(|(a, b)| (a * b) as f64)
                        .sum();
                    let s = scores[g * stride + t] as f64;
                    assert!(
                        (s - 0.5 * decoded).abs() <= 1e-4 * (1.0 + decoded.abs()),
                        "{groups} heads, head {g}, token {t}: {s} vs {decoded}"
                    );
                }
                // nothing written past the page's tokens
                assert!(scores[g * stride + n..(g + 1) * stride]
                    .iter()
                    .all(|s| s.is_nan()));
            }
        }
    }

    #[test]
    fn corrupt_or_mismatched_pages_are_errors() {
        let codec = Codec::FibQuant { k: 4, n: 256 };
        let (k, q) = energies();
        let plan = SplitPlan::fit(codec, 64, &k, &q).unwrap();
        let x = rows(1, 16, 64, &k);
        let mut page = vec![0u8; plan.page_bytes(16)];
        assert!(plan.encode_page(3, &x, &mut page).is_err());
        assert!(plan.encode_page(0, &x, &mut page[1..]).is_err());
        let mut nan = x.clone();
        nan[5] = f32::NAN;
        assert!(plan.encode_page(0, &nan, &mut page).is_err());
        plan.encode_page(0, &x, &mut page).unwrap();
        page[..2].copy_from_slice(&f16::NAN.to_le_bytes());
        let mut back = vec![0f32; x.len()];
        assert!(plan.decode_page(0, &page, &mut back).is_err());
        assert!(plan
            .scores(&page, 16, &[0.0; 4096], 1.0, 16, &mut [0.0; 48])
            .is_err());
        // plans must be permutations with positive scales
        let order: Vec<u16> = (0..64).map(|i| (i % 32) as u16).collect();
        assert!(SplitPlan::new(codec, 64, vec![Some(codec); 4], order, vec![1.0; 64]).is_err());
        let order: Vec<u16> = (0..64).collect();
        assert!(SplitPlan::new(
            codec,
            64,
            vec![Some(codec); 4],
            order.clone(),
            vec![0.0; 64]
        )
        .is_err());
        // random bytes never panic: every index is in range, so a page decodes to finite
        // values or its header is refused
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut tables = Vec::new();
        plan.query_tables(0, &x[..3 * 64], &mut tables);
        for _ in 0..200 {
            page.iter_mut().for_each(|b| *b = rng.random());
            let mut scores = [0f32; 48];
            match plan.decode_page(0, &page, &mut back) {
                Ok(()) => {
                    assert!(back.iter().all(|v| v.is_finite()));
                    plan.scores(&page, 16, &tables, 1.0, 16, &mut scores)
                        .unwrap();
                }
                Err(_) => assert!(plan
                    .scores(&page, 16, &tables, 1.0, 16, &mut scores)
                    .is_err()),
            }
        }
        let odd = Some(Codec::FibQuant { k: 4, n: 100 });
        let odd_chunks = vec![odd, None, None, None];
        assert!(SplitPlan::new(codec, 64, odd_chunks, order.clone(), vec![1.0; 64]).is_err());
        let fine = Some(Codec::FibQuant { k: 2, n: 256 });
        assert!(SplitPlan::new(codec, 64, vec![fine; 4], order, vec![1.0; 64]).is_err());
    }
}
