//! Gateway replicas in the simulator: what each replica may know, proven on crafted workloads.
//! Replicas that share everything at once must route exactly as one gateway does; replicas that
//! know only their own bookings must over-book a hot instance that one gateway would spread.

use pdgate_loadtest::sim::{simulate, Arrivals, FleetSpec, GatewaySpec};
use pdgate_loadtest::trace::types::{Prompt, Trace, TraceRequest};
use pdgate_loadtest::RequestRecord;
use pdgate_scheduler::PolicyKind;
use std::collections::HashMap;

/// `n` requests of 4 shared 512-token blocks of `group` plus one unique block each.
fn requests(n: usize, groups: u64, first: usize) -> Vec<TraceRequest> {
    (0..n)
        .map(|i| {
            let index = first + i;
            let g = index as u64 % groups;
            TraceRequest {
                index,
                arrival_ms: None,
                input_tokens: 5 * 512,
                output_tokens: 32,
                prompt: Prompt::HashIds(vec![
                    g * 10 + 1,
                    g * 10 + 2,
                    g * 10 + 3,
                    g * 10 + 4,
                    1_000_000 + index as u64,
                ]),
            }
        })
        .collect()
}

fn fleet(replicas: usize, sync_lag_ms: Option<f64>) -> FleetSpec {
    let mut f = FleetSpec::new(4, 2);
    f.gateways = GatewaySpec {
        replicas,
        kv_events: true,
        event_lag_ms: 0.0,
        sync_lag_ms,
    };
    // Scrapes run on per-replica timers; off here so only bookings and events differ.
    f.metrics_interval_ms = 0.0;
    f.scheduler.slo.admission = false;
    f
}

fn routes(records: &[RequestRecord]) -> Vec<(Option<String>, Option<u32>)> {
    records
        .iter()
        .map(|r| (r.instance.clone(), r.cached_tokens))
        .collect()
}

/// Requests prefilled by the busiest prefill instance.
fn hottest_prefill(records: &[RequestRecord]) -> usize {
    let mut per: HashMap<String, usize> = HashMap::new();
    for r in records {
        if let Some(p) = r.instance.as_deref().and_then(|i| i.split('>').next()) {
            if p.starts_with('p') {
                *per.entry(p.to_string()).or_default() += 1;
            }
        }
    }
    per.values().copied().max().unwrap_or(0)
}

#[test]
fn replicas_with_instant_sync_route_exactly_like_one_gateway() {
    // Eight prefix groups arriving every 20 ms: enough overlap that the queues matter.
    let trace = Trace {
        requests: requests(240, 8, 0),
        skipped: vec![],
    };
    let times = Arrivals::At((0..240).map(|i| f64::from(i) * 20.0).collect());
    let one = simulate(&trace, &times, &fleet(1, None), PolicyKind::Slo);
    let synced = simulate(&trace, &times, &fleet(4, Some(0.0)), PolicyKind::Slo);
    let alone = simulate(&trace, &times, &fleet(4, None), PolicyKind::Slo);
    assert_eq!(routes(&one.records), routes(&synced.records));
    assert_eq!(one.cache_hit_rate, synced.cache_hit_rate);
    assert_ne!(
        routes(&one.records),
        routes(&alone.records),
        "without sync the replicas' partial views must change some decisions"
    );
}

#[test]
fn replicas_without_sync_overbook_a_hot_instance() {
    // One request caches a 2048-token prefix on a prefill instance (every replica learns it
    // from the KV event); then 32 requests on that prefix arrive at once. One gateway sends the
    // holder only as many as its queue is worth versus recomputing the prefix elsewhere; four
    // replicas each see a quarter of that queue, so together they pile more onto it.
    let trace = Trace {
        requests: requests(33, 1, 0),
        skipped: vec![],
    };
    let times = Arrivals::At(
        std::iter::once(0.0)
            .chain(std::iter::repeat_n(1_000.0, 32))
            .collect(),
    );
    let one = simulate(&trace, &times, &fleet(1, None), PolicyKind::Slo);
    let alone = simulate(&trace, &times, &fleet(4, None), PolicyKind::Slo);
    let synced = simulate(&trace, &times, &fleet(4, Some(0.0)), PolicyKind::Slo);
    let (h1, h4, hs) = (
        hottest_prefill(&one.records),
        hottest_prefill(&alone.records),
        hottest_prefill(&synced.records),
    );
    assert!(
        h4 > h1,
        "unsynced replicas pile more on the hot instance: {h4} vs {h1}"
    );
    assert_eq!(hs, h1, "sync restores one gateway's spread");
}
