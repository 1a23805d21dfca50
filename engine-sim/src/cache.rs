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
/// What one insert did to the cache.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Positions in the inserted slice of the blocks that were not cached before.
    pub new: Vec<usize>,
    pub evicted: Vec<BlockHash>,
}

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

    /// Inserts (or refreshes) `blocks`, evicting the least recently used beyond capacity. Says
    /// which of `blocks` were new and which blocks were evicted: what KV events report.
    pub fn insert(&mut self, blocks: &[BlockHash]) -> Change {
        let mut change = Change::default();
        if self.capacity == 0 {
            return change;
        }
        for (i, b) in blocks.iter().enumerate() {
            if !self.last_use.contains_key(b) {
                change.new.push(i);
            }
            self.touch(*b);
        }
        while self.last_use.len() > self.capacity {
            let Some((tick, victim)) = self.by_age.pop_front() else {
                break;
            };
            if self.last_use.get(&victim) == Some(&tick) {
                self.last_use.remove(&victim);
                change.evicted.push(victim);
            }
        }
        change
    }

    /// Drops every block (vLLM's `/reset_prefix_cache`).
    pub fn clear(&mut self) {
        self.last_use.clear();
        self.by_age.clear();
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
    fn an_insert_reports_new_and_evicted_blocks() {
        let mut c = PrefixCache::new(3);
        assert_eq!(c.insert(&hs(&[1, 2])).new, vec![0, 1]);
        let ch = c.insert(&hs(&[1, 3, 4]));
        assert_eq!(ch.new, vec![1, 2]);
        assert_eq!(ch.evicted, hs(&[2]));
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let mut c = PrefixCache::new(0);
        c.insert(&hs(&[1]));
        assert!(c.is_empty());
    }
}
