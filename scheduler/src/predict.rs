//! Latency predictions for a request on a candidate instance, shared by the `slo` policy (which
//! decides on them) and the scheduler (which reports them next to what was then observed).
//!
//! TTFT = queued prefill work + prefill of the uncached tokens (both scaled by the instance's
//! measured speed) + KV transfer at the measured bandwidth. A prefix block comes one of three
//! ways: a local hit (free), a pull from another instance that caches it (overhead + wait behind
//! the holder's other pulls + bytes over the pair's bandwidth; it overlaps the queue wait, as the
//! engine pulls while the request queues), or recompute. TBT = one decode step with the batch the
//! decode instance is expected to hold when this request's prefill finishes.

use crate::candidate::{Candidate, Pull};
use crate::config::SchedulerConfig;
use crate::types::{InstanceId, RequestKey};
use std::time::Duration;

/// How many of a decode instance's sequences are expected to have finished by a given time.
pub type EndsBefore<'a> = &'a dyn Fn(InstanceId, Duration) -> u32;

/// Measured bytes per ms from a holder to a puller.
pub type PairBandwidth<'a> = &'a dyn Fn(InstanceId, InstanceId) -> f64;

/// An instance that caches a prefix of the request, as a source of pulls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Holder {
    pub id: InstanceId,
    pub matched_blocks: u32,
    /// Time the holder's outgoing link is still busy with pulls booked earlier, ms.
    pub egress_wait_ms: f64,
}

pub struct Predictor<'a> {
    pub cfg: &'a SchedulerConfig,
    pub bytes_per_ms: f64,
    pub now: Duration,
    pub ends_before: EndsBefore<'a>,
}

impl Predictor<'_> {
    /// Prompt tokens `c` computes: those neither cached there nor pulled.
    pub fn uncached_tokens(&self, key: &RequestKey, c: &Candidate) -> u64 {
        let have = c.pull.map_or(c.matched_blocks, |p| p.upto_blocks);
        let cached = u64::from(have) * self.cfg.block_size as u64;
        u64::from(key.prompt_tokens).saturating_sub(cached)
    }

    /// The pull that makes `c`'s prefill finish soonest, if any beats recomputing: among the
    /// holders caching at least `min_pull_blocks` more of the prompt than `c`, the one whose
    /// pull plus the remaining compute is shortest.
    pub fn best_pull(
        &self,
        key: &RequestKey,
        c: &Candidate,
        holders: &[Holder],
        bandwidth: PairBandwidth<'_>,
    ) -> Option<Pull> {
        let reuse = &self.cfg.reuse;
        if !reuse.pull {
            return None;
        }
        let local = Candidate { pull: None, ..*c };
        let mut best = (self.prefill_ms(key, &local), None);
        let block_bytes = self.cfg.block_size as u64 * self.cfg.kv_bytes_per_token;
        for h in holders {
            if h.id == c.id
                || h.matched_blocks < c.matched_blocks.saturating_add(reuse.min_pull_blocks)
            {
                continue;
            }
            let bytes = u64::from(h.matched_blocks - c.matched_blocks) * block_bytes;
            let pull = Pull {
                from: h.id,
                upto_blocks: h.matched_blocks,
                bytes,
                ms: reuse.pull_overhead_ms.max(0.0)
                    + h.egress_wait_ms.max(0.0)
                    + bytes as f64 / bandwidth(h.id, c.id).max(1.0),
            };
            let t = self.prefill_ms(
                key,
                &Candidate {
                    pull: Some(pull),
                    ..*c
                },
            );
            if t < best.0 {
                best = (t, Some(pull));
            }
        }
        best.1
    }

    pub fn kv_bytes(&self, key: &RequestKey) -> u64 {
        u64::from(key.prompt_tokens) * self.cfg.kv_bytes_per_token
    }

    pub fn transfer_ms(&self, key: &RequestKey) -> f64 {
        self.kv_bytes(key) as f64 / self.bytes_per_ms.max(1.0)
    }

    /// Queue (or the pull, which runs meanwhile) plus compute on `c`, without transfer.
    pub fn prefill_ms(&self, key: &RequestKey, c: &Candidate) -> f64 {
        let wait = c.pull.map_or(c.queue_ms, |p| c.queue_ms.max(p.ms));
        wait + self.compute_ms(key, c)
    }

    /// Conditional disaggregation: whether decode instance `d` prefills this request itself,
    /// because it already holds most of the prompt or too little is left to compute for a
    /// handoff to pay.
    pub fn prefills_locally(&self, key: &RequestKey, d: &Candidate) -> bool {
        let cached = u64::from(d.matched_blocks) * self.cfg.block_size as u64;
        let prompt = u64::from(key.prompt_tokens);
        let uncached = prompt.saturating_sub(cached);
        uncached <= u64::from(self.cfg.disagg.local_prefill_max_tokens)
            || (prompt > 0
                && cached as f64 >= self.cfg.disagg.local_prefill_min_hit * prompt as f64)
    }

    /// What a pull costs the fleet beyond its time: the pulled blocks become a second copy in
    /// `c`'s cache, and a cache that is full evicts as many blocks of other prefixes, which a
    /// later request recomputes. Charged as the compute the pulled blocks stand for, times how
    /// full `c`'s cache is: nothing while there is room, a recompute's worth when every block
    /// placed evicts one. So with roomy caches the fleet pulls freely, and with tight ones a
    /// pull wins a request only where recomputing would also have (then it is the cheaper way).
    pub fn replica_ms(&self, key: &RequestKey, c: &Candidate) -> f64 {
        if c.pull.is_none() {
            return 0.0;
        }
        let local = Candidate { pull: None, ..*c };
        let saved = self.compute_ms(key, &local) - self.compute_ms(key, c);
        saved.max(0.0) * fill(c)
    }

    /// Compute (not queueing) the prefill of this request takes on `c`.
    pub fn compute_ms(&self, key: &RequestKey, c: &Candidate) -> f64 {
        let tokens = self.uncached_tokens(key, c);
        self.cfg.cost.added_prefill_ms(tokens, c.joinable_tokens) * c.speed
    }

    /// TTFT if `c` prefills and the KV moves to a decode instance.
    pub fn ttft_ms(&self, key: &RequestKey, c: &Candidate) -> f64 {
        self.prefill_ms(key, c) + self.transfer_ms(key)
    }

    /// Sequences and context tokens on decode instance `d` at time `at`, with this request added.
    pub fn decode_state_at(&self, key: &RequestKey, d: &Candidate, at: Duration) -> (u64, u64) {
        let seqs = u64::from(d.load.decode_seqs);
        let ended = u64::from((self.ends_before)(d.id, at)).min(seqs);
        let staying = seqs - ended;
        let avg_ctx = d.load.decode_tokens.checked_div(seqs).unwrap_or(0);
        (
            staying + 1,
            staying * avg_ctx + u64::from(key.prompt_tokens),
        )
    }

    /// Time between tokens on `d` once this request joins at `at`.
    pub fn tbt_ms(&self, key: &RequestKey, d: &Candidate, at: Duration) -> f64 {
        let (batch, ctx) = self.decode_state_at(key, d, at);
        self.cfg.cost.decode_step_ms(batch, ctx)
    }

    /// KV blocks this request occupies on decode (prompt plus expected output).
    pub fn decode_blocks(&self, key: &RequestKey) -> u64 {
        self.expected_context(key)
            .div_ceil(self.cfg.block_size.max(1) as u64)
    }

    pub fn expected_context(&self, key: &RequestKey) -> u64 {
        u64::from(key.prompt_tokens) + self.expected_output(key)
    }

    pub fn expected_output(&self, key: &RequestKey) -> u64 {
        (f64::from(key.max_tokens) * self.cfg.cost.output_fraction).ceil() as u64
    }

    /// Time the expected output takes on `d` once this request joins at `at`.
    pub fn decode_ms(&self, key: &RequestKey, d: &Candidate, at: Duration) -> f64 {
        self.tbt_ms(key, d, at) * self.expected_output(key) as f64
    }

    /// What handing the prompt to decode `d` costs its prefix cache, which keeps received KV:
    /// the blocks it does not hold yet, charged as their recompute times how full it is (as a
    /// pull's copy, `replica_ms`). Nothing where the conversation already lives or while the
    /// cache has room; a full one evicts another prefix's blocks for every new one.
    pub fn decode_copy_ms(&self, key: &RequestKey, d: &Candidate) -> f64 {
        let cached = u64::from(d.matched_blocks) * self.cfg.block_size as u64;
        let new = u64::from(key.prompt_tokens).saturating_sub(cached);
        self.cfg.cost.prefill_ms(new) * fill(d)
    }

    /// Whether `d` can hold this request's KV: what the gateway booked there now, plus what the
    /// engine last reported using beyond the gateway's bookings. The engine's usage alone is as
    /// old as its last report, and refused requests into blocks freed since.
    pub fn has_headroom(&self, key: &RequestKey, d: &Candidate) -> bool {
        let used = d.load.decode_blocks.saturating_add(d.load.foreign_blocks);
        used.saturating_add(self.decode_blocks(key)) <= d.capacity_blocks
    }
}

/// How full `c`'s prefix cache is, 0..=1: the share of blocks placed there that evict another.
fn fill(c: &Candidate) -> f64 {
    (c.cached_blocks as f64 / c.capacity_blocks.max(1) as f64).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::InstanceLoad;

    // Built here, not borrowed from `policy::testing`: the policies import this module.
    fn cand(id: u32) -> Candidate {
        Candidate {
            id: InstanceId(id),
            load: InstanceLoad::default(),
            matched_blocks: 0,
            cached_blocks: 0,
            capacity_blocks: 10_000,
            speed: 1.0,
            queue_ms: 0.0,
            joinable_tokens: None,
            pull: None,
        }
    }

    fn key(prompt_tokens: u32) -> RequestKey {
        RequestKey {
            prompt_tokens,
            max_tokens: 16,
            blocks: Vec::new(),
        }
    }

    fn no_ends(_: InstanceId, _: Duration) -> u32 {
        0
    }

    /// 8,192-token prompt (512 blocks of 16) on a cold, idle candidate; instance 7 holds 500.
    fn setup() -> (SchedulerConfig, RequestKey, Candidate, Vec<Holder>) {
        let mut cfg = SchedulerConfig::default();
        cfg.reuse.pull = true;
        let holders = vec![Holder {
            id: InstanceId(7),
            matched_blocks: 500,
            egress_wait_ms: 0.0,
        }];
        (cfg, key(8192), cand(0), holders)
    }

    fn plan(
        cfg: &SchedulerConfig,
        k: &RequestKey,
        c: &Candidate,
        h: &[Holder],
        gbps: f64,
    ) -> Option<Pull> {
        let p = Predictor {
            cfg,
            bytes_per_ms: cfg.cost.prior_bytes_per_ms(),
            now: Duration::ZERO,
            ends_before: &no_ends,
        };
        p.best_pull(k, c, h, &|_, _| gbps * 1e6)
    }

    #[test]
    fn pull_beats_recompute_only_when_bandwidth_says_so() {
        let (cfg, k, c, h) = setup();
        // 500 blocks × 16 tokens × 8 KiB = 65.5 MB. Recomputing 8,192 tokens ≈ 169 ms.
        let fast = plan(&cfg, &k, &c, &h, 2.0).expect("2 GB/s: ≈ 35 ms beats ≈ 169 ms");
        assert_eq!((fast.from, fast.upto_blocks), (InstanceId(7), 500));
        assert_eq!(fast.bytes, 500 * 16 * 8192);
        assert!((fast.ms - (2.0 + fast.bytes as f64 / 2e6)).abs() < 1e-9);
        assert!(
            plan(&cfg, &k, &c, &h, 0.1).is_none(),
            "0.1 GB/s: ≈ 655 ms loses to recomputing"
        );
        // The break-even: pull + compute of the 192-token rest equals the full recompute.
        let p = Predictor {
            cfg: &cfg,
            bytes_per_ms: 1.0,
            now: Duration::ZERO,
            ends_before: &no_ends,
        };
        let rest = cfg.cost.prefill_ms(192);
        let budget = p.prefill_ms(&k, &c) - rest - cfg.reuse.pull_overhead_ms;
        let even_gbps = fast.bytes as f64 / budget / 1e6;
        assert!(plan(&cfg, &k, &c, &h, even_gbps * 1.01).is_some());
        assert!(plan(&cfg, &k, &c, &h, even_gbps * 0.99).is_none());
    }

    #[test]
    fn a_pull_hides_behind_the_queue_and_waits_behind_the_holders_other_pulls() {
        let (cfg, k, mut c, mut h) = setup();
        // At 0.3 GB/s the pull takes ≈ 220 ms: slower than recomputing on an idle instance...
        assert!(plan(&cfg, &k, &c, &h, 0.3).is_none());
        // ...but a queue of 300 ms hides it: the engine pulls while the request waits.
        c.queue_ms = 300.0;
        assert!(plan(&cfg, &k, &c, &h, 0.3).is_some());
        c.queue_ms = 0.0;
        // A holder whose link is busy for 200 ms more with earlier pulls is not worth it.
        h[0].egress_wait_ms = 200.0;
        assert!(plan(&cfg, &k, &c, &h, 2.0).is_none());
    }

    #[test]
    fn local_hits_first_then_the_longest_worthwhile_holder() {
        let (mut cfg, k, mut c, mut h) = setup();
        h.push(Holder {
            id: InstanceId(8),
            matched_blocks: 300,
            egress_wait_ms: 0.0,
        });
        assert_eq!(
            plan(&cfg, &k, &c, &h, 2.0).map(|p| p.from),
            Some(InstanceId(7))
        );
        // Instance 7's link is busy: the shorter but free holder wins.
        h[0].egress_wait_ms = 100.0;
        assert_eq!(
            plan(&cfg, &k, &c, &h, 2.0).map(|p| p.from),
            Some(InstanceId(8))
        );
        // The candidate already caches 498 blocks: 2 more are below min_pull_blocks.
        h[0].egress_wait_ms = 0.0;
        c.matched_blocks = 498;
        assert_eq!(plan(&cfg, &k, &c, &h, 2.0), None);
        c.matched_blocks = 100;
        let p = plan(&cfg, &k, &c, &h, 2.0).expect("400 blocks to pull");
        assert_eq!(p.bytes, 400 * 16 * 8192, "only what is not local moves");
        cfg.reuse.pull = false;
        assert_eq!(plan(&cfg, &k, &c, &h, 2.0), None, "pulls switched off");
    }
}
