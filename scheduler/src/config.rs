//! The scheduler's configuration: one struct tree with serde defaults, embedded by the gateway's
//! config (`[scheduler]`) and built directly by the simulator. The only source of these defaults.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    pub policy: PolicyKind,
    /// Seed of randomised policies, for reproducible runs.
    pub seed: u64,
    /// Tokens per KV block of the engines; prefix keys are cut at this size.
    pub block_size: usize,
    /// KV-cache bytes per token of the served model: what a handoff moves.
    pub kv_bytes_per_token: u64,
    pub slo: Slo,
    pub cost: CostModel,
    pub index: IndexConfig,
    pub disagg: DisaggConfig,
    pub reuse: ReuseConfig,
    pub cache_aware: CacheAwareConfig,
    pub kv_cost: KvCostConfig,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            policy: PolicyKind::default(),
            seed: 0,
            block_size: 16,
            kv_bytes_per_token: 8 * 1024,
            slo: Slo::default(),
            cost: CostModel::default(),
            index: IndexConfig::default(),
            disagg: DisaggConfig::default(),
            reuse: ReuseConfig::default(),
            cache_aware: CacheAwareConfig::default(),
            kv_cost: KvCostConfig::default(),
        }
    }
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

/// How often a request waiting for KV room (`Slo::room_wait_ms`) asks the scheduler again, ms;
/// the gateway and the simulator both poll at this rate.
pub const ROOM_POLL_MS: u64 = 10;

/// Service-level objectives the `slo` policy admits against.
///
/// Defaults suit an interactive chat service on an 8B-class model: first token within 2 s, and a
/// token every 100 ms at most once streaming (10 tokens/s is a comfortable reading speed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Slo {
    pub ttft_ms: f64,
    pub tbt_ms: f64,
    /// When false the `slo` policy still picks by predicted TTFT but never rejects.
    pub admission: bool,
    /// Weight, in the `slo` policy's choice of prefill instance, of the prefill compute a choice
    /// takes from the fleet, on top of its TTFT. Above 0 it favours reusing a cached prefix over
    /// a slightly faster first token elsewhere: the compute saved is capacity for later requests,
    /// which is what goodput under load is made of.
    pub compute_weight: f64,
    /// A retry or a migration (already admitted) that finds every other decode's KV pool booked
    /// full waits up to this long, ms, for streams there to end and free room (asking again
    /// every `ROOM_POLL_MS`), then gets 429 `kv_full`; so does a new request when `room_queue`
    /// lets it wait, its wait counted into its TTFT (admitted only if its TTFT SLO can still be
    /// met). 0: refused at once.
    pub room_wait_ms: f64,
    /// Most new requests of one model waiting for room at once. They wait in one line, first
    /// come first served, and a request joins only while the line is predicted to serve it
    /// within `room_wait_ms` (`room::RoomLine`) and within its TTFT slack; the rest are refused
    /// at once. 0: new requests are refused at once and only retries and migrations (already
    /// admitted, never queued) wait. 2 by default: enough to catch the room a finishing stream
    /// frees moments later (at 4x load on tight decode pools `slo` serves 1,993 of 2,000 where
    /// it served 1,982), short enough that at 5x overload the few waiters that time out stay
    /// below the 99th percentile of refusals (p99 3 ms live, as with 0; a line of 64 made it
    /// 1 s, docs/reliability.md).
    pub room_queue: u32,
    /// Admission sheds load: it refuses requests that waiting would make late. A request that
    /// is late even on an idle instance (a prompt whose prefill alone takes longer than the
    /// TTFT SLO) is no such request: refusing it frees nothing a retry could use, and leaves its
    /// prefix uncached, so every later request sharing that prefix pays it again and is refused
    /// in turn. It is served best effort (late) instead when the wait ahead of it is within the
    /// SLO and its KV is at most this share of its prefill's cache and of its decode's pool, so
    /// it cannot crowd either out. 0: refused like any late request.
    pub best_effort_share: f64,
    /// ...and only while the fleet's prompts are reused: the share of a request's prompt blocks
    /// some instance already cached, averaged over about the last hundred decisions, is at
    /// least this. Where prompts share nothing, a late prompt's prefix serves no one later, and
    /// computing it only delays the requests behind it.
    pub best_effort_min_reuse: f64,
}

impl Default for Slo {
    fn default() -> Self {
        Self {
            ttft_ms: 2000.0,
            tbt_ms: 100.0,
            admission: true,
            compute_weight: 1.0,
            room_wait_ms: 1000.0,
            room_queue: 2,
            best_effort_share: 0.25,
            best_effort_min_reuse: 0.1,
        }
    }
}

/// The scheduler's prior model of an engine, corrected online by measured EWMAs.
///
/// Prefill `a·T² + b·T + c` ms over uncached tokens and the decode step model default to the
/// coefficients NVIDIA Dynamo's mocker uses for an 8B-class model on one H100-class GPU (the
/// reference engine uses the same, so an uncorrected prediction is right on the demo fleet).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CostModel {
    pub prefill_a: f64,
    pub prefill_b: f64,
    pub prefill_c: f64,
    pub decode_base_ms: f64,
    pub decode_per_seq_ms: f64,
    pub decode_per_ktoken_ms: f64,
    /// Prompt tokens an engine prefills per step at most (queued work runs in such chunks).
    pub max_batched_tokens: u64,
    /// Prior KV transfer bandwidth in GB/s, until handoffs have been measured.
    pub transfer_gbps: f64,
    /// Weight of a new sample in the EWMAs of measured prefill speed and bandwidth.
    pub ewma_alpha: f64,
    /// Expected output length as a fraction of `max_tokens`, for decode load predictions.
    pub output_fraction: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            prefill_a: 4.21e-7,
            prefill_b: 1.518e-2,
            prefill_c: 16.5,
            decode_base_ms: 6.0,
            decode_per_seq_ms: 0.04,
            decode_per_ktoken_ms: 0.02,
            max_batched_tokens: 8192,
            transfer_gbps: 2.0,
            ewma_alpha: 0.2,
            output_fraction: 1.0,
        }
    }
}

/// The prefix index: which instance holds which blocks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IndexConfig {
    /// Entries learnt from routing decisions (not engine events) are forgotten after this.
    pub ttl_secs: u64,
    /// Blocks remembered per instance when the instance's own capacity is not known.
    pub default_capacity_blocks: u64,
    /// Memory cap of the whole index; beyond it the largest instance's oldest blocks go.
    pub max_bytes: u64,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            ttl_secs: 120,
            default_capacity_blocks: 65_536,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Conditional disaggregation: when moving the prompt is not worth it, the decode instance
/// prefills locally.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DisaggConfig {
    /// Prefill locally on decode when at most this many prompt tokens are uncached there.
    pub local_prefill_max_tokens: u32,
    /// Or when decode already holds at least this fraction of the prompt.
    pub local_prefill_min_hit: f64,
}

impl Default for DisaggConfig {
    fn default() -> Self {
        Self {
            local_prefill_max_tokens: 0,
            local_prefill_min_hit: 0.9,
        }
    }
}

/// Global KV reuse: a prefix another instance caches can be pulled by the instance that prefills
/// instead of recomputed, when the pull is predicted to finish sooner.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ReuseConfig {
    /// Plan pulls at all. Off, a prefix counts only on the instance that holds it. Off by
    /// default: the gateway does not yet hand the plan to engines, so live a planned pull would
    /// be a recompute the prediction did not count; `pdgate simulate` models it.
    pub pull: bool,
    /// A pull of fewer blocks than this is not worth its round trip.
    pub min_pull_blocks: u32,
    /// Fixed cost of one pull (lease, request, verification), ms, on top of bytes over bandwidth.
    pub pull_overhead_ms: f64,
    /// One copy per handoff: the prefill or the decode (a hash of the prompt picks, weighted by
    /// the sides' cache sizes) marks its copy of a handed-off prompt to be evicted first, so the
    /// fleet's caches hold distinct blocks instead of two copies of each (`copies.rs`). Needs
    /// engines that take the mark (the reference engine, native protocol); others ignore it.
    pub one_copy: bool,
    /// Only when both caches hold at least this many prompts of the request's size: smaller
    /// caches turn over too fast for a second copy to cost anything.
    pub one_copy_min_prompts: u32,
}

impl Default for ReuseConfig {
    fn default() -> Self {
        Self {
            pull: false,
            min_pull_blocks: 4,
            pull_overhead_ms: 2.0,
            one_copy: true,
            one_copy_min_prompts: 16,
        }
    }
}

/// The SGLang router's `cache_aware` knobs, with its defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CacheAwareConfig {
    pub match_threshold: f64,
    pub balance_abs_threshold: u32,
    pub balance_rel_threshold: f64,
}

impl Default for CacheAwareConfig {
    fn default() -> Self {
        Self {
            match_threshold: 0.3,
            balance_abs_threshold: 64,
            balance_rel_threshold: 1.5,
        }
    }
}

/// NVIDIA Dynamo's KV-router cost knobs, with its defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KvCostConfig {
    pub prefill_weight: f64,
    /// 0 picks the cheapest; above 0 samples a softmax over normalised costs.
    pub temperature: f64,
}

impl Default for KvCostConfig {
    fn default() -> Self {
        Self {
            prefill_weight: 1.0,
            temperature: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_name() {
        for k in PolicyKind::ALL {
            assert_eq!(k.as_str().parse::<PolicyKind>(), Ok(k));
        }
        assert!("cache_awareness".parse::<PolicyKind>().is_err());
        assert_eq!(PolicyKind::default(), PolicyKind::Slo);
    }
}
