//! The retry budget, after Envoy's: a retry (a request's next attempt on another instance
//! before any byte reached its client) may start only while the retries under way stay within a
//! fraction of the requests in flight, with a floor so a quiet gateway can still retry. When a
//! fleet struggles, many requests fail at once; per-request attempt limits alone would then
//! multiply the load on what is left, while the budget caps the extra load at that fraction.
//!
//! A retry the budget cannot take at once waits, for a bounded time, for one under way to
//! finish: an engine that dies breaks all its streams at the same moment, a burst the budget
//! would otherwise turn into lost requests although each retry holds its slot only until its
//! answer starts. What the budget bounds is how many retries run at once, not how many requests
//! may fail.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Debug)]
pub struct RetryBudget {
    under_way: AtomicUsize,
    percent: u32,
    floor: usize,
    /// Woken whenever a retry gives its slot back.
    freed: Notify,
}

/// One retry under way; given back when dropped (the request answered or failed for good).
#[derive(Debug)]
pub struct RetryPermit(Arc<RetryBudget>);

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.0.under_way.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_waiters();
    }
}

impl RetryBudget {
    pub fn new(percent: u32, floor: usize) -> Arc<Self> {
        Arc::new(Self {
            under_way: AtomicUsize::new(0),
            percent,
            floor,
            freed: Notify::new(),
        })
    }

    /// What `requests_in_flight` requests allow under way at once.
    fn allowance(&self, requests_in_flight: usize) -> usize {
        let share = requests_in_flight.saturating_mul(self.percent as usize) / 100;
        share.max(self.floor)
    }

    /// A permit for one more retry, or `None` when the budget is spent.
    pub fn try_acquire(self: &Arc<Self>, requests_in_flight: usize) -> Option<RetryPermit> {
        let allowance = self.allowance(requests_in_flight);
        self.under_way
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < allowance).then_some(n + 1)
            })
            .ok()
            .map(|_| RetryPermit(Arc::clone(self)))
    }

    /// A permit, waiting up to `wait` for a retry under way to give its slot back; `None` at
    /// once when the budget allows no retry at all (nothing could free one).
    pub async fn acquire(
        self: &Arc<Self>,
        requests_in_flight: impl Fn() -> usize,
        wait: Duration,
    ) -> Option<RetryPermit> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the attempt, so a slot freed in between is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let in_flight = requests_in_flight();
            if let Some(p) = self.try_acquire(in_flight) {
                return Some(p);
            }
            if self.allowance(in_flight) == 0 {
                return None;
            }
            tokio::time::timeout_at(deadline, freed).await.ok()?;
        }
    }

    pub fn under_way(&self) -> usize {
        self.under_way.load(Ordering::Acquire)
    }
}

/// A request's wait for a decode with KV room (`slo.room_wait_ms`). Under load the decodes'
/// pools are booked full for moments at a time, and a decode that fails sends its requests to
/// retry on the others at once; streams finishing there free room soon. The wait is checked by
/// polling the scheduler, which owns the bookings and has no async side to notify from.
#[derive(Debug)]
pub struct RoomWait {
    limit: Duration,
    started: Option<tokio::time::Instant>,
}

impl RoomWait {
    const POLL: Duration = Duration::from_millis(pdgate_scheduler::ROOM_POLL_MS);

    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            started: None,
        }
    }

    /// The pause before asking again, or `None` once the wait (counted from the first call)
    /// is over.
    pub fn pause(&mut self) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        let deadline = *self.started.get_or_insert(now) + self.limit;
        (now < deadline).then(|| (deadline - now).min(Self::POLL))
    }

    /// When the wait ends, counted from now if it has not begun.
    pub fn deadline(&mut self) -> tokio::time::Instant {
        *self.started.get_or_insert_with(tokio::time::Instant::now) + self.limit
    }

    /// Ends the wait no later than `left` from now.
    pub fn cap(&mut self, left: Duration) {
        let now = tokio::time::Instant::now();
        let started = *self.started.get_or_insert(now);
        self.limit = self.limit.min(now + left - started);
    }

    /// Time waited so far (zero before the first pause).
    pub fn waited(&self) -> Duration {
        self.started.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Whether a `kv_full` answer now would be waited on (the limit is not yet reached).
    pub fn is_open(&self) -> bool {
        self.waited() < self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::{RetryBudget, RoomWait};
    use std::time::Duration;

    #[test]
    fn the_floor_holds_when_quiet_and_the_share_when_busy() {
        let b = RetryBudget::new(20, 2);
        let held: Vec<_> = (0..2).filter_map(|_| b.try_acquire(1)).collect();
        assert_eq!(held.len(), 2);
        assert!(b.try_acquire(1).is_none(), "floor of 2 reached");
        // 100 requests in flight: 20 % = 20 retries may be under way.
        let more: Vec<_> = (0..30).filter_map(|_| b.try_acquire(100)).collect();
        assert_eq!(more.len() + held.len(), 20);
        drop(more);
        drop(held);
        assert_eq!(b.under_way(), 0, "permits given back on drop");
        assert!(b.try_acquire(0).is_some());
    }

    #[test]
    fn a_zero_budget_refuses_every_retry() {
        let b = RetryBudget::new(0, 0);
        assert!(b.try_acquire(1000).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_waits_for_a_slot_and_no_longer_than_told() {
        let b = RetryBudget::new(0, 1);
        let held = b.try_acquire(1).expect("the floor's one slot");
        // Nothing frees it: refused at the deadline.
        let t0 = tokio::time::Instant::now();
        assert!(b.acquire(|| 1, Duration::from_millis(500)).await.is_none());
        assert_eq!(t0.elapsed(), Duration::from_millis(500));
        // Freed while waiting: taken then, not at the deadline.
        let waiter = {
            let b = std::sync::Arc::clone(&b);
            tokio::spawn(async move { b.acquire(|| 1, Duration::from_secs(5)).await.is_some() })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
        let t1 = tokio::time::Instant::now();
        assert!(
            waiter.await.expect("joined"),
            "the freed slot went to the waiter"
        );
        assert!(t1.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_budget_does_not_wait() {
        let b = RetryBudget::new(0, 0);
        let t0 = tokio::time::Instant::now();
        assert!(b.acquire(|| 100, Duration::from_secs(5)).await.is_none());
        assert_eq!(
            t0.elapsed(),
            Duration::ZERO,
            "nothing could free a slot: refused at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_room_wait_polls_until_its_limit_counted_from_the_first_ask() {
        let mut w = RoomWait::new(Duration::from_millis(25));
        let t0 = tokio::time::Instant::now();
        let mut pauses = 0;
        while let Some(p) = w.pause() {
            assert!(p <= Duration::from_millis(10));
            tokio::time::sleep(p).await;
            pauses += 1;
        }
        assert_eq!(t0.elapsed(), Duration::from_millis(25));
        assert_eq!(w.waited(), Duration::from_millis(25));
        assert!(!w.is_open());
        assert_eq!(pauses, 3, "10 + 10 + 5 ms");
        assert!(w.pause().is_none(), "over stays over");
        assert!(
            RoomWait::new(Duration::ZERO).pause().is_none(),
            "0: no wait"
        );
    }
}
