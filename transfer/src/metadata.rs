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

    /// Entries held, stale ones not yet purged included: what the registry costs in memory.
    pub fn held(&self) -> usize {
        self.entries.read().len()
    }

    /// Drops stale entries and gives the map's spare room back, so what a burst of entries took
    /// is returned once they expire instead of waiting for the registry to fill up. Meant for a
    /// timer; returns how many entries went.
    pub fn purge_stale(&self) -> usize {
        let mut entries = self.entries.write();
        let before = entries.len();
        entries.retain(|_, (_, at)| self.fresh(*at));
        // A hash map never shrinks by itself; a small slack avoids reallocating on every tick.
        if entries.capacity() > entries.len().saturating_mul(2).max(16) {
            entries.shrink_to_fit();
        }
        before - entries.len()
    }

    /// Publishes `desc` unless a fresh entry of that name points at another endpoint: one owner
    /// (the endpoint serving the segment) per name, so a writer cannot re-point a peer's segment
    /// at a server of its own. The name frees up when its owner removes it or stops refreshing
    /// it. Check and insert happen under one lock.
    pub fn publish_owned(&self, desc: SegmentDesc) -> Result<(), Claim> {
        let mut entries = self.entries.write();
        if let Some(held) = self.held_by_other(&entries, &desc.name, &desc.endpoint) {
            return Err(held);
        }
        if entries.len() >= self.capacity {
            entries.retain(|_, (_, at)| self.fresh(*at));
        }
        if !entries.contains_key(&desc.name) && entries.len() >= self.capacity {
            return Err(Claim::Full(self.capacity));
        }
        entries.insert(desc.name.clone(), (desc, Instant::now()));
        Ok(())
    }

    /// Removes `name` if `endpoint` owns it (or it is absent or stale): only its owner withdraws
    /// a segment.
    pub fn remove_owned(&self, name: &str, endpoint: &str) -> Result<(), Claim> {
        let mut entries = self.entries.write();
        if let Some(held) = self.held_by_other(&entries, name, endpoint) {
            return Err(held);
        }
        entries.remove(name);
        Ok(())
    }

    fn held_by_other(
        &self,
        entries: &HashMap<String, (SegmentDesc, Instant)>,
        name: &str,
        endpoint: &str,
    ) -> Option<Claim> {
        let (held, at) = entries.get(name)?;
        if held.endpoint == endpoint || !self.fresh(*at) {
            return None;
        }
        let expires_in = self.ttl.map(|ttl| ttl.saturating_sub(at.elapsed()));
        Some(Claim::Held { expires_in })
    }
}

/// Why [`MemoryRegistry::publish_owned`] or [`MemoryRegistry::remove_owned`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// A fresh entry of that name belongs to another endpoint; it frees up in `expires_in`
    /// unless its owner refreshes it (`None`: entries never expire).
    Held { expires_in: Option<Duration> },
    /// The registry holds its capacity of fresh entries.
    Full(usize),
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
    async fn a_name_belongs_to_its_endpoint_until_removed_or_stale() {
        let reg = MemoryRegistry::with_capacity(4).with_ttl(Duration::from_millis(500));
        reg.publish_owned(desc("kv", 1)).unwrap();
        reg.publish_owned(desc("kv", 1)).unwrap(); // the owner's heartbeat
        let Err(Claim::Held { expires_in }) = reg.publish_owned(desc("kv", 666)) else {
            panic!("another endpoint took the name");
        };
        assert!(expires_in.is_some_and(|d| d <= Duration::from_millis(500)));
        assert!(matches!(
            reg.remove_owned("kv", "127.0.0.1:666"),
            Err(Claim::Held { .. })
        ));
        assert_eq!(reg.lookup("kv").await.unwrap(), Some(desc("kv", 1)));
        // Its owner withdraws it, then anyone may claim it.
        reg.remove_owned("kv", "127.0.0.1:1").unwrap();
        reg.publish_owned(desc("kv", 2)).unwrap();
        // A stale entry no longer holds its name.
        tokio::time::sleep(Duration::from_millis(600)).await;
        reg.publish_owned(desc("kv", 3)).unwrap();
        assert_eq!(reg.lookup("kv").await.unwrap(), Some(desc("kv", 3)));
    }

    #[tokio::test]
    async fn purging_drops_stale_entries_and_returns_their_room() {
        let reg = MemoryRegistry::with_capacity(10_000).with_ttl(Duration::from_millis(300));
        for i in 0..2000 {
            reg.publish(desc(&format!("s{i}"), 1)).await.unwrap();
        }
        assert_eq!(reg.purge_stale(), 0, "nothing stale yet");
        let grown = reg.entries.read().capacity();
        tokio::time::sleep(Duration::from_millis(400)).await;
        reg.publish(desc("alive", 2)).await.unwrap();
        assert_eq!(
            reg.list().await.unwrap().len(),
            1,
            "stale entries are not listed"
        );
        assert_eq!(reg.held(), 2001, "but they are held until purged");
        assert_eq!(reg.purge_stale(), 2000);
        assert_eq!(reg.held(), 1);
        let shrunk = reg.entries.read().capacity();
        assert!(
            shrunk * 10 < grown,
            "the map gave its room back: {grown} -> {shrunk}"
        );
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
