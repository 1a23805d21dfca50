//! What the serving path shares: config, the credentials and per-key limits, the fleet (workers
//! and scheduler), the prefix keyer (tokenizer and block hasher), the engine client, the segment
//! registry hosted for the transfer engines, the metrics handle and the in-flight bound. Rooms
//! off the serving path take only the handle they need (`Fleet`, the registry).

use crate::access::Access;
use crate::config::Config;
use crate::fleet::Fleet;
use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use pdgate_scheduler::{BlockHasher, Tokenizer};
use pdgate_transfer::MemoryRegistry;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

pub struct AppState {
    pub cfg: Config,
    /// Who may call which route, and each API key's budget.
    pub access: Access,
    pub fleet: Arc<Fleet>,
    pub tokenizer: Tokenizer,
    pub hasher: BlockHasher,
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
                if let Some(w) = cfg.workers.iter().find(|w| w.url.starts_with("https://")) {
                    anyhow::bail!("worker {}: {}", w.url, crate::tls::upstream::NO_CA);
                }
            }
        }
        let tokenizer = match &cfg.model.tokenizer {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("reading tokenizer {}", path.display()))?;
                Tokenizer::from_json_bytes(&bytes)
                    .with_context(|| format!("loading tokenizer {}", path.display()))?
            }
            None => Tokenizer::builtin(),
        };
        let state = Arc::new(Self {
            fleet: Arc::new(Fleet::new(cfg.scheduler.clone())),
            tokenizer,
            hasher: BlockHasher::new(
                cfg.scheduler.block_size,
                pdgate_scheduler::blocks::DEFAULT_SEED,
            ),
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
        for w in &state.cfg.workers {
            state.fleet.add(w);
        }
        Ok(state)
    }

    pub fn now(&self) -> Duration {
        self.fleet.now()
    }
}
