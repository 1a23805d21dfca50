//! A scheduled request's booking on the scheduler: each leg is reported done exactly once, when it
//! ends or — on any early exit, error or client disconnect — when the booking is dropped.

use crate::state::AppState;
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
