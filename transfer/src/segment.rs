//! Segments: named, fixed-size regions of this process's registered memory.
//!
//! A segment is the unit remote peers address: they name it and give an
//! offset. All access is bounds-checked here, once, so transports can hand
//! peer-supplied offsets straight to these methods. Closures passed to the
//! crate-internal accessors run under a synchronous lock and must never
//! `.await` or block for long; a segment must never grow or move, because
//! peers hold its length in their `SegmentDesc`.
//!
//! Memory is either plain heap or a shared mapping (`transport::shm`) that
//! same-host peers write into directly. Such writes bypass this lock, exactly
//! as RDMA writes would: the owner must not read a region a peer may be
//! writing until the batch's notification says it is complete.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::error::TransferError;
use crate::transport::handshake::ShmLocation;
use crate::transport::shm::owner::ShmRegion;

/// A registered memory region. Cloning is cheap and every clone aliases the
/// same bytes.
#[derive(Clone)]
pub struct Segment {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    // Length kept outside the lock so bounds checks and `len()` never contend
    // with a writer holding the lock during a large copy.
    len: usize,
    generation: u64,
    mem: RwLock<Mem>,
    // Kept outside the lock: the advert is read on every handshake.
    shm: Option<ShmLocation>,
}

enum Mem {
    Heap(Box<[u8]>),
    Shared(ShmRegion),
}

impl Mem {
    fn bytes(&self) -> &[u8] {
        match self {
            Mem::Heap(b) => b,
            Mem::Shared(r) => r.bytes(),
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Mem::Heap(b) => b,
            Mem::Shared(r) => r.bytes_mut(),
        }
    }
}

/// A value no earlier registration in any process on this host is likely to
/// have had: pid, wall clock and a counter mixed together.
fn next_generation() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x =
        nanos ^ (u64::from(std::process::id()) << 40) ^ COUNTER.fetch_add(1, Ordering::Relaxed);
    // splitmix64 finaliser, so nearby inputs give unrelated generations.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("name", &self.inner.name)
            .field("len", &self.inner.len)
            .finish()
    }
}

impl Segment {
    pub(crate) fn new(name: &str, len: usize) -> Self {
        Segment {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                len,
                generation: next_generation(),
                // vec![0; n] is calloc-backed, so a large segment costs no
                // page faults until it is touched.
                mem: RwLock::new(Mem::Heap(vec![0u8; len].into_boxed_slice())),
                shm: None,
            }),
        }
    }

    /// A segment backed by a shared mapping same-host peers can write into.
    pub(crate) fn new_shared(name: &str, region: ShmRegion, host: String) -> Self {
        let len = region.bytes().len();
        let shm = Some(region.location(host));
        Segment {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                len,
                generation: next_generation(),
                mem: RwLock::new(Mem::Shared(region)),
                shm,
            }),
        }
    }

    /// Changes with every registration, so peers can tell a re-registered
    /// segment of the same name from the one they cached.
    pub(crate) fn generation(&self) -> u64 {
        self.inner.generation
    }

    pub(crate) fn shm_location(&self) -> Option<&ShmLocation> {
        self.inner.shm.as_ref()
    }

    /// Removes the shared mapping's file name (the memory stays mapped for
    /// every holder); no-op for heap segments.
    pub(crate) fn unlink_shared(&self) {
        if let Mem::Shared(r) = &*self.inner.mem.read() {
            r.unlink();
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn len(&self) -> usize {
        self.inner.len
    }

    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Copies `data` into the segment at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), TransferError> {
        self.with_range_mut(offset, data.len(), |dst| dst.copy_from_slice(data))
    }

    /// Returns a copy of `len` bytes starting at `offset`.
    pub fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>, TransferError> {
        self.with_range(offset, len, |src| src.to_vec())
    }

    /// Copies `out.len()` bytes starting at `offset` into `out`.
    pub fn read_into(&self, offset: usize, out: &mut [u8]) -> Result<(), TransferError> {
        self.with_range(offset, out.len(), |src| out.copy_from_slice(src))
    }

    /// Sets `len` bytes starting at `offset` to `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), TransferError> {
        self.with_range_mut(offset, len, |dst| dst.fill(byte))
    }

    /// Validates `[offset, offset+len)` without touching memory, so callers
    /// can reject an op before consuming its payload from the network.
    pub(crate) fn check_range(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<(usize, usize), TransferError> {
        let oob = || TransferError::OutOfBounds {
            segment: self.inner.name.clone(),
            offset,
            len,
            segment_len: self.inner.len as u64,
        };
        let end = offset.checked_add(len).ok_or_else(oob)?;
        if end > self.inner.len as u64 {
            return Err(oob());
        }
        // Both fit in usize because end <= self.len, which is a usize.
        Ok((offset as usize, len as usize))
    }

    /// Runs `f` on the shared view of `[offset, offset+len)`.
    pub(crate) fn with_range<R>(
        &self,
        offset: usize,
        len: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, TransferError> {
        let (off, len) = self.check_range(offset as u64, len as u64)?;
        let mem = self.inner.mem.read();
        Ok(f(&mem.bytes()[off..off + len]))
    }

    /// Runs `f` on the exclusive view of `[offset, offset+len)`.
    pub(crate) fn with_range_mut<R>(
        &self,
        offset: usize,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, TransferError> {
        let (off, len) = self.check_range(offset as u64, len as u64)?;
        let mut mem = self.inner.mem.write();
        Ok(f(&mut mem.bytes_mut()[off..off + len]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_zeroed_and_round_trips() {
        let s = Segment::new("s", 64);
        assert_eq!(s.len(), 64);
        assert!(!s.is_empty());
        assert_eq!(s.read(0, 64).unwrap(), vec![0u8; 64]);
        s.write(10, b"hello").unwrap();
        assert_eq!(s.read(10, 5).unwrap(), b"hello");
        let mut out = [0u8; 7];
        s.read_into(9, &mut out).unwrap();
        assert_eq!(&out, b"\0hello\0");
        s.fill(0, 4, 0xAB).unwrap();
        assert_eq!(s.read(0, 5).unwrap(), vec![0xAB, 0xAB, 0xAB, 0xAB, 0]);
    }

    #[test]
    fn clones_alias_the_same_memory() {
        let a = Segment::new("s", 8);
        let b = a.clone();
        a.write(0, b"x").unwrap();
        assert_eq!(b.read(0, 1).unwrap(), b"x");
    }

    #[test]
    fn bounds_are_enforced() {
        let s = Segment::new("s", 16);
        assert!(s.write(0, &[1u8; 16]).is_ok());
        assert!(s.read(16, 0).is_ok());
        for (off, len) in [(0usize, 17usize), (16, 1), (17, 0), (usize::MAX, 2)] {
            match s.read(off, len) {
                Err(TransferError::OutOfBounds {
                    segment,
                    segment_len,
                    ..
                }) => {
                    assert_eq!(segment, "s");
                    assert_eq!(segment_len, 16);
                }
                other => panic!("expected OutOfBounds for ({off},{len}), got {other:?}"),
            }
        }
        assert!(s.write(15, b"ab").is_err());
        assert!(s.fill(10, 7, 0).is_err());
        assert!(s.check_range(u64::MAX, 1).is_err());
        // A rejected write must not have touched memory.
        assert_eq!(s.read(15, 1).unwrap(), vec![1]);
    }

    #[test]
    fn empty_segment() {
        let s = Segment::new("e", 0);
        assert!(s.is_empty());
        assert!(s.read(0, 0).unwrap().is_empty());
        assert!(s.read(0, 1).is_err());
    }
}
