//! The scheduler's shared vocabulary: small newtypes, so ids and roles are never bare integers or
//! strings, and the request key and rejection that policies, predictions and the scheduler all
//! speak. It sits below all of them, so nothing here may import a module that decides anything.

use crate::blocks::BlockHash;
use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// Identifies one engine instance inside a scheduler. Dense and stable for the instance's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceId(pub u32);

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "i{}", self.0)
    }
}

/// What an instance does in a disaggregated fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Prefill,
    Decode,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "prefill" => Ok(Role::Prefill),
            "decode" => Ok(Role::Decode),
            other => Err(format!(
                "unknown role `{other}` (expected prefill or decode)"
            )),
        }
    }
}

/// Identifies one scheduled request until both its legs are reported done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ticket(pub u64);

/// What the scheduler knows of a request: its size and its prefix key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestKey {
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    /// Chained hashes of the prompt's full blocks.
    pub blocks: Vec<BlockHash>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SloBreach {
    Ttft,
    Tbt,
}

#[derive(Debug, Clone, Copy, PartialEq, Error)]
pub enum Rejection {
    #[error("no healthy {0} instance")]
    NoHealthy(Role),
    #[error("predicted {} of {predicted_ms:.0} ms exceeds the SLO of {slo_ms:.0} ms", match breach { SloBreach::Ttft => "time to first token", SloBreach::Tbt => "time between tokens" })]
    Slo {
        breach: SloBreach,
        predicted_ms: f64,
        slo_ms: f64,
    },
    #[error("no decode instance has KV-cache room for this request")]
    KvFull,
    #[error("the request needs {needed} KV blocks (prompt plus max_tokens) but the largest decode instance holds {largest}")]
    TooLarge { needed: u64, largest: u64 },
}

impl Rejection {
    /// A short label, from a fixed set, for metrics and reports.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::NoHealthy(Role::Prefill) => "no_prefill",
            Rejection::NoHealthy(Role::Decode) => "no_decode",
            Rejection::Slo {
                breach: SloBreach::Ttft,
                ..
            } => "slo_ttft",
            Rejection::Slo {
                breach: SloBreach::Tbt,
                ..
            } => "slo_tbt",
            Rejection::KvFull => "kv_full",
            Rejection::TooLarge { .. } => "too_large",
        }
    }

    /// Seconds a client should wait before retrying: the predicted excess, at least one.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Rejection::Slo {
                predicted_ms,
                slo_ms,
                ..
            } => ((predicted_ms - slo_ms) / 1000.0).ceil().max(1.0) as u64,
            _ => 1,
        }
    }
}
