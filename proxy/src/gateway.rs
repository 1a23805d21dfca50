//! Starting and stopping a gateway: load the fleet secret, bind, check the credentials against
//! the bound address, build state, start health checks and the registry's purge, serve with
//! graceful drain. Used by `pdgate serve`, `pdgate up` and the tests alike.

use crate::access::Access;
use crate::config::{Config, WorkerConfig};
use crate::state::AppState;
use crate::tls::listener::ListenerTls;
use crate::{discovery, health, listener, replica_sync, segments, server};
use anyhow::Context;
use pdgate_wire::fleet::FleetSecret;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Gateway {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    /// One per model, as are the scrapers and discovery sources.
    health: Vec<JoinHandle<()>>,
    scraper: Vec<JoinHandle<()>>,
    purge: JoinHandle<()>,
    /// Subscriptions to the engines' KV events (workers with `kv_events`), one task per model.
    kv_events: Vec<JoinHandle<()>>,
    discovery: Vec<discovery::Discovery>,
    /// Reloads the listener's certificate (`[server.tls]` only).
    tls_reloader: Option<JoinHandle<()>>,
    /// Booking sync with the other replicas (`[replicas]`), one per model.
    replicas: Vec<replica_sync::ReplicaSyncTasks>,
}

impl Gateway {
    /// Starts a gateway with the fleet secret of `server.fleet_secret_file`, else of
    /// `PDGATE_FLEET_SECRET`, else none; a secret that cannot be read is an error.
    pub async fn start(cfg: Config) -> anyhow::Result<Self> {
        let secret = FleetSecret::load(cfg.server.fleet_secret_file.as_deref())
            .context("loading the fleet secret")?;
        Self::start_with_secret(cfg, secret).await
    }

    /// Starts a gateway holding `secret` (e.g. one `pdgate up` generated for its own fleet).
    /// Refuses to start when its credentials do not fit the address it binds (`Access::new`).
    pub async fn start_with_secret(
        cfg: Config,
        secret: Option<FleetSecret>,
    ) -> anyhow::Result<Self> {
        let listener =
            tokio::net::TcpListener::bind((cfg.server.host.as_str(), cfg.server.port)).await?;
        let addr = listener.local_addr()?;
        // Checked against the address really bound: `localhost` or a name may be either.
        let access = Access::new(&cfg.server, secret.as_ref(), addr.ip())?;
        let tls = match &cfg.server.tls {
            Some(files) => Some(Arc::new(
                ListenerTls::new(files).context("loading [server.tls]")?,
            )),
            None => None,
        };
        let state = AppState::new(cfg, access)?;
        let purge = segments::spawn_purge(
            &state.segments,
            Duration::from_secs(state.cfg.server.segment_ttl_secs.max(1)),
        );
        let (mut health, mut scraper, mut discovery) = (Vec::new(), Vec::new(), Vec::new());
        let (mut kv_events, mut replicas) = (Vec::new(), Vec::new());
        let several = state.models.all().len() > 1;
        for m in state.models.all() {
            health.push(health::spawn(
                Arc::clone(&m.fleet),
                state.client.clone(),
                state.cfg.health.clone(),
            ));
            scraper.extend(crate::engine_metrics::spawn(
                Arc::clone(&m.fleet),
                state.client.clone(),
                &state.cfg.health,
                m.scheduler.block_size,
            ));
            kv_events.push(crate::kv_events::spawn(
                Arc::clone(&m.fleet),
                state.cfg.kv_events.clone(),
                m.hasher,
            ));
            let found = discovery::start(&m.discovery, &m.fleet)
                .await
                .with_context(|| format!("model `{}`", m.name))?;
            discovery.extend(found);
            let sync = replica_sync::start(
                &replica_sync::for_model(&state.cfg.replicas, m, several),
                &m.fleet,
            )
            .await
            .with_context(|| format!("model `{}`", m.name))?;
            replicas.extend(sync);
        }
        let app = server::router(Arc::clone(&state));
        let (tx, rx) = oneshot::channel::<()>();
        let tls_reloader = tls.as_ref().map(ListenerTls::spawn_reloader);
        let serving = listener::serve(listener, Arc::clone(&state), app, tls, async {
            let _ = rx.await;
        });
        let task = tokio::spawn(serving);
        Ok(Self {
            addr,
            state,
            shutdown: Some(tx),
            task,
            health,
            scraper,
            purge,
            kv_events,
            discovery,
            tls_reloader,
            replicas,
        })
    }

    /// Adds an engine to the first model's fleet (the only one unless `[[models]]` lists
    /// several); it takes traffic once a health check passed.
    pub fn add_worker(&self, cfg: &WorkerConfig) {
        if let Some(m) = self.state.models.all().first() {
            m.fleet.add(cfg);
        }
    }

    /// Adds an engine to the fleet of the model configured as `model`; it takes traffic once a
    /// health check passed. Removal is that model's `fleet.remove_draining`.
    pub fn add_worker_to(&self, model: &str, cfg: &WorkerConfig) -> anyhow::Result<()> {
        let m = self
            .state
            .models
            .named(model)
            .with_context(|| format!("no model `{model}` is configured"))?;
        m.fleet.add(cfg);
        Ok(())
    }

    /// Checks every worker's health once, now.
    pub async fn check_health(&self) {
        let s = &self.state;
        for m in s.models.all() {
            health::check_all(&m.fleet, &s.client, &s.cfg.health).await;
        }
    }

    /// The gateway's base URL, `https://` when the listener speaks TLS.
    pub fn url(&self) -> String {
        let scheme = match self.state.cfg.server.tls {
            Some(_) => "https",
            None => "http",
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Drains, then stops: `/ready` turns false and new requests get 503 with `Retry-After` at
    /// once (the listener keeps answering, so probes and clients learn it rather than meeting a
    /// closed port), requests in flight get up to `drain_secs` to finish, then the listener
    /// closes its connections.
    pub async fn stop(mut self) {
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(self.state.cfg.server.drain_secs);
        self.state
            .draining
            .store(true, std::sync::atomic::Ordering::Release);
        let waiting = self.state.requests_in_flight();
        tracing::info!(in_flight = waiting, "draining");
        while self.state.requests_in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Connections between requests close at once; one still answering gets what is left.
        let rest = deadline.saturating_duration_since(tokio::time::Instant::now());
        if tokio::time::timeout(rest.max(Duration::from_millis(100)), &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = self.state.requests_in_flight(),
                "drain deadline passed; closing remaining connections"
            );
            self.task.abort();
        }
        for h in &self.health {
            h.abort();
        }
        self.purge.abort();
        for k in &self.kv_events {
            k.abort();
        }
        for d in self.discovery.drain(..) {
            d.stop();
        }
        if let Some(r) = &self.tls_reloader {
            r.abort();
        }
        for s in &self.scraper {
            s.abort();
        }
        for r in self.replicas.drain(..) {
            r.stop();
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
