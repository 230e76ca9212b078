//! Continuous batching over the paged cache (DESIGN §9).
//!
//! Each [`Scheduler::step`]:
//! 1. admits waiting requests, oldest first, while the cache's watermark allows (a prompt's
//!    cached prefix is reused, only the rest is computed); a request whose next uncached block
//!    is being computed right now by a running sequence waits for it, so a shared system prompt
//!    is computed once, not once per request that arrived together;
//! 2. gives every running sequence its pending tokens — one decode token, or a chunk of its
//!    prompt within the step's token budget (with a compressed cache, up to the end of the
//!    current block, so blocks are sealed before later tokens read them) — reserving cache
//!    room first; when the pool is out
//!    of blocks, the most recently admitted sequence is preempted: by default its blocks are
//!    swapped to the host tier and come back bit for bit when it resumes ([`Preemption`]);
//!    otherwise (or when the tier is full) they are freed, its generated tokens kept, and it
//!    recomputes on re-admission, mostly from the prefix cache;
//! 3. runs one batched forward and samples a token for every sequence that reached the end of
//!    its known tokens. Finished requests free their blocks. No request is ever dropped.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use pagedkv::tier::TieredStore;
use pagedkv::{Admission, CacheSalt, KvCacheManager, KvError, SeqId, SwappedOut};

use crate::error::{EngineError, Result};
use crate::model::{BatchItem, Logits, Model};
use crate::sampler::{token_logprobs, Sampler, SamplingParams, TokenLogprobs};

/// A generation request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Caller's id, echoed in events.
    pub id: u64,
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// Generate at most this many tokens.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Separates the RNG streams of requests sharing a seed ([`Request::new`] uses the id).
    pub stream: u64,
    /// The tenant's cache salt: blocks are shared only with requests of the same salt.
    pub salt: Option<CacheSalt>,
    /// Report each generated token's log-probability and this many alternatives (`None`: no
    /// log-probabilities).
    pub top_logprobs: Option<usize>,
}

impl Request {
    /// A request with no salt and no log-probabilities, its RNG stream named by its id.
    pub fn new(id: u64, prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Self {
        Self {
            id,
            prompt,
            max_tokens,
            sampling,
            stream: id,
            salt: None,
            top_logprobs: None,
        }
    }
}

/// Why a request finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced a stop token (not included in the output).
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The model's context is full.
    ContextFull,
}

/// What happened in a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A request entered the cache for the first time: what its prompt found there.
    Admitted {
        /// Request id.
        id: u64,
        /// Cached tokens and where they came from.
        admission: Admission,
    },
    /// A request produced a token.
    Token {
        /// Request id.
        id: u64,
        /// The token.
        token: u32,
        /// Its log-probability and the top alternatives, when the request asked for them.
        logprobs: Option<TokenLogprobs>,
    },
    /// A request finished.
    Finished {
        /// Request id.
        id: u64,
        /// Why.
        reason: FinishReason,
    },
    /// A request was preempted to free blocks (it will resume).
    Preempted {
        /// Request id.
        id: u64,
    },
}

/// What happens to a sequence preempted for lack of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preemption {
    /// Its blocks are freed; on resumption its tokens are computed again (mostly found in the
    /// prefix cache).
    Recompute,
    /// Its blocks are copied to the host tier (up to `host_bytes`) and copied back bit for bit
    /// on resumption; recompute is the fallback when the tier is full.
    Swap {
        /// Capacity of the host tier in bytes.
        host_bytes: u64,
    },
}

/// Scheduler limits.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Most new tokens one forward processes (decode tokens plus prefill chunks).
    pub max_step_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Swap or recompute preempted sequences.
    pub preemption: Preemption,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_step_tokens: 512,
            max_running: 64,
            preemption: Preemption::Swap {
                host_bytes: 1 << 30,
            },
        }
    }
}

/// Counters of a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct SchedulerStats {
    /// Requests finished.
    pub finished: usize,
    /// Prompt tokens submitted.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Tokens run through the model (prefill, recompute and decode).
    pub computed_tokens: usize,
    /// Prompt tokens served from the prefix cache at admission.
    pub cached_tokens: usize,
    /// Preemptions.
    pub preemptions: usize,
    /// Preemptions resolved by swapping to the host tier (the rest recompute).
    pub swaps: usize,
    /// Requests cancelled before they finished.
    pub cancelled: usize,
    /// Forward passes.
    pub steps: usize,
    /// Most blocks owned at once.
    pub peak_blocks: usize,
    /// Time spent in forward passes.
    pub forward_time: Duration,
}

struct Sequence {
    request: Request,
    seq: SeqId,
    generated: Vec<u32>,
    sampler: Sampler,
    /// Set while the sequence's blocks wait in the host tier.
    swapped: Option<SwappedOut>,
    /// Admitted once already (a preempted sequence is admitted again: counted once).
    admitted: bool,
}

impl Sequence {
    /// Prompt followed by the generated tokens: everything the cache must hold before sampling.
    fn tokens(&self) -> Vec<u32> {
        let mut all = self.request.prompt.clone();
        all.extend_from_slice(&self.generated);
        all
    }
}

/// Runs requests to completion on one model and one cache.
pub struct Scheduler<'m> {
    model: &'m Model,
    cache: KvCacheManager,
    config: SchedulerConfig,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    next_seq: u64,
    stats: SchedulerStats,
    /// Where swapped-out blocks wait.
    host: TieredStore,
}

impl<'m> Scheduler<'m> {
    /// A scheduler over `cache` (whose layout must be the model's).
    pub fn new(model: &'m Model, cache: KvCacheManager, config: SchedulerConfig) -> Result<Self> {
        let c = model.config();
        let l = cache.layout();
        if (l.layers(), l.kv_heads(), l.query_heads(), l.head_dim())
            != (c.layers, c.kv_heads, c.heads, c.head_dim)
        {
            return Err(EngineError::InvalidArgument(
                "the cache layout does not match the model".into(),
            ));
        }
        if config.max_step_tokens == 0 || config.max_running == 0 {
            return Err(EngineError::InvalidArgument(
                "scheduler limits must be positive".into(),
            ));
        }
        Ok(Self {
            model,
            cache,
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_seq: 0,
            stats: SchedulerStats::default(),
            host: TieredStore::in_memory(match config.preemption {
                Preemption::Swap { host_bytes } => host_bytes,
                Preemption::Recompute => 0,
            }),
        })
    }

    /// Queues a request. Prompts that could never fit (longer than the context, or than the
    /// whole pool) are refused here rather than stalling the queue.
    pub fn submit(&mut self, request: Request) -> Result<()> {
        let context = self.model.config().context_len;
        if request.prompt.is_empty() {
            return Err(EngineError::InvalidArgument(format!(
                "request {} has an empty prompt",
                request.id
            )));
        }
        if request.prompt.len() >= context {
            return Err(EngineError::PromptTooLong {
                tokens: request.prompt.len(),
                limit: context - 1,
            });
        }
        let pool_tokens = self.cache.pool().num_blocks() * self.cache.layout().block_size();
        if request.prompt.len() + 1 > pool_tokens {
            return Err(EngineError::PromptTooLong {
                tokens: request.prompt.len(),
                limit: pool_tokens - 1,
            });
        }
        if let Some(bad) = request
            .prompt
            .iter()
            .find(|t| **t as usize >= self.model.config().vocab)
        {
            return Err(EngineError::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        let sampler = Sampler::new(request.sampling, request.stream)?;
        self.stats.prompt_tokens += request.prompt.len();
        let seq = SeqId(self.next_seq);
        self.next_seq += 1;
        self.waiting.push_back(Sequence {
            request,
            seq,
            generated: Vec::new(),
            admitted: false,
            sampler,
            swapped: None,
        });
        Ok(())
    }

    /// True when nothing is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Counters so far.
    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// The cache (for its statistics).
    pub fn cache(&self) -> &KvCacheManager {
        &self.cache
    }

    /// The cache back, for another scheduler (requests still queued are dropped).
    pub fn into_cache(self) -> KvCacheManager {
        self.cache
    }

    /// The cache, for operations between steps (pins, lookups).
    pub fn cache_mut(&mut self) -> &mut KvCacheManager {
        &mut self.cache
    }

    /// Number of waiting requests (never admitted, or preempted).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Stops a request wherever it is: waiting (its swapped blocks dropped) or running (its
    /// blocks freed now). Returns false when no such request is queued or running.
    pub fn cancel(&mut self, id: u64) -> Result<bool> {
        if let Some(i) = self.running.iter().position(|s| s.request.id == id) {
            let s = self.running.remove(i);
            self.cache.free(s.seq)?;
        } else if let Some(i) = self.waiting.iter().position(|s| s.request.id == id) {
            let s = self.waiting.remove(i).expect("index found above");
            if let Some(swapped) = &s.swapped {
                self.cache.discard_swapped(swapped, &mut self.host)?;
            }
        } else {
            return Ok(false);
        }
        self.stats.cancelled += 1;
        Ok(true)
    }

    /// Number of running sequences.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    fn admit(&mut self, events: &mut Vec<Event>) -> Result<()> {
        while self.running.len() < self.config.max_running {
            let Some(next) = self.waiting.front() else {
                break;
            };
            if next.swapped.is_some() {
                if self.swap_in_front()? {
                    continue;
                }
                break;
            }
            let tokens = next.tokens();
            let salt = next.request.salt;
            if self.next_block_in_flight(&tokens, salt)? {
                break;
            }
            // with nothing running, admit without the reserve so a lone long request progresses
            if !self.running.is_empty() && !self.cache.can_admit_salted(&tokens, salt) {
                break;
            }
            match self.cache.admit_salted(next.seq, &tokens, salt) {
                Ok(admission) => {
                    let mut seq = self.waiting.pop_front().expect("front exists");
                    if !seq.admitted {
                        seq.admitted = true;
                        self.stats.cached_tokens += admission.cached_tokens;
                        events.push(Event::Admitted {
                            id: seq.request.id,
                            admission,
                        });
                    }
                    self.running.push(seq);
                }
                Err(KvError::OutOfBlocks { .. }) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// True when the first full block of `tokens` that is not cached is about to be computed by
    /// a running sequence (it lies among that sequence's uncommitted prompt tokens, under the
    /// same salt): waiting for it costs nothing, computing it twice does.
    fn next_block_in_flight(&self, tokens: &[u32], salt: Option<CacheSalt>) -> Result<bool> {
        let bs = self.cache.layout().block_size();
        let keys = self.cache.prefix_keys_salted(tokens, salt);
        let Some(missing) = keys.iter().position(|k| !self.cache.is_cached(*k)) else {
            return Ok(false);
        };
        let end = (missing + 1) * bs;
        for s in &self.running {
            if s.request.salt == salt
                && s.request.prompt.len() >= end
                && self.cache.table(s.seq)?.len() < end
                && s.request.prompt[..end] == tokens[..end]
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Brings the swapped-out sequence at the front of the queue back into the pool. False if
    /// its blocks do not fit yet; if its payloads are gone (or refused), it falls back to
    /// recompute and is admitted the normal way.
    fn swap_in_front(&mut self) -> Result<bool> {
        let front = self.waiting.front_mut().expect("caller checks the front");
        let swapped = front.swapped.take().expect("caller checks it is swapped");
        match self.cache.swap_in(&swapped, &mut self.host) {
            Ok(()) => {
                let seq = self.waiting.pop_front().expect("front exists");
                self.running.push(seq);
                Ok(true)
            }
            Err(KvError::OutOfBlocks { .. }) => {
                front.swapped = Some(swapped);
                Ok(false)
            }
            // payloads lost or refused: recompute instead (the next loop turn admits it)
            Err(KvError::SwappedBlockMissing { .. } | KvError::Payload(_)) => Ok(true),
            Err(e) => {
                front.swapped = Some(swapped);
                Err(e.into())
            }
        }
    }

    /// Preempts the most recently admitted running sequence and puts it first in the queue:
    /// swapped to the host tier when configured and possible, else freed for recompute.
    fn preempt_last(&mut self, events: &mut Vec<Event>) -> Result<()> {
        let mut victim = self
            .running
            .pop()
            .expect("caller checks running is non-empty");
        let swapped = match self.config.preemption {
            Preemption::Swap { .. } => match self.cache.swap_out(victim.seq, &mut self.host) {
                Ok(swapped) => Some(swapped),
                // the host tier cannot hold the sequence: recompute it instead
                Err(KvError::OutOfBlocks { .. }) => None,
                Err(e) => {
                    self.running.push(victim);
                    return Err(e.into());
                }
            },
            Preemption::Recompute => None,
        };
        match swapped {
            Some(s) => {
                victim.swapped = Some(s);
                self.stats.swaps += 1;
            }
            None => self.cache.free(victim.seq)?,
        }
        self.stats.preemptions += 1;
        events.push(Event::Preempted {
            id: victim.request.id,
        });
        self.waiting.push_front(victim);
        Ok(())
    }

    /// One scheduling step: admission, one batched forward, sampling. Returns its events.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        self.admit(&mut events)?;
        if self.running.is_empty() {
            return Ok(events);
        }
        // pending tokens of every running sequence, within the step budget; reserve room, and
        // preempt from the back until the reservations fit
        let mut plan: Vec<(usize, usize, usize)> = Vec::new(); // (running idx, start, len)
        let mut budget = self.config.max_step_tokens;
        let bs = self.cache.layout().block_size();
        let staged = !self.cache.layout().is_full_precision();
        let mut idx = 0;
        while idx < self.running.len() {
            let s = &self.running[idx];
            let committed = self.cache.table(s.seq)?.len();
            let total = s.request.prompt.len() + s.generated.len();
            let mut len = (total - committed).min(budget);
            if staged {
                // a compressed block is sealed when its forward commits it: a prefill chunk ends
                // at a block boundary, so later tokens read earlier blocks as stored, exactly as
                // in decoding and as when the prefix comes from the cache (the output never
                // depends on what was cached, nor on how the prompt was chunked)
                len = len.min(bs - committed % bs);
            }
            if len == 0 {
                idx += 1;
                continue;
            }
            match self.cache.reserve(s.seq, len) {
                Ok(()) => {
                    plan.push((idx, committed, len));
                    budget -= len;
                    idx += 1;
                }
                Err(KvError::OutOfBlocks { .. }) => {
                    if self.running.len() == 1 {
                        return Err(EngineError::PromptTooLong {
                            tokens: total,
                            limit: committed,
                        });
                    }
                    let victim = self.running.len() - 1;
                    self.preempt_last(&mut events)?;
                    plan.retain(|(i, _, _)| *i != victim);
                    if victim == idx {
                        break;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        if plan.is_empty() {
            return Ok(events);
        }
        let token_lists: Vec<Vec<u32>> = plan
            .iter()
            .map(|(i, _, _)| self.running[*i].tokens())
            .collect();
        let batch: Vec<BatchItem> = plan
            .iter()
            .zip(&token_lists)
            .map(|((i, start, len), all)| BatchItem {
                seq: self.running[*i].seq,
                tokens: &all[*start..start + len],
                logits: if start + len == all.len() {
                    Logits::Last
                } else {
                    Logits::None
                },
            })
            .collect();
        let started = Instant::now();
        let logits = self.model.forward(&mut self.cache, &batch)?;
        self.stats.forward_time += started.elapsed();
        self.stats.steps += 1;
        self.stats.computed_tokens += plan.iter().map(|p| p.2).sum::<usize>();
        self.stats.peak_blocks = self
            .stats
            .peak_blocks
            .max(self.cache.pool().num_blocks() - self.cache.num_available_blocks());

        let model = self.model;
        let context = model.config().context_len;
        let mut finished = Vec::new();
        for ((i, _, _), row) in plan.iter().zip(&logits) {
            if row.is_empty() {
                continue;
            }
            let s = &mut self.running[*i];
            let token = s.sampler.sample(row);
            let logprobs = s
                .request
                .top_logprobs
                .map(|top| token_logprobs(row, token, top));
            let reason = if model.is_stop_token(token) {
                Some(FinishReason::Stop)
            } else {
                s.generated.push(token);
                self.stats.generated_tokens += 1;
                events.push(Event::Token {
                    id: s.request.id,
                    token,
                    logprobs,
                });
                if s.generated.len() >= s.request.max_tokens {
                    Some(FinishReason::Length)
                } else if s.request.prompt.len() + s.generated.len() >= context {
                    Some(FinishReason::ContextFull)
                } else {
                    None
                }
            };
            if let Some(reason) = reason {
                events.push(Event::Finished {
                    id: s.request.id,
                    reason,
                });
                finished.push(*i);
            }
        }
        for i in finished.into_iter().rev() {
            let s = self.running.remove(i);
            self.cache.free(s.seq)?;
            self.stats.finished += 1;
        }
        Ok(events)
    }

    /// Steps until every request has finished, passing each event to `on_event`.
    pub fn run(&mut self, mut on_event: impl FnMut(&Event)) -> Result<SchedulerStats> {
        while !self.is_idle() {
            for event in self.step()? {
                on_event(&event);
            }
        }
        Ok(self.stats)
    }
}
