//! What a report holds: the result of one replay or one simulated policy, as every renderer
//! reads it. Below the renderers and `write_dir`, so they share it without importing each other.

use crate::metrics::{Aggregates, RequestRecord};
use crate::scrape::ServerStats;
use serde::{Deserialize, Serialize};

/// Load one instance carried during a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceLoad {
    pub id: String,
    pub role: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub cache_hit_rate: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// `replay` or `simulate`.
    pub kind: String,
    /// The target URL (replay) or the policy (simulate).
    pub label: String,
    /// The options the run used, for reproducibility.
    pub settings: serde_json::Value,
    pub aggregates: Aggregates,
    pub instances: Vec<InstanceLoad>,
    /// Server counters around a replay (pdgate targets only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerStats>,
    /// Trace records skipped under `--skip-invalid`, and requests never sent (`--duration`).
    pub skipped: Vec<String>,
    pub not_sent: usize,
    /// Wall-clock seconds the run took (for a simulation: the simulator's own run time).
    pub wall_s: f64,
    pub records: Vec<RequestRecord>,
}

impl Report {
    /// Per-instance load from the server counters of a replay.
    pub fn instances_from(server: &ServerStats) -> Vec<InstanceLoad> {
        server
            .instances
            .iter()
            .map(|i| InstanceLoad {
                id: i.id.clone(),
                role: i.role.clone(),
                requests: i.requests_finished.max(0.0) as u64,
                prompt_tokens: i.prompt_tokens.max(0.0) as u64,
                generated_tokens: i.generation_tokens.max(0.0) as u64,
                cache_hit_rate: (i.prefix_queries_tokens > 0.0)
                    .then(|| i.prefix_hits_tokens / i.prefix_queries_tokens),
            })
            .collect()
    }
}
