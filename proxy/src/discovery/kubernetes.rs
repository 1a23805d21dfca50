//! Kubernetes discovery: one watch per role on the pods of one namespace, filtered by a label
//! selector the API server evaluates. A pod is a worker while it is Ready, has an IP and is not
//! terminating; it is keyed by its UID, so readiness flips, a changed address and a delete that
//! carries a different last state all land on the same worker.
//!
//! Every raw watch event is handled, deletes included (a stream of applied objects alone drops
//! them, and a worker nobody deletes stays forever). A re-list (first start, after `410 Gone`, and
//! every `resync_secs` by restarting the watch) replaces the role's whole set, so a pod deleted
//! while the watch was down, or an event missed, is repaired. It only reads the API: never
//! writes to it.

use super::membership::{engine_url, Membership};
use crate::config::{KubernetesDiscovery, Protocol, WorkerConfig};
use crate::fleet::Fleet;
use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use pdgate_scheduler::Role;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

pub const PROTOCOL_ANNOTATION: &str = "pdgate.io/protocol";
pub const HTTP_PORT_ANNOTATION: &str = "pdgate.io/http-port";
pub const BOOTSTRAP_PORT_ANNOTATION: &str = "pdgate.io/bootstrap-port";
/// The engine's KV events publisher port (vLLM/SGLang `--kv-events-config` endpoint, 5557 by
/// their examples): the gateway subscribes to `tcp://{podIP}:{port}`. Absent: no events, the
/// prefix index learns from routing for this pod.
pub const KV_EVENTS_PORT_ANNOTATION: &str = "pdgate.io/kv-events-port";
/// The engine's KV events replay (ROUTER) port, `replay_endpoint` in `--kv-events-config`.
pub const KV_EVENTS_REPLAY_PORT_ANNOTATION: &str = "pdgate.io/kv-events-replay-port";
/// The engine's HTTP port when a pod does not name one.
pub const DEFAULT_HTTP_PORT: u16 = 8000;

const SOURCE: &str = "kubernetes";

/// Connects (in-cluster, kubeconfig, or `api_server` directly) and starts a watch per role.
pub async fn start(
    cfg: &KubernetesDiscovery,
    fleet: &Arc<Fleet>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let config = if cfg.api_server.is_empty() {
        kube::Config::infer()
            .await
            .context("discovery.kubernetes: no in-cluster service account or kubeconfig")?
    } else {
        let url = cfg
            .api_server
            .parse()
            .with_context(|| format!("discovery.kubernetes.api_server `{}`", cfg.api_server))?;
        kube::Config::new(url)
    };
    let namespace = namespace(cfg, &config.default_namespace);
    let client = Client::try_from(config).context("discovery.kubernetes: building the client")?;
    tracing::info!(
        namespace = %namespace,
        prefill = %cfg.prefill_selector,
        decode = %cfg.decode_selector,
        "kubernetes discovery watching pods"
    );
    let resync = Duration::from_secs(cfg.resync_secs.max(1));
    Ok([
        (Role::Prefill, &cfg.prefill_selector),
        (Role::Decode, &cfg.decode_selector),
    ]
    .into_iter()
    .map(|(role, selector)| {
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let m = Membership::new(SOURCE, role, Arc::clone(fleet));
        tokio::spawn(watch_role(api, selector.clone(), resync, m))
    })
    .collect())
}

/// The configured namespace, else the pod's own (`POD_NAMESPACE`, from the downward API),
/// else what the client configuration says (the service account's namespace file in a pod).
fn namespace(cfg: &KubernetesDiscovery, client_default: &str) -> String {
    if !cfg.namespace.is_empty() {
        return cfg.namespace.clone();
    }
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| client_default.to_string())
}

/// Watches one role's pods forever, restarting the watch (a full re-list) every `resync`.
async fn watch_role(api: Api<Pod>, selector: String, resync: Duration, mut m: Membership) {
    let role = m.role;
    let wc = watcher::Config::default().labels(&selector);
    loop {
        let stream = watcher::watcher(api.clone(), wc.clone()).default_backoff();
        futures::pin_mut!(stream);
        let deadline = tokio::time::sleep(resync);
        futures::pin_mut!(deadline);
        // Pods seen since the last `Init`, until `InitDone` makes them the whole set.
        let mut listing: Option<HashMap<String, Option<WorkerConfig>>> = None;
        loop {
            let event = tokio::select! {
                _ = &mut deadline => break,
                e = stream.next() => e,
            };
            match event {
                None => break,
                Some(Ok(e)) => apply(e, role, &mut listing, &mut m),
                Some(Err(e)) => {
                    // The watcher retries (with backoff); a 410 makes it re-list.
                    tracing::warn!(role = %role, error = %e, "kubernetes watch error");
                    crate::metrics::discovery_event(SOURCE, "error");
                }
            }
        }
        tracing::debug!(role = %role, "kubernetes discovery: periodic re-list");
        crate::metrics::discovery_event(SOURCE, "resync");
    }
}

fn apply(
    event: Event<Pod>,
    role: Role,
    listing: &mut Option<HashMap<String, Option<WorkerConfig>>>,
    m: &mut Membership,
) {
    match event {
        Event::Init => *listing = Some(HashMap::new()),
        Event::InitApply(pod) => {
            if let Some(l) = listing.as_mut() {
                l.insert(key(&pod), endpoint_or_warn(&pod, role));
            }
        }
        Event::InitDone => {
            let all = listing.take().unwrap_or_default();
            crate::metrics::discovery_event(SOURCE, "listed");
            m.replace_all(all.into_iter().filter_map(|(k, e)| Some((k, e?))).collect());
        }
        Event::Apply(pod) => {
            crate::metrics::discovery_event(SOURCE, "applied");
            match endpoint_or_warn(&pod, role) {
                Some(e) => m.upsert(&key(&pod), e),
                None => m.remove(&key(&pod)),
            }
        }
        Event::Delete(pod) => {
            crate::metrics::discovery_event(SOURCE, "deleted");
            m.remove(&key(&pod));
        }
    }
}

/// A pod's UID: stable for its whole life, unlike its readiness, address or annotations.
fn key(pod: &Pod) -> String {
    let meta = &pod.metadata;
    match &meta.uid {
        Some(uid) => uid.clone(),
        None => format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        ),
    }
}

fn endpoint_or_warn(pod: &Pod, role: Role) -> Option<WorkerConfig> {
    endpoint(pod, role).unwrap_or_else(|why| {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        tracing::warn!(pod = name, error = %why, "pod skipped: bad pdgate.io annotation");
        crate::metrics::discovery_event(SOURCE, "invalid");
        None
    })
}

/// Where to reach `pod` when it should take traffic: Ready, with an IP, not terminating.
/// `Err` for an annotation that cannot be read.
pub fn endpoint(pod: &Pod, role: Role) -> Result<Option<WorkerConfig>, String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    let Some(status) = &pod.status else {
        return Ok(None);
    };
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let ip = status
        .pod_ip
        .as_deref()
        .filter(|ip| !ip.is_empty())
        .map(str::parse::<IpAddr>);
    let ip = match (ready, ip) {
        (true, Some(Ok(ip))) => ip,
        (true, Some(Err(e))) => return Err(format!("status.podIP: {e}")),
        _ => return Ok(None),
    };
    let note = |k: &str| {
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(k))
            .map(|v| v.trim())
    };
    let port = |k: &str| -> Result<Option<u16>, String> {
        note(k)
            .map(|v| match v.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(format!("{k} `{v}` is not a port")),
            })
            .transpose()
    };
    let protocol = match note(PROTOCOL_ANNOTATION) {
        Some(p) => p.parse::<Protocol>()?,
        None => Protocol::default(),
    };
    let http_port = port(HTTP_PORT_ANNOTATION)?.unwrap_or(DEFAULT_HTTP_PORT);
    Ok(Some(WorkerConfig {
        url: engine_url(ip, http_port),
        role,
        protocol,
        bootstrap_port: port(BOOTSTRAP_PORT_ANNOTATION)?,
        kv_events: port(KV_EVENTS_PORT_ANNOTATION)?.map(|p| zmq_tcp(ip, p)),
        kv_events_replay: port(KV_EVENTS_REPLAY_PORT_ANNOTATION)?.map(|p| zmq_tcp(ip, p)),
    }))
}

fn zmq_tcp(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("tcp://{v4}:{port}"),
        IpAddr::V6(v6) => format!("tcp://[{v6}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ready: bool, ip: &str, annotations: serde_json::Value, deleting: bool) -> Pod {
        let mut meta =
            json!({"name": "p", "namespace": "ns", "uid": "u1", "annotations": annotations});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(json!({
            "metadata": meta,
            "status": {
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            },
        }))
        .expect("pod")
    }

    #[test]
    fn only_ready_pods_with_an_ip_not_terminating_are_workers() {
        let a = json!({});
        let ok = endpoint(&pod(true, "10.1.0.5", a.clone(), false), Role::Decode);
        assert_eq!(
            ok.map(|e| e.map(|e| e.url)),
            Ok(Some("http://10.1.0.5:8000".into()))
        );
        for p in [
            pod(false, "10.1.0.5", a.clone(), false),
            pod(true, "", a.clone(), false),
            pod(true, "10.1.0.5", a.clone(), true),
        ] {
            assert_eq!(endpoint(&p, Role::Decode), Ok(None));
        }
    }

    #[test]
    fn annotations_say_protocol_and_ports() {
        let a = json!({
            "pdgate.io/protocol": "sglang",
            "pdgate.io/http-port": "30000",
            "pdgate.io/bootstrap-port": "8998",
            "pdgate.io/kv-events-port": "5557",
            "pdgate.io/kv-events-replay-port": "5558",
        });
        let e = endpoint(&pod(true, "fd00::7", a, false), Role::Prefill)
            .expect("valid")
            .expect("ready");
        assert_eq!(e.url, "http://[fd00::7]:30000");
        assert_eq!(e.protocol, Protocol::Sglang);
        assert_eq!(e.bootstrap_port, Some(8998));
        assert_eq!(e.kv_events.as_deref(), Some("tcp://[fd00::7]:5557"));
        assert_eq!(e.kv_events_replay.as_deref(), Some("tcp://[fd00::7]:5558"));
        for bad in [
            json!({"pdgate.io/protocol": "grpc"}),
            json!({"pdgate.io/http-port": "http"}),
            json!({"pdgate.io/bootstrap-port": "0"}),
            json!({"pdgate.io/kv-events-port": "zmq"}),
        ] {
            assert!(endpoint(&pod(true, "10.0.0.1", bad, false), Role::Prefill).is_err());
        }
    }
}
