//! The gateway side of the simulated fleet: one or more replicas of the real scheduler, each fed
//! only what a `pdgate serve` replica behind a load balancer would see — the load it booked
//! itself, the engines' KV events (blocks stored and evicted) after a delivery lag, and engine
//! metrics as of its own last scrape. Arrivals are dealt round-robin across replicas.
//!
//! It never looks into an engine: `fleet.rs` hands it what the engines published, so a replica
//! can only know what a live one could.

use pdgate_scheduler::{BlockHash, InstanceId, InstanceSpec, Role, Scheduler, SchedulerConfig};
use std::collections::VecDeque;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct GatewaySpec {
    /// Interchangeable gateway replicas; requests are dealt round-robin across them.
    pub replicas: usize,
    /// Whether the engines publish KV events to every replica (vLLM's `--kv-events-config`);
    /// without them a replica knows only the prefixes it routed itself (approximate learning).
    pub kv_events: bool,
    /// From an engine's cache change to a replica's index applying it, ms: the engine publishes
    /// after its step, plus a loopback/LAN hop through the subscriber.
    pub event_lag_ms: f64,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            kv_events: false,
            event_lag_ms: 5.0,
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

pub struct Gateways {
    replicas: Vec<Scheduler>,
    next: usize,
    kv_events: bool,
    lag_ms: f64,
    /// Published, not yet delivered. Every change takes the same lag, so they arrive in order.
    in_transit: VecDeque<KvChange>,
}

impl Gateways {
    pub fn new(spec: &GatewaySpec, cfg: &SchedulerConfig) -> Self {
        Self {
            replicas: (0..spec.replicas.max(1))
                .map(|_| Scheduler::new(cfg.clone()))
                .collect(),
            next: 0,
            kv_events: spec.kv_events,
            lag_ms: spec.event_lag_ms.max(0.0),
            in_transit: VecDeque::new(),
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
            id = s.add_instance(role, InstanceSpec::default());
        }
        id
    }

    /// The replica the load balancer hands the next request to.
    pub fn deal(&mut self) -> usize {
        let r = self.next % self.replicas.len();
        self.next += 1;
        r
    }

    pub fn replica(&mut self, r: usize) -> &mut Scheduler {
        let n = self.replicas.len();
        &mut self.replicas[r % n]
    }

    /// An engine's cache changed at `now_ms`. Returns when the change reaches the replicas if
    /// the caller must deliver it later (`deliver`); with no lag it is applied at once.
    pub fn publish(
        &mut self,
        instance: InstanceId,
        stored: Vec<BlockHash>,
        removed: Vec<BlockHash>,
        now_ms: f64,
    ) -> Option<f64> {
        if !self.kv_events || (stored.is_empty() && removed.is_empty()) {
            return None;
        }
        let change = KvChange {
            instance,
            stored,
            removed,
        };
        if self.lag_ms == 0.0 {
            self.apply(&change, now_ms);
            return None;
        }
        self.in_transit.push_back(change);
        Some(now_ms + self.lag_ms)
    }

    /// The oldest change in transit reaches every replica.
    pub fn deliver(&mut self, now_ms: f64) {
        if let Some(change) = self.in_transit.pop_front() {
            self.apply(&change, now_ms);
        }
    }

    fn apply(&mut self, c: &KvChange, now_ms: f64) {
        let now = Duration::from_secs_f64(now_ms.max(0.0) / 1e3);
        for s in &mut self.replicas {
            if !c.stored.is_empty() {
                s.blocks_stored(c.instance, &c.stored, now);
            }
            if !c.removed.is_empty() {
                s.blocks_removed(c.instance, &c.removed);
            }
        }
    }
}
