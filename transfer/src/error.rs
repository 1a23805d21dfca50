//! The one error type of the transfer engine.
//!
//! Every fallible call in this crate returns [`TransferError`], so callers in
//! other crates can match on a single enum whether the failure was local
//! (bounds, registration), on the wire (protocol, I/O, timeout) or reported by
//! the target engine. It must never carry anything that cannot cross a thread
//! boundary, and variants stay transport-agnostic: TCP specifics travel as
//! `Io` or `Protocol` text.

/// Errors produced by segments, batches, transports and metadata stores.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Socket-level failure (reset, EOF mid-frame, ...).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The named segment is not registered at the target.
    #[error("unknown segment {0:?}")]
    UnknownSegment(String),
    /// An access `[offset, offset+len)` does not fit in the segment.
    #[error("out of bounds: segment {segment:?} offset {offset} len {len} exceeds segment length {segment_len}")]
    OutOfBounds {
        segment: String,
        offset: u64,
        len: u64,
        segment_len: u64,
    },
    /// `register_segment` with a name that is already registered.
    #[error("segment {0:?} already registered")]
    SegmentExists(String),
    /// Notification payload larger than [`crate::limits::MAX_NOTIFY_LEN`].
    #[error("notification of {0} bytes exceeds the 4096-byte limit")]
    NotificationTooLarge(usize),
    /// The peer sent something that violates the wire protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Error text sent back by the target engine.
    #[error("remote error: {0}")]
    Remote(String),
    /// The batch did not complete within `EngineOptions::op_timeout`.
    #[error("transfer timed out")]
    Timeout,
    /// Could not reach the peer at all (connect failed).
    #[error("peer unavailable: {0}")]
    PeerUnavailable(String),
    /// The batch breaks a protocol limit (too many ops, op too large, name too long).
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// A segment name that no peer could address (too long).
    #[error("invalid segment name: {0}")]
    InvalidName(String),
    /// A bounded metadata store is full.
    #[error("metadata store full ({0} entries)")]
    RegistryFull(usize),
    /// A transport that this build, this host or this peer cannot provide
    /// (e.g. `rdma` without the cargo feature or without a device, `shm` to
    /// a peer on another host). The message names the fix.
    #[error("transport unavailable: {0}")]
    Unsupported(String),
    /// The fleet-secret handshake failed: the peer does not hold the same
    /// secret, has none while this engine requires one, or refused ours.
    /// Retrying on another connection cannot help.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    /// The engine's own options are unusable (e.g. TLS files that cannot be
    /// read or parsed); reported by `TransferEngine::start`.
    #[error("transfer configuration: {0}")]
    Config(String),
    /// The local engine has been shut down.
    #[error("transfer engine shut down")]
    Shutdown,
}
