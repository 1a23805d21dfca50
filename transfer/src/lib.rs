//! pdgate-transfer: a KV-cache transfer engine in the style of Mooncake's
//! Transfer Engine.
//!
//! A process registers named memory *segments*; peers submit *batches* of
//! one-sided reads and writes against them and may attach a small
//! *notification* that the owner receives once the batch's data is in place.
//! Segment locations are published through a [`MetadataStore`]. Transports
//! are pluggable behind [`Transport`]: TCP, shared memory, and RDMA (cargo
//! feature `rdma`), chosen per peer. With a fleet secret (`Secret`), peers
//! prove they hold it on every connection before any frame; with TLS
//! (`TlsIdentity`), TCP connections are mutual TLS 1.3 around that. This crate must know
//! nothing of HTTP or LLMs: segments are bytes, notifications are opaque.

mod auth;
mod batch;
pub mod bench;
mod engine;
mod error;
#[cfg(feature = "etcd")]
mod etcd;
mod limits;
mod local;
mod metadata;
mod segment;
mod tls;
mod transport;
mod wire;

pub use auth::{Secret, MIN_SECRET_LEN};
pub use batch::{Batch, BatchReport, Op};
pub use engine::{EngineOptions, TransferEngine};
pub use error::TransferError;
#[cfg(feature = "etcd")]
pub use etcd::EtcdStore;
pub use limits::MAX_NOTIFY_LEN;
pub use local::Notification;
pub use metadata::{Claim, MemoryRegistry, MetadataStore, SegmentDesc};
pub use segment::Segment;
pub use tls::{TlsFiles, TlsIdentity};
pub use transport::gate::{
    AdmissionStats, HandshakeOutcome, DEFAULT_HANDSHAKE_TIMEOUT, METRIC_CAP_REFUSALS,
    METRIC_HANDSHAKES, METRIC_OPEN,
};
pub use transport::handshake::{RdmaLocation, SegmentAdvert, ShmLocation};
pub use transport::kind::{TransportChoice, TransportKind};
/// The RDMA transport's verbs-independent logic and thin verbs layer.
#[cfg(feature = "rdma")]
pub use transport::rdma;
pub use transport::slice::DEFAULT_SLICE_SIZE;
pub use transport::Transport;
