//! Reports: the result of one replay, or of one simulated policy, as one `Report`; rendered as a
//! terminal table (several reports side by side), `report.json`, `report.md` and SVG plots.
//!
//! Rendering never changes numbers: everything printed comes from `Aggregates` computed once.

pub mod json;
pub mod markdown;
pub mod plots;

use crate::error::{LoadtestError, Result};
use crate::metrics::{Aggregates, RequestRecord};
use crate::scrape::ServerStats;
use serde::{Deserialize, Serialize};
use std::path::Path;

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

/// Writes `report.json`, `report.md` and the plots for `reports` into `dir`.
pub fn write_dir(dir: &Path, reports: &[Report], include_records: bool) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|source| LoadtestError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = vec![json::write(dir, reports, include_records)?];
    written.push(markdown::write(dir, reports)?);
    written.extend(plots::write(dir, reports)?);
    Ok(written)
}

pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<String> {
    std::fs::write(path, bytes).map_err(|source| LoadtestError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(path.display().to_string())
}
