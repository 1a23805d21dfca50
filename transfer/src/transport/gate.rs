//! Admission on a transfer listener: what bounds the connections a listener
//! holds, so sockets that never authenticate cannot starve real peers.
//!
//! A connection is *pending* from accept until its handshake completes (or,
//! on an engine without a secret, until its first bytes arrive), then
//! *established*. Pending connections are few and short-lived: each has a
//! deadline, and when there are too many (in total, or from one host) the
//! oldest is cancelled to make room for the newcomer. Evicting the oldest,
//! not refusing the newest, is what keeps a real peer's handshake (one round
//! trip, well under a millisecond on a LAN) from being locked out by idle
//! sockets that arrived before it. Established connections are capped in
//! total and per host; beyond the cap a peer is told "busy" and closed.
//!
//! This module only counts and signals; it never touches a socket.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Handshakes in flight on one listener. A real handshake takes one round
/// trip, so evicting it takes this many newer connections within that round
/// trip; idle sockets only ever hold these slots until they are evicted.
pub(crate) const MAX_PENDING: usize = 256;
/// Handshakes in flight from one host; its oldest is evicted beyond this.
/// Large enough for the bursts a host's engines open at once (each submit
/// opens up to `connections_per_peer` connections per owner).
pub(crate) const MAX_PENDING_PER_HOST: usize = 64;
/// Authenticated connections served at once on one listener.
pub(crate) const MAX_ESTABLISHED: usize = 1024;
/// Authenticated connections from one host. A submitter pools at most
/// `connections_per_peer` (4 by default) per owner plus as many in flight,
/// so this leaves room for dozens of engines on one host.
pub(crate) const MAX_ESTABLISHED_PER_HOST: usize = 512;
/// Default deadline from accept to a completed handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// How an inbound connection's admission handshake ended: the `outcome`
/// label of `pdgate_transfer_handshakes_total`, a fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeOutcome {
    /// Handshake completed (without a secret: the first bytes arrived).
    Accepted,
    /// The peer's proof of the fleet secret was wrong.
    BadMac,
    /// The peer sent a frame without authenticating.
    NoHandshake,
    /// Not a handshake message of this version.
    Malformed,
    /// The peer closed or broke the connection mid-handshake (a client
    /// with another secret does this after checking our proof).
    Aborted,
    /// The TLS handshake failed: no certificate, one from another CA, or
    /// not TLS at all.
    Tls,
    /// No completed handshake within the deadline.
    Deadline,
    /// Cancelled to make room for a newer pending connection.
    Evicted,
}

impl HandshakeOutcome {
    pub const ALL: [HandshakeOutcome; 8] = [
        HandshakeOutcome::Accepted,
        HandshakeOutcome::BadMac,
        HandshakeOutcome::NoHandshake,
        HandshakeOutcome::Malformed,
        HandshakeOutcome::Aborted,
        HandshakeOutcome::Tls,
        HandshakeOutcome::Deadline,
        HandshakeOutcome::Evicted,
    ];

    pub fn label(self) -> &'static str {
        match self {
            HandshakeOutcome::Accepted => "accepted",
            HandshakeOutcome::BadMac => "bad_mac",
            HandshakeOutcome::NoHandshake => "no_handshake",
            HandshakeOutcome::Malformed => "malformed",
            HandshakeOutcome::Aborted => "aborted",
            HandshakeOutcome::Tls => "tls",
            HandshakeOutcome::Deadline => "deadline",
            HandshakeOutcome::Evicted => "evicted",
        }
    }

    /// A refusal of the peer (as opposed to a deadline or an eviction).
    fn is_refusal(self) -> bool {
        matches!(
            self,
            HandshakeOutcome::BadMac
                | HandshakeOutcome::NoHandshake
                | HandshakeOutcome::Malformed
                | HandshakeOutcome::Aborted
                | HandshakeOutcome::Tls
        )
    }
}

/// Metric names, shared by the facade (process-wide, for whichever
/// exporter the process installed) and [`AdmissionStats::render_prometheus`]
/// (one engine's own figures).
pub const METRIC_HANDSHAKES: &str = "pdgate_transfer_handshakes_total";
pub const METRIC_CAP_REFUSALS: &str = "pdgate_transfer_connections_refused_total";
pub const METRIC_OPEN: &str = "pdgate_transfer_connections_open";

/// Why connections to an engine's transfer listeners were closed, and how
/// many were admitted: totals since the engine started, over its TCP port
/// and its shm commit socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Connections that completed the handshake (or, without a secret,
    /// sent their first bytes) and were served.
    pub admitted: u64,
    /// Closed for failing the handshake: no handshake at all (a frame
    /// first), a malformed one, a wrong proof, a TLS failure, or a close
    /// mid-handshake.
    pub refused: u64,
    /// Closed for not finishing the handshake within the deadline.
    pub timed_out: u64,
    /// Pending handshakes cancelled to make room for newer connections.
    pub evicted: u64,
    /// Authenticated but closed because the listener was at its cap.
    pub over_capacity: u64,
    /// Of `over_capacity`: closed by the per-host cap.
    pub over_peer_cap: u64,
    /// Authenticated connections being served now.
    pub open: u64,
    /// Handshakes by outcome, in [`HandshakeOutcome::ALL`] order.
    handshakes: [u64; 8],
}

impl AdmissionStats {
    /// Handshakes that ended with `outcome`.
    pub fn handshakes(&self, outcome: HandshakeOutcome) -> u64 {
        HandshakeOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.handshakes[i])
    }

    /// These figures in Prometheus text format, under the names the facade
    /// uses, for a `/metrics` that reports one engine (several engines may
    /// share a process, and the facade's recorder is process-wide).
    pub fn render_prometheus(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(1024);
        let _ = writeln!(
            out,
            "# HELP {METRIC_HANDSHAKES} Inbound transfer connections by how their admission handshake ended.\n# TYPE {METRIC_HANDSHAKES} counter"
        );
        for o in HandshakeOutcome::ALL {
            let _ = writeln!(
                out,
                "{METRIC_HANDSHAKES}{{outcome=\"{}\"}} {}",
                o.label(),
                self.handshakes(o)
            );
        }
        let _ = writeln!(
            out,
            "# HELP {METRIC_CAP_REFUSALS} Authenticated transfer connections closed at a connection cap.\n# TYPE {METRIC_CAP_REFUSALS} counter"
        );
        let per_listener = self.over_capacity - self.over_peer_cap;
        for (reason, n) in [
            ("peer_cap", self.over_peer_cap),
            ("listener_cap", per_listener),
        ] {
            let _ = writeln!(out, "{METRIC_CAP_REFUSALS}{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP {METRIC_OPEN} Authenticated transfer connections being served.\n# TYPE {METRIC_OPEN} gauge\n{METRIC_OPEN} {}",
            self.open
        );
        out
    }
}

/// Shared by an engine's listeners; read through
/// `TransferEngine::admission_stats`. Every count also goes to the `metrics`
/// facade.
#[derive(Default)]
pub(crate) struct Counters {
    admitted: AtomicU64,
    over_capacity: AtomicU64,
    over_peer_cap: AtomicU64,
    open: AtomicU64,
    handshakes: [AtomicU64; 8],
}

impl Counters {
    pub(crate) fn snapshot(&self) -> AdmissionStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let handshakes: [u64; 8] = std::array::from_fn(|i| get(&self.handshakes[i]));
        let sum = |pick: fn(HandshakeOutcome) -> bool| -> u64 {
            HandshakeOutcome::ALL
                .iter()
                .zip(handshakes)
                .filter(|(o, _)| pick(**o))
                .map(|(_, n)| n)
                .sum()
        };
        AdmissionStats {
            admitted: get(&self.admitted),
            refused: sum(HandshakeOutcome::is_refusal),
            timed_out: sum(|o| o == HandshakeOutcome::Deadline),
            evicted: sum(|o| o == HandshakeOutcome::Evicted),
            over_capacity: get(&self.over_capacity),
            over_peer_cap: get(&self.over_peer_cap),
            open: get(&self.open),
            handshakes,
        }
    }

    pub(crate) fn handshake(&self, outcome: HandshakeOutcome) {
        if let Some(i) = HandshakeOutcome::ALL.iter().position(|o| *o == outcome) {
            self.handshakes[i].fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!(METRIC_HANDSHAKES, "outcome" => outcome.label()).increment(1);
    }

    fn over_capacity(&self, per_host: bool) {
        self.over_capacity.fetch_add(1, Ordering::Relaxed);
        if per_host {
            self.over_peer_cap.fetch_add(1, Ordering::Relaxed);
        }
        let reason = if per_host { "peer_cap" } else { "listener_cap" };
        metrics::counter!(METRIC_CAP_REFUSALS, "reason" => reason).increment(1);
    }

    fn opened(&self) {
        self.admitted.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(METRIC_OPEN).increment(1.0);
    }

    fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(METRIC_OPEN).decrement(1.0);
    }
}

/// The bounds one listener enforces (constants in production; small ones
/// in tests).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub pending: usize,
    pub pending_per_host: usize,
    pub established: usize,
    pub established_per_host: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            pending: MAX_PENDING,
            pending_per_host: MAX_PENDING_PER_HOST,
            established: MAX_ESTABLISHED,
            established_per_host: MAX_ESTABLISHED_PER_HOST,
        }
    }
}

pub(crate) struct Gate {
    limits: Limits,
    state: Mutex<State>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Oldest first. Dropping an entry's sender is its eviction signal.
    pending: VecDeque<(u64, Arc<str>, oneshot::Sender<()>)>,
    pending_per_host: HashMap<Arc<str>, usize>,
    established: usize,
    established_per_host: HashMap<Arc<str>, usize>,
}

impl State {
    fn remove_pending(&mut self, at: usize) -> Option<()> {
        let (_, host, _signal) = self.pending.remove(at)?;
        decrement(&mut self.pending_per_host, &host);
        Some(())
    }
}

fn decrement(map: &mut HashMap<Arc<str>, usize>, host: &Arc<str>) {
    if let Some(n) = map.get_mut(host) {
        *n -= 1;
        if *n == 0 {
            map.remove(host);
        }
    }
}

impl Gate {
    pub(crate) fn new(limits: Limits, counters: Arc<Counters>) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            state: Mutex::new(State::default()),
            counters,
        })
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Registers a freshly accepted connection from `host` as pending,
    /// evicting the oldest pending one of the same host (or, if the listener
    /// is full, of any host) to make room.
    pub(crate) fn pending(self: &Arc<Self>, host: &str) -> Pending {
        let host: Arc<str> = host.into();
        let (tx, rx) = oneshot::channel();
        let mut st = self.state.lock();
        let from_host = st.pending_per_host.get(&host).copied().unwrap_or(0);
        let victim = if from_host >= self.limits.pending_per_host.max(1) {
            st.pending.iter().position(|(_, h, _)| *h == host)
        } else if st.pending.len() >= self.limits.pending.max(1) {
            Some(0)
        } else {
            None
        };
        if let Some(at) = victim {
            if st.remove_pending(at).is_some() {
                self.counters.handshake(HandshakeOutcome::Evicted);
            }
        }
        let id = st.next_id;
        st.next_id += 1;
        st.pending.push_back((id, host.clone(), tx));
        *st.pending_per_host.entry(host).or_insert(0) += 1;
        Pending {
            gate: self.clone(),
            id,
            evicted: rx,
        }
    }

    /// Takes an established slot for `host`; `None` at either cap (counted).
    pub(crate) fn establish(self: &Arc<Self>, host: &str) -> Option<Established> {
        let host: Arc<str> = host.into();
        let mut st = self.state.lock();
        let from_host = st.established_per_host.get(&host).copied().unwrap_or(0);
        let per_host = from_host >= self.limits.established_per_host;
        if per_host || st.established >= self.limits.established {
            drop(st);
            self.counters.over_capacity(per_host);
            return None;
        }
        st.established += 1;
        *st.established_per_host.entry(host.clone()).or_insert(0) += 1;
        drop(st);
        self.counters.opened();
        Some(Established {
            gate: self.clone(),
            host,
        })
    }

    #[cfg(test)]
    fn pending_count(&self) -> usize {
        self.state.lock().pending.len()
    }
}

/// A pending connection's place; dropped when its handshake ends either way.
pub(crate) struct Pending {
    gate: Arc<Gate>,
    id: u64,
    evicted: oneshot::Receiver<()>,
}

impl Pending {
    /// Resolves when a newer connection evicted this one.
    pub(crate) async fn evicted(&mut self) {
        // The sender is never used to send: only dropped, by eviction (or by
        // our own Drop, after which nobody polls this).
        let _ = (&mut self.evicted).await;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock();
        if let Some(at) = st.pending.iter().position(|(id, _, _)| *id == self.id) {
            st.remove_pending(at);
        }
    }
}

/// An established connection's slot, given back on drop.
pub(crate) struct Established {
    gate: Arc<Gate>,
    host: Arc<str>,
}

impl Drop for Established {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock();
        st.established -= 1;
        decrement(&mut st.established_per_host, &self.host);
        drop(st);
        self.gate.counters.closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(pending: usize, per_host: usize, established: usize, est_per_host: usize) -> Arc<Gate> {
        Gate::new(
            Limits {
                pending,
                pending_per_host: per_host,
                established,
                established_per_host: est_per_host,
            },
            Arc::default(),
        )
    }

    #[tokio::test]
    async fn the_oldest_pending_of_a_host_is_evicted_for_a_newcomer() {
        let g = gate(8, 2, 4, 4);
        let mut a1 = g.pending("a");
        let _a2 = g.pending("a");
        let _b1 = g.pending("b");
        // Third from host a: a1 (its oldest) goes, b1 stays.
        let _a3 = g.pending("a");
        tokio::time::timeout(Duration::from_secs(1), a1.evicted())
            .await
            .expect("a1 evicted");
        assert_eq!(g.pending_count(), 3);
        assert_eq!(g.counters().snapshot().evicted, 1);
    }

    #[tokio::test]
    async fn a_full_listener_evicts_its_oldest_and_a_finished_handshake_leaves() {
        let g = gate(2, 2, 4, 4);
        let mut a = g.pending("a");
        let b = g.pending("b");
        let mut c = g.pending("c");
        tokio::time::timeout(Duration::from_secs(1), a.evicted())
            .await
            .expect("a evicted");
        drop(b);
        assert_eq!(g.pending_count(), 1);
        let _d = g.pending("d");
        // Room was made by b leaving: c is not evicted.
        assert!(tokio::time::timeout(Duration::from_millis(50), c.evicted())
            .await
            .is_err());
    }

    #[test]
    fn established_slots_are_capped_in_total_and_per_host_and_given_back() {
        let g = gate(4, 4, 3, 2);
        let a1 = g.establish("a").unwrap();
        let _a2 = g.establish("a").unwrap();
        assert!(g.establish("a").is_none(), "per-host cap");
        let _b1 = g.establish("b").unwrap();
        assert!(g.establish("c").is_none(), "total cap");
        drop(a1);
        assert!(g.establish("c").is_some());
        let s = g.counters().snapshot();
        assert_eq!((s.admitted, s.over_capacity, s.over_peer_cap), (4, 2, 1));
        assert_eq!(s.open, 2, "a1 and c gave their slots back");
        let text = s.render_prometheus();
        assert!(text.contains("pdgate_transfer_connections_refused_total{reason=\"peer_cap\"} 1"));
        assert!(
            text.contains("pdgate_transfer_connections_refused_total{reason=\"listener_cap\"} 1")
        );
        assert!(text.contains("pdgate_transfer_connections_open 2"));
    }
}
