//! `report.json`: for a replay, the report itself (settings, aggregates, server counters and every
//! per-request record); for a simulation, `{"kind": "simulate", "policies": [...]}` with one entry
//! per policy holding the same aggregate field names as a replay.
//!
//! It only serialises; the numbers come from `Aggregates`.

use super::file::write_file;
use super::types::Report;
use crate::error::{LoadtestError, Result};
use serde_json::{json, Value};
use std::path::Path;

pub fn to_value(reports: &[Report], include_records: bool) -> Result<Value> {
    let ser = |r: &Report| -> Result<Value> {
        let mut v = serde_json::to_value(r).map_err(|e| LoadtestError::Serialize(e.to_string()))?;
        if !include_records {
            if let Some(o) = v.as_object_mut() {
                o.remove("records");
            }
        }
        Ok(v)
    };
    match reports {
        [one] if one.kind == "replay" => ser(one),
        many => {
            let entries: Result<Vec<Value>> = many
                .iter()
                .map(|r| {
                    let mut v = ser(r)?;
                    if let Some(o) = v.as_object_mut() {
                        o.insert("policy".into(), json!(r.label));
                    }
                    Ok(v)
                })
                .collect();
            Ok(
                json!({"kind": many.first().map_or("simulate", |r| r.kind.as_str()), "policies": entries?}),
            )
        }
    }
}

pub fn write(dir: &Path, reports: &[Report], include_records: bool) -> Result<String> {
    let v = to_value(reports, include_records)?;
    let text =
        serde_json::to_vec_pretty(&v).map_err(|e| LoadtestError::Serialize(e.to_string()))?;
    write_file(&dir.join("report.json"), &text)
}
