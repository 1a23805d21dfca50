//! Pair-selection policies: one trait, one file per implementation, each documented with its
//! formula. A policy sees only healthy candidates (never an empty list), with their load and how
//! many leading blocks of the request each holds, and returns the pair or a rejection.

mod build;
mod cache_aware;
mod kv_cost;
mod least_load;
mod power_of_two;
mod random;
mod round_robin;
mod slo;

use crate::predict::Predictor;
use crate::types::{InstanceId, Rejection, RequestKey};
// Defined in `config` so the config need not import the policies; re-exported for callers that
// name it by its old path (`pdgate_scheduler::policy::PolicyKind`).
pub use crate::config::PolicyKind;
// Defined in `candidate` so predictions need not import the policies; re-exported for callers
// that name it by its old path.
pub use crate::candidate::Candidate;

pub struct PickCtx<'a> {
    pub key: &'a RequestKey,
    pub prefill: &'a [Candidate],
    pub decode: &'a [Candidate],
    pub predict: &'a Predictor<'a>,
    /// How long the request already waited for a decode with KV room, ms: part of its TTFT.
    pub waited_ms: f64,
    /// Share of a request's prompt blocks the fleet already cached, over recent decisions.
    pub reuse: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub prefill: InstanceId,
    pub decode: InstanceId,
}

pub trait Policy: Send {
    fn name(&self) -> &'static str;

    /// Picks a pair from the candidates (both non-empty) or rejects the request.
    fn pick(&mut self, ctx: &PickCtx<'_>) -> Result<Choice, Rejection>;
}

/// The candidate minimising `key`, first on ties (callers order candidates by id).
pub(crate) fn argmin_by<K: PartialOrd>(
    cands: &[Candidate],
    key: impl Fn(&Candidate) -> K,
) -> InstanceId {
    let mut best = &cands[0];
    let mut best_key = key(best);
    for c in &cands[1..] {
        let k = key(c);
        if k < best_key {
            best = c;
            best_key = k;
        }
    }
    best.id
}

#[cfg(test)]
pub(crate) mod testing {
    //! Hand-built states for policy tests.
    use super::*;
    use crate::config::SchedulerConfig;
    use crate::load::InstanceLoad;
    use std::time::Duration;

    pub fn cand(id: u32) -> Candidate {
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

    pub fn key(prompt_tokens: u32) -> RequestKey {
        RequestKey {
            prompt_tokens,
            max_tokens: 16,
            blocks: Vec::new(),
        }
    }

    pub fn no_ends(_: InstanceId, _: Duration) -> u32 {
        0
    }

    pub fn pick(
        policy: &mut dyn Policy,
        cfg: &SchedulerConfig,
        key: &RequestKey,
        p: &[Candidate],
        d: &[Candidate],
    ) -> Result<Choice, Rejection> {
        pick_after(policy, cfg, key, p, d, 0.0, 1.0)
    }

    /// As `pick`, for a request that already waited `waited_ms` for room, in a fleet whose
    /// prompts are found `reuse` cached.
    pub fn pick_after(
        policy: &mut dyn Policy,
        cfg: &SchedulerConfig,
        key: &RequestKey,
        p: &[Candidate],
        d: &[Candidate],
        waited_ms: f64,
        reuse: f64,
    ) -> Result<Choice, Rejection> {
        let predict = Predictor {
            cfg,
            bytes_per_ms: cfg.cost.prior_bytes_per_ms(),
            now: Duration::ZERO,
            ends_before: &no_ends,
        };
        policy.pick(&PickCtx {
            key,
            prefill: p,
            decode: d,
            predict: &predict,
            waited_ms,
            reuse,
        })
    }
}
