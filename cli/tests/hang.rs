//! Hangs, not only deaths (issue 15): a prefill engine process stopped with SIGSTOP keeps its
//! port open and answers nothing. The prefill deadline fails the request's leg there, the request
//! is served by the other prefill, health checks mark the stopped one down, and after SIGCONT it
//! comes back.

mod support;

use pdgate::config::Protocol;
use pdgate_gateway::config::{Config, WorkerConfig};
use pdgate_gateway::Gateway;
use pdgate_scheduler::{PolicyKind, Role};
use std::time::Duration;
use support::engines::{engine_process, signal};
use support::procs::{healthy, EngineProcess};
use support::*;

async fn engine(role: &str) -> EngineProcess {
    engine_process(role, "vllm-nixl", 0.0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_prefill_is_timed_out_routed_around_marked_down_and_taken_back() {
    let (p1, p2, d) = (
        engine("prefill").await,
        engine("prefill").await,
        engine("decode").await,
    );
    let mut cfg = Config::default();
    cfg.server.port = 0;
    cfg.scheduler.policy = PolicyKind::RoundRobin;
    cfg.upstream.prefill_timeout_secs = 1;
    cfg.health.interval_ms = 200;
    cfg.health.timeout_ms = 300;
    cfg.workers = [
        (&p1, Role::Prefill),
        (&p2, Role::Prefill),
        (&d, Role::Decode),
    ]
    .into_iter()
    .map(|(e, role)| WorkerConfig {
        url: e.url.clone(),
        role,
        protocol: Protocol::VllmNixl,
        bootstrap_port: None,
        kv_events: None,
        kv_events_replay: None,
    })
    .collect();
    let gw = Gateway::start(cfg).await.expect("gateway starts");
    let url = gw.url();
    assert!(eventually(Duration::from_secs(10), || healthy(&url, &p1.url)).await);
    assert!(eventually(Duration::from_secs(10), || healthy(&url, &p2.url)).await);

    signal(&p1, "-STOP");
    // Round robin sends some of these to the stopped prefill before health checks notice; each
    // of those is cut at the prefill deadline and retried on the other.
    let sends = (0..4).map(|i| post(&url, "/v1/completions", completion(&format!("hang {i}"), 2)));
    for (i, resp) in futures::future::join_all(sends)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(resp.status().as_u16(), 200, "request {i}");
    }
    let retried = series(
        &metrics_text(&url).await,
        "pdgate_retries_total",
        &[("role", "prefill"), ("outcome", "retried")],
    );
    assert!(
        retried.is_some_and(|r| r >= 1.0),
        "a request met the stopped prefill and was retried: {retried:?}"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            !healthy(&url, &p1.url).await
        })
        .await,
        "health checks mark the stopped engine down"
    );
    for i in 0..4 {
        let resp = post(
            &url,
            "/v1/completions",
            completion(&format!("after {i}"), 2),
        )
        .await;
        assert_eq!(resp.status().as_u16(), 200, "request after {i}");
    }

    signal(&p1, "-CONT");
    assert!(
        eventually(Duration::from_secs(10), || healthy(&url, &p1.url)).await,
        "back in rotation once it answers again"
    );
    gw.stop().await;
}
