//! The prefix index: which instance holds which blocks, for a longest-prefix match against every
//! instance in one walk over the request's block hashes.
//!
//! Two kinds of entry share one structure: approximate ones recorded from the gateway's own
//! routing decisions (they expire after a TTL and are capped per instance like the engine's LRU
//! cache), and precise ones from engine KV events (kept until the engine reports removal).
//! Memory is bounded in bytes; the estimate is exposed so it can be shown in metrics.

use crate::blocks::BlockHash;
use crate::config::IndexConfig;
use crate::types::InstanceId;
use smallvec::SmallVec;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// Approximate bytes one (block, instance) entry costs: the holder record, the per-instance
/// age-order node, and a share of the block's hash-map slot.
pub const BYTES_PER_ENTRY: u64 = 64;

/// 24 bytes, so a block's slot (key and two inline holders) is one 64-byte cache line: with
/// unique prompts every request touches and evicts tens of random slots of a table far larger
/// than the CPU's caches.
#[derive(Debug, Clone, Copy)]
struct Holder {
    instance: InstanceId,
    precise: bool,
    seq: u64,
    /// Milliseconds on the index's clock (`now`), enough for a TTL of seconds.
    touched_ms: u64,
}

impl Holder {
    /// Precise entries live until the engine removes them; approximate ones for the TTL.
    fn is_live(&self, now: Duration, ttl: Duration) -> bool {
        self.precise || millis(now).saturating_sub(self.touched_ms) < millis(ttl)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Age order for LRU and TTL: (sequence number of a touch, block), oldest first. A touch
/// pushes a new pair and leaves the old one behind; a pair whose sequence number no longer
/// matches the block's holder is stale and skipped. That keeps a touch O(1); a queue is
/// compacted when stale pairs outnumber live ones. Blocks whose copy the engine marked evict
/// first live in a queue of their own, dropped before the other, as the engine drops them.
#[derive(Debug, Default)]
struct PerInstance {
    order: VecDeque<(u64, BlockHash)>,
    marked: VecDeque<(u64, BlockHash)>,
    live: u64,
    capacity: u64,
}

impl PerInstance {
    fn queue(&mut self, q: Queue) -> &mut VecDeque<(u64, BlockHash)> {
        match q {
            Queue::Order => &mut self.order,
            Queue::Marked => &mut self.marked,
        }
    }
}

/// An instance's age queues, in the order its capacity cap drops from them.
#[derive(Debug, Clone, Copy)]
enum Queue {
    Marked,
    Order,
}

const QUEUES: [Queue; 2] = [Queue::Marked, Queue::Order];

/// Block hashes are already uniform 64-bit hashes: hashing them again is wasted work.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThroughHasher(u64);

impl std::hash::Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type BlockMap<V> = HashMap<BlockHash, V, std::hash::BuildHasherDefault<PassThroughHasher>>;

/// Per-instance state in a dense table indexed by `InstanceId` (ids are small and dense).
#[derive(Debug, Default)]
struct Table(Vec<Option<PerInstance>>);

impl Table {
    fn get(&self, id: &InstanceId) -> Option<&PerInstance> {
        self.0.get(id.0 as usize).and_then(Option::as_ref)
    }
    fn get_mut(&mut self, id: &InstanceId) -> Option<&mut PerInstance> {
        self.0.get_mut(id.0 as usize).and_then(Option::as_mut)
    }
    fn entry(&mut self, id: InstanceId) -> &mut PerInstance {
        let i = id.0 as usize;
        if self.0.len() <= i {
            self.0.resize_with(i + 1, || None);
        }
        self.0[i].get_or_insert_with(PerInstance::default)
    }
    fn remove(&mut self, id: &InstanceId) {
        if let Some(slot) = self.0.get_mut(id.0 as usize) {
            *slot = None;
        }
    }
    fn iter(&self) -> impl Iterator<Item = (InstanceId, &PerInstance)> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (InstanceId(i as u32), p)))
    }
}

#[derive(Debug)]
pub struct PrefixIndex {
    /// Inline for up to two holders (a routed block usually lands on one prefill and one
    /// decode), so a lookup is one probe, not a probe and a pointer chase.
    holders: BlockMap<SmallVec<[Holder; 2]>>,
    instances: Table,
    seq: u64,
    entries: u64,
    ttl: Duration,
    max_entries: u64,
    default_capacity: u64,
}

impl PrefixIndex {
    pub fn new(cfg: &IndexConfig) -> Self {
        Self {
            holders: BlockMap::default(),
            instances: Table::default(),
            seq: 0,
            entries: 0,
            ttl: Duration::from_secs(cfg.ttl_secs),
            max_entries: (cfg.max_bytes / BYTES_PER_ENTRY).max(1),
            default_capacity: cfg.default_capacity_blocks.max(1),
        }
    }

    /// Registers an instance with the block capacity of its cache (`None`: the configured default).
    pub fn add_instance(&mut self, id: InstanceId, capacity_blocks: Option<u64>) {
        let capacity = capacity_blocks.unwrap_or(self.default_capacity).max(1);
        self.instances.entry(id).capacity = capacity;
    }

    pub fn set_capacity(&mut self, id: InstanceId, capacity_blocks: u64) {
        if let Some(p) = self.instances.get_mut(&id) {
            p.capacity = capacity_blocks.max(1);
        }
        self.evict_over_capacity(id);
    }

    pub fn remove_instance(&mut self, id: InstanceId) {
        self.clear(id);
        self.instances.remove(&id);
    }

    pub fn memory_bytes(&self) -> u64 {
        self.entries * BYTES_PER_ENTRY
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    pub fn blocks_of(&self, id: InstanceId) -> u64 {
        self.instances.get(&id).map_or(0, |p| p.live)
    }

    /// Leading blocks of `blocks` each instance holds, for every instance holding at least one.
    pub fn match_all(&self, blocks: &[BlockHash], now: Duration) -> Vec<(InstanceId, u32)> {
        let mut out: Vec<(InstanceId, u32)> = Vec::new();
        let Some(first) = blocks.first() else {
            return out;
        };
        let mut alive: Vec<InstanceId> = self.live_holders(first, now).collect();
        for (depth, block) in blocks.iter().enumerate().skip(1) {
            if alive.is_empty() {
                break;
            }
            let holders = self.holders.get(block);
            alive.retain(|id| {
                let holds = holders
                    .is_some_and(|hs| hs.iter().any(|h| h.instance == *id && self.live(h, now)));
                if !holds {
                    out.push((*id, depth as u32));
                }
                holds
            });
        }
        out.extend(alive.into_iter().map(|id| (id, blocks.len() as u32)));
        out
    }

    /// Records that `id` will hold `blocks` because the gateway routed them there (approximate).
    pub fn record(&mut self, id: InstanceId, blocks: &[BlockHash], now: Duration) {
        self.expire(id, now);
        for b in blocks {
            self.touch(id, *b, now, false);
        }
        self.evict_over_capacity(id);
        self.enforce_memory();
    }

    /// Records that `id` will hold `blocks` and mark them evict-first (one copy per handoff),
    /// in the queue its capacity cap drops first, last block first. Room for them comes as the
    /// engine makes it, inserting before it marks: from older marks, then the least recently
    /// used, and only then from this prompt.
    pub fn record_evict_first(&mut self, id: InstanceId, blocks: &[BlockHash], now: Duration) {
        self.expire(id, now);
        let first = self.seq + 1;
        for b in blocks.iter().rev() {
            self.touch_in(id, *b, now, false, Queue::Marked);
        }
        while self.instances.get(&id).is_some_and(|p| p.live > p.capacity) {
            let dropped = self.pop_oldest_if(id, Queue::Marked, |h| h.seq < first)
                || self.pop_oldest_if(id, Queue::Order, |_| true)
                || self.pop_oldest_if(id, Queue::Marked, |_| true);
            if !dropped {
                break;
            }
        }
        self.enforce_memory();
    }

    /// The engine reported it stored `blocks` (precise, no TTL).
    pub fn stored(&mut self, id: InstanceId, blocks: &[BlockHash], now: Duration) {
        for b in blocks {
            self.touch(id, *b, now, true);
        }
        self.enforce_memory();
    }

    /// The engine reported it evicted `blocks`.
    pub fn removed(&mut self, id: InstanceId, blocks: &[BlockHash]) {
        for b in blocks {
            self.drop_entry(id, *b);
        }
    }

    /// The engine dropped its whole cache.
    pub fn clear(&mut self, id: InstanceId) {
        let blocks: Vec<BlockHash> = self
            .instances
            .get(&id)
            .map(|p| p.order.iter().chain(&p.marked).map(|(_, b)| *b).collect())
            .unwrap_or_default();
        for b in blocks {
            self.drop_entry(id, b);
        }
        if let Some(per) = self.instances.get_mut(&id) {
            per.order.clear();
            per.marked.clear();
        }
    }

    fn live(&self, h: &Holder, now: Duration) -> bool {
        h.is_live(now, self.ttl)
    }

    fn live_holders<'a>(
        &'a self,
        block: &BlockHash,
        now: Duration,
    ) -> impl Iterator<Item = InstanceId> + 'a {
        self.holders
            .get(block)
            .into_iter()
            .flatten()
            .filter(move |h| self.live(h, now))
            .map(|h| h.instance)
    }

    fn touch(&mut self, id: InstanceId, block: BlockHash, now: Duration, precise: bool) {
        self.touch_in(id, block, now, precise, Queue::Order);
    }

    /// A touch, at the back of queue `q`.
    fn touch_in(
        &mut self,
        id: InstanceId,
        block: BlockHash,
        now: Duration,
        precise: bool,
        q: Queue,
    ) {
        self.seq += 1;
        let seq = self.seq;
        let Some(per) = self.instances.get_mut(&id) else {
            return;
        };
        let holders = self.holders.entry(block).or_default();
        match holders.iter_mut().find(|h| h.instance == id) {
            Some(h) => {
                h.seq = seq;
                h.touched_ms = millis(now);
                h.precise |= precise;
            }
            None => {
                holders.push(Holder {
                    instance: id,
                    seq,
                    touched_ms: millis(now),
                    precise,
                });
                self.entries += 1;
                per.live += 1;
            }
        }
        let live = per.live;
        let queue = per.queue(q);
        queue.push_back((seq, block));
        if queue.len() as u64 > 2 * live + 64 {
            let holders = &self.holders;
            queue.retain(|(seq, b)| {
                holders
                    .get(b)
                    .is_some_and(|hs| hs.iter().any(|h| h.instance == id && h.seq == *seq))
            });
        }
    }

    /// Drops the oldest live entry of `id`'s queue `q` if `evict` says so (skipping stale
    /// pairs on the way), with one map probe per pair. False when nothing was dropped.
    fn pop_oldest_if(&mut self, id: InstanceId, q: Queue, evict: impl Fn(&Holder) -> bool) -> bool {
        let Some(per) = self.instances.get_mut(&id) else {
            return false;
        };
        while let Some(&(seq, block)) = per.queue(q).front() {
            let Entry::Occupied(mut slot) = self.holders.entry(block) else {
                per.queue(q).pop_front();
                continue;
            };
            let holders = slot.get_mut();
            let Some(pos) = holders
                .iter()
                .position(|h| h.instance == id && h.seq == seq)
            else {
                per.queue(q).pop_front();
                continue;
            };
            if !evict(&holders[pos]) {
                return false;
            }
            holders.swap_remove(pos);
            if holders.is_empty() {
                slot.remove();
            }
            per.queue(q).pop_front();
            per.live -= 1;
            self.entries -= 1;
            return true;
        }
        false
    }

    fn drop_entry(&mut self, id: InstanceId, block: BlockHash) {
        let Some(holders) = self.holders.get_mut(&block) else {
            return;
        };
        let Some(pos) = holders.iter().position(|h| h.instance == id) else {
            return;
        };
        holders.swap_remove(pos);
        if holders.is_empty() {
            self.holders.remove(&block);
        }
        if let Some(per) = self.instances.get_mut(&id) {
            per.live -= 1;
        }
        self.entries -= 1;
    }

    /// Drops approximate entries of `id` older than the TTL (oldest first in each queue, so it
    /// stops early).
    fn expire(&mut self, id: InstanceId, now: Duration) {
        let ttl = self.ttl;
        for q in QUEUES {
            while self.pop_oldest_if(id, q, |h| !h.is_live(now, ttl)) {}
        }
    }

    /// Drops `id`'s first entry to go: the oldest marked one, else the oldest.
    fn pop_first_to_go(&mut self, id: InstanceId) -> bool {
        QUEUES
            .into_iter()
            .any(|q| self.pop_oldest_if(id, q, |_| true))
    }

    fn evict_over_capacity(&mut self, id: InstanceId) {
        while self.instances.get(&id).is_some_and(|p| p.live > p.capacity) {
            if !self.pop_first_to_go(id) {
                return;
            }
        }
    }

    /// Over the cap, evicts the largest instance's oldest blocks down to 95% of the cap: finding
    /// the largest scans the instances, so it is done once per batch, not once per block.
    fn enforce_memory(&mut self) {
        if self.entries <= self.max_entries {
            return;
        }
        let target = self.max_entries - self.max_entries / 20;
        while self.entries > target {
            let Some(largest) = self
                .instances
                .iter()
                .max_by_key(|(id, p)| (p.live, *id))
                .map(|(id, _)| id)
            else {
                return;
            };
            let floor = self.instances.get(&largest).map_or(0, |p| p.live / 2);
            while self.entries > target
                && self.instances.get(&largest).is_some_and(|p| p.live > floor)
            {
                if !self.pop_first_to_go(largest) {
                    return;
                }
            }
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
    fn a_blocks_slot_fits_one_cache_line() {
        use std::mem::size_of;
        assert_eq!(size_of::<Holder>(), 24);
        assert!(size_of::<BlockHash>() + size_of::<SmallVec<[Holder; 2]>>() <= 64);
    }

    fn index(capacity: u64, ttl_secs: u64) -> PrefixIndex {
        let mut ix = PrefixIndex::new(&IndexConfig {
            ttl_secs,
            default_capacity_blocks: capacity,
            max_bytes: u64::MAX,
        });
        for i in 0..3 {
            ix.add_instance(InstanceId(i), None);
        }
        ix
    }

    fn sorted(mut v: Vec<(InstanceId, u32)>) -> Vec<(u32, u32)> {
        v.sort();
        v.into_iter().map(|(i, n)| (i.0, n)).collect()
    }

    const T0: Duration = Duration::from_secs(1);

    #[test]
    fn one_walk_gives_every_instances_prefix_length() {
        let mut ix = index(100, 60);
        ix.record(InstanceId(0), &hs(&[1, 2, 3, 4]), T0);
        ix.record(InstanceId(1), &hs(&[1, 2]), T0);
        ix.record(InstanceId(2), &hs(&[9]), T0);
        assert_eq!(
            sorted(ix.match_all(&hs(&[1, 2, 3, 7]), T0)),
            vec![(0, 3), (1, 2)]
        );
        assert_eq!(sorted(ix.match_all(&hs(&[9, 1]), T0)), vec![(2, 1)]);
        assert!(ix.match_all(&hs(&[5]), T0).is_empty());
        assert!(ix.match_all(&[], T0).is_empty());
    }

    #[test]
    fn a_copy_recorded_evict_first_is_dropped_first_from_its_end() {
        let mut ix = index(6, 60);
        let id = InstanceId(0);
        ix.record(id, &hs(&[1, 2]), T0);
        ix.record_evict_first(id, &hs(&[3, 4, 5]), T0);
        ix.record(id, &hs(&[6]), T0);
        assert_eq!(ix.blocks_of(id), 6);
        // Over the cap: the evict-first run goes before the older 1, 2, last block first.
        ix.record(id, &hs(&[7, 8]), T0);
        assert_eq!(sorted(ix.match_all(&hs(&[3, 4, 5]), T0)), vec![(0, 1)]);
        assert_eq!(sorted(ix.match_all(&hs(&[1, 2]), T0)), vec![(0, 2)]);
        // Touched again by a routed request, it is an ordinary entry once more.
        ix.record(id, &hs(&[3]), T0);
        ix.record(id, &hs(&[9]), T0);
        assert_eq!(sorted(ix.match_all(&hs(&[3]), T0)), vec![(0, 1)]);
        assert_eq!(ix.blocks_of(id), 6);
    }

    /// As the engine: a marked prompt is inserted first (evicting the oldest blocks if full,
    /// never itself), and marked prompts go in the order they were marked; marked entries do
    /// not hold back the expiry of older ones.
    #[test]
    fn marked_copies_go_oldest_mark_first_and_never_block_expiry() {
        let mut ix = index(6, 10);
        let id = InstanceId(0);
        ix.record(id, &hs(&[1, 2, 3, 4, 5, 6]), T0);
        ix.record_evict_first(id, &hs(&[7, 8]), T0);
        assert_eq!(sorted(ix.match_all(&hs(&[7, 8]), T0)), vec![(0, 2)], "kept");
        assert!(
            ix.match_all(&hs(&[1]), T0).is_empty(),
            "the oldest made room"
        );
        ix.record_evict_first(id, &hs(&[9]), T0);
        assert_eq!(
            sorted(ix.match_all(&hs(&[7, 8]), T0)),
            vec![(0, 1)],
            "the first marked goes first, from its end"
        );
        assert_eq!(sorted(ix.match_all(&hs(&[9]), T0)), vec![(0, 1)]);
        // 3..6 expire behind the fresher marks.
        let later = T0 + Duration::from_secs(11);
        ix.record_evict_first(id, &hs(&[10]), later);
        assert_eq!(ix.blocks_of(id), 1, "only the newest mark is left");
    }

    #[test]
    fn a_gap_in_the_middle_ends_the_match() {
        let mut ix = index(100, 60);
        ix.record(InstanceId(0), &hs(&[1, 3]), T0);
        assert_eq!(sorted(ix.match_all(&hs(&[1, 2, 3]), T0)), vec![(0, 1)]);
    }

    #[test]
    fn approximate_entries_expire_but_precise_ones_do_not() {
        let mut ix = index(100, 10);
        ix.record(InstanceId(0), &hs(&[1, 2]), T0);
        ix.stored(InstanceId(1), &hs(&[1, 2]), T0);
        let later = T0 + Duration::from_secs(11);
        assert_eq!(sorted(ix.match_all(&hs(&[1, 2]), later)), vec![(1, 2)]);
        ix.record(InstanceId(2), &hs(&[5]), later);
        ix.record(InstanceId(0), &hs(&[7]), later);
        assert_eq!(
            ix.blocks_of(InstanceId(0)),
            1,
            "stale entries purged on the next record"
        );
    }

    #[test]
    fn capacity_evicts_least_recently_recorded() {
        let mut ix = index(3, 60);
        ix.record(InstanceId(0), &hs(&[1, 2, 3]), T0);
        ix.record(InstanceId(0), &hs(&[1]), T0);
        ix.record(InstanceId(0), &hs(&[4]), T0);
        assert_eq!(ix.blocks_of(InstanceId(0)), 3);
        assert_eq!(sorted(ix.match_all(&hs(&[2]), T0)), vec![]);
        assert_eq!(sorted(ix.match_all(&hs(&[1]), T0)), vec![(0, 1)]);
    }

    #[test]
    fn removal_clear_and_memory_accounting() {
        let mut ix = index(100, 60);
        ix.stored(InstanceId(0), &hs(&[1, 2, 3]), T0);
        ix.stored(InstanceId(1), &hs(&[1]), T0);
        assert_eq!(ix.memory_bytes(), 4 * BYTES_PER_ENTRY);
        ix.removed(InstanceId(0), &hs(&[2]));
        assert_eq!(
            sorted(ix.match_all(&hs(&[1, 2, 3]), T0)),
            vec![(0, 1), (1, 1)]
        );
        ix.clear(InstanceId(0));
        ix.remove_instance(InstanceId(1));
        assert_eq!(ix.entries(), 0);
        assert!(ix.match_all(&hs(&[1]), T0).is_empty());
    }

    #[test]
    fn memory_cap_evicts_from_the_largest_instance() {
        let mut ix = PrefixIndex::new(&IndexConfig {
            ttl_secs: 60,
            default_capacity_blocks: 1000,
            max_bytes: 4 * BYTES_PER_ENTRY,
        });
        ix.add_instance(InstanceId(0), None);
        ix.add_instance(InstanceId(1), None);
        ix.record(InstanceId(0), &hs(&[1, 2, 3]), T0);
        ix.record(InstanceId(1), &hs(&[7, 8]), T0);
        assert_eq!(ix.entries(), 4);
        assert_eq!(
            ix.blocks_of(InstanceId(0)),
            2,
            "largest instance gave up its oldest block"
        );
    }
}
