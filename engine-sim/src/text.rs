//! Deterministic generated text: the next token is a function of the engine seed and every
//! token id of the sequence so far (the prompt's, then the generated ones), like greedy decoding
//! of a real model. So a prompt always yields the same reply, a decode engine continues exactly
//! where a prefill engine's first token left off, and a prompt extended by the first N tokens
//! of a reply (a continuation, as the gateway sends when it migrates a broken stream) yields
//! exactly the reply's tokens from N on.
//!
//! Every piece is one token under the built-in tokenizer, and each starts with a space or is
//! punctuation, so it never merges with the text before it: `prompt + pieces` re-encodes to the
//! prompt's tokens followed by the pieces', which keeps `usage` exact and continuations exact.

use pdgate_scheduler::{BuiltinTokenizer, TokenId};
use xxhash_rust::xxh3::Xxh3;

const VOCAB: [&str; 48] = [
    " the", " a", " model", " cache", " block", " token", " prefix", " decode", " prefill",
    " fleet", " moves", " keeps", " reads", " writes", " serves", " routes", " fast", " warm",
    " cold", " near", " far", " queue", " batch", " layer", " memory", " bytes", " link", " node",
    " engine", " gateway", " request", " reply", " stream", " on", " in", " to", " from", " with",
    " and", " then", " now", " soon", " here", " there", ",", ".", " it", " we",
];

/// A sequence being generated: a running hash of its token ids under the engine seed.
#[derive(Clone)]
pub struct Sequence(Xxh3);

impl Sequence {
    /// The sequence of a prompt's tokens, nothing generated yet.
    pub fn new(tokens: &[TokenId], seed: u64) -> Self {
        let mut h = Xxh3::with_seed(seed);
        for t in tokens {
            h.update(&t.to_le_bytes());
        }
        Self(h)
    }

    /// The vocabulary index of the token generated next.
    pub fn next_token(&self) -> u32 {
        (self.0.digest() % VOCAB.len() as u64) as u32
    }

    /// Appends a generated token (a vocabulary index) to the sequence.
    pub fn push(&mut self, index: u32) {
        let id = BuiltinTokenizer::piece_id(piece(index));
        self.0.update(&id.to_le_bytes());
    }

    /// The vocabulary indices of a reply of `len` tokens whose first is `first` (computed by
    /// whichever engine ran the prompt).
    pub fn reply(mut self, first: u32, len: u32) -> Vec<u32> {
        let mut out = Vec::with_capacity(len as usize);
        let mut next = first;
        for _ in 0..len {
            out.push(next);
            self.push(next);
            next = self.next_token();
        }
        out
    }
}

/// The first token a prompt generates.
pub fn first_token(tokens: &[TokenId], seed: u64) -> u32 {
    Sequence::new(tokens, seed).next_token()
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
        let seq = Sequence::new(&[7], 0);
        let text: String = seq.reply(3, 40).into_iter().map(piece).collect();
        assert_eq!(tok.count(&text), 40);
    }

    fn reply(prompt: &str, seed: u64, len: u32) -> Vec<u32> {
        let tokens = BuiltinTokenizer.encode(prompt);
        Sequence::new(&tokens, seed).reply(first_token(&tokens, seed), len)
    }

    #[test]
    fn deterministic_per_prompt_and_seed() {
        let a = reply("a prompt", 0, 16);
        assert_eq!(a, reply("a prompt", 0, 16));
        assert_ne!(a, reply("another prompt", 0, 16));
        assert_ne!(a, reply("a prompt", 9, 16));
    }

    #[test]
    fn a_prompt_extended_by_the_reply_continues_it() {
        // Prompts ending in a word, a space, punctuation or a newline: the reply's pieces never
        // merge with what precedes them.
        for prompt in [
            "once upon a time",
            "ends with space ",
            "end.",
            "<|assistant|>\n",
        ] {
            let whole = reply(prompt, 3, 12);
            for n in [1, 5, 11] {
                let said: String = whole[..n].iter().map(|&i| piece(i)).collect();
                let rest = reply(&format!("{prompt}{said}"), 3, 12 - n as u32);
                assert_eq!(rest, whole[n..], "{prompt:?} continued after {n}");
            }
        }
    }
}
