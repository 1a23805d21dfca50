//! Starting and stopping a gateway: bind, build state, start health checks, serve with graceful
//! drain. Used by `pdgate serve`, `pdgate up` and the tests alike.

use crate::config::{Config, WorkerConfig};
use crate::state::AppState;
use crate::{health, listener, server};
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
    health: JoinHandle<()>,
    scraper: Option<JoinHandle<()>>,
}

impl Gateway {
    pub async fn start(cfg: Config) -> anyhow::Result<Self> {
        let listener =
            tokio::net::TcpListener::bind((cfg.server.host.as_str(), cfg.server.port)).await?;
        let addr = listener.local_addr()?;
        let state = AppState::new(cfg)?;
        let health = health::spawn(
            Arc::clone(&state.fleet),
            state.client.clone(),
            state.cfg.health.clone(),
        );
        let scraper = crate::engine_metrics::spawn(
            Arc::clone(&state.fleet),
            state.client.clone(),
            &state.cfg.health,
            state.cfg.scheduler.block_size,
        );
        let app = server::router(Arc::clone(&state));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(listener::serve(listener, Arc::clone(&state), app, async {
            let _ = rx.await;
        }));
        Ok(Self {
            addr,
            state,
            shutdown: Some(tx),
            task,
            health,
            scraper,
        })
    }

    /// Adds an engine to the fleet; it takes traffic once a health check passed.
    pub fn add_worker(&self, cfg: &WorkerConfig) {
        self.state.fleet.add(cfg);
    }

    /// Checks every worker's health once, now.
    pub async fn check_health(&self) {
        let s = &self.state;
        health::check_all(&s.fleet, &s.client, &s.cfg.health).await;
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets in-flight requests finish for up to `drain_secs`, then returns.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let drain = Duration::from_secs(self.state.cfg.server.drain_secs);
        if tokio::time::timeout(drain, &mut self.task).await.is_err() {
            tracing::warn!("drain deadline passed; closing remaining connections");
            self.task.abort();
        }
        self.health.abort();
        if let Some(s) = &self.scraper {
            s.abort();
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
