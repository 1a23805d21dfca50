//! The engine's RDMA state: segments registered as memory regions (what the
//! handshake advertises), the target half of accepted connections, and the
//! initiator's pool of connected queue pairs per peer.
//!
//! The engine holds it as `Arc<dyn RdmaEngine>` so it never names a device
//! layer: production opens `IbVerbs`, the tests below inject a fake device
//! whose "NIC" copies bytes straight into the target engine's segment, so
//! the wiring (advert → connect exchange over the TCP listener → work
//! requests → commit with generation check) runs end to end in CI. This
//! module must stay free of `unsafe` (memory registration is `verbs.rs`'s),
//! and everything it keeps per peer is bounded.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::Semaphore;

use super::session::{
    self, ConnectRequest, Connection, ControlChannel, RdmaConfig, TargetQps, Verbs,
};
use super::RemoteRegion;
use crate::batch::{Batch, BatchReport};
use crate::error::TransferError;
use crate::segment::Segment;
use crate::transport::handshake::{RdmaLocation, SegmentAdvert};

/// Accepted (target-side) connections kept per peer host. The oldest is
/// torn down beyond this: a restarted initiator never says goodbye, so
/// refusing instead would lock it out behind its own dead QPs.
pub(crate) const MAX_ACCEPTED_PER_PEER: usize = 64;
/// Distinct peers with RDMA state on either side; beyond this new peers are
/// refused (target) or not pooled (initiator).
const MAX_PEERS: usize = 1024;

/// A device layer that can also expose a whole segment for remote access.
pub(crate) trait RegisterSegment: Verbs {
    /// Keeps the registration (and the segment's memory) alive until dropped.
    type Mr: Send + Sync;
    fn register_segment(&self, seg: &Segment) -> io::Result<(Self::Mr, RemoteRegion)>;
}

/// What the engine, the segment table and the TCP listener need from RDMA.
#[async_trait::async_trait]
pub(crate) trait RdmaEngine: Send + Sync {
    /// Registers `seg` as a memory region; on failure the segment is only
    /// reachable over tcp/shm (logged, not fatal).
    fn register(&self, seg: &Segment);
    fn unregister(&self, name: &str);
    /// The advert's `rdma` field for `seg`.
    fn location(&self, seg: &Segment) -> Option<RdmaLocation>;
    /// Target half of the connect exchange for a request from `peer_host`;
    /// returns the encoded `ConnectReply`.
    fn accept(
        &self,
        peer_host: &str,
        seg: Option<Segment>,
        raw_request: &[u8],
    ) -> Result<Vec<u8>, TransferError>;
    /// Runs `batch` against the segment `advert` describes at `endpoint`.
    async fn submit(
        &self,
        control: &dyn ControlChannel,
        endpoint: &str,
        advert: &SegmentAdvert,
        batch: &Batch,
        deadline: Instant,
    ) -> Result<BatchReport, TransferError>;
    /// Drops every connection (engine shutdown).
    fn close(&self);
}

struct Registered<M> {
    generation: u64,
    region: RemoteRegion,
    _mr: M,
}

struct Idle<V: Verbs> {
    segment: String,
    generation: u64,
    conn: Connection<V>,
}

pub(crate) struct RdmaRuntime<V: RegisterSegment> {
    verbs: V,
    cfg: RdmaConfig,
    per_peer: usize,
    mrs: Mutex<HashMap<String, Registered<V::Mr>>>,
    accepted: Mutex<HashMap<String, VecDeque<TargetQps<V>>>>,
    // Caps connections in use per endpoint; the idle pool is capped at the
    // same number, so at most 2 × per_peer connections exist per endpoint.
    permits: Mutex<HashMap<String, Arc<Semaphore>>>,
    idle: Mutex<HashMap<String, VecDeque<Idle<V>>>>,
}

impl<V: RegisterSegment> RdmaRuntime<V> {
    pub(crate) fn new(verbs: V, cfg: RdmaConfig, connections_per_peer: usize) -> Self {
        RdmaRuntime {
            verbs,
            cfg,
            per_peer: connections_per_peer.clamp(1, MAX_ACCEPTED_PER_PEER / 2),
            mrs: Mutex::new(HashMap::new()),
            accepted: Mutex::new(HashMap::new()),
            permits: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
        }
    }

    /// Accepted connections kept for `peer_host`.
    #[cfg(test)]
    pub(crate) fn accepted_from(&self, peer_host: &str) -> usize {
        self.accepted.lock().get(peer_host).map_or(0, VecDeque::len)
    }

    fn permits(&self, endpoint: &str) -> Result<Arc<Semaphore>, TransferError> {
        let mut permits = self.permits.lock();
        if let Some(p) = permits.get(endpoint) {
            return Ok(p.clone());
        }
        if permits.len() >= MAX_PEERS {
            // Only the map holds an unused semaphore.
            permits.retain(|_, p| Arc::strong_count(p) > 1);
            if permits.len() >= MAX_PEERS {
                return Err(TransferError::PeerUnavailable(format!(
                    "{endpoint}: more than {MAX_PEERS} rdma peers in use"
                )));
            }
        }
        let p = Arc::new(Semaphore::new(self.per_peer));
        permits.insert(endpoint.to_owned(), p.clone());
        Ok(p)
    }

    fn take_idle(&self, endpoint: &str, segment: &str, generation: u64) -> Option<Connection<V>> {
        let mut idle = self.idle.lock();
        let q = idle.get_mut(endpoint)?;
        let i = q
            .iter()
            .position(|c| c.segment == segment && c.generation == generation)?;
        q.remove(i).map(|c| c.conn)
    }

    fn put_idle(&self, endpoint: &str, segment: &str, generation: u64, conn: Connection<V>) {
        let mut idle = self.idle.lock();
        if !idle.contains_key(endpoint) && idle.len() >= MAX_PEERS {
            return;
        }
        let q = idle.entry(endpoint.to_owned()).or_default();
        if q.len() >= self.per_peer {
            // Oldest first: its peer-side QPs are the likeliest evicted.
            q.pop_front();
        }
        q.push_back(Idle {
            segment: segment.to_owned(),
            generation,
            conn,
        });
    }
}

#[async_trait::async_trait]
impl<V: RegisterSegment + 'static> RdmaEngine for RdmaRuntime<V> {
    fn register(&self, seg: &Segment) {
        if seg.is_empty() {
            return;
        }
        match self.verbs.register_segment(seg) {
            Ok((mr, region)) => {
                self.mrs.lock().insert(
                    seg.name().to_owned(),
                    Registered {
                        generation: seg.generation(),
                        region,
                        _mr: mr,
                    },
                );
            }
            Err(e) => tracing::warn!(segment = seg.name(), error = %e,
                "rdma memory registration failed; segment reachable over tcp/shm only"),
        }
    }

    fn unregister(&self, name: &str) {
        self.mrs.lock().remove(name);
    }

    fn location(&self, seg: &Segment) -> Option<RdmaLocation> {
        let region = {
            let mrs = self.mrs.lock();
            let r = mrs.get(seg.name())?;
            if r.generation != seg.generation() {
                return None;
            }
            r.region
        };
        let (lid, gid) = self.verbs.port_address().ok()?;
        Some(RdmaLocation {
            gid,
            lid,
            rkey: region.rkey,
            addr: region.addr,
        })
    }

    fn accept(
        &self,
        peer_host: &str,
        seg: Option<Segment>,
        raw_request: &[u8],
    ) -> Result<Vec<u8>, TransferError> {
        let req = ConnectRequest::decode(raw_request)?;
        let seg = seg
            .filter(|s| s.generation() == req.generation)
            .ok_or_else(|| TransferError::UnknownSegment(req.segment.clone()))?;
        let region = match self.mrs.lock().get(seg.name()) {
            Some(r) if r.generation == seg.generation() => r.region,
            _ => {
                return Err(TransferError::Unsupported(format!(
                    "segment {:?} is not registered for rdma here",
                    req.segment
                )))
            }
        };
        {
            let accepted = self.accepted.lock();
            if !accepted.contains_key(peer_host) && accepted.len() >= MAX_PEERS {
                return Err(TransferError::Unsupported(format!(
                    "more than {MAX_PEERS} rdma peers connected"
                )));
            }
        }
        // Device calls outside the lock; a concurrent accept from the same
        // peer only makes the cap below evict one more.
        let (qps, reply) = Connection::accept(&self.verbs, &req, region, &self.cfg)?;
        let raw = reply.encode()?;
        let mut accepted = self.accepted.lock();
        let q = accepted.entry(peer_host.to_owned()).or_default();
        while q.len() >= MAX_ACCEPTED_PER_PEER {
            q.pop_front();
        }
        q.push_back(qps);
        Ok(raw)
    }

    async fn submit(
        &self,
        control: &dyn ControlChannel,
        endpoint: &str,
        advert: &SegmentAdvert,
        batch: &Batch,
        deadline: Instant,
    ) -> Result<BatchReport, TransferError> {
        let _permit = self
            .permits(endpoint)?
            .acquire_owned()
            .await
            .map_err(|_| TransferError::Shutdown)?;
        let (segment, generation) = (advert.name.as_str(), advert.generation);
        let mut conn = match self.take_idle(endpoint, segment, generation) {
            Some(c) => c,
            None => {
                Connection::connect(
                    &self.verbs,
                    control,
                    endpoint,
                    segment,
                    generation,
                    &self.cfg,
                )
                .await?
            }
        };
        let r = session::submit(
            &self.verbs,
            &mut conn,
            control,
            endpoint,
            segment,
            generation,
            batch,
            deadline,
            &self.cfg,
        )
        .await;
        // A poisoned connection may still have work in flight: dropping it
        // tears its QPs down before its buffers.
        if !conn.is_poisoned() {
            self.put_idle(endpoint, segment, generation, conn);
        }
        r
    }

    fn close(&self) {
        self.idle.lock().clear();
        self.accepted.lock().clear();
        self.permits.lock().clear();
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A fake device shared by every engine of a test: a "fabric" maps rkeys
    //! to the target segments, posts move bytes between staging buffers and
    //! those segments, completions land on the posting QP's CQ.

    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::transport::rdma::session::StagingBuf;
    use crate::transport::rdma::{QpEndpoint, QpState};

    #[derive(Default)]
    pub(crate) struct Fabric {
        regions: Mutex<HashMap<u32, (u64, Segment)>>,
        next_rkey: AtomicU32,
        pub(crate) log: Mutex<Vec<String>>,
    }

    type Cq = Arc<Mutex<VecDeque<(u64, bool)>>>;

    pub(crate) struct FakeVerbs {
        pub(crate) fabric: Arc<Fabric>,
        next_qpn: AtomicU32,
        states: Mutex<HashMap<u32, QpState>>,
    }

    impl FakeVerbs {
        pub(crate) fn new(fabric: Arc<Fabric>) -> Self {
            FakeVerbs {
                fabric,
                next_qpn: AtomicU32::new(1),
                states: Mutex::new(HashMap::new()),
            }
        }
    }

    // Interior mutability: the fake NIC fills READ data through `&Buf`.
    pub(crate) struct FakeBuf(Mutex<Vec<u8>>);

    impl StagingBuf for FakeBuf {
        fn copy_in(&mut self, data: &[u8]) {
            self.0.get_mut()[..data.len()].copy_from_slice(data);
        }
        fn copy_out(&self, out: &mut [u8]) {
            out.copy_from_slice(&self.0.lock()[..out.len()]);
        }
    }

    pub(crate) struct FakeMr {
        fabric: Arc<Fabric>,
        rkey: u32,
    }

    impl Drop for FakeMr {
        fn drop(&mut self) {
            self.fabric.regions.lock().remove(&self.rkey);
        }
    }

    impl Verbs for FakeVerbs {
        type Cq = Cq;
        type Qp = (u32, Cq);
        type Buf = FakeBuf;

        fn port_address(&self) -> io::Result<(u16, [u8; 16])> {
            Ok((5, [0; 16]))
        }
        fn create_cq(&self, _depth: u32) -> io::Result<Cq> {
            Ok(Arc::default())
        }
        fn create_qp(&self, cq: &Cq, _max: u32) -> io::Result<(u32, Cq)> {
            let n = self.next_qpn.fetch_add(1, Ordering::Relaxed);
            self.states.lock().insert(n, QpState::Reset);
            Ok((n, cq.clone()))
        }
        fn qp_num(&self, qp: &(u32, Cq)) -> u32 {
            qp.0
        }
        fn qp_state(&self, qp: &(u32, Cq)) -> QpState {
            self.states
                .lock()
                .get(&qp.0)
                .copied()
                .unwrap_or(QpState::Error)
        }
        fn connect_qp(&self, qp: &mut (u32, Cq), _psn: u32, remote: &QpEndpoint) -> io::Result<()> {
            self.states.lock().insert(qp.0, QpState::Rts);
            self.fabric
                .log
                .lock()
                .push(format!("qp {} rts -> {}", qp.0, remote.qp_num));
            Ok(())
        }
        fn alloc_buf(&self, len: usize) -> io::Result<FakeBuf> {
            Ok(FakeBuf(Mutex::new(vec![0; len])))
        }
        fn post(
            &self,
            qp: &(u32, Cq),
            wr_id: u64,
            buf: &FakeBuf,
            len: u32,
            write: bool,
            remote: RemoteRegion,
            remote_addr: u64,
        ) -> io::Result<()> {
            let target = self.fabric.regions.lock().get(&remote.rkey).cloned();
            let ok = match target {
                Some((base, seg)) => {
                    let off = (remote_addr - base) as usize;
                    let len = len as usize;
                    if write {
                        seg.write(off, &buf.0.lock()[..len]).is_ok()
                    } else {
                        let mut dst = buf.0.lock();
                        seg.read_into(off, &mut dst[..len]).is_ok()
                    }
                }
                None => false,
            };
            self.fabric
                .log
                .lock()
                .push(format!("post {wr_id} write={write} ok={ok}"));
            qp.1.lock().push_back((wr_id, ok));
            Ok(())
        }
        fn poll(&self, cq: &Cq, out: &mut Vec<(u64, bool)>, max: usize) -> io::Result<()> {
            let mut q = cq.lock();
            while out.len() < max {
                match q.pop_front() {
                    Some(c) => out.push(c),
                    None => break,
                }
            }
            Ok(())
        }
    }

    impl RegisterSegment for FakeVerbs {
        type Mr = FakeMr;
        fn register_segment(&self, seg: &Segment) -> io::Result<(FakeMr, RemoteRegion)> {
            let rkey = self.fabric.next_rkey.fetch_add(1, Ordering::Relaxed) + 1;
            let base = u64::from(rkey) << 32;
            self.fabric.regions.lock().insert(rkey, (base, seg.clone()));
            Ok((
                FakeMr {
                    fabric: self.fabric.clone(),
                    rkey,
                },
                RemoteRegion {
                    addr: base,
                    rkey,
                    len: seg.len() as u64,
                },
            ))
        }
    }
}
