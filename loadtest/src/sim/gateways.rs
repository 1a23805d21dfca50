//! The gateway side of the simulated fleet: one or more replicas of the real scheduler, each fed
//! only what a `pdgate serve` replica behind a load balancer would see — the load it booked
//! itself, the engines' KV events (blocks stored and evicted) after a delivery lag, engine
//! metrics as of its own last scrape and, with booking sync, the other replicas' bookings and
//! releases after the broker's lag. Arrivals are dealt round-robin across replicas.
//!
//! It never looks into an engine: `fleet.rs` hands it what the engines published, so a replica
//! can only know what a live one could.

use super::events::{Event, EventQueue};
use pdgate_scheduler::{
    BlockHash, Booking, Decision, InstanceId, InstanceSpec, Observed, Rejection, RequestKey, Role,
    Scheduler, SchedulerConfig, Ticket,
};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct GatewaySpec {
    /// Interchangeable gateway replicas; requests are dealt round-robin across them.
    pub replicas: usize,
    /// Whether the engines publish KV events to every replica (vLLM's `--kv-events-config`);
    /// without them a replica knows only the prefixes it routed itself (approximate learning).
    pub kv_events: bool,
    /// From an engine's cache change to a replica's index applying it, ms: the engine publishes
    /// after its step, plus a LAN hop through the subscriber.
    pub event_lag_ms: f64,
    /// Booking sync between replicas through a broker, with this delivery lag in ms: each
    /// replica publishes its bookings and releases, the others apply them. `None`: no sync,
    /// each replica knows only its own bookings.
    pub sync_lag_ms: Option<f64>,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            kv_events: false,
            event_lag_ms: 5.0,
            sync_lag_ms: None,
        }
    }
}

/// One engine cache change as published: blocks stored, then blocks evicted.
#[derive(Debug)]
struct KvChange {
    instance: InstanceId,
    stored: Vec<BlockHash>,
    removed: Vec<BlockHash>,
}

/// What a replica publishes for the others, naming its own ticket.
#[derive(Debug)]
enum Sync {
    Booked(Booking, Vec<BlockHash>),
    PrefillDone(Option<Observed>),
    DecodeDone,
}

pub struct Gateways {
    replicas: Vec<Scheduler>,
    next: usize,
    kv_events: bool,
    lag_ms: f64,
    sync_lag_ms: Option<f64>,
    /// Published, not yet delivered. Every change takes the same lag, so they arrive in order.
    kv_in_transit: VecDeque<KvChange>,
    sync_in_transit: VecDeque<(usize, Ticket, Sync)>,
    /// Per replica: (origin replica, origin's ticket) → the ticket its synced copy booked.
    synced: Vec<HashMap<(usize, Ticket), Ticket>>,
}

fn at(ms: f64) -> Duration {
    Duration::from_secs_f64(ms.max(0.0) / 1e3)
}

impl Gateways {
    pub fn new(spec: &GatewaySpec, cfg: &SchedulerConfig) -> Self {
        let n = spec.replicas.max(1);
        Self {
            replicas: (0..n).map(|_| Scheduler::new(cfg.clone())).collect(),
            next: 0,
            kv_events: spec.kv_events,
            lag_ms: spec.event_lag_ms.max(0.0),
            sync_lag_ms: spec.sync_lag_ms.map(|l| l.max(0.0)),
            kv_in_transit: VecDeque::new(),
            sync_in_transit: VecDeque::new(),
            synced: vec![HashMap::new(); n],
        }
    }

    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// Registers an instance on every replica; ids agree because every replica adds the same
    /// instances in the same order (as replicas with one config do).
    pub fn add_instance(&mut self, role: Role) -> InstanceId {
        let mut id = InstanceId(0);
        for s in &mut self.replicas {
            // The gateway registers instances with an unknown size and learns the decode pool's
            // from its metrics (`num_gpu_blocks`); the scrapes do the same here.
            // The simulator's engines take the evict-first mark, as the reference engine does.
            let spec = InstanceSpec {
                marks_copies: true,
                ..InstanceSpec::default()
            };
            id = s.add_instance(role, spec);
        }
        id
    }

    /// The replica the load balancer hands the next request to.
    pub fn deal(&mut self) -> usize {
        let r = self.next % self.replicas.len();
        self.next += 1;
        r
    }

    /// Replica `r`'s `ttft_slack_ms` for a request that has waited `waited_ms`.
    pub fn ttft_slack_ms(
        &mut self,
        r: usize,
        key: &RequestKey,
        now_ms: f64,
        waited_ms: f64,
    ) -> f64 {
        self.replica(r)
            .ttft_slack_ms(key, at(now_ms), at(waited_ms))
    }

    pub fn replica(&mut self, r: usize) -> &mut Scheduler {
        let n = self.replicas.len();
        &mut self.replicas[r % n]
    }

    /// Replica `r` routes a request; with sync on, the booking goes out to the others.
    /// Schedules on replica `r` a request that has waited `waited_ms` for KV room so far.
    pub fn schedule(
        &mut self,
        r: usize,
        key: &RequestKey,
        now_ms: f64,
        waited_ms: f64,
        q: &mut EventQueue,
    ) -> Result<Decision, Rejection> {
        let d = self
            .replica(r)
            .schedule_after_wait(key, at(now_ms), &[], at(waited_ms))?;
        if self.sync_lag_ms.is_some() {
            if let Some(b) = self.replica(r).booking(d.ticket, at(now_ms)) {
                self.send(r, d.ticket, Sync::Booked(b, key.blocks.clone()), now_ms, q);
            }
        }
        Ok(d)
    }

    pub fn prefill_done(
        &mut self,
        r: usize,
        t: Ticket,
        now_ms: f64,
        observed: Option<Observed>,
        q: &mut EventQueue,
    ) {
        self.replica(r).prefill_done(t, at(now_ms), observed);
        self.send(r, t, Sync::PrefillDone(observed), now_ms, q);
    }

    pub fn decode_done(&mut self, r: usize, t: Ticket, now_ms: f64, q: &mut EventQueue) {
        self.replica(r).decode_done(t, at(now_ms));
        self.send(r, t, Sync::DecodeDone, now_ms, q);
    }

    fn send(&mut self, origin: usize, t: Ticket, msg: Sync, now_ms: f64, q: &mut EventQueue) {
        match self.sync_lag_ms {
            None => {}
            Some(0.0) => self.apply_sync(origin, t, msg, now_ms),
            Some(lag) => {
                self.sync_in_transit.push_back((origin, t, msg));
                q.push(now_ms + lag, Event::SyncDelivered);
            }
        }
    }

    /// The oldest sync message in transit reaches the other replicas.
    pub fn deliver_sync(&mut self, now_ms: f64) {
        if let Some((origin, t, msg)) = self.sync_in_transit.pop_front() {
            self.apply_sync(origin, t, msg, now_ms);
        }
    }

    fn apply_sync(&mut self, origin: usize, t: Ticket, msg: Sync, now_ms: f64) {
        let now = at(now_ms);
        for (r, s) in self.replicas.iter_mut().enumerate() {
            if r == origin {
                continue;
            }
            let map = &mut self.synced[r];
            match &msg {
                Sync::Booked(b, blocks) => {
                    map.insert((origin, t), s.book_synced(b, blocks, now));
                }
                Sync::PrefillDone(o) => {
                    if let Some(local) = map.get(&(origin, t)) {
                        s.prefill_done(*local, now, *o);
                    }
                }
                Sync::DecodeDone => {
                    if let Some(local) = map.remove(&(origin, t)) {
                        s.decode_done(local, now);
                    }
                }
            }
        }
    }

    /// An engine's cache changed at `now_ms`: the change reaches every replica after the lag.
    pub fn publish_kv(
        &mut self,
        instance: InstanceId,
        stored: Vec<BlockHash>,
        removed: Vec<BlockHash>,
        now_ms: f64,
        q: &mut EventQueue,
    ) {
        if !self.kv_events || (stored.is_empty() && removed.is_empty()) {
            return;
        }
        let change = KvChange {
            instance,
            stored,
            removed,
        };
        if self.lag_ms == 0.0 {
            self.apply_kv(&change, now_ms);
        } else {
            self.kv_in_transit.push_back(change);
            q.push(now_ms + self.lag_ms, Event::KvEvents);
        }
    }

    /// The oldest change in transit reaches every replica.
    pub fn deliver_kv(&mut self, now_ms: f64) {
        if let Some(change) = self.kv_in_transit.pop_front() {
            self.apply_kv(&change, now_ms);
        }
    }

    fn apply_kv(&mut self, c: &KvChange, now_ms: f64) {
        for s in &mut self.replicas {
            if !c.stored.is_empty() {
                s.blocks_stored(c.instance, &c.stored, at(now_ms));
            }
            if !c.removed.is_empty() {
                s.blocks_removed(c.instance, &c.removed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdgate_scheduler::PolicyKind;

    fn gateways(kv_events: bool, sync_lag_ms: Option<f64>) -> (Gateways, InstanceId) {
        let spec = GatewaySpec {
            replicas: 2,
            kv_events,
            event_lag_ms: 5.0,
            sync_lag_ms,
        };
        let mut g = Gateways::new(
            &spec,
            &SchedulerConfig {
                policy: PolicyKind::LeastLoad,
                ..SchedulerConfig::default()
            },
        );
        let p = g.add_instance(Role::Prefill);
        g.add_instance(Role::Decode);
        (g, p)
    }

    fn blocks(n: u64) -> Vec<BlockHash> {
        (1..=n).map(BlockHash).collect()
    }

    #[test]
    fn kv_events_reach_every_replica_after_the_lag_and_in_order() {
        let (mut g, p) = gateways(true, None);
        let mut q = EventQueue::default();
        g.publish_kv(p, blocks(8), vec![], 0.0, &mut q);
        g.publish_kv(p, vec![], blocks(8), 1.0, &mut q);
        assert_eq!(g.replica(1).index_bytes(), 0, "nothing before the lag");
        assert_eq!(q.pop(), Some((5.0, Event::KvEvents)));
        g.deliver_kv(5.0);
        for r in 0..2 {
            assert_eq!(g.replica(r).index_bytes(), 8 * 64, "replica {r}");
        }
        assert_eq!(q.pop(), Some((6.0, Event::KvEvents)));
        g.deliver_kv(6.0);
        assert_eq!(g.replica(0).index_bytes(), 0, "the eviction follows");
    }

    #[test]
    fn without_kv_events_nothing_is_published() {
        let (mut g, p) = gateways(false, None);
        let mut q = EventQueue::default();
        g.publish_kv(p, blocks(8), vec![], 0.0, &mut q);
        assert!(q.is_empty());
        assert_eq!(g.replica(0).index_bytes(), 0);
    }

    #[test]
    fn bookings_and_releases_reach_the_other_replicas_after_the_sync_lag() {
        let mut q = EventQueue::default();
        let key = RequestKey {
            prompt_tokens: 64,
            max_tokens: 8,
            blocks: blocks(4),
        };
        let (mut g, _) = gateways(false, Some(2.0));
        let d = g.schedule(0, &key, 0.0, 0.0, &mut q).expect("pair");
        assert_eq!((g.replica(0).in_flight(), g.replica(1).in_flight()), (1, 0));
        assert_eq!(q.pop(), Some((2.0, Event::SyncDelivered)));
        g.deliver_sync(2.0);
        assert_eq!(g.replica(1).in_flight(), 1, "the booking arrived");
        g.decode_done(0, d.ticket, 3.0, &mut q);
        assert_eq!(g.replica(1).in_flight(), 1, "the release is in flight");
        assert_eq!(q.pop(), Some((5.0, Event::SyncDelivered)));
        g.deliver_sync(5.0);
        assert_eq!(g.replica(1).in_flight(), 0, "and released");

        let (mut g, _) = gateways(false, None);
        g.schedule(0, &key, 0.0, 0.0, &mut q).expect("pair");
        assert!(q.is_empty(), "no sync: nothing sent");
        assert_eq!(g.replica(1).in_flight(), 0);
    }
}
