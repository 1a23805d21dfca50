//! One modelled engine in virtual time: `pdgate-engine-sim`'s continuous batching
//! (`batcher.rs`) re-expressed as a step function, over the engine's own `TimingModel`,
//! `PrefixCache` and `EngineConfig` — the formulas and the cache are imported, only the loop is
//! rewritten, because the real one sleeps on a tokio timer.
//!
//! Mirrored exactly: a step admits queued jobs in arrival order — prefills within
//! `max_batched_tokens` (an oversize prompt runs alone), decode sequences up to `max_batch`
//! (a decode at the head that does not fit blocks the queue) — costs
//! `prefill_ms(Σ admitted prefill tokens) + decode_step_ms(running, Σ context)`, then completes
//! the prefills and has every running sequence emit one token. A prefill whose pull is still
//! under way (`PendingPrefill`) keeps its place while later jobs run past it, as the batcher's
//! `Size::Pending` does. It must never diverge from the batcher silently: the tests pin the same
//! cases the batcher's tests do.

use pdgate_engine_sim::cache::PrefixCache;
use pdgate_engine_sim::EngineConfig;
use std::collections::VecDeque;

/// Index of a request in the simulation.
pub type Req = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    Prefill {
        req: Req,
        uncached: usize,
    },
    /// A prefill queued before its size is known: its pull has not landed yet.
    PendingPrefill {
        req: Req,
    },
    Decode {
        req: Req,
        context: usize,
        steps: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seq {
    req: Req,
    context: usize,
    steps: u32,
}

/// What a finished step produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StepOutcome {
    pub prefills_done: Vec<Req>,
    /// `(request, last)`: one token per running sequence, `last` when it was its final one.
    pub tokens: Vec<(Req, bool)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("engine queue full")]
pub struct QueueFull;

#[derive(Debug)]
pub struct SimEngine {
    pub cfg: EngineConfig,
    pub cache: PrefixCache,
    waiting: VecDeque<Job>,
    running: Vec<Seq>,
    /// Prefills of the step in progress (`Some` while a step runs).
    in_step: Option<Vec<Req>>,
    pub prefix_queries_tokens: u64,
    pub prefix_hits_tokens: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub requests: u64,
    /// KV pool blocks free for reservations (decode role).
    pub pool_free: usize,
    /// Prompt tokens this engine pulled from other instances' caches instead of computing.
    pub pulled_tokens: u64,
    pub pulls: u64,
    /// Planned pulls that found the holder no longer caching the blocks (recomputed).
    pub pull_misses: u64,
    /// When this engine's outgoing link is free of the pulls other engines make from it, ms.
    pub egress_free_ms: f64,
    /// Prompt blocks found in the host tier.
    pub host_hit_blocks: u64,
}

impl SimEngine {
    /// `cache_blocks` is the prefix cache's capacity (the engine sizes it by role).
    pub fn new(cfg: EngineConfig, cache_blocks: usize) -> Self {
        Self {
            cache: PrefixCache::with_host(cache_blocks, cfg.host_cache_blocks),
            pool_free: cfg.kv_blocks,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            in_step: None,
            prefix_queries_tokens: 0,
            prefix_hits_tokens: 0,
            prompt_tokens: 0,
            generated_tokens: 0,
            requests: 0,
            pulled_tokens: 0,
            pulls: 0,
            pull_misses: 0,
            egress_free_ms: 0.0,
            host_hit_blocks: 0,
        }
    }

    /// The engine's `lookup_prefix`: counts the query and returns the uncached tokens.
    pub fn lookup_prefix(
        &mut self,
        prompt_tokens: usize,
        blocks: &[pdgate_scheduler::BlockHash],
    ) -> usize {
        self.lookup_tiers(prompt_tokens, blocks).0
    }

    /// As `lookup_prefix`, also saying how many of the hit blocks are in the host tier (they are
    /// copied back before the prefill is queued, as the engine does).
    pub fn lookup_tiers(
        &mut self,
        prompt_tokens: usize,
        blocks: &[pdgate_scheduler::BlockHash],
    ) -> (usize, usize) {
        let t = self.cache.match_tiers(blocks);
        let hit = ((t.gpu + t.host) * self.cfg.block_size).min(prompt_tokens);
        self.prefix_queries_tokens += prompt_tokens as u64;
        self.prefix_hits_tokens += hit as u64;
        self.host_hit_blocks += t.host as u64;
        (prompt_tokens - hit, t.host)
    }

    /// Queues a job. The live engine bounds its channel and its internal queue at
    /// `max_waiting` each, so up to twice that may wait before a submit is refused.
    pub fn submit(&mut self, job: Job) -> Result<(), QueueFull> {
        if self.waiting.len() >= 2 * self.cfg.max_waiting.max(1) {
            return Err(QueueFull);
        }
        self.waiting.push_back(job);
        Ok(())
    }

    pub fn busy(&self) -> bool {
        self.in_step.is_some()
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty()
            || self
                .waiting
                .iter()
                .any(|j| !matches!(j, Job::PendingPrefill { .. }))
    }

    /// Sizes `req`'s pending prefill where it waits (its pull landed); false if none is queued.
    pub fn resolve_pending(&mut self, req: Req, uncached: usize) -> bool {
        match self
            .waiting
            .iter_mut()
            .find(|j| matches!(j, Job::PendingPrefill { req: r } if *r == req))
        {
            Some(job) => {
                *job = Job::Prefill { req, uncached };
                true
            }
            None => false,
        }
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Starts a step if idle with work to do; returns its modelled duration in milliseconds
    /// (before any time scale).
    pub fn start_step(&mut self) -> Option<f64> {
        if self.busy() || !self.has_work() {
            return None;
        }
        let mut prefills = Vec::new();
        let mut prefill_tokens = 0usize;
        let mut budget = self.cfg.max_batched_tokens;
        let mut passed_over = Vec::new();
        while let Some(job) = self.waiting.pop_front() {
            match job {
                Job::PendingPrefill { .. } => passed_over.push(job),
                Job::Prefill { req, uncached } => {
                    if !prefills.is_empty() && uncached > budget {
                        self.waiting.push_front(job);
                        break;
                    }
                    budget = budget.saturating_sub(uncached);
                    prefill_tokens += uncached;
                    prefills.push(req);
                }
                Job::Decode {
                    req,
                    context,
                    steps,
                } => {
                    if steps == 0 {
                        continue;
                    }
                    if self.running.len() >= self.cfg.max_batch {
                        self.waiting.push_front(job);
                        break;
                    }
                    self.running.push(Seq {
                        req,
                        context,
                        steps,
                    });
                }
            }
        }
        for job in passed_over.into_iter().rev() {
            self.waiting.push_front(job);
        }
        let context: usize = self.running.iter().map(|s| s.context).sum();
        let ms = self.cfg.timing.prefill_ms(prefill_tokens)
            + self.cfg.timing.decode_step_ms(self.running.len(), context);
        self.in_step = Some(prefills);
        Some(ms)
    }

    /// Ends the step in progress.
    pub fn end_step(&mut self) -> StepOutcome {
        let prefills_done = self.in_step.take().unwrap_or_default();
        let mut tokens = Vec::with_capacity(self.running.len());
        self.generated_tokens += self.running.len() as u64;
        self.running.retain_mut(|s| {
            s.steps -= 1;
            s.context += 1;
            tokens.push((s.req, s.steps == 0));
            s.steps > 0
        });
        StepOutcome {
            prefills_done,
            tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdgate_engine_sim::TimingModel;

    fn engine(max_batch: usize, max_batched_tokens: usize) -> SimEngine {
        SimEngine::new(
            EngineConfig {
                max_batch,
                max_batched_tokens,
                ..EngineConfig::default()
            },
            100,
        )
    }

    #[test]
    fn step_cost_is_the_engines_own_formula() {
        let mut e = engine(8, 8192);
        e.submit(Job::Prefill {
            req: 0,
            uncached: 1000,
        })
        .unwrap();
        e.submit(Job::Decode {
            req: 1,
            context: 500,
            steps: 2,
        })
        .unwrap();
        let ms = e.start_step().unwrap();
        let t = TimingModel::default();
        assert_eq!(ms, t.prefill_ms(1000) + t.decode_step_ms(1, 500));
        assert_eq!(e.start_step(), None, "one step at a time");
        let out = e.end_step();
        assert_eq!(out.prefills_done, vec![0]);
        assert_eq!(out.tokens, vec![(1, false)]);
        let ms = e.start_step().unwrap();
        assert_eq!(
            ms,
            t.decode_step_ms(1, 501),
            "context grew by the emitted token"
        );
        assert_eq!(e.end_step().tokens, vec![(1, true)]);
        assert!(!e.has_work());
    }

    #[test]
    fn a_prefill_waiting_for_its_pull_keeps_its_place_and_later_work_runs_past_it() {
        let mut e = engine(8, 1000);
        e.submit(Job::PendingPrefill { req: 0 }).unwrap();
        assert!(!e.has_work(), "nothing to compute until the pull lands");
        e.submit(Job::Prefill {
            req: 1,
            uncached: 900,
        })
        .unwrap();
        e.start_step();
        assert_eq!(e.end_step().prefills_done, vec![1], "1 ran past 0");
        assert!(e.resolve_pending(0, 600));
        e.submit(Job::Prefill {
            req: 2,
            uncached: 600,
        })
        .unwrap();
        e.start_step();
        assert_eq!(
            e.end_step().prefills_done,
            vec![0],
            "0 kept its place ahead of 2 (and 2 does not fit beside it)"
        );
        assert!(!e.resolve_pending(0, 1), "sized once");
    }

    #[test]
    fn token_budget_splits_prefills_and_oversize_runs_alone() {
        let mut e = engine(8, 1000);
        for (req, uncached) in [(0, 600), (1, 600), (2, 5000), (3, 10)] {
            e.submit(Job::Prefill { req, uncached }).unwrap();
        }
        e.start_step();
        assert_eq!(
            e.end_step().prefills_done,
            vec![0],
            "1 does not fit beside 0"
        );
        e.start_step();
        assert_eq!(
            e.end_step().prefills_done,
            vec![1],
            "2 is oversize and waits its turn"
        );
        e.start_step();
        assert_eq!(e.end_step().prefills_done, vec![2], "oversize alone");
        e.start_step();
        assert_eq!(e.end_step().prefills_done, vec![3]);
    }

    #[test]
    fn batch_limit_serialises_excess_sequences_like_the_batcher() {
        // The batcher's own test: two 3-token sequences over a batch of 1 come out a,a,a,b,b,b.
        let mut e = engine(1, 8192);
        e.submit(Job::Decode {
            req: 0,
            context: 0,
            steps: 3,
        })
        .unwrap();
        e.submit(Job::Decode {
            req: 1,
            context: 0,
            steps: 3,
        })
        .unwrap();
        let mut order = Vec::new();
        while e.start_step().is_some() {
            order.extend(e.end_step().tokens.into_iter().map(|(r, _)| r));
        }
        assert_eq!(order, vec![0, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn queue_is_bounded() {
        let mut e = SimEngine::new(
            EngineConfig {
                max_waiting: 2,
                ..EngineConfig::default()
            },
            1,
        );
        for i in 0..4 {
            e.submit(Job::Prefill {
                req: i,
                uncached: 1,
            })
            .unwrap();
        }
        assert_eq!(
            e.submit(Job::Prefill {
                req: 9,
                uncached: 1
            }),
            Err(QueueFull)
        );
    }

    #[test]
    fn lookup_counts_hits_in_tokens() {
        use pdgate_scheduler::BlockHash;
        let mut e = engine(8, 8192);
        let blocks: Vec<BlockHash> = (0..4).map(BlockHash).collect();
        assert_eq!(e.lookup_prefix(70, &blocks), 70);
        e.cache.insert(&blocks[..2]);
        assert_eq!(e.lookup_prefix(70, &blocks), 70 - 32);
        assert_eq!((e.prefix_queries_tokens, e.prefix_hits_tokens), (140, 32));
    }

    #[test]
    fn a_host_tier_hit_is_a_hit_that_names_its_copy() {
        use pdgate_scheduler::BlockHash;
        let cfg = EngineConfig {
            host_cache_blocks: 8,
            ..EngineConfig::default()
        };
        let mut e = SimEngine::new(cfg, 2);
        let blocks: Vec<BlockHash> = (0..4).map(BlockHash).collect();
        e.cache.insert(&blocks);
        assert_eq!(e.cache.len(), 2, "the GPU tier keeps the last two");
        // 0 and 1 went to host memory: a prompt starting there hits them in the host tier.
        assert_eq!(e.lookup_tiers(70, &blocks), (70 - 32, 2));
        assert_eq!(e.host_hit_blocks, 2);
    }
}
