//! A block-based prefix cache with LRU eviction and vLLM-style hit/query counters (in tokens).
//!
//! It holds block hashes only: contents are a function of the hash (see `kv`), so a hit means the
//! engine can skip computing that block. It never grows past its capacity in blocks.

use pdgate_scheduler::BlockHash;
use std::collections::{BTreeMap, HashMap};

#[derive(Debug)]
pub struct PrefixCache {
    capacity: usize,
    tick: u64,
    last_use: HashMap<BlockHash, u64>,
    by_age: BTreeMap<u64, BlockHash>,
}

impl PrefixCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            tick: 0,
            last_use: HashMap::new(),
            by_age: BTreeMap::new(),
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
        if self.capacity == 0 {
            return;
        }
        for b in blocks {
            self.touch(*b);
        }
        while self.last_use.len() > self.capacity {
            let Some((_, victim)) = self.by_age.pop_first() else {
                break;
            };
            self.last_use.remove(&victim);
        }
    }

    fn touch(&mut self, b: BlockHash) {
        self.tick += 1;
        if let Some(old) = self.last_use.insert(b, self.tick) {
            self.by_age.remove(&old);
        }
        self.by_age.insert(self.tick, b);
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
    fn zero_capacity_caches_nothing() {
        let mut c = PrefixCache::new(0);
        c.insert(&hs(&[1]));
        assert!(c.is_empty());
    }
}
