//! The line of new requests waiting for KV room (`Slo::room_wait_ms`).
//!
//! When every decode's pool is booked full, a new request may wait for streams to end and free
//! room rather than be refused at once. Left alone, that wait would turn overload into slow
//! refusals: requests arriving faster than room frees would all wait out their time, then be
//! refused anyway. So the waiters form one line, served first come first served, and a request
//! joins only while the line is short enough to be served within its wait at the pace room has
//! been freeing up, and within its slack: the time it can still wait and make its TTFT SLO.
//! Everyone else is refused at once, with `Retry-After`. A new request that finds room is
//! admitted without queueing behind the waiters: a waiter at the head may need more room than
//! has freed, and holding smaller requests behind it left room unused (at 10x overload on the
//! public trace, 2,116 requests within the SLO against 2,598).
//!
//! This is the line's bookkeeping alone, in the caller's clock (ms): the gateway holds it under
//! a lock beside a fair semaphore for the head's place, the simulator beside a queue.

use crate::config::Slo;
use crate::cost::Ewma;

/// How fast the estimate of the pace of service follows new samples.
const PACE_ALPHA: f64 = 0.2;

#[derive(Debug, Clone)]
pub struct RoomLine {
    limit: usize,
    wait_ms: f64,
    waiting: usize,
    /// Time from a waiter reaching the head of the line to its leaving it, ms.
    pace: Option<Ewma>,
    /// When the current head reached the head of the line.
    head_since_ms: Option<f64>,
}

/// How a waiter left the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaving {
    /// The head, scheduled.
    Served,
    /// The head, refused (its wait ran out, or another rejection).
    GaveUp,
    /// A waiter behind the head whose wait ran out before it reached the head.
    Behind,
}

impl RoomLine {
    pub fn new(slo: &Slo) -> Self {
        Self {
            limit: slo.room_queue as usize,
            wait_ms: slo.room_wait_ms.max(0.0),
            waiting: 0,
            pace: None,
            head_since_ms: None,
        }
    }

    /// Requests in the line, the head included.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// The time the line predicts a request joining now would wait, ms (`None` before anyone
    /// was served from it).
    pub fn predicted_wait_ms(&self) -> Option<f64> {
        self.pace.map(|p| p.get() * (self.waiting + 1) as f64)
    }

    /// Joins the line if it has room and is predicted to serve the request within its wait and
    /// within `slack_ms`, the longest it can wait and still make its TTFT SLO
    /// (`Scheduler::ttft_slack_ms`); `false`: refuse the request now. An empty line always takes
    /// one that has slack left, so the pace is measured again after a slow spell.
    /// Whether the line has a place for anyone at all (before any request's slack is known).
    pub fn has_place(&self) -> bool {
        self.wait_ms > 0.0 && self.waiting < self.limit
    }

    pub fn try_join(&mut self, now_ms: f64, slack_ms: f64) -> bool {
        let in_time = self.waiting == 0
            || self
                .predicted_wait_ms()
                .is_none_or(|wait| wait <= self.wait_ms.min(slack_ms));
        if !self.has_place() || slack_ms <= 0.0 || !in_time {
            return false;
        }
        if self.waiting == 0 {
            self.head_since_ms = Some(now_ms);
        }
        self.waiting += 1;
        true
    }

    /// A waiter leaves the line; the head's time at the head is a sample of the pace.
    pub fn leave(&mut self, now_ms: f64, how: Leaving) {
        self.waiting = self.waiting.saturating_sub(1);
        if how == Leaving::Behind {
            return;
        }
        if let Some(since) = self.head_since_ms {
            let sample = (now_ms - since).max(0.0);
            match &mut self.pace {
                Some(p) => p.update(sample),
                None => self.pace = Some(Ewma::new(sample, PACE_ALPHA)),
            }
        }
        self.head_since_ms = (self.waiting > 0).then_some(now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(limit: u32, wait_ms: f64) -> RoomLine {
        RoomLine::new(&Slo {
            room_queue: limit,
            room_wait_ms: wait_ms,
            ..Slo::default()
        })
    }

    #[test]
    fn joins_up_to_the_limit_until_a_pace_is_known() {
        let mut l = line(3, 1000.0);
        assert!((0..3).all(|_| l.try_join(0.0, f64::INFINITY)));
        assert!(!l.try_join(0.0, f64::INFINITY), "limit reached");
        assert!(!l.has_place());
        assert_eq!(l.waiting(), 3);
        l.leave(1.0, Leaving::GaveUp);
        assert!(l.has_place());
        assert!(!line(3, 0.0).has_place(), "no wait, no line");
    }

    #[test]
    fn the_pace_refuses_a_line_too_long_to_serve_in_time() {
        let mut l = line(100, 1000.0);
        assert!(l.try_join(0.0, f64::INFINITY) && l.try_join(0.0, f64::INFINITY));
        // The head is served after 300 ms: room frees about every 300 ms.
        l.leave(300.0, Leaving::Served);
        assert_eq!(l.predicted_wait_ms(), Some(600.0));
        assert!(
            l.try_join(300.0, f64::INFINITY),
            "2 waiting: served in ~600 ms"
        );
        assert_eq!(l.predicted_wait_ms(), Some(900.0));
        assert!(l.try_join(300.0, f64::INFINITY), "3 waiting: ~900 ms");
        assert!(
            !l.try_join(300.0, f64::INFINITY),
            "a fourth would wait ~1.2 s, past its 1 s"
        );
    }

    #[test]
    fn an_empty_line_always_takes_one_and_relearns_the_pace() {
        let mut l = line(100, 1000.0);
        assert!(l.try_join(0.0, f64::INFINITY));
        l.leave(5000.0, Leaving::GaveUp);
        assert!(
            l.try_join(5000.0, f64::INFINITY),
            "empty: joins whatever the pace"
        );
        assert!(
            !l.try_join(5000.0, f64::INFINITY),
            "behind a head that takes 5 s: refused"
        );
        l.leave(5010.0, Leaving::Served);
        // The pace moves towards the fast service.
        assert!(l.predicted_wait_ms().is_some_and(|w| w < 5000.0));
    }

    #[test]
    fn a_waiter_leaving_from_behind_is_no_sample_of_the_pace() {
        let mut l = line(100, 1000.0);
        assert!(l.try_join(0.0, f64::INFINITY) && l.try_join(0.0, f64::INFINITY));
        l.leave(900.0, Leaving::Behind);
        assert_eq!(l.waiting(), 1);
        assert_eq!(l.predicted_wait_ms(), None);
    }

    #[test]
    fn a_request_joins_only_within_its_ttft_slack() {
        let mut l = line(100, 1000.0);
        assert!(
            !l.try_join(0.0, 0.0),
            "no slack left: refused, even by an empty line"
        );
        assert!(l.try_join(0.0, 50.0) && l.try_join(0.0, f64::INFINITY));
        l.leave(300.0, Leaving::Served);
        // Served in ~600 ms: within its 1 s wait, but not within 400 ms of slack.
        assert!(!l.try_join(300.0, 400.0));
        assert!(l.try_join(300.0, 700.0));
    }

    #[test]
    fn no_wait_configured_means_no_line() {
        let mut l = line(100, 0.0);
        assert!(!l.try_join(0.0, f64::INFINITY));
        let mut l = line(0, 1000.0);
        assert!(!l.try_join(0.0, f64::INFINITY));
    }
}
