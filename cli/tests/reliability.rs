//! No pre-stream loss (issue 15): a decode that fails before the first byte reaches the client
//! is retried with a fresh pair that avoids it, for every PD protocol, with nothing left reserved
//! on the engines; and when the retry budget is spent the request gets a fast 503 with
//! `Retry-After` instead of a retry.

mod support;

use pdgate::config::{Protocol, WorkerConfig};
use pdgate::Fleet;
use pdgate_scheduler::{PolicyKind, Role};
use support::*;

/// The URL of the last engine of `role`.
fn last_engine_url(fleet: &Fleet, role: Role) -> String {
    fleet
        .engines
        .iter()
        .rfind(|(r, _)| *r == role)
        .expect("engine")
        .1
        .url()
}

/// One prefill, one good decode and a decode that fails every `/v1/*` call while its health
/// checks pass (the second decode engine, reachable only through a failing proxy): only the
/// request path can find it out. Breakers off, so every request scheduled on it meets the
/// failure.
async fn fleet_with_failing_decode(
    protocol: Protocol,
    budget: (u32, usize),
) -> (Fleet, std::sync::Arc<Flaky>) {
    let mut cfg = config(1, 2, 0.0);
    cfg.up.engine.protocol = protocol;
    cfg.up.engine.reservation_ttl_secs = 3;
    cfg.scheduler.policy = PolicyKind::RoundRobin;
    cfg.breaker.failure_threshold = 0;
    (
        cfg.upstream.retry_budget_percent,
        cfg.upstream.retry_budget_min,
    ) = budget;
    let fleet = fleet(cfg).await;
    let second = last_engine_url(&fleet, Role::Decode);
    let id = fleet.gateway.state.models.all()[0]
        .fleet
        .views()
        .into_iter()
        .find(|w| w.url == second)
        .expect("listed")
        .id;
    fleet.gateway.state.models.all()[0]
        .fleet
        .remove_draining(pdgate_scheduler::InstanceId(id))
        .expect("removed");
    let bad = flaky(second).await;
    fleet.gateway.add_worker(&WorkerConfig {
        url: bad.url.clone(),
        role: Role::Decode,
        protocol,
        bootstrap_port: None,
    });
    fleet.gateway.check_health().await;
    (fleet, bad)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_failing_before_the_first_byte_is_retried_for_every_protocol() {
    for protocol in [
        Protocol::Native,
        Protocol::VllmNixl,
        Protocol::VllmMooncake,
        Protocol::Sglang,
        Protocol::Trtllm,
    ] {
        let (fleet, bad) = fleet_with_failing_decode(protocol, (20, 3)).await;
        let url = fleet.url();
        for i in 0..8 {
            let body = if i % 2 == 0 {
                completion(&format!("retry {protocol:?} {i}"), 3)
            } else {
                chat(&format!("retry {protocol:?} {i}"), 3)
            };
            let path = if i % 2 == 0 {
                "/v1/completions"
            } else {
                "/v1/chat/completions"
            };
            let resp = post(&url, path, body).await;
            let status = resp.status().as_u16();
            assert_eq!(
                status,
                200,
                "{protocol:?} request {i}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        assert!(
            bad.hits() >= 1,
            "{protocol:?}: the failing decode was tried"
        );
        let text = metrics_text(&url).await;
        assert!(
            series(
                &text,
                "pdgate_retries_total",
                &[("role", "decode"), ("outcome", "retried")]
            )
            .is_some_and(|n| n >= 1.0),
            "{protocol:?}: retries counted"
        );
        assert!(
            no_reservations_left(&fleet).await,
            "{protocol:?}: every reservation released"
        );
        fleet.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_retry_budget_answers_503_at_once_instead_of_retrying() {
    let (fleet, bad) = fleet_with_failing_decode(Protocol::VllmNixl, (0, 0)).await;
    let url = fleet.url();
    let mut refused = 0;
    for i in 0..8 {
        let resp = post(
            &url,
            "/v1/completions",
            completion(&format!("budget {i}"), 2),
        )
        .await;
        match resp.status().as_u16() {
            200 => {}
            503 => {
                assert!(resp.headers().contains_key("retry-after"));
                let body: serde_json::Value = resp.json().await.expect("json");
                assert_eq!(body["error"]["code"], "retry_budget_exhausted", "{body}");
                refused += 1;
            }
            s => panic!("request {i}: {s}"),
        }
    }
    assert!(refused >= 1, "the failing decode was met and not retried");
    assert_eq!(
        bad.hits(),
        refused,
        "each refusal met the failing decode once, no retry"
    );
    assert!(no_reservations_left(&fleet).await);
}
