//! RDMA transport (cargo feature `rdma`): one-sided RDMA WRITE/READ over
//! reliable-connected queue pairs, several per peer, brought up through a
//! handshake on the metadata channel.
//!
//! This file holds the verbs-independent half, unit-tested without hardware:
//! the RC queue-pair state machine, the handshake record, cutting a batch
//! into work requests spread over QPs, and completion bookkeeping (bounded
//! outstanding work, failed work requests handed back for a retry on another
//! QP). `rdma/verbs.rs` is the thin layer that makes the `ibv_*` calls. It
//! must never post more work than a QP's send queue holds, and never report a
//! batch complete before every one of its work requests has completed.
//!
//! `rdma/session.rs` is the orchestration on top (connect exchange, batch →
//! WRs over QPs, CQ polling, retry on another QP, peer down, notification
//! after data), written against the `session::Verbs` trait and unit-tested
//! with a fake device.
//!
//! `rdma/runtime.rs` is the engine's side: segments registered as MRs, the
//! target half of accepted connections, the initiator's connection pool.
//!
//! Status: device discovery, PD/MR/CQ/QP creation, the INIT→RTR→RTS bring-up
//! and posting/polling are implemented in `verbs.rs` (`IbVerbs`) and compile
//! in CI, and the engine routes batches through the session when both sides
//! have a device; but nothing here has run against an RDMA device (see
//! docs/transfer.md). The wiring is tested end to end with a fake device.

pub(crate) mod runtime;
pub mod session;
pub mod verbs;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::batch::{Batch, Op};
use crate::error::TransferError;

/// Reliable-connected QP states we drive (ibverbs' subset for RC bring-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpState {
    Reset,
    Init,
    /// Ready to receive: knows the remote QP.
    Rtr,
    /// Ready to send: one-sided ops may be posted.
    Rts,
    Error,
}

impl QpState {
    /// Whether `self → to` is a transition the RC bring-up allows.
    pub fn check(self, to: QpState) -> Result<(), String> {
        use QpState::*;
        let ok = matches!(
            (self, to),
            (Reset, Init) | (Init, Rtr) | (Rtr, Rts) | (_, Error) | (Error, Reset) | (Rts, Reset)
        );
        if ok {
            Ok(())
        } else {
            Err(format!("queue pair cannot go from {self:?} to {to:?}"))
        }
    }

    pub fn can_post(self) -> bool {
        self == QpState::Rts
    }
}

/// One side of a QP, exchanged over the metadata channel before RTR.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct QpEndpoint {
    pub qp_num: u32,
    pub lid: u16,
    /// All zero on InfiniBand without GRH; RoCE needs it.
    pub gid: [u8; 16],
    pub psn: u32,
}

/// A peer's registered segment, as its handshake advertises it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteRegion {
    pub addr: u64,
    pub rkey: u32,
    pub len: u64,
}

/// One RDMA work request to post.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkRequest {
    pub wr_id: u64,
    pub qp: usize,
    pub write: bool,
    /// Index of the op in the batch, and the byte offset within it.
    pub op: usize,
    pub op_offset: u64,
    pub remote_addr: u64,
    pub len: u32,
}

/// Cuts `batch` into work requests of at most `slice` bytes, round-robin
/// over `qps` queue pairs, after checking every op against `remote` (so a
/// wrong offset fails before anything is posted).
pub fn plan_work(
    batch: &Batch,
    segment: &str,
    remote: RemoteRegion,
    slice: u32,
    qps: usize,
) -> Result<Vec<WorkRequest>, TransferError> {
    let slice = u64::from(slice.max(1));
    let qps = qps.max(1);
    let mut out = Vec::new();
    for (i, op) in batch.ops.iter().enumerate() {
        let (off, len, write) = match op {
            Op::Write {
                remote_offset,
                data,
            } => (*remote_offset, data.len() as u64, true),
            Op::Read { remote_offset, len } => (*remote_offset, *len, false),
        };
        match off.checked_add(len) {
            Some(end) if end <= remote.len => {}
            _ => {
                return Err(TransferError::OutOfBounds {
                    segment: segment.to_owned(),
                    offset: off,
                    len,
                    segment_len: remote.len,
                })
            }
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(slice);
            let id = out.len() as u64;
            out.push(WorkRequest {
                wr_id: id,
                qp: (id as usize) % qps,
                write,
                op: i,
                op_offset: done,
                remote_addr: remote.addr + off + done,
                // n <= slice, which came from a u32.
                len: n as u32,
            });
            done += n;
        }
    }
    Ok(out)
}

/// Outstanding work of one batch: bounded per QP, completions matched by
/// wr_id, failures collected for a retry on another QP.
#[derive(Debug)]
pub struct Completions {
    per_qp_limit: usize,
    outstanding: HashMap<u64, WorkRequest>,
    per_qp: Vec<usize>,
    failed: Vec<WorkRequest>,
    done_bytes: u64,
}

impl Completions {
    pub fn new(qps: usize, per_qp_limit: usize) -> Self {
        Completions {
            per_qp_limit: per_qp_limit.max(1),
            outstanding: HashMap::new(),
            per_qp: vec![0; qps.max(1)],
            failed: Vec::new(),
            done_bytes: 0,
        }
    }

    /// Whether `wr` may be posted now without overrunning its send queue.
    pub fn has_room(&self, qp: usize) -> bool {
        self.per_qp.get(qp).is_some_and(|&n| n < self.per_qp_limit)
    }

    pub fn posted(&mut self, wr: WorkRequest) -> Result<(), TransferError> {
        if !self.has_room(wr.qp) {
            return Err(TransferError::InvalidBatch(format!(
                "send queue of QP {} is full",
                wr.qp
            )));
        }
        if self.outstanding.insert(wr.wr_id, wr).is_some() {
            return Err(TransferError::Protocol(format!(
                "wr_id {} posted twice",
                wr.wr_id
            )));
        }
        self.per_qp[wr.qp] += 1;
        Ok(())
    }

    /// Records one completion from the CQ. Unknown ids are a protocol error
    /// (a completion for another batch means our bookkeeping is broken).
    pub fn completed(&mut self, wr_id: u64, ok: bool) -> Result<(), TransferError> {
        let wr = self.outstanding.remove(&wr_id).ok_or_else(|| {
            TransferError::Protocol(format!("completion for unknown wr_id {wr_id}"))
        })?;
        self.per_qp[wr.qp] -= 1;
        if ok {
            self.done_bytes += u64::from(wr.len);
        } else {
            self.failed.push(wr);
        }
        Ok(())
    }

    /// Failed work requests, moved to the next QP for a retry.
    pub fn take_failed_for_retry(&mut self) -> Vec<WorkRequest> {
        let qps = self.per_qp.len();
        self.failed
            .drain(..)
            .map(|mut wr| {
                wr.qp = (wr.qp + 1) % qps;
                wr
            })
            .collect()
    }

    pub fn is_idle(&self) -> bool {
        self.outstanding.is_empty()
    }

    pub fn done_bytes(&self) -> u64 {
        self.done_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn rc_bring_up_order_is_enforced() {
        use QpState::*;
        assert!(Reset.check(Init).is_ok());
        assert!(Init.check(Rtr).is_ok());
        assert!(Rtr.check(Rts).is_ok());
        assert!(Rts.check(Error).is_ok());
        assert!(Error.check(Reset).is_ok());
        assert!(Reset.check(Rts).is_err());
        assert!(Init.check(Rts).is_err());
        assert!(Error.check(Rts).is_err());
        assert!(Rts.can_post() && !Rtr.can_post());
    }

    #[test]
    fn work_is_sliced_round_robin_and_bounds_checked() {
        let remote = RemoteRegion {
            addr: 0x1000,
            rkey: 7,
            len: 1000,
        };
        let b = Batch::new()
            .write(0, Bytes::from(vec![1; 250]))
            .read(900, 100);
        let w = plan_work(&b, "kv", remote, 100, 2).unwrap();
        assert_eq!(w.len(), 4);
        assert_eq!(w.iter().map(|x| u64::from(x.len)).sum::<u64>(), 350);
        assert_eq!((w[0].qp, w[1].qp, w[2].qp, w[3].qp), (0, 1, 0, 1));
        assert_eq!(
            (w[2].remote_addr, w[2].len, w[2].op_offset),
            (0x1000 + 200, 50, 200)
        );
        assert!(!w[3].write && w[3].remote_addr == 0x1000 + 900);
        let bad = Batch::new().write(0, Bytes::from_static(b"x")).read(999, 2);
        assert!(matches!(
            plan_work(&bad, "kv", remote, 100, 2),
            Err(TransferError::OutOfBounds {
                offset: 999,
                len: 2,
                segment_len: 1000,
                ..
            })
        ));
    }

    #[test]
    fn completions_are_bounded_matched_and_retried_elsewhere() {
        let remote = RemoteRegion {
            addr: 0,
            rkey: 1,
            len: 1 << 20,
        };
        let b = Batch::new().write(0, Bytes::from(vec![0; 400]));
        let work = plan_work(&b, "kv", remote, 100, 2).unwrap();
        let mut c = Completions::new(2, 1);
        c.posted(work[0]).unwrap();
        c.posted(work[1]).unwrap();
        assert!(!c.has_room(0) && !c.has_room(1));
        assert!(c.posted(work[2]).is_err(), "send queue bound");
        c.completed(0, true).unwrap();
        c.completed(1, false).unwrap();
        assert!(c.completed(1, true).is_err(), "completion matched once");
        assert!(c.completed(99, true).is_err());
        let retry = c.take_failed_for_retry();
        assert_eq!(retry.len(), 1);
        assert_eq!(retry[0].qp, 0, "retried on the other QP");
        c.posted(retry[0]).unwrap();
        c.posted(work[3]).unwrap();
        assert!(!c.is_idle());
        c.completed(1, true).unwrap();
        c.completed(3, true).unwrap();
        assert!(c.is_idle());
        assert_eq!(c.done_bytes(), 300);
    }
}
