//! Token blocks and their chained 64-bit hashes: the prefix key of a request.
//!
//! `h_i = XXH3(h_{i-1} || tokens_i, seed)`, so two prompts share their leading block hashes
//! exactly as far as they share whole leading blocks. The reference engine's prefix cache and the
//! gateway's index use this one function; it must never change silently.

use crate::tokenizer::TokenId;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BlockHash(pub u64);

/// Default seed; chosen once, shared by every component that keys blocks.
pub const DEFAULT_SEED: u64 = 0x7064_6761_7465; // "pdgate"

#[derive(Debug, Clone, Copy)]
pub struct BlockHasher {
    block_size: usize,
    seed: u64,
}

impl BlockHasher {
    /// `block_size` of zero is meaningless; it is clamped to one token.
    pub fn new(block_size: usize, seed: u64) -> Self {
        Self {
            block_size: block_size.max(1),
            seed,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Hashes of every *full* block: what a prefix cache can hold.
    pub fn full_blocks(&self, tokens: &[TokenId]) -> Vec<BlockHash> {
        self.chain(0, tokens.chunks_exact(self.block_size))
    }

    /// Keys of the full blocks of `tokens` continuing the chain after `parent` (`None`: from
    /// the start of a prompt): how an engine's report of blocks it stored becomes the keys a
    /// request for the same tokens looks up, whatever the engine hashes with.
    pub fn continue_chain(&self, parent: Option<BlockHash>, tokens: &[TokenId]) -> Vec<BlockHash> {
        self.chain(
            parent.map_or(0, |p| p.0),
            tokens.chunks_exact(self.block_size),
        )
    }

    /// Hashes of every block including a partial last one: what a KV handoff must move.
    pub fn all_blocks(&self, tokens: &[TokenId]) -> Vec<BlockHash> {
        self.chain(0, tokens.chunks(self.block_size))
    }

    /// Number of blocks (a partial last block counts) that `tokens` tokens occupy.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn chain<'a>(
        &self,
        mut prev: u64,
        chunks: impl Iterator<Item = &'a [TokenId]>,
    ) -> Vec<BlockHash> {
        let mut buf = Vec::with_capacity(8 + 4 * self.block_size);
        chunks
            .map(|chunk| {
                buf.clear();
                buf.extend_from_slice(&prev.to_le_bytes());
                for t in chunk {
                    buf.extend_from_slice(&t.to_le_bytes());
                }
                prev = xxh3_64_with_seed(&buf, self.seed);
                BlockHash(prev)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: u32, salt: u32) -> Vec<TokenId> {
        (0..n).map(|i| i.wrapping_mul(2654435761) ^ salt).collect()
    }

    #[test]
    fn equal_prefix_gives_equal_leading_hashes() {
        let h = BlockHasher::new(4, DEFAULT_SEED);
        let mut a = toks(12, 0);
        let mut b = a.clone();
        a.extend(toks(8, 1));
        b.extend(toks(8, 2));
        let (ha, hb) = (h.full_blocks(&a), h.full_blocks(&b));
        assert_eq!(ha.len(), 5);
        assert_eq!(ha[..3], hb[..3]);
        assert_ne!(ha[3], hb[3]);
        assert_ne!(ha[4], hb[4], "divergence propagates down the chain");
    }

    #[test]
    fn partial_tail_only_in_all_blocks() {
        let h = BlockHasher::new(4, DEFAULT_SEED);
        let t = toks(10, 0);
        assert_eq!(h.full_blocks(&t).len(), 2);
        let all = h.all_blocks(&t);
        assert_eq!(all.len(), 3);
        assert_eq!(all[..2], h.full_blocks(&t)[..]);
        assert_eq!(h.blocks_for(10), 3);
    }

    #[test]
    fn continuing_a_chain_gives_the_same_keys_as_hashing_the_whole() {
        let h = BlockHasher::new(4, DEFAULT_SEED);
        let t = toks(16, 3);
        let whole = h.full_blocks(&t);
        assert_eq!(h.continue_chain(None, &t[..8]), whole[..2]);
        assert_eq!(h.continue_chain(Some(whole[1]), &t[8..]), whole[2..]);
    }

    #[test]
    fn seed_changes_every_hash() {
        let t = toks(8, 0);
        let a = BlockHasher::new(4, 1).full_blocks(&t);
        let b = BlockHasher::new(4, 2).full_blocks(&t);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
    }

    #[test]
    fn same_block_content_at_different_depth_hashes_differently() {
        let h = BlockHasher::new(2, DEFAULT_SEED);
        let hashes = h.full_blocks(&[7, 7, 7, 7]);
        assert_ne!(hashes[0], hashes[1]);
    }
}
