//! Several models behind one gateway, with real reference engines: `pdgate up` with two
//! `[[models]]`, each its own prefill and decode engines serving its own name. Requests land on
//! the engines of the model they name (or alias) and nowhere else, an unknown model is a 404,
//! `/v1/models` lists both, and the admin API adds and drains engines per model.

mod support;

use pdgate::config::{Config, ModelEntry};
use pdgate::Fleet;
use pdgate_engine_sim::EngineConfig;
use pdgate_scheduler::Role;
use pdgate_wire::prometheus::sample;
use serde_json::{json, Value};
use std::time::Duration;
use support::*;

const TOKEN: &str = "adm";

fn two_models() -> Config {
    let mut cfg = config(1, 1, 0.0);
    cfg.server.admin_token = Some(TOKEN.into());
    cfg.models = vec![
        ModelEntry {
            name: "alpha-8b".into(),
            aliases: vec!["alpha".into()],
            ..ModelEntry::default()
        },
        ModelEntry {
            name: "beta-70b".into(),
            ..ModelEntry::default()
        },
    ];
    cfg
}

fn chat_for(model: &str, content: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 3})
}

/// Requests each engine of the fleet has finished, by engine URL.
async fn finished(fleet: &Fleet) -> Vec<(String, String, f64)> {
    let mut out = Vec::new();
    for ((_, e), model) in fleet.engines.iter().zip(&fleet.engine_models) {
        let n = sample(&metrics_text(&e.url()).await, "vllm:request_success_total");
        out.push((model.clone(), e.url(), n.unwrap_or(0.0)));
    }
    out
}

fn total(counts: &[(String, String, f64)], model: &str) -> f64 {
    counts
        .iter()
        .filter(|(m, _, _)| m == model)
        .map(|(_, _, n)| n)
        .sum()
}

async fn admin_get(gw: &str) -> Vec<Value> {
    client()
        .get(format!("{gw}/admin/workers"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json")
}

async fn admin_post(gw: &str, body: Value) -> reqwest::Response {
    client()
        .post(format!("{gw}/admin/workers"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .expect("post")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_model_is_served_by_its_own_engines() {
    let fleet = fleet(two_models()).await;
    let gw = fleet.url();
    assert_eq!(fleet.engines.len(), 4, "a prefill and a decode per model");

    let listed: Value = client()
        .get(format!("{gw}/v1/models"))
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["alpha-8b", "beta-70b"]);
    assert_eq!(listed["data"][0]["aliases"], json!(["alpha"]));

    // The metrics recorder is the process's, shared with the other test: deltas only.
    let beta_ok = "pdgate_requests_total{api=\"chat\",model=\"beta-70b\",status=\"2xx\"}";
    let unknown = "pdgate_requests_total{api=\"chat\",model=\"\",status=\"4xx\"}";
    let count = |m: &str, name: &str| sample(m, name).unwrap_or(0.0);
    let m0 = metrics_text(&gw).await;
    let before = finished(&fleet).await;
    for (asked, served) in [
        ("alpha-8b", "alpha-8b"),
        ("alpha", "alpha-8b"),
        ("beta-70b", "beta-70b"),
    ] {
        let r = post(&gw, "/v1/chat/completions", chat_for(asked, "which model?")).await;
        assert_eq!(r.status(), 200, "{asked}");
        let body: Value = r.json().await.expect("json");
        // The engine answers with the model it serves: the one the request was routed to.
        assert_eq!(body["model"], served, "{asked}");
    }
    let after = finished(&fleet).await;
    assert_eq!(total(&after, "alpha-8b") - total(&before, "alpha-8b"), 2.0);
    assert_eq!(total(&after, "beta-70b") - total(&before, "beta-70b"), 1.0);

    let r = post(&gw, "/v1/chat/completions", chat_for("gamma", "hi")).await;
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["code"], "model_not_found");
    assert_eq!(
        finished(&fleet).await,
        after,
        "an unknown model reaches no engine"
    );

    let ready: Value = client()
        .get(format!("{gw}/ready"))
        .send()
        .await
        .expect("ready")
        .json()
        .await
        .expect("json");
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["models"]["beta-70b"]["healthy_decode"], 1);

    let m = metrics_text(&gw).await;
    assert!(count(&m, beta_ok) - count(&m0, beta_ok) >= 1.0, "{m}");
    assert!(
        count(&m, unknown) - count(&m0, unknown) >= 1.0,
        "unknown names stay out of the label: {m}"
    );
    assert!(!m.contains("model=\"gamma\""), "{m}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_adds_and_drains_engines_per_model() {
    let fleet = fleet(two_models()).await;
    let gw = fleet.url();
    let listed = admin_get(&gw).await;
    assert_eq!(listed.len(), 4);
    for w in &listed {
        let model = fleet
            .engines
            .iter()
            .zip(&fleet.engine_models)
            .find(|((_, e), _)| e.url() == w["url"].as_str().unwrap_or_default())
            .map(|(_, m)| m.as_str());
        assert_eq!(w["model"].as_str(), model, "{w}");
    }
    let ids: std::collections::BTreeSet<u64> =
        listed.iter().filter_map(|w| w["id"].as_u64()).collect();
    assert_eq!(ids.len(), 4, "worker ids are unique across models");

    // A second decode engine for beta.
    let extra = pdgate_engine_sim::spawn(EngineConfig {
        role: Role::Decode,
        model: "beta-70b".into(),
        port: 0,
        transfer_port: 0,
        registry_url: Some(gw.clone()),
        ..fleet_engine_template(&fleet)
    })
    .await
    .expect("engine");
    let entry = json!({"url": extra.url(), "role": "decode"});
    let r = admin_post(&gw, entry.clone()).await;
    assert_eq!(r.status(), 400, "several models: `model` is required");
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["param"], "model");
    let mut aliased = entry.clone();
    aliased["model"] = json!("alpha");
    assert_eq!(
        admin_post(&gw, aliased).await.status(),
        400,
        "the admin API names models as configured, not by alias"
    );
    let alpha_decode = listed
        .iter()
        .find(|w| w["model"] == "alpha-8b" && w["role"] == "decode")
        .expect("alpha decode");
    let taken = json!({"url": alpha_decode["url"], "role": "decode", "model": "beta-70b"});
    assert_eq!(
        admin_post(&gw, taken).await.status(),
        409,
        "an engine serves one model"
    );
    let mut to_beta = entry.clone();
    to_beta["model"] = json!("beta-70b");
    let r = admin_post(&gw, to_beta).await;
    assert_eq!(r.status(), 201);
    let added: Value = r.json().await.expect("json");
    assert_eq!(added["model"], "beta-70b");

    // Beta's original decode leaves: beta's traffic moves to the added engine only.
    let old = listed
        .iter()
        .find(|w| w["model"] == "beta-70b" && w["role"] == "decode")
        .expect("beta decode");
    let r = client()
        .delete(format!("{gw}/admin/workers/{}", old["id"]))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 200);
    let removed: Value = r.json().await.expect("json");
    assert_eq!(removed["model"], "beta-70b");
    fleet.gateway.check_health().await;
    let served_by_extra = eventually(Duration::from_secs(10), || async {
        let r = post(&gw, "/v1/chat/completions", chat_for("beta-70b", "moved?")).await;
        r.status() == 200
    })
    .await;
    assert!(served_by_extra, "beta serves on its added decode");
    let extra_done = sample(
        &metrics_text(&extra.url()).await,
        "vllm:request_success_total",
    );
    assert_eq!(
        extra_done,
        Some(1.0),
        "the added engine served beta's request"
    );
    // Alpha is untouched.
    let r = post(&gw, "/v1/chat/completions", chat_for("alpha", "still here")).await;
    assert_eq!(r.status(), 200);
    fleet.stop().await;
    extra.stop().await;
}

/// The demo engines' settings (model aside), for an engine added by hand.
fn fleet_engine_template(fleet: &Fleet) -> EngineConfig {
    let mut cfg = EngineConfig::default();
    cfg.timing.time_scale = 0.0;
    cfg.kv_blocks = 1024;
    cfg.fleet_secret_file = fleet.gateway.state.cfg.server.fleet_secret_file.clone();
    cfg
}

/// Each model discovers its own pods (Kubernetes, by the `pdgate.io/model` label the chart puts
/// on engine pods) into its own fleet; a model that loses its decode pod stops serving while
/// the other serves on, and the gateway stays ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_model_discovers_its_own_pods() {
    use pdgate_gateway::config::{DiscoveryConfig, DiscoveryKind, KubernetesDiscovery};
    use pdgate_gateway::gateway::Gateway;
    use support::kube_api::{pod, FakeKube, NAMESPACE};
    // The engines (their KV registry is this demo gateway's; the gateway under test routes).
    let engines = fleet(two_models()).await;
    let kube = FakeKube::start().await;
    let port_of = |url: String| -> u16 {
        url.rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port")
    };
    for (i, ((role, e), model)) in engines
        .engines
        .iter()
        .zip(&engines.engine_models)
        .enumerate()
    {
        let mut p = pod(
            &format!("{model}-{role}"),
            &format!("u-{i}"),
            role.as_str(),
            Some("127.0.0.1"),
            true,
            port_of(e.url()),
        );
        p["metadata"]["labels"]["pdgate.io/model"] = json!(model);
        kube.apply(p);
    }
    let discovery = |model: &str| DiscoveryConfig {
        kind: DiscoveryKind::Kubernetes,
        kubernetes: KubernetesDiscovery {
            namespace: NAMESPACE.into(),
            api_server: kube.url.clone(),
            prefill_selector: format!("pdgate.io/role=prefill,pdgate.io/model={model}"),
            decode_selector: format!("pdgate.io/role=decode,pdgate.io/model={model}"),
            ..KubernetesDiscovery::default()
        },
        ..DiscoveryConfig::default()
    };
    let mut cfg = engines.gateway.state.cfg.clone();
    cfg.server.port = 0;
    for m in &mut cfg.models {
        m.discovery = discovery(&m.name);
    }
    let gw = Gateway::start(cfg).await.expect("gateway");
    let url = gw.url();
    let all_healthy = eventually(Duration::from_secs(15), || async {
        let w = admin_get(&url).await;
        w.len() == 4 && w.iter().all(|w| w["healthy"] == true)
    })
    .await;
    assert!(all_healthy, "{:?}", admin_get(&url).await);
    for w in admin_get(&url).await {
        let engine_model = engines
            .engines
            .iter()
            .zip(&engines.engine_models)
            .find(|((_, e), _)| w["url"] == e.url().as_str())
            .map(|(_, m)| m.clone());
        assert_eq!(w["model"].as_str(), engine_model.as_deref(), "{w}");
    }
    for model in ["alpha-8b", "beta-70b"] {
        let r = post(&url, "/v1/chat/completions", chat_for(model, "discovered?")).await;
        assert_eq!(r.status(), 200, "{model}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["model"], model);
    }
    kube.delete("beta-70b-decode");
    let beta_gone = eventually(Duration::from_secs(15), || async {
        admin_get(&url)
            .await
            .iter()
            .all(|w| !(w["model"] == "beta-70b" && w["role"] == "decode"))
    })
    .await;
    assert!(beta_gone, "{:?}", admin_get(&url).await);
    let r = post(
        &url,
        "/v1/chat/completions",
        chat_for("beta-70b", "anyone?"),
    )
    .await;
    assert_eq!(r.status(), 503, "beta has no decode left");
    let r = post(&url, "/v1/chat/completions", chat_for("alpha", "still?")).await;
    assert_eq!(r.status(), 200, "alpha is untouched");
    let ready = client()
        .get(format!("{url}/ready"))
        .send()
        .await
        .expect("ready");
    assert_eq!(
        ready.status(),
        200,
        "one model down leaves the gateway ready"
    );
    let ready: Value = ready.json().await.expect("json");
    assert_eq!(ready["models"]["beta-70b"]["ready"], false);
    assert_eq!(ready["models"]["alpha-8b"]["ready"], true);
    gw.stop().await;
    engines.stop().await;
}
