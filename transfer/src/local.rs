//! The target side of the engine: this process's segment table and the
//! notification sink.
//!
//! Every transport's server half resolves segment names and delivers
//! notifications through here, and the local fast path applies whole batches
//! here, so the batch semantics live in exactly one place per shape (streamed
//! in the TCP server, in-memory here). This module must never block on a
//! notification consumer: a slow or absent consumer loses notifications, it
//! never stalls the data path.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc;

use crate::batch::{Batch, BatchReport, Op};
use crate::error::TransferError;
use crate::limits::MAX_SEGMENT_NAME_LEN;
use crate::segment::Segment;
use crate::transport::handshake::{SegmentAdvert, ShmLocation};
use crate::transport::shm::owner::ShmRegion;

/// Delivered to the target process once every op of a batch that carried a
/// notification has been applied.
#[derive(Debug, Clone)]
pub struct Notification {
    /// The target segment the batch was applied to.
    pub segment: String,
    pub payload: Bytes,
}

/// Where and whether segments are put in shared memory.
#[derive(Debug, Clone)]
pub(crate) struct ShmBacking {
    pub dir: PathBuf,
    pub host: String,
    /// Fail registration instead of falling back to heap memory.
    pub required: bool,
}

pub(crate) struct LocalSegments {
    segments: RwLock<HashMap<String, Segment>>,
    shm: Option<ShmBacking>,
    notify_tx: mpsc::Sender<Notification>,
    notify_rx: Mutex<Option<mpsc::Receiver<Notification>>>,
    // Checked on the data path instead of locking `notify_rx`.
    notify_taken: AtomicBool,
    /// This engine's Unix socket for shm commits, set once at start.
    control: std::sync::OnceLock<String>,
    /// Set once at engine start when this engine has an RDMA device.
    #[cfg(feature = "rdma")]
    rdma: std::sync::OnceLock<std::sync::Arc<dyn crate::transport::rdma::runtime::RdmaEngine>>,
}

impl LocalSegments {
    #[cfg(test)]
    pub(crate) fn new(notification_capacity: usize) -> Self {
        Self::with_shm(notification_capacity, None)
    }

    pub(crate) fn with_shm(notification_capacity: usize, shm: Option<ShmBacking>) -> Self {
        // mpsc::channel panics on 0; a capacity of 0 would mean "drop all".
        let (tx, rx) = mpsc::channel(notification_capacity.max(1));
        LocalSegments {
            segments: RwLock::new(HashMap::new()),
            shm,
            notify_tx: tx,
            notify_rx: Mutex::new(Some(rx)),
            notify_taken: AtomicBool::new(false),
            control: std::sync::OnceLock::new(),
            #[cfg(feature = "rdma")]
            rdma: std::sync::OnceLock::new(),
        }
    }

    /// Registers every later segment as an RDMA memory region and answers
    /// connect requests; call before any segment is registered.
    #[cfg(feature = "rdma")]
    pub(crate) fn set_rdma(
        &self,
        rdma: std::sync::Arc<dyn crate::transport::rdma::runtime::RdmaEngine>,
    ) {
        if self.rdma.set(rdma).is_err() {
            tracing::warn!("rdma runtime set twice; keeping the first");
        }
    }

    /// Target half of an RDMA connect exchange (from the TCP listener).
    #[cfg(feature = "rdma")]
    pub(crate) fn rdma_accept(
        &self,
        peer_host: &str,
        seg: Option<Segment>,
        raw_request: &[u8],
    ) -> Result<Vec<u8>, TransferError> {
        match self.rdma.get() {
            Some(r) => r.accept(peer_host, seg, raw_request),
            None => Err(TransferError::Unsupported(
                "this engine has no RDMA device".into(),
            )),
        }
    }

    pub(crate) fn register(&self, name: &str, len: usize) -> Result<Segment, TransferError> {
        if name.len() > MAX_SEGMENT_NAME_LEN {
            return Err(TransferError::InvalidName(format!(
                "segment name of {} bytes exceeds {MAX_SEGMENT_NAME_LEN}",
                name.len()
            )));
        }
        let mut segments = self.segments.write();
        if segments.contains_key(name) {
            return Err(TransferError::SegmentExists(name.to_owned()));
        }
        let seg = match &self.shm {
            Some(b) if len > 0 => match ShmRegion::create(&b.dir, name, len) {
                Ok(r) => Segment::new_shared(name, r, b.host.clone()),
                Err(e) if b.required => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(segment = name, dir = %b.dir.display(), error = %e,
                        "shared-memory segment unavailable, using heap memory (tcp only)");
                    Segment::new(name, len)
                }
            },
            _ => Segment::new(name, len),
        };
        // Before the segment is visible: a handshake never sees it without
        // its memory region.
        #[cfg(feature = "rdma")]
        if let Some(r) = self.rdma.get() {
            r.register(&seg);
        }
        segments.insert(name.to_owned(), seg.clone());
        Ok(seg)
    }

    pub(crate) fn unregister(&self, name: &str) -> bool {
        match self.segments.write().remove(name) {
            Some(seg) => {
                seg.unlink_shared();
                #[cfg(feature = "rdma")]
                if let Some(r) = self.rdma.get() {
                    r.unregister(name);
                }
                true
            }
            None => false,
        }
    }

    /// Removes every shared segment's file (engine shutdown); handles stay
    /// valid.
    pub(crate) fn unlink_all(&self) {
        for seg in self.segments.read().values() {
            seg.unlink_shared();
        }
    }

    /// Adverts of shared segments name `path` as where commits go.
    pub(crate) fn set_control(&self, path: String) {
        let _ = self.control.set(path);
    }

    /// What a peer's handshake learns about `seg`.
    pub(crate) fn advert(&self, seg: &Segment) -> SegmentAdvert {
        SegmentAdvert {
            name: seg.name().to_owned(),
            len: seg.len() as u64,
            generation: seg.generation(),
            shm: seg.shm_location().map(|loc| ShmLocation {
                control: self.control.get().cloned(),
                ..loc.clone()
            }),
            rdma: self.rdma_location(seg),
        }
    }

    #[cfg(feature = "rdma")]
    fn rdma_location(&self, seg: &Segment) -> Option<crate::transport::handshake::RdmaLocation> {
        self.rdma.get().and_then(|r| r.location(seg))
    }

    #[cfg(not(feature = "rdma"))]
    fn rdma_location(&self, _seg: &Segment) -> Option<crate::transport::handshake::RdmaLocation> {
        None
    }

    pub(crate) fn get(&self, name: &str) -> Option<Segment> {
        self.segments.read().get(name).cloned()
    }

    pub(crate) fn take_notifications(&self) -> Option<mpsc::Receiver<Notification>> {
        let rx = self.notify_rx.lock().take();
        if rx.is_some() {
            self.notify_taken.store(true, Ordering::Release);
        }
        rx
    }

    pub(crate) fn deliver(&self, segment: &str, payload: Bytes) {
        if !self.notify_taken.load(Ordering::Acquire) {
            tracing::warn!(
                segment,
                "dropping transfer notification: nobody took the receiver"
            );
            return;
        }
        let n = Notification {
            segment: segment.to_owned(),
            payload,
        };
        match self.notify_tx.try_send(n) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(n)) => {
                tracing::warn!(segment = %n.segment, "dropping transfer notification: receiver full");
            }
            Err(mpsc::error::TrySendError::Closed(n)) => {
                tracing::warn!(segment = %n.segment, "dropping transfer notification: receiver dropped");
            }
        }
    }

    /// Applies a batch addressed to this process without touching the
    /// network, with the same semantics as the TCP server (see `batch`).
    pub(crate) fn apply(&self, segment: &str, batch: &Batch) -> Result<BatchReport, TransferError> {
        let seg = self
            .get(segment)
            .ok_or_else(|| TransferError::UnknownSegment(segment.to_owned()))?;
        let mut report = BatchReport::default();
        let mut reads = Vec::new();
        for op in &batch.ops {
            match op {
                Op::Write {
                    remote_offset,
                    data,
                } => {
                    let (off, _) = seg.check_range(*remote_offset, data.len() as u64)?;
                    seg.write(off, data)?;
                    report.bytes_written += data.len() as u64;
                }
                Op::Read { remote_offset, len } => {
                    reads.push(seg.check_range(*remote_offset, *len)?)
                }
            }
        }
        if let Some(payload) = &batch.notify {
            self.deliver(segment, payload.clone());
        }
        report.reads = reads
            .into_iter()
            .map(|(off, len)| seg.read(off, len).map(Bytes::from))
            .collect::<Result<_, _>>()?;
        report.bytes_read = report.reads.iter().map(|r| r.len() as u64).sum();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_is_unique_and_bounded_by_name_length() {
        let l = LocalSegments::new(4);
        let s = l.register("a", 8).unwrap();
        assert!(matches!(l.register("a", 8), Err(TransferError::SegmentExists(n)) if n == "a"));
        assert!(matches!(
            l.register(&"x".repeat(MAX_SEGMENT_NAME_LEN + 1), 8),
            Err(TransferError::InvalidName(_))
        ));
        s.write(0, b"z").unwrap();
        assert_eq!(l.get("a").unwrap().read(0, 1).unwrap(), b"z");
        assert!(l.unregister("a"));
        assert!(!l.unregister("a"));
        assert!(l.get("a").is_none());
    }

    #[tokio::test]
    async fn apply_semantics_match_the_wire_server() {
        let l = LocalSegments::new(4);
        let mut rx = l.take_notifications().unwrap();
        assert!(l.take_notifications().is_none());
        l.register("s", 16).unwrap();

        let r = l
            .apply(
                "s",
                &Batch::new()
                    .read(0, 3)
                    .write(0, Bytes::from_static(b"abc"))
                    .notify(Bytes::from_static(b"n1")),
            )
            .unwrap();
        // Reads are served after the batch's writes.
        assert_eq!(r.reads, vec![Bytes::from_static(b"abc")]);
        assert_eq!((r.bytes_written, r.bytes_read), (3, 3));
        let n = rx.try_recv().unwrap();
        assert_eq!((n.segment.as_str(), &n.payload[..]), ("s", &b"n1"[..]));

        // Failing op: earlier writes stay, later ones are skipped, no notification.
        let err = l
            .apply(
                "s",
                &Batch::new()
                    .write(3, Bytes::from_static(b"d"))
                    .read(10, 7)
                    .write(4, Bytes::from_static(b"e"))
                    .notify(Bytes::from_static(b"n2")),
            )
            .unwrap_err();
        assert!(matches!(
            err,
            TransferError::OutOfBounds {
                offset: 10,
                len: 7,
                ..
            }
        ));
        assert_eq!(l.get("s").unwrap().read(0, 5).unwrap(), b"abcd\0");
        assert!(rx.try_recv().is_err());

        assert!(matches!(
            l.apply("nope", &Batch::new()),
            Err(TransferError::UnknownSegment(n)) if n == "nope"
        ));
    }

    #[tokio::test]
    async fn notifications_never_block() {
        let l = LocalSegments::new(1);
        // Not taken yet: dropped, and not queued for a later taker.
        l.deliver("s", Bytes::from_static(b"early"));
        let mut rx = l.take_notifications().unwrap();
        assert!(rx.try_recv().is_err());
        l.deliver("s", Bytes::from_static(b"1"));
        l.deliver("s", Bytes::from_static(b"2")); // full: dropped
        assert_eq!(&rx.try_recv().unwrap().payload[..], b"1");
        assert!(rx.try_recv().is_err());
        drop(rx);
        l.deliver("s", Bytes::from_static(b"3")); // closed: dropped
    }
}
