//! Waiting for KV room in the simulator, as the gateway waits: a request that finds every
//! decode's pool booked full is asked again until room frees or `slo.room_wait_ms` passes, and
//! its wait counts into its TTFT.

use pdgate_loadtest::sim::{simulate, Arrivals, FleetSpec};
use pdgate_loadtest::trace::types::{Prompt, Trace, TraceRequest};
use pdgate_scheduler::PolicyKind;

/// One prefill, one decode whose pool (64 blocks of 16 tokens) the scheduler books for a
/// prompt plus its `max_tokens`: request 0 (512 + 150 tokens: 42 blocks) leaves no room for
/// request 1 (512 + 100: 39 blocks) until it ends, about 0.9 s of decoding later. The TTFT
/// SLO is `ttft_slo_ms`.
fn run(room_wait_ms: f64, ttft_slo_ms: f64) -> pdgate_loadtest::sim::SimResult {
    let req = |index: usize, output_tokens: u32| TraceRequest {
        index,
        arrival_ms: None,
        input_tokens: 512,
        output_tokens,
        prompt: Prompt::HashIds(vec![index as u64 + 1]),
    };
    let trace = Trace {
        requests: vec![req(0, 150), req(1, 100)],
        skipped: vec![],
    };
    let mut fleet = FleetSpec::new(1, 1);
    fleet.engine.kv_blocks = 64;
    fleet.decode_cache_blocks = 64;
    fleet.scheduler.slo.room_wait_ms = room_wait_ms;
    fleet.scheduler.slo.room_queue = 8;
    fleet.scheduler.slo.ttft_ms = ttft_slo_ms;
    simulate(
        &trace,
        &Arrivals::At(vec![0.0, 50.0]),
        &fleet,
        PolicyKind::Slo,
    )
}

#[test]
fn a_request_waits_for_room_and_its_wait_is_in_its_ttft() {
    let served = run(1500.0, 2000.0);
    let (first, second) = (&served.records[0], &served.records[1]);
    assert!(first.ok() && second.ok(), "{:?}", second.error);
    let first_end = first.sent_ms + first.e2el_ms.expect("ended");
    let second_ttft = second.ttft_ms.expect("first token");
    assert!(
        second.sent_ms + second_ttft >= first_end,
        "admitted only once the first stream freed its blocks ({} < {first_end})",
        second.sent_ms + second_ttft
    );
    assert!(second_ttft > 500.0, "the wait is counted: {second_ttft} ms");

    let refused = run(0.0, 2000.0);
    let err = refused.records[1].error.as_ref().expect("refused");
    assert_eq!((err.status, err.kind.as_str()), (Some(429), "kv_full"));
}

/// Room frees after ~0.9 s of waiting; a 600 ms TTFT SLO cannot be met by then. The wait ends
/// when the request's slack (the SLO less its predicted TTFT) does, well before its 5 s
/// `room_wait_ms` and before room frees: refused `kv_full` then, not after the whole wait.
#[test]
fn a_wait_that_would_break_the_ttft_slo_ends_with_its_slack() {
    let late = run(5000.0, 600.0);
    let second = &late.records[1];
    let err = second.error.as_ref().expect("refused");
    assert_eq!((err.status, err.kind.as_str()), (Some(429), "kv_full"));
    let waited = second.e2el_ms.expect("answered");
    assert!(
        waited > 300.0 && waited <= 600.0,
        "waited its slack, no more: {waited} ms"
    );
}
