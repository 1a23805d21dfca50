//! Pair-selection policies: one trait, one file per implementation, each documented with its
//! formula. A policy sees only healthy candidates (never an empty list), with their load and how
//! many leading blocks of the request each holds, and returns the pair or a rejection.

mod cache_aware;
mod kv_cost;
mod least_load;
mod power_of_two;
mod random;
mod round_robin;
mod slo;

use crate::load::InstanceLoad;
use crate::predict::Predictor;
use crate::types::{InstanceId, Rejection, RequestKey};
use serde::{Deserialize, Serialize};

/// One instance as a policy sees it for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub id: InstanceId,
    pub load: InstanceLoad,
    /// Leading blocks of the request this instance holds (from the prefix index).
    pub matched_blocks: u32,
    /// Blocks the index holds for this instance in all (its "tree size").
    pub cached_blocks: u64,
    /// KV blocks the instance's cache holds at most.
    pub capacity_blocks: u64,
    /// Measured over modelled prefill time (EWMA); 1.0 means as modelled.
    pub speed: f64,
    /// Predicted wait before a new prefill starts here: booked prefill work not yet done, less
    /// what has elapsed of the one running.
    pub queue_ms: f64,
}

pub struct PickCtx<'a> {
    pub key: &'a RequestKey,
    pub prefill: &'a [Candidate],
    pub decode: &'a [Candidate],
    pub predict: &'a Predictor<'a>,
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

/// The policies that can be named in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    RoundRobin,
    Random,
    PowerOfTwo,
    LeastLoad,
    CacheAware,
    KvCost,
    #[default]
    Slo,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 7] = [
        PolicyKind::RoundRobin,
        PolicyKind::Random,
        PolicyKind::PowerOfTwo,
        PolicyKind::LeastLoad,
        PolicyKind::CacheAware,
        PolicyKind::KvCost,
        PolicyKind::Slo,
    ];

    pub fn build(self, cfg: &crate::config::SchedulerConfig) -> Box<dyn Policy> {
        match self {
            PolicyKind::RoundRobin => Box::new(round_robin::RoundRobin::default()),
            PolicyKind::Random => Box::new(random::Random::new(cfg.seed)),
            PolicyKind::PowerOfTwo => Box::new(power_of_two::PowerOfTwo::new(cfg.seed)),
            PolicyKind::LeastLoad => Box::new(least_load::LeastLoad),
            PolicyKind::CacheAware => {
                Box::new(cache_aware::CacheAware::new(cfg.cache_aware.clone()))
            }
            PolicyKind::KvCost => Box::new(kv_cost::KvCost::new(cfg.kv_cost.clone(), cfg.seed)),
            PolicyKind::Slo => Box::new(slo::SloPolicy),
        }
    }

    /// Whether the policy's choice is always among the cache holders and the least-loaded few,
    /// so large fleets can be shortlisted. Baselines that look at every instance (rotation,
    /// sampling, SGLang's min/max load gate and smallest tree) are given the whole fleet.
    pub fn shortlists(self) -> bool {
        matches!(
            self,
            PolicyKind::Slo | PolicyKind::KvCost | PolicyKind::LeastLoad
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "round_robin",
            PolicyKind::Random => "random",
            PolicyKind::PowerOfTwo => "power_of_two",
            PolicyKind::LeastLoad => "least_load",
            PolicyKind::CacheAware => "cache_aware",
            PolicyKind::KvCost => "kv_cost",
            PolicyKind::Slo => "slo",
        }
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown policy `{s}` (expected one of {})",
                    names.join(", ")
                )
            })
    }
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SchedulerConfig;

    #[test]
    fn every_kind_round_trips_through_its_name() {
        let cfg = SchedulerConfig::default();
        for k in PolicyKind::ALL {
            assert_eq!(k.as_str().parse::<PolicyKind>(), Ok(k));
            assert_eq!(k.build(&cfg).name(), k.as_str());
        }
        assert!("cache_awareness".parse::<PolicyKind>().is_err());
        assert_eq!(PolicyKind::default(), PolicyKind::Slo);
    }
}
