//! KV block contents: a deterministic function of the block's chained hash, so a receiver can
//! verify every byte it got without ever having seen the sender's memory.
//!
//! A block's bytes depend on its hash (which covers the whole prefix), so a lost, misplaced or
//! corrupted block fails verification. Generation must stay cheap: it runs on every send.

use pdgate_scheduler::BlockHash;

/// Fills `buf` with the contents of the block whose chained hash is `hash`.
pub fn fill_block(hash: BlockHash, buf: &mut [u8]) {
    let mut state = hash.0 ^ 0x9E37_79B9_7F4A_7C15;
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&next(&mut state).to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let tail = next(&mut state).to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&tail[..n]);
}

/// True when `buf` holds exactly the contents of block `hash`.
pub fn verify_block(hash: BlockHash, buf: &[u8]) -> bool {
    let mut state = hash.0 ^ 0x9E37_79B9_7F4A_7C15;
    let mut chunks = buf.chunks_exact(8);
    for chunk in &mut chunks {
        if chunk != next(&mut state).to_le_bytes() {
            return false;
        }
    }
    let rest = chunks.remainder();
    rest == &next(&mut state).to_le_bytes()[..rest.len()]
}

/// xorshift64*: fast, and good enough to make every block's bytes distinct.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_block_verifies_and_any_flip_is_caught() {
        let mut buf = vec![0u8; 1003];
        fill_block(BlockHash(42), &mut buf);
        assert!(verify_block(BlockHash(42), &buf));
        assert!(!verify_block(BlockHash(43), &buf), "misplaced block");
        for pos in [0, 500, 1002] {
            let mut bad = buf.clone();
            bad[pos] ^= 1;
            assert!(!verify_block(BlockHash(42), &bad), "flip at {pos}");
        }
        assert!(!verify_block(BlockHash(42), &vec![0u8; 1003]), "lost block");
    }
}
