//! What every handler shares: config, the worker registry, the scheduler, the tokenizer, the
//! upstream HTTP client, the segment registry hosted for the transfer engines, and the metrics
//! handle.

use crate::config::Config;
use crate::workers::Workers;
use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::Mutex;
use pdgate_scheduler::{BlockHasher, Scheduler, Tokenizer};
use pdgate_transfer::MemoryRegistry;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

pub struct AppState {
    pub cfg: Config,
    pub workers: Workers,
    pub scheduler: Mutex<Scheduler>,
    pub tokenizer: Tokenizer,
    pub hasher: BlockHasher,
    pub client: crate::upstream::Client,
    pub segments: MemoryRegistry,
    pub metrics: PrometheusHandle,
    /// Bounds requests in flight; acquisition never waits.
    pub in_flight: Arc<Semaphore>,
    /// The scheduler's time origin: it is fed `epoch.elapsed()`, never reads a clock itself.
    pub epoch: Instant,
}

impl AppState {
    pub fn new(cfg: Config) -> anyhow::Result<Arc<Self>> {
        // A leg holds one connection and in-flight requests are capped, so the pool is too.
        let client = crate::upstream::Client::new(
            Duration::from_millis(cfg.upstream.connect_timeout_ms),
            Duration::from_secs(30),
            cfg.server.max_in_flight.max(1),
        );
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
            workers: Workers::default(),
            scheduler: Mutex::new(Scheduler::new(cfg.scheduler.clone())),
            tokenizer,
            hasher: BlockHasher::new(
                cfg.scheduler.block_size,
                pdgate_scheduler::blocks::DEFAULT_SEED,
            ),
            client,
            segments: MemoryRegistry::default()
                .with_ttl(Duration::from_secs(cfg.server.segment_ttl_secs.max(1))),
            metrics: crate::metrics::install(),
            in_flight: Arc::new(Semaphore::new(cfg.server.max_in_flight.max(1))),
            epoch: Instant::now(),
            cfg,
        });
        for w in &state.cfg.workers {
            state.workers.add(&state.scheduler, w);
        }
        Ok(state)
    }

    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }
}
