//! What every handler shares: config, the worker registry, the scheduler, the upstream HTTP
//! client, the segment registry hosted for the transfer engines, and the metrics handle.

use crate::config::Config;
use crate::workers::Workers;
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::Mutex;
use pdgate_scheduler::{BlockHasher, Scheduler};
use pdgate_transfer::MemoryRegistry;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

pub struct AppState {
    pub cfg: Config,
    pub workers: Workers,
    pub scheduler: Mutex<Scheduler>,
    pub hasher: BlockHasher,
    pub client: reqwest::Client,
    pub segments: MemoryRegistry,
    pub metrics: PrometheusHandle,
    /// Bounds requests in flight; acquisition never waits.
    pub in_flight: Arc<Semaphore>,
}

impl AppState {
    pub fn new(cfg: Config) -> anyhow::Result<Arc<Self>> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(cfg.upstream.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()?;
        let state = Arc::new(Self {
            workers: Workers::default(),
            scheduler: Mutex::new(Scheduler::new(cfg.model.policy, cfg.model.seed)),
            hasher: BlockHasher::new(cfg.model.block_size, pdgate_scheduler::blocks::DEFAULT_SEED),
            client,
            segments: MemoryRegistry::default(),
            metrics: crate::metrics::install(),
            in_flight: Arc::new(Semaphore::new(cfg.server.max_in_flight.max(1))),
            cfg,
        });
        for w in &state.cfg.workers {
            state.workers.add(&state.scheduler, w);
        }
        Ok(state)
    }
}
