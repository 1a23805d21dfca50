//! The bookings other replicas placed, as this replica holds them: each one's local ticket, when
//! it arrived and who placed it, so its release finds it and a release that never comes (lost
//! message, dead replica) does not hold load forever. Pure state over the scheduler, fed with
//! time; no I/O.

use super::wire::{Release, ReplicaId};
use pdgate_scheduler::{BlockHash, Booking, Scheduler, Ticket};
use std::collections::HashMap;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Booked,
    Released,
    /// A release for a booking not held: expired, dropped when full, or never seen.
    UnknownBooking,
    /// `max_bookings` are held already: this one is not booked.
    Full,
}

impl Applied {
    pub fn label(self) -> &'static str {
        match self {
            Applied::Booked => "booked",
            Applied::Released => "released",
            Applied::UnknownBooking => "unknown_booking",
            Applied::Full => "dropped_ledger_full",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    /// Held longer than the booking TTL.
    pub ttl: usize,
    /// Placed by a replica silent for longer than the replica timeout.
    pub replica_gone: usize,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    local: Ticket,
    arrived: Duration,
}

pub struct Ledger {
    held: HashMap<(ReplicaId, u64), Held>,
    last_heard: HashMap<ReplicaId, Duration>,
    max: usize,
    ttl: Duration,
    replica_timeout: Duration,
}

impl Ledger {
    pub fn new(max: usize, ttl: Duration, replica_timeout: Duration) -> Self {
        Self {
            held: HashMap::new(),
            last_heard: HashMap::new(),
            max,
            ttl,
            replica_timeout,
        }
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Any message from `from` says it is alive.
    pub fn heard(&mut self, from: ReplicaId, now: Duration) {
        // Bounded by the replicas actually publishing: entries leave when they go silent.
        self.last_heard.insert(from, now);
    }

    /// Books `b` (its instance ids already this replica's) as `from`'s booking `ticket`.
    pub fn book(
        &mut self,
        sched: &mut Scheduler,
        (from, ticket): (ReplicaId, u64),
        b: &Booking,
        blocks: &[BlockHash],
        now: Duration,
    ) -> Applied {
        if self.held.len() >= self.max && !self.held.contains_key(&(from, ticket)) {
            return Applied::Full;
        }
        let local = sched.book_synced(b, blocks, now);
        let held = Held {
            local,
            arrived: now,
        };
        // A duplicate (the sender re-sent after a reconnect) replaces, never doubles, the load.
        if let Some(old) = self.held.insert((from, ticket), held) {
            sched.decode_done(old.local, now);
        }
        Applied::Booked
    }

    pub fn release(
        &mut self,
        sched: &mut Scheduler,
        key: (ReplicaId, u64),
        what: Release,
        now: Duration,
    ) -> Applied {
        let held = match what {
            Release::Prefill => self.held.get(&key).copied(),
            Release::Decode => self.held.remove(&key),
        };
        let Some(held) = held else {
            return Applied::UnknownBooking;
        };
        match what {
            Release::Prefill => sched.prefill_done(held.local, now, None),
            Release::Decode => sched.decode_done(held.local, now),
        }
        Applied::Released
    }

    /// Releases what outlived the TTL or whose replica went silent.
    pub fn expire(&mut self, sched: &mut Scheduler, now: Duration) -> Expired {
        let timeout = self.replica_timeout;
        self.last_heard
            .retain(|_, heard| now.saturating_sub(*heard) <= timeout);
        let mut out = Expired::default();
        let (ttl, last_heard) = (self.ttl, &self.last_heard);
        self.held.retain(|(from, _), h| {
            let reason = if !last_heard.contains_key(from) {
                &mut out.replica_gone
            } else if now.saturating_sub(h.arrived) > ttl {
                &mut out.ttl
            } else {
                return true;
            };
            *reason += 1;
            sched.decode_done(h.local, now);
            false
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdgate_scheduler::{InstanceId, InstanceSpec, Role, SchedulerConfig};

    const NOW: Duration = Duration::from_secs(10);

    fn fleet() -> (Scheduler, InstanceId, InstanceId) {
        let mut s = Scheduler::new(SchedulerConfig::default());
        let p = s.add_instance(Role::Prefill, InstanceSpec::default());
        let d = s.add_instance(Role::Decode, InstanceSpec::default());
        (s, p, d)
    }

    fn booking(p: InstanceId, d: InstanceId) -> Booking {
        Booking {
            prefill: Some(p),
            decode: d,
            uncached_tokens: 100,
            decode_tokens: 164,
            decode_blocks: 11,
            predicted_prefill_ms: 20.0,
            compute_ms: 20.0,
            decode_end_ms: 500.0,
            pull: None,
            evict_first: None,
        }
    }

    fn decode_seqs(s: &Scheduler, id: InstanceId) -> u32 {
        s.load(id).map_or(0, |l| l.decode_seqs)
    }

    fn ledger() -> Ledger {
        Ledger::new(2, Duration::from_secs(60), Duration::from_secs(5))
    }

    #[test]
    fn a_booking_loads_the_pair_until_its_release() {
        let (mut s, p, d) = fleet();
        let mut l = ledger();
        l.heard(7, NOW);
        assert_eq!(
            l.book(&mut s, (7, 1), &booking(p, d), &[], NOW),
            Applied::Booked
        );
        assert_eq!(decode_seqs(&s, d), 1);
        assert_eq!(s.load(p).map(|l| l.prefill_tokens), Some(100));
        assert_eq!(
            l.release(&mut s, (7, 1), Release::Prefill, NOW),
            Applied::Released
        );
        assert_eq!(s.load(p).map(|l| l.prefill_tokens), Some(0));
        assert_eq!(decode_seqs(&s, d), 1);
        assert_eq!(
            l.release(&mut s, (7, 1), Release::Decode, NOW),
            Applied::Released
        );
        assert_eq!(decode_seqs(&s, d), 0);
        assert_eq!(
            l.release(&mut s, (7, 1), Release::Decode, NOW),
            Applied::UnknownBooking
        );
        assert!(l.is_empty());
    }

    #[test]
    fn a_duplicate_booking_does_not_double_the_load() {
        let (mut s, p, d) = fleet();
        let mut l = ledger();
        l.book(&mut s, (7, 1), &booking(p, d), &[], NOW);
        l.book(&mut s, (7, 1), &booking(p, d), &[], NOW);
        assert_eq!(decode_seqs(&s, d), 1);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn past_the_cap_new_bookings_are_refused() {
        let (mut s, p, d) = fleet();
        let mut l = ledger();
        for t in 0..2 {
            assert_eq!(
                l.book(&mut s, (7, t), &booking(p, d), &[], NOW),
                Applied::Booked
            );
        }
        assert_eq!(
            l.book(&mut s, (7, 9), &booking(p, d), &[], NOW),
            Applied::Full
        );
        assert_eq!(decode_seqs(&s, d), 2);
    }

    #[test]
    fn a_silent_replicas_bookings_are_released() {
        let (mut s, p, d) = fleet();
        let mut l = ledger();
        l.heard(7, NOW);
        l.heard(8, NOW);
        l.book(&mut s, (7, 1), &booking(p, d), &[], NOW);
        l.book(&mut s, (8, 1), &booking(p, d), &[], NOW);
        let later = NOW + Duration::from_secs(4);
        l.heard(8, later);
        assert_eq!(l.expire(&mut s, later), Expired::default());
        let gone = NOW + Duration::from_secs(6);
        let e = l.expire(&mut s, gone);
        assert_eq!((e.replica_gone, e.ttl), (1, 0));
        assert_eq!(decode_seqs(&s, d), 1);
    }

    #[test]
    fn a_booking_whose_release_is_lost_expires() {
        let (mut s, p, d) = fleet();
        let mut l = ledger();
        l.book(&mut s, (7, 1), &booking(p, d), &[], NOW);
        let mut t = NOW;
        // The replica stays alive; only the release went missing.
        while t < NOW + Duration::from_secs(61) {
            t += Duration::from_secs(1);
            l.heard(7, t);
        }
        let e = l.expire(&mut s, t);
        assert_eq!((e.replica_gone, e.ttl), (0, 1));
        assert_eq!(decode_seqs(&s, d), 0);
    }
}
