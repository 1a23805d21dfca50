//! One model's line of new requests waiting for KV room: the scheduler's `RoomLine` bookkeeping
//! under a lock, and a fair semaphore whose one permit is the head's place, so waiters are
//! served in the order they came. Only the head asks the scheduler again; the others wait for
//! the place (each up to its own deadline). A new request asks before it joins: one that fits
//! takes the room at once rather than wait behind a head that needs more.

use parking_lot::Mutex;
use pdgate_scheduler::{Leaving, RoomLine, Slo};
use std::time::Instant;
use tokio::sync::{Semaphore, SemaphorePermit};

#[derive(Debug)]
pub struct Line {
    /// Whether new requests may wait at all (`room_queue` and `room_wait_ms` above 0); when not,
    /// no request takes the lock.
    open: bool,
    book: Mutex<RoomLine>,
    head: Semaphore,
    epoch: Instant,
}

/// A request's place in the line; leaving (drop) gives the head's place to the next waiter.
#[derive(Debug)]
pub struct Place<'a> {
    line: &'a Line,
    head: Option<SemaphorePermit<'a>>,
    served: bool,
}

impl Line {
    pub fn new(slo: &Slo) -> Self {
        Self {
            open: slo.room_queue > 0 && slo.room_wait_ms > 0.0,
            book: Mutex::new(RoomLine::new(slo)),
            head: Semaphore::new(1),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64() * 1e3
    }

    /// Whether requests are waiting in the line.
    pub fn is_busy(&self) -> bool {
        self.open && self.book.lock().waiting() > 0
    }

    /// Whether a request could join at all: when not, it is refused without working out its
    /// slack (under overload, most refusals).
    pub fn has_place(&self) -> bool {
        self.open && self.book.lock().has_place()
    }

    /// A place at the end of the line for a request that can wait `slack_ms` and still make
    /// its TTFT SLO, or `None`: refuse the request now.
    pub fn join(&self, slack_ms: f64) -> Option<Place<'_>> {
        if !self.open {
            return None;
        }
        let now = self.now_ms();
        // The lock is let go before a place exists: a place's drop takes it again.
        let joined = self.book.lock().try_join(now, slack_ms);
        joined.then(|| Place {
            line: self,
            head: None,
            served: false,
        })
    }
}

impl Place<'_> {
    /// Waits to be the head, up to `deadline`; `false` if the wait ran out first.
    pub async fn reach_head(&mut self, deadline: tokio::time::Instant) -> bool {
        if self.head.is_some() {
            return true;
        }
        match tokio::time::timeout_at(deadline, self.line.head.acquire()).await {
            Ok(Ok(permit)) => {
                self.head = Some(permit);
                true
            }
            _ => false,
        }
    }

    /// The request got its room: it leaves the line as served.
    pub fn served(mut self) {
        self.served = true;
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let how = match (self.head.is_some(), self.served) {
            (true, true) => Leaving::Served,
            (true, false) => Leaving::GaveUp,
            (false, _) => Leaving::Behind,
        };
        let now = self.line.now_ms();
        // Booked out before the head's permit goes (dropped after this), so the next head's
        // time at the head starts here.
        self.line.book.lock().leave(now, how);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line(limit: u32) -> Line {
        Line::new(&Slo {
            room_queue: limit,
            ..Slo::default()
        })
    }

    #[tokio::test]
    async fn waiters_reach_the_head_in_the_order_they_came() {
        let l = line(8);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut first = l.join(f64::INFINITY).expect("first");
        let mut second = l.join(f64::INFINITY).expect("second");
        assert!(first.reach_head(deadline).await);
        let soon = tokio::time::Instant::now() + Duration::from_millis(20);
        assert!(
            !second.reach_head(soon).await,
            "the second waits while the first is at the head"
        );
        first.served();
        assert!(second.reach_head(deadline).await, "then it is the head");
        assert!(l.is_busy());
        drop(second);
        assert!(!l.is_busy(), "everyone left");
    }

    #[tokio::test]
    async fn a_full_line_refuses() {
        let l = line(1);
        let _only = l.join(f64::INFINITY).expect("joins");
        assert!(l.join(f64::INFINITY).is_none());
    }
}
