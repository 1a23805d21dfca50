//! A scheduled pair's load booking: released on the scheduler exactly once per leg, when the leg
//! ends or — on any early exit, error or client disconnect — when the booking is dropped.

use crate::state::AppState;
use pdgate_scheduler::Decision;
use std::sync::Arc;

pub struct Booking {
    state: Arc<AppState>,
    pub decision: Decision,
    prompt_tokens: u32,
    prefill_open: bool,
    decode_open: bool,
}

impl Booking {
    pub fn new(state: Arc<AppState>, decision: Decision, prompt_tokens: u32) -> Self {
        Self {
            state,
            decision,
            prompt_tokens,
            prefill_open: true,
            decode_open: true,
        }
    }

    pub fn prefill_done(&mut self) {
        if std::mem::take(&mut self.prefill_open) {
            self.state
                .scheduler
                .lock()
                .finish(self.decision.prefill, self.prompt_tokens);
        }
    }

    fn decode_done(&mut self) {
        if std::mem::take(&mut self.decode_open) {
            self.state
                .scheduler
                .lock()
                .finish(self.decision.decode, self.prompt_tokens);
        }
    }
}

impl Drop for Booking {
    fn drop(&mut self) {
        self.prefill_done();
        self.decode_done();
    }
}
