//! The engine's HTTP surface and lifecycle: building the shared state (`engine`), the router,
//! background tasks (transfer notifications: KV landed or pulled, bootstrap offers; reservation
//! sweeping), registration with the segment registry, and graceful shutdown.
//!
//! The top of the crate: it wires every handler and no handler imports it.

use crate::batcher::Gpu;
use crate::cache::PrefixCache;
use crate::config::EngineConfig;
use crate::engine::now_secs;
use crate::openai::ApiError;
use crate::pool::KvPool;
use crate::registry::HttpRegistry;
use crate::stats::Stats;
use crate::{generate, pd, protocol};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use pdgate_scheduler::{BlockHasher, Role};
use pdgate_transfer::{EngineOptions, MetadataStore, TransferEngine};
use pdgate_wire::fleet::FleetSecret;
use pdgate_wire::native;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Where the crate root (and so other crates) has always found it.
pub use crate::engine::Engine;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.body())).into_response()
    }
}

/// A running engine. Dropping it without `stop` leaves the tasks running until the runtime ends.
pub struct EngineHandle {
    pub addr: SocketAddr,
    pub engine: Arc<Engine>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl EngineHandle {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving, deregisters the KV segment and waits for the server to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        if let Some(p) = &self.engine.events {
            p.stop();
        }
    }

    /// Where this engine publishes KV events and answers replays, when it does.
    pub fn kv_events_endpoints(&self) -> Option<(String, Option<String>)> {
        self.engine
            .events
            .as_ref()
            .map(|p| (p.endpoint.clone(), p.replay_endpoint.clone()))
    }
}

/// Starts an engine on `cfg.host:cfg.port` and returns once it accepts connections.
pub async fn spawn(cfg: EngineConfig) -> anyhow::Result<EngineHandle> {
    let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port)).await?;
    let addr = listener.local_addr()?;
    let engine = build(cfg, addr).await?;
    let (tx, rx) = oneshot::channel();
    let app = router(Arc::clone(&engine));
    let eng = Arc::clone(&engine);
    let task = tokio::spawn(async move {
        let served = axum::serve(nodelay(listener), app).with_graceful_shutdown(async {
            let _ = rx.await;
        });
        if let Err(e) = served.await {
            tracing::error!(error = %e, "engine server failed");
        }
        deregister(&eng).await;
        eng.transfer.shutdown();
    });
    Ok(EngineHandle {
        addr,
        engine,
        shutdown: Some(tx),
        task,
    })
}

async fn build(cfg: EngineConfig, addr: SocketAddr) -> anyhow::Result<Arc<Engine>> {
    let stats = Arc::new(Stats::default());
    // The transfer listener binds the interface the HTTP listener bound (`host`, resolved once
    // there, so a name such as `localhost` works too), never all interfaces.
    let listen = SocketAddr::new(addr.ip(), cfg.transfer_port);
    // With the fleet secret (file, else PDGATE_FLEET_SECRET), only peers that prove it may touch
    // this engine's segments; without it the transfer engine warns that its plane is open.
    let secret = FleetSecret::load(cfg.fleet_secret_file.as_deref())?
        .map(|s| pdgate_transfer::Secret::new(s.as_bytes()))
        .transpose()?;
    let tls = cfg
        .transfer_tls
        .as_ref()
        .map(pdgate_transfer::TlsIdentity::load)
        .transpose()?;
    let transfer = TransferEngine::start(EngineOptions {
        listen,
        transport: cfg.transport,
        secret,
        tls,
        ..EngineOptions::default()
    })
    .await?;
    // The registry takes only the fleet's calls: a secret that cannot be read is a startup error.
    let secret = pdgate_wire::fleet::FleetSecret::load(cfg.fleet_secret_file.as_deref())?;
    let registry: Option<Arc<dyn MetadataStore>> = cfg
        .registry_url
        .as_deref()
        .map(|u| Arc::new(HttpRegistry::new(u, secret.as_ref())) as Arc<dyn MetadataStore>);
    // Decode engines receive KV; prefill engines of pull-mode protocols hold it until pulled.
    let holds_kv = cfg.role == Role::Decode || protocol::prefill_holds_kv(cfg.protocol);
    let pool = match holds_kv {
        true => {
            let name = format!("kv-{}-{}", cfg.model, addr.port());
            let bytes = usize::try_from(cfg.block_bytes().saturating_mul(cfg.kv_blocks as u64))?;
            let segment = transfer.register_segment(&name, bytes)?;
            if let Some(reg) = &registry {
                reg.publish(transfer.describe(&segment)).await?;
            }
            let ttl = Duration::from_secs(cfg.reservation_ttl_secs);
            let pool = KvPool::new(
                segment,
                transfer.endpoint(),
                cfg.block_bytes(),
                ttl,
                Arc::clone(&stats),
            );
            if cfg.role == Role::Prefill {
                pool.scrub_freed_blocks();
            }
            Some(pool)
        }
        false => None,
    };
    let bootstrap = match cfg.role == Role::Prefill && protocol::prefill_takes_offers(cfg.protocol)
    {
        true => {
            let name = protocol::mailbox::mailbox_name(&cfg.model, addr.port());
            let mailbox = transfer.register_segment(&name, protocol::mailbox::MAILBOX_BYTES)?;
            if let Some(reg) = &registry {
                reg.publish(transfer.describe(&mailbox)).await?;
            }
            protocol::mailbox::Bootstrap::with_mailbox(mailbox)
        }
        false => protocol::mailbox::Bootstrap::default(),
    };
    let exports = match cfg.export_blocks {
        0 => None,
        blocks => {
            // Peers find it through the endpoint in the lease (P2P), as pull-mode decodes do.
            let name = format!("kvx-{}-{}", cfg.model, addr.port());
            let bytes = usize::try_from(cfg.block_bytes().saturating_mul(blocks as u64))?;
            let segment = transfer.register_segment(&name, bytes)?;
            Some(Arc::new(crate::export::Exports::new(
                segment,
                transfer.endpoint(),
                cfg.block_bytes(),
                Duration::from_millis(cfg.export_lease_ms),
            )))
        }
    };
    let events = match cfg.kv_events.enabled() {
        true => Some(crate::kv_events::Publisher::start(&cfg.kv_events).await?),
        false => None,
    };
    let engine = Arc::new(Engine {
        events,
        exports,
        gpu: Gpu::start(&cfg, Arc::clone(&stats)),
        cache: Mutex::new(PrefixCache::with_host(cfg.kv_blocks, cfg.host_cache_blocks)),
        hasher: BlockHasher::new(cfg.block_size, pdgate_scheduler::blocks::DEFAULT_SEED),
        stats,
        transfer,
        pool,
        registry,
        peers: Mutex::new(std::collections::HashMap::new()),
        heartbeat: Mutex::new(None),
        started: now_secs(),
        http_addr: addr,
        client: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default(),
        aborts: Arc::new(protocol::abort::Aborts::default()),
        rendezvous: protocol::rendezvous::Rendezvous::default(),
        bootstrap,
        cfg,
    });
    spawn_notification_listener(&engine);
    if let Some(pool) = &engine.pool {
        spawn_sweeper(Arc::clone(pool));
    }
    if let Some(exports) = &engine.exports {
        spawn_lease_sweeper(Arc::clone(exports), Arc::clone(&engine.stats));
    }
    spawn_heartbeat(&engine);
    Ok(engine)
}

/// Every notification this engine's transfer engine delivers (the receiver can be taken only
/// once): offers on the bootstrap mailbox; KV landed in, or pulled from, the KV segment.
fn spawn_notification_listener(engine: &Arc<Engine>) {
    if engine.pool.is_none() && engine.bootstrap.mailbox().is_none() && engine.exports.is_none() {
        return;
    }
    let Some(mut rx) = engine.transfer.take_notifications() else {
        return;
    };
    // Weak: the receiver's sender lives in the engine, so a strong reference would keep both.
    let weak = Arc::downgrade(engine);
    tokio::spawn(async move {
        while let Some(n) = rx.recv().await {
            let Some(e) = weak.upgrade() else { return };
            if e.bootstrap.is_mailbox(&n.segment) {
                protocol::bootstrap::receive(&e, &n.payload);
            } else if let Some(x) = e.exports.as_ref().filter(|x| x.segment_name() == n.segment) {
                // A puller read what we lent: end the lease now rather than at its deadline.
                match serde_json::from_slice::<native::KvReturned>(&n.payload) {
                    Ok(r) => {
                        x.end(&r.returned);
                    }
                    Err(_) => {
                        tracing::warn!("ignoring a malformed notification on the export segment")
                    }
                }
            } else if let Some(pool) = &e.pool {
                on_kv_notification(&e.stats, pool, &n.payload);
            } else {
                tracing::warn!(segment = %n.segment, "ignoring a notification for no segment of ours");
            }
        }
    });
}

fn on_kv_notification(stats: &Stats, pool: &KvPool, payload: &[u8]) {
    if let Ok(landed) = serde_json::from_slice::<native::KvLanded>(payload) {
        Stats::add(&stats.kv_blocks_received, u64::from(landed.blocks));
        pool.mark_landed(&landed.request_id, landed.blocks);
    } else if let Ok(pulled) = serde_json::from_slice::<protocol::pull::KvPulled>(payload) {
        // A decode read our held blocks: free them now rather than at the TTL.
        pool.release(&pulled.pulled);
    } else {
        tracing::warn!("ignoring malformed KV notification");
    }
}

fn spawn_sweeper(pool: Arc<KvPool>) {
    let weak = Arc::downgrade(&pool);
    drop(pool);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(pool) = weak.upgrade() else { return };
            let n = pool.sweep(Instant::now());
            if n > 0 {
                tracing::warn!(
                    expired = n,
                    "reclaimed KV reservations whose decode leg never came"
                );
            }
        }
    });
}

fn spawn_lease_sweeper(exports: Arc<crate::export::Exports>, stats: Arc<Stats>) {
    let every = exports.sweep_every();
    let weak = Arc::downgrade(&exports);
    drop(exports);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Some(exports) = weak.upgrade() else {
                return;
            };
            let n = exports.sweep(Instant::now());
            if n > 0 {
                Stats::add(&stats.kv_export_leases_expired, n as u64);
                tracing::warn!(expired = n, "ended KV export leases no puller returned");
            }
        }
    });
}

/// This engine's registered segments (KV pool, bootstrap mailbox), as peers find them.
fn own_segments(engine: &Engine) -> Vec<pdgate_transfer::SegmentDesc> {
    let pool = engine.pool.as_ref().map(|p| p.segment());
    pool.into_iter()
        .chain(engine.bootstrap.mailbox())
        .map(|s| engine.transfer.describe(s))
        .collect()
}

/// Re-publishes the segments every `registry_heartbeat_secs`, so a registry with a TTL keeps
/// them.
fn spawn_heartbeat(engine: &Arc<Engine>) {
    let Some(reg) = engine.registry.clone() else {
        return;
    };
    let descs = own_segments(engine);
    if descs.is_empty() {
        return;
    }
    let every = Duration::from_secs(engine.cfg.registry_heartbeat_secs.max(1));
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await; // the first tick is immediate; the segments were just published
        loop {
            tick.tick().await;
            for desc in &descs {
                if let Err(e) = reg.publish(desc.clone()).await {
                    tracing::warn!(segment = %desc.name, error = %e, "could not refresh a segment in the registry");
                }
            }
        }
    });
    *engine.heartbeat.lock() = Some(task);
}

async fn deregister(engine: &Engine) {
    if let Some(task) = engine.heartbeat.lock().take() {
        task.abort();
    }
    let Some(reg) = &engine.registry else {
        return;
    };
    for desc in own_segments(engine) {
        if let Err(e) = reg.remove(&desc.name).await {
            tracing::warn!(segment = %desc.name, error = %e, "could not deregister a segment");
        }
    }
}

pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat))
        .route(native::RESERVE_PATH, post(pd::reserve))
        .route(native::RELEASE_PATH, post(pd::release))
        .route(native::PREFILL_PATH, post(pd::prefill))
        .route(native::EXPORT_PATH, post(pd::export))
        .route("/abort_request", post(protocol::abort_request))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route(
            protocol::bootstrap::BOOTSTRAP_PATH,
            get(protocol::bootstrap::query),
        )
        .route(
            protocol::vllm_mooncake::QUERY_PATH,
            get(protocol::vllm_mooncake::query),
        )
        .with_state(engine)
}

async fn reset_prefix_cache(State(e): State<Arc<Engine>>) -> &'static str {
    e.reset_prefix_cache();
    "ok"
}

async fn models(State(e): State<Arc<Engine>>) -> Json<serde_json::Value> {
    Json(
        json!({"object": "list", "data": [{"id": e.cfg.model, "object": "model", "created": e.started, "owned_by": "pdgate"}]}),
    )
}

/// The engine's own figures, then its transfer listeners' admissions (`pdgate_transfer_*`, this
/// engine's alone: the `metrics` facade's recorder, if the process has one, sums every engine
/// in the process).
async fn metrics(State(e): State<Arc<Engine>>) -> impl IntoResponse {
    let mut body = e.stats.render(
        &e.cfg.model,
        e.cfg.block_size,
        e.cfg.kv_blocks,
        e.cfg.host_cache_blocks,
    );
    body.push_str(&e.transfer.admission_stats().render_prometheus());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Small SSE chunks and JSON answers must not wait on Nagle's algorithm (it adds tens of ms per
/// leg against a delayed ACK).
pub fn nodelay(listener: tokio::net::TcpListener) -> impl axum::serve::Listener<Addr = SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    })
}
