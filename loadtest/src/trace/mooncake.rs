//! Mooncake JSONL traces: one request a line, `{"timestamp": ms, "input_length": tokens,
//! "output_length": tokens, "hash_ids": [...]}` with 512-token prefix-chained block ids.
//!
//! It must reject what a replay cannot honour (missing fields, zero lengths, negative or
//! non-numeric values) with the line number, and never reorder a valid trace except to sort by
//! timestamp (stably), since the replayer dispatches in arrival order.

use super::types::{LoadOptions, Prompt, Trace, TraceRequest, MOONCAKE_BLOCK_TOKENS};
use crate::error::{LoadtestError, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Deserialize)]
struct Record {
    timestamp: f64,
    input_length: u32,
    output_length: u32,
    #[serde(default)]
    hash_ids: Vec<u64>,
}

pub fn parse(path: &Path, text: &str, opts: LoadOptions) -> Result<Trace> {
    let mut trace = Trace::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match record(line) {
            Ok(r) => {
                let index = trace.requests.len();
                trace.requests.push(TraceRequest {
                    index,
                    arrival_ms: Some(r.timestamp),
                    input_tokens: r.input_length,
                    output_tokens: r.output_length,
                    prompt: Prompt::HashIds(r.hash_ids),
                });
            }
            Err(message) => {
                let err = LoadtestError::BadRecord {
                    path: path.to_path_buf(),
                    line: n + 1,
                    message,
                };
                if !opts.skip_invalid {
                    return Err(err);
                }
                trace.skipped.push(err.to_string());
            }
        }
    }
    trace.requests.sort_by(|a, b| {
        let (x, y) = (a.arrival_ms.unwrap_or(0.0), b.arrival_ms.unwrap_or(0.0));
        x.total_cmp(&y)
    });
    for (i, r) in trace.requests.iter_mut().enumerate() {
        r.index = i;
    }
    Ok(trace)
}

fn record(line: &str) -> Result<Record, String> {
    let r: Record =
        serde_json::from_str(line).map_err(|e| format!("not a Mooncake record: {e}"))?;
    if !r.timestamp.is_finite() || r.timestamp < 0.0 {
        return Err(format!(
            "timestamp {} is not a time since the trace start",
            r.timestamp
        ));
    }
    if r.input_length == 0 {
        return Err("input_length must be at least 1".into());
    }
    if r.output_length == 0 {
        return Err("output_length must be at least 1".into());
    }
    // More ids than the prompt has blocks would make text longer than input_length says.
    let max_blocks = (r.input_length as usize).div_ceil(MOONCAKE_BLOCK_TOKENS);
    if r.hash_ids.len() > max_blocks {
        return Err(format!(
            "{} hash_ids for {} input tokens (at most {max_blocks} blocks of {MOONCAKE_BLOCK_TOKENS})",
            r.hash_ids.len(),
            r.input_length
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"timestamp": 0, "input_length": 600, "output_length": 6, "hash_ids": [0, 1]}
{"timestamp": 40, "input_length": 100, "output_length": 3, "hash_ids": [0]}
"#;

    #[test]
    fn parses_records_in_order() {
        let t = parse(Path::new("t.jsonl"), GOOD, LoadOptions::default()).unwrap();
        assert_eq!(t.requests.len(), 2);
        assert_eq!(t.requests[0].input_tokens, 600);
        assert_eq!(t.requests[0].prompt, Prompt::HashIds(vec![0, 1]));
        assert_eq!(t.requests[1].arrival_ms, Some(40.0));
        assert_eq!(t.requests[1].output_tokens, 3);
    }

    #[test]
    fn malformed_lines_name_their_line_number() {
        let cases = [
            ("{\"timestamp\": 0, \"input_length\": 5}", "output_length"),
            ("not json", "not a Mooncake record"),
            ("{\"timestamp\": -1, \"input_length\": 5, \"output_length\": 1}", "timestamp"),
            ("{\"timestamp\": 1, \"input_length\": 0, \"output_length\": 1}", "input_length"),
            ("{\"timestamp\": 1, \"input_length\": 5, \"output_length\": 0}", "output_length"),
            ("{\"timestamp\": 1, \"input_length\": 5, \"output_length\": 2, \"hash_ids\": [1, 2]}", "hash_ids"),
            ("{\"timestamp\": 1, \"input_length\": \"5\", \"output_length\": 2}", "not a Mooncake"),
        ];
        for (bad, what) in cases {
            let text = format!("{GOOD}\n{bad}\n");
            let err = parse(Path::new("t.jsonl"), &text, LoadOptions::default()).unwrap_err();
            let msg = err.to_string();
            // GOOD has two lines, then a blank line: the bad record is line 4.
            assert!(msg.starts_with("t.jsonl:4: "), "{msg}");
            assert!(msg.contains(what), "{msg} should mention {what}");
        }
    }

    #[test]
    fn skip_invalid_goes_on_and_counts() {
        let text = format!(
            "{GOOD}garbage\n{{\"timestamp\": 50, \"input_length\": 10, \"output_length\": 1}}\n"
        );
        let t = parse(
            Path::new("t.jsonl"),
            &text,
            LoadOptions { skip_invalid: true },
        )
        .unwrap();
        assert_eq!(t.requests.len(), 3);
        assert_eq!(t.skipped.len(), 1);
        assert!(t.skipped[0].starts_with("t.jsonl:3:"), "{}", t.skipped[0]);
    }

    #[test]
    fn out_of_order_timestamps_are_sorted_and_reindexed() {
        let text = "{\"timestamp\": 9, \"input_length\": 1, \"output_length\": 1}\n{\"timestamp\": 2, \"input_length\": 2, \"output_length\": 1}\n";
        let t = parse(Path::new("t"), text, LoadOptions::default()).unwrap();
        assert_eq!(t.requests[0].input_tokens, 2);
        assert_eq!(t.requests[0].index, 0);
        assert_eq!(t.requests[1].index, 1);
    }

    #[test]
    fn the_shared_synthetic_trace_parses() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/traces/synthetic_trace.jsonl"
        ));
        let Ok(text) = std::fs::read_to_string(path) else {
            return; // the shared data set is not part of every checkout
        };
        let t = parse(path, &text, LoadOptions::default()).unwrap();
        assert_eq!(t.requests.len(), 3993);
        assert!(t.skipped.is_empty());
    }
}
