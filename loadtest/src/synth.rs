//! Prompt synthesis: turns a trace request into prompt text whose length in tokens equals the
//! trace's `input_length` under the tokenizer in use, and whose blocks are a pure function of
//! their Mooncake ids — equal ids ⇒ equal text ⇒ equal engine KV blocks, so prefix reuse in the
//! trace becomes real prefix reuse on the server.
//!
//! Each 512-token block is 512 words drawn (by a hash of the block id and position) from a list
//! of short common words with a leading space. Under the built-in tokenizer every such word is
//! exactly one token and never merges with its neighbours, so lengths are exact by construction;
//! under a real BPE tokenizer nearly every word is one token and a bounded correction pass trims
//! or pads the tail. It never touches the text of a full shared block to fix a length.

use crate::trace::types::{Prompt, TraceRequest, MOONCAKE_BLOCK_TOKENS};
// Defined in `tokens` so trace loading need not import synthesis; re-exported for callers that
// name them by their old path (`pdgate_loadtest::synth::CountTokens`).
pub use crate::tokens::{Builtin, CountTokens};
use pdgate_scheduler::{BlockHash, BlockHasher, BuiltinTokenizer};
use std::sync::Arc;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Short, common English words: one token each in the built-in tokenizer (≤ 8 alphanumerics
/// after a space) and, in practice, in GPT/Llama/DeepSeek-style BPE vocabularies.
const WORDS: [&str; 128] = [
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "she", "other", "its", "may",
    "these", "about", "them", "than", "some", "time", "could", "into", "two", "then", "only",
    "first", "new", "like", "people", "what", "also", "my", "any", "over", "after", "most", "made",
    "such", "between", "many", "should", "through", "where", "years", "those", "before", "must",
    "under", "state", "work", "three", "while", "world", "still", "being", "same", "great", "life",
    "since", "each", "good", "both", "year", "used", "day", "way", "might", "house", "part",
    "water", "every", "small", "number", "around", "during", "place", "long", "again", "found",
    "high", "system", "model", "cache", "block", "token", "prefix", "memory", "engine", "gateway",
    "stream",
];

/// Seed of block text; fixed so two runs (or replayer and simulator) agree.
const TEXT_SEED: u64 = 0x7064_7465_7874; // "pdtext"
/// Salt separating request-unique padding from block ids.
const PAD_SALT: u64 = 0x5041_4444_0000_0000;

#[derive(Clone)]
pub struct Synth {
    tok: Arc<dyn CountTokens>,
}

impl Synth {
    pub fn new(tok: Arc<dyn CountTokens>) -> Self {
        Self { tok }
    }

    pub fn builtin() -> Self {
        Self::new(Arc::new(Builtin))
    }

    pub fn tokenizer(&self) -> &dyn CountTokens {
        self.tok.as_ref()
    }

    /// The `i`-th word of block `id` (with its leading space).
    fn word(id: u64, i: usize, out: &mut String) {
        let h = xxh3_64_with_seed(
            &[id.to_le_bytes(), (i as u64).to_le_bytes()].concat(),
            TEXT_SEED,
        );
        out.push(' ');
        out.push_str(WORDS[(h % WORDS.len() as u64) as usize]);
    }

    /// The first `words` words of block `id`: a pure function of the id.
    pub fn block_text(id: u64, words: usize, out: &mut String) {
        for i in 0..words {
            Self::word(id, i, out);
        }
    }

    /// The prompt text of `req`, `input_tokens` long under this synthesiser's tokenizer.
    pub fn prompt(&self, req: &TraceRequest) -> String {
        let ids = match &req.prompt {
            Prompt::Text(t) => return t.clone(),
            Prompt::HashIds(ids) => ids,
        };
        let target = req.input_tokens as usize;
        let mut text = String::with_capacity(target * 8);
        let mut left = target;
        for id in ids {
            let n = left.min(MOONCAKE_BLOCK_TOKENS);
            Self::block_text(*id, n, &mut text);
            left -= n;
        }
        // Tokens beyond the listed ids are unique to this request.
        let pad_id = PAD_SALT ^ req.index as u64;
        let mut pad_words = 0;
        Self::block_text_from(pad_id, pad_words, left, &mut text);
        pad_words += left;
        if self.tok.one_token_per_word() {
            return text;
        }
        // A BPE tokenizer may split a word or merge across a boundary: trim or pad the tail a
        // bounded number of times; each pass moves at least one token towards the target.
        for _ in 0..32 {
            let have = self.tok.count(&text);
            if have == target {
                break;
            }
            // Move by the estimated number of words (tokens per word measured on this text),
            // at least one, so a tokenizer splitting words converges instead of oscillating.
            let words = text.matches(' ').count().max(1);
            let per_word = (have as f64 / words as f64).max(1e-3);
            let step = |tokens: usize| ((tokens as f64 / per_word).round() as usize).max(1);
            if have > target {
                for _ in 0..step(have - target) {
                    match text.rfind(' ') {
                        Some(pos) if pos > 0 => text.truncate(pos),
                        _ => break,
                    }
                }
            } else {
                let n = step(target - have);
                Self::block_text_from(pad_id, pad_words, n, &mut text);
                pad_words += n;
            }
        }
        text
    }

    fn block_text_from(id: u64, start: usize, n: usize, out: &mut String) {
        for i in start..start + n {
            Self::word(id, i, out);
        }
    }
}

/// Engine-block keys of a request for the simulator: the chained hashes of every full
/// `block_size`-token block, derived so that requests sharing Mooncake ids share exactly the
/// engine blocks those ids cover (what the built-in tokenizer yields on the synthesised text).
pub fn engine_blocks(req: &TraceRequest, block_size: usize) -> Vec<BlockHash> {
    let block_size = block_size.max(1);
    match &req.prompt {
        Prompt::Text(t) => {
            let tokens = BuiltinTokenizer.encode(t);
            BlockHasher::new(block_size, pdgate_scheduler::blocks::DEFAULT_SEED)
                .full_blocks(&tokens)
        }
        Prompt::HashIds(ids) => {
            let full = req.input_tokens as usize / block_size;
            let mut out = Vec::with_capacity(full);
            let mut pos = 0usize;
            let owner = |pos: usize| -> (u64, usize) {
                let b = pos / MOONCAKE_BLOCK_TOKENS;
                match ids.get(b) {
                    Some(id) => (*id, b),
                    None => (PAD_SALT ^ req.index as u64, usize::MAX),
                }
            };
            let mut prev = 0u64;
            while out.len() < full {
                // A block straddling two ids (block_size not dividing 512) or the padding is
                // keyed by everything it covers, chained like the engine's hashes.
                let (a, ia) = owner(pos);
                let (b, ib) = owner(pos + block_size - 1);
                let key = [
                    prev.to_le_bytes(),
                    a.to_le_bytes(),
                    b.to_le_bytes(),
                    (pos as u64).to_le_bytes(),
                    [ia as u8, ib as u8, 0, 0, 0, 0, 0, 0],
                ]
                .concat();
                // Within an id the chain is already implied by the id; chaining keeps a padded
                // request's blocks distinct from any other's.
                prev = xxh3_64_with_seed(&key, TEXT_SEED);
                out.push(BlockHash(prev));
                pos += block_size;
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdgate_scheduler::blocks::DEFAULT_SEED;

    fn req(index: usize, input: u32, ids: &[u64]) -> TraceRequest {
        TraceRequest {
            index,
            arrival_ms: Some(0.0),
            input_tokens: input,
            output_tokens: 1,
            prompt: Prompt::HashIds(ids.to_vec()),
        }
    }

    #[test]
    fn every_word_is_one_builtin_token() {
        for w in WORDS {
            assert!(
                w.len() <= 8 && w.bytes().all(|b| b.is_ascii_alphanumeric()),
                "{w}"
            );
            assert_eq!(BuiltinTokenizer.count(&format!(" {w}")), 1);
        }
    }

    #[test]
    fn lengths_match_input_length_exactly() {
        let s = Synth::builtin();
        for (input, ids) in [
            (1u32, vec![7u64]),
            (512, vec![7]),
            (513, vec![7, 8]),
            (1500, vec![1, 2, 3]),
            (40160, (0..79).collect()),
        ] {
            let text = s.prompt(&req(0, input, &ids));
            assert_eq!(
                BuiltinTokenizer.count(&text),
                input as usize,
                "input {input}"
            );
        }
        // More tokens than the ids cover: padded, still exact.
        let text = s.prompt(&req(3, 2000, &[1]));
        assert_eq!(BuiltinTokenizer.count(&text), 2000);
    }

    #[test]
    fn same_ids_same_text_and_same_engine_blocks() {
        let s = Synth::builtin();
        let a = s.prompt(&req(0, 1100, &[1, 2, 3]));
        let b = s.prompt(&req(1, 1300, &[1, 2, 9]));
        let c = s.prompt(&req(2, 1100, &[1, 2, 3]));
        assert_eq!(a, c, "equal ids, equal length: equal text");
        let words = |t: &str| t.split(' ').count();
        // First two blocks (1024 words) are equal, the third differs.
        let (wa, wb): (Vec<_>, Vec<_>) = (a.split(' ').collect(), b.split(' ').collect());
        assert_eq!(wa[..1025], wb[..1025]);
        assert_ne!(wa[1025..1100], wb[1025..1100]);
        assert!(words(&a) > 1024);

        // On the engine: the shared 1024 tokens are exactly 64 shared 16-token blocks.
        let h = BlockHasher::new(16, DEFAULT_SEED);
        let (ha, hb) = (
            h.full_blocks(&BuiltinTokenizer.encode(&a)),
            h.full_blocks(&BuiltinTokenizer.encode(&b)),
        );
        let shared = ha.iter().zip(&hb).take_while(|(x, y)| x == y).count();
        assert_eq!(shared, 64);
    }

    #[test]
    fn simulator_keys_share_exactly_what_the_engine_would() {
        let (a, b) = (req(0, 1100, &[1, 2, 3]), req(1, 1300, &[1, 2, 9]));
        let (ka, kb) = (engine_blocks(&a, 16), engine_blocks(&b, 16));
        assert_eq!(ka.len(), 1100 / 16);
        assert_eq!(kb.len(), 1300 / 16);
        assert_eq!(ka.iter().zip(&kb).take_while(|(x, y)| x == y).count(), 64);
        assert_eq!(engine_blocks(&req(5, 1100, &[1, 2, 3]), 16), ka);
        // Padding is unique per request even with equal ids.
        let (p, q) = (
            engine_blocks(&req(1, 1024, &[1]), 16),
            engine_blocks(&req(2, 1024, &[1]), 16),
        );
        assert_eq!(p[..32], q[..32]);
        assert_ne!(p[32], q[32]);
    }

    /// A stand-in BPE: words are two tokens each, so the correction pass must converge.
    struct TwoPerWord;
    impl CountTokens for TwoPerWord {
        fn count(&self, text: &str) -> usize {
            text.split(' ').filter(|w| !w.is_empty()).count() * 2
        }
    }

    #[test]
    fn correction_pass_hits_the_target_for_other_tokenizers() {
        let s = Synth::new(Arc::new(TwoPerWord));
        let text = s.prompt(&req(0, 1000, &[1, 2]));
        assert_eq!(TwoPerWord.count(&text), 1000);
    }
}
