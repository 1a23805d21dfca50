//! The handshake: what an owner tells a submitter about one of its segments
//! over the metadata channel (the owner's TCP listener), so the submitter can
//! pick a transport per peer without a registry (P2P mode) and verify a
//! registry entry is still current.
//!
//! This module only defines the advert and where this host is; it never opens
//! a connection (tcp.rs carries the request) and never maps memory (shm.rs
//! does). Adverts are small JSON documents, bounded by the wire's message
//! limit.

use serde::{Deserialize, Serialize};

use crate::error::TransferError;
use crate::limits::MAX_MESSAGE_LEN;

/// One segment as its owner describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SegmentAdvert {
    pub name: String,
    pub len: u64,
    /// Unique per registration: a re-registered segment of the same name has
    /// a new one, so cached routes to the old memory are detected.
    pub generation: u64,
    /// Present when the segment lives in a shared mapping.
    #[serde(default)]
    pub shm: Option<ShmLocation>,
    /// Present when the owner has an RDMA device and registered the segment
    /// as a memory region. Queue-pair numbers are not here: they are per
    /// connection and travel in the RDMA connect exchange
    /// (`rdma::session::ConnectRequest`/`ConnectReply`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma: Option<RdmaLocation>,
}

/// How to reach a segment with one-sided RDMA.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RdmaLocation {
    /// Port address of the owner's device (GID all zero: InfiniBand
    /// without GRH).
    pub gid: [u8; 16],
    pub lid: u16,
    /// The segment's memory region: remote key and start address.
    pub rkey: u32,
    pub addr: u64,
}

/// Where a shared-memory segment can be mapped from, and on which host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShmLocation {
    pub path: String,
    /// [`host_id`] of the owner; only a submitter with the same id may map.
    pub host: String,
    /// Inode of the file, checked after opening so a same-named file in
    /// another mount namespace (container) is never written by mistake.
    pub inode: u64,
    /// The owner's Unix socket, which a submitter that mapped the segment
    /// sends its commits to instead of the owner's TCP port. Absent: commit
    /// over TCP (an owner without one, or one that predates it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<String>,
}

impl SegmentAdvert {
    pub(crate) fn encode(&self) -> Result<Vec<u8>, TransferError> {
        let v = serde_json::to_vec(self)
            .map_err(|e| TransferError::Protocol(format!("advert encode: {e}")))?;
        if v.len() > MAX_MESSAGE_LEN {
            return Err(TransferError::Protocol("advert too large".into()));
        }
        Ok(v)
    }

    pub(crate) fn decode(raw: &[u8]) -> Result<Self, TransferError> {
        serde_json::from_slice(raw).map_err(|e| TransferError::Protocol(format!("bad advert: {e}")))
    }
}

/// Identifies this machine's shared-memory namespace: hostname plus kernel
/// boot id. Two processes with equal ids can usually map each other's
/// /dev/shm files; the inode check in shm.rs catches the exceptions.
pub(crate) fn host_id() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    format!(
        "{}/{}",
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/random/boot_id")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advert_round_trips_and_old_adverts_decode() {
        let a = SegmentAdvert {
            name: "kv".into(),
            len: 10,
            generation: 7,
            shm: Some(ShmLocation {
                path: "/dev/shm/x".into(),
                host: host_id(),
                inode: 3,
                control: Some("/dev/shm/pdgate-1-0-control".into()),
            }),
            rdma: None,
        };
        assert_eq!(SegmentAdvert::decode(&a.encode().unwrap()).unwrap(), a);
        let plain = SegmentAdvert::decode(br#"{"name":"kv","len":1,"generation":2}"#).unwrap();
        assert!(plain.shm.is_none() && plain.rdma.is_none());
        let no_control = SegmentAdvert::decode(
            br#"{"name":"kv","len":1,"generation":2,"shm":{"path":"/p","host":"h","inode":1}}"#,
        )
        .unwrap();
        assert_eq!(no_control.shm.and_then(|l| l.control), None);
        let r = SegmentAdvert {
            rdma: Some(RdmaLocation {
                gid: [9; 16],
                lid: 3,
                rkey: 0xdead,
                addr: 0x1000,
            }),
            ..a
        };
        assert_eq!(SegmentAdvert::decode(&r.encode().unwrap()).unwrap(), r);
        assert!(SegmentAdvert::decode(b"{").is_err());
        assert!(host_id().contains('/'));
    }
}
