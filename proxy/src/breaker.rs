//! Per-worker circuit breakers, fed by the outcome of the legs each worker served.
//!
//! Closed → (`failure_threshold` consecutive leg failures) → Open → (`cooldown_ms`) → HalfOpen,
//! which admits exactly **one** probe request; the probe's success closes the breaker, its failure
//! reopens it for another cooldown. Failures are attributed to the leg that failed (a decode
//! failure never counts against the prefill that served the same request, and vice versa), unlike
//! a router that records one request's failure against both of its workers.
//!
//! A breaker never reads a clock (time comes in as `now`, the gateway's epoch offset) and never
//! touches the scheduler: the pipeline turns "does not admit" into an `avoid` entry. Health checks
//! and breakers are independent: a worker that answers `/health` but fails requests is still cut
//! off.

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failed legs on one worker that open its breaker (0 disables breakers).
    pub failure_threshold: u32,
    /// How long an open breaker keeps its worker out before admitting one probe request.
    pub cooldown_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cooldown_ms: 10_000,
        }
    }
}

/// Where a breaker stands. `HalfOpen { probing: true }` means the one probe is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed { failures: u32 },
    Open { until: Duration },
    HalfOpen { probing: bool },
}

/// How a leg served by this worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// Neither: the request failed elsewhere (the other leg) or for the client's own fault
    /// before this leg's fate was known. A probe slot is given back, counts are untouched.
    Unknown,
}

/// A state change worth exporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Closed → open: the worker leaves service.
    Opened,
    /// Half-open → open: the probe failed.
    Reopened,
    HalfOpened,
    /// Half-open → closed: the probe succeeded, the worker is back.
    Closed,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Opened | Transition::Reopened => "open",
            Transition::HalfOpened => "half_open",
            Transition::Closed => "closed",
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    state: BreakerState,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: BreakerState::Closed { failures: 0 },
        }
    }
}

impl Breaker {
    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn label(&self) -> &'static str {
        match self.state {
            BreakerState::Closed { .. } => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }

    /// Whether a new request may be scheduled here at `now`, without claiming anything. An open
    /// breaker whose cooldown passed turns half-open here.
    pub fn admits(&mut self, now: Duration) -> (bool, Option<Transition>) {
        match self.state {
            BreakerState::Closed { .. } => (true, None),
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen { probing: false };
                (true, Some(Transition::HalfOpened))
            }
            BreakerState::Open { .. } => (false, None),
            BreakerState::HalfOpen { probing } => (!probing, None),
        }
    }

    /// Claims the right to send one request here, after the scheduler picked this worker. A
    /// half-open breaker grants it once (the probe); `false` means another request took it first.
    pub fn claim(&mut self, now: Duration) -> (bool, Option<Transition>) {
        let (admits, t) = self.admits(now);
        if admits {
            if let BreakerState::HalfOpen { probing } = &mut self.state {
                *probing = true;
            }
        }
        (admits, t)
    }

    /// The worker's health check passed again after it had been marked down: it is most likely
    /// a new process (a restart), so an open breaker need not wait out its cooldown, which was
    /// set by the failures of the process that died. It turns half-open: one probe decides.
    pub fn health_recovered(&mut self) -> Option<Transition> {
        match self.state {
            BreakerState::Open { .. } => {
                self.state = BreakerState::HalfOpen { probing: false };
                Some(Transition::HalfOpened)
            }
            _ => None,
        }
    }

    /// Folds one leg's outcome in.
    pub fn record(
        &mut self,
        outcome: Outcome,
        now: Duration,
        cfg: &BreakerConfig,
    ) -> Option<Transition> {
        if cfg.failure_threshold == 0 {
            return None;
        }
        let cooldown = Duration::from_millis(cfg.cooldown_ms);
        match (self.state, outcome) {
            (BreakerState::Closed { .. }, Outcome::Success) => {
                self.state = BreakerState::Closed { failures: 0 };
                None
            }
            (BreakerState::Closed { failures }, Outcome::Failure) => {
                let failures = failures.saturating_add(1);
                if failures >= cfg.failure_threshold {
                    self.state = BreakerState::Open {
                        until: now + cooldown,
                    };
                    Some(Transition::Opened)
                } else {
                    self.state = BreakerState::Closed { failures };
                    None
                }
            }
            (BreakerState::HalfOpen { .. }, Outcome::Success) => {
                self.state = BreakerState::Closed { failures: 0 };
                Some(Transition::Closed)
            }
            (BreakerState::HalfOpen { .. }, Outcome::Failure) => {
                self.state = BreakerState::Open {
                    until: now + cooldown,
                };
                Some(Transition::Reopened)
            }
            (BreakerState::HalfOpen { .. }, Outcome::Unknown) => {
                self.state = BreakerState::HalfOpen { probing: false };
                None
            }
            // Outcomes of requests admitted before the breaker opened change nothing: the
            // cooldown runs its course.
            (BreakerState::Open { .. }, _) | (BreakerState::Closed { .. }, Outcome::Unknown) => {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: BreakerConfig = BreakerConfig {
        failure_threshold: 3,
        cooldown_ms: 1000,
    };

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn a_worker_back_from_down_gets_its_probe_without_the_cooldown() {
        let mut b = Breaker::default();
        for _ in 0..3 {
            b.record(Outcome::Failure, at(0), &CFG);
        }
        assert_eq!(b.admits(at(10)), (false, None), "open, cooling down");
        assert_eq!(b.health_recovered(), Some(Transition::HalfOpened));
        assert_eq!(b.claim(at(10)), (true, None), "one probe at once");
        assert_eq!(b.admits(at(10)), (false, None), "and only one");
        assert_eq!(
            b.record(Outcome::Failure, at(10), &CFG),
            Some(Transition::Reopened),
            "a failed probe reopens it for a whole cooldown"
        );
        let mut closed = Breaker::default();
        assert_eq!(
            closed.health_recovered(),
            None,
            "a closed breaker stays closed"
        );
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let mut b = Breaker::default();
        assert_eq!(b.record(Outcome::Failure, at(0), &CFG), None);
        assert_eq!(b.record(Outcome::Failure, at(0), &CFG), None);
        assert_eq!(
            b.record(Outcome::Success, at(0), &CFG),
            None,
            "a success resets"
        );
        assert_eq!(b.record(Outcome::Failure, at(0), &CFG), None);
        assert_eq!(
            b.record(Outcome::Unknown, at(0), &CFG),
            None,
            "unknown counts nothing"
        );
        assert_eq!(b.record(Outcome::Failure, at(0), &CFG), None);
        assert_eq!(
            b.record(Outcome::Failure, at(10), &CFG),
            Some(Transition::Opened)
        );
        assert_eq!(b.admits(at(500)), (false, None));
        assert_eq!(b.claim(at(1009)), (false, None), "cooldown not over");
    }

    #[test]
    fn half_open_admits_one_probe_and_its_result_decides() {
        let mut b = Breaker {
            state: BreakerState::Open { until: at(1000) },
        };
        assert_eq!(b.claim(at(1000)), (true, Some(Transition::HalfOpened)));
        assert_eq!(b.claim(at(1001)), (false, None), "one probe at a time");
        assert_eq!(b.admits(at(5000)), (false, None));
        // A probe whose fate is unknown gives its slot back.
        assert_eq!(b.record(Outcome::Unknown, at(1002), &CFG), None);
        assert_eq!(b.claim(at(1003)), (true, None));
        assert_eq!(
            b.record(Outcome::Failure, at(1100), &CFG),
            Some(Transition::Reopened)
        );
        assert_eq!(b.state(), BreakerState::Open { until: at(2100) });
        assert_eq!(b.claim(at(2100)), (true, Some(Transition::HalfOpened)));
        assert_eq!(
            b.record(Outcome::Success, at(2200), &CFG),
            Some(Transition::Closed)
        );
        assert_eq!(b.claim(at(2201)), (true, None));
        assert_eq!(b.claim(at(2202)), (true, None), "closed admits everyone");
    }

    #[test]
    fn threshold_zero_disables() {
        let cfg = BreakerConfig {
            failure_threshold: 0,
            cooldown_ms: 1,
        };
        let mut b = Breaker::default();
        for _ in 0..100 {
            assert_eq!(b.record(Outcome::Failure, at(0), &cfg), None);
        }
        assert_eq!(b.label(), "closed");
    }
}
