//! The library's error type: each variant is a case a caller (the CLI) reports differently.
//! It never carries a panic path: every file, network and user input failure ends up here.

use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LoadtestError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A malformed trace record; `line` is 1-based (for JSON arrays, the entry's line in the file).
    #[error("{path}:{line}: {message}")]
    BadRecord {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("trace {0} holds no usable request")]
    EmptyTrace(PathBuf),
    #[error("invalid synthetic spec: {0}")]
    BadSpec(String),
    #[error("invalid option: {0}")]
    BadOption(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plotting {file} failed: {message}")]
    Plot { file: String, message: String },
    #[error("HTTP client: {0}")]
    Client(String),
    #[error("serialising the report: {0}")]
    Serialize(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

pub type Result<T, E = LoadtestError> = std::result::Result<T, E>;
