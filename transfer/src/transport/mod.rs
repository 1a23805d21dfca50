//! The transport abstraction: how a batch reaches a remote engine.
//!
//! A transport moves one batch to the segment a `SegmentDesc` names and
//! returns once the target has applied every op and acknowledged. It must not
//! know about metadata stores, local segments or notification consumers, and
//! the trait must not mention sockets, so TCP, shared memory and RDMA all fit
//! behind it. Timeouts are the engine's job: a transport future may be dropped
//! at any await point and must leave no half-used connection behind.

use self::kind::TransportKind;
use crate::batch::{Batch, BatchReport};
use crate::error::TransferError;
use crate::metadata::SegmentDesc;

pub(crate) mod gate;
pub(crate) mod handshake;
pub(crate) mod kind;
#[cfg(feature = "rdma")]
#[allow(unsafe_code)] // ibverbs is a C API: registered memory and queue pairs by pointer.
pub mod rdma;
#[allow(unsafe_code)] // mmap of a shared segment another process writes into.
pub(crate) mod shm;
pub(crate) mod slice;
pub(crate) mod stream;
pub(crate) mod tcp;

/// Carries batches to remote engines.
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    fn kind(&self) -> TransportKind;

    /// Applies `batch` to the segment `target` describes.
    /// `BatchReport::elapsed` is left for the caller to fill in.
    async fn submit(
        &self,
        target: &SegmentDesc,
        batch: &Batch,
    ) -> Result<BatchReport, TransferError>;
}
