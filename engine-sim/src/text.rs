//! Deterministic generated text: the token at each position is a function of the prompt's
//! token ids, the engine seed and the position, so a prompt always yields the same reply and a
//! decode engine continues exactly where a prefill engine's first token left off.
//!
//! Every piece is one token under the built-in tokenizer, so `usage.completion_tokens` is exact.

use pdgate_scheduler::TokenId;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

const VOCAB: [&str; 48] = [
    " the", " a", " model", " cache", " block", " token", " prefix", " decode", " prefill",
    " fleet", " moves", " keeps", " reads", " writes", " serves", " routes", " fast", " warm",
    " cold", " near", " far", " queue", " batch", " layer", " memory", " bytes", " link", " node",
    " engine", " gateway", " request", " reply", " stream", " on", " in", " to", " from", " with",
    " and", " then", " now", " soon", " here", " there", ",", ".", " it", " we",
];

/// A key of the whole prompt, from its token ids.
pub fn prompt_key(tokens: &[TokenId]) -> u64 {
    let mut bytes = Vec::with_capacity(tokens.len() * 4);
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_64(&bytes)
}

/// The index into the vocabulary of the token generated at `position` (0 is the first token).
pub fn token_at(prompt_key: u64, seed: u64, position: u32) -> u32 {
    let mut buf = [0u8; 12];
    buf[..8].copy_from_slice(&prompt_key.to_le_bytes());
    buf[8..].copy_from_slice(&position.to_le_bytes());
    (xxh3_64_with_seed(&buf, seed) % VOCAB.len() as u64) as u32
}

/// The text of a vocabulary index; out-of-range indices (from a bad peer) map into range.
pub fn piece(index: u32) -> &'static str {
    VOCAB[index as usize % VOCAB.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdgate_scheduler::BuiltinTokenizer;

    #[test]
    fn every_piece_is_one_token() {
        let tok = BuiltinTokenizer;
        for p in VOCAB {
            assert_eq!(tok.count(p), 1, "{p:?}");
        }
        let text: String = (0..40).map(|i| piece(token_at(7, 0, i))).collect();
        assert_eq!(tok.count(&text), 40);
    }

    #[test]
    fn deterministic_per_prompt_and_seed() {
        let a: Vec<_> = (0..16).map(|i| token_at(1, 0, i)).collect();
        assert_eq!(a, (0..16).map(|i| token_at(1, 0, i)).collect::<Vec<_>>());
        assert_ne!(a, (0..16).map(|i| token_at(2, 0, i)).collect::<Vec<_>>());
        assert_ne!(a, (0..16).map(|i| token_at(1, 9, i)).collect::<Vec<_>>());
    }
}
