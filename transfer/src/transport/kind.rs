//! The names of transports: which one reaches a segment (in its descriptor
//! and in each batch's report) and which ones an engine may use. Plain
//! vocabulary with no transport behind it, so batches and metadata can name a
//! transport without importing the transport trait that carries them.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::TransferError;

/// Which transport reaches a segment; part of `SegmentDesc`, and reported
/// per batch in `BatchReport::transport`.
///
/// In a descriptor it is the owner's advice ("this segment is also
/// reachable over shm"); the submitter's [`TransportChoice`] decides, after a
/// handshake with the owner, what actually carries the bytes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    #[default]
    Tcp,
    Shm,
    Rdma,
}

/// What a submitting engine may use (`EngineOptions::transport`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// Per peer: shm when the owner's segment lives in a shared mapping on
    /// this host, rdma when built with it and both sides have a device, tcp
    /// otherwise. Owners back their segments with shared memory.
    #[default]
    Auto,
    /// Always TCP; segments are plain heap memory.
    Tcp,
    /// Shared memory only; a peer on another host is an error.
    Shm,
    /// RDMA only (cargo feature `rdma` and a device required).
    Rdma,
}

impl FromStr for TransportChoice {
    type Err = TransferError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(TransportChoice::Auto),
            "tcp" => Ok(TransportChoice::Tcp),
            "shm" => Ok(TransportChoice::Shm),
            "rdma" => Ok(TransportChoice::Rdma),
            other => Err(TransferError::Unsupported(format!(
                "unknown transport {other:?}; expected auto, tcp, shm or rdma"
            ))),
        }
    }
}

impl std::fmt::Display for TransportChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportChoice::Auto => "auto",
            TransportChoice::Tcp => "tcp",
            TransportChoice::Shm => "shm",
            TransportChoice::Rdma => "rdma",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_parses_case_insensitively_and_rejects_unknown() {
        assert_eq!(
            "AUTO".parse::<TransportChoice>().unwrap(),
            TransportChoice::Auto
        );
        assert_eq!(
            "shm".parse::<TransportChoice>().unwrap(),
            TransportChoice::Shm
        );
        assert_eq!(
            "tcp".parse::<TransportChoice>().unwrap(),
            TransportChoice::Tcp
        );
        assert_eq!(
            "rdma".parse::<TransportChoice>().unwrap(),
            TransportChoice::Rdma
        );
        assert!("udp".parse::<TransportChoice>().is_err());
        for c in [
            TransportChoice::Auto,
            TransportChoice::Tcp,
            TransportChoice::Shm,
            TransportChoice::Rdma,
        ] {
            assert_eq!(c.to_string().parse::<TransportChoice>().unwrap(), c);
        }
    }
}
