//! pdgate-transfer: a KV-cache transfer engine in the style of Mooncake's
//! Transfer Engine.
//!
//! A process registers named memory *segments*; peers submit *batches* of
//! one-sided reads and writes against them and may attach a small
//! *notification* that the owner receives once the batch's data is in place.
//! Segment locations are published through a [`MetadataStore`]. Transports
//! are pluggable behind [`Transport`]: TCP, shared memory, and RDMA (cargo
//! feature `rdma`), chosen per peer. This crate must know
//! nothing of HTTP or LLMs: segments are bytes, notifications are opaque.

pub mod bench;
mod batch;
mod engine;
mod error;
mod local;
mod metadata;
mod segment;
mod transport;
mod wire;

pub use batch::{Batch, BatchReport, Op};
pub use engine::{EngineOptions, Notification, TransferEngine};
pub use error::TransferError;
pub use metadata::{MemoryRegistry, MetadataStore, SegmentDesc};
pub use segment::Segment;
pub use transport::handshake::{SegmentAdvert, ShmLocation};
pub use transport::slice::DEFAULT_SLICE_SIZE;
pub use transport::{Transport, TransportChoice, TransportKind};
