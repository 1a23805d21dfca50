//! The owner's half of shared memory: a segment's /dev/shm file and its
//! mapping ([`ShmRegion`]), the engine's commit socket beside those files,
//! and the sweep of files left by dead processes; plus the file layout
//! (header page, magic, state word, `pdgate-<pid>-` names) the submitter's
//! half in `shm.rs` reads. Segments are built on this half, and the
//! submitter's half sends commits over TCP, so it is kept apart: a segment
//! must not depend on the TCP transport.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use memmap2::MmapMut;

use crate::transport::handshake::ShmLocation;

/// Where owners create segment files.
pub const SHM_DIR: &str = "/dev/shm";
/// File-name prefix; `pdgate-<pid>-<n>-<name>` lets a sweep find files of
/// dead processes.
pub(super) const FILE_PREFIX: &str = "pdgate-";
/// Last part of the name of an engine's commit socket.
pub(super) const CONTROL_SUFFIX: &str = "control";
/// The file's header page: magic (8 bytes) then the state word (u64).
pub(super) const HEADER_LEN: usize = 4096;
pub(super) const MAGIC: &[u8; 8] = b"PDGSHM01";
pub(super) const STATE_LIVE: u64 = 1;
const STATE_CLOSED: u64 = 2;

/// The state word of a mapping starting at `base`.
///
/// # Safety
/// `base` must point to a live mapping of at least `HEADER_LEN` bytes that
/// is page-aligned (so offset 8 is 8-byte aligned).
pub(super) unsafe fn state_word<'a>(base: *mut u8) -> &'a AtomicU64 {
    // SAFETY: per the contract, base+8 is in bounds and aligned; the word is
    // only ever accessed atomically by every process mapping the file.
    unsafe { &*(base.add(8) as *const AtomicU64) }
}

/// A segment's shared mapping and its /dev/shm file. The file is unlinked on
/// `unlink()` (unregister, engine shutdown) or drop, whichever comes first;
/// mappings already made by peers stay valid until they unmap.
pub(crate) struct ShmRegion {
    map: MmapMut,
    path: PathBuf,
    inode: u64,
    unlinked: AtomicBool,
}

impl ShmRegion {
    /// Creates a fresh, zeroed, `len`-byte file in `dir` and maps it.
    pub(crate) fn create(dir: &Path, name: &str, len: usize) -> io::Result<ShmRegion> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty shm segment",
            ));
        }
        // tmpfs only allocates pages when touched, so an oversized file
        // would be created fine and then SIGBUS on first write once the
        // mount is full (Docker's 64 MiB /dev/shm). Refuse up front instead;
        // `auto` then falls back to heap memory and tcp.
        if let Some(avail) = free_bytes(dir) {
            if (HEADER_LEN + len) as u64 > avail {
                return Err(io::Error::other(format!(
                    "{} has {avail} bytes free, segment needs {}",
                    dir.display(),
                    HEADER_LEN + len
                )));
            }
        }
        let safe: String = name
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = unique_path(dir, &safe);
        // 0600 and O_EXCL: only this user's processes may map it, and a
        // leftover file of the same name is never reused.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let setup = (|| {
            file.set_len((HEADER_LEN + len) as u64)?;
            let inode = file.metadata()?.ino();
            // SAFETY: the file was just created exclusively by us with mode
            // 0600 and sized to `len`; nobody truncates it while mapped (we
            // never do, and peers only map it). Concurrent writes by peers
            // are the point of this mapping; see the module docs.
            let mut map = unsafe { MmapMut::map_mut(&file)? };
            map[..8].copy_from_slice(MAGIC);
            // SAFETY: the mapping is page-aligned and longer than the header.
            unsafe { state_word(map.as_mut_ptr()) }.store(STATE_LIVE, Ordering::Release);
            Ok::<_, io::Error>((map, inode))
        })();
        match setup {
            Ok((map, inode)) => Ok(ShmRegion {
                map,
                path,
                inode,
                unlinked: AtomicBool::new(false),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map[HEADER_LEN..]
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map[HEADER_LEN..]
    }

    pub(crate) fn location(&self, host: String) -> ShmLocation {
        ShmLocation {
            path: self.path.to_string_lossy().into_owned(),
            host,
            inode: self.inode,
            control: None,
        }
    }

    /// Removes the file name if it still refers to our file. Idempotent.
    pub(crate) fn unlink(&self) {
        if self.unlinked.swap(true, Ordering::AcqRel) {
            return;
        }
        // Tell mapped peers first, so no write starts after this point.
        // SAFETY: `map` is our live, page-aligned mapping of HEADER_LEN+ bytes.
        unsafe { state_word(self.map.as_ptr() as *mut u8) }.store(STATE_CLOSED, Ordering::Release);
        match std::fs::metadata(&self.path) {
            Ok(m) if m.ino() == self.inode => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "removing shm segment file failed");
                }
            }
            _ => {}
        }
    }
}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// A fresh name in `dir` that carries this process's id, so `sweep_stale`
/// can tell when its owner is gone.
fn unique_path(dir: &Path, suffix: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(
        "{FILE_PREFIX}{}-{}-{suffix}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The owner's Unix socket for commits from same-host submitters: in the
/// segment files' directory (peers that can map those can reach it), mode
/// 0600 like them, named so a dead process's socket is swept like its files.
pub(crate) fn bind_control(dir: &Path) -> io::Result<(tokio::net::UnixListener, ControlSocket)> {
    use std::os::unix::fs::PermissionsExt;
    let path = unique_path(dir, CONTROL_SUFFIX);
    let listener = tokio::net::UnixListener::bind(&path)?;
    let setup = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::metadata(&path));
    match setup {
        Ok(meta) => Ok((
            listener,
            ControlSocket {
                path,
                inode: meta.ino(),
            },
        )),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// The file of an engine's commit socket.
#[derive(Debug)]
pub(crate) struct ControlSocket {
    path: PathBuf,
    inode: u64,
}

impl ControlSocket {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file if it is still ours (a sweep may have removed it and
    /// another engine reused the name). Idempotent.
    pub(crate) fn remove(&self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Bytes available to us on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: zeroed statvfs is a valid out-parameter; `c` is a valid
    // NUL-terminated path for the duration of the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Removes segment files left by processes that died without cleaning up
/// (SIGKILL, crash). Best effort; returns how many were removed.
pub(crate) fn sweep_stale(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(owner_pid)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// The pid in a `pdgate-<pid>-...` file name this crate gave.
pub(super) fn owner_pid(file_name: &str) -> Option<&str> {
    file_name.strip_prefix(FILE_PREFIX)?.split('-').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_files_of_dead_pids_only() {
        let dir = std::env::temp_dir().join(format!("pdgate-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // pid 0x7fffffff cannot exist (above pid_max).
        std::fs::write(dir.join("pdgate-2147483647-0-x"), b"").unwrap();
        let live = ShmRegion::create(&dir, "live", 8).unwrap();
        std::fs::write(dir.join("other-file"), b"").unwrap();
        assert_eq!(sweep_stale(&dir), 1);
        assert!(Path::new(&live.location(String::new()).path).exists());
        assert!(dir.join("other-file").exists());
        drop(live);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
