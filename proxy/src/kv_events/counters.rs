//! The KV event subscribers' metrics: names `pdgate_kv_events_*`, labels from fixed sets.

use pdgate_wire::kv_events::{EventBatch, KvEvent};

/// Counts a decoded batch's events by kind and, for live ones, the lag from the engine's
/// timestamp to now (both clocks are wall clocks; a skewed engine clock shows up here).
pub fn record_batch(batch: &EventBatch, live: bool) {
    let mut n = [0u64; 3];
    for e in &batch.events {
        n[match e {
            KvEvent::BlockStored(_) => 0,
            KvEvent::BlockRemoved { .. } => 1,
            KvEvent::AllBlocksCleared => 2,
        }] += 1;
    }
    for (kind, count) in ["stored", "removed", "cleared"].into_iter().zip(n) {
        if count > 0 {
            metrics::counter!("pdgate_kv_events_total", "kind" => kind).increment(count);
        }
    }
    if live {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        metrics::histogram!("pdgate_kv_events_lag_seconds").record((now - batch.ts).max(0.0));
    }
}

pub fn metric_decode_error(part: &'static str) {
    metrics::counter!("pdgate_kv_events_decode_errors_total", "part" => part).increment(1);
}

pub fn metric_gap() {
    metrics::counter!("pdgate_kv_events_gaps_total").increment(1);
}

pub fn metric_replay(outcome: &'static str) {
    metrics::counter!("pdgate_kv_events_replays_total", "outcome" => outcome).increment(1);
}

pub fn metric_lost(reason: &'static str) {
    metrics::counter!("pdgate_kv_events_resets_total", "reason" => reason).increment(1);
}
