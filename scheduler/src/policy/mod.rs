//! Pair-selection policies: one trait, one file per implementation.
//!
//! A policy sees only healthy candidates (never an empty list) and returns the pair; it must not
//! keep references to instances between calls, since the fleet changes under it.

mod least_load;
mod random;
mod round_robin;

use crate::load::InstanceLoad;
use crate::scheduler::RequestKey;
use crate::types::InstanceId;
use serde::{Deserialize, Serialize};

pub use least_load::LeastLoad;
pub use random::Random;
pub use round_robin::RoundRobin;

/// One instance as a policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub id: InstanceId,
    pub load: InstanceLoad,
}

pub trait Policy: Send {
    fn name(&self) -> &'static str;

    /// Picks `(prefill, decode)`. Both slices are non-empty; the returned ids must come from them.
    fn pick(
        &mut self,
        req: &RequestKey,
        prefill: &[Candidate],
        decode: &[Candidate],
    ) -> (InstanceId, InstanceId);
}

/// The policies that can be named in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    RoundRobin,
    Random,
    #[default]
    LeastLoad,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 3] = [
        PolicyKind::RoundRobin,
        PolicyKind::Random,
        PolicyKind::LeastLoad,
    ];

    pub fn build(self, seed: u64) -> Box<dyn Policy> {
        match self {
            PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
            PolicyKind::Random => Box::new(Random::new(seed)),
            PolicyKind::LeastLoad => Box::new(LeastLoad),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "round_robin",
            PolicyKind::Random => "random",
            PolicyKind::LeastLoad => "least_load",
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("unknown policy `{s}` (expected one of round_robin, random, least_load)")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_name() {
        for k in PolicyKind::ALL {
            assert_eq!(k.as_str().parse::<PolicyKind>(), Ok(k));
            assert_eq!(k.build(1).name(), k.as_str());
        }
        assert!("cache_awareness".parse::<PolicyKind>().is_err());
    }
}
