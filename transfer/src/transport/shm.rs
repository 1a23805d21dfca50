//! Shared-memory transport: for peers on the same host, a batch's writes are
//! a `memcpy` straight into the owner's segment, which lives in a file under
//! /dev/shm that both processes map; reads are a `memcpy` out of it.
//!
//! Completion still goes through the owner: after the copies, a tiny
//! "commit" (a zero-op batch carrying the notification and the segment's
//! generation) is sent and acknowledged over the owner's Unix socket (its
//! TCP port if it advertised none), so the owner
//! learns the data is in place, a dead owner surfaces as an error, and a
//! write into a mapping whose segment was unregistered or re-registered is
//! never reported as success. The file starts with a one-page header whose
//! state word the owner flips to "closed" on unregister/shutdown, so a
//! submitter checks it (one atomic load) before copying and never writes into
//! a segment its owner has let go. This file is the submitter's half,
//! [`ShmTransport`] (its mappings of peers); the owner's half,
//! [`owner::ShmRegion`] (the owner's mapping and its file's lifetime), is in
//! `shm/owner.rs`. Neither may form a Rust reference into a peer's memory
//! (other processes write it concurrently; only raw copies), nor leave a file
//! behind for a segment that was unregistered.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::MmapRaw;
use parking_lot::Mutex;

use crate::batch::{Batch, BatchReport, Op};
use crate::error::TransferError;
use crate::metadata::SegmentDesc;
use crate::transport::handshake::{host_id, SegmentAdvert, ShmLocation};
use crate::transport::kind::TransportKind;
use crate::transport::stream::Addr;
use crate::transport::tcp::TcpTransport;
use crate::transport::Transport;

pub(crate) mod owner;

use self::owner::{
    owner_pid, state_word, CONTROL_SUFFIX, FILE_PREFIX, HEADER_LEN, MAGIC, STATE_LIVE,
};

/// Peers' segments kept mapped; beyond this the cache is emptied (mappings
/// in use stay alive through their `Arc`).
const MAX_ROUTES: usize = 4096;
/// Batches moving more than this are copied on a blocking thread so a
/// multi-millisecond memcpy never stalls the async runtime.
const INLINE_COPY_MAX: u64 = 1 << 20;

/// A peer's segment mapped into this process.
pub(crate) struct PeerMapping {
    raw: MmapRaw,
    len: u64,
    generation: u64,
    /// Where commits go: the owner's Unix socket, when it has one.
    control: Option<PathBuf>,
}

impl PeerMapping {
    /// False once the owner unregistered the segment or shut down.
    fn is_live(&self) -> bool {
        // SAFETY: map_peer checked the mapping covers the header; mmap
        // results are page-aligned.
        unsafe { state_word(self.raw.as_mut_ptr()) }.load(Ordering::Acquire) == STATE_LIVE
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: the mapping is at least HEADER_LEN + len bytes (map_peer).
        unsafe { self.raw.as_mut_ptr().add(HEADER_LEN) }
    }
}

#[derive(Clone)]
enum Route {
    Shm(Arc<PeerMapping>),
    /// The owner is elsewhere or does not offer shm; use another transport.
    NotShm,
}

pub(crate) struct ShmTransport {
    tcp: Arc<TcpTransport>,
    host: String,
    routes: Mutex<HashMap<(String, String), Route>>,
}

impl ShmTransport {
    pub(crate) fn new(tcp: Arc<TcpTransport>) -> Self {
        ShmTransport {
            tcp,
            host: host_id(),
            routes: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn close(&self) {
        self.routes.lock().clear();
    }

    fn forget(&self, target: &SegmentDesc) {
        self.routes
            .lock()
            .remove(&(target.endpoint.clone(), target.name.clone()));
    }

    /// The mapping of `target` if it can be reached over shm, after a
    /// handshake with its owner on first use. `Ok(None)`: use another
    /// transport.
    pub(crate) async fn route(
        &self,
        target: &SegmentDesc,
    ) -> Result<Option<Arc<PeerMapping>>, TransferError> {
        let key = (target.endpoint.clone(), target.name.clone());
        if let Some(r) = self.routes.lock().get(&key) {
            return Ok(match r {
                Route::Shm(m) => Some(m.clone()),
                Route::NotShm => None,
            });
        }
        let route = match self.tcp.describe(&target.endpoint, &target.name).await {
            Ok(advert) => self.map_advert(&advert),
            // An owner that predates the handshake rejects it; it is still
            // reachable over tcp.
            Err(TransferError::Remote(_)) | Err(TransferError::Protocol(_)) => Route::NotShm,
            Err(e) => return Err(e),
        };
        let mut routes = self.routes.lock();
        if routes.len() >= MAX_ROUTES {
            routes.clear();
        }
        routes.insert(key, route.clone());
        Ok(match route {
            Route::Shm(m) => Some(m),
            Route::NotShm => None,
        })
    }

    fn map_advert(&self, advert: &SegmentAdvert) -> Route {
        let Some(loc) = &advert.shm else {
            return Route::NotShm;
        };
        if loc.host != self.host {
            return Route::NotShm;
        }
        match map_peer(loc, advert) {
            Ok(m) => Route::Shm(Arc::new(m)),
            Err(e) => {
                tracing::debug!(path = %loc.path, error = %e, "peer shm segment not mappable, using tcp");
                Route::NotShm
            }
        }
    }

    /// Submits over shm if the route allows; `Ok(None)` means use another
    /// transport. A cached mapping whose segment was closed or re-registered
    /// is dropped and the handshake redone once.
    pub(crate) async fn submit_routed(
        &self,
        target: &SegmentDesc,
        batch: &Batch,
    ) -> Result<Option<BatchReport>, TransferError> {
        let mut retried = false;
        loop {
            let Some(map) = self.route(target).await? else {
                return Ok(None);
            };
            let stale = if map.is_live() {
                match self.submit_mapped(target, map, batch).await {
                    Err(TransferError::UnknownSegment(_)) if !retried => true,
                    r => return r.map(Some),
                }
            } else {
                true
            };
            self.forget(target);
            if stale && retried {
                return Err(TransferError::UnknownSegment(target.name.clone()));
            }
            retried = true;
        }
    }

    /// Applies `batch` through `map`, then commits it at the owner.
    async fn submit_mapped(
        &self,
        target: &SegmentDesc,
        map: Arc<PeerMapping>,
        batch: &Batch,
    ) -> Result<BatchReport, TransferError> {
        let ops = batch.ops.clone();
        let name = target.name.clone();
        let copy_map = map.clone();
        let big = batch.bytes() > INLINE_COPY_MAX;
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let copied = if big && multi_thread {
            // Copies in place on this worker while tokio moves its other
            // tasks elsewhere: no thread hop, no data moved.
            tokio::task::block_in_place(|| apply_ops(&copy_map, &name, &ops))
        } else if big {
            tokio::task::spawn_blocking(move || apply_ops(&copy_map, &name, &ops))
                .await
                .map_err(|e| TransferError::Protocol(format!("copy task failed: {e}")))?
        } else {
            apply_ops(&copy_map, &name, &ops)
        };
        let (bytes_written, reads) = copied?;
        let commit = Batch {
            ops: Vec::new(),
            notify: batch.notify.clone(),
        };
        if let Err(e) = self.commit(target, &map, &commit).await {
            // Unregistered, re-registered or gone: re-handshake next time.
            self.forget(target);
            return Err(e);
        }
        Ok(BatchReport {
            bytes_written,
            bytes_read: reads.iter().map(|r| r.len() as u64).sum(),
            reads,
            transport: TransportKind::Shm,
            ..BatchReport::default()
        })
    }

    /// Sends `commit` to the owner's Unix socket, or to its TCP port when it
    /// has none or the socket cannot be reached (removed by a cleaner, or its
    /// owner died): `PeerUnavailable` from the stream transport means no frame
    /// was written, so the TCP commit cannot deliver the notification twice,
    /// and a restarted owner answers it with "unknown segment", which
    /// re-handshakes.
    async fn commit(
        &self,
        target: &SegmentDesc,
        map: &PeerMapping,
        commit: &Batch,
    ) -> Result<BatchReport, TransferError> {
        let generation = Some(map.generation);
        if let Some(path) = &map.control {
            match self
                .tcp
                .submit_to(Addr::Unix(path), &target.name, commit, generation)
                .await
            {
                Err(TransferError::PeerUnavailable(e)) => {
                    tracing::debug!(segment = %target.name, error = %e, "owner's commit socket unreachable, committing over tcp");
                }
                r => return r,
            }
        }
        self.tcp
            .submit_at(&target.endpoint, &target.name, commit, generation)
            .await
    }
}

/// The owner's commit socket named in an advert, if its name is one this
/// crate gives (`pdgate-<pid>-<n>-control`) beside the segment file of the
/// same process: an advert may then only point a submitter at that owner's
/// socket, never at any other socket on the host. (`map_peer` also checks
/// the file is a socket, not a link, of the segment file's user.)
fn control_beside(segment: &Path, control: &Path) -> Option<PathBuf> {
    let digits = is_digits;
    let name = control.file_name()?.to_str()?.strip_prefix(FILE_PREFIX)?;
    let mut parts = name.split('-');
    let ok = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(pid), Some(n), Some(CONTROL_SUFFIX), None) => {
            digits(pid)
                && digits(n)
                && control.parent() == segment.parent()
                && segment.file_name().and_then(|f| owner_pid(f.to_str()?)) == Some(pid)
        }
        _ => false,
    };
    ok.then(|| control.to_path_buf())
}

/// True when `path` is itself a socket (not a link to one) of user `uid`.
fn is_own_socket(path: &Path, uid: u32) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket() && m.uid() == uid)
}

fn map_peer(loc: &ShmLocation, advert: &SegmentAdvert) -> io::Result<PeerMapping> {
    let (file, meta) = open_segment_file(loc, advert.len)?;
    let raw = MmapRaw::map_raw(&file)?;
    Ok(PeerMapping {
        raw,
        len: advert.len,
        generation: advert.generation,
        control: loc
            .control
            .as_deref()
            .and_then(|c| control_beside(Path::new(&loc.path), Path::new(c)))
            .filter(|c| is_own_socket(c, meta.uid())),
    })
}

/// Opens the file an advert names, for mapping read/write, only once it is
/// known to be an owner's segment file. An advert comes off the network, so
/// its path must not make this engine open (least of all for writing, which
/// can have effects on devices and FIFOs) anything else: the name must be one
/// this crate gives; the name itself (not a link's target) must be a private
/// regular file of this user with the advertised inode and length; it is
/// opened read-only without following links or blocking, re-checked through
/// the descriptor, and its header magic read; only then is it opened
/// read/write, again without following links, and must still be that file.
fn open_segment_file(loc: &ShmLocation, len: u64) -> io::Result<(File, std::fs::Metadata)> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let path = Path::new(&loc.path);
    let named_ours = path.is_absolute()
        && path
            .file_name()
            .and_then(|f| owner_pid(f.to_str()?))
            .is_some_and(is_digits);
    if !named_ours {
        return Err(io::Error::other("not a pdgate segment file name"));
    }
    let named = std::fs::symlink_metadata(path)?;
    check_segment_file(&named, loc.inode, len)?;
    let open = |write: bool| {
        File::options()
            .read(true)
            .write(write)
            // Never a link's target; never wait on a FIFO swapped in meanwhile.
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
    };
    let ro = open(false)?;
    let meta = ro.metadata()?;
    check_segment_file(&meta, loc.inode, len)?;
    if meta.dev() != named.dev() {
        return Err(io::Error::other("file changed while it was opened"));
    }
    let mut magic = [0u8; 8];
    ro.read_exact_at(&mut magic, 0)?;
    if &magic != MAGIC {
        return Err(io::Error::other("not a pdgate segment file"));
    }
    let rw = open(true)?;
    let checked = rw.metadata()?;
    if (checked.dev(), checked.ino()) != (meta.dev(), meta.ino()) {
        return Err(io::Error::other("file changed while it was opened"));
    }
    Ok((rw, checked))
}

/// A segment file as owners create them (`owner::ShmRegion`): a regular
/// file (not a link, FIFO or device) of this user, mode 0600, with the
/// advertised inode and room for the header and the advertised length.
fn check_segment_file(meta: &std::fs::Metadata, inode: u64, len: u64) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if !meta.file_type().is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if meta.uid() != uid || meta.mode() & 0o077 != 0 {
        return Err(io::Error::other("not a private file of this user"));
    }
    if meta.ino() != inode {
        return Err(io::Error::other("inode differs: not the owner's file"));
    }
    if meta.len() < (HEADER_LEN as u64).saturating_add(len) {
        return Err(io::Error::other("file shorter than the advertised segment"));
    }
    Ok(())
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// The batch semantics of `batch`, against a mapped peer segment: writes in
/// op order, stop at the first out-of-range op, reads after all writes.
fn apply_ops(
    map: &PeerMapping,
    segment: &str,
    ops: &[Op],
) -> Result<(u64, Vec<Bytes>), TransferError> {
    let check = |offset: u64, len: u64| -> Result<usize, TransferError> {
        match offset.checked_add(len) {
            Some(end) if end <= map.len => Ok(offset as usize),
            _ => Err(TransferError::OutOfBounds {
                segment: segment.to_owned(),
                offset,
                len,
                segment_len: map.len,
            }),
        }
    };
    let mut written = 0;
    let mut reads = Vec::new();
    for op in ops {
        match op {
            Op::Write {
                remote_offset,
                data,
            } => {
                let off = check(*remote_offset, data.len() as u64)?;
                // SAFETY: [off, off+len) lies inside the mapping (checked
                // above against `map.len`, which is <= the file length checked
                // at map time), `data` cannot overlap a MAP_SHARED mapping
                // we only touch through raw pointers, and the mapping outlives
                // this call through `map`.
                unsafe {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), map.data().add(off), data.len());
                }
                written += data.len() as u64;
            }
            Op::Read { remote_offset, len } => reads.push((check(*remote_offset, *len)?, *len)),
        }
    }
    let mut out = Vec::with_capacity(reads.len());
    for (off, len) in reads {
        // Checked: len <= map.len, which fits the address space (mapped).
        let len = len as usize;
        let mut buf = Vec::<u8>::with_capacity(len);
        // SAFETY: the source range is inside the mapping (checked above);
        // `buf` has capacity `len` and is fully initialised by the copy
        // before `set_len`.
        unsafe {
            std::ptr::copy_nonoverlapping(map.data().add(off), buf.as_mut_ptr(), len);
            buf.set_len(len);
        }
        out.push(Bytes::from(buf));
    }
    Ok((written, out))
}

#[async_trait::async_trait]
impl Transport for ShmTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    async fn submit(
        &self,
        target: &SegmentDesc,
        batch: &Batch,
    ) -> Result<BatchReport, TransferError> {
        match self.submit_routed(target, batch).await? {
            Some(r) => Ok(r),
            None => Err(TransferError::Unsupported(format!(
                "segment {:?} at {} is not reachable over shm (owner on another host, or its \
                 segment is not in shared memory); use transport \"auto\" or \"tcp\"",
                target.name, target.endpoint
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::owner::ShmRegion;
    use super::*;

    #[test]
    fn region_is_shared_zeroed_and_unlinked_once() {
        let dir = std::env::temp_dir();
        let mut r = ShmRegion::create(&dir, "kv/1 x", 4096).unwrap();
        assert!(r.bytes().iter().all(|&b| b == 0));
        r.bytes_mut()[..3].copy_from_slice(b"abc");
        let loc = r.location("h".into());
        assert!(loc.path.contains("kv_1_x"), "{}", loc.path);
        // A second mapping of the file sees the owner's bytes.
        let advert = SegmentAdvert {
            name: "kv".into(),
            len: 4096,
            generation: 1,
            shm: Some(loc.clone()),
            rdma: None,
        };
        let peer = map_peer(&loc, &advert).unwrap();
        let (_, reads) = apply_ops(
            &peer,
            "kv",
            &[
                Op::Write {
                    remote_offset: 4000,
                    data: Bytes::from_static(b"zz"),
                },
                Op::Read {
                    remote_offset: 0,
                    len: 3,
                },
            ],
        )
        .unwrap();
        assert_eq!(&reads[0][..], b"abc");
        assert_eq!(&r.bytes()[4000..4002], b"zz");
        assert!(matches!(
            apply_ops(
                &peer,
                "kv",
                &[Op::Read {
                    remote_offset: 4095,
                    len: 2
                }]
            ),
            Err(TransferError::OutOfBounds {
                segment_len: 4096,
                ..
            })
        ));
        // Wrong inode: refused.
        let wrong = ShmLocation {
            inode: loc.inode + 1,
            ..loc.clone()
        };
        assert!(map_peer(&wrong, &advert).is_err());
        assert!(peer.is_live());
        r.unlink();
        assert!(!peer.is_live());
        assert!(!Path::new(&loc.path).exists());
        r.unlink();
        drop(r);
        assert!(ShmRegion::create(&dir, "e", 0).is_err());
        // Larger than the filesystem: refused, not a SIGBUS later.
        assert!(ShmRegion::create(&dir, "huge", usize::MAX / 4).is_err());
    }

    #[test]
    fn only_a_private_regular_segment_file_under_its_own_name_is_mapped() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pdgate-mapcheck-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let region = ShmRegion::create(&dir, "kv", 64).unwrap();
        let real = region.location("h".into());
        let advert = SegmentAdvert {
            name: "kv".into(),
            len: 64,
            generation: 1,
            shm: Some(real.clone()),
            rdma: None,
        };
        assert!(
            map_peer(&real, &advert).is_ok(),
            "the owner's own file maps"
        );
        let at = |path: &Path| ShmLocation {
            path: path.to_string_lossy().into_owned(),
            inode: std::fs::metadata(path).unwrap().ino(),
            ..real.clone()
        };
        // A link to the real file, named like one: the name is a link.
        let link = dir.join("pdgate-1-0-link");
        std::os::unix::fs::symlink(&real.path, &link).unwrap();
        // A copy of the real file (magic and all) readable by others.
        let shared = dir.join("pdgate-1-0-shared");
        std::fs::copy(&real.path, &shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o644)).unwrap();
        // A private copy under a name this crate never gives.
        let renamed = dir.join("segment-kv");
        std::fs::copy(&real.path, &renamed).unwrap();
        std::fs::set_permissions(&renamed, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A private file of the right name and size without the magic.
        let plain = dir.join("pdgate-1-0-plain");
        std::fs::write(&plain, vec![0u8; HEADER_LEN + 64]).unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o600)).unwrap();
        for (what, path) in [
            ("link", &link),
            ("shared", &shared),
            ("renamed", &renamed),
            ("plain", &plain),
        ] {
            let r = map_peer(&at(path), &advert);
            assert!(r.is_err(), "{what} was mapped");
        }
        let relative = ShmLocation {
            path: "pdgate-1-0-kv".into(),
            ..real.clone()
        };
        assert!(map_peer(&relative, &advert).is_err());
        drop(region);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_advert_may_only_name_its_owners_own_commit_socket() {
        let seg = Path::new("/dev/shm/pdgate-41-3-kv");
        let ok = Path::new("/dev/shm/pdgate-41-0-control");
        assert_eq!(control_beside(seg, ok).as_deref(), Some(ok));
        for bad in [
            "/run/docker.sock",
            "/dev/shm/pdgate-42-0-control",
            "/tmp/pdgate-41-0-control",
            "/dev/shm/pdgate-41-0-kv",
            "/dev/shm/other-41-0-control",
            "/dev/shm/pdgate-41-3-mycontrol",
            "/dev/shm/pdgate-41-x-control",
            "/dev/shm/pdgate-41-0-1-control",
        ] {
            assert_eq!(control_beside(seg, Path::new(bad)), None, "{bad}");
        }
    }
}
