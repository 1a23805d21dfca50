//! KV events live: reference engines publishing their prefix caches over ZMQ, gateways
//! subscribing. Two gateway replicas with the same config see the same fleet: prompts routed
//! through one make the other route their follow-ups to the engines holding the prefixes. An
//! engine that clears its cache or goes away takes its entries with it.

mod support;

use pdgate_engine_sim::kv_events::KvEventsConfig;
use pdgate_engine_sim::{EngineConfig, EngineHandle};
use pdgate_gateway::config::{Config, WorkerConfig};
use pdgate_gateway::Gateway;
use pdgate_scheduler::Role;
use pdgate_wire::kv_events::Encoding;
use pdgate_wire::prometheus::sample;
use std::time::Duration;
use support::{completion, eventually, metrics_text, post};

fn engine_cfg(role: Role, encoding: Encoding) -> EngineConfig {
    let mut e = EngineConfig {
        role,
        kv_blocks: 4096,
        ..EngineConfig::default()
    };
    // Real time: the gateway's cost model measures each engine's prefill speed, and with an
    // instant engine the one it measured most would look fastest whatever it holds.
    e.timing.time_scale = 1.0;
    e.kv_events = KvEventsConfig {
        enable_kv_cache_events: true,
        publisher: "zmq".into(),
        endpoint: "tcp://127.0.0.1:0".into(),
        replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        encoding,
        ..KvEventsConfig::default()
    };
    e
}

async fn engines(prefill: usize, decode: usize) -> Vec<(Role, EngineHandle)> {
    let mut out = Vec::new();
    let roles = std::iter::repeat_n(Role::Prefill, prefill)
        .chain(std::iter::repeat_n(Role::Decode, decode));
    for (i, role) in roles.enumerate() {
        // Half the fleet speaks the older positional encoding: the gateway reads both.
        let enc = if i % 2 == 0 {
            Encoding::Map
        } else {
            Encoding::Positional
        };
        out.push((
            role,
            pdgate_engine_sim::spawn(engine_cfg(role, enc))
                .await
                .expect("engine"),
        ));
    }
    out
}

fn gateway_cfg(engines: &[(Role, EngineHandle)], events: bool) -> Config {
    let mut cfg = Config::default();
    cfg.server.port = 0;
    cfg.health.interval_ms = 200;
    // Decode engines hold every prompt they decoded, so a follow-up could be prefilled there
    // (conditional disaggregation) by a replica blind to events too. Always prefilling on a
    // prefill engine makes the prefill engines' cache hits show which replica knew where the
    // prefixes are.
    cfg.scheduler.disagg.local_prefill_min_hit = 2.0;
    cfg.workers = engines
        .iter()
        .map(|(role, e)| {
            let (ev, replay) = e.kv_events_endpoints().expect("publishing");
            WorkerConfig {
                url: e.url(),
                role: *role,
                protocol: Default::default(),
                bootstrap_port: None,
                kv_events: events.then_some(ev),
                kv_events_replay: if events { replay } else { None },
            }
        })
        .collect();
    cfg
}

async fn start(cfg: Config) -> Gateway {
    let gw = Gateway::start(cfg).await.expect("gateway");
    gw.check_health().await;
    gw
}

/// Prompt tokens found in the prefix caches of the prefill engines.
async fn hits(engines: &[(Role, EngineHandle)]) -> f64 {
    let mut total = 0.0;
    for (_, e) in engines.iter().filter(|(r, _)| *r == Role::Prefill) {
        total += sample(
            &metrics_text(&e.url()).await,
            "vllm:prefix_cache_hits_total",
        )
        .unwrap_or(0.0);
    }
    total
}

fn indexed(gw: &Gateway) -> u64 {
    indexed_role(gw, Role::Prefill) + indexed_role(gw, Role::Decode)
}

/// A long prompt of its own per `i`: about 90 blocks of 16 tokens.
fn long_prompt(tag: &str, i: usize) -> String {
    (0..700)
        .map(|w| format!("{tag}{i}w{}", (w * 7919 + i * 104_729) % 100_003))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sends each prompt's follow-up (the prompt plus a new question) through `gw`; the prefix
/// cache hits it earns, in tokens.
async fn follow_ups(
    gw: &Gateway,
    engines: &[(Role, EngineHandle)],
    prompts: &[String],
) -> Vec<f64> {
    let mut per = Vec::new();
    for p in prompts {
        let before = hits(engines).await;
        let r = post(
            &gw.url(),
            "/v1/completions",
            completion(&format!("{p} and then what?"), 2),
        )
        .await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        per.push(hits(engines).await - before);
    }
    per
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_replica_routes_follow_ups_to_the_engines_holding_the_prefix() {
    let fleet = engines(4, 2).await;
    let a = start(gateway_cfg(&fleet, true)).await;
    let b = start(gateway_cfg(&fleet, true)).await;
    // Without events: the same fleet, a replica that only knows its own routing.
    let blind = start(gateway_cfg(&fleet, false)).await;

    let prompts: Vec<String> = (0..6).map(|i| long_prompt("kv", i)).collect();
    for p in &prompts {
        let r = post(&a.url(), "/v1/completions", completion(p, 2)).await;
        assert_eq!(r.status(), 200);
    }
    // Each prompt is ~90 full blocks; B learns them only from the engines' events.
    assert!(
        eventually(Duration::from_secs(10), || async { indexed(&b) >= 6 * 80 }).await,
        "replica B indexed {} blocks",
        indexed(&b)
    );
    assert_eq!(indexed(&blind), 0);

    let with_events = follow_ups(&b, &fleet, &prompts).await;
    for (i, h) in with_events.iter().enumerate() {
        assert!(
            *h >= 80.0 * 16.0,
            "follow-up {i} through B hit {h} tokens: {with_events:?}"
        );
    }

    // Whatever A chose, an idle fleet might lead a blind replica to the same engines. So the
    // control spreads prompts over the prefill engines directly (each engine serves plain
    // requests too), then asks both replicas for the follow-ups.
    let spread: Vec<String> = (0..6).map(|i| long_prompt("spread", i)).collect();
    let prefills: Vec<&EngineHandle> = fleet
        .iter()
        .filter(|(r, _)| *r == Role::Prefill)
        .map(|(_, e)| e)
        .collect();
    for (i, p) in spread.iter().enumerate() {
        let r = post(
            &prefills[i % prefills.len()].url(),
            "/v1/completions",
            completion(p, 2),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    assert!(
        eventually(Duration::from_secs(10), || async { indexed(&b) >= 12 * 80 }).await,
        "replica B indexed {} blocks",
        indexed(&b)
    );
    let with_events = follow_ups(&b, &fleet, &spread).await;
    for (i, h) in with_events.iter().enumerate() {
        assert!(
            *h >= 80.0 * 16.0,
            "spread follow-up {i} through B: {with_events:?}"
        );
    }
    let without = follow_ups(&blind, &fleet, &spread).await;
    let missed = without.iter().filter(|h| **h < 80.0 * 16.0).count();
    assert!(
        missed > 0,
        "without events every follow-up hit anyway ({without:?}): the check proves nothing"
    );

    for g in [a, b, blind] {
        g.stop().await;
    }
    for (_, e) in fleet {
        e.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cleared_cache_or_a_lost_engine_drops_its_entries() {
    let fleet = engines(1, 1).await;
    let gw = start(gateway_cfg(&fleet, true)).await;
    let held = || indexed(&gw);

    let r = post(
        &gw.url(),
        "/v1/completions",
        completion(&long_prompt("r", 0), 2),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(eventually(Duration::from_secs(5), || async { held() >= 80 }).await);

    // vLLM's /reset_prefix_cache: each engine publishes AllBlocksCleared.
    for (_, e) in &fleet {
        let r = support::client()
            .post(format!("{}/reset_prefix_cache", e.url()))
            .send()
            .await
            .expect("reset");
        assert_eq!(r.status(), 200);
    }
    assert!(
        eventually(Duration::from_secs(5), || async { held() == 0 }).await,
        "still {} entries after AllBlocksCleared",
        held()
    );

    let r = post(
        &gw.url(),
        "/v1/completions",
        completion(&long_prompt("r", 1), 2),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(eventually(Duration::from_secs(5), || async { held() >= 80 }).await);

    // The engines go away: the subscriptions are lost, and with them what the engines held.
    for (_, e) in fleet {
        e.stop().await;
    }
    assert!(
        eventually(Duration::from_secs(10), || async { held() == 0 }).await,
        "still {} entries after the engines stopped",
        held()
    );
    let text = metrics_text(&gw.url()).await;
    assert!(
        text.contains("pdgate_kv_events_resets_total"),
        "the lost subscription is counted"
    );
    gw.stop().await;
}

/// Blocks the gateway's index holds for `role`'s engines.
fn indexed_role(gw: &Gateway, role: Role) -> u64 {
    let fleet = &gw.state.models.all()[0].fleet;
    let s = fleet.scheduler.lock();
    fleet
        .workers
        .all()
        .iter()
        .filter(|w| w.role == role)
        .map(|w| s.index_blocks_of(w.id))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engines_host_tier_keeps_its_prefixes_indexed_and_served() {
    // Each prompt is ~43 blocks: the prefill's GPU tier holds one and a half, its host tier
    // the rest.
    let mut p = engine_cfg(Role::Prefill, Encoding::Map);
    p.kv_blocks = 64;
    p.host_cache_blocks = 1024;
    let d = engine_cfg(Role::Decode, Encoding::Positional);
    let fleet = vec![
        (
            Role::Prefill,
            pdgate_engine_sim::spawn(p).await.expect("prefill"),
        ),
        (
            Role::Decode,
            pdgate_engine_sim::spawn(d).await.expect("decode"),
        ),
    ];
    let mut cfg = gateway_cfg(&fleet, true);
    cfg.health.metrics_interval_ms = 100;
    let gw = start(cfg).await;
    let prefill_url = fleet[0].1.url();

    let prompts: Vec<String> = (0..3).map(|i| long_prompt("h", i)).collect();
    for p in &prompts {
        let r = post(&gw.url(), "/v1/completions", completion(p, 2)).await;
        assert_eq!(r.status(), 200);
    }
    // ~129 blocks stored, 64 on the GPU: the rest were published as moved to CPU, and the
    // index (sized from num_gpu_blocks + num_cpu_blocks) keeps them.
    let held = || indexed_role(&gw, Role::Prefill);
    assert!(
        eventually(Duration::from_secs(5), || async { held() >= 120 }).await,
        "the prefill's index holds {} blocks, the GPU tier 64",
        held()
    );
    let engine_metrics = metrics_text(&prefill_url).await;
    assert!(
        sample(&engine_metrics, "pdgate_sim_kv_host_cache_blocks").unwrap_or(0.0) >= 60.0,
        "evicted blocks moved to the host tier"
    );

    // The first prompt's follow-up finds its prefix in host memory: a hit, copied back.
    let per = follow_ups(&gw, &fleet, &prompts[..1]).await;
    assert!(per[0] >= 40.0 * 16.0, "{} prompt tokens hit", per[0]);
    let engine_metrics = metrics_text(&prefill_url).await;
    assert!(
        sample(&engine_metrics, "pdgate_sim_kv_host_hit_blocks_total").unwrap_or(0.0) >= 40.0,
        "served from the host tier"
    );
    gw.stop().await;
    for (_, e) in fleet {
        e.stop().await;
    }
}
