//! Sequence numbers of one event stream: what to do with the next batch. A publisher numbers
//! its batches 0, 1, 2, … from its start; a number past the expected one means batches were
//! lost (ask the replay socket), one below it after a replay is a batch the replay already
//! brought, and one below anything this stream has seen means the publisher started over.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Apply,
    /// Batches `from..seq` are missing.
    Gap {
        from: u64,
    },
    /// Already applied (it came through a replay too).
    Duplicate,
    /// The publisher restarted: what was learnt from it is stale.
    Restart,
}

#[derive(Debug, Default, Clone)]
pub struct Sequence {
    /// The next number expected; `None` before the first batch of a connection.
    next: Option<u64>,
    /// The lowest number this stream has delivered or replayed.
    floor: u64,
}

impl Sequence {
    pub fn observe(&self, seq: u64) -> Step {
        match self.next {
            None if seq == 0 => Step::Apply,
            None => Step::Gap { from: 0 },
            Some(n) if seq == n => Step::Apply,
            Some(n) if seq > n => Step::Gap { from: n },
            Some(_) if seq >= self.floor => Step::Duplicate,
            Some(_) => Step::Restart,
        }
    }

    /// Records that batch `seq` was applied.
    pub fn applied(&mut self, seq: u64) {
        if self.next.is_none() {
            self.floor = seq;
        }
        self.floor = self.floor.min(seq);
        self.next = Some(seq.saturating_add(1));
    }

    /// Starts over: a new connection, or a publisher that restarted.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    pub fn next(&self) -> Option<u64> {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_gap_duplicate_restart() {
        let mut s = Sequence::default();
        assert_eq!(s.observe(0), Step::Apply);
        s.applied(0);
        assert_eq!(s.observe(1), Step::Apply);
        s.applied(1);
        assert_eq!(s.observe(5), Step::Gap { from: 2 });
        for n in 2..=7 {
            s.applied(n);
        }
        assert_eq!(s.observe(5), Step::Duplicate, "the replay brought it");
        assert_eq!(s.observe(8), Step::Apply);
    }

    #[test]
    fn joining_late_replays_from_the_start_and_a_restart_is_seen() {
        let mut s = Sequence::default();
        assert_eq!(s.observe(40), Step::Gap { from: 0 });
        // The replay buffer only reached back to 30.
        for n in 30..=41 {
            s.applied(n);
        }
        assert_eq!(s.observe(3), Step::Restart);
        s.reset();
        assert_eq!(s.observe(0), Step::Apply);
    }
}
