//! Traces: the requests a load test sends, independent of where they came from. A request has an
//! arrival time (when its format carries one), its input and output length in tokens, and its
//! prompt as Mooncake block ids (text synthesised later) or literal text (ShareGPT).
//!
//! Loading never panics on bad input: a malformed record is an error naming its line, or is
//! skipped and counted when the caller asked to go on (`skip_invalid`).

pub mod mooncake;
pub mod sharegpt;
pub mod synthetic;
pub mod types;

use crate::error::{LoadtestError, Result};
use crate::tokens::CountTokens;
// Defined in `types` so the format parsers need not import this file; re-exported for callers
// that name them by their old path (`pdgate_loadtest::trace::Trace`).
use std::path::{Path, PathBuf};
pub use types::{LoadOptions, Prompt, Trace, TraceRequest, MOONCAKE_BLOCK_TOKENS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Mooncake,
    ShareGpt,
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

    pub fn load(&self, opts: LoadOptions, tok: &dyn CountTokens) -> Result<Trace> {
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
