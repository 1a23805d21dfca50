//! The engines the gateway fronts, as one handle: their addresses, health and breakers
//! (`Workers`) and their load (`Scheduler`), which change together, and the clock the scheduler
//! is fed. Health checks, metric scrapes, bookings and the admin view need this and nothing else.

use crate::config::WorkerConfig;
use crate::workers::{Worker, WorkerView, Workers};
use parking_lot::Mutex;
use pdgate_scheduler::{Scheduler, SchedulerConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Fleet {
    pub workers: Workers,
    pub scheduler: Mutex<Scheduler>,
    /// The scheduler's time origin: it is fed `epoch.elapsed()`, never reads a clock itself.
    epoch: Instant,
}

impl Fleet {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            workers: Workers::default(),
            scheduler: Mutex::new(Scheduler::new(cfg)),
            epoch: Instant::now(),
        }
    }

    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Registers a worker with both halves, unhealthy until its first health check passes.
    pub fn add(&self, cfg: &WorkerConfig) -> Arc<Worker> {
        self.workers.add(&self.scheduler, cfg)
    }

    pub fn views(&self) -> Vec<WorkerView> {
        self.workers.views(&self.scheduler)
    }
}
