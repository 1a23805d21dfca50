//! The transfer engine: owns this process's segments, serves remote ops on
//! its listener, and submits batches to other engines.
//!
//! It is the only type other crates need at runtime. It picks the transport
//! per peer from `EngineOptions::transport` and a handshake with the owner
//! (`auto`: shm on the same host, rdma when built with the `rdma` feature
//! and both sides have a device, tcp otherwise), enforces the per-batch
//! deadline, and short-cuts batches addressed to itself. It must know nothing of HTTP,
//! requests or models: a notification payload is opaque bytes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::auth::{AuthKey, Secret};
use crate::batch::{Batch, BatchReport};
use crate::error::TransferError;
use crate::local::{LocalSegments, Notification, ShmBacking};
use crate::metadata::SegmentDesc;
use crate::segment::Segment;
use crate::tls::TlsIdentity;
use crate::transport::gate::{AdmissionStats, Counters, Gate, Limits, DEFAULT_HANDSHAKE_TIMEOUT};
use crate::transport::handshake::host_id;
use crate::transport::kind::{TransportChoice, TransportKind};
#[cfg(feature = "rdma")]
use crate::transport::rdma::runtime::{RdmaEngine, RdmaRuntime};
use crate::transport::shm::owner::{bind_control, sweep_stale, ControlSocket, SHM_DIR};
use crate::transport::shm::ShmTransport;
use crate::transport::slice::DEFAULT_SLICE_SIZE;
use crate::transport::stream::Listener;
use crate::transport::tcp::{self, Admission, TcpTransport};
use crate::transport::Transport;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Transfer listener address (the interface it binds); port 0 picks a
    /// free port.
    pub listen: SocketAddr,
    /// Host put into `SegmentDesc::endpoint`; defaults to the listen IP.
    pub advertise_host: Option<String>,
    /// Notifications buffered for the consumer before new ones are dropped.
    pub notification_capacity: usize,
    /// Concurrent connections (and so in-flight batches) per peer.
    pub connections_per_peer: usize,
    /// Deadline for one `submit`, including queueing and connecting.
    pub op_timeout: Duration,
    /// Which transports this engine uses to reach peers, and whether its own
    /// segments live in shared memory (`auto`, `shm`).
    pub transport: TransportChoice,
    /// Batches larger than this are cut into slices of this size that run
    /// in parallel over the peer's connections.
    pub slice_size: usize,
    /// Directory for shared-memory segment files (a tmpfs).
    pub shm_dir: PathBuf,
    /// The fleet secret. With it, every connection to or from this engine
    /// (TCP port and shm commit socket) starts with a mutual proof of it, and
    /// a peer that cannot prove it is refused before any frame. Without it
    /// the transfer plane is open to anyone who can reach it (logged once).
    pub secret: Option<Secret>,
    /// How long an inbound connection may take to authenticate (or, without
    /// a secret, to send its first bytes) before it is closed; also bounds
    /// this engine's own handshakes as a client.
    pub handshake_timeout: Duration,
    /// Mutual TLS 1.3 on TCP transfer connections, both directions: peers
    /// must present a certificate from the fleet CA, and so must this
    /// engine. `None`: plain TCP. The shm commit socket never uses it.
    pub tls: Option<TlsIdentity>,
    /// RC queue pairs per RDMA connection (1..=16).
    #[cfg(feature = "rdma")]
    pub rdma_qps_per_peer: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_host: None,
            notification_capacity: 1024,
            connections_per_peer: 4,
            op_timeout: Duration::from_secs(30),
            transport: TransportChoice::Auto,
            slice_size: DEFAULT_SLICE_SIZE,
            shm_dir: PathBuf::from(SHM_DIR),
            secret: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            tls: None,
            #[cfg(feature = "rdma")]
            rdma_qps_per_peer: crate::transport::rdma::session::DEFAULT_QPS_PER_PEER,
        }
    }
}

pub struct TransferEngine {
    local: Arc<LocalSegments>,
    tcp: Arc<TcpTransport>,
    shm: ShmTransport,
    choice: TransportChoice,
    endpoint: String,
    /// This engine's Unix socket for same-host shm commits, removed at shutdown.
    control: Option<ControlSocket>,
    op_timeout: Duration,
    shutdown: watch::Sender<bool>,
    /// Admissions and refusals on this engine's listeners.
    admissions: Arc<Counters>,
    /// Present when this engine opened an RDMA device (feature `rdma`).
    #[cfg(feature = "rdma")]
    rdma: Option<Arc<dyn RdmaEngine>>,
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
    #[cfg(not(feature = "rdma"))]
    pub async fn start(opts: EngineOptions) -> Result<Arc<TransferEngine>, TransferError> {
        if opts.transport == TransportChoice::Rdma {
            return Err(rdma_unavailable());
        }
        Self::start_inner(opts).await
    }

    /// Binds the listener and starts serving remote ops into local segments.
    /// Must be called inside a tokio runtime. With `rdma`/`auto`, opens the
    /// first RDMA device: `rdma` without one fails, `auto` then uses shm/tcp.
    #[cfg(feature = "rdma")]
    pub async fn start(opts: EngineOptions) -> Result<Arc<TransferEngine>, TransferError> {
        let rdma = match opts.transport {
            TransportChoice::Tcp | TransportChoice::Shm => None,
            TransportChoice::Auto | TransportChoice::Rdma => {
                match crate::transport::rdma::verbs::IbVerbs::open(None, 1) {
                    Ok(v) => Some(Arc::new(RdmaRuntime::new(
                        v,
                        rdma_config(&opts),
                        opts.connections_per_peer,
                    )) as Arc<dyn RdmaEngine>),
                    Err(e) if opts.transport == TransportChoice::Rdma => {
                        tracing::warn!(error = %e, "opening an RDMA device failed");
                        return Err(rdma_unavailable());
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "no usable RDMA device; auto uses shm/tcp");
                        None
                    }
                }
            }
        };
        Self::start_inner(opts, rdma).await
    }

    async fn start_inner(
        opts: EngineOptions,
        #[cfg(feature = "rdma")] rdma: Option<Arc<dyn RdmaEngine>>,
    ) -> Result<Arc<TransferEngine>, TransferError> {
        let key = opts.secret.as_ref().map(AuthKey::derive).transpose()?;
        let listener = TcpListener::bind(opts.listen).await?;
        let bound = listener.local_addr()?;
        if key.is_none() {
            warn_open_once(bound);
        }
        let endpoint = match &opts.advertise_host {
            Some(host) => join_host_port(host, bound.port()),
            None => bound.to_string(),
        };
        // Adverts name files in this directory to processes with other working directories.
        let shm_dir = std::path::absolute(&opts.shm_dir).unwrap_or_else(|_| opts.shm_dir.clone());
        let backing = match opts.transport {
            TransportChoice::Auto | TransportChoice::Shm => {
                let swept = sweep_stale(&shm_dir);
                if swept > 0 {
                    tracing::info!(swept, dir = %shm_dir.display(), "removed shm segment files of dead processes");
                }
                Some(ShmBacking {
                    dir: shm_dir.clone(),
                    host: host_id(),
                    required: opts.transport == TransportChoice::Shm,
                })
            }
            TransportChoice::Tcp | TransportChoice::Rdma => None,
        };
        // Segments in shared memory, and so a commit socket for the peers that map them.
        let shared = backing.is_some();
        let local = Arc::new(LocalSegments::with_shm(opts.notification_capacity, backing));
        #[cfg(feature = "rdma")]
        if let Some(r) = &rdma {
            local.set_rdma(r.clone());
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let admissions = Arc::new(Counters::default());
        // One gate per listener (each bounds its own connections), one set
        // of counters for both.
        let admission = |tls: Option<tokio_rustls::TlsAcceptor>| {
            Arc::new(Admission {
                key: key.clone(),
                tls,
                handshake_timeout: opts.handshake_timeout,
                gate: Gate::new(Limits::default(), admissions.clone()),
            })
        };
        tokio::spawn(tcp::serve(
            Listener::Tcp(listener),
            local.clone(),
            shutdown_rx.clone(),
            admission(opts.tls.as_ref().map(|t| t.acceptor.clone())),
        ));
        let control = shared
            .then(|| Self::serve_control(&shm_dir, &local, shutdown_rx, admission(None)))
            .flatten();
        tracing::debug!(%endpoint, authenticated = key.is_some(), tls = opts.tls.is_some(), "transfer engine listening");
        let tcp = Arc::new(TcpTransport::new(
            opts.connections_per_peer,
            opts.slice_size,
            key,
            opts.tls.as_ref().map(|t| t.connector.clone()),
            opts.handshake_timeout,
        ));
        Ok(Arc::new(TransferEngine {
            local,
            shm: ShmTransport::new(tcp.clone()),
            tcp,
            choice: opts.transport,
            endpoint,
            control,
            op_timeout: opts.op_timeout,
            shutdown,
            admissions,
            #[cfg(feature = "rdma")]
            rdma,
        }))
    }

    /// Serves the Unix socket same-host peers commit shm batches on, and
    /// names it in this engine's adverts. Without one (e.g. a path too long
    /// for a socket), peers commit over TCP as before.
    fn serve_control(
        dir: &Path,
        local: &Arc<LocalSegments>,
        shutdown: watch::Receiver<bool>,
        admission: Arc<Admission>,
    ) -> Option<ControlSocket> {
        match bind_control(dir) {
            Ok((listener, socket)) => {
                local.set_control(socket.path().to_string_lossy().into_owned());
                tokio::spawn(tcp::serve(
                    Listener::Unix(listener),
                    local.clone(),
                    shutdown,
                    admission,
                ));
                Some(socket)
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "no Unix socket for shm commits; peers commit over tcp");
                None
            }
        }
    }

    /// The Unix socket same-host peers send shm commits to, if any.
    pub fn control_socket(&self) -> Option<&Path> {
        self.control.as_ref().map(ControlSocket::path)
    }

    /// Connections admitted to and closed by this engine's listeners, and
    /// why, since it started.
    pub fn admission_stats(&self) -> AdmissionStats {
        self.admissions.snapshot()
    }

    /// "host:port" peers use to reach this engine.
    pub fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    /// Registers `len` zeroed bytes under `name`.
    pub fn register_segment(&self, name: &str, len: usize) -> Result<Segment, TransferError> {
        self.local.register(name, len)
    }

    /// Stops serving `name` to peers and removes its shared-memory file;
    /// existing `Segment` handles stay valid.
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
            transport: if seg.shm_location().is_some() {
                TransportKind::Shm
            } else {
                TransportKind::Tcp
            },
        }
    }

    /// The transport choice this engine was started with.
    pub fn transport_choice(&self) -> TransportChoice {
        self.choice
    }

    /// P2P mode: asks the engine at `endpoint` directly for segment `name`,
    /// no registry involved.
    pub async fn discover(&self, endpoint: &str, name: &str) -> Result<SegmentDesc, TransferError> {
        let advert = tokio::time::timeout(self.op_timeout, self.tcp.describe(endpoint, name))
            .await
            .map_err(|_| TransferError::Timeout)??;
        Ok(SegmentDesc {
            name: advert.name,
            endpoint: endpoint.to_owned(),
            len: advert.len,
            transport: if advert.shm.is_some() {
                TransportKind::Shm
            } else {
                TransportKind::Tcp
            },
        })
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
            // The descriptor's `transport` is the owner's advice; the
            // choice and the handshake decide.
            match self.choice {
                TransportChoice::Tcp => self.tcp.submit(target, &batch).await,
                TransportChoice::Shm => self.shm.submit(target, &batch).await,
                TransportChoice::Auto => match self.shm.submit_routed(target, &batch).await? {
                    Some(report) => Ok(report),
                    #[cfg(feature = "rdma")]
                    None => match self.submit_rdma(target, &batch, started, false).await? {
                        Some(report) => Ok(report),
                        None => self.tcp.submit(target, &batch).await,
                    },
                    #[cfg(not(feature = "rdma"))]
                    None => self.tcp.submit(target, &batch).await,
                },
                #[cfg(feature = "rdma")]
                TransportChoice::Rdma => self
                    .submit_rdma(target, &batch, started, true)
                    .await?
                    .ok_or_else(rdma_unavailable),
                #[cfg(not(feature = "rdma"))]
                TransportChoice::Rdma => Err(rdma_unavailable()),
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
        self.shm.close();
        if let Some(socket) = &self.control {
            socket.remove();
        }
        #[cfg(feature = "rdma")]
        if let Some(r) = &self.rdma {
            r.close();
        }
        self.local.unlink_all();
    }

    /// The RDMA route: `Ok(None)` when `required` is false and either side
    /// lacks RDMA (the caller falls back to tcp). The owner's advert is
    /// fetched per batch, as the connect exchange needs its generation.
    #[cfg(feature = "rdma")]
    async fn submit_rdma(
        &self,
        target: &SegmentDesc,
        batch: &Batch,
        started: Instant,
        required: bool,
    ) -> Result<Option<BatchReport>, TransferError> {
        let Some(rdma) = &self.rdma else {
            return if required {
                Err(rdma_unavailable())
            } else {
                Ok(None)
            };
        };
        let advert = self.tcp.describe(&target.endpoint, &target.name).await?;
        if advert.rdma.is_none() {
            return if required {
                Err(TransferError::Unsupported(format!(
                    "{}: segment {:?} is not registered for RDMA at its owner (no device \
                     there?); use transport \"auto\" or \"tcp\"",
                    target.endpoint, target.name
                )))
            } else {
                Ok(None)
            };
        }
        let deadline = started + self.op_timeout;
        rdma.submit(&*self.tcp, &target.endpoint, &advert, batch, deadline)
            .await
            .map(Some)
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

/// Why `rdma` cannot be used by this build or on this host, and the fix.
fn rdma_unavailable() -> TransferError {
    #[cfg(not(feature = "rdma"))]
    let why = "pdgate-transfer was built without the `rdma` cargo feature; rebuild with \
               `--features rdma` (needs libibverbs-dev, librdmacm-dev and libclang-dev), \
               or use transport \"auto\" or \"tcp\"";
    #[cfg(feature = "rdma")]
    let why = crate::transport::rdma::verbs::unavailable_reason();
    TransferError::Unsupported(why.to_string())
}

#[cfg(feature = "rdma")]
fn rdma_config(opts: &EngineOptions) -> crate::transport::rdma::session::RdmaConfig {
    crate::transport::rdma::session::RdmaConfig {
        qps_per_peer: opts.rdma_qps_per_peer,
        ..Default::default()
    }
}

/// An engine without a secret serves anyone who reaches its port: said once
/// per process (tests and `pdgate up` start many engines), loudly.
fn warn_open_once(bound: SocketAddr) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            listen = %bound,
            "the transfer plane is open: no fleet secret is configured, so anyone who can reach \
             this engine's transfer port can describe, read and write its segments and deliver \
             notifications; set the fleet secret (fleet_secret_file or PDGATE_FLEET_SECRET) on \
             every engine"
        );
    });
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
    use bytes::Bytes;

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
        // `auto` puts segments in shared memory and says so.
        assert_eq!(
            (d.name.as_str(), d.len, d.transport),
            ("s", 10, TransportKind::Shm)
        );
        assert_eq!(d.endpoint, e2.endpoint());
    }

    #[tokio::test]
    async fn the_listener_binds_the_configured_interface_only() {
        // 127.0.0.2 is another loopback address on Linux: bound there, the
        // port must not answer on 127.0.0.1 (nor on any other interface).
        let e = TransferEngine::start(EngineOptions {
            listen: SocketAddr::from(([127, 0, 0, 2], 0)),
            ..EngineOptions::default()
        })
        .await
        .unwrap();
        let bound: SocketAddr = e.endpoint().parse().unwrap();
        assert_eq!(bound.ip().to_string(), "127.0.0.2");
        assert!(tokio::net::TcpStream::connect(bound).await.is_ok());
        let elsewhere = SocketAddr::from(([127, 0, 0, 1], bound.port()));
        assert!(tokio::net::TcpStream::connect(elsewhere).await.is_err());
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

    #[cfg(feature = "rdma")]
    mod rdma {
        use super::*;
        use crate::transport::rdma::runtime::fake::{Fabric, FakeVerbs};
        use crate::transport::rdma::session::{ConnectRequest, ControlChannel, RdmaConfig};
        use crate::transport::rdma::QpEndpoint;

        fn runtime(fabric: &Arc<Fabric>) -> Arc<RdmaRuntime<FakeVerbs>> {
            let cfg = RdmaConfig {
                staging_len: 100,
                staging_buffers: 3,
                ..RdmaConfig::default()
            };
            Arc::new(RdmaRuntime::new(FakeVerbs::new(fabric.clone()), cfg, 4))
        }

        const FLEET: &[u8] = b"rdma-tests-fleet-secret";

        /// An engine of the test fleet (its secret) with a fake device.
        async fn start_fake(
            transport: TransportChoice,
            rdma: Option<Arc<dyn RdmaEngine>>,
        ) -> Arc<TransferEngine> {
            start_fake_with(transport, rdma, Some(FLEET)).await
        }

        async fn start_fake_with(
            transport: TransportChoice,
            rdma: Option<Arc<dyn RdmaEngine>>,
            secret: Option<&[u8]>,
        ) -> Arc<TransferEngine> {
            TransferEngine::start_inner(
                EngineOptions {
                    transport,
                    secret: secret.map(|s| Secret::new(s).unwrap()),
                    ..EngineOptions::default()
                },
                rdma,
            )
            .await
            .unwrap()
        }

        #[tokio::test]
        async fn rdma_keys_and_the_connect_exchange_are_only_for_fleet_members() {
            let fabric = Arc::new(Fabric::default());
            let rt = runtime(&fabric);
            let owner = start_fake(TransportChoice::Rdma, Some(rt.clone())).await;
            let seg = owner.register_segment("kv", 10).unwrap();
            let req = ConnectRequest {
                segment: "kv".into(),
                generation: seg.generation(),
                qps: vec![QpEndpoint {
                    qp_num: 1,
                    lid: 1,
                    gid: [0; 16],
                    psn: 1,
                }],
            };
            for secret in [None, Some(&b"another-fleets-secret"[..])] {
                let stranger = start_fake_with(TransportChoice::Tcp, None, secret).await;
                // No advert, so no rkey/addr ...
                let advert = stranger.tcp.describe(&owner.endpoint(), "kv").await;
                assert!(advert.is_err(), "{advert:?}");
                // ... and no queue pairs connected to the segment's region.
                let control: &dyn ControlChannel = &*stranger.tcp;
                let reply = control.connect(&owner.endpoint(), req.clone()).await;
                assert!(reply.is_err(), "{reply:?}");
            }
            assert_eq!(rt.accepted_from("127.0.0.1"), 0);
            assert_eq!(count(&fabric, "qp "), 0, "no QP brought up for a stranger");
            // The wrong-secret client hangs up before the owner reads its
            // (missing) proof, so the owner may count that refusal a moment later.
            for _ in 0..100 {
                if owner.admission_stats().refused == 4 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(owner.admission_stats().refused, 4);
            // A fleet member gets both.
            let member = start_fake(TransportChoice::Tcp, None).await;
            let advert = member.tcp.describe(&owner.endpoint(), "kv").await.unwrap();
            assert!(advert.rdma.is_some());
            let control: &dyn ControlChannel = &*member.tcp;
            control.connect(&owner.endpoint(), req).await.unwrap();
            assert_eq!(rt.accepted_from("127.0.0.1"), 1);
        }

        fn count(fabric: &Fabric, prefix: &str) -> usize {
            fabric
                .log
                .lock()
                .iter()
                .filter(|e| e.starts_with(prefix))
                .count()
        }

        #[tokio::test]
        async fn batch_runs_over_fake_verbs_through_the_engines_control_channel() {
            let fabric = Arc::new(Fabric::default());
            let owner = start_fake(TransportChoice::Rdma, Some(runtime(&fabric))).await;
            let mut rx = owner.take_notifications().unwrap();
            let seg = owner.register_segment("kv", 1000).unwrap();
            let desc = owner.describe(&seg);
            let advert = owner.tcp.describe(&owner.endpoint(), "kv").await.unwrap();
            assert!(advert.rdma.is_some(), "advert carries the MR");

            let client = start_fake(TransportChoice::Rdma, Some(runtime(&fabric))).await;
            let data: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
            let b = Batch::new()
                .write(10, Bytes::from(data.clone()))
                .read(10, 250)
                .notify(Bytes::from_static(b"ready"));
            let r = client.submit(&desc, b).await.unwrap();
            assert_eq!(r.transport, TransportKind::Rdma);
            assert_eq!(r.reads, vec![Bytes::from(data.clone())]);
            assert_eq!(
                seg.read(10, 250).unwrap(),
                data,
                "bytes landed in the owner"
            );
            let n = rx.recv().await.unwrap();
            assert_eq!((n.segment.as_str(), &n.payload[..]), ("kv", &b"ready"[..]));
            // 2 QPs on each side were brought up; 3 WRITE + 3 READ posts.
            assert_eq!(count(&fabric, "qp "), 4);
            assert_eq!(count(&fabric, "post "), 6);

            // The pooled connection is reused: no second connect exchange.
            let r = client.submit(&desc, Batch::new().read(0, 5)).await.unwrap();
            assert_eq!(r.reads[0].len(), 5);
            assert_eq!(count(&fabric, "qp "), 4);

            // A re-registered segment (new generation, new MR): the next
            // batch re-describes and connects anew.
            assert!(owner.unregister_segment("kv"));
            let seg2 = owner.register_segment("kv", 1000).unwrap();
            client
                .submit(&desc, Batch::new().write(0, Bytes::from_static(b"new")))
                .await
                .unwrap();
            assert_eq!(seg2.read(0, 3).unwrap(), b"new");
            assert_eq!(count(&fabric, "qp "), 8);
        }

        #[tokio::test]
        async fn peer_without_rdma_fails_when_required_and_falls_back_in_auto() {
            let fabric = Arc::new(Fabric::default());
            let owner = start_fake(TransportChoice::Tcp, None).await;
            let seg = owner.register_segment("kv", 10).unwrap();
            let desc = owner.describe(&seg);
            let forced = start_fake(TransportChoice::Rdma, Some(runtime(&fabric))).await;
            let r = forced
                .submit(&desc, Batch::new().write(0, Bytes::from_static(b"x")))
                .await;
            assert!(
                matches!(&r, Err(TransferError::Unsupported(m)) if m.contains("not registered for RDMA")),
                "{r:?}"
            );
            let auto = start_fake(TransportChoice::Auto, Some(runtime(&fabric))).await;
            let r = auto
                .submit(&desc, Batch::new().write(0, Bytes::from_static(b"y")))
                .await
                .unwrap();
            assert_eq!(r.transport, TransportKind::Tcp);
            assert_eq!(seg.read(0, 1).unwrap(), b"y");
            assert_eq!(count(&fabric, "post "), 0);
        }

        #[tokio::test]
        async fn connect_requests_are_checked_and_accepted_qps_capped_per_peer() {
            let fabric = Arc::new(Fabric::default());
            let rt = runtime(&fabric);
            let owner = start_fake(TransportChoice::Rdma, Some(rt.clone())).await;
            let seg = owner.register_segment("kv", 10).unwrap();
            let client = start_fake(TransportChoice::Tcp, None).await;
            let control: &dyn ControlChannel = &*client.tcp;
            let req = |generation| ConnectRequest {
                segment: "kv".into(),
                generation,
                qps: vec![QpEndpoint {
                    qp_num: 1,
                    lid: 1,
                    gid: [0; 16],
                    psn: 1,
                }],
            };
            let stale = control
                .connect(&owner.endpoint(), req(seg.generation() + 1))
                .await;
            assert!(
                matches!(stale, Err(TransferError::UnknownSegment(_))),
                "{stale:?}"
            );
            for _ in 0..crate::transport::rdma::runtime::MAX_ACCEPTED_PER_PEER + 3 {
                let reply = control
                    .connect(&owner.endpoint(), req(seg.generation()))
                    .await
                    .unwrap();
                assert_eq!(reply.qps.len(), 1);
                assert_eq!(reply.region.len, 10);
            }
            assert_eq!(
                rt.accepted_from("127.0.0.1"),
                crate::transport::rdma::runtime::MAX_ACCEPTED_PER_PEER
            );
            // An engine without a device refuses the exchange.
            let plain = control.connect(&client.endpoint(), req(1)).await;
            assert!(plain.is_err());
        }
    }
}
