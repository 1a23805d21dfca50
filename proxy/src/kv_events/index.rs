//! One worker's blocks as its engine reports them, turned into the gateway's keys.
//!
//! Engines hash blocks with their own function and seed, so an engine hash means nothing to the
//! scheduler. A `BlockStored` carries the tokens, though: the keys are recomputed from them by
//! continuing the gateway's own chain from the parent block's key, and the engine hash → key map
//! kept here makes a later `BlockRemoved` (hashes only) work. Each engine block is remembered per
//! data-parallel rank and per medium (GPU, CPU, disk): a key stays in the prefix index while any
//! rank holds it in any tier. No I/O, no clock: fed decoded batches, it tells a sink what changed.

use pdgate_scheduler::{BlockHash, BlockHasher};
use pdgate_wire::kv_events::{BlockStored, EngineHash, EventBatch, KvEvent, Medium};
use std::collections::HashMap;

/// Where the resulting changes go: the scheduler's prefix index for one instance, in the
/// gateway; a counter in the benchmark's baseline.
pub trait Sink {
    fn stored(&mut self, keys: &[BlockHash]);
    fn removed(&mut self, keys: &[BlockHash]);
    fn cleared(&mut self);
}

/// Why a `BlockStored` (or part of one) was not indexed: each is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Its parent is not known here (stored before we subscribed, or already removed).
    Orphan,
    /// LoRA blocks and blocks with extra keys (images, cache salt) are not what equal tokens
    /// look up.
    NotPlainTokens,
    /// The engine's block size differs from `scheduler.block_size`: keys could never match.
    BlockSize,
    /// `max_blocks_per_worker` reached.
    Full,
    /// A store without token ids (how offloading connectors announce a copy in another tier)
    /// of a block never stored with its tokens here: its key cannot be computed.
    Unknown,
}

impl Skip {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Orphan => "orphan",
            Self::NotPlainTokens => "not_plain_tokens",
            Self::BlockSize => "block_size",
            Self::Full => "full",
            Self::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Held {
    key: BlockHash,
    /// One bit per `Medium`.
    tiers: u8,
}

fn bit(m: Medium) -> u8 {
    match m {
        Medium::Gpu => 1,
        Medium::Cpu => 2,
        Medium::Disk => 4,
        Medium::Other => 8,
    }
}

#[derive(Debug)]
pub struct WorkerIndex {
    hasher: BlockHasher,
    blocks: HashMap<(u32, EngineHash), Held>,
    /// Engine blocks (over ranks) mapping to each key: the key leaves the index at zero.
    refs: HashMap<BlockHash, u32>,
    max_blocks: usize,
    keys: Vec<BlockHash>,
}

impl WorkerIndex {
    pub fn new(hasher: BlockHasher, max_blocks: usize) -> Self {
        Self {
            hasher,
            blocks: HashMap::new(),
            refs: HashMap::new(),
            max_blocks: max_blocks.max(1),
            keys: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Forgets everything (AllBlocksCleared, a lost subscription, an unrecoverable gap).
    pub fn clear(&mut self, sink: &mut impl Sink) {
        self.blocks.clear();
        self.refs.clear();
        sink.cleared();
    }

    /// Applies one batch in order; `skipped` hears of every event not (fully) indexed.
    pub fn apply(
        &mut self,
        batch: &EventBatch,
        sink: &mut impl Sink,
        skipped: &mut impl FnMut(Skip),
    ) {
        let rank = batch.data_parallel_rank.unwrap_or(0);
        for e in &batch.events {
            match e {
                KvEvent::BlockStored(s) => {
                    if let Err(why) = self.stored(rank, s, sink) {
                        skipped(why);
                    }
                }
                KvEvent::BlockRemoved {
                    block_hashes,
                    medium,
                } => self.removed(rank, block_hashes, *medium, sink),
                KvEvent::AllBlocksCleared => self.clear(sink),
            }
        }
    }

    fn stored(&mut self, rank: u32, s: &BlockStored, sink: &mut impl Sink) -> Result<(), Skip> {
        if s.lora_id.is_some() || s.lora_name.is_some() || s.has_extra_keys {
            return Err(Skip::NotPlainTokens);
        }
        let bs = self.hasher.block_size();
        if s.block_size as usize != bs {
            return Err(Skip::BlockSize);
        }
        if s.token_ids.is_empty() && !s.block_hashes.is_empty() {
            return self.another_tier(rank, s);
        }
        let parent = match s.parent_block_hash {
            None => None,
            Some(h) => Some(self.blocks.get(&(rank, h)).ok_or(Skip::Orphan)?.key),
        };
        let n = s.block_hashes.len().min(s.token_ids.len() / bs);
        let keys = self.hasher.continue_chain(parent, &s.token_ids[..n * bs]);
        let mut out = std::mem::take(&mut self.keys);
        out.clear();
        let mut full = false;
        for (eh, key) in s.block_hashes.iter().zip(keys) {
            let room = self.blocks.len() < self.max_blocks;
            match self.blocks.get_mut(&(rank, *eh)) {
                Some(held) if held.key == key => held.tiers |= bit(s.medium),
                Some(held) => {
                    // The engine reused a hash for other tokens: the new content wins.
                    let old = held.key;
                    *held = Held {
                        key,
                        tiers: bit(s.medium),
                    };
                    self.unref(old, sink);
                    *self.refs.entry(key).or_insert(0) += 1;
                }
                None if !room => {
                    full = true;
                    break;
                }
                None => {
                    self.blocks.insert(
                        (rank, *eh),
                        Held {
                            key,
                            tiers: bit(s.medium),
                        },
                    );
                    *self.refs.entry(key).or_insert(0) += 1;
                }
            }
            out.push(key);
        }
        sink.stored(&out);
        self.keys = out;
        if full {
            return Err(Skip::Full);
        }
        Ok(())
    }

    /// Blocks named by hash alone now also held in `s.medium`: the tier is added to blocks this
    /// index knows; the key set does not change.
    fn another_tier(&mut self, rank: u32, s: &BlockStored) -> Result<(), Skip> {
        let mut unknown = false;
        for eh in &s.block_hashes {
            match self.blocks.get_mut(&(rank, *eh)) {
                Some(held) => held.tiers |= bit(s.medium),
                None => unknown = true,
            }
        }
        match unknown {
            true => Err(Skip::Unknown),
            false => Ok(()),
        }
    }

    fn removed(&mut self, rank: u32, hashes: &[EngineHash], m: Medium, sink: &mut impl Sink) {
        let mut gone = std::mem::take(&mut self.keys);
        gone.clear();
        for eh in hashes {
            let Some(held) = self.blocks.get_mut(&(rank, *eh)) else {
                continue;
            };
            held.tiers &= !bit(m);
            if held.tiers != 0 {
                continue;
            }
            let key = held.key;
            self.blocks.remove(&(rank, *eh));
            if self.release(key) {
                gone.push(key);
            }
        }
        if !gone.is_empty() {
            sink.removed(&gone);
        }
        self.keys = gone;
    }

    /// Drops one reference to `key`; true when none is left.
    fn release(&mut self, key: BlockHash) -> bool {
        match self.refs.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.refs.remove(&key);
                true
            }
            None => false,
        }
    }

    fn unref(&mut self, key: BlockHash, sink: &mut impl Sink) {
        if self.release(key) {
            sink.removed(&[key]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdgate_scheduler::blocks::DEFAULT_SEED;

    #[derive(Default)]
    struct Log {
        held: std::collections::HashSet<BlockHash>,
    }

    impl Sink for Log {
        fn stored(&mut self, keys: &[BlockHash]) {
            self.held.extend(keys.iter().copied());
        }
        fn removed(&mut self, keys: &[BlockHash]) {
            for k in keys {
                self.held.remove(k);
            }
        }
        fn cleared(&mut self) {
            self.held.clear();
        }
    }

    const BS: usize = 4;

    fn hasher() -> BlockHasher {
        BlockHasher::new(BS, DEFAULT_SEED)
    }

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32], medium: Medium) -> KvEvent {
        KvEvent::BlockStored(BlockStored {
            block_hashes: hashes.iter().copied().map(EngineHash).collect(),
            parent_block_hash: parent.map(EngineHash),
            token_ids: tokens.to_vec(),
            block_size: BS as u32,
            lora_id: None,
            lora_name: None,
            medium,
            has_extra_keys: false,
        })
    }

    fn batch(events: Vec<KvEvent>, rank: Option<u32>) -> EventBatch {
        EventBatch {
            ts: 0.0,
            events,
            data_parallel_rank: rank,
        }
    }

    fn apply(ix: &mut WorkerIndex, log: &mut Log, b: EventBatch) -> Vec<Skip> {
        let mut skips = Vec::new();
        ix.apply(&b, log, &mut |s| skips.push(s));
        skips
    }

    #[test]
    fn keys_are_the_gateways_whatever_the_engine_hashes() {
        let tokens: Vec<u32> = (0..12).collect();
        let want = hasher().full_blocks(&tokens);
        let (mut ix, mut log) = (WorkerIndex::new(hasher(), 100), Log::default());
        // Stored in two events, the second chained to the first by the engine's own hash.
        let skips = apply(
            &mut ix,
            &mut log,
            batch(
                vec![
                    stored(&[900, 901], None, &tokens[..8], Medium::Gpu),
                    stored(&[902], Some(901), &tokens[8..], Medium::Gpu),
                ],
                None,
            ),
        );
        assert!(skips.is_empty());
        assert_eq!(log.held, want.iter().copied().collect());
        apply(
            &mut ix,
            &mut log,
            batch(
                vec![KvEvent::BlockRemoved {
                    block_hashes: vec![EngineHash(902), EngineHash(12345)],
                    medium: Medium::Gpu,
                }],
                None,
            ),
        );
        assert_eq!(log.held, want[..2].iter().copied().collect());
        apply(
            &mut ix,
            &mut log,
            batch(vec![KvEvent::AllBlocksCleared], None),
        );
        assert!(log.held.is_empty() && ix.is_empty());
    }

    #[test]
    fn a_key_stays_while_any_tier_or_rank_holds_it() {
        let tokens: Vec<u32> = (0..4).collect();
        let (mut ix, mut log) = (WorkerIndex::new(hasher(), 100), Log::default());
        apply(
            &mut ix,
            &mut log,
            batch(
                vec![
                    stored(&[1], None, &tokens, Medium::Gpu),
                    stored(&[1], None, &tokens, Medium::Cpu),
                ],
                Some(0),
            ),
        );
        apply(
            &mut ix,
            &mut log,
            batch(vec![stored(&[77], None, &tokens, Medium::Gpu)], Some(1)),
        );
        let removed = |h, m, r| {
            batch(
                vec![KvEvent::BlockRemoved {
                    block_hashes: vec![EngineHash(h)],
                    medium: m,
                }],
                Some(r),
            )
        };
        apply(&mut ix, &mut log, removed(1, Medium::Gpu, 0));
        assert_eq!(log.held.len(), 1, "offloaded to CPU, still held");
        apply(&mut ix, &mut log, removed(1, Medium::Cpu, 0));
        assert_eq!(log.held.len(), 1, "rank 1 still holds it");
        apply(&mut ix, &mut log, removed(77, Medium::Gpu, 1));
        assert!(log.held.is_empty());
    }

    #[test]
    fn a_store_by_hash_alone_adds_a_tier_to_known_blocks() {
        let tokens: Vec<u32> = (0..8).collect();
        let (mut ix, mut log) = (WorkerIndex::new(hasher(), 100), Log::default());
        apply(
            &mut ix,
            &mut log,
            batch(vec![stored(&[1, 2], None, &tokens, Medium::Gpu)], None),
        );
        // Offloaded to CPU, announced without tokens (as offloading connectors do), then
        // evicted from the GPU: still held, by the CPU tier.
        let skips = apply(
            &mut ix,
            &mut log,
            batch(
                vec![
                    stored(&[1, 2, 9], None, &[], Medium::Cpu),
                    KvEvent::BlockRemoved {
                        block_hashes: vec![EngineHash(1), EngineHash(2)],
                        medium: Medium::Gpu,
                    },
                ],
                None,
            ),
        );
        assert_eq!(
            skips,
            vec![Skip::Unknown],
            "9 was never stored with its tokens"
        );
        assert_eq!(log.held.len(), 2, "held in host memory");
        assert_eq!(ix.len(), 2, "the unknown block is not indexed");
        apply(
            &mut ix,
            &mut log,
            batch(
                vec![KvEvent::BlockRemoved {
                    block_hashes: vec![EngineHash(1), EngineHash(2)],
                    medium: Medium::Cpu,
                }],
                None,
            ),
        );
        assert!(log.held.is_empty(), "no tier holds them");
    }

    #[test]
    fn unknown_parents_lora_and_other_block_sizes_are_skipped() {
        let tokens: Vec<u32> = (0..4).collect();
        let (mut ix, mut log) = (WorkerIndex::new(hasher(), 2), Log::default());
        let mut lora = stored(&[2], None, &tokens, Medium::Gpu);
        if let KvEvent::BlockStored(s) = &mut lora {
            s.lora_name = Some("adapter".into());
        }
        let mut other_size = stored(&[3], None, &tokens, Medium::Gpu);
        if let KvEvent::BlockStored(s) = &mut other_size {
            s.block_size = 2;
        }
        let skips = apply(
            &mut ix,
            &mut log,
            batch(
                vec![
                    stored(&[1], Some(42), &tokens, Medium::Gpu),
                    lora,
                    other_size,
                    stored(&[5, 6, 7], None, &(0..12).collect::<Vec<_>>(), Medium::Gpu),
                ],
                None,
            ),
        );
        assert_eq!(
            skips,
            vec![
                Skip::Orphan,
                Skip::NotPlainTokens,
                Skip::BlockSize,
                Skip::Full
            ]
        );
        assert_eq!(ix.len(), 2, "bounded per worker");
        assert_eq!(log.held.len(), 2);
    }
}
