//! Latency predictions for a request on a candidate instance, shared by the `slo` policy (which
//! decides on them) and the scheduler (which reports them next to what was then observed).
//!
//! TTFT = queued prefill work + prefill of the uncached tokens (both scaled by the instance's
//! measured speed) + KV transfer at the measured bandwidth. TBT = one decode step with the batch
//! the decode instance is expected to hold when this request's prefill finishes.

use crate::candidate::Candidate;
use crate::config::SchedulerConfig;
use crate::types::{InstanceId, RequestKey};
use std::time::Duration;

/// How many of a decode instance's sequences are expected to have finished by a given time.
pub type EndsBefore<'a> = &'a dyn Fn(InstanceId, Duration) -> u32;

pub struct Predictor<'a> {
    pub cfg: &'a SchedulerConfig,
    pub bytes_per_ms: f64,
    pub now: Duration,
    pub ends_before: EndsBefore<'a>,
}

impl Predictor<'_> {
    pub fn uncached_tokens(&self, key: &RequestKey, c: &Candidate) -> u64 {
        let cached = u64::from(c.matched_blocks) * self.cfg.block_size as u64;
        u64::from(key.prompt_tokens).saturating_sub(cached)
    }

    pub fn kv_bytes(&self, key: &RequestKey) -> u64 {
        u64::from(key.prompt_tokens) * self.cfg.kv_bytes_per_token
    }

    pub fn transfer_ms(&self, key: &RequestKey) -> f64 {
        self.kv_bytes(key) as f64 / self.bytes_per_ms.max(1.0)
    }

    /// Queue plus compute on `c`, without transfer.
    pub fn prefill_ms(&self, key: &RequestKey, c: &Candidate) -> f64 {
        let cost = &self.cfg.cost;
        c.queue_ms + cost.prefill_ms(self.uncached_tokens(key, c)) * c.speed
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

    /// Compute (not queueing) the prefill of this request takes on `c`.
    pub fn compute_ms(&self, key: &RequestKey, c: &Candidate) -> f64 {
        self.cfg.cost.prefill_ms(self.uncached_tokens(key, c)) * c.speed
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
        let out = (f64::from(key.max_tokens) * self.cfg.cost.output_fraction).ceil() as u64;
        u64::from(key.prompt_tokens) + out
    }

    /// Whether `d` can hold this request's KV (booked blocks, and the engine's own usage).
    pub fn has_headroom(&self, key: &RequestKey, d: &Candidate) -> bool {
        let need = self.decode_blocks(key);
        let booked_ok = d.load.decode_blocks + need <= d.capacity_blocks;
        let engine_ok = d.load.engine.is_none_or(|e| {
            let free = (1.0 - e.kv_usage).max(0.0) * d.capacity_blocks as f64;
            free >= need as f64
        });
        booked_ok && engine_ok
    }
}
