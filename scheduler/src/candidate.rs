//! A candidate instance as a policy sees it for one request: its load, how much of the request it
//! caches (and what it could pull from another instance), its size and measured speed. Built by the scheduler, read by the policies and the
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
    /// Tokens of the last queued step a new prefill could join (`steps.rs`); `None` when it
    /// would start a step of its own.
    pub joinable_tokens: Option<u64>,
    /// Blocks this instance would pull from another holder instead of recomputing them, when
    /// the scheduler predicts that to be faster (see `Predictor::best_pull`).
    pub pull: Option<Pull>,
}

/// A planned pull: the instance that prefills fetches blocks `[matched_blocks, upto_blocks)` of
/// the request from `from`, which caches them, instead of computing them.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Pull {
    pub from: InstanceId,
    /// Leading blocks of the request the puller holds once the pull has landed.
    pub upto_blocks: u32,
    /// Bytes the pull moves.
    pub bytes: u64,
    /// Predicted time until the blocks are in the puller's cache: the fixed overhead, the wait
    /// behind the holder's earlier pulls, and the bytes over the pair's measured bandwidth.
    pub ms: f64,
}
