//! Booking sync between gateway replicas over a real broker (Debian's `nats-server`, token auth
//! from a file): a request through one replica loads its pair on another replica's scheduler
//! while it runs and releases it when it ends, where an unsynced replica sees nothing; a replica
//! that dies holding load is forgotten; an engine the receiver does not know is ignored; a
//! broker that cannot be reached costs no request, and one that restarts is reconnected to.

mod support;

use futures::StreamExt;
use pdgate::config::{ReplicasConfig, WorkerConfig};
use pdgate_gateway::config::ReplicaSync;
use pdgate_gateway::replica_sync::wire::{Event, Message};
use pdgate_gateway::Gateway;
use pdgate_scheduler::{Booking, InstanceId, Role};
use serde_json::Value;
use std::collections::HashSet;
use std::time::Duration;
use support::nats::{free_tcp_port, NatsServer};
use support::*;

const WAIT: Duration = Duration::from_secs(15);
const SUBJECT: &str = "pdgate.test.bookings";

fn synced(nats: &NatsServer, sync: ReplicaSync) -> ReplicasConfig {
    ReplicasConfig {
        sync,
        url: nats.url(),
        subject: SUBJECT.into(),
        token_file: Some(nats.token_file()),
        heartbeat_ms: 100,
        ..ReplicasConfig::default()
    }
}

/// Another replica over the same engines as `fleet`'s gateway.
async fn replica(fleet: &pdgate::Fleet, replicas: ReplicasConfig) -> Gateway {
    let mut cfg = pdgate_gateway::config::Config::default();
    cfg.server.port = 0;
    cfg.health.interval_ms = 200;
    for role in [Role::Prefill, Role::Decode] {
        cfg.workers.push(WorkerConfig {
            url: engine_url(fleet, role),
            role,
            protocol: fleet.gateway.state.models.all()[0].fleet.workers.all()[0].protocol,
            bootstrap_port: None,
            kv_events: None,
            kv_events_replay: None,
        });
    }
    cfg.replicas = replicas;
    Gateway::start(cfg).await.expect("replica starts")
}

/// `load` of the worker at `url` as `/admin/workers` of `gateway` shows it.
async fn load_of(gateway: &str, url: &str) -> Value {
    admin_workers(gateway)
        .await
        .into_iter()
        .find(|w| w["url"] == url)
        .map(|w| w["load"].clone())
        .unwrap_or(Value::Null)
}

async fn decode_seqs(gateway: &str, url: &str) -> u64 {
    load_of(gateway, url).await["decode_seqs"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// A client of our own on the broker, to see who publishes and to play a replica.
async fn broker_client(nats: &NatsServer) -> async_nats::Client {
    let token = std::fs::read_to_string(nats.token_file()).expect("token");
    async_nats::ConnectOptions::with_token(token.trim().to_string())
        .connect(nats.url())
        .await
        .expect("test client connects")
}

/// Waits until `n` distinct replicas have published: each subscribed before it first published
/// (the server takes one connection's commands in order), so all now hear each other.
async fn wait_for_replicas(client: &async_nats::Client, n: usize) {
    let mut sub = client.subscribe(SUBJECT).await.expect("subscribe");
    let mut seen = HashSet::new();
    let heard = tokio::time::timeout(WAIT, async {
        while let Some(m) = sub.next().await {
            if let Ok(m) = serde_json::from_slice::<Message>(&m.payload) {
                seen.insert(m.replica);
            }
            if seen.len() >= n {
                return;
            }
        }
    })
    .await;
    assert!(
        heard.is_ok(),
        "only {} replicas heard on the broker",
        seen.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_through_one_replica_loads_its_pair_on_the_other_until_it_ends() {
    let nats = NatsServer::start();
    // Real-time engines and a long answer: the request is still decoding while we look.
    let mut cfg = config(1, 1, 1.0);
    cfg.replicas = synced(&nats, ReplicaSync::Nats);
    let a = fleet(cfg).await;
    let b = replica(&a, synced(&nats, ReplicaSync::Nats)).await;
    let unsynced = replica(&a, synced(&nats, ReplicaSync::None)).await;
    let (b_url, unsynced_url) = (b.url(), unsynced.url());
    let decode = engine_url(&a, Role::Decode);
    let prefill = engine_url(&a, Role::Prefill);
    wait_for_replicas(&broker_client(&nats).await, 2).await;
    assert_eq!(decode_seqs(&b_url, &decode).await, 0);

    let a_url = a.gateway.url();
    let request = tokio::spawn(async move {
        post(
            &a_url,
            "/v1/completions",
            completion("tell me a long story", 1000),
        )
        .await
    });
    assert!(
        eventually(WAIT, || async { decode_seqs(&b_url, &decode).await == 1 }).await,
        "the other replica never saw the booking"
    );
    assert!(
        !request.is_finished(),
        "the request ended before it was seen"
    );
    assert_eq!(
        decode_seqs(&unsynced_url, &decode).await,
        0,
        "a replica without sync saw load it cannot know of"
    );
    let resp = request.await.expect("request task");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0);
    assert!(
        eventually(WAIT, || async { decode_seqs(&b_url, &decode).await == 0 }).await,
        "the other replica kept the load after the request ended"
    );
    let prefill_left = load_of(&b_url, &prefill).await;
    assert_eq!(
        prefill_left["prefill_tokens"], 0,
        "prefill load not released: {prefill_left}"
    );
    assert_eq!(
        prefill_left["in_flight"], 0,
        "prefill still in flight: {prefill_left}"
    );
    let metrics = metrics_text(&b.url()).await;
    for (dir, outcome) in [("out", "published"), ("in", "booked"), ("in", "released")] {
        assert!(
            series(
                &metrics,
                "pdgate_replica_sync_messages_total",
                &[("direction", dir), ("outcome", outcome)]
            )
            .unwrap_or(0.0)
                >= 1.0,
            "no {dir}/{outcome} sync message counted"
        );
    }
    b.stop().await;
    unsynced.stop().await;
    a.stop().await;
}

/// What a replica publishes for a booking on `decode_url` (prefilled locally).
fn booked(replica: u64, ticket: u64, decode_url: &str) -> Vec<u8> {
    let booking = Booking {
        prefill: None,
        decode: InstanceId(42),
        uncached_tokens: 64,
        decode_tokens: 128,
        decode_blocks: 8,
        predicted_prefill_ms: 10.0,
        compute_ms: 10.0,
        decode_end_ms: 60_000.0,
        pull: None,
        evict_first: None,
    };
    let msg = Message {
        replica,
        event: Event::Booked {
            ticket,
            prefill_url: None,
            decode_url: decode_url.into(),
            pull_from_url: None,
            booking,
            blocks: Vec::new(),
        },
    };
    serde_json::to_vec(&msg).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_dies_holding_load_is_forgotten_and_unknown_engines_are_ignored() {
    let nats = NatsServer::start();
    let mut cfg = config(1, 1, 0.0);
    cfg.replicas = synced(&nats, ReplicaSync::Nats);
    cfg.replicas.replica_timeout_ms = 600;
    let a = fleet(cfg).await;
    let gw = a.gateway.url();
    let decode = engine_url(&a, Role::Decode);
    let client = broker_client(&nats).await;
    wait_for_replicas(&client, 1).await;

    // A replica this gateway does not know books on an engine it does not front: dropped.
    client
        .publish(SUBJECT, booked(7, 1, "http://127.0.0.1:1").into())
        .await
        .expect("publish");
    // Then on its decode engine, and then never says another word.
    client
        .publish(SUBJECT, booked(7, 2, &decode).into())
        .await
        .expect("publish");
    client.flush().await.expect("flush");
    assert!(
        eventually(WAIT, || async { decode_seqs(&gw, &decode).await == 1 }).await,
        "the booking by URL never arrived"
    );
    let metrics = metrics_text(&gw).await;
    assert!(
        series(
            &metrics,
            "pdgate_replica_sync_messages_total",
            &[("direction", "in"), ("outcome", "unknown_worker")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        eventually(WAIT, || async { decode_seqs(&gw, &decode).await == 0 }).await,
        "a silent replica's booking was never released"
    );
    let metrics = metrics_text(&gw).await;
    assert!(
        series(
            &metrics,
            "pdgate_replica_sync_expired_total",
            &[("reason", "replica_gone")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_unreachable_requests_are_still_served() {
    let mut cfg = config(1, 1, 0.0);
    cfg.replicas = ReplicasConfig {
        sync: ReplicaSync::Nats,
        url: format!("nats://127.0.0.1:{}", free_tcp_port()),
        ..ReplicasConfig::default()
    };
    let a = fleet(cfg).await;
    let gw = a.gateway.url();
    for i in 0..5 {
        let resp = post(&gw, "/v1/completions", completion(&format!("hello {i}"), 8)).await;
        assert_eq!(
            resp.status(),
            200,
            "request {i} failed with the broker down"
        );
    }
    let decode = engine_url(&a, Role::Decode);
    assert!(eventually(WAIT, || async { decode_seqs(&gw, &decode).await == 0 }).await);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_restart_costs_no_request_and_sync_resumes() {
    let mut nats = NatsServer::start();
    let mut cfg = config(1, 1, 1.0);
    cfg.replicas = synced(&nats, ReplicaSync::Nats);
    let a = fleet(cfg).await;
    let b = replica(&a, synced(&nats, ReplicaSync::Nats)).await;
    let (a_url, b_url) = (a.gateway.url(), b.url());
    let decode = engine_url(&a, Role::Decode);
    wait_for_replicas(&broker_client(&nats).await, 2).await;

    nats.stop();
    for i in 0..3 {
        let resp = post(
            &a_url,
            "/v1/completions",
            completion(&format!("down {i}"), 4),
        )
        .await;
        assert_eq!(
            resp.status(),
            200,
            "request {i} failed while the broker was down"
        );
    }
    nats.restart();
    // Both replicas publish again, so both resubscribed first (one connection's commands are
    // taken in order).
    wait_for_replicas(&broker_client(&nats).await, 2).await;
    let request = tokio::spawn(async move {
        post(
            &a_url,
            "/v1/completions",
            completion("after the restart", 1000),
        )
        .await
    });
    assert!(
        eventually(WAIT, || async { decode_seqs(&b_url, &decode).await == 1 }).await,
        "sync did not resume after the broker came back"
    );
    assert_eq!(request.await.expect("request task").status(), 200);
    assert!(eventually(WAIT, || async { decode_seqs(&b_url, &decode).await == 0 }).await);
    b.stop().await;
    a.stop().await;
}
