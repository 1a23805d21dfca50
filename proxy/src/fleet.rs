//! The engines the gateway fronts, as one handle: their addresses, health and breakers
//! (`Workers`) and their load (`Scheduler`), which change together, and the clock the scheduler
//! is fed. Health checks, metric scrapes, bookings and the admin view need this and nothing else.
//! Membership changes — static config, the admin API, discovery — all go through `add` and
//! `remove_draining` here.

use crate::config::WorkerConfig;
use crate::replica_sync::outbox::Outbox;
use crate::workers::{Worker, WorkerView, Workers};
use parking_lot::Mutex;
use pdgate_scheduler::{InstanceId, Scheduler, SchedulerConfig};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub struct Fleet {
    /// The model these engines serve (a bounded metrics label: models are configured).
    pub model: String,
    pub workers: Workers,
    pub scheduler: Mutex<Scheduler>,
    /// Where bookings go to the other gateway replicas; unset when booking sync is off.
    pub replicas: OnceLock<Outbox>,
    /// The scheduler's time origin: it is fed `epoch.elapsed()`, never reads a clock itself.
    epoch: Instant,
}

impl Fleet {
    /// The fleet of the default model, its worker ids from 0.
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self::for_model(pdgate_wire::openai::DEFAULT_MODEL, cfg, 0)
    }

    /// The fleet of one served model; its worker ids start at `first_id`, so that the fleets of
    /// several models never share an id (the admin API names workers by id alone).
    pub fn for_model(model: &str, cfg: SchedulerConfig, first_id: u32) -> Self {
        Self {
            model: model.to_string(),
            workers: Workers::default(),
            scheduler: Mutex::new(Scheduler::new(cfg).with_first_id(first_id)),
            replicas: OnceLock::new(),
            epoch: Instant::now(),
        }
    }

    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Registers a worker with both halves, unhealthy until its first health check passes.
    pub fn add(&self, cfg: &WorkerConfig) -> Arc<Worker> {
        let w = self.workers.add(&self.scheduler, cfg);
        tracing::info!(model = %self.model, worker = %w.url, id = w.id.0, role = %w.role, protocol = %w.protocol, "worker added");
        crate::metrics::membership(&self.model, w.role, "added");
        w
    }

    /// Takes a worker out: nothing new is scheduled on it, requests in flight on it finish, its
    /// scheduler state (load, prefix-index entries) is freed now. `None`: no such worker.
    pub fn remove_draining(&self, id: InstanceId) -> Option<Arc<Worker>> {
        let w = self.workers.remove(&self.scheduler, id)?;
        tracing::info!(model = %self.model, worker = %w.url, id = w.id.0, role = %w.role, "worker removed; draining");
        crate::metrics::membership(&self.model, w.role, "removed");
        Some(w)
    }

    pub fn views(&self) -> Vec<WorkerView> {
        self.workers.views(&self.scheduler)
    }
}
