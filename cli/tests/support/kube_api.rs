//! A Kubernetes API server for pods on loopback, with the LIST/WATCH semantics a watcher meets in
//! a cluster: a resourceVersion per change, `?watch=1` streams of JSON event lines (ADDED,
//! MODIFIED, DELETED, BOOKMARK) resumed from a version, `410 Gone` (an ERROR event, as the API
//! server sends it) for a version older than the retained history, label selectors evaluated on
//! the server (an object leaving a selector is a DELETED for that watch), and dropped connections.
//! The test drives it through `FakeKube`'s methods, including changes no watch ever hears of.

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};

/// One change to the store, as every watch sees it before its selector.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: &'static str,
    old: Option<Value>,
    new: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// (namespace, name) → pod.
    pods: BTreeMap<(String, String), Value>,
    history: Vec<Change>,
    /// Watches from a version below this get 410 Gone.
    oldest: u64,
}

struct Inner {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    /// Bumped to cut every open watch.
    cut: watch::Sender<u64>,
    watch_down: AtomicBool,
    lists: AtomicUsize,
    watches: AtomicUsize,
}

#[derive(Clone)]
pub struct FakeKube {
    pub url: String,
    inner: Arc<Inner>,
}

pub const NAMESPACE: &str = "pd";

/// A pod of `role` in `NAMESPACE`, labelled as the chart labels engine pods, its engine's HTTP
/// port in the annotation.
pub fn pod(name: &str, uid: &str, role: &str, ip: Option<&str>, ready: bool, port: u16) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": uid,
            "labels": {"pdgate.io/role": role, "app.kubernetes.io/instance": "t"},
            "annotations": {"pdgate.io/http-port": port.to_string()},
        },
        "status": {
            "phase": "Running",
            "podIP": ip.unwrap_or(""),
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        },
    })
}

fn ns_name(pod: &Value) -> (String, String) {
    let m = &pod["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

impl FakeKube {
    pub async fn start() -> Self {
        let (changes, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            store: Mutex::new(Store {
                rv: 100,
                oldest: 0,
                ..Store::default()
            }),
            changes,
            cut: watch::channel(0).0,
            watch_down: AtomicBool::new(false),
            lists: AtomicUsize::new(0),
            watches: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/api/v1/namespaces/{ns}/pods", get(pods))
            .with_state(Arc::clone(&inner));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, inner }
    }

    /// Creates or replaces a pod: ADDED or MODIFIED.
    pub fn apply(&self, pod: Value) {
        self.change(pod, false, true);
    }

    /// Replaces a pod with no event ever sent: a change every watch missed.
    pub fn apply_unseen(&self, pod: Value) {
        self.change(pod, false, false);
    }

    /// Deletes a pod: DELETED carrying its last stored state (a force delete: no terminating
    /// state first).
    pub fn delete(&self, name: &str) {
        let (_, pod) = self.stored(name);
        self.change(pod, true, true);
    }

    /// Deletes a pod with no event ever sent.
    pub fn delete_unseen(&self, name: &str) {
        let (_, pod) = self.stored(name);
        self.change(pod, true, false);
    }

    /// Graceful deletion's first step: MODIFIED with a deletion timestamp.
    pub fn terminate(&self, name: &str) {
        let (_, mut pod) = self.stored(name);
        pod["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        self.change(pod, false, true);
    }

    /// Cuts every open watch connection.
    pub fn drop_watches(&self) {
        self.inner.cut.send_modify(|g| *g += 1);
    }

    /// While down, watch requests are refused (503) and open ones are cut.
    pub fn set_watch_down(&self, down: bool) {
        self.inner.watch_down.store(down, Ordering::SeqCst);
        if down {
            self.drop_watches();
        }
    }

    /// Forgets the history: a watch resuming from any earlier version gets 410 Gone.
    pub fn compact(&self) {
        let mut s = self.inner.store.lock();
        s.oldest = s.rv;
        s.history.clear();
    }

    pub fn lists(&self) -> usize {
        self.inner.lists.load(Ordering::SeqCst)
    }

    pub fn watches(&self) -> usize {
        self.inner.watches.load(Ordering::SeqCst)
    }

    fn stored(&self, name: &str) -> (String, Value) {
        let s = self.inner.store.lock();
        let (k, v) = s
            .pods
            .iter()
            .find(|((_, n), _)| n == name)
            .expect("no such pod");
        (k.0.clone(), v.clone())
    }

    fn change(&self, mut pod: Value, delete: bool, announce: bool) {
        let mut s = self.inner.store.lock();
        s.rv += 1;
        let rv = s.rv;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = ns_name(&pod);
        let old = if delete {
            s.pods.remove(&key)
        } else {
            s.pods.insert(key, pod.clone())
        };
        if !announce {
            return;
        }
        let kind = match (delete, &old) {
            (true, _) => "DELETED",
            (false, Some(_)) => "MODIFIED",
            (false, None) => "ADDED",
        };
        let c = Change {
            rv,
            kind,
            old,
            new: pod,
        };
        s.history.push(c.clone());
        // Sent under the lock, so a watch that subscribed under it sees every later change.
        let _ = self.inner.changes.send(c);
    }
}

/// `labelSelector`: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated (all must hold).
fn selects(selector: &str, pod: &Value) -> bool {
    let labels = &pod["metadata"]["labels"];
    let label = |k: &str| labels.get(k.trim()).and_then(Value::as_str);
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|t| {
            if let Some((k, v)) = t.split_once("!=") {
                label(k) != Some(v.trim())
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                label(k) == Some(v.trim())
            } else if let Some(k) = t.strip_prefix('!') {
                label(k).is_none()
            } else {
                label(t).is_some()
            }
        })
}

/// What one watch (namespace, selector) sees of a change: an object entering its selection is
/// ADDED, one leaving it DELETED.
fn seen_as(c: &Change, ns: &str, selector: &str) -> Option<Value> {
    let inside = |p: &Value| ns_name(p).0 == ns && selects(selector, p);
    let was = c.old.as_ref().is_some_and(inside);
    let is = inside(&c.new);
    let kind = match (c.kind, was, is) {
        ("DELETED", true, _) => "DELETED",
        ("DELETED", false, _) => return None,
        (_, true, true) => "MODIFIED",
        (_, false, true) => "ADDED",
        (_, true, false) => "DELETED",
        (_, false, false) => return None,
    };
    Some(json!({"type": kind, "object": c.new}))
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).expect("json");
    b.push(b'\n');
    Bytes::from(b)
}

async fn pods(
    State(k): State<Arc<Inner>>,
    Path(ns): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let selector = q.get("labelSelector").cloned().unwrap_or_default();
    let watching = matches!(q.get("watch").map(String::as_str), Some("1" | "true"));
    if !watching {
        k.lists.fetch_add(1, Ordering::SeqCst);
        let s = k.store.lock();
        let items: Vec<&Value> = s
            .pods
            .iter()
            .filter(|((n, _), p)| *n == ns && selects(&selector, p))
            .map(|(_, p)| p)
            .collect();
        return Json(json!({
            "apiVersion": "v1",
            "kind": "PodList",
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items,
        }))
        .into_response();
    }
    if k.watch_down.load(Ordering::SeqCst) {
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "watch unavailable", "reason": "ServiceUnavailable", "code": 503});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(status)).into_response();
    }
    k.watches.fetch_add(1, Ordering::SeqCst);
    let from: Option<u64> = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(300u64);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    // Replay and subscription under one lock: nothing falls between them.
    let (replay, mut live, mut last) = {
        let s = k.store.lock();
        let live = k.changes.subscribe();
        match from {
            Some(rv) if rv < s.oldest => {
                let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                    "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
                    "message": format!("too old resource version: {rv} ({})", s.oldest)}});
                let body = Body::from(line(&gone));
                return (StatusCode::OK, body).into_response();
            }
            Some(rv) => {
                let replay: Vec<Value> = s
                    .history
                    .iter()
                    .filter(|c| c.rv > rv)
                    .filter_map(|c| seen_as(c, &ns, &selector))
                    .collect();
                (replay, live, s.rv)
            }
            // No version: the current state as ADDED events first.
            None => {
                let replay: Vec<Value> = s
                    .pods
                    .iter()
                    .filter(|((n, _), p)| *n == ns && selects(&selector, p))
                    .map(|(_, p)| json!({"type": "ADDED", "object": p}))
                    .collect();
                (replay, live, s.rv)
            }
        }
    };
    let mut cut = k.cut.subscribe();
    tokio::spawn(async move {
        for ev in replay {
            if tx.send(line(&ev)).await.is_err() {
                return;
            }
        }
        let end = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(end);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            // A cut connection delivers nothing more, even changes already queued for it.
            tokio::select! {
                biased;
                _ = cut.changed() => return,
                _ = &mut end => return,
                c = live.recv() => {
                    // Lagging behind closes the watch, as the API server does; the client resumes.
                    let Ok(c) = c else { return };
                    last = c.rv;
                    if let Some(ev) = seen_as(&c, &ns, &selector) {
                        if tx.send(line(&ev)).await.is_err() {
                            return;
                        }
                    }
                }
                _ = tick.tick(), if bookmarks => {
                    // Only a version every change up to which this watch has handled.
                    let bm = json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                        "metadata": {"resourceVersion": last.to_string()}}});
                    if tx.send(line(&bm)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("response")
}
