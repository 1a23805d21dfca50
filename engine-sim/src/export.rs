//! Lending cached KV blocks to peer engines (cross-instance reuse, the holder's side): on
//! `POST /pd/export` the engine copies the longest run of the asked blocks it caches into slots
//! of a registered segment and leases them to the asker, who reads them over the transfer plane.
//!
//! The copy is the pin: once leased, the bytes stay put however the LRU cache moves, until the
//! asker's last read notifies `KvReturned` or the lease expires. Freed slots are zeroed, so a
//! read after expiry fails verification on the puller's side instead of returning stale bytes.
//! It must never lend a block the cache does not hold (the handler, `pd::export`, checks the
//! cache; this module only keeps the leases and imports no handler).

use crate::kv;
use parking_lot::Mutex;
use pdgate_scheduler::BlockHash;
use pdgate_transfer::Segment;
use pdgate_wire::native::KvDescriptor;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Leases per engine at once: each names slots, so the slot count bounds them too; this bounds
/// the table when asks are for few blocks.
const MAX_LEASES: usize = 1024;

pub struct Exports {
    segment: Segment,
    endpoint: String,
    block_bytes: u64,
    lease: Duration,
    inner: Mutex<Inner>,
}

struct Inner {
    free: Vec<u32>,
    leases: HashMap<String, Lease>,
}

struct Lease {
    slots: Vec<u32>,
    expires: Instant,
}

impl Exports {
    pub fn new(segment: Segment, endpoint: String, block_bytes: u64, lease: Duration) -> Self {
        let blocks = (segment.len() as u64 / block_bytes.max(1)) as u32;
        Self {
            segment,
            endpoint,
            block_bytes,
            lease,
            inner: Mutex::new(Inner {
                free: (0..blocks).rev().collect(),
                leases: HashMap::new(),
            }),
        }
    }

    pub fn segment_name(&self) -> &str {
        self.segment.name()
    }

    /// Copies the blocks `hashes` into free slots under a lease named `key`; `None` when there
    /// is no room (the asker recomputes).
    pub fn lend(
        &self,
        key: &str,
        hashes: &[BlockHash],
        corrupt: bool,
        now: Instant,
    ) -> Option<KvDescriptor> {
        let slots = {
            let mut inner = self.inner.lock();
            if inner.free.len() < hashes.len()
                || inner.leases.len() >= MAX_LEASES
                || inner.leases.contains_key(key)
            {
                return None;
            }
            let at = inner.free.len() - hashes.len();
            inner.free.split_off(at)
        };
        let bb = self.block_bytes as usize;
        let mut buf = vec![0u8; bb];
        for (hash, slot) in hashes.iter().zip(&slots) {
            kv::fill_block(*hash, &mut buf);
            if corrupt && bb > 0 {
                buf[bb / 2] ^= 0x5a;
            }
            if self.segment.write(*slot as usize * bb, &buf).is_err() {
                self.free(slots);
                return None;
            }
        }
        let block_offsets = slots
            .iter()
            .map(|&s| u64::from(s) * self.block_bytes)
            .collect();
        self.inner.lock().leases.insert(
            key.to_string(),
            Lease {
                slots,
                expires: now + self.lease,
            },
        );
        Some(KvDescriptor {
            request_id: key.to_string(),
            segment: self.segment.name().to_string(),
            endpoint: self.endpoint.clone(),
            block_bytes: self.block_bytes,
            block_offsets,
        })
    }

    /// Ends a lease (the puller's last read arrived); true when there was one.
    pub fn end(&self, key: &str) -> bool {
        let lease = self.inner.lock().leases.remove(key);
        lease.map(|l| self.free(l.slots)).is_some()
    }

    /// Ends leases past their deadline; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let expired: Vec<Lease> = {
            let mut inner = self.inner.lock();
            let keys: Vec<String> = inner
                .leases
                .iter()
                .filter(|(_, l)| l.expires <= now)
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| inner.leases.remove(k)).collect()
        };
        let n = expired.len();
        for l in expired {
            self.free(l.slots);
        }
        n
    }

    /// How often the sweeper should run for leases of this length to end near their deadline.
    pub fn sweep_every(&self) -> Duration {
        (self.lease / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    fn free(&self, slots: Vec<u32>) {
        let bb = self.block_bytes as usize;
        for s in &slots {
            let _ = self.segment.fill(*s as usize * bb, bb, 0);
        }
        self.inner.lock().free.extend(slots);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdgate_transfer::{EngineOptions, TransferEngine};
    use std::sync::Arc;

    async fn exports(blocks: usize, lease_ms: u64) -> (Arc<TransferEngine>, Exports) {
        let t = TransferEngine::start(EngineOptions::default())
            .await
            .expect("engine");
        let seg = t.register_segment("x", blocks * 64).expect("segment");
        let ex = Exports::new(seg, t.endpoint(), 64, Duration::from_millis(lease_ms));
        (t, ex)
    }

    #[tokio::test]
    async fn lent_blocks_verify_until_the_lease_ends_then_read_zero() {
        let (_t, ex) = exports(4, 100).await;
        let now = Instant::now();
        let hashes = [BlockHash(7), BlockHash(8)];
        let d = ex.lend("a", &hashes, false, now).expect("room");
        for (h, off) in hashes.iter().zip(&d.block_offsets) {
            let bytes = ex.segment.read(*off as usize, 64).expect("read");
            assert!(kv::verify_block(*h, &bytes));
        }
        assert!(
            ex.lend("b", &[BlockHash(1); 3], false, now).is_none(),
            "2 of 4 slots free"
        );
        assert_eq!(ex.sweep(now), 0, "not yet");
        assert_eq!(ex.sweep(now + Duration::from_millis(100)), 1);
        let bytes = ex
            .segment
            .read(d.block_offsets[0] as usize, 64)
            .expect("read");
        assert!(!kv::verify_block(hashes[0], &bytes), "zeroed on expiry");
        assert!(
            ex.lend("b", &[BlockHash(1); 4], false, now).is_some(),
            "slots back"
        );
        assert!(ex.end("b"));
        assert!(!ex.end("b"), "once");
    }
}
