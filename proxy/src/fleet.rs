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
    pub workers: Workers,
    pub scheduler: Mutex<Scheduler>,
    /// Where bookings go to the other gateway replicas; unset when booking sync is off.
    pub replicas: OnceLock<Outbox>,
    /// The scheduler's time origin: it is fed `epoch.elapsed()`, never reads a clock itself.
    epoch: Instant,
}

impl Fleet {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            workers: Workers::default(),
            scheduler: Mutex::new(Scheduler::new(cfg)),
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
        tracing::info!(worker = %w.url, id = w.id.0, role = %w.role, protocol = %w.protocol, "worker added");
        crate::metrics::membership(w.role, "added");
        w
    }

    /// Takes a worker out: nothing new is scheduled on it, requests in flight on it finish, its
    /// scheduler state (load, prefix-index entries) is freed now. `None`: no such worker.
    pub fn remove_draining(&self, id: InstanceId) -> Option<Arc<Worker>> {
        let w = self.workers.remove(&self.scheduler, id)?;
        tracing::info!(worker = %w.url, id = w.id.0, role = %w.role, "worker removed; draining");
        crate::metrics::membership(w.role, "removed");
        Some(w)
    }

    pub fn views(&self) -> Vec<WorkerView> {
        self.workers.views(&self.scheduler)
    }
}
