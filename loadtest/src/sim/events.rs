//! The simulator's event queue: a min-heap on (virtual time, insertion number), so events at the
//! same instant run in the order they were scheduled — deterministic, and a zero-delay "kick"
//! scheduled now runs after everything already due now (which is how several arrivals at one
//! instant land in the same engine step, as they do when the live batcher drains its channel).
//!
//! It never reorders time: popping yields non-decreasing times.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Request `r` reaches the gateway.
    Arrival(usize),
    /// Request `r`, waiting for a decode with KV room, asks the scheduler again.
    Admit(usize),
    /// Engine `e` may start a step (it was idle and got work).
    Kick(usize),
    /// Engine `e`'s step in progress ends.
    StepEnd(usize),
    /// Request `r`'s KV cache landed on its decode instance.
    TransferDone(usize),
    /// The prefix blocks request `r`'s prefill pulled from another instance landed.
    PullDone(usize),
    /// Request `r`'s host-tier blocks are back on its runner's GPU: its prefill of the given
    /// uncached tokens can run.
    HostCopied(usize, usize),
    /// Gateway replica `g` scrapes every engine's metrics into its scheduler.
    Scrape(usize),
    /// The oldest engine KV event in transit reaches the gateway replicas.
    KvEvents,
    /// The oldest booking-sync message in transit reaches the other gateway replicas.
    SyncDelivered,
}

#[derive(Debug)]
struct Entry {
    at_ms: f64,
    seq: u64,
    event: Event,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap and we want the earliest first.
        o.at_ms.total_cmp(&self.at_ms).then(o.seq.cmp(&self.seq))
    }
}

#[derive(Debug, Default)]
pub struct EventQueue {
    heap: BinaryHeap<Entry>,
    seq: u64,
    now_ms: f64,
}

impl EventQueue {
    pub fn now_ms(&self) -> f64 {
        self.now_ms
    }

    /// Schedules `event` at `at_ms`; a time in the past is clamped to now.
    pub fn push(&mut self, at_ms: f64, event: Event) {
        let at_ms = if at_ms.is_finite() {
            at_ms.max(self.now_ms)
        } else {
            self.now_ms
        };
        self.heap.push(Entry {
            at_ms,
            seq: self.seq,
            event,
        });
        self.seq += 1;
    }

    pub fn pop(&mut self) -> Option<(f64, Event)> {
        let e = self.heap.pop()?;
        self.now_ms = e.at_ms;
        Some((e.at_ms, e.event))
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_and_fifo_at_equal_times() {
        let mut q = EventQueue::default();
        q.push(5.0, Event::Arrival(0));
        q.push(1.0, Event::StepEnd(1));
        q.push(5.0, Event::Kick(2));
        q.push(1.0, Event::TransferDone(3));
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            vec![
                (1.0, Event::StepEnd(1)),
                (1.0, Event::TransferDone(3)),
                (5.0, Event::Arrival(0)),
                (5.0, Event::Kick(2)),
            ]
        );
    }

    #[test]
    fn the_past_is_clamped_to_now_and_time_never_goes_back() {
        let mut q = EventQueue::default();
        q.push(10.0, Event::Arrival(0));
        assert_eq!(q.pop(), Some((10.0, Event::Arrival(0))));
        q.push(3.0, Event::Kick(0));
        q.push(f64::NAN, Event::Kick(1));
        assert_eq!(q.pop(), Some((10.0, Event::Kick(0))));
        assert_eq!(q.pop(), Some((10.0, Event::Kick(1))));
        assert!(q.is_empty());
    }
}
