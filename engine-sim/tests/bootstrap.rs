//! The push-mode bootstrap between real engines: a decode learns a prefill's mailbox once over
//! HTTP, then every offer travels as a pdgate-transfer notification; a moved prefill is looked
//! up again; a second decode for a room is refused and times out as in SGLang.

use pdgate_engine_sim::{EngineConfig, EngineHandle, Protocol};
use pdgate_scheduler::Role;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

fn config(role: Role, protocol: Protocol, bootstrap_timeout_ms: u64) -> EngineConfig {
    let mut cfg = EngineConfig {
        role,
        protocol,
        kv_blocks: 1024,
        kv_bytes_per_token: 64,
        bootstrap_timeout_ms,
        ..EngineConfig::default()
    };
    cfg.timing.time_scale = 0.0;
    cfg
}

async fn engine(role: Role, protocol: Protocol, bootstrap_timeout_ms: u64) -> EngineHandle {
    pdgate_engine_sim::spawn(config(role, protocol, bootstrap_timeout_ms))
        .await
        .expect("engine starts")
}

fn count(
    e: &EngineHandle,
    counter: impl Fn(&pdgate_engine_sim::stats::Stats) -> &AtomicU64,
) -> u64 {
    counter(&e.engine.stats).load(Relaxed)
}

/// The body both legs get: SGLang's bootstrap fields, or vLLM Mooncake's transfer params.
fn leg(protocol: Protocol, role: Role, prefill: &EngineHandle, room: u64, prompt: &str) -> Value {
    let mut body = json!({"model": "pdgate-sim-8b", "prompt": prompt, "max_tokens": 2});
    match protocol {
        Protocol::Sglang => {
            body["bootstrap_host"] = json!("127.0.0.1");
            body["bootstrap_port"] = json!(prefill.addr.port());
            body["bootstrap_room"] = json!(room);
        }
        _ => {
            body["kv_transfer_params"] = match role {
                Role::Prefill => json!({"do_remote_decode": true, "transfer_id": room.to_string()}),
                Role::Decode => json!({"do_remote_prefill": true, "transfer_id": room.to_string(),
                    "remote_bootstrap_addr": prefill.addr.to_string(),
                    "remote_engine_id": "e"}),
            };
        }
    }
    body
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(body)
        .send()
        .await
        .expect("engine answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json"))
}

/// Both legs of one request at once; the decode's answer.
async fn request(
    protocol: Protocol,
    p: &EngineHandle,
    d: &EngineHandle,
    room: u64,
    prompt: &str,
) -> (u16, Value) {
    let pb = leg(protocol, Role::Prefill, p, room, prompt);
    let db = leg(protocol, Role::Decode, p, room, prompt);
    let (pu, du) = (p.url(), d.url());
    let ((ps, pv), decode) = tokio::join!(post(&pu, &pb), post(&du, &db));
    assert_eq!(ps, 200, "prefill leg: {pv}");
    decode
}

async fn until(what: &str, ok: impl Fn() -> bool) {
    for _ in 0..200 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_travel_as_transfer_notifications_after_one_lookup() {
    for protocol in [Protocol::Sglang, Protocol::VllmMooncake] {
        let p = engine(Role::Prefill, protocol, 3000).await;
        let d = engine(Role::Decode, protocol, 3000).await;
        for room in 0..5 {
            let prompt = format!("request {room} of one decode to one prefill, KV pushed");
            let (status, v) = request(protocol, &p, &d, room, &prompt).await;
            assert_eq!(status, 200, "{protocol:?}: {v}");
        }
        assert_eq!(count(&p, |s| &s.bootstrap_queries), 1, "{protocol:?}");
        assert_eq!(count(&p, |s| &s.bootstrap_offers), 5, "{protocol:?}");
        assert!(count(&d, |s| &s.kv_blocks_verified) >= 5, "{protocol:?}");
        p.stop().await;
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_server_answers_a_get_and_no_longer_takes_offers_by_post() {
    let p = engine(Role::Prefill, Protocol::Sglang, 3000).await;
    let d = engine(Role::Decode, Protocol::Sglang, 3000).await;
    let client = reqwest::Client::new();
    let url = format!("{}/pd/bootstrap", p.url());
    let mailbox: Value = client
        .get(&url)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(
        mailbox["endpoint"],
        json!(p.engine.transfer.endpoint()),
        "{mailbox}"
    );
    let post = client
        .post(&url)
        .json(&json!({}))
        .send()
        .await
        .expect("post");
    assert_eq!(post.status().as_u16(), 405);
    // A decode engine is no bootstrap server: a decode sent to it is told so at once.
    let body = leg(Protocol::Sglang, Role::Decode, &d, 1, "no prefill here");
    let (status, v) = post_to(&d, &body).await;
    assert_eq!(
        (status, &v["error"]["code"]),
        (502, &json!("bootstrap_unreachable")),
        "{v}"
    );
    p.stop().await;
    d.stop().await;
}

async fn post_to(e: &EngineHandle, body: &Value) -> (u16, Value) {
    post(&e.url(), body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_is_offered_in_parts() {
    let mut pc = config(Role::Prefill, Protocol::Sglang, 3000);
    let mut dc = config(Role::Decode, Protocol::Sglang, 3000);
    // One block per 2 tokens: ~1000 block offsets, more than one notification holds.
    (pc.block_size, dc.block_size) = (2, 2);
    (pc.kv_blocks, dc.kv_blocks) = (4096, 4096);
    let p = pdgate_engine_sim::spawn(pc).await.expect("prefill");
    let d = pdgate_engine_sim::spawn(dc).await.expect("decode");
    let prompt = (0..2000).map(|i| format!("w{i} ")).collect::<String>();
    let (status, v) = request(Protocol::Sglang, &p, &d, 9, &prompt).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(count(&p, |s| &s.bootstrap_offers), 1);
    assert!(count(&d, |s| &s.kv_blocks_verified) >= 900);
    p.stop().await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_restarted_on_a_new_transfer_port_is_looked_up_again() {
    let p = engine(Role::Prefill, Protocol::Sglang, 3000).await;
    let d = engine(Role::Decode, Protocol::Sglang, 3000).await;
    let port = p.addr.port();
    let old_transfer = p.engine.transfer.endpoint();
    let (status, v) = request(Protocol::Sglang, &p, &d, 1, "before the restart").await;
    assert_eq!(status, 200, "{v}");
    p.stop().await;

    let mut cfg = config(Role::Prefill, Protocol::Sglang, 3000);
    cfg.port = port;
    let p = pdgate_engine_sim::spawn(cfg).await.expect("restarted");
    assert_ne!(p.engine.transfer.endpoint(), old_transfer);
    // The remembered mailbox is gone: the decode forgets it, asks the bootstrap server once
    // more and succeeds, so no request fails for the restart.
    let (status, v) = request(Protocol::Sglang, &p, &d, 3, "after the restart").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(count(&p, |s| &s.bootstrap_queries), 1);
    let (status, v) = request(Protocol::Sglang, &p, &d, 4, "and after that").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        count(&p, |s| &s.bootstrap_queries),
        1,
        "asked once, then remembered"
    );
    assert_eq!(d.engine.pool.as_ref().map(|p| p.active()), Some(0));
    p.stop().await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_decode_for_a_room_is_refused_and_times_out() {
    let p = engine(Role::Prefill, Protocol::Sglang, 3000).await;
    let d1 = engine(Role::Decode, Protocol::Sglang, 3000).await;
    let d2 = engine(Role::Decode, Protocol::Sglang, 300).await;
    let prompt = "two decodes claim one bootstrap room";
    let body = leg(Protocol::Sglang, Role::Decode, &p, 7, prompt);
    let first = tokio::spawn({
        let (url, body) = (d1.url(), body.clone());
        async move { post(&url, &body).await }
    });
    until("the first offer", || {
        count(&p, |s| &s.bootstrap_offers) == 1
    })
    .await;
    let second = tokio::spawn({
        let (url, body) = (d2.url(), body.clone());
        async move { post(&url, &body).await }
    });
    until("the second offer refused", || {
        count(&p, |s| &s.bootstrap_offers_refused) == 1
    })
    .await;
    let (status, v) = post_to(&p, &leg(Protocol::Sglang, Role::Prefill, &p, 7, prompt)).await;
    assert_eq!(status, 200, "prefill: {v}");
    let (status, v) = first.await.expect("first decode");
    assert_eq!(status, 200, "first decode: {v}");
    let (status, v) = second.await.expect("second decode");
    assert_eq!(
        (status, &v["error"]["code"]),
        (504, &json!("bootstrap_timeout")),
        "{v}"
    );
    assert_eq!(
        d2.engine.pool.as_ref().map(|p| p.active()),
        Some(0),
        "reservation freed"
    );
    for e in [p, d1, d2] {
        e.stop().await;
    }
}
