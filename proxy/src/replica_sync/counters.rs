//! Booking sync's metrics. Every label value comes from a fixed set of names.

use super::ledger::Expired;
use metrics::{counter, gauge};

/// `pdgate_replica_sync_messages_total{direction="out"|"in", outcome}`: outcomes are fixed
/// names (`published`, `publish_failed`, `dropped_queue_full`, `own`, `alive`, `booked`,
/// `released`, `unknown_worker`, `unknown_booking`, `malformed`, …).
pub fn message(direction: &'static str, outcome: &'static str) {
    counter!("pdgate_replica_sync_messages_total", "direction" => direction, "outcome" => outcome)
        .increment(1);
}

pub fn expired(e: Expired) {
    for (reason, n) in [("ttl", e.ttl), ("replica_gone", e.replica_gone)] {
        if n > 0 {
            counter!("pdgate_replica_sync_expired_total", "reason" => reason).increment(n as u64);
        }
    }
}

/// Other replicas' bookings held now.
pub fn held(n: usize) {
    gauge!("pdgate_replica_sync_bookings").set(n as f64);
}

pub fn connected(up: bool) {
    gauge!("pdgate_replica_sync_connected").set(if up { 1.0 } else { 0.0 });
}
