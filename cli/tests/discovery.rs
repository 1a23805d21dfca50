//! Discovery and dynamic membership, with real components: the kube-rs watcher against a
//! loopback API server with real LIST/WATCH semantics (support/kube_api.rs), DNS discovery
//! against a real dnsmasq, the admin API adding and draining workers of a running gateway, and a
//! gateway whose engines all come from pod records serving traffic through a pod's deletion.

mod support;

use pdgate::config::{Protocol, WorkerConfig};
use pdgate::Fleet;
use pdgate_gateway::config::{DiscoveryConfig, DiscoveryKind, DnsDiscovery, KubernetesDiscovery};
use pdgate_gateway::discovery::{self, Discovery};
use pdgate_gateway::fleet::Fleet as Pool;
use pdgate_gateway::gateway::Gateway;
use pdgate_scheduler::Role;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use support::dnsmasq::Dnsmasq;
use support::kube_api::{pod, FakeKube, NAMESPACE};
use support::*;

const WAIT: Duration = Duration::from_secs(15);

async fn watched(fake: &FakeKube, resync_secs: u64) -> (Arc<Pool>, Discovery) {
    let pool = Arc::new(Pool::new(Default::default()));
    let cfg = DiscoveryConfig {
        kind: DiscoveryKind::Kubernetes,
        kubernetes: KubernetesDiscovery {
            namespace: NAMESPACE.into(),
            api_server: fake.url.clone(),
            resync_secs,
            ..KubernetesDiscovery::default()
        },
        ..DiscoveryConfig::default()
    };
    let d = discovery::start(&cfg, &pool)
        .await
        .expect("discovery starts")
        .expect("not static");
    (pool, d)
}

/// The active workers of `role`, sorted.
fn urls(pool: &Pool, role: Role) -> Vec<String> {
    let mut u: Vec<String> = pool
        .workers
        .all()
        .iter()
        .filter(|w| w.role == role)
        .map(|w| w.url.clone())
        .collect();
    u.sort();
    u
}

async fn until(pool: &Pool, role: Role, want: &[&str]) {
    let mut want = want.to_vec();
    want.sort();
    let ok = eventually(WAIT, || async { urls(pool, role) == want }).await;
    assert!(ok, "{role} workers: {:?}, want {want:?}", urls(pool, role));
}

fn at(ip: &str, port: u16) -> String {
    format!("http://{ip}:{port}")
}

#[tokio::test]
async fn a_pod_is_a_worker_only_while_ready_and_leaves_on_delete() {
    let kube = FakeKube::start().await;
    let (pool, d) = watched(&kube, 300).await;
    let m1 = at("10.0.0.100", 8000);
    // Not ready, then a ready marker behind it: once the marker shows, the first was handled.
    kube.apply(pod("d1", "u-d1", "decode", Some("10.0.0.1"), false, 8000));
    kube.apply(pod(
        "marker",
        "u-m",
        "decode",
        Some("10.0.0.100"),
        true,
        8000,
    ));
    until(&pool, Role::Decode, &[&m1]).await;
    // Ready.
    kube.apply(pod("d1", "u-d1", "decode", Some("10.0.0.1"), true, 8000));
    until(&pool, Role::Decode, &[&at("10.0.0.1", 8000), &m1]).await;
    // Readiness flips back: drained.
    kube.apply(pod("d1", "u-d1", "decode", Some("10.0.0.1"), false, 8000));
    until(&pool, Role::Decode, &[&m1]).await;
    // Ready again, then graceful deletion (terminating): drained before the pod is gone.
    kube.apply(pod("d1", "u-d1", "decode", Some("10.0.0.1"), true, 8000));
    until(&pool, Role::Decode, &[&at("10.0.0.1", 8000), &m1]).await;
    kube.terminate("d1");
    until(&pool, Role::Decode, &[&m1]).await;
    kube.delete("d1");
    // Force delete: DELETED with no terminating state before it.
    kube.apply(pod("d2", "u-d2", "decode", Some("10.0.0.2"), true, 8000));
    until(&pool, Role::Decode, &[&at("10.0.0.2", 8000), &m1]).await;
    kube.delete("d2");
    until(&pool, Role::Decode, &[&m1]).await;
    // The selectors are the API server's: a prefill pod joins as prefill only, a pod of another
    // namespace or whose labels leave the selector is not (or no longer) a worker.
    kube.apply(pod("p1", "u-p1", "prefill", Some("10.0.1.1"), true, 9000));
    let mut elsewhere = pod("x", "u-x", "decode", Some("10.0.9.9"), true, 8000);
    elsewhere["metadata"]["namespace"] = json!("other");
    kube.apply(elsewhere);
    let mut relabelled = pod("marker", "u-m", "decode", Some("10.0.0.100"), true, 8000);
    relabelled["metadata"]["labels"]["pdgate.io/role"] = json!("standby");
    kube.apply(relabelled);
    until(&pool, Role::Prefill, &[&at("10.0.1.1", 9000)]).await;
    until(&pool, Role::Decode, &[]).await;
    assert_eq!(
        pool.views().len(),
        1,
        "nothing else held: {:?}",
        pool.views()
    );
    d.stop();
}

#[tokio::test]
async fn a_dropped_watch_resumes_from_its_version_and_loses_nothing() {
    let kube = FakeKube::start().await;
    kube.apply(pod("d1", "u-d1", "decode", Some("10.0.0.1"), true, 8000));
    let (pool, d) = watched(&kube, 300).await;
    until(&pool, Role::Decode, &[&at("10.0.0.1", 8000)]).await;
    let lists = kube.lists();
    let watches = kube.watches();
    kube.set_watch_down(true);
    kube.apply(pod("d2", "u-d2", "decode", Some("10.0.0.2"), true, 8000));
    kube.delete("d1");
    kube.set_watch_down(false);
    until(&pool, Role::Decode, &[&at("10.0.0.2", 8000)]).await;
    assert!(kube.watches() > watches, "a new watch");
    assert_eq!(
        kube.lists(),
        lists,
        "resumed from its version, not re-listed"
    );
    d.stop();
}

#[tokio::test]
async fn gone_relists_and_a_pod_deleted_meanwhile_is_removed() {
    let kube = FakeKube::start().await;
    kube.apply(pod("d1", "u-d1", "decode", Some("10.0.0.1"), true, 8000));
    kube.apply(pod("d2", "u-d2", "decode", Some("10.0.0.2"), true, 8000));
    let (pool, d) = watched(&kube, 300).await;
    until(
        &pool,
        Role::Decode,
        &[&at("10.0.0.1", 8000), &at("10.0.0.2", 8000)],
    )
    .await;
    let lists = kube.lists();
    kube.set_watch_down(true);
    kube.delete("d1");
    kube.apply(pod("d3", "u-d3", "decode", Some("10.0.0.3"), true, 8000));
    // The history the watch would resume from is gone: 410, then a fresh list.
    kube.compact();
    kube.set_watch_down(false);
    until(
        &pool,
        Role::Decode,
        &[&at("10.0.0.2", 8000), &at("10.0.0.3", 8000)],
    )
    .await;
    assert!(kube.lists() > lists, "re-listed after 410 Gone");
    d.stop();
}

#[tokio::test]
async fn the_periodic_resync_repairs_missed_events() {
    let kube = FakeKube::start().await;
    kube.apply(pod("d1", "u-d1", "decode", Some("10.0.0.1"), true, 8000));
    let (pool, d) = watched(&kube, 1).await;
    until(&pool, Role::Decode, &[&at("10.0.0.1", 8000)]).await;
    // Changes no watch hears of: only a re-list can see them.
    kube.delete_unseen("d1");
    kube.apply_unseen(pod("d2", "u-d2", "decode", Some("10.0.0.2"), true, 8000));
    until(&pool, Role::Decode, &[&at("10.0.0.2", 8000)]).await;
    d.stop();
}

/// The failure of a router that keyed pods by a struct holding their readiness and address, and
/// listened to applied objects only: a delete whose last state differs from the one it added
/// (or a delete it never saw) left a dead worker behind forever.
#[tokio::test]
async fn a_pod_whose_state_changed_between_events_leaves_no_dead_worker() {
    let kube = FakeKube::start().await;
    let (pool, d) = watched(&kube, 300).await;
    kube.apply(pod("d1", "u-d1", "decode", Some("10.0.0.1"), true, 8000));
    until(&pool, Role::Decode, &[&at("10.0.0.1", 8000)]).await;
    // Its address changes while ready: one worker, at the new address.
    kube.apply(pod("d1", "u-d1", "decode", Some("10.0.0.3"), true, 8000));
    until(&pool, Role::Decode, &[&at("10.0.0.3", 8000)]).await;
    // It changes unseen (not ready, another address), then is deleted: the DELETED event carries
    // a state never added, and must still take the worker away.
    kube.apply_unseen(pod("d1", "u-d1", "decode", Some("10.0.0.7"), false, 8000));
    kube.delete("d1");
    until(&pool, Role::Decode, &[]).await;
    let views = pool.views();
    assert!(views.is_empty(), "no worker, not even draining: {views:?}");
    assert_eq!(pool.scheduler.lock().healthy_counts(), (0, 0));
    d.stop();
}

#[tokio::test]
async fn dns_records_come_and_go_as_workers() {
    // The process's recorder, so the discovery events below are counted.
    pdgate_gateway::metrics::install();
    let hosts = "127.0.0.11 pd-decode.test\n127.0.0.12 pd-decode.test\n127.0.0.21 pf-a.test\n";
    let mut dns = Dnsmasq::start(hosts, &["_http._tcp.pd-prefill.test,pf-a.test,9001"]);
    let pool = Arc::new(Pool::new(Default::default()));
    let cfg = DiscoveryConfig {
        kind: DiscoveryKind::Dns,
        dns: DnsDiscovery {
            prefill: "pd-prefill.test".into(),
            decode: "pd-decode.test".into(),
            port: 8000,
            interval_secs: 1,
            nameserver: dns.nameserver(),
            ..DnsDiscovery::default()
        },
        ..DiscoveryConfig::default()
    };
    let d = discovery::start(&cfg, &pool)
        .await
        .expect("starts")
        .expect("dns");
    // A/AAAA with the configured port for decode; SRV (its own port) for prefill.
    until(
        &pool,
        Role::Decode,
        &[&at("127.0.0.11", 8000), &at("127.0.0.12", 8000)],
    )
    .await;
    until(&pool, Role::Prefill, &[&at("127.0.0.21", 9001)]).await;
    // A record removed: drained and removed; one added: added.
    dns.set_hosts("127.0.0.11 pd-decode.test\n127.0.0.13 pd-decode.test\n127.0.0.21 pf-a.test\n");
    until(
        &pool,
        Role::Decode,
        &[&at("127.0.0.11", 8000), &at("127.0.0.13", 8000)],
    )
    .await;
    // SRV targets change.
    dns.set_hosts("127.0.0.11 pd-decode.test\n127.0.0.21 pf-a.test\n127.0.0.22 pf-b.test\n");
    dns.set_srv(&["_http._tcp.pd-prefill.test,pf-b.test,9002"]);
    until(&pool, Role::Prefill, &[&at("127.0.0.22", 9002)]).await;
    until(&pool, Role::Decode, &[&at("127.0.0.11", 8000)]).await;
    // The server fails (gone): lookups fail, and the fleet is kept as it was.
    let errors = || async {
        let text = pdgate_gateway::metrics::install().render();
        text.lines()
            .find(|l| {
                l.starts_with("pdgate_discovery_events_total{")
                    && l.contains(r#"source="dns""#)
                    && l.contains(r#"kind="error""#)
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = errors().await;
    dns.stop();
    let failed = eventually(WAIT, || async { errors().await > before }).await;
    assert!(failed);
    assert_eq!(urls(&pool, Role::Decode), [at("127.0.0.11", 8000)]);
    assert_eq!(urls(&pool, Role::Prefill), [at("127.0.0.22", 9002)]);
    d.stop();
}

fn admin(token: &str) -> impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder + '_ {
    move |rb| rb.bearer_auth(token)
}

async fn listed(gw: &str, token: &str) -> Vec<Value> {
    admin(token)(client().get(format!("{gw}/admin/workers")))
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json")
}

/// A worker removed by the admin API while a request is on it: the request finishes on it, it
/// is listed as draining until then, nothing new goes to it, and it is gone afterwards.
#[tokio::test]
async fn admin_api_adds_and_drains_workers() {
    let mut cfg = config(1, 1, 0.0);
    cfg.up.engine.protocol = Protocol::VllmNixl;
    cfg.server.admin_token = Some("adm".into());
    let fleet = Fleet::start(cfg).await.expect("fleet");
    let gw = fleet.url();
    let prefill = fleet.engines[0].1.url();
    let slow = delayed(prefill.clone(), Duration::from_millis(1500)).await;
    let post = |body: Value, token: &'static str| {
        let url = format!("{gw}/admin/workers");
        async move {
            admin(token)(client().post(url))
                .json(&body)
                .send()
                .await
                .expect("post")
        }
    };
    let entry = json!({"url": slow.url, "role": "prefill", "protocol": "vllm-nixl"});
    assert_eq!(post(entry.clone(), "nope").await.status(), 401);
    let r = post(entry.clone(), "adm").await;
    assert_eq!(r.status(), 201);
    let added: Value = r.json().await.expect("json");
    assert_eq!(added["url"], slow.url.as_str());
    assert_eq!(post(entry, "adm").await.status(), 409, "already there");
    let bad = post(json!({"url": "ftp://x:1", "role": "decode"}), "adm").await;
    assert_eq!(bad.status(), 400);
    let bad: Value = bad.json().await.expect("json");
    assert_eq!(bad["error"]["param"], "url");
    let delete = |id: String| {
        let url = format!("{gw}/admin/workers/{id}");
        async move {
            admin("adm")(client().delete(url))
                .send()
                .await
                .expect("delete")
        }
    };
    assert_eq!(delete("999".into()).await.status(), 404);
    assert_eq!(delete("x".into()).await.status(), 400);
    // Only the slow path stays: the engine's own entry leaves the fleet.
    let direct = listed(&gw, "adm")
        .await
        .into_iter()
        .find(|w| w["url"] == prefill.as_str())
        .expect("listed");
    let r = delete(direct["id"].to_string()).await;
    assert_eq!(r.status(), 200);
    let slow_id = added["id"].to_string();
    let slow = (slow, added["id"].clone());
    assert!(
        eventually(WAIT, || async {
            listed(&gw, "adm")
                .await
                .iter()
                .any(|w| w["id"] == slow.1 && w["healthy"] == true)
        })
        .await
    );
    let in_flight = tokio::spawn({
        let gw = gw.clone();
        async move { post_status(&gw, chat("drain me", 8)).await }
    });
    assert!(eventually(WAIT, || async { slow.0.hits() > 0 }).await);
    let r = delete(slow_id.clone()).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["state"], "draining", "a request is on it");
    let states: Vec<Value> = listed(&gw, "adm")
        .await
        .iter()
        .map(|w| w["state"].clone())
        .collect();
    assert!(states.contains(&json!("draining")), "{states:?}");
    // Nothing new goes to it: no prefill left.
    assert_eq!(post_status(&gw, chat("no prefill", 4)).await, 503);
    assert_eq!(
        in_flight.await.expect("task"),
        200,
        "the request on it finished"
    );
    assert!(
        eventually(WAIT, || async {
            listed(&gw, "adm").await.iter().all(|w| w["id"] != slow.1)
        })
        .await,
        "gone once drained"
    );
    fleet.stop().await;
}

async fn post_status(gw: &str, body: Value) -> u16 {
    post(gw, "/v1/chat/completions", body)
        .await
        .status()
        .as_u16()
}

/// End to end: a gateway whose engines are all pods of the API server serves, loses a decode pod,
/// keeps serving on the remaining pair, and no longer lists the deleted pod's engine.
#[tokio::test]
async fn a_kubernetes_discovered_fleet_serves_through_a_pod_deletion() {
    // The engines (their KV registry is the demo gateway's; the gateway under test only routes).
    let engines = Fleet::start(config(1, 2, 0.0)).await.expect("engines");
    let kube = FakeKube::start().await;
    let port = |i: usize| -> u16 {
        let url = engines.engines[i].1.url();
        url.rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port")
    };
    kube.apply(pod(
        "pf-0",
        "u-pf0",
        "prefill",
        Some("127.0.0.1"),
        true,
        port(0),
    ));
    kube.apply(pod(
        "dc-0",
        "u-dc0",
        "decode",
        Some("127.0.0.1"),
        true,
        port(1),
    ));
    kube.apply(pod(
        "dc-1",
        "u-dc1",
        "decode",
        Some("127.0.0.1"),
        true,
        port(2),
    ));
    let mut cfg = engines.gateway.state.cfg.clone();
    cfg.workers = Vec::<WorkerConfig>::new();
    cfg.server.port = 0;
    cfg.discovery = DiscoveryConfig {
        kind: DiscoveryKind::Kubernetes,
        kubernetes: KubernetesDiscovery {
            namespace: NAMESPACE.into(),
            api_server: kube.url.clone(),
            ..KubernetesDiscovery::default()
        },
        ..DiscoveryConfig::default()
    };
    let gw = Gateway::start(cfg).await.expect("gateway");
    let url = gw.url();
    assert!(
        eventually(WAIT, || async {
            admin_workers(&url)
                .await
                .iter()
                .filter(|w| w["healthy"] == true)
                .count()
                == 3
        })
        .await,
        "{:?}",
        admin_workers(&url).await
    );
    assert_eq!(post_status(&url, chat("hello", 8)).await, 200);
    let gone = engines.engines[1].1.url();
    kube.delete("dc-0");
    assert!(
        eventually(WAIT, || async {
            admin_workers(&url)
                .await
                .iter()
                .all(|w| w["url"] != gone.as_str())
        })
        .await,
        "{:?}",
        admin_workers(&url).await
    );
    for i in 0..4 {
        assert_eq!(post_status(&url, chat(&format!("after {i}"), 8)).await, 200);
    }
    let left: Vec<String> = admin_workers(&url)
        .await
        .iter()
        .map(|w| w["url"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    gw.stop().await;
    engines.stop().await;
}
