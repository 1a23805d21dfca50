//! The transfer engine: owns this process's segments, serves remote ops on
//! its listener, and submits batches to other engines.
//!
//! It is the only type other crates need at runtime. It picks the transport
//! from the target's `SegmentDesc`, enforces the per-batch deadline, and
//! short-cuts batches addressed to itself. It must know nothing of HTTP,
//! requests or models: a notification payload is opaque bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::batch::{Batch, BatchReport};
use crate::error::TransferError;
use crate::local::LocalSegments;
use crate::metadata::SegmentDesc;
use crate::segment::Segment;
use crate::transport::tcp::{self, TcpTransport};
use crate::transport::{Transport, TransportKind};

/// Delivered to the target process once every op of a batch that carried a
/// notification has been applied.
#[derive(Debug, Clone)]
pub struct Notification {
    /// The target segment the batch was applied to.
    pub segment: String,
    pub payload: Bytes,
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Transfer listener address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Host put into `SegmentDesc::endpoint`; defaults to the listen IP.
    pub advertise_host: Option<String>,
    /// Notifications buffered for the consumer before new ones are dropped.
    pub notification_capacity: usize,
    /// Concurrent connections (and so in-flight batches) per peer.
    pub connections_per_peer: usize,
    /// Deadline for one `submit`, including queueing and connecting.
    pub op_timeout: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_host: None,
            notification_capacity: 1024,
            connections_per_peer: 2,
            op_timeout: Duration::from_secs(30),
        }
    }
}

pub struct TransferEngine {
    local: Arc<LocalSegments>,
    tcp: TcpTransport,
    endpoint: String,
    op_timeout: Duration,
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for TransferEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferEngine")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl TransferEngine {
    /// Binds the listener and starts serving remote ops into local segments.
    /// Must be called inside a tokio runtime.
    pub async fn start(opts: EngineOptions) -> Result<Arc<TransferEngine>, TransferError> {
        let listener = TcpListener::bind(opts.listen).await?;
        let bound = listener.local_addr()?;
        let endpoint = match &opts.advertise_host {
            Some(host) => join_host_port(host, bound.port()),
            None => bound.to_string(),
        };
        let local = Arc::new(LocalSegments::new(opts.notification_capacity));
        let (shutdown, shutdown_rx) = watch::channel(false);
        tokio::spawn(tcp::serve(listener, local.clone(), shutdown_rx));
        tracing::debug!(%endpoint, "transfer engine listening");
        Ok(Arc::new(TransferEngine {
            local,
            tcp: TcpTransport::new(opts.connections_per_peer),
            endpoint,
            op_timeout: opts.op_timeout,
            shutdown,
        }))
    }

    /// "host:port" peers use to reach this engine.
    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// Registers `len` zeroed bytes under `name`.
    pub fn register_segment(&self, name: &str, len: usize) -> Result<Segment, TransferError> {
        self.local.register(name, len)
    }

    /// Stops serving `name` to peers; existing `Segment` handles stay valid.
    pub fn unregister_segment(&self, name: &str) -> bool {
        self.local.unregister(name)
    }

    pub fn segment(&self, name: &str) -> Option<Segment> {
        self.local.get(name)
    }

    pub fn describe(&self, seg: &Segment) -> SegmentDesc {
        SegmentDesc {
            name: seg.name().to_owned(),
            endpoint: self.endpoint.clone(),
            len: seg.len() as u64,
            transport: self.tcp.kind(),
        }
    }

    /// The notification receiver; `Some` exactly once. Until it is taken, or
    /// while it is full, notifications are dropped with a warning.
    pub fn take_notifications(&self) -> Option<mpsc::Receiver<Notification>> {
        self.local.take_notifications()
    }

    /// Applies `batch` to the segment described by `target` and waits for
    /// the target's acknowledgement, at most `op_timeout`.
    pub async fn submit(
        &self,
        target: &SegmentDesc,
        batch: Batch,
    ) -> Result<BatchReport, TransferError> {
        if self.is_shutdown() {
            return Err(TransferError::Shutdown);
        }
        batch.validate(&target.name)?;
        let started = Instant::now();
        let work = async {
            if target.endpoint == self.endpoint {
                return self.local.apply(&target.name, &batch);
            }
            match target.transport {
                TransportKind::Tcp => {
                    self.tcp
                        .submit(&target.endpoint, &target.name, &batch)
                        .await
                }
            }
        };
        let mut report = tokio::time::timeout(self.op_timeout, work)
            .await
            .map_err(|_| TransferError::Timeout)??;
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Stops accepting, closes served connections and pooled client
    /// connections. Idempotent; later submits fail with `Shutdown`.
    pub fn shutdown(&self) {
        if !self.shutdown.send_replace(true) {
            tracing::debug!(endpoint = %self.endpoint, "transfer engine shutting down");
        }
        self.tcp.close();
    }

    fn is_shutdown(&self) -> bool {
        *self.shutdown.borrow()
    }
}

impl Drop for TransferEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_joining() {
        assert_eq!(join_host_port("10.0.0.1", 5), "10.0.0.1:5");
        assert_eq!(join_host_port("decode-0", 5), "decode-0:5");
        assert_eq!(join_host_port("::1", 5), "[::1]:5");
        assert_eq!(join_host_port("[::1]", 5), "[::1]:5");
    }

    #[tokio::test]
    async fn endpoint_reflects_bound_port_and_advertise_host() {
        let e = TransferEngine::start(EngineOptions::default())
            .await
            .unwrap();
        let port: u16 = e.endpoint().rsplit(':').next().unwrap().parse().unwrap();
        assert_ne!(port, 0);
        assert!(e.endpoint().starts_with("127.0.0.1:"));
        let e2 = TransferEngine::start(EngineOptions {
            advertise_host: Some("localhost".into()),
            ..EngineOptions::default()
        })
        .await
        .unwrap();
        assert!(e2.endpoint().starts_with("localhost:"));
        let seg = e2.register_segment("s", 10).unwrap();
        let d = e2.describe(&seg);
        assert_eq!(
            (d.name.as_str(), d.len, d.transport),
            ("s", 10, TransportKind::Tcp)
        );
        assert_eq!(d.endpoint, e2.endpoint());
    }

    #[tokio::test]
    async fn local_fast_path_delivers_notification() {
        let e = TransferEngine::start(EngineOptions::default())
            .await
            .unwrap();
        let mut rx = e.take_notifications().unwrap();
        let seg = e.register_segment("kv", 8).unwrap();
        let desc = e.describe(&seg);
        let r = e
            .submit(
                &desc,
                Batch::new()
                    .write(2, Bytes::from_static(b"xy"))
                    .read(0, 4)
                    .notify(Bytes::from_static(b"ready")),
            )
            .await
            .unwrap();
        assert_eq!(r.reads, vec![Bytes::from_static(b"\0\0xy")]);
        let n = rx.try_recv().unwrap();
        assert_eq!((n.segment.as_str(), &n.payload[..]), ("kv", &b"ready"[..]));
    }

    #[tokio::test]
    async fn submit_after_shutdown_fails_and_shutdown_is_idempotent() {
        let e = TransferEngine::start(EngineOptions::default())
            .await
            .unwrap();
        let seg = e.register_segment("s", 1).unwrap();
        let desc = e.describe(&seg);
        e.shutdown();
        e.shutdown();
        assert!(matches!(
            e.submit(&desc, Batch::new()).await,
            Err(TransferError::Shutdown)
        ));
    }

    #[tokio::test]
    async fn oversized_notification_is_rejected_before_sending() {
        let e = TransferEngine::start(EngineOptions::default())
            .await
            .unwrap();
        let desc = SegmentDesc {
            name: "s".into(),
            endpoint: "127.0.0.1:1".into(),
            len: 1,
            transport: TransportKind::Tcp,
        };
        let b = Batch::new().notify(Bytes::from(vec![0u8; 4097]));
        assert!(matches!(
            e.submit(&desc, b).await,
            Err(TransferError::NotificationTooLarge(4097))
        ));
    }
}
