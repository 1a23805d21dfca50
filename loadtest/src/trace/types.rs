//! What a trace is, whatever format it came from: requests with arrival times, lengths and
//! prompts, and the options every format's loader takes. Below the loaders and the synthesiser,
//! so they share these without importing each other.

use serde::Serialize;

/// Tokens per Mooncake `hash_ids` block.
pub const MOONCAKE_BLOCK_TOKENS: usize = 512;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Prompt {
    /// Ids of 512-token prefix-chained blocks (equal id ⇒ equal prefix through that block).
    HashIds(Vec<u64>),
    /// Literal prompt text (a conversation rendered up to its latest user turn).
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceRequest {
    /// Position in the trace (0-based), stable across the run and the report.
    pub index: usize,
    /// Arrival in milliseconds since the trace start, when the format carries one.
    pub arrival_ms: Option<f64>,
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub prompt: Prompt,
}

#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub requests: Vec<TraceRequest>,
    /// Records skipped under `skip_invalid`, as `path:line: reason`.
    pub skipped: Vec<String>,
}

impl Trace {
    /// Keeps the first `n` requests.
    pub fn truncate(&mut self, n: usize) {
        self.requests.truncate(n);
    }

    /// Whether every request has an arrival time (so trace-time replay is possible).
    pub fn has_timestamps(&self) -> bool {
        self.requests.iter().all(|r| r.arrival_ms.is_some())
    }

    /// Span of the arrivals in milliseconds (0 without timestamps).
    pub fn span_ms(&self) -> f64 {
        self.requests
            .iter()
            .filter_map(|r| r.arrival_ms)
            .fold(0.0, f64::max)
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    pub skip_invalid: bool,
}
