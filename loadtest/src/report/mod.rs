//! Reports: the result of one replay, or of one simulated policy, as one `Report`; rendered as a
//! terminal table (several reports side by side), `report.json`, `report.md` and SVG plots.
//!
//! Rendering never changes numbers: everything printed comes from `Aggregates` computed once.

mod file;
pub mod json;
pub mod markdown;
pub mod plots;
pub mod types;

use crate::error::{LoadtestError, Result};
// Defined in `types` so the renderers need not import this file; re-exported for callers that
// name them by their old path (`pdgate_loadtest::report::Report`).
use std::path::Path;
pub use types::{InstanceLoad, Report};

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
