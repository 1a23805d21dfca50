//! What the serving path shares: config, the credentials and per-key limits, the served models
//! (each its fleet of workers and scheduler, and its prefix keyer), the engine client, the segment
//! registry hosted for the transfer engines, the metrics handle and the in-flight bound. Rooms
//! off the serving path take only the handle they need (`Fleet`, the registry).

use crate::access::Access;
use crate::config::Config;
use crate::models::Models;
use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use pdgate_transfer::MemoryRegistry;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

pub struct AppState {
    pub cfg: Config,
    /// Who may call which route, and each API key's budget.
    pub access: Access,
    /// Every served model; a request reaches one by the name in its body.
    pub models: Arc<Models>,
    pub client: crate::http1::Client,
    pub segments: Arc<MemoryRegistry>,
    pub metrics: PrometheusHandle,
    /// Bounds requests in flight; acquisition never waits.
    pub in_flight: Arc<Semaphore>,
    /// Bounds retries under way against requests in flight.
    pub retries: Arc<crate::retry::RetryBudget>,
    /// Set on SIGTERM: `/ready` says no and new requests get 503 while those in flight finish.
    pub draining: std::sync::atomic::AtomicBool,
}

impl AppState {
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Requests holding an in-flight slot now (a stream holds one to its last byte).
    pub fn requests_in_flight(&self) -> usize {
        self.cfg
            .server
            .max_in_flight
            .max(1)
            .saturating_sub(self.in_flight.available_permits())
    }

    pub fn new(cfg: Config, access: Access) -> anyhow::Result<Arc<Self>> {
        // A leg holds one connection and in-flight requests are capped, so the pool is too.
        let mut client = crate::http1::Client::new(
            Duration::from_millis(cfg.upstream.connect_timeout_ms),
            Duration::from_secs(30),
            cfg.server.max_in_flight.max(1),
        );
        match crate::tls::upstream::connector(&cfg.upstream.tls)
            .context("loading [upstream.tls]")?
        {
            Some(tls) => client = client.with_tls(tls),
            // Fail closed at start for the engines known now; engines added later are refused
            // per request with the same words.
            None => {
                let served = cfg.served_models();
                let mut workers = served.iter().flat_map(|m| &m.workers);
                if let Some(w) = workers.find(|w| w.url.starts_with("https://")) {
                    anyhow::bail!("worker {}: {}", w.url, crate::tls::upstream::NO_CA);
                }
            }
        }
        let state = Arc::new(Self {
            models: Arc::new(Models::build(&cfg)?),
            client,
            segments: Arc::new(
                MemoryRegistry::with_capacity(cfg.server.segment_capacity.max(1))
                    .with_ttl(Duration::from_secs(cfg.server.segment_ttl_secs.max(1))),
            ),
            metrics: crate::metrics::install(),
            in_flight: Arc::new(Semaphore::new(cfg.server.max_in_flight.max(1))),
            draining: std::sync::atomic::AtomicBool::new(false),
            retries: crate::retry::RetryBudget::new(
                cfg.upstream.retry_budget_percent,
                cfg.upstream.retry_budget_min,
            ),
            access,
            cfg,
        });
        Ok(state)
    }
}
