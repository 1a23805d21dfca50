//! One copy per handoff: which engine keeps a handed-off prompt's KV in its prefix cache as a
//! normal entry, and which marks its copy to be evicted first.
//!
//! A disaggregated request leaves its prompt's blocks in two caches, the prefill's (it computed
//! them) and the decode's (it received them). With caches that hold many prompts, every block
//! held twice halves what the fleet can cache: on the public trace with roomy caches the fleet
//! held ~320k distinct blocks in 524k slots and its hit rate stalled at 0.79× that of one pooled
//! cache. Marking one copy evict-first keeps both while there is room and drops the duplicate
//! before any block held once.
//!
//! Which side keeps it is a hash of the prompt's block at `SIDE_DEPTH_TOKENS`, weighted by the
//! prefill instances' share of the fleet's cache: a conversation's turns and the prompts that share a
//! document keep choosing the same side (so the next turn finds its history where the
//! scheduler routes it), and the fleet's content spreads over both sides in proportion to
//! their room. The depth is past a typical system prompt, so prompts sharing only that still
//! spread. A prompt shorter than that is decided by its last full block, so the turns of a
//! short conversation may change sides.
//!
//! Caches that hold only a few of the fleet's typical prompts turn over in seconds anyway; there
//! the second copy is often the only one left for the next turn, so both are kept
//! (`reuse.one_copy_min_prompts`). The test is on the typical prompt, not this one, so that all
//! of a fleet's handoffs are treated alike. And without pulls a decode's copy serves only a
//! turn that prefills locally on that decode, so there the decodes keep a share only where
//! prompts often come back almost whole.

use crate::candidate::Candidate;
use crate::config::SchedulerConfig;
use crate::types::{RequestKey, Role};

/// Prompt tokens from the start to the block that picks the side: past a typical system
/// prompt, within a conversation's first turn.
const SIDE_DEPTH_TOKENS: usize = 2048;

/// Without pulls, decodes keep a share of the copies only if at least this share of prompts
/// is cached almost whole somewhere (on the public trace 38 %, on multi-turn chat whose turns
/// add a third to the history none).
const NEAR_WHOLE_REUSE_FOR_DECODE_COPIES: f64 = 0.1;

/// What the fleet looks like to the choice.
#[derive(Debug, Clone, Copy)]
pub struct FleetView {
    /// The prefill instances' share of the fleet's cache blocks, in `[0, 1]`.
    pub prefill_share: f64,
    /// Blocks of a typical prompt (a moving average).
    pub typical_prompt_blocks: f64,
    /// Share of recent prompts that some instance cached almost whole (at least
    /// `disagg.local_prefill_min_hit`): how often a decode's copy serves a turn locally.
    pub near_whole_reuse: f64,
}

/// The side whose copy of the prompt its engine evicts first, for a request prefilled on `p`
/// and decoded on `d`; `None` keeps both as normal entries.
pub fn evict_first(
    cfg: &SchedulerConfig,
    key: &RequestKey,
    p: &Candidate,
    d: &Candidate,
    fleet: FleetView,
) -> Option<Role> {
    let reuse = &cfg.reuse;
    let room = fleet.typical_prompt_blocks.max(1.0) * f64::from(reuse.one_copy_min_prompts);
    let roomy = |c: &Candidate| c.capacity_blocks as f64 >= room;
    if !reuse.one_copy || key.blocks.is_empty() || !roomy(p) || !roomy(d) {
        return None;
    }
    // Without pulls a decode's copy serves only a turn that prefills locally on it; where
    // prompts are seldom cached almost whole, the prefill's copy is the one worth keeping.
    if !reuse.pull && fleet.near_whole_reuse < NEAR_WHOLE_REUSE_FOR_DECODE_COPIES {
        return Some(Role::Decode);
    }
    let depth = (SIDE_DEPTH_TOKENS / cfg.block_size.max(1)).min(key.blocks.len() - 1);
    // Mixed first, as a block hash may come from any engine's scheme (or a test's counter).
    let u = (mix(key.blocks[depth].0) >> 11) as f64 / (1u64 << 53) as f64;
    Some(if u < fleet.prefill_share.clamp(0.0, 1.0) {
        Role::Decode
    } else {
        Role::Prefill
    })
}

/// SplitMix64's finalizer: every input bit moves every output bit.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::BlockHash;
    use crate::policy::testing::cand;

    fn key_with(blocks: Vec<BlockHash>) -> RequestKey {
        RequestKey {
            prompt_tokens: blocks.len() as u32 * 16,
            max_tokens: 8,
            blocks,
        }
    }

    /// `n` prompts of `len` blocks sharing nothing.
    fn prompts(n: u64, len: u64) -> Vec<RequestKey> {
        (0..n)
            .map(|i| {
                let blocks = (0..len).map(|j| BlockHash(i * len + j)).collect();
                key_with(blocks)
            })
            .collect()
    }

    fn view(prefill_share: f64, typical_prompt_blocks: f64) -> FleetView {
        FleetView {
            prefill_share,
            typical_prompt_blocks,
            near_whole_reuse: 1.0,
        }
    }

    fn pair(capacity: u64) -> (Candidate, Candidate) {
        let (mut p, mut d) = (cand(0), cand(1));
        p.capacity_blocks = capacity;
        d.capacity_blocks = capacity;
        (p, d)
    }

    #[test]
    fn the_sides_split_the_prompts_by_their_share_of_the_cache() {
        let cfg = SchedulerConfig::default();
        let (p, d) = pair(1 << 20);
        for share in [0.25, 0.5, 0.75] {
            let kept_on_prefill = prompts(2000, 200)
                .iter()
                .filter(|k| evict_first(&cfg, k, &p, &d, view(share, 200.0)) == Some(Role::Decode))
                .count() as f64
                / 2000.0;
            assert!(
                (kept_on_prefill - share).abs() < 0.05,
                "share {share}: {kept_on_prefill} kept on prefill"
            );
        }
    }

    #[test]
    fn prompts_that_share_their_leading_blocks_keep_the_same_side() {
        let cfg = SchedulerConfig::default();
        let (p, d) = pair(1 << 20);
        let depth = SIDE_DEPTH_TOKENS / cfg.block_size;
        for k in prompts(50, 300) {
            let side = evict_first(&cfg, &k, &p, &d, view(0.5, 300.0));
            // A later turn: the same leading blocks, then more of its own.
            let mut longer = k.blocks.clone();
            longer.extend((0..100).map(|j| BlockHash(j ^ 0xABCD)));
            assert_eq!(
                evict_first(&cfg, &key_with(longer), &p, &d, view(0.5, 300.0)),
                side
            );
            // A prompt that shares only blocks before the depth may go either way; one that
            // differs at the depth is decided by its own block.
            let mut other = k.blocks.clone();
            other[depth] = BlockHash(!other[depth].0);
            let flipped = evict_first(&cfg, &key_with(other), &p, &d, view(0.5, 300.0));
            assert!(flipped.is_some());
        }
    }

    #[test]
    fn both_copies_stay_when_the_caches_hold_few_typical_prompts_or_it_is_off() {
        let mut cfg = SchedulerConfig::default();
        // This prompt is small; the fleet's typical one is 600 blocks.
        let k = &prompts(1, 10)[0];
        let typical = view(0.5, 600.0);
        let min = u64::from(cfg.reuse.one_copy_min_prompts);
        let (p, d) = pair(600 * min);
        assert!(evict_first(&cfg, k, &p, &d, typical).is_some());
        let (p_small, _) = pair(600 * min - 1);
        assert_eq!(evict_first(&cfg, k, &p_small, &d, typical), None);
        assert_eq!(evict_first(&cfg, k, &p, &p_small, typical), None);
        cfg.reuse.one_copy = false;
        assert_eq!(evict_first(&cfg, k, &p, &d, typical), None);
        cfg.reuse.one_copy = true;
        assert_eq!(evict_first(&cfg, &key_with(vec![]), &p, &d, typical), None);
    }

    #[test]
    fn without_pulls_the_prefill_keeps_all_unless_prompts_come_back_almost_whole() {
        let mut cfg = SchedulerConfig::default();
        cfg.reuse.pull = false;
        let (p, d) = pair(1 << 20);
        let keys = prompts(200, 200);
        let kept_on_prefill = |near_whole: f64| {
            let fleet = FleetView {
                near_whole_reuse: near_whole,
                ..view(0.5, 200.0)
            };
            keys.iter()
                .filter(|k| evict_first(&cfg, k, &p, &d, fleet) == Some(Role::Decode))
                .count()
        };
        assert_eq!(kept_on_prefill(0.05), 200, "every copy kept on the prefill");
        let split = kept_on_prefill(0.3);
        assert!((60..140).contains(&split), "split by share: {split}");
    }
}
