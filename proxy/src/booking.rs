//! A scheduled request's accounting, each part reported exactly once: its booking on the
//! scheduler (each leg done when it ends or — on any early exit, error or client disconnect —
//! when the booking is dropped), and each leg's verdict for its worker's circuit breaker. A
//! booking shared with the other gateway replicas tells them of each release too.

use crate::breaker::{BreakerConfig, Outcome};
use crate::fleet::Fleet;
use crate::replica_sync::wire::Release;
use crate::workers::Worker;
use pdgate_scheduler::{BlockHash, Decision, Observed};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct Booking {
    fleet: Arc<Fleet>,
    pub decision: Decision,
    /// Published to the other replicas, whose copies await its releases.
    shared: bool,
    prefill_released: AtomicBool,
}

impl Booking {
    pub fn new(fleet: Arc<Fleet>, decision: Decision) -> Self {
        Self {
            fleet,
            decision,
            shared: false,
            prefill_released: AtomicBool::new(false),
        }
    }

    /// Tells the other gateway replicas of this booking (when booking sync is on).
    pub fn share(&mut self, blocks: &[BlockHash]) {
        let Some(outbox) = self.fleet.replicas.get() else {
            return;
        };
        let d = &self.decision;
        let now = self.fleet.now();
        let Some(mut booking) = self.fleet.scheduler.lock().booking(d.ticket, now) else {
            return;
        };
        let url = |id| self.fleet.workers.get(id).map(|w| w.url.clone());
        let (Some(decode_url), Some(prefill_url)) = (
            url(d.decode),
            d.prefill.map_or(Some(None), |id| url(id).map(Some)),
        ) else {
            return;
        };
        // A holder gone since the pick is not named: the others book no pull then.
        let pull_from_url = booking.pull.and_then(|p| url(p.from));
        if pull_from_url.is_none() {
            booking.pull = None;
        }
        outbox.booked(
            d.ticket,
            (prefill_url, decode_url),
            pull_from_url,
            booking,
            blocks,
        );
        self.shared = true;
    }

    pub fn prefill_done(&self, observed: Option<Observed>) {
        let now = self.fleet.now();
        self.fleet
            .scheduler
            .lock()
            .prefill_done(self.decision.ticket, now, observed);
        if self.shared && !self.prefill_released.swap(true, Ordering::Relaxed) {
            self.release(Release::Prefill);
        }
    }

    fn release(&self, what: Release) {
        if let Some(outbox) = self.fleet.replicas.get() {
            outbox.released(self.decision.ticket, what);
        }
    }
}

impl Drop for Booking {
    fn drop(&mut self) {
        let now = self.fleet.now();
        self.fleet
            .scheduler
            .lock()
            .decode_done(self.decision.ticket, now);
        if self.shared {
            self.release(Release::Decode);
        }
    }
}

/// One leg's outcome for the breaker of the worker that served it, recorded exactly once: when
/// its fate is known (a decode's only at the end of its body: a stream cut after the head is
/// that worker's failure), or as `Outcome::Unknown` when dropped unrecorded — the client left or
/// the request ended elsewhere, which says nothing about the worker and gives back a half-open
/// probe. Every breaker outcome of a served leg goes through here.
pub struct Verdict {
    fleet: Arc<Fleet>,
    cfg: BreakerConfig,
    worker: Arc<Worker>,
    recorded: bool,
}

impl Verdict {
    pub fn new(fleet: &Arc<Fleet>, cfg: BreakerConfig, worker: &Arc<Worker>) -> Self {
        Self {
            fleet: Arc::clone(fleet),
            cfg,
            worker: Arc::clone(worker),
            recorded: false,
        }
    }

    pub fn record(mut self, outcome: Outcome) {
        self.fold(outcome);
    }

    fn fold(&mut self, outcome: Outcome) {
        self.recorded = true;
        let now = self.fleet.now();
        self.fleet
            .workers
            .record(&self.worker, outcome, now, &self.cfg);
    }
}

impl Drop for Verdict {
    fn drop(&mut self) {
        if !self.recorded {
            self.fold(Outcome::Unknown);
        }
    }
}
