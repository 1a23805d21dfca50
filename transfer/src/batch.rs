//! Batches: the unit of work submitted against one remote segment.
//!
//! A batch is a list of one-sided ops plus an optional notification that the
//! target delivers once every op has been applied. Semantics shared by every
//! transport: writes are applied in op order and the batch stops at the first
//! failing op (earlier writes stay applied, no notification is delivered);
//! reads are served after all writes of the batch, so a read observes the
//! batch's own writes. A batch of no ops but a notification is valid: a small
//! message to the segment's owner, acknowledged like any batch. This module must never do I/O; it only describes work
//! and checks it against the protocol limits before anything is sent.

use std::time::Duration;

use bytes::Bytes;

use crate::error::TransferError;
use crate::limits::{MAX_NOTIFY_LEN, MAX_OPS_PER_BATCH, MAX_OP_LEN, MAX_SEGMENT_NAME_LEN};
use crate::transport::kind::TransportKind;

/// One one-sided operation against the target segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Copy `data` into the target segment at `remote_offset`.
    Write { remote_offset: u64, data: Bytes },
    /// Fetch `len` bytes of the target segment starting at `remote_offset`.
    Read { remote_offset: u64, len: u64 },
}

impl Op {
    pub(crate) fn len(&self) -> u64 {
        match self {
            Op::Write { data, .. } => data.len() as u64,
            Op::Read { len, .. } => *len,
        }
    }
}

/// Ops plus an optional completion notification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub ops: Vec<Op>,
    /// At most [`MAX_NOTIFY_LEN`] bytes, else submit fails with
    /// `NotificationTooLarge`.
    pub notify: Option<Bytes>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn write(mut self, off: u64, data: Bytes) -> Self {
        self.ops.push(Op::Write {
            remote_offset: off,
            data,
        });
        self
    }

    pub fn read(mut self, off: u64, len: u64) -> Self {
        self.ops.push(Op::Read {
            remote_offset: off,
            len,
        });
        self
    }

    pub fn notify(mut self, payload: Bytes) -> Self {
        self.notify = Some(payload);
        self
    }

    /// Total bytes moved by the batch (written plus read), excluding the
    /// notification.
    pub fn bytes(&self) -> u64 {
        self.ops.iter().map(Op::len).sum()
    }

    pub(crate) fn read_bytes(&self) -> u64 {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Read { len, .. } => *len,
                Op::Write { .. } => 0,
            })
            .sum()
    }

    pub(crate) fn read_count(&self) -> usize {
        self.ops
            .iter()
            .filter(|op| matches!(op, Op::Read { .. }))
            .count()
    }

    /// Rejects, before any byte is sent, what the target's decoder would
    /// reject anyway, so the caller gets a precise error instead of a dropped
    /// connection.
    pub(crate) fn validate(&self, segment: &str) -> Result<(), TransferError> {
        if let Some(n) = &self.notify {
            if n.len() > MAX_NOTIFY_LEN {
                return Err(TransferError::NotificationTooLarge(n.len()));
            }
        }
        if segment.len() > MAX_SEGMENT_NAME_LEN {
            return Err(TransferError::InvalidBatch(format!(
                "segment name of {} bytes exceeds {MAX_SEGMENT_NAME_LEN}",
                segment.len()
            )));
        }
        if self.ops.len() > MAX_OPS_PER_BATCH {
            return Err(TransferError::InvalidBatch(format!(
                "{} ops exceed {MAX_OPS_PER_BATCH} per batch",
                self.ops.len()
            )));
        }
        if let Some((i, op)) = self
            .ops
            .iter()
            .enumerate()
            .find(|(_, op)| op.len() > MAX_OP_LEN)
        {
            return Err(TransferError::InvalidBatch(format!(
                "op {i} moves {} bytes, above the {MAX_OP_LEN}-byte limit",
                op.len()
            )));
        }
        Ok(())
    }
}

/// Outcome of a completed batch.
#[derive(Debug, Default)]
pub struct BatchReport {
    pub bytes_written: u64,
    pub bytes_read: u64,
    /// One entry per `Op::Read`, in op order.
    pub reads: Vec<Bytes>,
    /// Wall time from submit to acknowledgement.
    pub elapsed: Duration,
    /// What carried the bytes (the local fast path reports `Tcp`'s default;
    /// it moves no bytes over any transport).
    pub transport: TransportKind,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_keeps_order_and_counts_bytes() {
        let b = Batch::new()
            .write(0, Bytes::from_static(b"abc"))
            .read(10, 5)
            .write(3, Bytes::from_static(b"de"))
            .notify(Bytes::from_static(b"n"));
        assert_eq!(b.ops.len(), 3);
        assert_eq!(b.bytes(), 10);
        assert_eq!(b.read_bytes(), 5);
        assert_eq!(b.read_count(), 1);
        assert!(matches!(
            b.ops[1],
            Op::Read {
                remote_offset: 10,
                len: 5
            }
        ));
        assert_eq!(b.notify.as_deref(), Some(&b"n"[..]));
        assert!(b.validate("seg").is_ok());
    }

    #[test]
    fn validate_enforces_limits() {
        let big = Batch::new().notify(Bytes::from(vec![0u8; MAX_NOTIFY_LEN + 1]));
        assert!(matches!(
            big.validate("s"),
            Err(TransferError::NotificationTooLarge(n)) if n == MAX_NOTIFY_LEN + 1
        ));
        let ok = Batch::new().notify(Bytes::from(vec![0u8; MAX_NOTIFY_LEN]));
        assert!(ok.validate("s").is_ok());

        let long_name = "x".repeat(MAX_SEGMENT_NAME_LEN + 1);
        assert!(matches!(
            Batch::new().validate(&long_name),
            Err(TransferError::InvalidBatch(_))
        ));
        assert!(matches!(
            Batch::new().read(0, MAX_OP_LEN + 1).validate("s"),
            Err(TransferError::InvalidBatch(_))
        ));
        let many = Batch {
            ops: vec![
                Op::Read {
                    remote_offset: 0,
                    len: 0
                };
                MAX_OPS_PER_BATCH + 1
            ],
            notify: None,
        };
        assert!(matches!(
            many.validate("s"),
            Err(TransferError::InvalidBatch(_))
        ));
    }
}
