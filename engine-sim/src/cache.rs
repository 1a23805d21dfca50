//! A block-based prefix cache with LRU eviction and vLLM-style hit/query counters (in tokens).
//!
//! It holds block hashes only: contents are a function of the hash (see `kv`), so a hit means the
//! engine can skip computing that block. It never grows past its capacity in blocks.
//!
//! Optionally a host tier below it (what LMCache, SGLang HiCache and Dynamo's KVBM give real
//! engines): a second, bounded LRU that takes the blocks the GPU tier evicts. A prompt's leading
//! run found on the GPU, then continued in host memory, is computed only past both; the host
//! part costs a copy back (`EngineConfig::host_copy_gbps`).

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
    /// Evicted from the GPU tier (some may live on in the host tier: `demoted`).
    pub evicted: Vec<BlockHash>,
    /// Evicted blocks the host tier did not hold before and now does.
    pub demoted: Vec<BlockHash>,
    /// Dropped from the host tier to make room.
    pub host_evicted: Vec<BlockHash>,
}

/// Where a prompt's leading blocks are: the first `gpu` on the GPU tier, the next `host` in the
/// host tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tiers {
    pub gpu: usize,
    pub host: usize,
}

#[derive(Debug)]
pub struct PrefixCache {
    capacity: usize,
    tick: u64,
    last_use: HashMap<BlockHash, u64, BuildHasherDefault<PassThroughHasher>>,
    by_age: VecDeque<(u64, BlockHash)>,
    demoted: VecDeque<(u64, BlockHash)>,
    host: Option<Box<PrefixCache>>,
}

impl PrefixCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            tick: 0,
            last_use: HashMap::default(),
            by_age: VecDeque::new(),
            demoted: VecDeque::new(),
            host: None,
        }
    }

    /// A GPU tier of `capacity` blocks over a host tier of `host_capacity` (0: none).
    pub fn with_host(capacity: usize, host_capacity: usize) -> Self {
        let mut c = Self::new(capacity);
        if host_capacity > 0 {
            c.host = Some(Box::new(Self::new(host_capacity)));
        }
        c
    }

    /// Blocks in the host tier.
    pub fn host_len(&self) -> usize {
        self.host.as_ref().map_or(0, |h| h.len())
    }

    /// The leading run of `blocks` on the GPU tier, then its continuation in the host tier;
    /// touches every hit.
    pub fn match_tiers(&mut self, blocks: &[BlockHash]) -> Tiers {
        let gpu = self.match_prefix(blocks);
        let host = match &mut self.host {
            Some(h) => h.match_prefix(&blocks[gpu..]),
            None => 0,
        };
        Tiers { gpu, host }
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
        let hits = self.peek_prefix(blocks);
        for b in &blocks[..hits] {
            self.touch(*b);
        }
        hits
    }

    /// Number of leading blocks of `blocks` held, without touching them: a look from outside
    /// (the simulator's view of what the whole fleet caches) must not change what is evicted.
    pub fn peek_prefix(&self, blocks: &[BlockHash]) -> usize {
        blocks
            .iter()
            .take_while(|b| self.last_use.contains_key(b))
            .count()
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
        // Marked copies go first, and not to the host tier: the other engine of their pair
        // keeps the prompt.
        let mut to_host = Vec::new();
        while self.last_use.len() > self.capacity {
            let (marked, next) = match self.demoted.pop_front() {
                Some(m) => (true, Some(m)),
                None => (false, self.by_age.pop_front()),
            };
            let Some((tick, victim)) = next else {
                break;
            };
            if self.last_use.get(&victim) == Some(&tick) {
                self.last_use.remove(&victim);
                change.evicted.push(victim);
                if !marked {
                    to_host.push(victim);
                }
            }
        }
        if let Some(host) = &mut self.host {
            let moved = host.insert(&to_host);
            change.demoted = moved.new.iter().map(|&i| to_host[i]).collect();
            change.host_evicted = moved.evicted;
        }
        change
    }

    /// Marks the held blocks of `blocks` (a prompt's, in order) to be evicted before any other
    /// block, until a request touches them again: the copy of a handed-off prompt that another
    /// engine keeps. Its last block goes first, so while part of it is left that part is still
    /// a prefix someone can hit.
    /// Returns how many it marked (those the GPU tier held).
    pub fn demote(&mut self, blocks: &[BlockHash]) -> usize {
        let mut marked = 0;
        for b in blocks.iter().rev() {
            if self.last_use.contains_key(b) {
                self.tick += 1;
                self.last_use.insert(*b, self.tick);
                self.demoted.push_back((self.tick, *b));
                marked += 1;
            }
        }
        if self.demoted.len() > 2 * self.last_use.len() + 64 {
            let last_use = &self.last_use;
            self.demoted.retain(|(t, b)| last_use.get(b) == Some(t));
        }
        marked
    }

    /// Drops every block of every tier (vLLM's `/reset_prefix_cache`).
    pub fn clear(&mut self) {
        self.last_use.clear();
        self.by_age.clear();
        self.demoted.clear();
        if let Some(h) = &mut self.host {
            h.clear();
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
    fn demoted_blocks_go_first_tail_first_until_touched_again() {
        let mut c = PrefixCache::new(6);
        c.insert(&hs(&[1, 2, 3]));
        c.insert(&hs(&[4, 5, 6]));
        c.demote(&hs(&[4, 5, 6, 99])); // 99 is not held: ignored
        assert_eq!(c.len(), 6);
        // The oldest block is 1, but the demoted run goes first, from its end.
        assert_eq!(c.insert(&hs(&[7])).evicted, hs(&[6]));
        assert_eq!(c.peek_prefix(&hs(&[4, 5, 6])), 2, "its head still hits");
        // A touch makes a demoted block an ordinary one again.
        assert_eq!(c.match_prefix(&hs(&[4])), 1);
        assert_eq!(c.insert(&hs(&[8, 9])).evicted, hs(&[5, 1]));
        assert_eq!(c.peek_prefix(&hs(&[4])), 1);
        assert_eq!(c.peek_prefix(&hs(&[2, 3])), 2);
    }

    #[test]
    fn a_marked_copy_evicted_skips_the_host_tier() {
        let mut c = PrefixCache::with_host(2, 4);
        c.insert(&hs(&[1, 2]));
        assert_eq!(c.demote(&hs(&[2, 9])), 1, "9 is not held");
        let ch = c.insert(&hs(&[3]));
        assert_eq!(ch.evicted, hs(&[2]));
        assert!(ch.demoted.is_empty(), "not moved to the host tier");
        let ch = c.insert(&hs(&[4]));
        assert_eq!((ch.evicted, ch.demoted), (hs(&[1]), hs(&[1])));
    }

    #[test]
    fn demoting_again_and_again_stays_bounded() {
        let mut c = PrefixCache::new(4);
        c.insert(&hs(&[1, 2, 3, 4]));
        for _ in 0..10_000 {
            c.demote(&hs(&[1, 2]));
            c.match_prefix(&hs(&[1, 2]));
        }
        assert!(c.demoted.len() <= 2 * c.len() + 64);
        assert!(c.by_age.len() <= 2 * c.len() + 64);
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
    fn gpu_evictions_move_to_the_host_tier_and_a_prompt_continues_there() {
        let mut c = PrefixCache::with_host(2, 3);
        c.insert(&hs(&[1, 2]));
        let ch = c.insert(&hs(&[3, 4]));
        assert_eq!(ch.evicted, hs(&[1, 2]));
        assert_eq!(
            ch.demoted,
            hs(&[1, 2]),
            "evicted blocks live on in host memory"
        );
        assert_eq!(c.host_len(), 2);
        assert_eq!(c.match_tiers(&hs(&[1, 2, 5])), Tiers { gpu: 0, host: 2 });
        assert_eq!(c.match_tiers(&hs(&[3, 4, 1, 2])), Tiers { gpu: 2, host: 2 });
        assert_eq!(
            c.match_tiers(&hs(&[3, 1])),
            Tiers { gpu: 1, host: 1 },
            "the host run continues the GPU one"
        );
    }

    #[test]
    fn the_host_tier_is_bounded_and_says_what_it_dropped() {
        let mut c = PrefixCache::with_host(1, 2);
        c.insert(&hs(&[1]));
        c.insert(&hs(&[2]));
        c.insert(&hs(&[3]));
        let ch = c.insert(&hs(&[4]));
        assert_eq!(ch.demoted, hs(&[3]));
        assert_eq!(
            ch.host_evicted,
            hs(&[1]),
            "the oldest host block makes room"
        );
        assert_eq!(c.host_len(), 2);
        // A block demoted again is not new to the host tier.
        c.insert(&hs(&[3]));
        let ch = c.insert(&hs(&[5]));
        assert_eq!(ch.evicted, hs(&[3]));
        assert!(ch.demoted.is_empty(), "3 was in host memory already");
        c.clear();
        assert_eq!((c.len(), c.host_len()), (0, 0));
    }

    #[test]
    fn without_a_host_tier_nothing_is_demoted() {
        let mut c = PrefixCache::new(1);
        c.insert(&hs(&[1]));
        let ch = c.insert(&hs(&[2]));
        assert_eq!(ch.evicted, hs(&[1]));
        assert!(ch.demoted.is_empty() && ch.host_evicted.is_empty());
        assert_eq!(c.match_tiers(&hs(&[1])), Tiers::default());
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let mut c = PrefixCache::new(0);
        c.insert(&hs(&[1]));
        assert!(c.is_empty());
    }
}
