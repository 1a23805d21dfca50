//! `pdgate simulate`: the same trace, in virtual time, against a modelled fleet — one run per
//! policy, each producing a `Report` with the replayer's field names so the two compare
//! directly. A one-hour trace takes seconds because nothing sleeps: time jumps from event to
//! event.
//!
//! It reuses, never copies: decisions come from `pdgate-scheduler`, step costs and the prefix
//! cache from `pdgate-engine-sim`; only the event loop is this crate's.

pub mod engine;
pub mod events;
pub mod fleet;
pub mod gateways;

pub use fleet::{simulate, Arrivals, FleetSpec, SimResult};
pub use gateways::GatewaySpec;

use crate::arrivals::Mode;
use crate::metrics::{Aggregates, Slo};
use crate::report::types::Report;
use crate::trace::types::Trace;
use pdgate_scheduler::PolicyKind;
use std::time::Instant;

/// Simulates `trace` under each policy in turn.
pub fn run(
    trace: &Trace,
    mode: Mode,
    spec: &FleetSpec,
    policies: &[PolicyKind],
    slo: &Slo,
    settings: serde_json::Value,
) -> Vec<Report> {
    run_replicas(
        trace,
        mode,
        spec,
        policies,
        &[spec.gateways.replicas],
        slo,
        settings,
    )
}

/// Simulates `trace` under each policy with each count of gateway replicas (policy-major), so a
/// replica study has its single-gateway baseline in the same run. Labels carry the count
/// (`slo ×4`) unless the only count is 1.
pub fn run_replicas(
    trace: &Trace,
    mode: Mode,
    spec: &FleetSpec,
    policies: &[PolicyKind],
    replicas: &[usize],
    slo: &Slo,
    settings: serde_json::Value,
) -> Vec<Report> {
    let arrivals = match mode.schedule(trace) {
        Some(times) => Arrivals::At(times),
        None => match mode {
            Mode::Closed { concurrency } => Arrivals::Closed(concurrency),
            _ => Arrivals::At(vec![0.0; trace.requests.len()]),
        },
    };
    let pooled = pooled_lru_hit_rate(trace, spec);
    let labelled = replicas != [1];
    let mut reports = Vec::new();
    for &policy in policies {
        for &n in replicas {
            let mut spec = spec.clone();
            spec.gateways.replicas = n.max(1);
            let started = Instant::now();
            let result = simulate(trace, &arrivals, &spec, policy);
            let mut aggregates = Aggregates::compute(&result.records, slo);
            aggregates.cache_hit_rate = result.cache_hit_rate;
            let mut settings = settings.clone();
            settings["events"] = result.events.into();
            settings["replicas"] = spec.gateways.replicas.into();
            settings["pulls"] = result.pulls.into();
            settings["pull_misses"] = result.pull_misses.into();
            settings["host_hit_blocks"] = result.host_hit_blocks.into();
            if let (Some(all), Some(pulled)) = (result.cache_hit_rate, result.pulled_hit_rate) {
                settings["local_hit_rate"] = (all - pulled).into();
                settings["pulled_hit_rate"] = pulled.into();
            }
            settings["pooled_lru_hit_rate"] = pooled.into();
            if let Some(reachable) = result.reachable_hit_rate {
                settings["reachable_hit_rate"] = reachable.into();
            }
            reports.push(Report {
                kind: "simulate".into(),
                label: if labelled {
                    format!("{} ×{}", policy.as_str(), spec.gateways.replicas)
                } else {
                    policy.as_str().into()
                },
                settings,
                aggregates,
                instances: result.instances,
                server: None,
                skipped: trace.skipped.clone(),
                not_sent: 0,
                wall_s: started.elapsed().as_secs_f64(),
                records: result.records,
            });
        }
    }
    reports
}

/// The hit rate of one LRU prefix cache as large as the whole fleet's caches together, fed every
/// request in arrival order: the bound a perfectly shared cache would reach, with no placement
/// and no copies.
pub fn pooled_lru_hit_rate(trace: &Trace, spec: &FleetSpec) -> f64 {
    let bs = spec.engine.block_size.max(1);
    let capacity = spec.prefill * spec.engine.kv_blocks + spec.decode * spec.decode_cache_blocks;
    let mut cache = pdgate_engine_sim::cache::PrefixCache::new(capacity);
    let (mut hits, mut queries) = (0u64, 0u64);
    for req in &trace.requests {
        let blocks = crate::synth::engine_blocks(req, bs);
        let prompt = u64::from(req.input_tokens);
        hits += ((cache.match_prefix(&blocks) * bs) as u64).min(prompt);
        queries += prompt;
        cache.insert(&blocks);
    }
    if queries == 0 {
        0.0
    } else {
        hits as f64 / queries as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::synthetic::Spec;

    /// `trace` at its own pace on `fleet` under one policy.
    fn run_one(trace: &Trace, fleet: &FleetSpec, policy: PolicyKind) -> Report {
        let mode = Mode::TraceTime { speed: 1.0 };
        let mut r = run(
            trace,
            mode,
            fleet,
            &[policy],
            &Slo::default(),
            serde_json::json!({}),
        );
        r.remove(0)
    }

    /// At 10x overload with the room line on, heads of the line poll until their wait runs
    /// out. The last poll must land on the deadline itself: one computed from the time left
    /// rounded to no time at all and asked again at the same instant, forever.
    #[test]
    fn waiters_for_room_give_up_at_their_deadline_under_overload() {
        let spec: Spec =
            "requests=300,rate=200,input=6000,input_sd=2000,output=64,output_sd=16,seed=3"
                .parse()
                .expect("spec");
        let trace = spec.generate();
        let mut fleet = FleetSpec::new(2, 2);
        fleet.engine.kv_blocks = 2048;
        fleet.scheduler.slo.room_queue = 64;
        // A liveness guard, not a speed target: the run takes well under a second.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(run_one(&trace, &fleet, PolicyKind::Slo));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("the simulation ends");
        let a = &r.aggregates;
        assert_eq!(a.completed + a.failed, 300, "every request ends");
        assert!(
            a.errors.get("429/kv_full").copied().unwrap_or(0) > 0,
            "some waited out their room: {:?}",
            a.errors
        );
    }

    /// `short` repeats of one 1k-token prompt, 100 ms apart (each after the first finds it
    /// cached: the fleet's prompts are reused), then 20 prompts that share a 30,720-token
    /// prefix, 500 ms apart, from 10 s on.
    fn reuse_then_long_prefix(short: usize) -> Trace {
        use crate::trace::types::{Prompt, TraceRequest};
        let req = |index: usize, at: f64, ids: Vec<u64>| TraceRequest {
            index,
            arrival_ms: Some(at),
            input_tokens: (ids.len() * 512) as u32,
            output_tokens: 8,
            prompt: Prompt::HashIds(ids),
        };
        let mut requests: Vec<_> = (0..short)
            .map(|i| req(i, i as f64 * 100.0, vec![1, 2]))
            .collect();
        for k in 0..20u64 {
            let mut ids: Vec<u64> = (100..160).collect();
            ids.push(1_000 + k);
            requests.push(req(requests.len(), 10_000.0 + 500.0 * k as f64, ids));
        }
        Trace {
            requests,
            skipped: Vec::new(),
        }
    }

    /// The long prefix's prefill alone (~0.9 s) outlasts a 0.5 s TTFT SLO. Refusing the first
    /// request that carries it leaves it uncached, so each later one is as long to prefill and
    /// refused in turn: none of the 20 is served. Served best effort (the fleet's prompts are
    /// reused), the first is late and the prefix it leaves cached makes the rest fast and good.
    /// Where nothing showed reuse before them, they are refused as before.
    #[test]
    fn a_prompt_late_even_alone_is_served_so_the_prefix_it_leaves_serves_the_rest() {
        let slo = Slo {
            ttft_ms: Some(500.0),
            ..Slo::default()
        };
        let long = |trace: &Trace, share: f64| {
            let mut fleet = FleetSpec::new(1, 1);
            fleet.engine.kv_blocks = 16_384;
            fleet.decode_cache_blocks = 16_384;
            fleet.engine.kv_bytes_per_token = 64; // the handoff is not what is slow here
            fleet.scheduler.kv_bytes_per_token = 64;
            fleet.scheduler.slo.ttft_ms = 500.0;
            fleet.scheduler.slo.best_effort_share = share;
            let mode = Mode::TraceTime { speed: 1.0 };
            let r = run(
                trace,
                mode,
                &fleet,
                &[PolicyKind::Slo],
                &slo,
                serde_json::json!({}),
            );
            let long = trace.requests.len() - 20;
            let s = Aggregates::compute(&r.into_iter().next().expect("one").records[long..], &slo);
            (s.good_requests.unwrap_or(0), s.failed)
        };
        let reused = reuse_then_long_prefix(100);
        assert_eq!(long(&reused, 0.0), (0, 20), "best effort off: all refused");
        let (good, failed) = long(&reused, 0.25);
        assert_eq!(failed, 0, "all served");
        assert!(good >= 18, "all but the first are on time: {good}");
        assert_eq!(
            long(&reuse_then_long_prefix(0), 0.25),
            (0, 20),
            "no reuse seen: refused"
        );
    }

    /// Turns of a conversation that `round_robin` deals to either of two prefills: with pulls
    /// off, the prefix a turn needs usually sits on the other one, so the fleet held more than
    /// the runners hit; pulls close that gap. Hits never exceed what the fleet held.
    #[test]
    fn the_reachable_hit_rate_is_what_the_fleet_held_and_pulls_reach_it() {
        let spec: Spec = "requests=60,rate=4,input=2000,input_sd=300,output=8,output_sd=0,groups=4,prefix=1024,turns=3,think_ms=300,seed=5"
            .parse()
            .expect("spec");
        let trace = spec.generate();
        let rates = |pull: bool| {
            let mut fleet = FleetSpec::new(2, 1);
            fleet.scheduler.reuse.pull = pull;
            let r = run_one(&trace, &fleet, PolicyKind::RoundRobin);
            let hit = r.aggregates.cache_hit_rate.expect("prompts seen");
            let reachable = r.settings["reachable_hit_rate"].as_f64().expect("reported");
            (hit, reachable)
        };
        let (off_hit, off_reach) = rates(false);
        assert!(
            off_reach > off_hit + 0.1,
            "held elsewhere, recomputed: {off_hit} vs {off_reach}"
        );
        let (on_hit, on_reach) = rates(true);
        assert!(on_reach >= on_hit && on_reach <= 1.0);
        assert!(
            on_reach - on_hit < (off_reach - off_hit) / 2.0,
            "pulls serve most of it: off {off_hit}/{off_reach}, on {on_hit}/{on_reach}"
        );
    }

    /// 100 repeats of a one-block prompt (the fleet learns its typical prompt), then 40
    /// documents of 2k tokens asked in turn, five times over, one request at a time, on one
    /// prefill and one decode whose caches hold 32 documents each. Two copies of every document
    /// (the prefill's and the decode's) make each cache an LRU of 32 cycled through 40: every
    /// document is evicted just before it is asked again. With one copy per handoff each side
    /// keeps about half and both hold all forty between them.
    #[test]
    fn one_copy_per_handoff_lets_two_caches_hold_what_one_copy_each_cannot() {
        use crate::trace::types::{Prompt, TraceRequest};
        let req = |index: usize, ids: Vec<u64>| TraceRequest {
            index,
            arrival_ms: Some(index as f64 * 1000.0),
            input_tokens: (ids.len() * 512) as u32,
            output_tokens: 4,
            prompt: Prompt::HashIds(ids),
        };
        let mut requests: Vec<_> = (0..100).map(|i| req(i, vec![1])).collect();
        for _pass in 0..5 {
            for doc in 0..40u64 {
                let ids = (0..4).map(|b| 1_000 + doc * 10 + b).collect();
                requests.push(req(requests.len(), ids));
            }
        }
        let trace = Trace {
            requests,
            skipped: Vec::new(),
        };
        let hit_rate = |one_copy: bool| {
            let mut fleet = FleetSpec::new(1, 1);
            fleet.engine.kv_blocks = 4096;
            fleet.decode_cache_blocks = 4096;
            fleet.scheduler.reuse.one_copy = one_copy;
            let r = run_one(&trace, &fleet, PolicyKind::Slo);
            let docs = &r.records[100..];
            assert!(docs.iter().all(|d| d.error.is_none()), "all served");
            let cached: u64 = docs
                .iter()
                .map(|d| u64::from(d.cached_tokens.unwrap_or(0)))
                .sum();
            let asked: u64 = docs.iter().map(|d| u64::from(d.input_tokens)).sum();
            cached as f64 / asked as f64
        };
        let (two, one) = (hit_rate(false), hit_rate(true));
        assert!(two < 0.1, "two copies: each cache cycles ({two})");
        // The first pass computes everything: 0.8 is every later one served from a cache.
        assert!(
            one > 0.7,
            "one copy: all forty held after the first pass ({one})"
        );
    }
}
