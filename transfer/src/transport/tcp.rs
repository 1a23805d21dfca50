//! TCP transport: a bounded pool of persistent connections per peer on the
//! client side, and the accept loop plus per-connection handler that applies
//! remote ops to local segments on the server side.
//!
//! Frames follow `wire`. Payloads are moved without intermediate copies where
//! the kernel allows: the client hands write payloads to `writev`, the server
//! `read`s write payloads straight into segment memory and `write`s read
//! payloads straight out of it. That is done with non-blocking `try_read` /
//! `try_write` inside the segment lock, so no lock is ever held across an
//! `.await`. Nothing read from the network may panic or allocate beyond the
//! `wire` limits; a connection that fails mid-batch is dropped, never reused.
//!
//! A batch larger than one slice (`slice`) is cut and its slices run in
//! parallel over up to `connections_per_peer` connections; a slice that fails
//! on one connection is retried on another (slices never carry the
//! notification, so a retry cannot deliver it twice); a peer whose attempts
//! keep failing is marked down for a moment so callers fail fast instead of
//! queueing behind it. The same listener answers handshakes (`describe`) and
//! shm commits (a zero-op batch with a generation check).
//!
//! With a fleet secret, every connection, either way, starts with the
//! authentication handshake (`auth`) before its first frame; the server side
//! runs it under a deadline and within the bounds of a `gate`, so a
//! connection that never authenticates is closed and cannot starve peers that
//! do. With TLS (`tls`), TCP connections are mutual TLS 1.3 first, under the
//! same deadline and bounds, and the authentication handshake and frames run
//! inside the session; payloads then pass through a buffer on the server
//! side (the session decrypts into it) instead of straight between the
//! socket and segment memory, and every reply is flushed.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::auth::{self, AuthKey, Refusal};
use crate::batch::{Batch, BatchReport, Op};
use crate::error::TransferError;
use crate::limits::MAX_SEGMENT_NAME_LEN;
use crate::local::LocalSegments;
use crate::metadata::SegmentDesc;
use crate::segment::Segment;
use crate::tls;
use crate::transport::gate::{Gate, HandshakeOutcome, Pending};
use crate::transport::handshake::SegmentAdvert;
use crate::transport::kind::TransportKind;
use crate::transport::slice;
use crate::transport::stream::{Addr, Listener, ReadHalf, Stream, WriteHalf};
use crate::transport::Transport;
use crate::wire::{self, OpKind, ReplyHeader, ReplyStatus, REPLY_HEADER_LEN};

/// Upper bound on one `try_read`/`try_write` under a segment lock, so a
/// single syscall never keeps other users of the segment waiting for long.
const MAX_IO_STEP: usize = 4 << 20;
/// Server-side buffer for headers; payloads bypass it.
const SERVER_READ_BUFFER: usize = 64 << 10;
/// Scratch size used to drain payloads of a batch that already failed, and
/// to carry payloads through a TLS session.
const DISCARD_CHUNK: usize = 64 << 10;
/// How long a refused peer that skipped the handshake gets to read our
/// frame error before the connection is closed.
const REFUSAL_LINGER: Duration = Duration::from_millis(200);
/// Distinct peers with pooled state; beyond this idle peers are forgotten.
const MAX_PEERS: usize = 4096;
/// Iovecs per `writev`.
const MAX_IOV: usize = 64;
/// Attempts per slice (first try plus retries on fresh connections).
const MAX_ATTEMPTS: u32 = 3;
/// Consecutive failed attempts after which a peer is marked down.
const DOWN_AFTER_FAILURES: u32 = 3;
/// How long a down peer fails fast before one probe is let through.
const DOWN_FOR: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------- client ---

/// Client half: submits batches to remote engines over pooled connections.
pub(crate) struct TcpTransport {
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    /// Same-host owners' commit sockets, apart from `peers` so no TCP
    /// endpoint can ever share their pooled connections.
    local_peers: Mutex<HashMap<PathBuf, Arc<Peer>>>,
    per_peer: usize,
    slice_size: usize,
    /// The fleet key every new connection proves before its first frame;
    /// `None` on an engine without a secret (the open plane).
    key: Option<AuthKey>,
    /// Mutual TLS on TCP connections (never on the Unix commit socket).
    tls: Option<tokio_rustls::TlsConnector>,
    handshake_timeout: Duration,
}

struct Peer {
    // Caps in-flight exchanges (hence open connections, and in-flight bytes
    // at about per_peer slices) to this peer; extra submitters queue here,
    // under the caller's deadline.
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Stream>>,
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    consecutive_failures: u32,
    down_until: Option<Instant>,
}

impl TcpTransport {
    pub(crate) fn new(
        connections_per_peer: usize,
        slice_size: usize,
        key: Option<AuthKey>,
        tls: Option<tokio_rustls::TlsConnector>,
        handshake_timeout: Duration,
    ) -> Self {
        TcpTransport {
            peers: Mutex::new(HashMap::new()),
            local_peers: Mutex::new(HashMap::new()),
            per_peer: connections_per_peer.max(1),
            slice_size: slice_size.max(1),
            key,
            tls,
            handshake_timeout,
        }
    }

    /// TLS (for a TCP peer, when configured), then the fleet-secret proof
    /// (when keyed) inside it. A certificate either side rejects is
    /// `Unauthenticated`: another connection would present the same one.
    async fn secure(&self, conn: Stream, addr: Addr<'_>) -> Result<Stream, TransferError> {
        let mut conn = match (&self.tls, addr) {
            (Some(tls), Addr::Tcp(endpoint)) => {
                let name = tls::server_name(endpoint)?;
                let tcp = conn
                    .into_tcp()
                    .ok_or_else(|| TransferError::Protocol("TLS over a non-TCP stream".into()))?;
                let s = tls.connect(name, tcp).await.map_err(tls_failure)?;
                Stream::Tls(Box::new(s.into()))
            }
            _ => conn,
        };
        if let Some(key) = &self.key {
            match auth::client(&mut conn, key).await {
                // The server checks our certificate after our side of the TLS handshake is
                // done, so its verdict arrives here, as an alert, during the first read.
                Err(TransferError::Io(e)) if matches!(conn, Stream::Tls(_)) => {
                    return Err(tls_failure(e))
                }
                r => r?,
            }
        }
        Ok(conn)
    }

    /// A new connection to `addr`, authenticated when this engine has a key.
    /// Pooled connections are authenticated once, here, and reused. A
    /// handshake the server hangs up on (a burst of newer connections from
    /// this host evicted it) is tried once more on a fresh connection: no
    /// frame was sent, so even a notification cannot go out twice.
    async fn open(&self, addr: Addr<'_>) -> Result<Stream, TransferError> {
        let tls = self.tls.is_some() && matches!(addr, Addr::Tcp(_));
        if self.key.is_none() && !tls {
            return Stream::connect(addr).await;
        }
        let mut tries = 0;
        loop {
            tries += 1;
            let conn = Stream::connect(addr).await?;
            let e = match tokio::time::timeout(self.handshake_timeout, self.secure(conn, addr))
                .await
            {
                Ok(Ok(conn)) => return Ok(conn),
                Ok(Err(TransferError::Unauthenticated(m))) => {
                    return Err(TransferError::Unauthenticated(format!("{addr}: {m}")))
                }
                Ok(Err(e @ TransferError::Config(_))) => return Err(e),
                Ok(Err(TransferError::Io(e))) if tries < 2 => {
                    tracing::debug!(%addr, error = %e, "authentication handshake cut off; retrying once");
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", self.handshake_timeout),
            };
            // "Unavailable, nothing sent": true, as no frame went out.
            return Err(TransferError::PeerUnavailable(format!(
                "{addr}: authentication handshake: {e}"
            )));
        }
    }

    /// Drops every pooled connection.
    pub(crate) fn close(&self) {
        self.peers.lock().clear();
        self.local_peers.lock().clear();
    }

    fn peer(&self, addr: Addr<'_>) -> Arc<Peer> {
        match addr {
            Addr::Tcp(endpoint) => self.pooled(&self.peers, endpoint),
            Addr::Unix(path) => self.pooled(&self.local_peers, path),
        }
    }

    fn pooled<K, Q>(&self, map: &Mutex<HashMap<K, Arc<Peer>>>, key: &Q) -> Arc<Peer>
    where
        K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
        Q: ToOwned<Owned = K> + std::hash::Hash + Eq + ?Sized,
    {
        let mut peers = map.lock();
        if let Some(p) = peers.get(key) {
            return p.clone();
        }
        if peers.len() >= MAX_PEERS {
            // Only the map holds an unused peer, so forgetting it loses idle
            // sockets at worst, never an in-flight batch's permit.
            peers.retain(|_, p| Arc::strong_count(p) > 1);
        }
        let p = Arc::new(Peer {
            permits: Arc::new(Semaphore::new(self.per_peer)),
            idle: Mutex::new(Vec::with_capacity(self.per_peer)),
            health: Mutex::new(Health::default()),
        });
        peers.insert(key.to_owned(), p.clone());
        p
    }
}

impl Peer {
    /// Fails fast while the peer is marked down; after `DOWN_FOR` the next
    /// caller goes through as a probe.
    fn check_up(&self, endpoint: Addr<'_>) -> Result<(), TransferError> {
        let mut h = self.health.lock();
        match h.down_until {
            Some(t) if Instant::now() < t => Err(TransferError::PeerUnavailable(format!(
                "{endpoint}: marked down after {} consecutive failures",
                h.consecutive_failures
            ))),
            Some(_) => {
                h.down_until = None;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn record(&self, endpoint: Addr<'_>, ok: bool) {
        let mut h = self.health.lock();
        if ok {
            *h = Health::default();
            return;
        }
        h.consecutive_failures += 1;
        if h.consecutive_failures >= DOWN_AFTER_FAILURES && h.down_until.is_none() {
            tracing::warn!(
                %endpoint,
                failures = h.consecutive_failures,
                "transfer peer marked down"
            );
            h.down_until = Some(Instant::now() + DOWN_FOR);
        }
    }

    fn take_idle(&self) -> Option<Stream> {
        let mut idle = self.idle.lock();
        while let Some(conn) = idle.pop() {
            if still_open(&conn) {
                return Some(conn);
            }
        }
        None
    }

    fn put_idle(&self, conn: Stream, max: usize) {
        let mut idle = self.idle.lock();
        if idle.len() < max {
            idle.push(conn);
        }
    }
}

/// A failed TLS handshake or a TLS alert from the peer (rustls reports both
/// as `InvalidData`) is a verdict on a certificate; anything else (a reset,
/// an EOF) is the path's.
fn tls_failure(e: io::Error) -> TransferError {
    if e.kind() == io::ErrorKind::InvalidData {
        TransferError::Unauthenticated(format!("TLS: {e}"))
    } else {
        TransferError::Io(e)
    }
}

/// Cheap check that the peer has not closed an idle connection (e.g. it
/// restarted). Only a pending EOF or error is detected; anything else is
/// found out by the next exchange.
fn still_open(conn: &Stream) -> bool {
    let mut probe = [0u8; 1];
    matches!(conn.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// How one request/reply exchange ended.
enum Exchange {
    /// Reply fully read; the connection is in sync. `reusable` is false when
    /// the server announced it is closing.
    Done {
        result: Result<BatchReport, TransferError>,
        reusable: bool,
    },
    /// Connection broke before any reply byte arrived.
    NoReply(TransferError),
    /// Connection broke or misbehaved mid-reply.
    Broken(TransferError),
}

/// Failures that say nothing about the batch itself, so another connection
/// may succeed. (Not `Unauthenticated`: another connection would prove the
/// same wrong secret.)
fn is_path_failure(e: &TransferError) -> bool {
    matches!(
        e,
        TransferError::Io(_) | TransferError::PeerUnavailable(_) | TransferError::Protocol(_)
    )
}

impl TcpTransport {
    /// Asks the owner at `endpoint` for its advert of `segment`.
    pub(crate) async fn describe(
        &self,
        endpoint: &str,
        segment: &str,
    ) -> Result<SegmentAdvert, TransferError> {
        if segment.len() > MAX_SEGMENT_NAME_LEN {
            return Err(TransferError::InvalidName(segment.to_owned()));
        }
        let msg = self
            .control_exchange(endpoint, &wire::encode_describe(segment))
            .await?;
        SegmentAdvert::decode(&msg)
    }

    /// Sends one control frame (describe, RDMA connect) to the owner at `endpoint` and returns
    /// the reply message. A fresh connection: control exchanges are rare, and an old server
    /// closes the connection after rejecting a frame it does not know.
    async fn control_exchange(
        &self,
        endpoint: &str,
        frame: &[u8],
    ) -> Result<Vec<u8>, TransferError> {
        let addr = Addr::Tcp(endpoint);
        let peer = self.peer(addr);
        peer.check_up(addr)?;
        let _permit = peer
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| TransferError::Shutdown)?;
        let mut conn = self.open(addr).await?;
        conn.write_all(frame).await?;
        conn.flush().await?;
        let mut raw = [0u8; REPLY_HEADER_LEN];
        conn.read_exact(&mut raw).await?;
        let h = ReplyHeader::decode(&raw)?;
        let mut msg = vec![0u8; h.msg_len as usize];
        conn.read_exact(&mut msg).await?;
        if h.status != ReplyStatus::Ok {
            return Err(h.into_error(&msg));
        }
        peer.put_idle(conn, self.per_peer);
        Ok(msg)
    }

    /// Sends one RDMA connect request to the owner at `endpoint` and returns
    /// its reply, over a fresh connection like `describe`.
    #[cfg(feature = "rdma")]
    async fn rdma_connect(
        &self,
        endpoint: &str,
        req: &crate::transport::rdma::session::ConnectRequest,
    ) -> Result<crate::transport::rdma::session::ConnectReply, TransferError> {
        let frame = wire::encode_rdma_connect(&req.segment, &req.encode()?)?;
        let msg = self.control_exchange(endpoint, &frame).await?;
        crate::transport::rdma::session::ConnectReply::decode(&msg)
    }

    /// One exchange carrying the whole `batch` (never sliced) to the owner's
    /// TCP `endpoint`; see [`Self::submit_to`].
    pub(crate) async fn submit_at(
        &self,
        endpoint: &str,
        segment: &str,
        batch: &Batch,
        generation: Option<u64>,
    ) -> Result<BatchReport, TransferError> {
        self.submit_to(Addr::Tcp(endpoint), segment, batch, generation)
            .await
    }

    /// One exchange carrying the whole `batch` (never sliced), optionally
    /// checking the segment's generation at the target. Batches without a
    /// notification are retried on a fresh connection after a path failure.
    pub(crate) async fn submit_to(
        &self,
        endpoint: Addr<'_>,
        segment: &str,
        batch: &Batch,
        generation: Option<u64>,
    ) -> Result<BatchReport, TransferError> {
        let peer = self.peer(endpoint);
        peer.check_up(endpoint)?;
        let attempts = if batch.notify.is_some() {
            1
        } else {
            MAX_ATTEMPTS
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = self
                .exchange_once(&peer, endpoint, segment, batch, generation)
                .await;
            match &r {
                Err(e) if is_path_failure(e) => {
                    peer.record(endpoint, false);
                    if attempt < attempts && peer.check_up(endpoint).is_ok() {
                        tracing::debug!(%endpoint, attempt, error = %e, "retrying slice on another connection");
                        continue;
                    }
                }
                // A peer that refuses our proof (or cannot prove its own) is
                // failing, but retrying cannot help.
                Err(TransferError::Unauthenticated(_)) => peer.record(endpoint, false),
                _ => peer.record(endpoint, true),
            }
            return r;
        }
    }

    async fn slice_task(
        &self,
        i: usize,
        endpoint: &str,
        segment: &str,
        slice: &Batch,
    ) -> (usize, Result<BatchReport, TransferError>) {
        (i, self.submit_at(endpoint, segment, slice, None).await)
    }

    async fn exchange_once(
        &self,
        peer: &Peer,
        endpoint: Addr<'_>,
        segment: &str,
        batch: &Batch,
        generation: Option<u64>,
    ) -> Result<BatchReport, TransferError> {
        let _permit: OwnedSemaphorePermit = peer
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| TransferError::Shutdown)?;
        let (mut conn, mut reused) = match peer.take_idle() {
            Some(c) => (c, true),
            None => (self.open(endpoint).await?, false),
        };
        loop {
            match exchange(&mut conn, segment, batch, generation).await {
                Exchange::Done { result, reusable } => {
                    if reusable {
                        peer.put_idle(conn, self.per_peer);
                    }
                    return result;
                }
                // A pooled connection the server closed between batches
                // fails like this without the server having seen the
                // request (it only closes between batches or when its
                // process goes away), so one retry on a fresh connection
                // cannot apply the batch twice.
                Exchange::NoReply(e) if reused => {
                    tracing::debug!(%endpoint, error = %e, "pooled connection was stale, reconnecting");
                    // A frame went out on the stale connection: a failed reconnect is not
                    // "unavailable, nothing sent", which callers may answer by resending
                    // elsewhere.
                    conn = self.open(endpoint).await.map_err(|e| match e {
                        TransferError::PeerUnavailable(m) => io::Error::other(m).into(),
                        other => other,
                    })?;
                    reused = false;
                }
                Exchange::NoReply(e) | Exchange::Broken(e) => return Err(e),
            }
        }
    }
}

#[async_trait::async_trait]
impl Transport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    async fn submit(
        &self,
        target: &SegmentDesc,
        batch: &Batch,
    ) -> Result<BatchReport, TransferError> {
        let (endpoint, segment) = (target.endpoint.as_str(), target.name.as_str());
        batch.validate(segment)?;
        let Some(plan) = slice::plan(batch, self.slice_size) else {
            return self.submit_at(endpoint, segment, batch, None).await;
        };
        self.peer(Addr::Tcp(endpoint))
            .check_up(Addr::Tcp(endpoint))?;
        let mut results: Vec<Vec<Bytes>> = vec![Vec::new(); plan.slices.len()];
        let mut report = BatchReport::default();
        // Every write slice is acknowledged before any read slice starts, so the batch's reads
        // see its writes however the slices were spread over connections.
        let (writes, reads) = plan.slices.split_at(plan.first_read.min(plan.slices.len()));
        for (first, phase) in [(0, writes), (writes.len(), reads)] {
            // Collected first: a lazily mapped closure here trips a
            // higher-ranked lifetime limitation under async_trait.
            let tasks: Vec<_> = phase
                .iter()
                .enumerate()
                .map(|(i, s)| self.slice_task(first + i, endpoint, segment, s))
                .collect();
            let mut running = futures::stream::iter(tasks).buffer_unordered(self.per_peer);
            while let Some((i, r)) = running.next().await {
                // First failure ends the batch; dropping `running` drops the
                // other slices' connections mid-exchange (never reused).
                let r = r?;
                report.bytes_written += r.bytes_written;
                results[i] = r.reads;
            }
        }
        report.reads = slice::assemble(&plan.reads, results)?;
        report.bytes_read = report.reads.iter().map(|r| r.len() as u64).sum();
        if let Some(n) = &batch.notify {
            let done = Batch {
                ops: Vec::new(),
                notify: Some(n.clone()),
            };
            self.submit_at(endpoint, segment, &done, None).await?;
        }
        Ok(report)
    }
}

/// The RDMA path's control channel is this transport: the connect exchange
/// on the owner's listener, and the notification as a zero-op commit whose
/// generation check refuses a re-registered segment.
#[cfg(feature = "rdma")]
#[async_trait::async_trait]
impl crate::transport::rdma::session::ControlChannel for TcpTransport {
    async fn connect(
        &self,
        endpoint: &str,
        req: crate::transport::rdma::session::ConnectRequest,
    ) -> Result<crate::transport::rdma::session::ConnectReply, TransferError> {
        self.rdma_connect(endpoint, &req).await
    }

    async fn commit(
        &self,
        endpoint: &str,
        segment: &str,
        generation: u64,
        notify: Bytes,
    ) -> Result<(), TransferError> {
        let done = Batch {
            ops: Vec::new(),
            notify: Some(notify),
        };
        self.submit_at(endpoint, segment, &done, Some(generation))
            .await
            .map(|_| ())
    }
}

async fn exchange(
    conn: &mut Stream,
    segment: &str,
    batch: &Batch,
    generation: Option<u64>,
) -> Exchange {
    let mut parts = wire::encode_request_at(segment, batch, generation);
    if let Err(e) = write_all_vectored(conn, &mut parts).await {
        return Exchange::NoReply(e.into());
    }
    if let Err(e) = conn.flush().await {
        return Exchange::NoReply(e.into());
    }
    let mut raw = [0u8; REPLY_HEADER_LEN];
    match wire::read_exact_or_eof(conn, &mut raw).await {
        Ok(true) => {}
        Ok(false) => {
            return Exchange::NoReply(io::Error::from(io::ErrorKind::UnexpectedEof).into())
        }
        Err(e) => {
            return if e.kind() == io::ErrorKind::UnexpectedEof {
                Exchange::Broken(e.into())
            } else {
                Exchange::NoReply(e.into())
            }
        }
    }
    match read_reply(conn, &raw, batch).await {
        Ok(done) => done,
        Err(e) => Exchange::Broken(e),
    }
}

async fn read_reply(
    conn: &mut Stream,
    raw: &[u8; REPLY_HEADER_LEN],
    batch: &Batch,
) -> Result<Exchange, TransferError> {
    let h = ReplyHeader::decode(raw)?;
    if h.status != ReplyStatus::Ok {
        // msg_len was bounded by decode.
        let mut msg = vec![0u8; h.msg_len as usize];
        conn.read_exact(&mut msg).await?;
        return Ok(Exchange::Done {
            result: Err(h.into_error(&msg)),
            reusable: h.status != ReplyStatus::Fatal,
        });
    }
    let expect_bytes = batch.read_bytes();
    if h.n_reads as usize != batch.read_count() || h.a != expect_bytes {
        return Err(TransferError::Protocol(format!(
            "reply announces {} reads / {} bytes, batch asked for {} / {expect_bytes}",
            h.n_reads,
            h.a,
            batch.read_count()
        )));
    }
    // The size is what this batch asked for, never what the peer claims.
    let total = usize::try_from(expect_bytes)
        .map_err(|_| TransferError::InvalidBatch("read bytes exceed address space".into()))?;
    let mut buf = BytesMut::with_capacity(total);
    while buf.len() < total {
        let want = total - buf.len();
        if conn.read_buf(&mut (&mut buf).limit(want)).await? == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
    }
    let mut all = buf.freeze();
    let mut report = BatchReport {
        bytes_read: expect_bytes,
        ..BatchReport::default()
    };
    for op in &batch.ops {
        match op {
            Op::Write { data, .. } => report.bytes_written += data.len() as u64,
            // Each len is bounded by `total`, already checked above.
            Op::Read { len, .. } => report.reads.push(all.split_to(*len as usize)),
        }
    }
    Ok(Exchange::Done {
        result: Ok(report),
        reusable: true,
    })
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    parts: &mut VecDeque<Bytes>,
) -> io::Result<()> {
    while !parts.is_empty() {
        let written = {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for (slot, part) in iov.iter_mut().zip(parts.iter()) {
                *slot = IoSlice::new(part);
                n += 1;
            }
            w.write_vectored(&iov[..n]).await?
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        advance(parts, written);
    }
    Ok(())
}

fn advance(parts: &mut VecDeque<Bytes>, mut n: usize) {
    while let Some(front) = parts.front_mut() {
        if front.len() > n {
            let _ = front.split_to(n);
            return;
        }
        n -= front.len();
        parts.pop_front();
        if n == 0 {
            break;
        }
    }
    while parts.front().is_some_and(Bytes::is_empty) {
        parts.pop_front();
    }
}

// ---------------------------------------------------------------- server ---

/// How a listener admits connections: the key peers must prove (`None`: the
/// open plane, no handshake), the deadline for it, and the gate bounding
/// pending and established connections.
pub(crate) struct Admission {
    pub key: Option<AuthKey>,
    /// Mutual TLS before anything else (TCP listener only).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub handshake_timeout: Duration,
    pub gate: Arc<Gate>,
}

/// Accepts connections until `shutdown` turns true (or its sender is
/// dropped), then drops the listener so new connects are refused. Accepting
/// never waits for a free slot: every connection is taken off the backlog at
/// once and either admitted or closed by its own task, so a flood of idle
/// sockets cannot leave a real peer unanswered in the backlog.
pub(crate) async fn serve(
    listener: Listener,
    local: Arc<LocalSegments>,
    mut shutdown: watch::Receiver<bool>,
    admission: Arc<Admission>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = wait_shutdown(&mut shutdown) => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok(stream) => {
                let host = stream.peer_host().unwrap_or_default();
                let pending = admission.gate.pending(&host);
                tokio::spawn(serve_connection(
                    stream,
                    host,
                    pending,
                    local.clone(),
                    shutdown.clone(),
                    admission.clone(),
                ));
            }
            Err(e) => {
                // Usually fd exhaustion; back off instead of spinning.
                tracing::warn!(error = %e, "transfer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!("transfer listener stopped");
}

/// One accepted connection: admission (handshake under the deadline, or
/// eviction by a newer connection), then the frames.
async fn serve_connection(
    stream: Stream,
    host: String,
    mut pending: Pending,
    local: Arc<LocalSegments>,
    mut shutdown: watch::Receiver<bool>,
    admission: Arc<Admission>,
) {
    let counters = admission.gate.counters();
    let deadline = tokio::time::Instant::now() + admission.handshake_timeout;
    let handshake = tokio::select! {
        biased;
        _ = wait_shutdown(&mut shutdown) => return,
        // Counted by the gate when it evicted us.
        _ = pending.evicted() => {
            tracing::debug!(peer = %host, "pending transfer connection evicted by a newer one");
            return;
        }
        r = tokio::time::timeout_at(deadline, handshake(stream, &host, &admission)) => r,
    };
    drop(pending);
    let mut conn = match handshake {
        Ok((Some(conn), Ok(()))) => {
            counters.handshake(HandshakeOutcome::Accepted);
            conn
        }
        Ok((conn, Err(refusal))) => {
            counters.handshake(refusal.outcome());
            tracing::debug!(peer = %host, reason = %refusal, "transfer connection refused");
            if let (Some(mut conn), Refusal::NoHandshake) = (conn, &refusal) {
                // A peer without the secret: say why, so its operator sees
                // more than a reset.
                let why = TransferError::Unauthenticated(
                    "this transfer plane requires the fleet secret".into(),
                );
                let _ = tokio::time::timeout_at(
                    deadline.max(tokio::time::Instant::now() + REFUSAL_LINGER),
                    conn.say_and_close(&wire::encode_error_reply(&why, true)),
                )
                .await;
            }
            return;
        }
        Ok((None, Ok(()))) => return,
        Err(_) => {
            counters.handshake(HandshakeOutcome::Deadline);
            tracing::debug!(peer = %host, "transfer connection closed: no handshake within the deadline");
            return;
        }
    };
    let Some(slot) = admission.gate.establish(&host) else {
        tracing::warn!(peer = %host, "transfer listener at its connection cap; closing a new connection");
        let _ = tokio::time::timeout(REFUSAL_LINGER, conn.tell_busy(admission.key.is_some())).await;
        return;
    };
    if admission.key.is_some() {
        match tokio::time::timeout(admission.handshake_timeout, auth::admit(&mut conn.wr)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
    // Biased: once the engine shut down, a batch already waiting on the socket must not be
    // applied to a segment its owner has let go (an unbiased pick did, now and then).
    tokio::select! {
        biased;
        _ = wait_shutdown(&mut shutdown) => {}
        r = conn.run(&local) => {
            if let Err(e) = r {
                tracing::debug!(peer = %host, error = %e, "transfer connection closed");
            }
        }
    }
    drop(slot);
}

/// TLS (when configured, on a TCP connection), then the fleet-secret
/// handshake inside it; the connection is returned unless TLS failed.
async fn handshake(
    stream: Stream,
    host: &str,
    admission: &Admission,
) -> (Option<ServerConn>, Result<(), Refusal>) {
    let stream = match (&admission.tls, stream) {
        (Some(tls), Stream::Tcp(tcp)) => match tls.accept(tcp).await {
            Ok(s) => Stream::Tls(Box::new(s.into())),
            Err(e) => return (None, Err(Refusal::Tls(e))),
        },
        (_, s) => s,
    };
    let mut conn = ServerConn::new(stream, host);
    let r = conn.handshake(admission.key.as_ref()).await;
    (Some(conn), r)
}

async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

struct ServerConn {
    rd: BufReader<ReadHalf>,
    wr: WriteHalf,
    scratch: Vec<u8>,
    #[cfg(feature = "rdma")]
    peer_host: String,
}

impl ServerConn {
    fn new(
        stream: Stream,
        #[cfg_attr(not(feature = "rdma"), allow(unused_variables))] host: &str,
    ) -> ServerConn {
        let (rd, wr) = stream.into_split();
        ServerConn {
            rd: BufReader::with_capacity(SERVER_READ_BUFFER, rd),
            wr,
            scratch: Vec::new(),
            // RDMA connections are capped per peer host: each connect exchange
            // arrives on a fresh TCP connection, so the port says nothing.
            #[cfg(feature = "rdma")]
            peer_host: host.to_owned(),
        }
    }

    /// With a key, the fleet-secret handshake; without one, only the wait
    /// for the first bytes (kept in the buffer for the first frame), so an
    /// idle socket is still closed at the deadline.
    async fn handshake(&mut self, key: Option<&AuthKey>) -> Result<(), Refusal> {
        match key {
            Some(key) => auth::server(&mut self.rd, &mut self.wr, key).await,
            None => self.rd.fill_buf().await.map(|_| ()).map_err(Refusal::Io),
        }
    }

    /// An authenticated peer learns it was turned away for capacity (a busy
    /// verdict); an open-plane peer gets a frame error.
    async fn tell_busy(&mut self, authenticated: bool) -> io::Result<()> {
        if authenticated {
            auth::busy(&mut self.wr).await
        } else {
            let busy =
                TransferError::PeerUnavailable("transfer listener at its connection cap".into());
            self.say_and_close(&wire::encode_error_reply(&busy, true))
                .await
        }
    }

    /// Writes `reply`, half-closes, and reads what the peer already sent
    /// until it closes too: closing with unread bytes would reset the
    /// connection, and a reset can discard the reply before the peer reads
    /// it. The caller bounds it in time.
    async fn say_and_close(&mut self, reply: &[u8]) -> io::Result<()> {
        self.wr.write_all(reply).await?;
        self.wr.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut drained = 0usize;
        // Bounded in bytes as well: a refused peer gets no bulk sink.
        while drained < 64 << 10 {
            match self.rd.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok(())
    }

    async fn run(&mut self, local: &LocalSegments) -> Result<(), TransferError> {
        loop {
            let head = match wire::read_request_head(&mut self.rd).await {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.fatal(e).await),
            };
            self.serve_batch(local, head).await?;
            self.wr.flush().await?;
        }
    }

    /// Tells the client why (best effort) before the connection is dropped;
    /// the stream cannot be resynchronised after a malformed frame.
    async fn fatal(&mut self, e: TransferError) -> TransferError {
        if matches!(e, TransferError::Protocol(_)) {
            let _ = self.wr.write_all(&wire::encode_error_reply(&e, true)).await;
            let _ = self.wr.flush().await;
        }
        e
    }

    async fn serve_batch(
        &mut self,
        local: &LocalSegments,
        head: wire::RequestHead,
    ) -> Result<(), TransferError> {
        let seg = local.get(&head.segment);
        if head.describe {
            let reply = match seg.as_ref().map(|s| local.advert(s).encode()) {
                Some(Ok(advert)) => wire::encode_describe_reply(&advert),
                Some(Err(e)) => wire::encode_error_reply(&e, false),
                None => wire::encode_error_reply(
                    &TransferError::UnknownSegment(head.segment.clone()),
                    false,
                ),
            };
            self.wr.write_all(&reply).await?;
            return Ok(());
        }
        #[cfg(feature = "rdma")]
        if head.rdma_connect {
            let body = head.notify.unwrap_or_default();
            let reply = match local.rdma_accept(&self.peer_host, seg, &body) {
                Ok(raw) => wire::encode_describe_reply(&raw),
                Err(e) => wire::encode_error_reply(&e, false),
            };
            self.wr.write_all(&reply).await?;
            return Ok(());
        }
        // A generation mismatch means the submitter's view (an shm mapping)
        // is of an earlier registration under this name: treat as unknown.
        let seg = seg.filter(|s| !matches!(head.generation, Some(g) if g != s.generation()));
        let mut failed = match seg {
            Some(_) => None,
            None => Some(TransferError::UnknownSegment(head.segment.clone())),
        };
        // At most MAX_OPS_PER_BATCH entries of 16 bytes.
        let mut reads: Vec<(usize, usize)> = Vec::new();
        for _ in 0..head.n_ops {
            let op = match wire::read_op_header(&mut self.rd).await {
                Ok(op) => op,
                Err(e) => return Err(self.fatal(e).await),
            };
            let range = match (&seg, &failed) {
                (Some(s), None) => match s.check_range(op.offset, op.len) {
                    Ok(r) => Some((s, r)),
                    Err(e) => {
                        failed = Some(e);
                        None
                    }
                },
                _ => None,
            };
            match (op.kind, range) {
                (OpKind::Write, Some((s, (off, len)))) => self.recv_into(s, off, len).await?,
                (OpKind::Write, None) => self.discard(op.len).await?,
                (OpKind::Read, Some((_, r))) => reads.push(r),
                (OpKind::Read, None) => {}
            }
        }
        let seg = match (seg, failed) {
            (Some(seg), None) => seg,
            (_, Some(e)) => {
                self.wr
                    .write_all(&wire::encode_error_reply(&e, false))
                    .await?;
                return Ok(());
            }
            (None, None) => {
                return Err(TransferError::Protocol(
                    "unreachable: no segment and no error".into(),
                ))
            }
        };
        if let Some(payload) = head.notify {
            local.deliver(&head.segment, payload);
        }
        let total: u64 = reads.iter().map(|&(_, len)| len as u64).sum();
        let mut hdr = BytesMut::with_capacity(REPLY_HEADER_LEN);
        ReplyHeader::ok(reads.len() as u32, total).encode(&mut hdr);
        self.wr.write_all(&hdr).await?;
        for (off, len) in reads {
            self.send_from(&seg, off, len).await?;
        }
        Ok(())
    }

    /// Receives `len` payload bytes straight into `seg[off..off+len]`.
    async fn recv_into(
        &mut self,
        seg: &Segment,
        off: usize,
        len: usize,
    ) -> Result<(), TransferError> {
        if self.rd.get_ref().raw().is_none() {
            return self.recv_copied(seg, off, len).await;
        }
        let mut done = 0;
        // Bytes the header reads already pulled into the BufReader.
        let buffered = self.rd.buffer();
        if !buffered.is_empty() {
            let n = buffered.len().min(len);
            seg.write(off, &buffered[..n])?;
            Pin::new(&mut self.rd).consume(n);
            done = n;
        }
        let Some(sock) = self.rd.get_ref().raw() else {
            return self.recv_copied(seg, off + done, len - done).await;
        };
        while done < len {
            let step = (len - done).min(MAX_IO_STEP);
            sock.readable().await?;
            match seg.with_range_mut(off + done, step, |dst| sock.try_read(dst))? {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Receives `len` payload bytes into `seg[off..off+len]` through a
    /// buffer: the way over a TLS session, which decrypts into it.
    async fn recv_copied(
        &mut self,
        seg: &Segment,
        off: usize,
        len: usize,
    ) -> Result<(), TransferError> {
        self.scratch.resize(DISCARD_CHUNK, 0);
        let mut done = 0;
        while done < len {
            let step = (len - done).min(DISCARD_CHUNK);
            let n = self.rd.read(&mut self.scratch[..step]).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            seg.write(off + done, &self.scratch[..n])?;
            done += n;
        }
        Ok(())
    }

    /// Sends `seg[off..off+len]` through a buffer (over a TLS session).
    async fn send_copied(
        &mut self,
        seg: &Segment,
        off: usize,
        len: usize,
    ) -> Result<(), TransferError> {
        self.scratch.resize(DISCARD_CHUNK, 0);
        let mut done = 0;
        while done < len {
            let step = (len - done).min(DISCARD_CHUNK);
            seg.read_into(off + done, &mut self.scratch[..step])?;
            self.wr.write_all(&self.scratch[..step]).await?;
            done += step;
        }
        Ok(())
    }

    /// Sends `seg[off..off+len]` straight from segment memory.
    async fn send_from(
        &mut self,
        seg: &Segment,
        off: usize,
        len: usize,
    ) -> Result<(), TransferError> {
        let Some(wr) = self.wr.raw() else {
            return self.send_copied(seg, off, len).await;
        };
        let mut done = 0;
        while done < len {
            let step = (len - done).min(MAX_IO_STEP);
            wr.writable().await?;
            match seg.with_range(off + done, step, |src| wr.try_write(src))? {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Consumes a payload that will not be applied, keeping the stream in sync.
    async fn discard(&mut self, len: u64) -> Result<(), TransferError> {
        self.scratch.resize(DISCARD_CHUNK, 0);
        let mut left = len;
        while left > 0 {
            let step = left.min(DISCARD_CHUNK as u64) as usize;
            let n = self.rd.read(&mut self.scratch[..step]).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            left -= n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_handles_partial_writes() {
        let mut parts: VecDeque<Bytes> = [&b"abc"[..], b"de", b"fghi"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        advance(&mut parts, 2);
        assert_eq!(parts[0], Bytes::from_static(b"c"));
        advance(&mut parts, 3);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0], Bytes::from_static(b"fghi"));
        advance(&mut parts, 4);
        assert!(parts.is_empty());
    }

    #[tokio::test]
    async fn vectored_write_delivers_everything_in_order() {
        let (mut a, mut b) = tokio::io::duplex(7);
        let mut parts: VecDeque<Bytes> = (0..200u8).map(|i| Bytes::from(vec![i; 3])).collect();
        let expect: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 600];
            b.read_exact(&mut got).await.unwrap();
            got
        });
        write_all_vectored(&mut a, &mut parts).await.unwrap();
        assert_eq!(reader.await.unwrap(), expect);
    }

    #[tokio::test]
    async fn a_handshake_the_server_hangs_up_on_is_retried_once_on_a_fresh_connection() {
        let secret = crate::auth::Secret::new(b"0123456789abcdef").unwrap();
        let key = AuthKey::derive(&secret).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let k = key.clone();
        let server = tokio::spawn(async move {
            // Connections 1, 3 and 4 are hung up on at once, as an evicted
            // pending one is; 2 is served.
            drop(listener.accept().await.unwrap());
            let (s, _) = listener.accept().await.unwrap();
            let (mut rd, mut wr) = s.into_split();
            auth::server(&mut rd, &mut wr, &k).await.unwrap();
            auth::admit(&mut wr).await.unwrap();
            drop(listener.accept().await.unwrap());
            drop(listener.accept().await.unwrap());
            (rd, wr)
        });
        let t = TcpTransport::new(1, 1 << 20, Some(key), None, Duration::from_secs(2));
        t.open(Addr::Tcp(&addr)).await.unwrap();
        let twice = t.open(Addr::Tcp(&addr)).await;
        assert!(
            matches!(&twice, Err(TransferError::PeerUnavailable(m)) if m.contains("authentication handshake")),
            "{:?}",
            twice.map(|_| ())
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn malformed_request_gets_fatal_reply_and_close() {
        let local = Arc::new(LocalSegments::new(4));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_tx, rx) = watch::channel(false);
        let open = Arc::new(Admission {
            key: None,
            tls: None,
            handshake_timeout: Duration::from_secs(2),
            gate: Gate::new(Default::default(), Default::default()),
        });
        tokio::spawn(serve(Listener::Tcp(listener), local, rx, open));

        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(&[0xEE; wire::REQUEST_HEADER_LEN])
            .await
            .unwrap();
        let mut raw = [0u8; REPLY_HEADER_LEN];
        c.read_exact(&mut raw).await.unwrap();
        let h = ReplyHeader::decode(&raw).unwrap();
        assert_eq!(h.status, ReplyStatus::Fatal);
        let mut msg = vec![0u8; h.msg_len as usize];
        c.read_exact(&mut msg).await.unwrap();
        assert!(String::from_utf8_lossy(&msg).contains("magic"));
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).await.unwrap(), 0);
    }
}
