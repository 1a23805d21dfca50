//! The retry budget, after Envoy's: a retry (a request's next attempt on another instance
//! before any byte reached its client) may start only while the retries under way stay within a
//! fraction of the requests in flight, with a floor so a quiet gateway can still retry. When a
//! fleet struggles, many requests fail at once; per-request attempt limits alone would then
//! multiply the load on what is left, while the budget caps the extra load at that fraction.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct RetryBudget {
    under_way: AtomicUsize,
    percent: u32,
    floor: usize,
}

/// One retry under way; given back when dropped (the request answered or failed for good).
#[derive(Debug)]
pub struct RetryPermit(Arc<RetryBudget>);

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.0.under_way.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RetryBudget {
    pub fn new(percent: u32, floor: usize) -> Arc<Self> {
        Arc::new(Self {
            under_way: AtomicUsize::new(0),
            percent,
            floor,
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

    pub fn under_way(&self) -> usize {
        self.under_way.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::RetryBudget;

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
}
