//! Slicing: cutting one batch into sub-batches ("slices") that separate
//! connections or queue pairs can carry in parallel, and putting read results
//! back together.
//!
//! Pure bookkeeping shared by every transport that parallelises (tcp, rdma):
//! it never does I/O and never copies write payloads (`Bytes::slice`). A
//! batch that fits in one slice is not cut at all, so small batches keep the
//! exact sequential semantics of `batch`; a cut batch has the weaker
//! "all or error" semantics (on failure any subset of its writes may have
//! landed, no notification is sent).

use bytes::{Bytes, BytesMut};

use crate::batch::{Batch, Op};
use crate::error::TransferError;

/// Default slice size, measured with `cargo bench -p pdgate-transfer --bench
/// loopback` (docs/transfer.md): over loopback TCP, 64 KiB slices spend their time
/// in per-slice round trips (~1.5 GB/s), 256 KiB was the best of three sweeps
/// (2.9-4.7 GB/s) and 1-16 MiB sat a little lower (2.3-3.7 GB/s). 256 KiB also
/// keeps in-flight bytes per peer small (connections x 256 KiB).
pub const DEFAULT_SLICE_SIZE: usize = 256 << 10;

/// Where each piece of an original read op ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Every write first, then every read, never in one slice: the caller
    /// runs the slices before `first_read` to completion before any read
    /// slice, so a cut batch's reads still see all its writes, as an uncut
    /// batch's do.
    pub slices: Vec<Batch>,
    pub first_read: usize,
    /// For each original `Op::Read`, in op order: `(slice, read index within
    /// that slice)` of its pieces, in offset order.
    pub reads: Vec<Vec<(usize, usize)>>,
}

/// Cuts `batch` (its notification excluded: the caller sends it after every
/// slice has been acknowledged) into slices of at most `slice_size` payload
/// bytes. Returns `None` when the batch fits in one slice.
pub(crate) fn plan(batch: &Batch, slice_size: usize) -> Option<Plan> {
    let slice_size = slice_size.max(1) as u64;
    if batch.bytes() <= slice_size {
        return None;
    }
    let is_read = |op: &&Op| matches!(op, Op::Read { .. });
    let mut cut = Cutter {
        slice_size,
        slices: Vec::new(),
        cur: Batch::new(),
        cur_bytes: 0,
        cur_reads: 0,
        reads: Vec::new(),
    };
    for op in batch.ops.iter().filter(|op| !is_read(op)) {
        cut.push(op);
    }
    cut.flush();
    let first_read = cut.slices.len();
    for op in batch.ops.iter().filter(is_read) {
        cut.push(op);
    }
    cut.flush();
    Some(Plan {
        slices: cut.slices,
        first_read,
        reads: cut.reads,
    })
}

/// The slices cut so far and the one being filled.
struct Cutter {
    slice_size: u64,
    slices: Vec<Batch>,
    cur: Batch,
    cur_bytes: u64,
    cur_reads: usize,
    reads: Vec<Vec<(usize, usize)>>,
}

impl Cutter {
    fn flush(&mut self) {
        if !self.cur.ops.is_empty() {
            self.slices.push(std::mem::take(&mut self.cur));
        }
        self.cur_bytes = 0;
        self.cur_reads = 0;
    }

    fn push(&mut self, op: &Op) {
        let mut pieces = Vec::new();
        let (off, len) = (op_offset(op), op.len());
        let mut done = 0u64;
        // A zero-length op still becomes one (empty) piece so reads keep
        // one result per op.
        loop {
            if self.cur_bytes >= self.slice_size {
                self.flush();
            }
            let take = (len - done).min(self.slice_size - self.cur_bytes);
            match op {
                Op::Write { data, .. } => {
                    // `take` <= data.len() - done, both usize-sized.
                    let piece = data.slice(done as usize..(done + take) as usize);
                    self.cur.ops.push(Op::Write {
                        remote_offset: off.saturating_add(done),
                        data: piece,
                    });
                }
                Op::Read { .. } => {
                    pieces.push((self.slices.len(), self.cur_reads));
                    self.cur_reads += 1;
                    self.cur.ops.push(Op::Read {
                        remote_offset: off.saturating_add(done),
                        len: take,
                    });
                }
            }
            self.cur_bytes += take;
            done += take;
            if done >= len {
                break;
            }
        }
        if matches!(op, Op::Read { .. }) {
            self.reads.push(pieces);
        }
    }
}

fn op_offset(op: &Op) -> u64 {
    match op {
        Op::Write { remote_offset, .. } | Op::Read { remote_offset, .. } => *remote_offset,
    }
}

/// Rebuilds one result per original read op from the slices' results.
/// A read carried by a single piece is moved, not copied.
pub(crate) fn assemble(
    plan_reads: &[Vec<(usize, usize)>],
    mut results: Vec<Vec<Bytes>>,
) -> Result<Vec<Bytes>, TransferError> {
    let missing = || TransferError::Protocol("slice result missing a read".into());
    let mut out = Vec::with_capacity(plan_reads.len());
    for pieces in plan_reads {
        if let [(s, r)] = pieces[..] {
            let slot = results
                .get_mut(s)
                .and_then(|v| v.get_mut(r))
                .ok_or_else(missing)?;
            out.push(std::mem::take(slot));
            continue;
        }
        let mut total = 0;
        for &(s, r) in pieces {
            total += results
                .get(s)
                .and_then(|v| v.get(r))
                .ok_or_else(missing)?
                .len();
        }
        let mut buf = BytesMut::with_capacity(total);
        for &(s, r) in pieces {
            buf.extend_from_slice(&results[s][r]);
        }
        out.push(buf.freeze());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_reads_never_share_a_slice_and_writes_come_first() {
        let b = Batch::new()
            .read(0, 10)
            .write(0, Bytes::from(vec![1u8; 25]))
            .read(5, 20)
            .write(40, Bytes::from(vec![2u8; 5]));
        let p = plan(&b, 10).expect("cut");
        assert!(p.first_read > 0 && p.first_read < p.slices.len());
        for (i, s) in p.slices.iter().enumerate() {
            let reads = s
                .ops
                .iter()
                .filter(|op| matches!(op, Op::Read { .. }))
                .count();
            let all_reads = reads == s.ops.len();
            assert_eq!(all_reads, i >= p.first_read, "slice {i}: {:?}", s.ops);
        }
        // Each read op's pieces, in op order, still cover its length.
        let lens: Vec<u64> = p
            .reads
            .iter()
            .map(|pieces| {
                pieces
                    .iter()
                    .map(|&(s, r)| {
                        p.slices[s]
                            .ops
                            .iter()
                            .filter(|op| matches!(op, Op::Read { .. }))
                            .nth(r)
                            .map_or(0, Op::len)
                    })
                    .sum()
            })
            .collect();
        assert_eq!(lens, vec![10, 20]);
    }

    #[test]
    fn small_batches_are_not_cut() {
        let b = Batch::new().write(0, Bytes::from(vec![1; 10])).read(0, 10);
        assert!(plan(&b, 20).is_none());
        assert!(plan(&b, 19).is_some());
    }

    #[test]
    fn writes_are_cut_without_copying_and_cover_every_byte() {
        let data = Bytes::from((0..100u8).collect::<Vec<_>>());
        let b = Batch::new()
            .write(1000, data.clone())
            .write(5, Bytes::from_static(b"abc"));
        let p = plan(&b, 30).unwrap();
        assert!(p.slices.iter().all(|s| s.bytes() <= 30));
        let mut covered = Vec::new();
        for s in &p.slices {
            for op in &s.ops {
                if let Op::Write {
                    remote_offset,
                    data: d,
                } = op
                {
                    covered.push((*remote_offset, d.clone()));
                }
            }
        }
        // Offsets advance with the data, and pieces alias the original buffer.
        assert_eq!(covered[0].0, 1000);
        assert_eq!(covered[1].0, 1030);
        assert_eq!(covered[0].1.as_ptr(), data.as_ptr());
        let first: Vec<u8> = covered[..4].iter().flat_map(|(_, d)| d.to_vec()).collect();
        assert_eq!(first, data.to_vec());
        assert_eq!(covered[4], (5, Bytes::from_static(b"abc")));
        assert_eq!(p.slices.iter().map(Batch::bytes).sum::<u64>(), 103);
    }

    #[test]
    fn reads_are_reassembled_in_op_order() {
        let b = Batch::new().read(0, 70).read(500, 0).read(100, 5);
        let p = plan(&b, 32).unwrap();
        assert_eq!(p.reads.len(), 3);
        // Fake a target whose byte at offset o is o as u8.
        let results: Vec<Vec<Bytes>> = p
            .slices
            .iter()
            .map(|s| {
                s.ops
                    .iter()
                    .filter_map(|op| match op {
                        Op::Read { remote_offset, len } => Some(Bytes::from(
                            (*remote_offset..remote_offset + len)
                                .map(|o| o as u8)
                                .collect::<Vec<_>>(),
                        )),
                        Op::Write { .. } => None,
                    })
                    .collect()
            })
            .collect();
        let out = assemble(&p.reads, results).unwrap();
        assert_eq!(out[0], (0..70u8).collect::<Vec<_>>());
        assert!(out[1].is_empty());
        assert_eq!(out[2], (100..105u8).collect::<Vec<_>>());
        assert!(assemble(&p.reads, vec![]).is_err());
    }
}
