//! The decode engine's KV pool: fixed-size block slots in a registered transfer segment, handed
//! out as per-request reservations.
//!
//! A reservation is made by `reserve`, filled by a prefill engine, taken over by the decode leg
//! (`claim`) and freed exactly once: when the claim guard drops (decode finished or the client
//! went away), on `release`, or when an unclaimed reservation outlives its TTL.

use crate::stats::Stats;
use parking_lot::Mutex;
use pdgate_transfer::Segment;
use pdgate_wire::native::KvDescriptor;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::Notify;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("KV pool full: {needed} blocks needed, {free} free")]
    Full { needed: usize, free: usize },
    #[error("request `{0}` already holds a reservation")]
    Duplicate(String),
    #[error("no KV reservation for request `{0}` (never made, expired or already used)")]
    Unknown(String),
    #[error("KV blocks for request `{0}` did not land in time")]
    NotLanded(String),
}

#[derive(Debug)]
struct Reservation {
    slots: Vec<u32>,
    landed_blocks: u32,
    claimed: bool,
    expires: Instant,
}

pub struct KvPool {
    segment: Segment,
    endpoint: String,
    block_bytes: u64,
    ttl: Duration,
    stats: Arc<Stats>,
    landed: Notify,
    /// Pull-mode prefill pools zero freed blocks, so a decode that reads blocks after they were
    /// freed gets zeros and fails verification instead of silently reading stale bytes.
    scrub_on_free: std::sync::atomic::AtomicBool,
    inner: Mutex<Inner>,
}

struct Inner {
    free: Vec<u32>,
    reservations: HashMap<String, Reservation>,
}

/// A reservation owned by a decode leg; frees its slots when dropped.
pub struct Claim {
    pool: Arc<KvPool>,
    request_id: String,
    pub slots: Vec<u32>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.pool.release(&self.request_id);
    }
}

impl KvPool {
    pub fn new(
        segment: Segment,
        endpoint: String,
        block_bytes: u64,
        ttl: Duration,
        stats: Arc<Stats>,
    ) -> Arc<Self> {
        let blocks = (segment.len() as u64 / block_bytes.max(1)) as u32;
        stats.kv_total_blocks.store(u64::from(blocks), Relaxed);
        // Reversed so slot 0 is handed out first; purely cosmetic for logs.
        let free = (0..blocks).rev().collect();
        Arc::new(Self {
            segment,
            endpoint,
            block_bytes,
            ttl,
            stats,
            landed: Notify::new(),
            scrub_on_free: std::sync::atomic::AtomicBool::new(false),
            inner: Mutex::new(Inner {
                free,
                reservations: HashMap::new(),
            }),
        })
    }

    /// Makes every later free zero the freed blocks (see `scrub_on_free`).
    pub fn scrub_freed_blocks(&self) {
        self.scrub_on_free.store(true, Relaxed);
    }

    fn scrub(&self, slots: &[u32]) {
        if !self.scrub_on_free.load(Relaxed) {
            return;
        }
        for &slot in slots {
            let offset = u64::from(slot) * self.block_bytes;
            // Offsets come from this pool's own slot list, so they are in range.
            let _ = self
                .segment
                .fill(offset as usize, self.block_bytes as usize, 0);
        }
    }

    pub fn segment(&self) -> &Segment {
        &self.segment
    }

    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    pub fn reserve(
        &self,
        request_id: &str,
        blocks: usize,
        now: Instant,
    ) -> Result<KvDescriptor, PoolError> {
        let mut inner = self.inner.lock();
        if inner.reservations.contains_key(request_id) {
            return Err(PoolError::Duplicate(request_id.into()));
        }
        if inner.free.len() < blocks {
            return Err(PoolError::Full {
                needed: blocks,
                free: inner.free.len(),
            });
        }
        let at = inner.free.len() - blocks;
        let slots: Vec<u32> = inner.free.split_off(at);
        let block_offsets = slots
            .iter()
            .map(|&s| u64::from(s) * self.block_bytes)
            .collect();
        inner.reservations.insert(
            request_id.into(),
            Reservation {
                slots,
                landed_blocks: 0,
                claimed: false,
                expires: now + self.ttl,
            },
        );
        self.sync_gauges(&inner);
        Ok(KvDescriptor {
            request_id: request_id.into(),
            segment: self.segment.name().to_string(),
            endpoint: self.endpoint.clone(),
            block_bytes: self.block_bytes,
            block_offsets,
        })
    }

    /// Records that a prefill's blocks landed (from the transfer notification).
    pub fn mark_landed(&self, request_id: &str, blocks: u32) {
        if let Some(r) = self.inner.lock().reservations.get_mut(request_id) {
            r.landed_blocks = r.landed_blocks.saturating_add(blocks);
        }
        self.landed.notify_waiters();
    }

    /// Hands the reservation to a decode leg once its blocks landed, waiting up to `wait`.
    pub async fn claim(
        self: &Arc<Self>,
        request_id: &str,
        wait: Duration,
    ) -> Result<Claim, PoolError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the check, so a landing between check and wait is not missed.
            let notified = self.landed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_claim(request_id)? {
                Some(slots) => {
                    return Ok(Claim {
                        pool: Arc::clone(self),
                        request_id: request_id.into(),
                        slots,
                    })
                }
                None if tokio::time::Instant::now() >= deadline => {
                    return Err(PoolError::NotLanded(request_id.into()))
                }
                None => {
                    let _ = tokio::time::timeout_at(deadline, notified).await;
                }
            }
        }
    }

    fn try_claim(&self, request_id: &str) -> Result<Option<Vec<u32>>, PoolError> {
        let mut inner = self.inner.lock();
        let r = inner
            .reservations
            .get_mut(request_id)
            .ok_or_else(|| PoolError::Unknown(request_id.into()))?;
        if r.claimed {
            return Err(PoolError::Unknown(request_id.into()));
        }
        if (r.landed_blocks as usize) < r.slots.len() {
            return Ok(None);
        }
        r.claimed = true;
        Ok(Some(r.slots.clone()))
    }

    /// Frees a reservation; true when there was one.
    pub fn release(&self, request_id: &str) -> bool {
        let mut inner = self.inner.lock();
        let Some(r) = inner.reservations.remove(request_id) else {
            return false;
        };
        self.scrub(&r.slots);
        inner.free.extend(r.slots);
        self.sync_gauges(&inner);
        true
    }

    /// Reclaims unclaimed reservations past their TTL; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut inner = self.inner.lock();
        let expired: Vec<String> = inner
            .reservations
            .iter()
            .filter(|(_, r)| !r.claimed && r.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            if let Some(r) = inner.reservations.remove(id) {
                self.scrub(&r.slots);
                inner.free.extend(r.slots);
            }
        }
        self.sync_gauges(&inner);
        expired.len()
    }

    pub fn active(&self) -> usize {
        self.inner.lock().reservations.len()
    }

    fn sync_gauges(&self, inner: &Inner) {
        let total = self.stats.kv_total_blocks.load(Relaxed);
        self.stats
            .kv_used_blocks
            .store(total.saturating_sub(inner.free.len() as u64), Relaxed);
        self.stats
            .reservations_active
            .store(inner.reservations.len() as u64, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdgate_transfer::{EngineOptions, TransferEngine};

    async fn pool(blocks: usize) -> (Arc<KvPool>, Arc<TransferEngine>) {
        let te = TransferEngine::start(EngineOptions::default())
            .await
            .expect("engine");
        let seg = te.register_segment("kv", blocks * 64).expect("segment");
        (
            KvPool::new(
                seg,
                te.endpoint(),
                64,
                Duration::from_secs(5),
                Arc::new(Stats::default()),
            ),
            te,
        )
    }

    #[tokio::test]
    async fn reserve_claim_and_drop_frees_everything() {
        let (p, _te) = pool(8).await;
        let now = Instant::now();
        let d = p.reserve("r1", 3, now).expect("reserve");
        assert_eq!(d.block_offsets.len(), 3);
        assert!(d.block_offsets.iter().all(|o| o % 64 == 0 && *o < 8 * 64));
        assert_eq!(
            p.reserve("r1", 1, now),
            Err(PoolError::Duplicate("r1".into()))
        );
        assert_eq!(
            p.reserve("r2", 6, now),
            Err(PoolError::Full { needed: 6, free: 5 })
        );
        assert!(matches!(
            p.claim("r1", Duration::from_millis(10)).await,
            Err(PoolError::NotLanded(_))
        ));
        p.mark_landed("r1", 3);
        let claim = p
            .claim("r1", Duration::from_millis(10))
            .await
            .expect("claim");
        assert!(
            matches!(
                p.claim("r1", Duration::ZERO).await,
                Err(PoolError::Unknown(_))
            ),
            "claimed once only"
        );
        assert_eq!(p.active(), 1);
        drop(claim);
        assert_eq!(p.active(), 0);
        assert!(p.reserve("r3", 8, now).is_ok(), "all slots back");
    }

    #[tokio::test]
    async fn unclaimed_reservations_expire_but_claimed_ones_do_not() {
        let (p, _te) = pool(4).await;
        let now = Instant::now();
        p.reserve("a", 1, now).expect("a");
        p.reserve("b", 1, now).expect("b");
        p.mark_landed("b", 1);
        let _claim = p.claim("b", Duration::ZERO).await.expect("claim");
        assert_eq!(p.sweep(now + Duration::from_secs(6)), 1);
        assert_eq!(p.active(), 1);
        assert!(!p.release("a"));
    }

    #[tokio::test]
    async fn claim_wakes_when_blocks_land() {
        let (p, _te) = pool(4).await;
        p.reserve("r", 2, Instant::now()).expect("reserve");
        let p2 = Arc::clone(&p);
        let waiter = tokio::spawn(async move {
            p2.claim("r", Duration::from_secs(5))
                .await
                .map(|c| c.slots.len())
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        p.mark_landed("r", 2);
        assert_eq!(waiter.await.expect("join"), Ok(2));
    }
}
