//! Engines that die and come back (issue 15), as separate `pdgate engine` processes:
//!
//! - an engine SIGKILLed and restarted on its port claims its segment name at once, although
//!   its old registry entry (under its old transfer port) has not expired, and the breaker its
//!   dying process opened lets a probe through as soon as a health check sees it back: it is in
//!   rotation and serving transfers at the next health check, not a segment TTL or a breaker
//!   cooldown later;
//! - a pull-mode prefill (vLLM NIXL, TensorRT-LLM) does not keep KV for a decode that died
//!   before reading it: the gateway calls the holding off, so it is freed long before the
//!   engine's reservation TTL;
//! - a client that stops reading mid-stream is cut at the write deadline, both legs are
//!   aborted and the KV on both engines is freed.

mod support;

use pdgate::config::Protocol;
use pdgate_gateway::config::Config;
use pdgate_gateway::Gateway;
use pdgate_scheduler::Role;
use serde_json::{json, Value};
use std::time::Duration;
use support::procs::{healthy, EngineProcess};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RESERVATIONS: &str = "pdgate_sim_kv_reservations_active";

fn gateway_config(workers: &[&EngineProcess]) -> Config {
    let mut cfg = Config::default();
    cfg.server.port = 0;
    cfg.health.interval_ms = 200;
    cfg.workers = workers.iter().map(|e| e.worker()).collect();
    cfg
}

/// Waits (up to 10 s) until the gateway has both engines in rotation.
async fn both_healthy(gateway: &str, a: &EngineProcess, b: &EngineProcess) -> bool {
    eventually(Duration::from_secs(10), || async {
        healthy(gateway, &a.url).await && healthy(gateway, &b.url).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engine_restarted_on_its_port_takes_its_segment_back_at_once() {
    let mut prefill = EngineProcess::new(Role::Prefill, Protocol::Native);
    let mut decode = EngineProcess::new(Role::Decode, Protocol::Native);
    let mut cfg = gateway_config(&[&prefill, &decode]);
    // Far longer than the engine waits for a held name (60 s): without the takeover the
    // restarted decode could not publish its segment and would exit.
    cfg.server.segment_ttl_secs = 600;
    // One failed leg opens a breaker that would stay open for the whole test: only the
    // health check that sees the engine back may let it in again.
    cfg.breaker.failure_threshold = 1;
    cfg.breaker.cooldown_ms = 600_000;
    cfg.health.fail_threshold = 5;
    let gw = Gateway::start(cfg).await.expect("gateway starts");
    let url = gw.url();
    prefill = prefill.registry(&url);
    decode = decode.registry(&url);
    prefill.start().await;
    decode.start().await;
    assert!(both_healthy(&url, &prefill, &decode).await);
    let first = post(&url, "/v1/completions", completion("before the crash", 4)).await;
    assert_eq!(first.status(), 200);

    decode.signal("-KILL");
    // Sent before the health checks notice: the dead decode fails it and opens its breaker.
    let lost = post(&url, "/v1/completions", completion("during the crash", 4)).await;
    assert_eq!(lost.status(), 502);
    assert_eq!(breaker_of(&url, &decode.url).await, "open");
    assert!(
        eventually(Duration::from_secs(10), || async {
            !healthy(&url, &decode.url).await
        })
        .await,
        "the dead decode is marked down"
    );
    decode.start().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            healthy(&url, &decode.url).await && breaker_of(&url, &decode.url).await != "open"
        })
        .await,
        "the restarted decode is healthy and its breaker lets a probe through"
    );
    assert!(
        decode.running(),
        "it published its segment and kept running"
    );
    // KV really moves to the new process: its segment is the one the registry names now.
    let resp = post(&url, "/v1/completions", completion("after the restart", 4)).await;
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    assert!(
        decode.metric("pdgate_sim_kv_blocks_verified_total").await > 0.0,
        "the restarted decode received and verified the prompt's KV"
    );
    assert_eq!(
        breaker_of(&url, &decode.url).await,
        "closed",
        "the probe closed it"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_mode_prefill_frees_kv_held_for_a_decode_that_died_before_reading_it() {
    for protocol in [Protocol::VllmNixl, Protocol::Trtllm] {
        // Pull-mode engines reach each other through the params the prefill returns, so no
        // registry: both start before the gateway, whose first health pass finds them up.
        let mut prefill = EngineProcess::new(Role::Prefill, protocol);
        let mut decode = EngineProcess::new(Role::Decode, protocol);
        prefill.start().await;
        decode.start().await;
        let mut cfg = gateway_config(&[&prefill, &decode]);
        // No health check between the crash and the request: the gateway still sends to it,
        // as it does in the moments after a real crash.
        cfg.health.interval_ms = 3_600_000;
        let gw = Gateway::start(cfg).await.expect("gateway starts");
        let url = gw.url();
        assert!(both_healthy(&url, &prefill, &decode).await);

        decode.signal("-KILL");
        let resp = post(
            &url,
            "/v1/completions",
            completion("nobody will read this", 4),
        )
        .await;
        assert_eq!(resp.status(), 502, "{protocol}: the decode's own failure");
        assert!(
            prefill.metric("pdgate_sim_kv_blocks_sent_total").await > 0.0,
            "{protocol}: the prefill ran and held the prompt's KV for the decode"
        );
        // The engine's own reservation TTL is 120 s: only the gateway's call frees it sooner.
        let freed = eventually(Duration::from_secs(10), || async {
            prefill.metric(RESERVATIONS).await == 0.0
        })
        .await;
        assert!(
            freed,
            "{protocol}: the KV held for the dead decode was freed"
        );
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_freed_both_legs_aborted_and_the_kv_released() {
    let mut prefill = EngineProcess::new(Role::Prefill, Protocol::Native);
    let mut decode = EngineProcess::new(Role::Decode, Protocol::Native)
        .setting("MAX_TOKENS_LIMIT", "200000")
        .setting("KV_BLOCKS", "16384");
    let mut cfg = gateway_config(&[&prefill, &decode]);
    cfg.server.limits.write_timeout_ms = 300;
    let gw = Gateway::start(cfg).await.expect("gateway starts");
    let url = gw.url();
    prefill = prefill.registry(&url);
    decode = decode.registry(&url);
    prefill.start().await;
    decode.start().await;
    assert!(both_healthy(&url, &prefill, &decode).await);

    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let addr = url.trim_start_matches("http://").parse().expect("addr");
    let mut tcp = socket.connect(addr).await.expect("connect");
    // Far more output than the socket buffers on the way hold.
    let body = serde_json::to_vec(&json!({
        "model": "pdgate-sim-8b", "prompt": "never read", "max_tokens": 150_000, "stream": true
    }))
    .expect("json");
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.expect("head");
    tcp.write_all(&body).await.expect("body");
    let reserved = eventually(Duration::from_secs(10), || async {
        decode.metric(RESERVATIONS).await > 0.0
    })
    .await;
    assert!(reserved, "the stream holds KV on the decode engine");

    // Never read: the gateway's writes stall, the write deadline passes, both legs go.
    let freed = eventually(Duration::from_secs(15), || async {
        decode.metric(RESERVATIONS).await == 0.0 && prefill.metric(RESERVATIONS).await == 0.0
    })
    .await;
    assert!(freed, "the KV on both engines was freed");
    let idle = eventually(Duration::from_secs(5), || async {
        admin_workers(&url)
            .await
            .iter()
            .all(|w| w["load"]["in_flight"] == 0)
    })
    .await;
    assert!(idle, "the gateway's booking was released");
    let cancelled = eventually(Duration::from_secs(5), || async {
        metrics_text(&url).await.lines().any(|l| {
            l.starts_with("pdgate_legs_total{")
                && l.contains("role=\"decode\"")
                && l.contains("outcome=\"cancelled\"")
                && !l.ends_with(" 0")
        })
    })
    .await;
    assert!(
        cancelled,
        "the decode leg was called off as the client's doing"
    );
    // The engine stopped generating for it: far fewer tokens than asked for.
    let generated = decode.metric("vllm:generation_tokens_total").await;
    assert!(generated < 150_000.0, "{generated}");
    // The client's connection is closed too: what was buffered, then the end.
    let mut sink = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(closed, "the gateway closed the stalled connection");
    let breaker: Value = admin_workers(&url)
        .await
        .into_iter()
        .find(|w| w["role"] == "decode")
        .expect("decode")["breaker"]
        .clone();
    assert_eq!(
        breaker, "closed",
        "a slow client is not the engine's failure"
    );
    gw.stop().await;
}
