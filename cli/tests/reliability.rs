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
    cfg.scheduler.policy = PolicyKind::RoundRobin;
    (
        cfg.upstream.retry_budget_percent,
        cfg.upstream.retry_budget_min,
    ) = budget;
    with_failing_decode(cfg).await
}

/// `cfg`'s fleet (one prefill, two decodes) with its second decode behind a failing proxy.
async fn with_failing_decode(mut cfg: pdgate::config::Config) -> (Fleet, std::sync::Arc<Flaky>) {
    let protocol = cfg.up.engine.protocol;
    cfg.up.engine.reservation_ttl_secs = 3;
    cfg.breaker.failure_threshold = 0;
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
        kv_events: None,
        kv_events_replay: None,
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

/// The decode a request fails on may be the only one with room at that moment (in a soak, the
/// other decode's capacity is booked by the streams it serves): the retry waits for room rather
/// than answer 502. Here the good decode is booked nearly full by a long stream, so the second
/// request is scheduled on the failing decode, and its retry can go nowhere until that stream
/// ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waits_for_room_on_a_full_decode_instead_of_failing() {
    let mut cfg = config(1, 2, 0.5);
    // 64 blocks of 16 tokens: a 900-token answer books 57 of them, a 200-token one 13.
    cfg.up.engine.kv_blocks = 64;
    cfg.scheduler.slo.room_wait_ms = 30_000.0;
    let (fleet, bad) = with_failing_decode(cfg).await;
    let url = fleet.url();
    engine_reports_read(&url).await;
    let long_done = hold_decode_room(&url, "pdgate-sim-8b", 900).await;
    let hits_before = bad.hits();
    let resp = post(&url, "/v1/completions", completion("wait for room", 200)).await;
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    assert!(
        bad.hits() > hits_before,
        "the only decode with room was the failing one"
    );
    assert_eq!(
        status, 200,
        "served once the long stream freed its room: {body}"
    );
    assert!(
        long_done.is_finished(),
        "the retry was served after the long stream ended, not beside it"
    );
    assert!(no_reservations_left(&fleet).await);
    fleet.stop().await;
}

/// An engine whose `/health` fails its first two checks, hangs on the third (as a check to a
/// partitioned engine waits out its deadline) and answers every later one.
async fn engine_whose_third_check_hangs() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let checks = std::sync::Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let checks = std::sync::Arc::clone(&checks);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 1024];
                    let Ok(n) = conn.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let status = match head.starts_with("GET /health") {
                        false => "404 Not Found",
                        true => match checks.fetch_add(1, Ordering::SeqCst) {
                            0 | 1 => "503 Service Unavailable",
                            2 => std::future::pending().await,
                            _ => "200 OK",
                        },
                    };
                    let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                    if conn.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_health_check_does_not_hold_back_the_next() {
    let url = engine_whose_third_check_hangs().await;
    let mut cfg = pdgate_gateway::config::Config::default();
    cfg.server.port = 0;
    cfg.health.interval_ms = 100;
    cfg.health.timeout_ms = 30_000;
    cfg.health.metrics_interval_ms = 0;
    cfg.workers = vec![WorkerConfig {
        url: url.clone(),
        role: Role::Decode,
        protocol: Protocol::Native,
        bootstrap_port: None,
        kv_events: None,
        kv_events_replay: None,
    }];
    let gw = pdgate_gateway::Gateway::start(cfg).await.expect("gateway");
    let is_healthy = || async { support::procs::healthy(&gw.url(), &url).await };
    assert!(
        eventually(std::time::Duration::from_secs(5), || async {
            !is_healthy().await
        })
        .await,
        "two failed checks mark it down"
    );
    // The third check hangs for its 30 s deadline; the fourth, a round later, finds it up.
    assert!(
        eventually(std::time::Duration::from_secs(3), is_healthy).await,
        "back within a few rounds, not after the hung check's deadline"
    );
    gw.stop().await;
}
