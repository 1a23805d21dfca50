//! A candidate instance as a policy sees it for one request: its load, how much of the request it
//! caches, its size and measured speed. Built by the scheduler, read by the policies and the
//! predictions; below both, so neither has to import the other for it.

use crate::load::InstanceLoad;
use crate::types::InstanceId;

/// One instance as a policy sees it for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub id: InstanceId,
    pub load: InstanceLoad,
    /// Leading blocks of the request this instance holds (from the prefix index).
    pub matched_blocks: u32,
    /// Blocks the index holds for this instance in all (its "tree size").
    pub cached_blocks: u64,
    /// KV blocks the instance's cache holds at most.
    pub capacity_blocks: u64,
    /// Measured over modelled prefill time (EWMA); 1.0 means as modelled.
    pub speed: f64,
    /// Predicted wait before a new prefill starts here: booked prefill work not yet done, less
    /// what has elapsed of the one running.
    pub queue_ms: f64,
}
