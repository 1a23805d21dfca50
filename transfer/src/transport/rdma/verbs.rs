//! The thin verbs layer: every `ibv_*` call the RDMA transport makes, each
//! wrapped once in a type that owns the resource and frees it on drop.
//!
//! Nothing here decides anything (no slicing, no retries, no state
//! machine: `rdma.rs` does that and is unit-tested without hardware); this
//! file only turns verbs' null pointers and errno into `io::Error` and keeps
//! the `unsafe` in one reviewable place. It must never expose a raw pointer
//! that outlives the object owning it.

use std::ffi::CStr;
use std::io;
use std::ptr;

use rdma_sys::*;

use super::runtime::RegisterSegment;
use super::session::{StagingBuf, Verbs};
use super::{QpEndpoint, QpState, RemoteRegion};
use crate::segment::Segment;

fn last_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Names of the RDMA devices visible to this process (empty: none).
pub fn device_names() -> io::Result<Vec<String>> {
    let mut n = 0i32;
    // SAFETY: ibv_get_device_list writes the count into `n` and returns a
    // NULL-terminated array we free with ibv_free_device_list below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Err(last_err("ibv_get_device_list"));
    }
    let mut names = Vec::new();
    for i in 0..n.max(0) as usize {
        // SAFETY: i < n entries are valid device pointers; the name is a
        // NUL-terminated string owned by the device, copied out here.
        unsafe {
            let dev = *list.add(i);
            if !dev.is_null() {
                names.push(
                    CStr::from_ptr(ibv_get_device_name(dev))
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    Ok(names)
}

/// Why `rdma` cannot be used here, naming the fix.
pub fn unavailable_reason() -> String {
    match device_names() {
        Ok(names) if !names.is_empty() => format!(
            "RDMA device(s) {names:?} found, but opening the first one (port 1) failed: check \
             the port is ACTIVE and the memlock limit (`ulimit -l`); or use transport \"auto\" \
             or \"tcp\""
        ),
        Ok(_) | Err(_) => "no RDMA device found (ibv_get_device_list returned none): install an \
             RDMA NIC and its rdma-core provider, or soft-RoCE (`modprobe rdma_rxe; rdma link add \
             rxe0 type rxe netdev eth0`); or use transport \"auto\" or \"tcp\""
            .to_owned(),
    }
}

/// An opened device with its protection domain and one completion queue.
pub struct Context {
    ctx: *mut ibv_context,
    pd: *mut ibv_pd,
    cq: *mut ibv_cq,
    port: u8,
}

// SAFETY: verbs objects may be used from any thread (libibverbs is
// thread-safe); `Context` is only mutated through verbs calls.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Context {
    /// Opens the first device (or the one named `want`), allocates a PD and
    /// a CQ of `cq_depth` entries.
    pub fn open(want: Option<&str>, port: u8, cq_depth: i32) -> io::Result<Context> {
        let mut n = 0i32;
        // SAFETY: as in device_names.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() || n == 0 {
            if !list.is_null() {
                // SAFETY: freed once.
                unsafe { ibv_free_device_list(list) };
            }
            return Err(io::Error::new(io::ErrorKind::NotFound, "no RDMA device"));
        }
        let mut chosen = ptr::null_mut();
        for i in 0..n as usize {
            // SAFETY: i < n entries are valid device pointers.
            let dev = unsafe { *list.add(i) };
            // SAFETY: the device name is a valid C string while `list` lives.
            let name = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) }.to_string_lossy();
            if want.is_none() || want == Some(&*name) {
                chosen = dev;
                break;
            }
        }
        // SAFETY: opening a device from the live list; the context keeps
        // its own reference, so the list can be freed right after.
        let ctx = if chosen.is_null() {
            ptr::null_mut()
        } else {
            unsafe { ibv_open_device(chosen) }
        };
        // SAFETY: freed once.
        unsafe { ibv_free_device_list(list) };
        if ctx.is_null() {
            return Err(last_err("ibv_open_device"));
        }
        let mut c = Context {
            ctx,
            pd: ptr::null_mut(),
            cq: ptr::null_mut(),
            port,
        };
        // SAFETY: ctx is a live context; the PD is freed in Drop.
        c.pd = unsafe { ibv_alloc_pd(ctx) };
        if c.pd.is_null() {
            return Err(last_err("ibv_alloc_pd"));
        }
        // SAFETY: ctx is live; no completion channel, no context pointer.
        c.cq = unsafe { ibv_create_cq(ctx, cq_depth, ptr::null_mut(), ptr::null_mut(), 0) };
        if c.cq.is_null() {
            return Err(last_err("ibv_create_cq"));
        }
        Ok(c)
    }

    /// LID and GID (index 0) of our port, for the handshake.
    pub fn port_address(&self) -> io::Result<(u16, [u8; 16])> {
        // SAFETY: zeroed ibv_port_attr is a valid out-parameter.
        let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: ctx is live and attr is a valid out-pointer.
        if unsafe { ___ibv_query_port(self.ctx, self.port, &mut attr) } != 0 {
            return Err(last_err("ibv_query_port"));
        }
        // SAFETY: zeroed ibv_gid is a valid out-parameter.
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: ctx is live and gid is a valid out-pointer.
        if unsafe { ibv_query_gid(self.ctx, self.port, 0, &mut gid) } != 0 {
            return Err(last_err("ibv_query_gid"));
        }
        // SAFETY: every bit pattern of the union is a valid byte array.
        Ok((attr.lid, unsafe { gid.raw }))
    }

    /// Registers `len` bytes at `addr` for local access and remote
    /// read/write. The caller keeps the memory alive and unmoved while the
    /// returned region lives.
    ///
    /// # Safety
    /// `[addr, addr+len)` must stay valid until the `MemoryRegion` is dropped.
    pub unsafe fn register(&self, addr: *mut u8, len: usize) -> io::Result<MemoryRegion> {
        let access = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_READ)
            .0 as i32;
        // SAFETY: pd is live; the memory contract is the caller's.
        let mr = unsafe { ibv_reg_mr(self.pd, addr.cast(), len, access) };
        if mr.is_null() {
            return Err(last_err("ibv_reg_mr"));
        }
        Ok(MemoryRegion { mr })
    }

    /// Creates an RC queue pair on our PD and CQ.
    pub fn create_qp(&self, max_wr: u32) -> io::Result<QueuePair> {
        self.create_qp_on(self.cq, max_wr)
    }

    /// A completion queue of its own (one per peer connection, so a batch
    /// only ever polls its own completions).
    pub fn create_cq(&self, depth: u32) -> io::Result<CompletionQueue> {
        let depth = i32::try_from(depth).unwrap_or(i32::MAX);
        // SAFETY: ctx is live; no completion channel, no context pointer.
        let cq = unsafe { ibv_create_cq(self.ctx, depth, ptr::null_mut(), ptr::null_mut(), 0) };
        if cq.is_null() {
            return Err(last_err("ibv_create_cq"));
        }
        Ok(CompletionQueue { cq })
    }

    fn create_qp_on(&self, cq: *mut ibv_cq, max_wr: u32) -> io::Result<QueuePair> {
        // SAFETY: zeroed init attrs are valid; the fields that matter are set.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq;
        init.recv_cq = cq;
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.cap.max_send_wr = max_wr;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        init.sq_sig_all = 1;
        // SAFETY: pd is live; init is fully initialised.
        let qp = unsafe { ibv_create_qp(self.pd, &mut init) };
        if qp.is_null() {
            return Err(last_err("ibv_create_qp"));
        }
        Ok(QueuePair {
            qp,
            port: self.port,
            state: QpState::Reset,
        })
    }

    /// Polls up to `max` (at most 16) completions: (wr_id, success).
    pub fn poll(&self, out: &mut Vec<(u64, bool)>, max: usize) -> io::Result<()> {
        poll_cq(self.cq, out, max)
    }
}

fn poll_cq(cq: *mut ibv_cq, out: &mut Vec<(u64, bool)>, max: usize) -> io::Result<()> {
    // SAFETY: a zeroed ibv_wc array is a valid out-buffer.
    let mut wc: [ibv_wc; 16] = unsafe { std::mem::zeroed() };
    let want = max.min(wc.len()) as i32;
    // SAFETY: cq is live (callers own it); wc holds `want` entries.
    let n = unsafe { ibv_poll_cq(cq, want, wc.as_mut_ptr()) };
    if n < 0 {
        return Err(last_err("ibv_poll_cq"));
    }
    for w in &wc[..n as usize] {
        out.push((w.wr_id, w.status == ibv_wc_status::IBV_WC_SUCCESS));
    }
    Ok(())
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: each object was created by us and is destroyed once, in
        // reverse order of creation; queue pairs and regions hold no
        // pointer into the context beyond their own lifetime (they are
        // dropped first by the transport).
        unsafe {
            if !self.cq.is_null() {
                ibv_destroy_cq(self.cq);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
            ibv_close_device(self.ctx);
        }
    }
}

/// A registered memory region (lkey for local SGEs, rkey for peers).
pub struct MemoryRegion {
    mr: *mut ibv_mr,
}

// SAFETY: an MR handle is usable from any thread.
unsafe impl Send for MemoryRegion {}
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    pub fn lkey(&self) -> u32 {
        // SAFETY: mr is live while self is.
        unsafe { (*self.mr).lkey }
    }
    pub fn rkey(&self) -> u32 {
        // SAFETY: mr is live while self is.
        unsafe { (*self.mr).rkey }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered by us, deregistered once.
        unsafe { ibv_dereg_mr(self.mr) };
    }
}

/// One one-sided operation between a local registered range and a remote one.
#[derive(Debug, Clone, Copy)]
pub struct OneSided {
    pub write: bool,
    pub local_addr: u64,
    pub len: u32,
    pub lkey: u32,
    pub remote_addr: u64,
    pub rkey: u32,
}

/// An RC queue pair; state changes go through `QpState::check`.
pub struct QueuePair {
    qp: *mut ibv_qp,
    port: u8,
    state: QpState,
}

// SAFETY: posting to a QP from any thread is allowed by libibverbs.
unsafe impl Send for QueuePair {}
unsafe impl Sync for QueuePair {}

impl QueuePair {
    pub fn qp_num(&self) -> u32 {
        // SAFETY: qp is live while self is.
        unsafe { (*self.qp).qp_num }
    }

    pub fn state(&self) -> QpState {
        self.state
    }

    /// RESET → INIT → RTR (to `remote`) → RTS, the RC bring-up.
    pub fn connect(&mut self, local_psn: u32, remote: &QpEndpoint) -> io::Result<()> {
        let access = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_READ)
            .0;
        // SAFETY (all three blocks): zeroed ibv_qp_attr is valid; qp is
        // live; the mask names exactly the fields set.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = self.port;
        a.qp_access_flags = access;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ibv_qp_attr_mask::IBV_QP_PORT
            | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        self.modify(QpState::Init, &mut a, mask.0 as i32)?;

        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = ibv_mtu::IBV_MTU_1024;
        a.dest_qp_num = remote.qp_num;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = 16;
        a.min_rnr_timer = 12;
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.port_num = self.port;
        if remote.gid != [0u8; 16] {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid.raw = remote.gid;
            a.ah_attr.grh.hop_limit = 1;
        }
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        self.modify(QpState::Rtr, &mut a, mask.0 as i32)?;

        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.timeout = 14;
        a.retry_cnt = 7;
        a.rnr_retry = 7;
        a.sq_psn = local_psn;
        a.max_rd_atomic = 16;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(QpState::Rts, &mut a, mask.0 as i32)
    }

    fn modify(&mut self, to: QpState, attr: &mut ibv_qp_attr, mask: i32) -> io::Result<()> {
        self.state
            .check(to)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: qp is live; attr/mask were filled consistently by connect.
        if unsafe { ibv_modify_qp(self.qp, attr, mask) } != 0 {
            self.state = QpState::Error;
            return Err(last_err("ibv_modify_qp"));
        }
        self.state = to;
        Ok(())
    }

    /// Posts one signalled RDMA WRITE or READ described by `t`.
    ///
    /// # Safety
    /// `[t.local_addr, +t.len)` must lie in a live region registered with
    /// `t.lkey` and stay valid until this wr_id's completion is polled.
    pub unsafe fn post(&self, wr_id: u64, t: &OneSided) -> io::Result<()> {
        let OneSided {
            write,
            local_addr: addr,
            len,
            lkey,
            remote_addr,
            rkey,
        } = *t;
        let mut sge = ibv_sge {
            addr,
            length: len,
            lkey,
        };
        // SAFETY: a zeroed send WR is valid; the used fields are set below.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = if write {
            ibv_wr_opcode::IBV_WR_RDMA_WRITE
        } else {
            ibv_wr_opcode::IBV_WR_RDMA_READ
        };
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.wr = wr_t {
            rdma: rdma_t { remote_addr, rkey },
        };
        let mut bad = ptr::null_mut();
        // SAFETY: qp is live; wr and sge live across the call (verbs copies
        // them); the memory contract is the caller's.
        if unsafe { ibv_post_send(self.qp, &mut wr, &mut bad) } != 0 {
            return Err(last_err("ibv_post_send"));
        }
        Ok(())
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: created by us, destroyed once.
        unsafe { ibv_destroy_qp(self.qp) };
    }
}

/// A completion queue owned by one peer connection.
pub struct CompletionQueue {
    cq: *mut ibv_cq,
}

// SAFETY: a CQ handle may be polled from any thread; the session polls it
// from one task at a time.
unsafe impl Send for CompletionQueue {}
unsafe impl Sync for CompletionQueue {}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: created by us, destroyed once, after the QPs using it (the
        // session's field order guarantees that).
        unsafe { ibv_destroy_cq(self.cq) };
    }
}

/// A heap buffer registered as its own MR: the RDMA path's staging memory.
/// Field order: the MR is deregistered before the memory is freed.
pub struct RegisteredBuf {
    mr: MemoryRegion,
    mem: Box<[u8]>,
}

impl RegisteredBuf {
    fn addr(&self) -> u64 {
        self.mem.as_ptr() as u64
    }
}

impl StagingBuf for RegisteredBuf {
    fn copy_in(&mut self, data: &[u8]) {
        self.mem[..data.len()].copy_from_slice(data);
    }
    fn copy_out(&self, out: &mut [u8]) {
        out.copy_from_slice(&self.mem[..out.len()]);
    }
}

/// The [`Verbs`] implementation over libibverbs: one opened device and PD;
/// CQs, QPs and staging buffers are created per connection.
pub struct IbVerbs {
    ctx: Context,
}

impl IbVerbs {
    /// Opens the first RDMA device (or `want`) on `port`.
    pub fn open(want: Option<&str>, port: u8) -> io::Result<IbVerbs> {
        Ok(IbVerbs {
            ctx: Context::open(want, port, 16)?,
        })
    }

    /// Registers a segment's memory so peers can WRITE/READ it.
    ///
    /// # Safety
    /// `[addr, addr+len)` must stay valid and unmoved until the returned
    /// region is dropped.
    pub unsafe fn register_segment(&self, addr: *mut u8, len: usize) -> io::Result<MemoryRegion> {
        // SAFETY: forwarded contract.
        unsafe { self.ctx.register(addr, len) }
    }
}

impl Verbs for IbVerbs {
    type Cq = CompletionQueue;
    type Qp = QueuePair;
    type Buf = RegisteredBuf;

    fn port_address(&self) -> io::Result<(u16, [u8; 16])> {
        self.ctx.port_address()
    }

    fn create_cq(&self, depth: u32) -> io::Result<CompletionQueue> {
        self.ctx.create_cq(depth)
    }

    fn create_qp(&self, cq: &CompletionQueue, max_send_wr: u32) -> io::Result<QueuePair> {
        self.ctx.create_qp_on(cq.cq, max_send_wr)
    }

    fn qp_num(&self, qp: &QueuePair) -> u32 {
        qp.qp_num()
    }

    fn qp_state(&self, qp: &QueuePair) -> QpState {
        qp.state()
    }

    fn connect_qp(
        &self,
        qp: &mut QueuePair,
        local_psn: u32,
        remote: &QpEndpoint,
    ) -> io::Result<()> {
        qp.connect(local_psn, remote)
    }

    fn alloc_buf(&self, len: usize) -> io::Result<RegisteredBuf> {
        let mut mem = vec![0u8; len].into_boxed_slice();
        // SAFETY: the boxed slice never moves (it is not resized) and is
        // freed only after `mr` is deregistered (RegisteredBuf field order).
        let mr = unsafe { self.ctx.register(mem.as_mut_ptr(), len) }?;
        Ok(RegisteredBuf { mr, mem })
    }

    fn post(
        &self,
        qp: &QueuePair,
        wr_id: u64,
        buf: &RegisteredBuf,
        len: u32,
        write: bool,
        remote: RemoteRegion,
        remote_addr: u64,
    ) -> io::Result<()> {
        if len as usize > buf.mem.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "work request exceeds staging buffer",
            ));
        }
        let t = OneSided {
            write,
            local_addr: buf.addr(),
            len,
            lkey: buf.mr.lkey(),
            remote_addr,
            rkey: remote.rkey,
        };
        // SAFETY: `[addr, +len)` lies in `buf`, registered with its lkey.
        // The session owns `buf` in the same `Connection` as `qp`, destroys
        // the QPs before freeing buffers, and never reuses a buffer before
        // its completion is polled (a connection with work possibly in
        // flight is poisoned and dropped, not reused).
        unsafe { qp.post(wr_id, &t) }
    }

    fn poll(&self, cq: &CompletionQueue, out: &mut Vec<(u64, bool)>, max: usize) -> io::Result<()> {
        poll_cq(cq.cq, out, max)
    }
}

/// A segment registered for remote access. Field order: the MR is
/// deregistered before the segment handle (and so possibly its memory) goes.
pub struct SegmentMr {
    _mr: MemoryRegion,
    _seg: Segment,
}

impl RegisterSegment for IbVerbs {
    type Mr = SegmentMr;

    fn register_segment(&self, seg: &Segment) -> io::Result<(SegmentMr, RemoteRegion)> {
        let len = seg.len();
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot register an empty segment",
            ));
        }
        let addr = seg
            .with_range_mut(0, len, |b| b.as_mut_ptr())
            .map_err(io::Error::other)?;
        // SAFETY: a segment's memory (a boxed slice or a shared mapping) is
        // allocated once at registration and never moved or resized, and
        // `SegmentMr` holds a handle to it until after the MR is
        // deregistered (field order), so `[addr, addr+len)` stays valid for
        // the MR's lifetime.
        let mr = unsafe { self.ctx.register(addr, len) }?;
        let rkey = mr.rkey();
        Ok((
            SegmentMr {
                _mr: mr,
                _seg: seg.clone(),
            },
            RemoteRegion {
                addr: addr as u64,
                rkey,
                len: len as u64,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_names_the_fix() {
        let why = unavailable_reason();
        assert!(why.contains("auto") && why.contains("tcp"), "{why}");
    }
}
