//! Credentials and limits against a real fleet on loopback, over real HTTP: the segment
//! registry takes only the fleet's calls and keeps each name with its owner, bounds what it
//! stores and purges what expired; API keys, per-key rate and concurrency limits; the admin
//! token off loopback (issue 14: findings 2, 8 and 12).

mod support;

use pdgate_gateway::Gateway;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;
use support::*;

const REG: &str = "/registry/segments";

/// A fleet secret in a file of its own (never the environment: tests share the process).
fn secret_file(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pdgate-sec-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("fleet-secret");
    std::fs::write(&path, "test-fleet-secret-0123456789abcdef\n").expect("write");
    path
}

fn token_of(path: &std::path::Path) -> String {
    pdgate_wire::fleet::FleetSecret::load(Some(path))
        .expect("loads")
        .expect("some")
        .registry_token()
}

fn with(rb: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
    match token {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    }
}

async fn status(rb: reqwest::RequestBuilder) -> u16 {
    rb.send().await.expect("sent").status().as_u16()
}

async fn lookup(url: &str, name: &str, token: Option<&str>) -> Option<Value> {
    let resp = with(client().get(format!("{url}{REG}/{name}")), token)
        .send()
        .await
        .expect("sent");
    match resp.status().as_u16() {
        200 => Some(resp.json().await.expect("json")),
        _ => None,
    }
}

/// The decode engine's KV segment as the registry lists it.
async fn kv_segment(url: &str, token: Option<&str>) -> Value {
    let list: Value = with(client().get(format!("{url}{REG}")), token)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    list.as_array()
        .and_then(|a| {
            a.iter()
                .find(|d| d["name"].as_str().is_some_and(|n| n.starts_with("kv-")))
        })
        .cloned()
        .unwrap_or_else(|| panic!("no kv segment registered: {list}"))
}

fn rogue(name: &str) -> Value {
    json!({"name": name, "endpoint": "127.0.0.1:9", "len": 1 << 30, "transport": "tcp"})
}

/// Finding 2: without the fleet's registry token nothing is written (or read), and an
/// engine holding the secret registers, is found and serves handoffs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_calls_need_the_fleet_token() {
    let secret = secret_file("token");
    let token = token_of(&secret);
    let mut cfg = config(1, 1, 0.0);
    cfg.server.fleet_secret_file = Some(secret.clone());
    cfg.up.engine.fleet_secret_file = Some(secret);
    cfg.server.admin_token = Some("admintoken".into());
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    let c = client();

    // The engines presented the token: their segment is there.
    let kv = kv_segment(&url, Some(&token)).await;
    let name = kv["name"].as_str().expect("name").to_string();

    for bad in [None, Some("wrong"), Some("admintoken")] {
        let post = with(c.post(format!("{url}{REG}")), bad).json(&rogue(&name));
        assert_eq!(status(post).await, 401, "POST with {bad:?}");
        let delete = with(c.delete(format!("{url}{REG}/{name}")), bad)
            .query(&[("endpoint", kv["endpoint"].as_str().unwrap_or_default())]);
        assert_eq!(status(delete).await, 401, "DELETE with {bad:?}");
        let fresh = with(c.post(format!("{url}{REG}")), bad).json(&rogue("ghost"));
        assert_eq!(status(fresh).await, 401, "a new name with {bad:?}");
    }
    for bad in [None, Some("wrong")] {
        assert_eq!(status(with(c.get(format!("{url}{REG}")), bad)).await, 401);
        assert_eq!(
            status(with(c.get(format!("{url}{REG}/{name}")), bad)).await,
            401
        );
    }
    assert_eq!(
        lookup(&url, &name, Some(&token)).await,
        Some(kv.clone()),
        "the entry is unchanged"
    );
    assert_eq!(lookup(&url, "ghost", Some(&token)).await, None);
    assert_eq!(
        lookup(&url, &name, Some("admintoken")).await,
        Some(kv),
        "the operator's admin token reads the registry"
    );

    // With the token: publish, look up, withdraw.
    let publish = c
        .post(format!("{url}{REG}"))
        .bearer_auth(&token)
        .json(&rogue("ghost"));
    assert_eq!(status(publish).await, 201);
    assert!(lookup(&url, "ghost", Some(&token)).await.is_some());
    let withdraw = c
        .delete(format!("{url}{REG}/ghost"))
        .bearer_auth(&token)
        .query(&[("endpoint", "127.0.0.1:9")]);
    assert_eq!(status(withdraw).await, 204);
    assert_eq!(lookup(&url, "ghost", Some(&token)).await, None);

    // The prefill found the decode's segment through the authenticated registry.
    let resp = post(
        &url,
        "/v1/completions",
        completion(&"moving KV through the registry ".repeat(8), 2),
    )
    .await;
    assert_eq!(resp.status(), 200);

    // Stopping, the engines withdraw their segments as their owners, with the token.
    let mut fleet = fleet;
    for (_, e) in fleet.engines.drain(..) {
        e.stop().await;
    }
    let left: Value = c
        .get(format!("{url}{REG}"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(left, json!([]), "deregistered");
    fleet.stop().await;
}

/// Finding 2's redirect: even a holder of the fleet token cannot re-point or withdraw a segment
/// another endpoint holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_engines_segment_cannot_be_replaced_or_withdrawn() {
    // `up` keys its fleet; a known secret lets the test write as an engine does.
    let secret = secret_file("owned");
    let token = token_of(&secret);
    let mut cfg = config(1, 1, 0.0);
    cfg.server.fleet_secret_file = Some(secret.clone());
    cfg.up.engine.fleet_secret_file = Some(secret);
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    let c = client();
    let kv = kv_segment(&url, Some(&token)).await;
    let name = kv["name"].as_str().expect("name").to_string();

    let resp = c
        .post(format!("{url}{REG}"))
        .bearer_auth(&token)
        .json(&rogue(&name))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 409);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("Retry-After in seconds");
    assert!(
        (1..=30).contains(&retry),
        "until the entry expires: {retry}"
    );
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "segment_owned");

    let as_rogue = c
        .delete(format!("{url}{REG}/{name}"))
        .bearer_auth(&token)
        .query(&[("endpoint", "127.0.0.1:9")]);
    assert_eq!(status(as_rogue).await, 409);
    assert_eq!(
        status(c.delete(format!("{url}{REG}/{name}")).bearer_auth(&token)).await,
        400,
        "a withdrawal names its owner"
    );
    assert_eq!(
        lookup(&url, &name, Some(&token)).await,
        Some(kv.clone()),
        "unchanged"
    );

    // The owner itself refreshes it as before.
    assert_eq!(
        status(c.post(format!("{url}{REG}")).bearer_auth(&token).json(&kv)).await,
        201
    );
    assert_eq!(
        post(
            &url,
            "/v1/completions",
            completion(&"still ours ".repeat(10), 2)
        )
        .await
        .status(),
        200
    );
    fleet.stop().await;
}

/// Finding 8: names and bodies are bounded, so nobody makes the registry hold megabytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_names_and_bodies_are_refused() {
    // `up` keys its fleet; a known secret lets the test write as an engine does.
    let secret = secret_file("sizes");
    let token = token_of(&secret);
    let mut cfg = config(1, 1, 0.0);
    cfg.server.fleet_secret_file = Some(secret.clone());
    cfg.up.engine.fleet_secret_file = Some(secret);
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    let c = client();
    let held = fleet.gateway.state.segments.held();

    let long = "n".repeat(257);
    assert_eq!(
        status(
            c.post(format!("{url}{REG}"))
                .bearer_auth(&token)
                .json(&rogue(&long))
        )
        .await,
        400
    );
    assert_eq!(
        status(
            c.post(format!("{url}{REG}"))
                .bearer_auth(&token)
                .json(&rogue(&"n".repeat(256)))
        )
        .await,
        201,
        "256 bytes is the limit"
    );
    for bad in ["a/b", "..", "has space", "é"] {
        assert_eq!(
            status(
                c.post(format!("{url}{REG}"))
                    .bearer_auth(&token)
                    .json(&rogue(bad))
            )
            .await,
            400,
            "{bad:?}"
        );
    }
    let mut bad_endpoint = rogue("fine");
    bad_endpoint["endpoint"] = json!("x".repeat(300));
    assert_eq!(
        status(
            c.post(format!("{url}{REG}"))
                .bearer_auth(&token)
                .json(&bad_endpoint)
        )
        .await,
        400
    );
    // The review's entry: a 1 MiB name (the body is over 64 KiB before the name is read).
    let resp = c
        .post(format!("{url}{REG}"))
        .bearer_auth(&token)
        .json(&rogue(&"m".repeat(1 << 20)))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "body_too_large");
    let huge = format!("{{\"pad\": \"{}\"}}", "p".repeat(3 << 20));
    let resp = c
        .post(format!("{url}{REG}"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 413, "past axum's own 2 MB default too");
    let body: Value = resp.json().await.expect("an OpenAI error object");
    assert_eq!(body["error"]["code"], "body_too_large");
    assert_eq!(
        status(c.get(format!("{url}{REG}/{long}")).bearer_auth(&token)).await,
        400,
        "lookups too"
    );
    assert_eq!(
        fleet.gateway.state.segments.held(),
        held + 1,
        "only the 256-byte name was stored"
    );
    fleet.stop().await;
}

/// Finding 8: an entry its owner stopped refreshing is dropped on a timer (its memory given
/// back), not only when the registry is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_entry_disappears_without_the_registry_being_full() {
    let mut cfg = config(1, 1, 0.0);
    cfg.server.segment_ttl_secs = 2;
    cfg.up.engine.registry_heartbeat_secs = 1;
    let secret = secret_file("expiry");
    let token = token_of(&secret);
    cfg.server.fleet_secret_file = Some(secret.clone());
    cfg.up.engine.fleet_secret_file = Some(secret);
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    let regs = &fleet.gateway.state.segments;
    assert_eq!(regs.held(), 1, "the decode engine's KV segment");
    for i in 0..50 {
        let ghost = rogue(&format!("ghost-{i}"));
        assert_eq!(
            status(
                client()
                    .post(format!("{url}{REG}"))
                    .bearer_auth(&token)
                    .json(&ghost)
            )
            .await,
            201
        );
    }
    assert_eq!(regs.held(), 51);
    assert!(regs.held() < regs.capacity(), "far from full");
    // Stale after 2 s, purged at the next tick (every 1 s); nothing else is published.
    assert!(
        eventually(Duration::from_secs(6), || async { regs.held() == 1 }).await,
        "held {} entries",
        regs.held()
    );
    assert!(lookup(&url, "ghost-0", Some(&token)).await.is_none());
    fleet.stop().await;
}

fn keys_file(tag: &str, keys: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pdgate-keys-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("keys");
    std::fs::write(&path, format!("# one key a line\n{}\n", keys.join("\n"))).expect("write");
    path
}

async fn complete_as(url: &str, key: Option<&str>) -> reqwest::Response {
    with(client().post(format!("{url}/v1/completions")), key)
        .json(&completion("hi", 1))
        .send()
        .await
        .expect("sent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_api_keys_are_each_accepted_and_a_wrong_one_is_401() {
    let mut cfg = config(1, 1, 0.0);
    cfg.server.api_key = Some("sk-single".into());
    cfg.server.api_keys = vec!["sk-list-1".into(), "sk-list-2".into()];
    cfg.server.api_keys_file = Some(keys_file("several", &["sk-file-1", "sk-file-2"]));
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    for key in [
        "sk-single",
        "sk-list-1",
        "sk-list-2",
        "sk-file-1",
        "sk-file-2",
    ] {
        assert_eq!(complete_as(&url, Some(key)).await.status(), 200, "{key}");
    }
    for bad in [None, Some("sk-list-3"), Some("sk-file-1x"), Some("")] {
        let resp = complete_as(&url, bad).await;
        assert_eq!(resp.status(), 401, "{bad:?}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error"]["type"], "authentication_error");
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_gets_its_burst_then_429_with_retry_after() {
    const BURST: usize = 3;
    let mut cfg = config(1, 1, 0.0);
    cfg.server.api_keys = vec!["sk-a".into(), "sk-b".into()];
    // One token per 100 s: nothing refills during the test.
    cfg.server.rate_limit.requests_per_second = 0.01;
    cfg.server.rate_limit.burst = BURST as u32;
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    for i in 0..BURST {
        assert_eq!(complete_as(&url, Some("sk-a")).await.status(), 200, "#{i}");
    }
    let resp = complete_as(&url, Some("sk-a")).await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("Retry-After in seconds");
    assert!((90..=100).contains(&retry), "a token in ~100 s: {retry}");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(body["error"]["message"].is_string());
    // Another key has its own bucket; a wrong key is 401, not a spent token.
    assert_eq!(complete_as(&url, Some("sk-b")).await.status(), 200);
    assert_eq!(complete_as(&url, Some("sk-x")).await.status(), 401);
    let metrics = metrics_text(&url).await;
    assert!(
        metrics.contains("pdgate_rate_limited_total{reason=\"rate\"}"),
        "counted"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_holds_its_keys_slot_until_its_end() {
    let mut cfg = config(1, 1, 1.0);
    cfg.server.api_key = Some("sk-one".into());
    cfg.server.rate_limit.max_concurrent = 1;
    let fleet = fleet(cfg).await;
    let url = fleet.url();
    let mut body = completion("a long answer", 40);
    body["stream"] = json!(true);
    let streaming = client()
        .post(format!("{url}/v1/completions"))
        .bearer_auth("sk-one")
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(streaming.status(), 200, "the head is out, the body is not");

    let resp = complete_as(&url, Some("sk-one")).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let err: Value = resp.json().await.expect("json");
    assert_eq!(err["error"]["code"], "concurrency_limit_exceeded");

    let text = streaming.text().await.expect("the stream ends");
    assert!(text.contains("[DONE]"));
    assert!(
        eventually(Duration::from_secs(5), || async {
            complete_as(&url, Some("sk-one")).await.status() == 200
        })
        .await,
        "the slot came back at the stream's end"
    );
    fleet.stop().await;
}

/// Finding 12: off loopback the admin API needs its token; the gateway refuses to start
/// without one. A fleet secret that cannot be read is a startup error too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_bind_without_an_admin_token_does_not_start() {
    let mut cfg = config(1, 1, 0.0);
    cfg.server.host = "0.0.0.0".into();
    let err = Gateway::start(cfg.gateway())
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .expect("refused");
    assert!(
        err.contains("not a loopback address") && err.contains("server.admin_token"),
        "{err}"
    );

    cfg.server.admin_token = Some("admintoken".into());
    let gw = Gateway::start(cfg.gateway())
        .await
        .expect("starts with a token");
    let url = format!("http://127.0.0.1:{}", gw.addr.port());
    assert_eq!(
        status(client().get(format!("{url}/admin/workers"))).await,
        401
    );
    assert_eq!(
        status(
            client()
                .get(format!("{url}/admin/workers"))
                .bearer_auth("admintoken")
        )
        .await,
        200
    );
    // No fleet secret off loopback: the registry takes no engine's call.
    assert_eq!(
        status(client().post(format!("{url}{REG}")).json(&rogue("ghost"))).await,
        403
    );
    gw.stop().await;

    let mut cfg = config(1, 1, 0.0);
    cfg.server.fleet_secret_file = Some(PathBuf::from("/nonexistent/pdgate-secret"));
    let err = Gateway::start(cfg.gateway())
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .expect("refused");
    assert!(err.contains("fleet secret"), "{err}");
}
