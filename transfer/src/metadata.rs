//! Segment metadata: how a process finds out where a named segment lives.
//!
//! Owners publish a [`SegmentDesc`] (name, endpoint, length, transport);
//! submitters look it up and pass it to `TransferEngine::submit`. The store is
//! a trait so the gateway can host it (behind HTTP, outside this crate) while
//! tests and single-process setups use [`MemoryRegistry`]. Nothing here may
//! open a connection or know which transport will carry the bytes; a store
//! must stay bounded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::error::TransferError;
use crate::transport::kind::TransportKind;

/// Where a segment lives and how to reach it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SegmentDesc {
    pub name: String,
    /// "host:port" of the owning engine's transfer listener.
    pub endpoint: String,
    pub len: u64,
    pub transport: TransportKind,
}

/// A directory of segment descriptors.
#[async_trait::async_trait]
pub trait MetadataStore: Send + Sync {
    /// Inserts or replaces the descriptor for `desc.name`.
    async fn publish(&self, desc: SegmentDesc) -> Result<(), TransferError>;
    async fn lookup(&self, name: &str) -> Result<Option<SegmentDesc>, TransferError>;
    /// Removing an absent name is not an error, so cleanup can be retried.
    async fn remove(&self, name: &str) -> Result<(), TransferError>;
    /// All descriptors, sorted by name.
    async fn list(&self) -> Result<Vec<SegmentDesc>, TransferError>;
}

/// In-process [`MetadataStore`] holding at most `capacity` descriptors.
#[derive(Clone)]
pub struct MemoryRegistry {
    entries: Arc<RwLock<HashMap<String, (SegmentDesc, Instant)>>>,
    capacity: usize,
    /// Entries not re-published within this long are stale (their owner died without
    /// deregistering) and are neither listed nor found. `None`: entries live until removed.
    ttl: Option<Duration>,
}

impl MemoryRegistry {
    pub const DEFAULT_CAPACITY: usize = 65536;

    pub fn with_capacity(capacity: usize) -> Self {
        MemoryRegistry {
            entries: Arc::new(RwLock::new(HashMap::new())),
            capacity,
            ttl: None,
        }
    }

    /// Entries expire unless their owner re-publishes them within `ttl` (a heartbeat).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    fn fresh(&self, published: Instant) -> bool {
        self.ttl.is_none_or(|ttl| published.elapsed() < ttl)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }
}

#[async_trait::async_trait]
impl MetadataStore for MemoryRegistry {
    async fn publish(&self, desc: SegmentDesc) -> Result<(), TransferError> {
        let mut entries = self.entries.write();
        if entries.len() >= self.capacity {
            entries.retain(|_, (_, at)| self.fresh(*at));
        }
        // Replacing an existing name never grows the map, so it is allowed
        // even at capacity; owners re-publish after a restart.
        if !entries.contains_key(&desc.name) && entries.len() >= self.capacity {
            return Err(TransferError::RegistryFull(self.capacity));
        }
        entries.insert(desc.name.clone(), (desc, Instant::now()));
        Ok(())
    }

    async fn lookup(&self, name: &str) -> Result<Option<SegmentDesc>, TransferError> {
        Ok(self
            .entries
            .read()
            .get(name)
            .filter(|(_, at)| self.fresh(*at))
            .map(|(d, _)| d.clone()))
    }

    async fn remove(&self, name: &str) -> Result<(), TransferError> {
        self.entries.write().remove(name);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<SegmentDesc>, TransferError> {
        let mut all: Vec<SegmentDesc> = self
            .entries
            .read()
            .values()
            .filter(|(_, at)| self.fresh(*at))
            .map(|(d, _)| d.clone())
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(name: &str, port: u16) -> SegmentDesc {
        SegmentDesc {
            name: name.into(),
            endpoint: format!("127.0.0.1:{port}"),
            len: 4096,
            transport: TransportKind::Tcp,
        }
    }

    #[tokio::test]
    async fn publish_lookup_remove_list() {
        let reg = MemoryRegistry::default();
        assert_eq!(reg.capacity(), 65536);
        reg.publish(desc("b", 1)).await.unwrap();
        reg.publish(desc("a", 2)).await.unwrap();
        assert_eq!(reg.lookup("a").await.unwrap(), Some(desc("a", 2)));
        assert_eq!(reg.lookup("zz").await.unwrap(), None);
        let names: Vec<_> = reg
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.name)
            .collect();
        assert_eq!(names, ["a", "b"]);

        reg.publish(desc("a", 3)).await.unwrap();
        assert_eq!(
            reg.lookup("a").await.unwrap().unwrap().endpoint,
            "127.0.0.1:3"
        );

        reg.remove("a").await.unwrap();
        reg.remove("a").await.unwrap();
        assert_eq!(reg.lookup("a").await.unwrap(), None);
        assert_eq!(reg.list().await.unwrap(), vec![desc("b", 1)]);
    }

    #[tokio::test]
    async fn capacity_is_enforced() {
        let reg = MemoryRegistry::with_capacity(2);
        reg.publish(desc("a", 1)).await.unwrap();
        reg.publish(desc("b", 1)).await.unwrap();
        assert!(matches!(
            reg.publish(desc("c", 1)).await,
            Err(TransferError::RegistryFull(2))
        ));
        // Updating an existing entry at capacity is fine.
        reg.publish(desc("b", 9)).await.unwrap();
        reg.remove("a").await.unwrap();
        reg.publish(desc("c", 1)).await.unwrap();
        assert_eq!(reg.list().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn clones_share_state() {
        let a = MemoryRegistry::default();
        let b = a.clone();
        a.publish(desc("x", 1)).await.unwrap();
        assert!(b.lookup("x").await.unwrap().is_some());
    }

    #[test]
    fn transport_kind_is_lowercase_on_the_wire() {
        // The gateway serves descriptors as JSON, so the spelling is contract.
        use serde::de::IntoDeserializer;
        use serde::Deserialize;
        let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            "tcp".into_deserializer();
        assert_eq!(TransportKind::deserialize(de).unwrap(), TransportKind::Tcp);
        let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            "Tcp".into_deserializer();
        assert!(TransportKind::deserialize(de).is_err());
    }

    #[tokio::test]
    async fn entries_not_republished_within_the_ttl_go_stale() {
        let reg = MemoryRegistry::with_capacity(2).with_ttl(Duration::from_millis(50));
        reg.publish(desc("dead", 1)).await.unwrap();
        reg.publish(desc("alive", 2)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        reg.publish(desc("alive", 2)).await.unwrap(); // heartbeat
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(
            reg.lookup("dead").await.unwrap().is_none(),
            "its owner stopped re-publishing"
        );
        assert!(reg.lookup("alive").await.unwrap().is_some());
        assert_eq!(reg.list().await.unwrap().len(), 1);
        // A stale entry frees its slot for a new owner even at capacity.
        reg.publish(desc("new", 3)).await.unwrap();
    }
}
