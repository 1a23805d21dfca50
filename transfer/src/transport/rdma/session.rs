//! RDMA orchestration: the connect exchange that brings a peer's RC queue
//! pairs to RTS, and running one batch as signalled one-sided WRITE/READ work
//! requests spread over those QPs, with completions polled from the
//! connection's CQ, failed work requests retried on another QP, a deadline,
//! and the notification delivered over the control channel only after every
//! byte has landed.
//!
//! Every device call goes through the small [`Verbs`] trait: `verbs.rs`
//! implements it over libibverbs, the unit tests below over a fake that
//! moves bytes in memory and can fail chosen completions, so all of this
//! logic runs in CI without an RDMA device. This module must never contain
//! `unsafe`, never reuse or free a staging buffer while a work request on it
//! may still be in flight (a connection whose batch did not finish cleanly is
//! poisoned and torn down, queue pairs first), and never report a batch
//! complete before every work request of it completed successfully.
//!
//! Buffers: the caller's `Bytes` are not registered; each connection owns a
//! bounded pool of registered staging buffers (`staging_buffers` ×
//! `staging_len`). A WRITE copies its slice in before posting; a READ copies
//! out after its completion. Registering callers' memory per batch would save
//! one copy but costs an `ibv_reg_mr` (a page-pinning syscall) per batch and
//! ties MR lifetime to caller-owned buffers that can be dropped mid-flight;
//! a fixed pool bounds pinned memory and makes the lifetime rule simple.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::{plan_work, Completions, QpEndpoint, QpState, RemoteRegion, WorkRequest};
use crate::batch::{Batch, BatchReport, Op};
use crate::error::TransferError;
use crate::limits::MAX_MESSAGE_LEN;
use crate::transport::kind::TransportKind;

/// Queue pairs per peer unless configured otherwise.
pub const DEFAULT_QPS_PER_PEER: usize = 2;
/// Most QPs a connect request may ask for (bounds the target's work).
pub const MAX_QPS_PER_PEER: usize = 16;

/// Device operations the orchestration needs; one implementation per
/// device layer (libibverbs in `verbs.rs`, an in-memory fake in tests).
///
/// `post` is safe to call: the orchestration guarantees a staging buffer
/// outlives every work request posted on it, because buffers belong to the
/// [`Connection`] and its queue pairs are destroyed before its buffers.
pub trait Verbs: Send + Sync {
    type Cq: Send + Sync;
    type Qp: Send + Sync;
    type Buf: StagingBuf;

    /// LID and GID of the port used, for the peer's address vector.
    fn port_address(&self) -> io::Result<(u16, [u8; 16])>;
    fn create_cq(&self, depth: u32) -> io::Result<Self::Cq>;
    fn create_qp(&self, cq: &Self::Cq, max_send_wr: u32) -> io::Result<Self::Qp>;
    fn qp_num(&self, qp: &Self::Qp) -> u32;
    fn qp_state(&self, qp: &Self::Qp) -> QpState;
    /// RESET → INIT → RTR (towards `remote`) → RTS.
    fn connect_qp(&self, qp: &mut Self::Qp, local_psn: u32, remote: &QpEndpoint) -> io::Result<()>;
    /// A registered buffer of `len` bytes (local write, remote read/write).
    fn alloc_buf(&self, len: usize) -> io::Result<Self::Buf>;
    /// Posts one signalled RDMA WRITE (`buf[..len]` → remote) or READ
    /// (remote → `buf[..len]`).
    // Mirrors one ibv_send_wr's fields; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    fn post(
        &self,
        qp: &Self::Qp,
        wr_id: u64,
        buf: &Self::Buf,
        len: u32,
        write: bool,
        remote: RemoteRegion,
        remote_addr: u64,
    ) -> io::Result<()>;
    /// Appends up to `max` completions `(wr_id, success)`; never blocks.
    fn poll(&self, cq: &Self::Cq, out: &mut Vec<(u64, bool)>, max: usize) -> io::Result<()>;
}

/// Bytes of a registered staging buffer. Only touched while no work
/// request on it is outstanding.
pub trait StagingBuf: Send + Sync {
    /// Copies `data` to the start of the buffer (before a WRITE is posted).
    fn copy_in(&mut self, data: &[u8]);
    /// Copies the first `out.len()` bytes out (after a READ completed).
    fn copy_out(&self, out: &mut [u8]);
}

/// Knobs of the RDMA path.
#[derive(Debug, Clone)]
pub struct RdmaConfig {
    /// RC queue pairs per peer connection (`rdma_qps_per_peer`).
    pub qps_per_peer: usize,
    /// Signalled work requests outstanding per QP (its send queue depth).
    pub max_outstanding_per_qp: usize,
    /// Registered staging buffers per connection, and bytes in each; a work
    /// request never exceeds `staging_len`.
    pub staging_buffers: usize,
    pub staging_len: usize,
    /// Posts of one work request (first try plus retries on other QPs)
    /// before the peer is declared down.
    pub max_attempts: u32,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            qps_per_peer: DEFAULT_QPS_PER_PEER,
            max_outstanding_per_qp: 16,
            staging_buffers: 32,
            staging_len: 256 * 1024,
            max_attempts: 3,
        }
    }
}

/// Initiator → target over the control channel: "create QPs matching
/// these and give me the segment's region".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectRequest {
    pub segment: String,
    /// The segment registration the initiator resolved (stale → refused).
    pub generation: u64,
    pub qps: Vec<QpEndpoint>,
}

/// Target → initiator: its QPs (same order, already at RTS) and the
/// registered segment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectReply {
    pub qps: Vec<QpEndpoint>,
    pub region: RemoteRegion,
}

fn encode_json<T: Serialize>(v: &T, what: &str) -> Result<Vec<u8>, TransferError> {
    let raw = serde_json::to_vec(v)
        .map_err(|e| TransferError::Protocol(format!("{what} encode: {e}")))?;
    if raw.len() > MAX_MESSAGE_LEN {
        return Err(TransferError::Protocol(format!("{what} too large")));
    }
    Ok(raw)
}

impl ConnectRequest {
    pub fn encode(&self) -> Result<Vec<u8>, TransferError> {
        encode_json(self, "rdma connect request")
    }
    pub fn decode(raw: &[u8]) -> Result<Self, TransferError> {
        let r: ConnectRequest = serde_json::from_slice(raw)
            .map_err(|e| TransferError::Protocol(format!("bad rdma connect request: {e}")))?;
        if r.qps.is_empty() || r.qps.len() > MAX_QPS_PER_PEER {
            return Err(TransferError::Protocol(format!(
                "rdma connect request asks for {} QPs (1..={MAX_QPS_PER_PEER})",
                r.qps.len()
            )));
        }
        Ok(r)
    }
}

impl ConnectReply {
    pub fn encode(&self) -> Result<Vec<u8>, TransferError> {
        encode_json(self, "rdma connect reply")
    }
    pub fn decode(raw: &[u8]) -> Result<Self, TransferError> {
        serde_json::from_slice(raw)
            .map_err(|e| TransferError::Protocol(format!("bad rdma connect reply: {e}")))
    }
}

/// The TCP metadata channel as the RDMA path uses it: the connect exchange
/// and the post-data commit that carries the notification.
#[async_trait::async_trait]
pub trait ControlChannel: Send + Sync {
    async fn connect(
        &self,
        endpoint: &str,
        req: ConnectRequest,
    ) -> Result<ConnectReply, TransferError>;
    /// Sent only after all data of the batch completed; the owner checks
    /// `generation` and delivers `notify`.
    async fn commit(
        &self,
        endpoint: &str,
        segment: &str,
        generation: u64,
        notify: Bytes,
    ) -> Result<(), TransferError>;
}

/// Starting PSN of our `i`-th QP; any 24-bit value works, distinct ones make
/// captures readable.
fn psn(i: usize) -> u32 {
    (0x1000 + i as u32 * 0x100) & 0x00ff_ffff
}

/// One peer connection: its CQ, RC QPs at RTS, staging pool and the
/// segment's remote region. Field order is drop order: QPs are destroyed
/// before the CQ and the staging buffers, so no in-flight work request can
/// touch freed memory.
pub struct Connection<V: Verbs> {
    qps: Vec<V::Qp>,
    cq: V::Cq,
    bufs: Vec<V::Buf>,
    region: RemoteRegion,
    /// Set when a batch did not end cleanly (error, timeout, dropped
    /// future): work may still be in flight, so the connection must be torn
    /// down rather than reused.
    poisoned: AtomicBool,
}

impl<V: Verbs> std::fmt::Debug for Connection<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("qps", &self.qps.len())
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

fn create_qps<V: Verbs>(
    verbs: &V,
    cq: &V::Cq,
    n: usize,
    cfg: &RdmaConfig,
) -> Result<(Vec<V::Qp>, Vec<QpEndpoint>), TransferError> {
    let (lid, gid) = verbs.port_address()?;
    let mut qps = Vec::with_capacity(n);
    let mut eps = Vec::with_capacity(n);
    for i in 0..n {
        let qp = verbs.create_qp(cq, cfg.max_outstanding_per_qp as u32)?;
        eps.push(QpEndpoint {
            qp_num: verbs.qp_num(&qp),
            lid,
            gid,
            psn: psn(i),
        });
        qps.push(qp);
    }
    Ok((qps, eps))
}

fn cq_depth(n_qps: usize, cfg: &RdmaConfig) -> u32 {
    (n_qps * cfg.max_outstanding_per_qp).max(1) as u32
}

impl<V: Verbs> Connection<V> {
    /// Initiator side: creates `qps_per_peer` QPs, sends their endpoints
    /// over `control`, and brings each to RTS towards the target's QP of the
    /// same index.
    pub async fn connect(
        verbs: &V,
        control: &dyn ControlChannel,
        endpoint: &str,
        segment: &str,
        generation: u64,
        cfg: &RdmaConfig,
    ) -> Result<Self, TransferError> {
        let n = cfg.qps_per_peer.clamp(1, MAX_QPS_PER_PEER);
        let cq = verbs.create_cq(cq_depth(n, cfg))?;
        let (mut qps, eps) = create_qps(verbs, &cq, n, cfg)?;
        let reply = control
            .connect(
                endpoint,
                ConnectRequest {
                    segment: segment.to_owned(),
                    generation,
                    qps: eps,
                },
            )
            .await?;
        if reply.qps.len() != n {
            return Err(TransferError::Protocol(format!(
                "peer answered {} QPs for our {n}",
                reply.qps.len()
            )));
        }
        for (i, (qp, remote)) in qps.iter_mut().zip(&reply.qps).enumerate() {
            verbs.connect_qp(qp, psn(i), remote)?;
        }
        let bufs = alloc_bufs(verbs, cfg)?;
        Ok(Connection {
            qps,
            cq,
            bufs,
            region: reply.region,
            poisoned: AtomicBool::new(false),
        })
    }

    /// Target side of the connect exchange: matching QPs brought to RTS
    /// towards the initiator's, and the reply naming them and `region` (the
    /// segment's MR). The returned value must be kept as long as the peer
    /// may use the QPs.
    pub fn accept(
        verbs: &V,
        req: &ConnectRequest,
        region: RemoteRegion,
        cfg: &RdmaConfig,
    ) -> Result<(TargetQps<V>, ConnectReply), TransferError> {
        let n = req.qps.len();
        if n == 0 || n > MAX_QPS_PER_PEER {
            return Err(TransferError::Protocol(format!("{n} QPs requested")));
        }
        let cq = verbs.create_cq(cq_depth(n, cfg))?;
        let (mut qps, eps) = create_qps(verbs, &cq, n, cfg)?;
        for (i, (qp, remote)) in qps.iter_mut().zip(&req.qps).enumerate() {
            verbs.connect_qp(qp, psn(i), remote)?;
        }
        Ok((
            TargetQps { qps, _cq: cq },
            ConnectReply { qps: eps, region },
        ))
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub fn region(&self) -> RemoteRegion {
        self.region
    }

    /// Runs `batch` as one-sided work requests; `Ok` only when every work
    /// request completed successfully. Any error, and a dropped future,
    /// poisons the connection.
    pub async fn run(
        &mut self,
        verbs: &V,
        segment: &str,
        batch: &Batch,
        deadline: Instant,
        cfg: &RdmaConfig,
    ) -> Result<BatchReport, TransferError> {
        if self.is_poisoned() {
            return Err(TransferError::PeerUnavailable(
                "rdma connection poisoned by an earlier failure".into(),
            ));
        }
        let mut guard = PoisonOnDrop(&self.poisoned, true);
        let res = run_batch(
            verbs,
            &self.qps,
            &self.cq,
            &mut self.bufs,
            self.region,
            segment,
            batch,
            deadline,
            cfg,
        )
        .await;
        guard.1 = res.is_err();
        res
    }
}

/// The target's half of a connection; dropping it destroys its QPs.
pub struct TargetQps<V: Verbs> {
    qps: Vec<V::Qp>,
    _cq: V::Cq,
}

impl<V: Verbs> TargetQps<V> {
    pub fn states(&self, verbs: &V) -> Vec<QpState> {
        self.qps.iter().map(|q| verbs.qp_state(q)).collect()
    }
}

fn alloc_bufs<V: Verbs>(verbs: &V, cfg: &RdmaConfig) -> Result<Vec<V::Buf>, TransferError> {
    let n = cfg.staging_buffers.max(1);
    let mut bufs = Vec::with_capacity(n);
    for _ in 0..n {
        bufs.push(verbs.alloc_buf(cfg.staging_len.max(1))?);
    }
    Ok(bufs)
}

/// Sets the flag on drop unless disarmed (`.1 == false`).
struct PoisonOnDrop<'a>(&'a AtomicBool, bool);

impl Drop for PoisonOnDrop<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.store(true, Ordering::Release);
        }
    }
}

struct InFlight {
    wr: WorkRequest,
    buf: usize,
    attempts: u32,
}

#[allow(clippy::too_many_arguments)]
async fn run_batch<V: Verbs>(
    verbs: &V,
    qps: &[V::Qp],
    cq: &V::Cq,
    bufs: &mut [V::Buf],
    region: RemoteRegion,
    segment: &str,
    batch: &Batch,
    deadline: Instant,
    cfg: &RdmaConfig,
) -> Result<BatchReport, TransferError> {
    let slice = u32::try_from(cfg.staging_len.max(1)).unwrap_or(u32::MAX);
    let plan = plan_work(batch, segment, region, slice, qps.len())?;
    // Read results, indexed by op; writes get an empty slot.
    let mut reads: Vec<Option<BytesMut>> = batch
        .ops
        .iter()
        .map(|op| match op {
            Op::Read { len, .. } => Some(BytesMut::zeroed(*len as usize)),
            Op::Write { .. } => None,
        })
        .collect();
    let mut alive: Vec<bool> = qps.iter().map(|q| verbs.qp_state(q).can_post()).collect();
    let mut pending: VecDeque<(WorkRequest, u32)> = plan.into_iter().map(|w| (w, 0)).collect();
    let mut inflight: HashMap<u64, InFlight> = HashMap::new();
    let mut free: Vec<usize> = (0..bufs.len()).rev().collect();
    let mut comp = Completions::new(qps.len(), cfg.max_outstanding_per_qp);
    let mut polled = Vec::with_capacity(16);
    let (mut bytes_written, mut bytes_read) = (0u64, 0u64);

    loop {
        if Instant::now() >= deadline {
            return Err(TransferError::Timeout);
        }
        // Post while there is work, a free staging buffer and send-queue room.
        while let Some(&(mut wr, attempts)) = pending.front() {
            let Some(qp) = next_alive(&alive, wr.qp) else {
                return Err(peer_down(segment, "no queue pair left in RTS"));
            };
            wr.qp = qp;
            if !comp.has_room(qp) {
                break;
            }
            let Some(&bi) = free.last() else { break };
            if wr.write {
                let Some(Op::Write { data, .. }) = batch.ops.get(wr.op) else {
                    return Err(TransferError::Protocol("work plan / batch mismatch".into()));
                };
                let from = wr.op_offset as usize;
                let len = wr.len as usize;
                bufs[bi].copy_in(&data[from..from + len]);
            }
            if let Err(e) = verbs.post(
                &qps[qp],
                wr.wr_id,
                &bufs[bi],
                wr.len,
                wr.write,
                region,
                wr.remote_addr,
            ) {
                // A QP that refuses posts is broken (usually in ERROR after a
                // failed completion): stop using it, retry this WR elsewhere.
                tracing::warn!(qp, error = %e, "rdma post failed; retrying on another queue pair");
                alive[qp] = false;
                continue;
            }
            comp.posted(wr)?;
            free.pop();
            pending.pop_front();
            inflight.insert(
                wr.wr_id,
                InFlight {
                    wr,
                    buf: bi,
                    attempts: attempts + 1,
                },
            );
        }
        if pending.is_empty() && comp.is_idle() {
            break;
        }
        polled.clear();
        verbs.poll(cq, &mut polled, 16)?;
        for &(wr_id, ok) in &polled {
            comp.completed(wr_id, ok)?;
            let f = inflight
                .remove(&wr_id)
                .ok_or_else(|| TransferError::Protocol(format!("no buffer for wr_id {wr_id}")))?;
            if ok {
                let len = f.wr.len as usize;
                if f.wr.write {
                    bytes_written += len as u64;
                } else {
                    if let Some(Some(out)) = reads.get_mut(f.wr.op) {
                        let at = f.wr.op_offset as usize;
                        bufs[f.buf].copy_out(&mut out[at..at + len]);
                    }
                    bytes_read += len as u64;
                }
                free.push(f.buf);
                continue;
            }
            // An RC QP goes to ERROR on a failed completion and flushes the
            // rest of its queue, so it is done for this connection.
            alive[f.wr.qp] = false;
            free.push(f.buf);
            if f.attempts >= cfg.max_attempts {
                return Err(peer_down(
                    segment,
                    &format!("work request {wr_id} failed {} times", f.attempts),
                ));
            }
            let mut wr = f.wr;
            wr.qp = (wr.qp + 1) % qps.len();
            pending.push_front((wr, f.attempts));
        }
        // Drop the bookkeeping's own copies of failures; we requeued above.
        let _ = comp.take_failed_for_retry();
        if polled.is_empty() {
            // Nothing completed yet: give other tasks the thread rather than
            // spinning it (completion latency is tens of µs; a yield is far
            // cheaper than an event channel round trip at these rates).
            tokio::task::yield_now().await;
        }
    }
    Ok(BatchReport {
        bytes_written,
        bytes_read,
        reads: reads.into_iter().flatten().map(BytesMut::freeze).collect(),
        elapsed: Default::default(),
        transport: TransportKind::Rdma,
    })
}

/// The first QP at or after `from` (cyclically) still usable.
fn next_alive(alive: &[bool], from: usize) -> Option<usize> {
    let n = alive.len();
    (0..n).map(|k| (from + k) % n).find(|&i| alive[i])
}

fn peer_down(segment: &str, why: &str) -> TransferError {
    TransferError::PeerUnavailable(format!("rdma peer of segment {segment:?} down: {why}"))
}

/// Runs `batch` on `conn`, then, only if every work request completed,
/// delivers its notification through `control` (the owner learns the data
/// is in place exactly as with shm).
#[allow(clippy::too_many_arguments)]
pub async fn submit<V: Verbs>(
    verbs: &V,
    conn: &mut Connection<V>,
    control: &dyn ControlChannel,
    endpoint: &str,
    segment: &str,
    generation: u64,
    batch: &Batch,
    deadline: Instant,
    cfg: &RdmaConfig,
) -> Result<BatchReport, TransferError> {
    let report = conn.run(verbs, segment, batch, deadline, cfg).await?;
    if let Some(n) = &batch.notify {
        control
            .commit(endpoint, segment, generation, n.clone())
            .await?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::sync::Arc;
    use std::time::Duration;

    const BASE: u64 = 0x10_000;

    /// An in-memory device: QPs are numbers with a state, "remote" memory a
    /// vector, completions a queue. Every event goes to a shared log so the
    /// tests can check order (bring-up steps, posts, commit after data).
    #[derive(Default)]
    struct Fake {
        st: Mutex<FakeState>,
        log: Arc<Mutex<Vec<String>>>,
    }

    #[derive(Default)]
    struct FakeState {
        next_qpn: u32,
        qps: HashMap<u32, QpState>,
        remote: Vec<u8>,
        cq: VecDeque<(u64, bool)>,
        /// wr_id → how many more posts of it fail (u32::MAX: always).
        fail: HashMap<u64, u32>,
        /// wr_ids whose completion never arrives.
        lost: Vec<u64>,
    }

    struct FakeBuf(Mutex<Vec<u8>>);

    impl StagingBuf for FakeBuf {
        fn copy_in(&mut self, data: &[u8]) {
            self.0.get_mut()[..data.len()].copy_from_slice(data);
        }
        fn copy_out(&self, out: &mut [u8]) {
            out.copy_from_slice(&self.0.lock()[..out.len()]);
        }
    }

    impl Fake {
        fn with_remote(len: usize, log: Arc<Mutex<Vec<String>>>) -> Self {
            let f = Fake {
                log,
                ..Fake::default()
            };
            f.st.lock().remote = vec![0; len];
            f.st.lock().next_qpn = 100;
            f
        }
        fn ev(&self, e: String) {
            self.log.lock().push(e);
        }
        fn region(&self) -> RemoteRegion {
            RemoteRegion {
                addr: BASE,
                rkey: 42,
                len: self.st.lock().remote.len() as u64,
            }
        }
    }

    impl Verbs for Fake {
        type Cq = ();
        type Qp = u32;
        type Buf = FakeBuf;

        fn port_address(&self) -> io::Result<(u16, [u8; 16])> {
            Ok((7, [1; 16]))
        }
        fn create_cq(&self, _depth: u32) -> io::Result<()> {
            Ok(())
        }
        fn create_qp(&self, _cq: &(), _max: u32) -> io::Result<u32> {
            let mut st = self.st.lock();
            st.next_qpn += 1;
            let n = st.next_qpn;
            st.qps.insert(n, QpState::Reset);
            Ok(n)
        }
        fn qp_num(&self, qp: &u32) -> u32 {
            *qp
        }
        fn qp_state(&self, qp: &u32) -> QpState {
            self.st.lock().qps[qp]
        }
        fn connect_qp(&self, qp: &mut u32, _psn: u32, remote: &QpEndpoint) -> io::Result<()> {
            for to in [QpState::Init, QpState::Rtr, QpState::Rts] {
                let mut st = self.st.lock();
                let cur = st.qps[qp];
                cur.check(to)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                st.qps.insert(*qp, to);
                drop(st);
                self.ev(format!("qp {qp} {to:?} -> {}", remote.qp_num));
            }
            Ok(())
        }
        fn alloc_buf(&self, len: usize) -> io::Result<FakeBuf> {
            Ok(FakeBuf(Mutex::new(vec![0; len])))
        }
        fn post(
            &self,
            qp: &u32,
            wr_id: u64,
            buf: &FakeBuf,
            len: u32,
            write: bool,
            remote: RemoteRegion,
            remote_addr: u64,
        ) -> io::Result<()> {
            let mut st = self.st.lock();
            if !st.qps[qp].can_post() {
                return Err(io::Error::other("qp not in RTS"));
            }
            assert_eq!(remote.rkey, 42);
            self.ev(format!("post {wr_id} on {qp}"));
            if let Some(n) = st.fail.get_mut(&wr_id) {
                if *n > 0 {
                    *n = n
                        .saturating_sub(1)
                        .max(if *n == u32::MAX { u32::MAX } else { 0 });
                    st.qps.insert(*qp, QpState::Error);
                    st.cq.push_back((wr_id, false));
                    return Ok(());
                }
            }
            if st.lost.contains(&wr_id) {
                return Ok(());
            }
            let at = (remote_addr - BASE) as usize;
            let len = len as usize;
            if write {
                let mut tmp = vec![0; len];
                buf.copy_out(&mut tmp);
                st.remote[at..at + len].copy_from_slice(&tmp);
            } else {
                let src = st.remote[at..at + len].to_vec();
                buf.0.lock()[..len].copy_from_slice(&src);
            }
            st.cq.push_back((wr_id, true));
            Ok(())
        }
        fn poll(&self, _cq: &(), out: &mut Vec<(u64, bool)>, max: usize) -> io::Result<()> {
            // One completion per poll, so completion order interleaves with
            // posting as on a real device.
            let mut st = self.st.lock();
            if max > 0 {
                if let Some(c) = st.cq.pop_front() {
                    drop(st);
                    self.ev(format!("complete {} {}", c.0, c.1));
                    out.push(c);
                }
            }
            Ok(())
        }
    }

    /// The control channel, answering the connect exchange with the target
    /// half running on its own fake device.
    struct Control {
        target: Arc<Fake>,
        kept: Mutex<Vec<TargetQps<Fake>>>,
        log: Arc<Mutex<Vec<String>>>,
    }

    #[async_trait::async_trait]
    impl ControlChannel for Control {
        async fn connect(
            &self,
            _endpoint: &str,
            req: ConnectRequest,
        ) -> Result<ConnectReply, TransferError> {
            // Through the real encoding, as over TCP.
            let req = ConnectRequest::decode(&req.encode()?)?;
            let (qps, reply) =
                Connection::accept(&*self.target, &req, self.target.region(), &cfg(2))?;
            assert!(qps.states(&self.target).iter().all(|s| *s == QpState::Rts));
            self.kept.lock().push(qps);
            ConnectReply::decode(&reply.encode()?)
        }
        async fn commit(
            &self,
            _endpoint: &str,
            segment: &str,
            generation: u64,
            notify: Bytes,
        ) -> Result<(), TransferError> {
            self.log.lock().push(format!(
                "commit {segment} {generation} {}",
                String::from_utf8_lossy(&notify)
            ));
            Ok(())
        }
    }

    fn cfg(qps: usize) -> RdmaConfig {
        RdmaConfig {
            qps_per_peer: qps,
            max_outstanding_per_qp: 2,
            staging_buffers: 3,
            staging_len: 100,
            max_attempts: 3,
        }
    }

    /// Initiator device, control channel (with the target's device), log.
    async fn setup(
        qps: usize,
    ) -> (
        Arc<Fake>,
        Control,
        Connection<Fake>,
        Arc<Mutex<Vec<String>>>,
    ) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let local = Arc::new(Fake::with_remote(0, log.clone()));
        local.st.lock().next_qpn = 0;
        let control = Control {
            target: Arc::new(Fake::with_remote(1000, log.clone())),
            kept: Mutex::new(Vec::new()),
            log: log.clone(),
        };
        let conn = Connection::connect(&*local, &control, "peer:1", "kv", 9, &cfg(qps))
            .await
            .unwrap();
        // The fake posts into "remote" memory of the initiator's device, so
        // point it at the target's bytes by sharing the length.
        local.st.lock().remote = vec![0; 1000];
        (local, control, conn, log)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn connect_exchange_brings_every_qp_to_rts_in_order() {
        let (local, control, conn, log) = setup(3).await;
        let log = log.lock().clone();
        assert_eq!(conn.qps.len(), 3);
        let target_qps = &control.kept.lock()[0].qps;
        for (i, qp) in conn.qps.iter().enumerate() {
            assert_eq!(local.qp_state(qp), QpState::Rts);
            // Our i-th QP is paired with the target's i-th, and went
            // INIT → RTR → RTS in that order.
            let peer = target_qps[i];
            let steps: Vec<_> = log
                .iter()
                .filter(|e| e.starts_with(&format!("qp {qp} ")))
                .cloned()
                .collect();
            assert_eq!(
                steps,
                vec![
                    format!("qp {qp} Init -> {peer}"),
                    format!("qp {qp} Rtr -> {peer}"),
                    format!("qp {qp} Rts -> {peer}"),
                ]
            );
        }
        assert_eq!(conn.region().rkey, 42);
        // Bad requests are refused before anything is created.
        assert!(ConnectRequest::decode(br#"{"segment":"kv","generation":1,"qps":[]}"#).is_err());
    }

    #[tokio::test]
    async fn batch_is_cut_over_all_qps_and_completes_with_every_wr() {
        let (local, control, mut conn, log) = setup(2).await;
        let data: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
        let b = Batch::new()
            .write(10, Bytes::from(data.clone()))
            .read(10, 250)
            .notify(Bytes::from_static(b"ready"));
        let r = submit(
            &*local,
            &mut conn,
            &control,
            "peer:1",
            "kv",
            9,
            &b,
            soon(),
            &cfg(2),
        )
        .await
        .unwrap();
        assert_eq!((r.bytes_written, r.bytes_read), (250, 250));
        assert_eq!(r.reads, vec![Bytes::from(data.clone())]);
        assert_eq!(r.transport, TransportKind::Rdma);
        assert_eq!(&local.st.lock().remote[10..260], &data[..]);
        let log = log.lock().clone();
        // 3 WRITE + 3 READ work requests over both QPs, each completed.
        let posts: Vec<_> = log.iter().filter(|e| e.starts_with("post")).collect();
        assert_eq!(posts.len(), 6);
        for qp in &conn.qps {
            assert!(
                posts.iter().any(|p| p.ends_with(&format!("on {qp}"))),
                "{posts:?}"
            );
        }
        let completions = log.iter().filter(|e| e.starts_with("complete")).count();
        assert_eq!(completions, 6);
        // The notification goes after the last completion.
        let last_complete = log.iter().rposition(|e| e.starts_with("complete")).unwrap();
        let commit = log.iter().position(|e| e == "commit kv 9 ready").unwrap();
        assert!(commit > last_complete, "{log:?}");
        assert!(!conn.is_poisoned());
    }

    #[tokio::test]
    async fn missing_completion_is_never_reported_as_done() {
        let (local, _control, mut conn, _log) = setup(2).await;
        local.st.lock().lost.push(1);
        let b = Batch::new().write(0, Bytes::from(vec![1; 300]));
        let started = Instant::now();
        let deadline = started + Duration::from_millis(100);
        let r = conn.run(&*local, "kv", &b, deadline, &cfg(2)).await;
        assert!(matches!(r, Err(TransferError::Timeout)), "{r:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "deadline respected"
        );
        // Work may still be in flight: the connection must not be reused.
        assert!(conn.is_poisoned());
        assert!(conn
            .run(&*local, "kv", &Batch::new(), soon(), &cfg(2))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn failed_completion_is_retried_on_another_qp() {
        let (local, _control, mut conn, log) = setup(2).await;
        local.st.lock().fail.insert(0, 1);
        let b = Batch::new().write(0, Bytes::from(vec![7; 150]));
        let r = conn.run(&*local, "kv", &b, soon(), &cfg(2)).await.unwrap();
        assert_eq!(r.bytes_written, 150);
        assert_eq!(&local.st.lock().remote[..150], &[7; 150][..]);
        let log = log.lock().clone();
        let wr0: Vec<_> = log.iter().filter(|e| e.starts_with("post 0 ")).collect();
        assert_eq!(wr0.len(), 2, "{log:?}");
        assert_ne!(wr0[0], wr0[1], "retry went to the other QP");
        assert!(log.contains(&"complete 0 false".to_owned()));
    }

    #[tokio::test]
    async fn repeated_failures_mark_the_peer_down_without_commit() {
        let (local, control, mut conn, log) = setup(4).await;
        local.st.lock().fail.insert(0, u32::MAX);
        let b = Batch::new()
            .write(0, Bytes::from(vec![7; 50]))
            .notify(Bytes::from_static(b"x"));
        let started = Instant::now();
        let r = submit(
            &*local,
            &mut conn,
            &control,
            "peer:1",
            "kv",
            9,
            &b,
            soon(),
            &cfg(4),
        )
        .await;
        assert!(
            matches!(&r, Err(TransferError::PeerUnavailable(m)) if m.contains("down")),
            "{r:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        let log = log.lock().clone();
        // max_attempts posts, each on a different QP, then no commit.
        assert_eq!(log.iter().filter(|e| e.starts_with("post 0 ")).count(), 3);
        assert!(!log.iter().any(|e| e.starts_with("commit")));
        assert!(conn.is_poisoned());
    }

    #[tokio::test]
    async fn out_of_bounds_fails_before_posting() {
        let (local, _control, mut conn, log) = setup(2).await;
        let b = Batch::new().read(990, 20);
        assert!(matches!(
            conn.run(&*local, "kv", &b, soon(), &cfg(2)).await,
            Err(TransferError::OutOfBounds { .. })
        ));
        assert!(!log.lock().iter().any(|e| e.starts_with("post")));
    }
}
