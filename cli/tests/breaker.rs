//! Circuit breakers and the decode-only fallback, end to end: a worker that answers `/health` but
//! fails its legs is cut off by its own breaker (never its partner's), comes back through exactly
//! one half-open probe, and a request whose every prefill failed is served by its decode only
//! when the fallback is enabled, and then says so. A decode whose stream breaks after its head
//! went out fails too; a client that leaves mid-stream says nothing about the decode.

mod support;

use pdgate::config::{Protocol, WorkerConfig};
use pdgate::Fleet;
use pdgate_scheduler::{PolicyKind, Role};
use std::time::Duration;
use support::*;

const COOLDOWN_MS: u64 = 500;

fn breaker_config() -> pdgate::config::Config {
    let mut cfg = config(1, 1, 0.0);
    cfg.up.engine.protocol = Protocol::VllmNixl;
    cfg.up.engine.reservation_ttl_secs = 3;
    cfg.scheduler.policy = PolicyKind::RoundRobin;
    cfg.breaker.failure_threshold = 2;
    cfg.breaker.cooldown_ms = COOLDOWN_MS;
    cfg.upstream.prefill_attempts = 2;
    cfg
}

async fn breaker_fleet() -> Fleet {
    fleet(breaker_config()).await
}

async fn add_worker(fleet: &Fleet, url: &str, role: Role) {
    fleet.gateway.add_worker(&WorkerConfig {
        url: url.to_string(),
        role,
        protocol: Protocol::VllmNixl,
        bootstrap_port: None,
    });
    fleet.gateway.check_health().await;
}

async fn send(url: &str, i: usize) -> u16 {
    post(
        url,
        "/v1/completions",
        completion(&format!("breaker {i}"), 2),
    )
    .await
    .status()
    .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_prefill_opens_its_own_breaker_and_half_open_admits_one_probe() {
    let fleet = breaker_fleet().await;
    let url = fleet.url();
    let bad = flaky(engine_url(&fleet, Role::Prefill)).await;
    add_worker(&fleet, &bad.url, Role::Prefill).await;
    let decode = engine_url(&fleet, Role::Decode);

    // Every request succeeds (a failed prefill is retried on the good one) until the bad
    // prefill has failed twice; from then on it gets nothing.
    for i in 0..12 {
        assert_eq!(send(&url, i).await, 200, "request {i}");
    }
    assert_eq!(
        bad.hits(),
        2,
        "breaker opened after 2 failures and kept traffic away"
    );
    assert_eq!(breaker_of(&url, &bad.url).await, "open");
    assert_eq!(
        breaker_of(&url, &decode).await,
        "closed",
        "a prefill failure never counts against the decode that served the same request"
    );
    let m = metrics_text(&url).await;
    assert!(
        m.contains(r#"pdgate_breaker_transitions_total{role="prefill",to="open"} 1"#),
        "{m}"
    );

    // Cooldown over: a burst of concurrent requests lets exactly one probe through; it fails,
    // the breaker reopens, the burst is served by the good prefill.
    tokio::time::sleep(Duration::from_millis(COOLDOWN_MS + 100)).await;
    let burst = (0..8).map(|i| send(&url, 100 + i));
    let statuses = futures::future::join_all(burst).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(bad.hits(), 3, "half-open admitted exactly one probe");
    assert_eq!(
        breaker_of(&url, &bad.url).await,
        "open",
        "failed probe reopens"
    );

    // Healed: after the next cooldown the probe succeeds, the breaker closes and traffic returns.
    bad.set_failing(false);
    tokio::time::sleep(Duration::from_millis(COOLDOWN_MS + 100)).await;
    for i in 0..6 {
        assert_eq!(send(&url, 200 + i).await, 200);
    }
    assert_eq!(breaker_of(&url, &bad.url).await, "closed");
    assert!(
        bad.hits() >= 5,
        "closed breaker shares traffic again: {}",
        bad.hits()
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_decode_opens_only_its_own_breaker() {
    let fleet = breaker_fleet().await;
    let url = fleet.url();
    let bad = flaky(engine_url(&fleet, Role::Decode)).await;
    add_worker(&fleet, &bad.url, Role::Decode).await;
    let prefill = engine_url(&fleet, Role::Prefill);

    // Each decode failure is retried with the good decode before any byte reached the client,
    // so every request succeeds; the bad decode is tried until its breaker opens, then never.
    for i in 0..12 {
        assert_eq!(send(&url, i).await, 200, "request {i}");
    }
    assert_eq!(bad.hits(), 2, "breaker opened after 2 failures");
    assert_eq!(breaker_of(&url, &bad.url).await, "open");
    assert_eq!(
        breaker_of(&url, &prefill).await,
        "closed",
        "the prefill that served those requests is not blamed"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_to_decode_serves_when_every_prefill_failed_and_says_so() {
    for protocol in [
        Protocol::VllmNixl,
        Protocol::VllmMooncake,
        Protocol::Sglang,
        Protocol::Trtllm,
        Protocol::Native,
    ] {
        for enabled in [false, true] {
            let mut cfg = config(1, 1, 0.0);
            cfg.up.engine.protocol = protocol;
            cfg.up.engine.bootstrap_timeout_ms = 3000;
            cfg.upstream.fallback_to_decode = enabled;
            // No health check notices the dead prefill during the test: the legs must.
            cfg.health.interval_ms = 60_000;
            let mut fleet = fleet(cfg).await;
            let idx = fleet
                .engines
                .iter()
                .position(|(r, _)| *r == Role::Prefill)
                .expect("prefill");
            let (_, dead) = fleet.engines.remove(idx);
            dead.stop().await;
            let fallbacks = || async {
                let m = metrics_text(&fleet.url()).await;
                pdgate_wire::prometheus::sample(&m, "pdgate_fallbacks_total").unwrap_or(0.0)
            };
            let before = fallbacks().await;
            let resp = post(&fleet.url(), "/v1/completions", completion("fall back", 3)).await;
            let status = resp.status().as_u16();
            let header = resp
                .headers()
                .get("x-pdgate-fallback")
                .map(|v| v.to_str().unwrap_or("").to_string());
            let body: serde_json::Value = resp.json().await.expect("json");
            let counted = fallbacks().await - before;
            if enabled {
                assert_eq!(status, 200, "{protocol}: {body}");
                assert_eq!(header.as_deref(), Some("decode-prefill"), "{protocol}");
                assert_eq!(body["usage"]["completion_tokens"], 3, "{protocol}");
                assert_eq!(counted, 1.0, "{protocol}: counted");
            } else {
                assert_eq!(status, 503, "{protocol}: no silent fallback: {body}");
                assert_eq!(header, None, "{protocol}");
                assert_eq!(counted, 0.0, "{protocol}");
            }
            fleet.stop().await;
        }
    }
}

/// A streamed completion: `true` if it ended with `[DONE]`, `false` if it ended with the
/// gateway's `decode_stream_interrupted` error event.
async fn stream_completes(url: &str, i: usize, max_tokens: u32) -> bool {
    let mut body = completion(&format!("stream {i}"), max_tokens);
    body["stream"] = serde_json::json!(true);
    let resp = post(url, "/v1/completions", body).await;
    assert_eq!(
        resp.status(),
        200,
        "request {i}: the head goes out before any cut"
    );
    let events = sse_events(&resp.text().await.expect("body"));
    let last = events.last().expect("events");
    if last == "[DONE]" {
        return true;
    }
    assert!(last.contains("decode_stream_interrupted"), "{events:?}");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_cut_mid_stream_opens_its_own_breaker() {
    let mut cfg = breaker_config();
    // Long enough that the breaker stays open for the whole test.
    cfg.breaker.cooldown_ms = 60_000;
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    let good = engine_url(&fleet, Role::Decode);
    let prefill = engine_url(&fleet, Role::Prefill);
    // A second decode, same as the first but crashing two tokens into every stream.
    let (_, template) = fleet
        .engines
        .iter()
        .find(|(r, _)| *r == Role::Decode)
        .expect("decode");
    let mut bad_cfg = template.engine.cfg.clone();
    bad_cfg.port = 0;
    bad_cfg.transfer_port = 0;
    bad_cfg.faults.cut_stream_after_tokens = 2;
    let bad = pdgate_engine_sim::spawn(bad_cfg).await.expect("engine");
    add_worker(&fleet, &bad.url(), Role::Decode).await;

    let migrated = |m: String| {
        pdgate_wire::prometheus::sample(&m, r#"pdgate_migrations_total{outcome="ok"}"#)
            .unwrap_or(0.0)
    };
    let before = migrated(metrics_text(&url).await);
    for i in 0..12 {
        assert!(
            stream_completes(&url, i, 6).await,
            "request {i}: a cut stream is continued on the good decode"
        );
    }
    assert_eq!(
        migrated(metrics_text(&url).await) - before,
        2.0,
        "cut streams count until the breaker opens; then only the good decode"
    );
    assert_eq!(breaker_of(&url, &bad.url()).await, "open");
    assert_eq!(breaker_of(&url, &good).await, "closed");
    assert_eq!(
        breaker_of(&url, &prefill).await,
        "closed",
        "the prefill of a request whose decode broke is not blamed"
    );
    let m = metrics_text(&url).await;
    assert!(
        m.contains(r#"pdgate_breaker_transitions_total{role="decode",to="open"} 1"#),
        "{m}"
    );
    // The cut streams' decode legs count as errors (at least: tests share the recorder).
    assert!(legs(&m, "decode", "error") >= 2.0, "{m}");
    bad.stop().await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_stream_counts_neither_way() {
    let mut cfg = breaker_config();
    cfg.breaker.cooldown_ms = 60_000;
    // Slow enough that a 2,000-token stream is still running when the client leaves; a stream
    // read to the end breaks at token 50.
    cfg.up.engine.timing.time_scale = 0.2;
    cfg.up.engine.faults.cut_stream_after_tokens = 50;
    cfg.scheduler.slo.admission = false;
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    let decode = engine_url(&fleet, Role::Decode);

    assert!(!stream_completes(&url, 0, 60).await, "cut at token 50");
    assert_eq!(
        breaker_of(&url, &decode).await,
        "closed",
        "one failure of two"
    );
    for i in 1..=3 {
        let mut body = completion(&format!("leave early {i}"), 2000);
        body["stream"] = serde_json::json!(true);
        let mut resp = post(&url, "/v1/completions", body).await;
        assert_eq!(resp.status(), 200);
        resp.chunk().await.expect("chunk").expect("first bytes");
        drop(resp);
        let stopped = eventually(Duration::from_secs(5), || async {
            engine_sum(&fleet, Role::Decode, "vllm:num_requests_running").await == 0.0
        })
        .await;
        assert!(stopped, "decode kept generating after the client left");
    }
    assert_eq!(
        breaker_of(&url, &decode).await,
        "closed",
        "a client leaving is no failure of the decode"
    );
    // Only clients leaving make cancelled decode legs in this binary.
    let m = metrics_text(&url).await;
    assert!(legs(&m, "decode", "cancelled") >= 3.0, "{m}");
    // Nor a success: the failure before them still counts, so one more cut opens the breaker.
    assert!(!stream_completes(&url, 4, 60).await);
    assert_eq!(breaker_of(&url, &decode).await, "open");
    fleet.stop().await;
}

/// `pdgate_legs_total{role,outcome}` in a Prometheus text dump (0 when absent).
fn legs(metrics: &str, role: &str, outcome: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("pdgate_legs_total{"))
        .filter(|l| l.contains(&format!("role=\"{role}\"")))
        .filter(|l| l.contains(&format!("outcome=\"{outcome}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
