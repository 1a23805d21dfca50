//! The transport abstraction: how a batch reaches a remote engine.
//!
//! A transport moves one batch to the engine at `endpoint` and returns once
//! the target has applied every op and acknowledged. It must not know about
//! metadata stores, local segments or notification consumers, and the trait
//! must not mention sockets, so shared memory and RDMA can implement it
//! later. Timeouts are the engine's job: a transport future may be dropped at
//! any await point and must leave no half-used connection behind.

use serde::{Deserialize, Serialize};

use crate::batch::{Batch, BatchReport};
use crate::error::TransferError;

pub(crate) mod tcp;

/// Which transport reaches a segment; part of `SegmentDesc`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    #[default]
    Tcp,
}

/// Carries batches to remote engines.
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    fn kind(&self) -> TransportKind;

    /// Applies `batch` to `segment` at the engine listening on `endpoint`.
    /// `BatchReport::elapsed` is left for the caller to fill in.
    async fn submit(
        &self,
        endpoint: &str,
        segment: &str,
        batch: &Batch,
    ) -> Result<BatchReport, TransferError>;
}
