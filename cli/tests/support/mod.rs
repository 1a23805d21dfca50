//! Shared helpers for the gateway's integration tests: a fleet on loopback, and readers for
//! engine and gateway metrics.
#![allow(dead_code)]

pub mod dnsmasq;
pub mod engines;
pub mod kube_api;
pub mod nats;
pub mod procs;
pub mod tls;

use pdgate::config::Config;
use pdgate::Fleet;
use pdgate_scheduler::Role;
use pdgate_wire::prometheus::sample;
use serde_json::Value;
use std::time::Duration;

pub fn config(prefill: usize, decode: usize, time_scale: f64) -> Config {
    let mut cfg = Config::default();
    cfg.server.port = 0;
    cfg.up.prefill = prefill;
    cfg.up.decode = decode;
    cfg.up.engine.timing.time_scale = time_scale;
    cfg.up.engine.kv_blocks = 1024;
    cfg.health.interval_ms = 200;
    cfg
}

pub async fn fleet(cfg: Config) -> Fleet {
    Fleet::start(cfg).await.expect("fleet starts")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

pub async fn post(url: &str, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(format!("{url}{path}"))
        .json(&body)
        .send()
        .await
        .expect("request sent")
}

pub fn chat(content: &str, max_tokens: u32) -> Value {
    serde_json::json!({"model": "pdgate-sim-8b", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
}

pub fn completion(prompt: &str, max_tokens: u32) -> Value {
    serde_json::json!({"model": "pdgate-sim-8b", "prompt": prompt, "max_tokens": max_tokens})
}

pub async fn metrics_text(url: &str) -> String {
    client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// The value of the first series of `name` whose labels include every `labels` pair.
pub fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Sum of one engine metric over the fleet's engines of `role`.
pub async fn engine_sum(fleet: &Fleet, role: Role, name: &str) -> f64 {
    let mut total = 0.0;
    for (r, e) in &fleet.engines {
        if *r == role {
            total += sample(&metrics_text(&e.url()).await, name).unwrap_or(0.0);
        }
    }
    total
}

/// Waits until the gateway has read every engine's own metrics (so it knows each cache's size).
pub async fn engine_reports_read(url: &str) {
    let all_read = || async {
        let views: Value = match client().get(format!("{url}/admin/workers")).send().await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => return false,
        };
        views
            .as_array()
            .is_some_and(|ws| ws.iter().all(|w| !w["load"]["engine"].is_null()))
    };
    assert!(
        eventually(Duration::from_secs(10), all_read).await,
        "every engine's metrics read"
    );
}

/// Starts a completion stream of `max_tokens` (booking that much decode KV until it ends) and
/// returns once its first chunk arrived; the task reads it to its end.
pub async fn hold_decode_room(
    url: &str,
    model: &str,
    max_tokens: u32,
) -> tokio::task::JoinHandle<()> {
    let mut long = client()
        .post(format!("{url}/v1/completions"))
        .json(
            &serde_json::json!({"model": model, "prompt": "hold the room",
            "max_tokens": max_tokens, "stream": true}),
        )
        .send()
        .await
        .expect("sent");
    assert_eq!(long.status().as_u16(), 200);
    assert!(
        long.chunk().await.expect("read").is_some(),
        "the long stream started"
    );
    tokio::spawn(async move { while let Ok(Some(_)) = long.chunk().await {} })
}

/// Polls until `f` holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits (up to 6 s) until no engine of the fleet holds a KV reservation.
pub async fn no_reservations_left(fleet: &Fleet) -> bool {
    eventually(Duration::from_secs(6), || async {
        engine_sum(fleet, Role::Decode, "pdgate_sim_kv_reservations_active").await == 0.0
            && engine_sum(fleet, Role::Prefill, "pdgate_sim_kv_reservations_active").await == 0.0
    })
    .await
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// A proxy in front of one engine that can be told to fail: every `/v1/*` call is counted (and
/// its `x-request-id` kept), and answered 500 while `fail` is set, else forwarded (body
/// buffered: non-streamed tests only) and answered after `delay`. Everything else (`/health`,
/// `/metrics`, a bootstrap call) is forwarded at once, so the worker looks alive to health
/// checks while it fails requests: exactly what a circuit breaker, not a health check, must catch.
pub struct Flaky {
    pub url: String,
    pub fail: std::sync::atomic::AtomicBool,
    pub hits: std::sync::atomic::AtomicUsize,
    pub delay: Duration,
    pub request_ids: std::sync::Mutex<Vec<String>>,
}

impl Flaky {
    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The `x-request-id` of every `/v1/*` call so far, in arrival order.
    pub fn request_ids(&self) -> Vec<String> {
        self.request_ids
            .lock()
            .map(|ids| ids.clone())
            .unwrap_or_default()
    }

    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A [`Flaky`] proxy failing every `/v1/*` call until told otherwise.
pub async fn flaky(target: String) -> std::sync::Arc<Flaky> {
    proxy(target, true, Duration::ZERO).await
}

/// A [`Flaky`] proxy that never fails but answers every `/v1/*` call `delay` late.
pub async fn delayed(target: String, delay: Duration) -> std::sync::Arc<Flaky> {
    proxy(target, false, delay).await
}

async fn proxy(target: String, fail: bool, delay: Duration) -> std::sync::Arc<Flaky> {
    use axum::extract::{Request, State};
    use axum::response::{IntoResponse, Response};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let flaky = Arc::new(Flaky {
        url: format!("http://{}", listener.local_addr().expect("addr")),
        fail: std::sync::atomic::AtomicBool::new(fail),
        hits: std::sync::atomic::AtomicUsize::new(0),
        delay,
        request_ids: std::sync::Mutex::new(Vec::new()),
    });
    async fn handle(State((f, target)): State<(Arc<Flaky>, String)>, req: Request) -> Response {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        if path.starts_with("/v1/") {
            f.hits.fetch_add(1, Ordering::SeqCst);
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok());
            if let (Some(id), Ok(mut ids)) = (id, f.request_ids.lock()) {
                ids.push(id.to_string());
            }
            if f.fail.load(Ordering::SeqCst) {
                return (
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(serde_json::json!({"error": {"message": "injected failure"}})),
                )
                    .into_response();
            }
        }
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, 16 << 20)
            .await
            .unwrap_or_default();
        let mut rb = client().request(parts.method, format!("{target}{path}"));
        for (k, v) in &parts.headers {
            if k != "host" && k != "content-length" {
                rb = rb.header(k, v);
            }
        }
        match rb.body(body).send().await {
            Ok(r) => {
                let status = r.status();
                let headers = r.headers().clone();
                let bytes = r.bytes().await.unwrap_or_default();
                if path.starts_with("/v1/") {
                    tokio::time::sleep(f.delay).await;
                }
                let mut resp = Response::new(axum::body::Body::from(bytes));
                *resp.status_mut() = status;
                if let Some(ct) = headers.get("content-type") {
                    resp.headers_mut().insert("content-type", ct.clone());
                }
                resp
            }
            Err(_) => axum::http::StatusCode::BAD_GATEWAY.into_response(),
        }
    }
    let app = axum::Router::new()
        .fallback(handle)
        .with_state((Arc::clone(&flaky), target));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    flaky
}

/// The URL of the first engine of `role` in a `pdgate up` fleet.
pub fn engine_url(fleet: &Fleet, role: Role) -> String {
    fleet
        .engines
        .iter()
        .find(|(r, _)| *r == role)
        .expect("engine")
        .1
        .url()
}

/// `/admin/workers` of a gateway, as JSON.
pub async fn admin_workers(url: &str) -> Vec<Value> {
    client()
        .get(format!("{url}/admin/workers"))
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json")
}

/// The breaker state `/admin/workers` shows for the worker at `worker_url`.
pub async fn breaker_of(gateway: &str, worker_url: &str) -> String {
    admin_workers(gateway)
        .await
        .iter()
        .find(|w| w["url"] == worker_url)
        .and_then(|w| w["breaker"].as_str())
        .unwrap_or("(missing)")
        .to_string()
}
