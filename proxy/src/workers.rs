//! The worker registry: every engine instance the gateway fronts, its role, URL, protocol and
//! health, keyed by the scheduler's `InstanceId`. The scheduler holds the load; this holds the
//! addresses, health and circuit breakers. Adding or removing a worker updates both under one
//! call. A removed worker leaves the scheduler at once (nothing new goes to it) while the
//! requests holding it finish; it is listed as draining until the last of them lets go.

use crate::breaker::{Breaker, BreakerConfig, Outcome, Transition};
use crate::config::{Protocol, WorkerConfig};
use parking_lot::{Mutex, RwLock};
use pdgate_scheduler::{InstanceId, InstanceLoad, InstanceSpec, Role, Scheduler};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

#[derive(Debug)]
pub struct Worker {
    pub id: InstanceId,
    pub url: String,
    pub role: Role,
    pub protocol: Protocol,
    /// Where a push-mode prefill's bootstrap server listens (SGLang, vLLM Mooncake): the URL's
    /// host, and the configured `bootstrap_port` or else the URL's port. Resolved once here.
    pub bootstrap_host: String,
    pub bootstrap_port: u16,
    /// `http://{bootstrap_host}:{bootstrap_port}`, as vLLM Mooncake legs name it.
    pub bootstrap_url: String,
    /// A vLLM Mooncake prefill's engine id (data-parallel rank 0), learnt from its bootstrap
    /// server on first use.
    pub engine_id: Mutex<Option<String>>,
    /// The engine's KV events endpoints (`tcp://host:port`), when it publishes them.
    pub kv_events: Option<String>,
    pub kv_events_replay: Option<String>,
    pub health: Mutex<HealthState>,
    pub breaker: Mutex<Breaker>,
    /// Removed from the fleet: no longer counted among the tripped breakers. Written under the
    /// breaker's lock, so a transition and a removal never both adjust the count.
    retired: AtomicBool,
}

/// Health with hysteresis: counts of consecutive results decide flips.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct HealthState {
    pub healthy: bool,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
}

#[derive(Debug, Serialize)]
pub struct WorkerView {
    pub id: u32,
    pub role: Role,
    pub url: String,
    pub protocol: &'static str,
    pub healthy: bool,
    /// `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    /// `active`; `draining`: removed, with requests still finishing on it; `removed` (only in
    /// the answer to the DELETE that removed it, when no request held it).
    pub state: &'static str,
    pub load: InstanceLoad,
}

#[derive(Default)]
pub struct Workers {
    by_id: RwLock<BTreeMap<InstanceId, Arc<Worker>>>,
    /// Breakers not closed, so the common case (all closed) skips the per-worker scan.
    tripped: AtomicUsize,
    /// Removed workers, alive while some request still holds them: what `views` shows as
    /// draining. Pruned on every removal and view, so it stays as long as the requests in flight.
    draining: Mutex<Vec<Weak<Worker>>>,
}

impl Workers {
    /// Registers a worker, unhealthy until its first health check passes.
    pub fn add(&self, sched: &Mutex<Scheduler>, cfg: &WorkerConfig) -> Arc<Worker> {
        let mut s = sched.lock();
        let spec = InstanceSpec {
            // Only the reference engine's native protocol carries the evict-first mark.
            marks_copies: cfg.protocol == Protocol::Native,
            ..InstanceSpec::default()
        };
        let id = s.add_instance(cfg.role, spec);
        s.set_healthy(id, false);
        let url = cfg.url.trim_end_matches('/').to_string();
        let (bootstrap_host, http_port) = host_port(&url);
        let bootstrap_port = cfg.bootstrap_port.unwrap_or(http_port);
        let w = Arc::new(Worker {
            id,
            role: cfg.role,
            protocol: cfg.protocol,
            bootstrap_url: format!("http://{bootstrap_host}:{bootstrap_port}"),
            bootstrap_host,
            bootstrap_port,
            engine_id: Mutex::new(None),
            kv_events: cfg.kv_events.clone(),
            kv_events_replay: cfg.kv_events_replay.clone(),
            url,
            health: Mutex::new(HealthState::default()),
            breaker: Mutex::new(Breaker::default()),
            retired: AtomicBool::new(false),
        });
        self.by_id.write().insert(id, Arc::clone(&w));
        w
    }

    /// Takes a worker out of the fleet and frees its scheduler state (load, prefix-index
    /// entries); requests already holding it finish on it. `None`: no such worker.
    pub fn remove(&self, sched: &Mutex<Scheduler>, id: InstanceId) -> Option<Arc<Worker>> {
        // Scheduler first: once the worker is gone from both, no decision can name it.
        sched.lock().remove_instance(id);
        let w = self.by_id.write().remove(&id)?;
        {
            let b = w.breaker.lock();
            w.retired.store(true, Ordering::Release);
            if b.label() != "closed" {
                self.tripped.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let mut draining = self.draining.lock();
        draining.retain(|d| d.strong_count() > 0);
        draining.push(Arc::downgrade(&w));
        Some(w)
    }

    pub fn get(&self, id: InstanceId) -> Option<Arc<Worker>> {
        self.by_id.read().get(&id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Worker>> {
        self.by_id.read().values().cloned().collect()
    }

    /// The workers of the fleet, then those draining.
    pub fn views(&self, sched: &Mutex<Scheduler>) -> Vec<WorkerView> {
        let draining: Vec<Arc<Worker>> = {
            let mut d = self.draining.lock();
            d.retain(|w| w.strong_count() > 0);
            d.iter().filter_map(Weak::upgrade).collect()
        };
        let s = sched.lock();
        let view = |w: &Worker, state| WorkerView {
            id: w.id.0,
            role: w.role,
            url: w.url.clone(),
            protocol: w.protocol.as_str(),
            healthy: w.health.lock().healthy,
            breaker: w.breaker.lock().label(),
            state,
            load: s.load(w.id).unwrap_or_default(),
        };
        let mut out: Vec<WorkerView> = self.all().iter().map(|w| view(w, "active")).collect();
        out.extend(draining.iter().map(|w| view(w, "draining")));
        out
    }

    /// The worker of `role` at `url` (trailing `/` ignored), if one is in the fleet.
    pub fn find(&self, role: Role, url: &str) -> Option<Arc<Worker>> {
        let url = url.trim_end_matches('/');
        self.by_id
            .read()
            .values()
            .find(|w| w.role == role && w.url == url)
            .cloned()
    }

    /// Appends the workers whose breaker admits no new request at `now` to `avoid`.
    pub fn add_tripped(&self, now: Duration, avoid: &mut Vec<InstanceId>) {
        if self.tripped.load(Ordering::Acquire) == 0 {
            return;
        }
        // A snapshot: `note` reads the map again, and a recursive read could deadlock behind a
        // waiting writer (`add`).
        for w in self.all() {
            let (admits, t) = {
                let mut b = w.breaker.lock();
                let (admits, t) = b.admits(now);
                self.count(&w, t);
                (admits, t)
            };
            self.note(&w, t);
            if !admits && !avoid.contains(&w.id) {
                avoid.push(w.id);
            }
        }
    }

    /// Claims a scheduled worker's breaker (the one probe of a half-open breaker); `false`: another
    /// request holds the probe or the breaker opened since scheduling.
    pub fn claim(&self, w: &Worker, now: Duration) -> bool {
        let (ok, t) = {
            let mut b = w.breaker.lock();
            let (ok, t) = b.claim(now);
            self.count(w, t);
            (ok, t)
        };
        self.note(w, t);
        ok
    }

    /// `w` passed its health checks again after being down: an open breaker turns half-open
    /// (`Breaker::health_recovered`).
    pub fn health_recovered(&self, w: &Worker) {
        let t = {
            let mut b = w.breaker.lock();
            let t = b.health_recovered();
            self.count(w, t);
            t
        };
        self.note(w, t);
    }

    /// Folds the outcome of a leg `w` served into its breaker.
    pub fn record(&self, w: &Worker, outcome: Outcome, now: Duration, cfg: &BreakerConfig) {
        let t = {
            let mut b = w.breaker.lock();
            let t = b.record(outcome, now, cfg);
            self.count(w, t);
            t
        };
        self.note(w, t);
    }

    /// Keeps `tripped` in step with a transition; called under `w`'s breaker lock, like the
    /// removal that retires it.
    fn count(&self, w: &Worker, t: Option<Transition>) {
        if w.retired.load(Ordering::Acquire) {
            return;
        }
        match t {
            Some(Transition::Opened) => {
                self.tripped.fetch_add(1, Ordering::AcqRel);
            }
            Some(Transition::Closed) => {
                self.tripped.fetch_sub(1, Ordering::AcqRel);
            }
            Some(Transition::Reopened | Transition::HalfOpened) | None => {}
        }
    }

    fn note(&self, w: &Worker, t: Option<Transition>) {
        let Some(t) = t else { return };
        let open_now = self
            .by_id
            .read()
            .values()
            .filter(|o| o.role == w.role && o.breaker.lock().label() != "closed")
            .count();
        match t {
            Transition::Opened | Transition::Reopened => {
                tracing::warn!(worker = %w.url, role = %w.role, "circuit breaker opened")
            }
            Transition::HalfOpened => {
                tracing::info!(worker = %w.url, role = %w.role, "circuit breaker half-open: one probe")
            }
            Transition::Closed => {
                tracing::info!(worker = %w.url, role = %w.role, "circuit breaker closed")
            }
        }
        crate::metrics::breaker(w.role, t.as_str(), open_now);
    }
}

impl Worker {
    /// Folds one health result in; returns the new health when it flipped.
    pub fn observe(&self, ok: bool, fail_threshold: u32, recover_threshold: u32) -> Option<bool> {
        let mut h = self.health.lock();
        if ok {
            h.consecutive_successes = h.consecutive_successes.saturating_add(1);
            h.consecutive_failures = 0;
            if !h.healthy && h.consecutive_successes >= recover_threshold.max(1) {
                h.healthy = true;
                return Some(true);
            }
        } else {
            h.consecutive_failures = h.consecutive_failures.saturating_add(1);
            h.consecutive_successes = 0;
            if h.healthy && h.consecutive_failures >= fail_threshold.max(1) {
                h.healthy = false;
                return Some(false);
            }
        }
        None
    }
}

/// `(host, port)` of an `http://host:port` URL (port 80 when absent).
pub fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(80)),
        None => (authority.to_string(), 80),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_flips_only_after_thresholds() {
        let sched = Mutex::new(Scheduler::new(Default::default()));
        let workers = Workers::default();
        let w = workers.add(
            &sched,
            &WorkerConfig {
                url: "http://x/".into(),
                role: Role::Decode,
                protocol: Protocol::Native,
                bootstrap_port: None,
                kv_events: None,
                kv_events_replay: None,
            },
        );
        assert_eq!(w.url, "http://x");
        assert!(!sched.lock().is_healthy(w.id), "unknown until checked");
        assert_eq!(w.observe(true, 2, 2), None);
        assert_eq!(w.observe(true, 2, 2), Some(true));
        assert_eq!(w.observe(false, 2, 2), None);
        assert_eq!(w.observe(true, 2, 2), None, "a pass resets the failure run");
        assert_eq!(w.observe(false, 2, 2), None);
        assert_eq!(w.observe(false, 2, 2), Some(false));
    }
}
