//! A block-based prefix cache with LRU eviction and vLLM-style hit/query counters (in tokens).
//!
//! It holds block hashes only: contents are a function of the hash (see `kv`), so a hit means the
//! engine can skip computing that block. It never grows past its capacity in blocks.

use pdgate_scheduler::index::PassThroughHasher;
use pdgate_scheduler::BlockHash;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;

/// Every request touches each of its blocks, so a touch must be O(1) with no rehash of an
/// already-uniform hash: the map holds each block's latest touch, and the age queue keeps every
/// touch, oldest first. A queued touch older than its block's latest is stale and skipped at
/// eviction; the queue is compacted when stale touches outnumber live blocks.
#[derive(Debug)]
pub struct PrefixCache {
    capacity: usize,
    tick: u64,
    last_use: HashMap<BlockHash, u64, BuildHasherDefault<PassThroughHasher>>,
    by_age: VecDeque<(u64, BlockHash)>,
}

impl PrefixCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            tick: 0,
            last_use: HashMap::default(),
            by_age: VecDeque::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.last_use.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_use.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of leading blocks of `blocks` held, touching each hit so it is evicted last.
    pub fn match_prefix(&mut self, blocks: &[BlockHash]) -> usize {
        let hits = blocks
            .iter()
            .take_while(|b| self.last_use.contains_key(b))
            .count();
        for b in &blocks[..hits] {
            self.touch(*b);
        }
        hits
    }

    /// Inserts (or refreshes) `blocks`, evicting the least recently used beyond capacity.
    pub fn insert(&mut self, blocks: &[BlockHash]) {
        self.insert_with(blocks, |_| {});
    }

    /// `insert`, telling `evicted` each block it drops (what an engine's KV "removed" event
    /// carries).
    pub fn insert_with(&mut self, blocks: &[BlockHash], mut evicted: impl FnMut(BlockHash)) {
        if self.capacity == 0 {
            return;
        }
        for b in blocks {
            self.touch(*b);
        }
        while self.last_use.len() > self.capacity {
            let Some((tick, victim)) = self.by_age.pop_front() else {
                break;
            };
            if self.last_use.get(&victim) == Some(&tick) {
                self.last_use.remove(&victim);
                evicted(victim);
            }
        }
    }

    fn touch(&mut self, b: BlockHash) {
        self.tick += 1;
        self.last_use.insert(b, self.tick);
        self.by_age.push_back((self.tick, b));
        if self.by_age.len() > 2 * self.last_use.len() + 64 {
            let last_use = &self.last_use;
            self.by_age.retain(|(t, b)| last_use.get(b) == Some(t));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(ids: &[u64]) -> Vec<BlockHash> {
        ids.iter().copied().map(BlockHash).collect()
    }

    #[test]
    fn matches_only_the_leading_run() {
        let mut c = PrefixCache::new(10);
        c.insert(&hs(&[1, 2, 3]));
        assert_eq!(c.match_prefix(&hs(&[1, 2, 9, 3])), 2);
        assert_eq!(c.match_prefix(&hs(&[9, 1])), 0);
    }

    #[test]
    fn evicts_least_recently_used_and_respects_capacity() {
        let mut c = PrefixCache::new(3);
        c.insert(&hs(&[1, 2, 3]));
        assert_eq!(c.match_prefix(&hs(&[1])), 1); // 1 is now the freshest
        c.insert(&hs(&[4]));
        assert_eq!(c.len(), 3);
        assert_eq!(c.match_prefix(&hs(&[2])), 0, "2 was the oldest");
        assert_eq!(c.match_prefix(&hs(&[1])), 1);
        assert_eq!(c.match_prefix(&hs(&[3])), 1);
        assert_eq!(c.match_prefix(&hs(&[4])), 1);
    }

    #[test]
    fn repeated_touches_keep_the_age_queue_bounded() {
        let mut c = PrefixCache::new(4);
        c.insert(&hs(&[1, 2, 3, 4]));
        for _ in 0..10_000 {
            c.match_prefix(&hs(&[1, 2]));
        }
        assert!(
            c.by_age.len() <= 2 * c.len() + 65,
            "queue {}",
            c.by_age.len()
        );
        c.insert(&hs(&[5, 6]));
        assert_eq!(c.match_prefix(&hs(&[3])), 0, "3 and 4 were the oldest");
        assert_eq!(c.match_prefix(&hs(&[4])), 0);
        assert_eq!(c.match_prefix(&hs(&[1, 2, 5, 6])), 4);
    }

    #[test]
    fn insert_with_names_exactly_the_evicted_blocks() {
        let mut c = PrefixCache::new(3);
        let mut gone = Vec::new();
        c.insert_with(&hs(&[1, 2, 3]), |b| gone.push(b));
        assert!(gone.is_empty());
        c.match_prefix(&hs(&[1]));
        c.insert_with(&hs(&[4, 5]), |b| gone.push(b));
        assert_eq!(gone, hs(&[2, 3]), "the two least recently used");
        assert_eq!(c.match_prefix(&hs(&[1])), 1);
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let mut c = PrefixCache::new(0);
        c.insert(&hs(&[1]));
        assert!(c.is_empty());
    }
}
