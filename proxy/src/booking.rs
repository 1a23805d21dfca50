//! A scheduled request's accounting, each part reported exactly once: its booking on the
//! scheduler (each leg done when it ends or — on any early exit, error or client disconnect —
//! when the booking is dropped), and each leg's verdict for its worker's circuit breaker.

use crate::breaker::Outcome;
use crate::state::AppState;
use crate::workers::Worker;
use pdgate_scheduler::{Decision, Observed};
use std::sync::Arc;

pub struct Booking {
    state: Arc<AppState>,
    pub decision: Decision,
}

impl Booking {
    pub fn new(state: Arc<AppState>, decision: Decision) -> Self {
        Self { state, decision }
    }

    pub fn prefill_done(&self, observed: Option<Observed>) {
        let now = self.state.now();
        self.state
            .scheduler
            .lock()
            .prefill_done(self.decision.ticket, now, observed);
    }
}

impl Drop for Booking {
    fn drop(&mut self) {
        let now = self.state.now();
        self.state
            .scheduler
            .lock()
            .decode_done(self.decision.ticket, now);
    }
}

/// One leg's outcome for the breaker of the worker that served it, recorded exactly once: when
/// its fate is known (a decode's only at the end of its body: a stream cut after the head is
/// that worker's failure), or as `Outcome::Unknown` when dropped unrecorded — the client left or
/// the request ended elsewhere, which says nothing about the worker and gives back a half-open
/// probe. Every breaker outcome of a served leg goes through here.
pub struct Verdict {
    state: Arc<AppState>,
    worker: Arc<Worker>,
    recorded: bool,
}

impl Verdict {
    pub fn new(state: &Arc<AppState>, worker: &Arc<Worker>) -> Self {
        Self {
            state: Arc::clone(state),
            worker: Arc::clone(worker),
            recorded: false,
        }
    }

    pub fn record(mut self, outcome: Outcome) {
        self.fold(outcome);
    }

    fn fold(&mut self, outcome: Outcome) {
        self.recorded = true;
        let (now, cfg) = (self.state.now(), &self.state.cfg.breaker);
        self.state.workers.record(&self.worker, outcome, now, cfg);
    }
}

impl Drop for Verdict {
    fn drop(&mut self) {
        if !self.recorded {
            self.fold(Outcome::Unknown);
        }
    }
}
