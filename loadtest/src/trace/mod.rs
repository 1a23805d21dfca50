//! Traces: the requests a load test sends, independent of where they came from. A request has an
//! arrival time (when its format carries one), its input and output length in tokens, and its
//! prompt as Mooncake block ids (text synthesised later) or literal text (ShareGPT).
//!
//! Loading never panics on bad input: a malformed record is an error naming its line, or is
//! skipped and counted when the caller asked to go on (`skip_invalid`).

pub mod mooncake;
pub mod sharegpt;
pub mod synthetic;

use crate::error::{LoadtestError, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Mooncake,
    ShareGpt,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    pub skip_invalid: bool,
}

/// Where a trace comes from: a file, or a synthetic spec (`synthetic:key=value,...`).
#[derive(Debug, Clone)]
pub enum Source {
    File {
        path: PathBuf,
        format: Option<Format>,
    },
    Synthetic(synthetic::Spec),
}

impl Source {
    /// Interprets a command-line trace argument.
    pub fn parse(arg: &str, format: Option<&str>) -> Result<Self> {
        if let Some(spec) = arg.strip_prefix("synthetic:") {
            return Ok(Source::Synthetic(spec.parse()?));
        }
        let format = match format {
            None => None,
            Some("mooncake") => Some(Format::Mooncake),
            Some("sharegpt") => Some(Format::ShareGpt),
            Some(other) => {
                return Err(LoadtestError::BadOption(format!(
                    "unknown trace format `{other}` (mooncake or sharegpt)"
                )))
            }
        };
        Ok(Source::File {
            path: PathBuf::from(arg),
            format,
        })
    }

    pub fn load(&self, opts: LoadOptions, tok: &dyn crate::synth::CountTokens) -> Result<Trace> {
        match self {
            Source::Synthetic(spec) => Ok(spec.generate()),
            Source::File { path, format } => {
                let text = std::fs::read_to_string(path).map_err(|source| LoadtestError::Io {
                    path: path.clone(),
                    source,
                })?;
                let trace = match format.unwrap_or_else(|| sniff(path, &text)) {
                    Format::Mooncake => mooncake::parse(path, &text, opts)?,
                    Format::ShareGpt => sharegpt::parse(path, &text, opts, tok)?,
                };
                if trace.requests.is_empty() {
                    return Err(LoadtestError::EmptyTrace(path.clone()));
                }
                Ok(trace)
            }
        }
    }
}

/// Guesses the format: a JSON array or records with `conversations`/`messages` are ShareGPT.
fn sniff(path: &Path, text: &str) -> Format {
    let head = text.trim_start();
    let name = path.to_string_lossy();
    if head.starts_with('[')
        || name.contains("sharegpt")
        || head
            .lines()
            .next()
            .is_some_and(|l| l.contains("\"conversations\"") || l.contains("\"messages\""))
    {
        Format::ShareGpt
    } else {
        Format::Mooncake
    }
}
