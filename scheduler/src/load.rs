//! Load of one instance as the scheduler models it: what the gateway booked on it (exact, kept by
//! the scheduler itself) plus what the engine last reported through its metrics (polled).

use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct InstanceLoad {
    /// Requests with a leg on this instance not yet finished.
    pub in_flight: u32,
    /// Uncached prompt tokens booked for prefill here and not yet prefilled.
    pub prefill_tokens: u64,
    /// Sequences booked to decode here (including those whose prefill is still running).
    pub decode_seqs: u32,
    /// Context tokens of those sequences (prompt plus expected output).
    pub decode_tokens: u64,
    /// KV blocks those sequences occupy.
    pub decode_blocks: u64,
    /// KV blocks the engine reported in use beyond what the gateway had booked on it then
    /// (another gateway's requests, work it runs on its own). Kept apart from the bookings so a
    /// release the gateway sees between two reports frees its blocks at once.
    pub foreign_blocks: u64,
    /// What the engine itself last reported, if it is scraped.
    pub engine: Option<EngineReport>,
}

/// Load an engine reports about itself (vLLM's `/metrics` names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct EngineReport {
    pub waiting: u32,
    pub running: u32,
    /// KV-cache usage, 0..=1.
    pub kv_usage: f64,
}

impl InstanceLoad {
    /// Requests the instance is busy with: the larger of the gateway's count and the engine's.
    pub fn requests(&self) -> u32 {
        let engine = self.engine.map_or(0, |e| e.waiting + e.running);
        self.in_flight.max(engine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_takes_the_larger_view() {
        let mut l = InstanceLoad {
            in_flight: 3,
            ..InstanceLoad::default()
        };
        assert_eq!(l.requests(), 3);
        l.engine = Some(EngineReport {
            waiting: 4,
            running: 2,
            kv_usage: 0.5,
        });
        assert_eq!(
            l.requests(),
            6,
            "another gateway's requests show up in the engine's numbers"
        );
    }
}
